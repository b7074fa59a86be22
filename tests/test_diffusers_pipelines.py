"""FlashVAE inside real diffusers pipelines, assembled offline from tiny random components.

The oracle is the same pipeline with diffusers' own VAE (same weights): its frames must equal
those of FlashVAE over the teacher checkpoint and over the teacher's ONNX Runtime engine. Students
(directory and engine) must run and give frames of the right shape and range.
"""

from __future__ import annotations

import pytest
import torch

from flashvaed import api

pytest.importorskip("transformers")  # the pipeline modules import it, even with no text encoder

from conftest import perturbed_ltx_vae
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

from flashvaed.diffusers import EncoderMissingError, FamilyMismatchError, FlashVAE
from flashvaed.errors import InputError

EMBEDS = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(3))


def wan_transformer(channels_in: int, channels_out: int) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels_in,
        out_channels=channels_out,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def ltx_transformer() -> LTXVideoTransformer3DModel:
    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=32,
    ).eval()


def wan_pipeline(cls, vae, channels_in: int = 16, channels_out: int = 16, shift: float = 7.0, **extra):
    """``cls`` (WanPipeline, WanImageToVideoPipeline) with no text encoder and a tiny transformer."""
    return cls(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=wan_transformer(channels_in, channels_out),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        **extra,
    )


def ltx_pipeline(cls, vae):
    """``cls`` (LTXPipeline, LTXImageToVideoPipeline) with no text encoder and a tiny transformer."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    return cls(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=ltx_transformer())


def wan_frames(pipe, size: int, **extra) -> torch.Tensor:
    out = pipe(
        prompt_embeds=EMBEDS,
        guidance_scale=1.0,
        height=size,
        width=size,
        num_frames=9,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **extra,
    )
    return out.frames


def ltx_frames(pipe, seed: int = 42, **extra) -> torch.Tensor:
    torch.manual_seed(seed)  # LTX 0.9.1's VAE draws its injected noise from the global generator
    out = pipe(
        **extra,
        prompt_embeds=EMBEDS,
        prompt_attention_mask=torch.ones(1, 16, dtype=torch.long),
        guidance_scale=1.0,
        height=64,
        width=64,
        num_frames=17,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        decode_timestep=0.05,
        decode_noise_scale=0.025,
    )
    return out.frames


def engine_of(model, out, size: str):
    """An ONNX Runtime engine of ``model`` for latent sizes ``size`` (pixels, MIN:MAX)."""
    api.export(model, out.with_name(out.name + "-export"), chunk="1:2:4", height=size, width=size, batch="1")
    api.build_engine(out.with_name(out.name + "-export"), out)
    return out


@pytest.fixture(scope="module")
def wan21(diffusers_vae_8, diffusers_dir_8, tmp_path_factory):
    d = tmp_path_factory.mktemp("wan21-pipe")
    api.prune(diffusers_dir_8, d / "student", preset="flash-wan2.1", calib_clips=1, calib_frames=5, calib_size=32)
    return {
        "vae": diffusers_vae_8,
        "teacher": diffusers_dir_8,
        "engine": engine_of(diffusers_dir_8, d / "engine", "32:32:64"),
        "student": d / "student",
        "student_engine": engine_of(d / "student", d / "student-engine", "32:32:64"),
        "small_engine": engine_of(diffusers_dir_8, d / "small-engine", "16:16:16"),
    }


def test_wan21_pipeline_frames_equal_diffusers_vae(wan21):
    pipe = wan_pipeline(WanPipeline, wan21["vae"])
    expected = wan_frames(pipe, 32)
    for source in ("teacher", "engine"):
        pipe.vae = FlashVAE.from_pretrained(wan21[source], device="cpu")
        torch.testing.assert_close(wan_frames(pipe, 32), expected, atol=1e-4, rtol=0)
    for source in ("student", "student_engine"):
        pipe.vae = FlashVAE.from_pretrained(wan21[source], device="cpu")
        frames = wan_frames(pipe, 32)
        assert frames.shape == expected.shape and frames.min() >= 0 and frames.max() <= 1
        assert (frames - expected).abs().mean() < 0.25  # a pruned, undistilled student: near, not equal


def test_wan21_image_to_video_encodes_with_the_teacher(wan21):
    """Wan2.1 I2V (no CLIP: the transformer takes no image embedding) over a student engine, the
    teacher encoding the image; over the teacher itself it equals diffusers' VAE."""
    pipe = wan_pipeline(WanImageToVideoPipeline, wan21["vae"], 36, 16)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = wan_frames(pipe, 32, image=image)
    pipe.vae = FlashVAE.from_pretrained(wan21["teacher"], device="cpu")
    torch.testing.assert_close(wan_frames(pipe, 32, image=image), expected, atol=1e-4, rtol=0)
    pipe.vae = FlashVAE.from_pretrained(wan21["student_engine"], teacher=wan21["teacher"], device="cpu")
    assert wan_frames(pipe, 32, image=image).shape == expected.shape
    pipe.vae = FlashVAE.from_pretrained(wan21["student_engine"])
    with pytest.raises(EncoderMissingError, match="teacher="):
        wan_frames(pipe, 32, image=image)


