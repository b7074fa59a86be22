"""The Mochi 1 VAE (diffusers' AutoencoderKLMochi) as a flashvaed family, at small widths: decode and
encode exact against diffusers, streaming equal to one-shot, checkpoint layouts, both presets
through prune, and a student through export and the ONNX Runtime engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import contract_decode

from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.models import StreamingDecoder, StudentSpec, load_model, save_teacher
from flashvaed.models.contract import frame_mixing
from flashvaed.models.families import detect, get
from flashvaed.models.families.mochi import MochiConfig, MochiVAE
from flashvaed.prune.calibration import calibration_latents
from flashvaed.prune.pipeline import prune_teacher

# decoder 64 (block_in, up0, up1) -> 32 (up2, block_out); 32 channels = one GroupNorm channel per group
CONFIG = {
    "encoder_block_out_channels": (32, 32, 64, 64),
    "decoder_block_out_channels": (32, 32, 64, 64),
    "layers_per_block": (1, 2, 1, 1, 1),
}
SMALL = ExportOptions(chunk="1:2:3", height="16:16:32", width="16:24:32", batch="1:1:1")


def reference_vae(seed: int = 0):
    """diffusers' AutoencoderKLMochi with random weights, norm affines off their initial values and
    the output projection scaled so that frames mostly sit inside [-1, 1]."""
    from diffusers import AutoencoderKLMochi

    torch.manual_seed(seed)
    vae = AutoencoderKLMochi(**{k: list(v) for k, v in CONFIG.items()}, scaling_factor=1.25)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm_layer.weight" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        vae.decoder.proj_out.weight.mul_(0.5)
    return vae.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The reference, its diffusers directory, our teacher loaded from it, and latents."""
    d = tmp_path_factory.mktemp("mochi")
    ref = reference_vae()
    ref.save_pretrained(d / "mochi")
    teacher = load_model(d / "mochi")
    torch.manual_seed(3)
    z = torch.randn(1, 12, 4, 2, 3)
    return d, ref, teacher, z


def reference_decode(ref, z: torch.Tensor) -> torch.Tensor:
    """MochiPipeline's de-normalisation, then the VAE's decode (it drops the first 5 frames)."""
    c = ref.config
    mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return ref.decode(z * std / c.scaling_factor + mean).sample


def test_detects_and_loads_the_diffusers_directory(work):
    _, ref, teacher, _ = work
    assert isinstance(teacher, MochiVAE) and teacher.family == "mochi"
    assert (teacher.temporal_factor, teacher.spatial_factor, teacher.latent_channels) == (6, 8, 12)
    assert teacher.config == MochiConfig(**CONFIG, scaling_factor=1.25)
    assert get("mochi").clip_frames == 13
    keys = ref.state_dict()
    assert detect(keys, {}, "x").layout == "diffusers"
    mixing = frame_mixing(teacher)  # the per-frame GroupNorms
    assert "decoder.middle.blocks.0.norm1" in mixing and "decoder.up.3.blocks.0.norm2" in mixing


def test_decode_matches_diffusers(work):
    _, ref, teacher, z = work
    expected = reference_decode(ref, z)
    assert expected.shape == (1, 3, 19, 16, 24) and expected.abs().max() > 0.1
    torch.testing.assert_close(teacher.decode_clip(z, clamp=False), expected, atol=1e-4, rtol=0)
    assert teacher.decode(z).shape == expected.shape


