"""Shared fixtures: random-weight Wan2.1 and Wan2.2 VAEs in diffusers (the oracle) and in flashvaed."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*NumPy.*")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2``) each worker computes on one thread, and so do
    the processes it starts: two workers fill two cores. Tiny models gain nothing from a second
    thread, and threads that spin on a core another worker holds cost minutes.

    With no more cores than workers, each worker (and what it starts) is also pinned to a core of
    its own: ONNX Runtime sizes its sessions' thread pools from the cores a process may use
    (``ort_backend.physical_cores``; no environment variable sets it), and an unpinned worker's
    sessions spin a second thread on the other worker's core after every op (test_engines.py: 31%
    more CPU time). Pinned, the CLI and doc processes a test starts follow too; torchrun's two ranks
    then share their worker's core, which costs them nothing measurable (tiny steps, gloo waits)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        torch.set_num_threads(1)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
        if 1 < len(cpus) <= workers:
            os.sched_setaffinity(0, {cpus[int(worker.removeprefix("gw")) % len(cpus)]})


def perturb(vae):
    """Move every norm gain and bias off its initial value; scale the head down so that decoded
    frames mostly sit inside the [-1, 1] clamp and comparisons see real values, not saturated ones."""
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        vae.decoder.conv_out.weight.mul_(0.5)
    return vae.eval()


def perturbed_diffusers_vae(base_dim: int, seed: int = 0):
    """diffusers' AutoencoderKLWan (Wan2.1) with random weights, norm gains and output scale not at init."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return perturb(AutoencoderKLWan(base_dim=base_dim))


@pytest.fixture(scope="session")
def diffusers_vae_8():
    return perturbed_diffusers_vae(8, seed=0)


@pytest.fixture(scope="session")
def diffusers_vae_16():
    return perturbed_diffusers_vae(16, seed=1)


@pytest.fixture(scope="session")
def diffusers_dir_8(diffusers_vae_8, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "wan-diffusers-8"
    diffusers_vae_8.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def teacher_8(diffusers_dir_8):
    from flashvaed.models import load_model

    return load_model(diffusers_dir_8)


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def perturbed_wan22_vae(base_dim: int, decoder_base_dim: int, seed: int = 0):
    """diffusers' AutoencoderKLWan configured as the Wan2.2 (TI2V-5B) VAE at a reduced width,
    with random weights and every norm gain and bias moved off its initial value."""
    from diffusers import AutoencoderKLWan

    from flashvaed.models.families.wan22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=base_dim,
        decoder_base_dim=decoder_base_dim,
        z_dim=48,
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        latents_mean=list(WAN22_LATENTS_MEAN),
        latents_std=list(WAN22_LATENTS_STD),
    )
    return perturb(vae)


@pytest.fixture(scope="session")
def wan22_diffusers_8():
    return perturbed_wan22_vae(8, 8, seed=22)


