"""FlashVAE's exact tiling and sharding inside real diffusers pipelines, assembled offline from tiny
random components.

The oracle is the same pipeline with the same FlashVAE decoding untiled in one process: with
tiling on, a frame split into several tiles must give the same frames within 1e-5 (float32;
nothing is blended), and so must a pipeline run under torchrun (2 ranks, gloo) whose FlashVAE
shards every frame across the ranks, on every rank.
diffusers' ``enable_tiling`` keywords are taken as they mean there (tile sizes in pixels) or
ignored with one warning (strides, overlaps, frame counts); tiles too small for the halo are
refused in one line; ``enable_tiling()`` without sizes tiles only where a decode would not fit
the memory it may use.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the pipeline modules import it, even with no text encoder

from diffusers import LTXPipeline, WanPipeline
from test_diffusers_pipelines import EMBEDS, ltx_pipeline, wan_pipeline

from flashvaed.diffusers import IGNORED_TILING_OPTIONS, FlashVAE
from flashvaed.engines.tiled import TiledDecoder, tiled_decode_bytes
from flashvaed.errors import InputError
from flashvaed.models import families
from flashvaed.models.memory import decode_step_bytes
from flashvaed.models.tiling import plan_tiling

ATOL = 1e-5
WAN_HALO, LTX_HALO = 11, 7  # the tiny teachers' halos (latent pixels), measured by plan_tiling


def tiny_teacher(name: str):
    torch.manual_seed(0)
    fam = families.get(name)
    return fam.teacher_type(fam.tiny_config()).eval()


@pytest.fixture(scope="module")
def wan():
    model = tiny_teacher("wan2.1")
    assert plan_tiling(model).halo == (WAN_HALO, WAN_HALO)
    return model


@pytest.fixture(scope="module")
def ltx():
    model = tiny_teacher("ltx")
    assert plan_tiling(model).halo == (LTX_HALO, LTX_HALO)
    return model


def wan_frames(pipe, height: int, width: int) -> torch.Tensor:
    """Frames in [0, 1] of a 2-latent-frame clip (5 frames)."""
    return pipe(
        prompt_embeds=EMBEDS,
        guidance_scale=1.0,
        height=height,
        width=width,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames


def ltx_frames(pipe, height: int, width: int) -> torch.Tensor:
    """Frames in [0, 1] of a 2-latent-frame clip (9 frames); LTX 0.9.1's injected noise comes
    from the global generator, so both runs start from the same seed."""
    torch.manual_seed(42)
    return pipe(
        prompt_embeds=EMBEDS,
        prompt_attention_mask=torch.ones(1, 16, dtype=torch.long),
        guidance_scale=1.0,
        height=height,
        width=width,
        num_frames=9,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        decode_timestep=0.05,
        decode_noise_scale=0.025,
    ).frames


def tiles_of(vae: FlashVAE, shape: tuple[int, ...]) -> int:
    decoder = vae._spatial(shape)
    return len(decoder.grid(shape[3], shape[4])) if isinstance(decoder, TiledDecoder) else 1


def test_wan_pipeline_tiled_with_diffusers_keywords_equals_untiled(wan):
    """Tiles of 352 px (44 latent pixels) over 384 px frames: two tiles; the strides diffusers
    blends with are ignored, with one warning."""
    vae = FlashVAE.from_pretrained(wan, device="cpu")
    pipe = wan_pipeline(WanPipeline, vae, channels_in=4, channels_out=4)
    expected = wan_frames(pipe, 384, 64)
    with pytest.warns(UserWarning, match="exact") as caught:
        vae.enable_tiling(
            tile_sample_min_height=352,
            tile_sample_min_width=352,
            tile_sample_stride_height=288,
            tile_sample_stride_width=288,
        )
    assert len(caught) == 1 and "tile_sample_stride_height, tile_sample_stride_width" in str(caught[0].message)
    assert pipe.vae.use_tiling and vae._tiling.tile == (44, 44)
    assert tiles_of(vae, (1, 4, 2, 48, 8)) == 2
    torch.testing.assert_close(wan_frames(pipe, 384, 64), expected, atol=ATOL, rtol=0)


def test_ltx_pipeline_tiled_equals_untiled(ltx):
    """LTX 0.9.1 (timestep-conditioned, noise injected from the global generator): tiles of 15
    latent pixels over 16x2 latent frames, each tile taking its part of the frame's noise maps."""
    vae = FlashVAE.from_pretrained(ltx, device="cpu")
    assert "timestep" in vae.decoder.step_inputs and vae.decoder.noise_scales
    pipe = ltx_pipeline(LTXPipeline, vae)
    expected = ltx_frames(pipe, 512, 64)
    vae.enable_tiling(tile=2 * LTX_HALO + 1)
    assert tiles_of(vae, (1, 8, 2, 16, 2)) == 2
    torch.testing.assert_close(ltx_frames(pipe, 512, 64), expected, atol=ATOL, rtol=0)


def test_diffusers_tile_sizes_become_latent_tiles_of_at_least_four_halos(wan):
    vae = FlashVAE.from_pretrained(wan, device="cpu")
    assert not vae.use_tiling
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sizes above the floor: no warning
        vae.enable_tiling(400, 480)  # diffusers' positional order: height, width
        assert vae._tiling.tile == (50, 60)
        vae.enable_tiling(tile_sample_min_width=360)  # one side given: square
        assert vae._tiling.tile == (45, 45)
        vae.enable_tiling(tile_sample_min_size=405)  # older VAEs' one size (floor division, as diffusers)
        assert vae._tiling.tile == (50, 50)
    with pytest.warns(UserWarning, match=r"256x256 px are 32x32 latent pixels.*tiles of 44x44 latent pixels \(352x352"):
        vae.enable_tiling(256, 256)  # diffusers' default for Wan: below four halos of 11
    assert vae._tiling.tile == (44, 44)