def test_an_engine_too_small_for_the_pipeline_names_both_sizes(wan21):
    pipe = wan_pipeline(WanPipeline, FlashVAE.from_pretrained(wan21["small_engine"]))
    with pytest.raises(InputError, match=r"built for height 2 latent \(16\.\.16 px\), got 4 latent \(32 px\)"):
        wan_frames(pipe, 32)


def test_wan22_pipeline_frames_equal_diffusers_vae(wan22_diffusers_8, wan22_dir_8, tmp_path):
    pipe = wan_pipeline(WanPipeline, wan22_diffusers_8, 48, 48, shift=5.0, expand_timesteps=True)
    expected = wan_frames(pipe, 32)
    for source in (wan22_dir_8, engine_of(wan22_dir_8, tmp_path / "engine", "32:32:64")):
        pipe.vae = FlashVAE.from_pretrained(source, device="cpu")
        torch.testing.assert_close(wan_frames(pipe, 32), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("generation", ["0.9.0", "0.9.1"])
def test_ltx_pipeline_frames_equal_diffusers_vae(generation, tmp_path):
    """0.9.1 conditions on the decode timestep and injects noise drawn from the global generator:
    with the same seed the drop-in reproduces diffusers' VAE, with another it does not."""
    vae = perturbed_ltx_vae(generation)
    vae.save_pretrained(tmp_path / "vae")
    pipe = ltx_pipeline(LTXPipeline, vae)
    expected = ltx_frames(pipe)
    sources = [tmp_path / "vae"]
    if generation == "0.9.1":
        sources.append(engine_of(tmp_path / "vae", tmp_path / "engine", "64"))
    for source in sources:
        pipe.vae = FlashVAE.from_pretrained(source, device="cpu")
        torch.testing.assert_close(ltx_frames(pipe), expected, atol=1e-4, rtol=0)
    if generation == "0.9.1":
        assert (ltx_frames(pipe, seed=7) - expected).abs().max() > 1e-3


def test_ltx_image_to_video_frames_equal_diffusers_vae(tmp_path):
    """LTX I2V samples the image latents from the posterior (``latent_dist.sample(generator)``):
    the teacher's mean and log-variance, drawn as diffusers' VAE draws them."""
    vae = perturbed_ltx_vae("0.9.1")
    vae.save_pretrained(tmp_path / "vae")
    pipe = ltx_pipeline(LTXImageToVideoPipeline, vae)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = ltx_frames(pipe, image=image)
    pipe.vae = FlashVAE.from_pretrained(tmp_path / "vae", device="cpu")
    torch.testing.assert_close(ltx_frames(pipe, image=image), expected, atol=1e-4, rtol=0)


def test_a_model_of_another_family_is_refused_in_one_line(wan21, tmp_path):
    perturbed_ltx_vae("0.9.0").save_pretrained(tmp_path / "ltx")
    with pytest.raises(FamilyMismatchError, match="holds a .*LTX.*Wan pipelines"):
        wan_pipeline(WanPipeline, FlashVAE.from_pretrained(tmp_path / "ltx"))
    with pytest.raises(FamilyMismatchError, match="LTX-Video pipelines"):
        ltx_pipeline(LTXPipeline, FlashVAE.from_pretrained(wan21["teacher"]))


def test_flashvae_moves_and_reports_like_a_diffusers_vae(wan21):
    vae = FlashVAE.from_pretrained(wan21["teacher"], device="cpu")
    assert isinstance(vae, torch.nn.Module) and vae.device == torch.device("cpu") and vae.dtype == torch.float32
    vae.to(torch.bfloat16)
    assert vae.dtype == torch.bfloat16 and next(vae.decoder.model.parameters()).dtype == torch.bfloat16
    vae.enable_tiling()
    vae.enable_slicing()
    z = torch.randn(1, 16, 2, 4, 4)
    assert vae.decode(z).sample.shape == (1, 3, 5, 32, 32)


def test_the_end_to_end_benchmark_runs(tmp_path):
    """benchmarks/pipeline_e2e.py --smoke: every VAE through a real pipeline, times split and ratios."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_e2e.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--json", str(tmp_path / "e2e.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "e2e.json").read_text())["vaes"]
    assert set(results) == {"teacher", "flash", "flash-ort"}
    for r in results.values():
        assert r["frames"] == [1, 9, 3, 32, 32]
        assert 0 < r["decode_s"] < r["total_s"] and 0 < r["decode_share"] < 1 and r["e2e_speedup_x"] > 0
    assert "| flash-ort |" in proc.stdout
