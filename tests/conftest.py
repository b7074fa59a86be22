"""Shared fixtures: random-weight Wan2.1 and Wan2.2 VAEs in diffusers (the oracle) and in flashvaed."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*NumPy.*")


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