def test_ignored_options_warn_once_and_unknown_ones_are_refused(wan):
    vae = FlashVAE.from_pretrained(wan, device="cpu")
    with pytest.warns(UserWarning) as caught:
        vae.enable_tiling(400, 400, 17, **dict.fromkeys(IGNORED_TILING_OPTIONS, 1))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "nothing is blended" in message and "1 positional option" in message
    assert all(name in message for name in IGNORED_TILING_OPTIONS)
    assert vae._tiling.tile == (50, 50)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tile_blend'"):
        vae.enable_tiling(tile_blend=True)
    with pytest.raises(InputError, match="one tile size, not tile and tile_sample_min"):
        vae.enable_tiling(256, tile=30)
    with pytest.raises(InputError, match="tile_sample_min_height must be a positive whole number"):
        vae.enable_tiling(tile_sample_min_height=0.5)


def test_use_tiling_and_sizes_persist_as_in_diffusers(wan):
    vae = FlashVAE.from_pretrained(wan, device="cpu")
    vae.enable_tiling(tile=(30, 40))
    vae.disable_tiling()
    assert not vae.use_tiling and vae._spatial((1, 4, 2, 48, 48)) is vae.decoder
    vae.enable_tiling()  # no sizes: the ones given before (what a pipeline calling it expects)
    assert vae.use_tiling and vae._tiling.tile == (30, 40)
    vae.use_tiling = False
    assert not vae.use_tiling
    vae.use_tiling = True
    assert vae._tiling.tile == (30, 40) and tiles_of(vae, (1, 4, 2, 48, 48)) > 1
    assert tiles_of(vae, (1, 4, 2, 30, 40)) == 1 and vae._spatial((1, 4, 2, 30, 40)) is vae.decoder


@pytest.mark.parametrize("tile", [(22, 30), 22, "23x22", (1, 1)])
def test_a_tile_too_small_for_the_halo_is_refused_in_one_line(wan, tile):
    vae = FlashVAE.from_pretrained(wan, device="cpu")
    with pytest.raises(InputError, match=r"halo of 11x11 on both sides: tiles need at least 23x23") as e:
        vae.enable_tiling(tile=tile)
    assert "\n" not in str(e.value)
    assert not vae.use_tiling
    vae.enable_tiling(tile=(23, 23))  # the smallest that holds the halo
    assert vae._tiling.tile == (23, 23)


def test_without_sizes_tiles_only_what_does_not_fit_and_disable_restores(wan, monkeypatch):
    """enable_tiling() alone: under a memory limit the whole frame exceeds but a tile fits, the
    decode tiles (largest tile that fits) and equals the untiled one; disabled, it is refused."""
    z = torch.randn(1, 4, 2, 32, 8, generator=torch.Generator().manual_seed(5))
    expected = FlashVAE.from_pretrained(wan, device="cpu").decode(z).sample
    vae = FlashVAE.from_pretrained(wan, device="cpu")  # its own memory checks, none made yet
    vae.enable_tiling()
    assert vae._spatial(tuple(z.shape)) is vae.decoder  # fits: no tiling work
    frame = decode_step_bytes(wan, 1, 1, 32, 8, torch.float32)
    tile = tiled_decode_bytes(vae.decoder, tuple(z.shape), 2, (2 * WAN_HALO + 1, 8))
    assert tile < frame
    monkeypatch.setenv("FLASHVAED_MEMORY_LIMIT", str((tile + frame) // 2))
    assert tiles_of(vae, tuple(z.shape)) >= 2
    torch.testing.assert_close(vae.decode(z).sample, expected, atol=ATOL, rtol=0)
    vae.disable_tiling()
    with pytest.raises(ValueError, match="memory"):
        vae.decode(z)
    vae.enable_tiling(max_memory=(tile + frame) // 2)  # the same budget, given
    monkeypatch.delenv("FLASHVAED_MEMORY_LIMIT")
    assert tiles_of(vae, tuple(z.shape)) >= 2


# --------------------------------------------------------------------------------------------
# sharded inside a pipeline under torchrun
# --------------------------------------------------------------------------------------------
SHARD_PX = (256, 32)  # 32x4 latent pixels: two bands of 16 rows, each reading 11 more


def worker_sharded(out: Path) -> None:
    """One rank: the whole pipeline, its FlashVAE decoding this rank's band of every frame."""
    torch.set_num_threads(1)
    vae = FlashVAE.from_pretrained(tiny_teacher("wan2.1"), device="cpu")
    pipe = wan_pipeline(WanPipeline, vae, channels_in=4, channels_out=4)
    vae.enable_sharding()
    rank = vae._sharded.rank
    frames = wan_frames(pipe, *SHARD_PX)
    h, w = SHARD_PX[0] // 8, SHARD_PX[1] // 8
    (out / f"rank{rank}.json").write_text(json.dumps({"band": vae._sharded.band(h, w).size, "frame": [h, w]}))
    torch.save(frames, out / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wan_pipeline_under_torchrun_sharded_equals_one_process(wan, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on the CPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--monitor-interval", "0.1"]
    cmd += ["--master-port", str(free_port()), __file__, "sharded", str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expected = wan_frames(wan_pipeline(WanPipeline, FlashVAE.from_pretrained(wan, device="cpu"), 4, 4), *SHARD_PX)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["band"][0] < report["frame"][0]  # each rank decodes a band, not the frame
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, atol=ATOL, rtol=0)


if __name__ == "__main__":  # under the launcher: python -m torch.distributed.run ... this file sharded OUT
    {"sharded": worker_sharded}[sys.argv[1]](Path(sys.argv[2]))
