"""FlashVAE inside a real diffusers ``MochiPipeline``, assembled offline from tiny random components.

The oracle is the same pipeline with diffusers' own ``AutoencoderKLMochi`` (same weights): its
frames must equal those of FlashVAE over the diffusers directory and over its ONNX Runtime engine.
A pruned student runs in the pipeline; pipelines of other families refuse a Mochi FlashVAE, and
the Mochi pipeline refuses theirs.
"""

from __future__ import annotations

import pytest
import torch

from flashvaed import api

pytest.importorskip("transformers")  # the pipeline modules import it, even with no text encoder

from conftest import perturbed_ltx_vae
from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, MochiPipeline, MochiTransformer3DModel, WanPipeline
from test_diffusers_pipelines import EMBEDS, engine_of, ltx_pipeline, wan_pipeline
from test_mochi import reference_vae

from flashvaed.diffusers import FamilyMismatchError, FlashVAE

SIZE, FRAMES = 48, 13  # 6x6 latents (the transformer's 2x2 patches), 3 latent frames


def mochi_transformer() -> MochiTransformer3DModel:
    torch.manual_seed(0)
    return MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        text_embed_dim=32,
        time_embed_dim=4,
        max_sequence_length=16,
    ).eval()


def mochi_pipeline(vae) -> MochiPipeline:
    """MochiPipeline with no text encoder and a tiny transformer."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    return MochiPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=mochi_transformer()
    )


def mochi_frames(pipe) -> torch.Tensor:
    out = pipe(
        prompt_embeds=EMBEDS,
        prompt_attention_mask=torch.ones(1, 16, dtype=torch.long),
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    return out.frames


@pytest.fixture(scope="module")
def mochi(tmp_path_factory):
    """diffusers' VAE (scaling factor 1.25), its directory, its engine, a flash-mochi student, and
    the frames of the pipeline over diffusers' VAE."""
    d = tmp_path_factory.mktemp("mochi-pipe")
    vae = reference_vae()
    vae.save_pretrained(d / "vae")
    api.prune(d / "vae", d / "student", preset="flash-mochi", calib_clips=1, calib_frames=7, calib_size=16)
    return {
        "vae": vae,
        "teacher": d / "vae",
        "engine": engine_of(d / "vae", d / "engine", str(SIZE)),
        "student": d / "student",
        "expected": mochi_frames(mochi_pipeline(vae)),
    }


def test_mochi_pipeline_frames_equal_diffusers_vae(mochi):
    expected = mochi["expected"]
    assert expected.shape == (1, FRAMES, 3, SIZE, SIZE)
    pipe = mochi_pipeline(mochi["vae"])
    for source in ("teacher", "engine"):
        pipe.vae = FlashVAE.from_pretrained(mochi[source], device="cpu")
        torch.testing.assert_close(mochi_frames(pipe), expected, atol=1e-4, rtol=0, msg=source)


def test_a_pruned_student_runs_in_the_mochi_pipeline(mochi):
    expected = mochi["expected"]
    pipe = mochi_pipeline(FlashVAE.from_pretrained(mochi["student"], device="cpu"))
    frames = mochi_frames(pipe)
    assert frames.shape == expected.shape and frames.min() >= 0 and frames.max() <= 1
    assert (frames - expected).abs().mean() < 0.25  # a pruned, undistilled student: near, not equal


def test_flashvae_reads_as_autoencoder_kl_mochi(mochi):
    """What the pipeline reads of its VAE: the latent statistics and scaling factor in config, as
    diffusers' VAE holds them; nothing another family's pipelines read."""
    vae = FlashVAE.from_pretrained(mochi["teacher"], device="cpu")
    ref = mochi["vae"].config
    assert dict(vae.config) == {k: list(ref[k]) if k != "scaling_factor" else ref[k] for k in vae.config}
    assert set(vae.config) == {"latents_mean", "latents_std", "scaling_factor"}
    assert vae.config.scaling_factor == 1.25 and vae.spatial_compression_ratio == 8
    vae.enable_tiling()  # accepted, as diffusers' VAE accepts it
    with pytest.raises(FamilyMismatchError, match="LTX-Video pipelines"):
        vae.temporal_compression_ratio  # noqa: B018


def test_pipelines_of_other_families_refuse_a_mochi_flashvae(mochi):
    vae = FlashVAE.from_pretrained(mochi["teacher"])
    with pytest.raises(FamilyMismatchError, match="holds a Mochi VAE.*Wan pipelines"):
        wan_pipeline(WanPipeline, vae)
    with pytest.raises(FamilyMismatchError, match="holds a Mochi VAE.*LTX-Video pipelines"):
        ltx_pipeline(LTXPipeline, vae)


def test_the_mochi_pipeline_refuses_an_ltx_flashvae(tmp_path):
    perturbed_ltx_vae("0.9.0").save_pretrained(tmp_path / "ltx")
    pipe = mochi_pipeline(FlashVAE.from_pretrained(tmp_path / "ltx"))
    with pytest.raises(FamilyMismatchError, match="holds a LTX-Video VAE.*Mochi pipelines"):
        mochi_frames(pipe)


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="MochiPipeline reads only config.latents_mean/latents_std/scaling_factor, and Wan pipelines read "
    "config.latents_mean too: a Wan FlashVAE answers with 16 entries and the pipeline's .view(1, 12, ...) "
    "fails before FlashVAE is asked anything only Mochi pipelines read (diffusers' AutoencoderKLWan fails alike)",
)
def test_the_mochi_pipeline_refuses_a_wan_flashvae(diffusers_dir_8):
    pipe = mochi_pipeline(FlashVAE.from_pretrained(diffusers_dir_8))
    with pytest.raises(FamilyMismatchError, match="holds a Wan2.1 VAE.*Mochi pipelines"):
        mochi_frames(pipe)