@pytest.fixture(scope="session")
def wan22_dir_8(wan22_diffusers_8, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt22") / "wan22-diffusers-8"
    wan22_diffusers_8.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def wan22_teacher_8(wan22_dir_8):
    from flashvaed.models import load_model

    return load_model(wan22_dir_8)


def diffusers_to_wan22_original(state: dict, num_res_blocks: int = 2) -> dict:
    """diffusers' Wan2.2 VAE keys -> the released Wan2.2_VAE.pth names, written from the key
    layout in the Wan2.2 facts (convert_vae_22, read backwards), independently of flashvaed."""
    import re

    resnet = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
    resnet["conv_shortcut"] = "shortcut"

    def rename(key: str) -> str:
        key = re.sub(
            r"(resnets\.\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.", lambda m: f"{m[1]}.{resnet[m[2]]}.", key
        )
        for old, new in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
            if key.startswith(old):
                return new + key[len(old) :]
        key = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", key)
        key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", key)
        key = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", key)
        key = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", key)
        key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".middle.{2 * int(m[1])}.", key)
        key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2.", key)
        key = re.sub(
            r"encoder\.down_blocks\.(\d+)\.downsampler\.", rf"encoder.downsamples.\1.downsamples.{num_res_blocks}.", key
        )
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2.", key)
        return re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsampler\.", rf"decoder.upsamples.\1.upsamples.{num_res_blocks + 1}.", key
        )

    return {rename(k): v.clone() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# LTX-Video: diffusers' AutoencoderKLLTXVideo at tiny widths, one per decoder generation, with the
# topology of the released configs (docs: ltx-vae.md, section 8)
LTX_TINY = {
    "0.9.0": dict(
        block_out_channels=(8, 16, 32, 32),
        decoder_block_out_channels=(8, 16, 32, 32),
        layers_per_block=(1, 1, 1, 1, 2),
        decoder_layers_per_block=(1, 2, 1, 1, 2),
    ),
    "0.9.1": dict(
        block_out_channels=(8, 16, 32, 32),
        decoder_block_out_channels=(16, 32, 64),
        layers_per_block=(1, 1, 1, 1, 2),
        decoder_layers_per_block=(1, 2, 1, 2),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(True, True, True, False),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        timestep_conditioning=True,
    ),
    "0.9.5": dict(
        block_out_channels=(8, 16, 32, 64, 128),
        down_block_types=("LTXVideo095DownBlock3D",) * 4,
        layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        decoder_block_out_channels=(16, 32, 64),
        decoder_layers_per_block=(1, 1, 2, 1),
        decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        upsample_residual=(True, True, True),
        upsample_factor=(2, 2, 2),
        timestep_conditioning=True,
    ),
}
LTX_LATENT = 8  # latent channels of the tiny models


def perturbed_ltx_vae(generation: str, seed: int = 0):
    """diffusers' AutoencoderKLLTXVideo (tiny) with random weights and everything that starts at a
    neutral value moved off it: shortcut LayerNorms, biases, noise scales, scale-shift tables, the
    timestep multiplier and the latent statistics."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(latent_channels=LTX_LATENT, **LTX_TINY[generation])
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "per_channel_scale" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif "norm3" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            elif "scale_shift_table" in name:
                p.add_(0.1 * torch.randn_like(p))
        if vae.decoder.timestep_scale_multiplier is not None:
            vae.decoder.timestep_scale_multiplier.fill_(700.0)  # not the 1000.0 it starts at
        vae.latents_mean.copy_(0.3 * torch.randn_like(vae.latents_mean))
        vae.latents_std.copy_(0.5 + torch.rand_like(vae.latents_std))
        vae.decoder.conv_out.conv.weight.mul_(0.5)
    return vae.eval()


def ltx_reference_decode(ref, latents, timestep=None, seed=0):
    """diffusers' decoder on normalised latents (it takes de-normalised ones), unclamped; noise
    maps from the global generator after ``torch.manual_seed(seed)``, as upstream draws them."""
    mean = ref.latents_mean.view(1, -1, 1, 1, 1)
    std = ref.latents_std.view(1, -1, 1, 1, 1)
    torch.manual_seed(seed)
    with torch.no_grad():
        t = None if timestep is None else torch.as_tensor(timestep, dtype=torch.float32).expand(latents.shape[0])
        return ref.decoder(latents * std + mean, t)


# The original single-file layout, written from the facts (ltx-vae.md section 7: D-CONV's block
# renames read backwards, the resnet renames, the statistics names), independently of flashvaed.
LTX_ORIGINAL_BLOCKS = {
    "0.9.0": {
        "decoder": ["mid_block", "up_blocks.0", "up_blocks.1.upsamplers.0", "up_blocks.1", "up_blocks.2.conv_in",
                    "up_blocks.2.upsamplers.0", "up_blocks.2", "up_blocks.3.conv_in", "up_blocks.3.upsamplers.0",
                    "up_blocks.3"],
        "encoder": ["down_blocks.0", "down_blocks.0.downsamplers.0", "down_blocks.0.conv_out", "down_blocks.1",
                    "down_blocks.1.downsamplers.0", "down_blocks.1.conv_out", "down_blocks.2",
                    "down_blocks.2.downsamplers.0", "down_blocks.3", "mid_block"],
    },
    "0.9.1": {
        "decoder": ["mid_block", "up_blocks.0.upsamplers.0", "up_blocks.0", "up_blocks.1.upsamplers.0", "up_blocks.1",
                    "up_blocks.2.upsamplers.0", "up_blocks.2"],
    },
    "0.9.5": {
        "encoder": ["down_blocks.0", "down_blocks.0.downsamplers.0", "down_blocks.1", "down_blocks.1.downsamplers.0",
                    "down_blocks.2", "down_blocks.2.downsamplers.0", "down_blocks.3", "down_blocks.3.downsamplers.0",
                    "mid_block"],
    },
}  # fmt: skip
LTX_ORIGINAL_BLOCKS["0.9.1"]["encoder"] = LTX_ORIGINAL_BLOCKS["0.9.0"]["encoder"]
LTX_ORIGINAL_BLOCKS["0.9.5"]["decoder"] = LTX_ORIGINAL_BLOCKS["0.9.1"]["decoder"]


def ltx_original_config(generation: str) -> dict:
    """The upstream (CausalVideoAutoencoder) config of the tiny models, block lists in upstream order."""
    res = lambda n, noise=False: ["res_x", {"num_layers": n, **({"inject_noise": True} if noise else {})}]  # noqa: E731
    if generation == "0.9.5":
        encoder = [res(1), ["compress_space_res", {"multiplier": 2}], res(1), ["compress_time_res", {"multiplier": 2}],
                   res(1), ["compress_all_res", {"multiplier": 2}], res(1), ["compress_all_res", {"multiplier": 2}],
                   res(1)]  # fmt: skip
    else:
        encoder = [res(1), ["compress_all", {}], ["res_x_y", 1], res(1), ["compress_all", {}], ["res_x_y", 1], res(1),
                   ["compress_all", {}], res(1), res(2)]  # fmt: skip
    if generation == "0.9.0":  # running order: mid 2, up 1, compress, 1, res_x_y, compress, 2, res_x_y, compress, 1
        decoder = [res(1), ["compress_all", {}], ["res_x_y", {"multiplier": 2}], res(2), ["compress_all", {}],
                   ["res_x_y", {"multiplier": 2}], res(1), ["compress_all", {}], res(1), res(2)]  # fmt: skip
    else:
        up = ["compress_all", {"residual": True, "multiplier": 2}]
        noisy = generation == "0.9.1"
        layers = [1, 2, 1, 2] if noisy else [1, 1, 2, 1]
        decoder = [res(layers[0], noisy), up, res(layers[1], noisy), up, res(layers[2], noisy), up, res(layers[3])]
    return {
        "_class_name": "CausalVideoAutoencoder",
        "dims": 3,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": LTX_LATENT,
        "encoder_blocks": encoder,
        "decoder_blocks": decoder,
        "encoder_base_channels": 8,
        "decoder_base_channels": 8,
        "scaling_factor": 1.0,
        "norm_layer": "pixel_norm",
        "patch_size": 4,
        "latent_log_var": "uniform",
        "use_quant_conv": False,
        "causal_decoder": False,
        "timestep_conditioning": generation != "0.9.0",
    }


def diffusers_to_ltx_original(state: dict, generation: str) -> dict:
    """diffusers' AutoencoderKLLTXVideo keys -> the original single file's ``vae.`` names."""
    import re

    out = {}
    for key, value in state.items():
        if key in ("latents_mean", "latents_std"):
            stat = "mean-of-means" if key == "latents_mean" else "std-of-means"
            out[f"vae.per_channel_statistics.{stat}"] = value.clone()
            continue
        side, _, rest = key.partition(".")
        for index, prefix in sorted(enumerate(LTX_ORIGINAL_BLOCKS[generation][side]), key=lambda item: -len(item[1])):
            if rest.startswith(prefix + "."):
                rest = f"{'up' if side == 'decoder' else 'down'}_blocks.{index}." + rest[len(prefix) + 1 :]
                break
        rest = rest.replace(".resnets.", ".res_blocks.")
        rest = re.sub(r"norm3\.(weight|bias)$", r"norm3.norm.\1", rest)
        rest = rest.replace("conv_shortcut.conv.", "conv_shortcut.")
        if side == "decoder" and rest.startswith("time_embedder."):
            rest = "last_" + rest
        if side == "decoder" and rest == "scale_shift_table":
            rest = "last_scale_shift_table"
        out[f"vae.{side}.{rest}"] = value.clone()
    return out


@pytest.fixture(scope="session")
def hostile_world(tmp_path_factory):
    """The world the hostile-input suites tamper with (tests/hostile.py), built once per run: under
    pytest-xdist the workers share one copy in the run's common temporary folder (test_fuzz.py and
    test_fuzz_config.py may land on different workers, and the build is a prune, an export and an
    engine). Tests only read it; hostile_copy gives each case its own copy to tamper with."""
    import fcntl

    from hostile import build_world

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # popen-gwN's parent: this run's folder, shared by its workers
    world, done = root / "hostile-world", root / "hostile-world.done"
    with open(root / "hostile-world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker builds; the other waits, then reads
        if not done.exists():
            import shutil

            shutil.rmtree(world, ignore_errors=True)  # a half-built world of a worker that died
            world.mkdir()
            build_world(world)
            done.touch()
    return world


@pytest.fixture
def hostile_copy(hostile_world, tmp_path):
    """A private copy of the hostile world for one case to tamper with."""
    import shutil

    return shutil.copytree(hostile_world, tmp_path / "w", symlinks=True)