def test_encode_matches_diffusers(work):
    _, ref, teacher, _ = work
    torch.manual_seed(4)
    video = torch.rand(1, 3, 13, 16, 24) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = teacher.posterior(video)
    assert mean.shape == (1, 12, 3, 2, 3)
    torch.testing.assert_close(mean, posterior.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(logvar, posterior.logvar, atol=1e-4, rtol=0)
    latents = teacher.encode(video)
    c = ref.config
    std = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    normalised = (posterior.mean - torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)) * c.scaling_factor / std
    torch.testing.assert_close(latents, normalised, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_equals_one_shot(work, chunk):
    _, _, teacher, z = work
    one_shot = teacher.decode_clip(z, clamp=False)
    stream = StreamingDecoder(teacher, clamp=False)
    pieces = [stream.push(z[:, :, :1])]
    assert pieces[0].shape[2] == 1  # the first latent frame is one frame
    for start in range(1, z.shape[2], chunk):
        pieces.append(stream.push(z[:, :, start : start + chunk]))
        assert pieces[-1].shape[2] == 6 * min(chunk, z.shape[2] - start)
    torch.testing.assert_close(torch.cat(pieces, dim=2), one_shot, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout,suffix", [("flashvaed", ".safetensors"), ("diffusers", "")])
def test_checkpoint_round_trip(work, layout, suffix, tmp_path):
    _, _, teacher, z = work
    path = save_teacher(teacher, tmp_path / f"mochi{suffix}", layout)
    back = load_model(path)
    assert back.config == teacher.config
    torch.testing.assert_close(back.decode(z), teacher.decode(z), atol=0, rtol=0)


@pytest.fixture(scope="module")
def students(work):
    _, _, teacher, _ = work
    calib = calibration_latents("synthetic", teacher, clips=2, frames=7, size=16)
    return {name: prune_teacher(teacher, StudentSpec.load(name), calib) for name in ("flash-mochi", "lite-mochi")}


def test_presets_prune_to_students_that_decode(work, students):
    _, _, teacher, z = work
    flash = students["flash-mochi"].student
    layout = flash.config.layout
    assert [st.op for st in (layout.middle, *layout.up)] == ["dwsep3d", "dwsep3d", "dwsep3d", "spatial2d", "spatial2d"]
    assert [st.width for st in (layout.middle, *layout.up)] == [64, 64, 64, 4, 4]
    lite = students["lite-mochi"].student.config.layout
    assert [st.width for st in (lite.middle, *lite.up)] == [16, 16, 16, 8, 8]
    expected = teacher.decode(z)
    for result in students.values():
        frames = result.student.decode(z)
        assert frames.shape == expected.shape and torch.isfinite(frames).all()
        assert result.report["totals"]["macs_ratio"] > 1


def test_student_export_runs_in_onnx_runtime(work, students, tmp_path):
    _, _, _, z = work
    student = students["flash-mochi"].student
    expected = student.decode(z).numpy()
    export(student, tmp_path / "e", SMALL)
    for chunk, got in zip((1, 2, 3), contract_decode(tmp_path / "e", z.numpy(), (1, 2, 3)), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"chunk {chunk}")


def test_a_one_pixel_frame_of_one_channel_groups_decodes():
    """A 1x1 latent frame at width 32 leaves one value per GroupNorm group: torch (and so diffusers)
    refuses to normalise it; its normalised value is exactly 0, so the norm gives its bias."""
    from flashvaed.models.families.mochi import FrameGroupNorm

    norm = FrameGroupNorm(32)
    with torch.no_grad():
        norm.bias.copy_(torch.arange(32.0))
    y = norm(torch.randn(2, 32, 3, 1, 1))
    assert torch.equal(y, torch.arange(32.0).view(1, 32, 1, 1, 1).expand(2, 32, 3, 1, 1))
    wide = torch.randn(1, 32, 2, 1, 2)  # two values per group: torch's own group norm
    expected = torch.nn.functional.group_norm(wide[:, :, 0], 32, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(wide)[:, :, 0], expected)


def test_the_export_plan_of_a_teacher_reads_its_decoder_only(work):
    """The encoder's own convs (whole-clip, never exported) are no fallback of a decoder export:
    every streaming conv of the decoder becomes a plugin node, nothing stays plain."""
    from flashvaed.export.plugin_nodes import plugin_plan
    from flashvaed.models.blocks import streaming_convs

    _, _, teacher, _ = work
    plan = plugin_plan(teacher, "all")
    assert plan.fallback == [] and plan.plain == 0
    assert len(plan.nodes) == len(streaming_convs(teacher.decoder)) > 0


def test_evaluate_takes_mochi_clips_by_default(work, students, tmp_path):
    """evaluate's default clip length is the family's: 1 + 6n from 17 on (19), not Wan's 17."""
    from flashvaed.distill.evaluate import default_frames, evaluate
    from flashvaed.models import save_student

    d, _, _, _ = work
    assert [default_frames(t) for t in (4, 8, 6)] == [17, 17, 19]
    save_student(students["lite-mochi"].student, tmp_path / "s")
    result = evaluate(tmp_path / "s", d / "mochi", ["synthetic"], clips=1, size=16, device="cpu")
    assert result.frames == 19 and result.metrics["psnr_student_teacher"] is not None
