"""The Wan2.2 students: flash-wan2.2-narrow (the low-resolution stream pruned to 5/8) needs under
1/20 of the teacher's MACs at 704x1280, where flash-wan2.2 (the paper's literal full-width layout)
needs 1/10.5. The narrow one builds on any Wan2.2 teacher, streams exactly like one-shot decoding,
and prunes through the DupUp link on its narrowed stream."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from flashvaed.errors import InputError
from flashvaed.models import StreamingDecoder, StudentSpec, families, zero_state
from flashvaed.models.blocks import Upsample, plain_ops
from flashvaed.models.families.wan22 import Wan22Config
from flashvaed.models.student import build_student, preset_names
from flashvaed.models.summary import summarize
from flashvaed.prune.calibration import calibration_latents
from flashvaed.prune.pipeline import prune_teacher

FAMILY = families.get("wan2.2")
PRESETS = ["flash-wan2.2", "flash-wan2.2-fast", "flash-wan2.2-narrow", "lite-wan2.2"]
EMBEDDED_LIKE = Wan22Config(base_dim=8, decoder_base_dim=8)  # the embedded teacher's widths: 32/32/32/16/8


def test_presets_ship():
    assert preset_names("wan2.2") == sorted(PRESETS)


@pytest.fixture(scope="module")
def released():
    """The released TI2V-5B teacher and its flash students on the meta device, costed at 704x1280."""
    config = Wan22Config()
    with torch.device("meta"):
        teacher = FAMILY.teacher_type(config)
        students = {name: build_student(StudentSpec.load(name), config) for name in PRESETS[:3]}
    costs = {name: summarize(student, 704, 1280) for name, (student, _) in students.items()}
    return summarize(teacher, 704, 1280), students, costs


def test_narrow_preset_reaches_a_twentieth_of_the_teacher_macs(released):
    teacher, students, costs = released
    student, notes = students["flash-wan2.2-narrow"]
    layout = student.config.layout
    assert notes == []  # 1024 x 5/8 = 640 exactly; up2/up3 at 64/32 as in the wide preset
    assert layout.middle.width == 640 and layout.middle.op == "dwsep3d"
    assert [(st.in_width, st.width, st.resample_width) for st in layout.up] == [
        (640, 640, 640), (640, 640, 640), (640, 64, 64), (64, 32, None)
    ]  # fmt: skip
    assert [st.op for st in layout.up] == ["dwsep3d", "dwsep3d", "spatial2d", "spatial2d"]
    cost = costs["flash-wan2.2-narrow"]
    assert teacher.macs_steady / cost.macs_steady >= 20
    assert 20e6 < cost.params_decoder < 25e6  # teacher 555 M
    assert cost.state_bytes < teacher.state_bytes / 8
    # up2's DupUp reads 128 of the 640 stream channels (its 64 kept outputs x 4 slots / 2 repeats)
    assert student.decoder.up[2].shortcut.reads == 128


def test_flash_wan22_keeps_the_papers_literal_layout(released):
    teacher, students, costs = released
    layout = students["flash-wan2.2"][0].config.layout
    assert layout.middle.width == 1024 and [st.width for st in layout.up] == [1024, 1024, 64, 32]
    ratio = teacher.macs_steady / costs["flash-wan2.2"].macs_steady
    assert 10 < ratio < 11
    assert costs["flash-wan2.2-narrow"].macs_steady < costs["flash-wan2.2"].macs_steady / 2


@pytest.mark.parametrize("config", [FAMILY.tiny_config(), EMBEDDED_LIKE], ids=["tiny", "embedded-widths"])
def test_builds_on_small_teachers(config):
    """The width floors keep small teachers' stages from collapsing: the tiny teacher stays at its
    own widths, the embedded teacher's 32-wide stream keeps 20 (32 x 5/8) of its channels."""
    student, _ = build_student(StudentSpec.load("flash-wan2.2-narrow"), config)
    teacher = FAMILY.teacher_layout(config)
    for st, t in zip(student.config.layout.up, teacher.up, strict=True):
        assert min(4, t.width) <= st.width <= t.width
    if config is EMBEDDED_LIKE:
        assert student.config.layout.middle.width == 20 and student.config.layout.up[1].resample_width == 20
    z = torch.randn(1, config.z_dim, 2, 2, 3)
    with torch.no_grad():
        assert student.decode(z).shape == (1, 3, 5, 32, 48)


def test_streaming_equals_one_shot():
    """In float64 (see tests/test_student.py): chunks of 1, 2 and 3 latent frames give the one-shot
    frames, and the state has the shapes its specs say."""
    torch.manual_seed(0)
    student, _ = build_student(StudentSpec.load("flash-wan2.2-narrow"), EMBEDDED_LIKE)
    student.double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    latents = torch.randn(1, 48, 5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        one_shot = student.decode(latents)
        for chunk in (1, 2, 3):
            torch.testing.assert_close(student.decode(latents, chunk=chunk), one_shot, atol=1e-10, rtol=0)
    specs = student.decoder_state_specs()
    assert not any(s.name.startswith(("up.2.blocks", "up.3.blocks")) for s in specs)  # per-frame 2D: no state
    state = zero_state(specs, 1, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        _, state = student.decode_step(latents[:, :, :1], state, first=True)
        _, state = student.decode_step(latents[:, :, 1:3], state)
    assert [tuple(t.shape) for t in state] == [s.shape(1, 2, 3) for s in specs]


def test_pruning_gathers_the_dupup_sources_from_a_narrowed_stream():
    """Independence-aware pruning with the stream at 5/8: the stream keeps every channel up2's
    DupUp reads for its kept outputs, and the pruned DupUp gathers them at their positions among
    the kept stream channels (what the teacher's DupUp reads, channel for channel)."""
    torch.manual_seed(0)
    teacher = FAMILY.teacher_type(EMBEDDED_LIKE).eval()
    calib = calibration_latents("synthetic", teacher, clips=1, frames=5, size=32)
    result = prune_teacher(teacher, StudentSpec.load("flash-wan2.2-narrow"), calib)
    groups = {g["name"]: g for g in result.report["groups"]}
    stream = groups["middle+up.0+up.1+up.2.stream"]["keep"]
    outputs = groups["up.3.input"]["keep"]
    assert len(stream) == 20 and len(outputs) == 8
    dupup = result.student.decoder.up[2].shortcut
    assert [stream[i] for i in dupup.sources.tolist()] == [s for o in outputs for s in dupup.teacher_sources(o)]
    z = torch.randn(1, 48, 3, 2, 3)
    with torch.no_grad():
        out = StreamingDecoder(result.student, clamp=False).push(z)
    assert torch.isfinite(out).all() and out.shape == (1, 3, 9, 32, 48)


# ---------------------------------------------------------------------------------------------
# Depthwise-separable upsample convs (``resample: dwsep``)
# ---------------------------------------------------------------------------------------------
def dwsep_spec(**stages: dict) -> StudentSpec:
    """Every stage the teacher's operator at full width, but for ``stages``' settings."""
    names = ["middle", "up0", "up1", "up2", "up3"]
    layout = {n: {"op": "causal3d", **stages.get(n, {})} for n in names}
    return StudentSpec.from_dict({"name": "dwsep-test", "family": "wan2.2", "stages": layout})


@pytest.mark.parametrize(("fast", "rank"), [(True, 1), (False, 1), (True, 3)], ids=["fast", "plain", "rank3"])
def test_separable_upsample_conv_is_nearest_2x_then_a_low_rank_dense_conv(fast, rank):
    """The oracle is the dense upsampler (nearest 2x, then a 3x3 conv) whose kernel is, for each
    output channel, the sum over its r pointwise rows times their depthwise filters: the pointwise
    conv may run before the upsampling because a 1x1 conv commutes with it."""
    torch.manual_seed(0)
    sep, dense = Upsample(6, 5, 2, conv="dwsep", rank=rank).double(), Upsample(6, 5, 2).double()
    with torch.no_grad():
        dense.time_conv.load_state_dict(sep.time_conv.state_dict())
        p = sep.conv.pointwise.weight[:, :, 0, 0].view(5, rank, 6)  # output o's rows: o * r + k
        d = sep.conv.depthwise.weight  # (5, r, 3, 3)
        dense.conv.weight.copy_(torch.einsum("oki,okyx->oiyx", p, d))
        dense.conv.bias.copy_(sep.conv.depthwise.bias)
    x, history = torch.randn(1, 6, 3, 4, 7, dtype=torch.float64), torch.randn(1, 6, 2, 4, 7, dtype=torch.float64)
    with torch.no_grad(), contextlib.nullcontext() if fast else plain_ops():
        (y, (h,)), (want, (wh,)) = sep(x, (history,)), dense(x, (history,))
    assert y.shape == (1, 5, 6, 8, 14)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, wh, atol=0, rtol=0)
    assert sum(p.numel() for p in sep.conv.parameters()) == rank * (6 * 5 + 5 * 9) + 5  # dense: 6 * 5 * 9 + 5


@pytest.mark.parametrize("rank", [1, 2])
def test_pruning_recovers_a_separable_upsample_conv_exactly(rank):
    """Where the teacher's upsample conv is a rank-r kernel per output channel, the fit finds it:
    the student then decodes the teacher's frames (every other layer is the teacher's own)."""
    torch.manual_seed(0)
    config = FAMILY.tiny_config()
    teacher = FAMILY.teacher_type(config).eval()
    conv = teacher.decoder.up[1].resample.conv
    with torch.no_grad():
        rows, filters = torch.randn(conv.out_channels, rank, conv.in_channels), torch.randn(conv.out_channels, rank, 9)
        conv.weight.copy_(torch.einsum("oki,okt->oit", rows, filters).view_as(conv.weight))
    calib = calibration_latents("synthetic", teacher, clips=1, frames=5, size=32)
    settings = {"resample": "dwsep", **({"resample_rank": rank} if rank > 1 else {})}
    result = prune_teacher(teacher, dwsep_spec(up1=settings), calib)
    (sub,) = result.substitutions
    assert (sub.conv, sub.op) == ("decoder.up.1.resample.conv", "dwsep2x")
    assert min(sub.errors.values()) < 1e-10
    assert result.student.config.layout.up[1].resample_conv == "dwsep"
    z = torch.randn(1, config.z_dim, 3, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(result.student.decode(z), teacher.decode(z), atol=1e-5, rtol=0)


def test_fast_preset_makes_up1s_upsample_conv_separable(released):
    """At 704x1280 up1's upsample conv (1024 -> 1024, 3x3 at twice the latent resolution) is 2/3
    of flash-wan2.2's MACs; flash-wan2.2-fast makes it separable (~1/36 of that): 1/30.5 of the
    teacher's MACs, with everything else flash-wan2.2's."""
    teacher, students, costs = released
    fast, wide = (students[n][0].config.layout for n in ("flash-wan2.2-fast", "flash-wan2.2"))
    assert [st.resample_conv for st in fast.up] == ["conv", "dwsep", "conv", "conv"]
    assert fast == replace(wide, up=(wide.up[0], replace(wide.up[1], resample_conv="dwsep"), *wide.up[2:]))
    cost = costs["flash-wan2.2-fast"]
    assert 30 < teacher.macs_steady / cost.macs_steady < 31
    dense = {s.name: s.macs for s in costs["flash-wan2.2"].stages}
    separable = {s.name: s.macs for s in cost.stages}
    assert dense["up.1"] - separable["up.1"] > 0.6 * costs["flash-wan2.2"].macs_steady
    assert cost.state_bytes == costs["flash-wan2.2"].state_bytes  # the upsample conv keeps no state


@pytest.mark.parametrize(
    ("stages", "family", "message"),
    [
        ({"up3": {"resample": "dwsep"}}, "wan2.2", "up3 does not upsample"),
        ({"up1": {"resample": "pixelshuffle"}}, "wan2.2", "resample must be one of conv, dwsep, lowrank"),
        ({"up1": {"resample": "dwsep"}}, "ltx", "ltx decoders do not build"),
        ({"up1": {"resample": "dwsep"}}, "mochi", "mochi decoders do not build"),
        ({"up1": {"resample_rank": 2}}, "wan2.2", "resample_rank needs resample: dwsep or lowrank"),
        ({"up1": {"resample": "dwsep", "resample_rank": 10}}, "wan2.2", "resample_rank must be an integer from 1 to 9"),
        ({"up1": {"resample": "lowrank"}}, "ltx", "ltx decoders do not build"),
        ({"up1": {"resample": "lowrank"}}, "mochi", "mochi decoders do not build"),
        ({"up1": {"resample": "lowrank", "resample_rank": [2]}}, "wan2.2", "a ratio of its width"),
        (
            {"up1": {"resample": "lowrank", "resample_rank": "2/1"}},
            "wan2.2",
            r"resample_rank ratio 2/1 must be in \(0, 1\]",
        ),
        ({"up1": {"resample": "lowrank", "resample_rank": 17}}, "wan2.2", "between 1 and the teacher's 16"),
        ({"up1": {"resample": "lowrank", "resample_rank": "a quarter"}}, "wan2.2", "is not a ratio"),
    ],
)
def test_resample_settings_are_checked(stages, family, message):
    spec = {"name": "bad", "stages": {n: {"op": "causal3d", **s} for n, s in stages.items()}}
    fam = families.get(family)
    with pytest.raises(InputError, match=message):
        StudentSpec.from_dict(spec).resolve(fam.teacher_layout(fam.tiny_config()), family)


def test_separable_upsample_student_exports_and_saves(tmp_path):
    """A student with separable and low-rank upsample convs saves and loads
    strictly, its exported graphs hold only ops TensorRT's ONNX parser takes, and, driven by their
    metadata alone in ONNX Runtime, they decode its frames at an untraced size."""
    from test_export import SMALL, contract_decode, perturbed

    from flashvaed.export.onnx_export import export
    from flashvaed.models.checkpoint import load_student, save_student

    spec = dwsep_spec(up0={"resample": "dwsep"}, up1={"resample": "lowrank"}, up2={"resample": "dwsep"})
    student = perturbed(build_student(spec, EMBEDDED_LIKE)[0])
    save_student(student, tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    assert [st.resample_conv for st in loaded.config.layout.up] == ["dwsep", "lowrank", "dwsep", "conv"]
    assert loaded.config.layout.up[1].resample_rank == 8
    assert export(loaded, tmp_path / "e", SMALL).tensorrt_unsupported == []  # TensorRT's parser takes every op
    torch.manual_seed(0)
    latents = torch.randn(1, 48, 4, 3, 5)
    with torch.no_grad():
        expected = student.decode(latents).numpy()
    np.testing.assert_allclose(contract_decode(tmp_path / "e", latents.numpy(), 2), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Low-rank upsample convs (``resample: lowrank``)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fast", "in_channels"), [(True, 6), (False, 6), (True, 200)], ids=["fast", "plain", "wide"])
def test_low_rank_upsample_conv_is_nearest_2x_then_a_dense_conv_of_that_rank(fast, in_channels):
    """The oracle is the dense upsampler whose 3x3 kernel is the 1x1 expansion times the r-channel
    3x3 kernel (and whose bias is the expansion of the 3x3 conv's bias, plus its own): the fast
    path runs the 3x3 part as one transposed conv, and its output never leaves r channels."""
    torch.manual_seed(0)
    low, dense = Upsample(in_channels, 5, 2, conv="lowrank", rank=2).double(), Upsample(in_channels, 5, 2).double()
    with torch.no_grad():
        dense.time_conv.load_state_dict(low.time_conv.state_dict())
        expand = low.conv.expand.weight[:, :, 0, 0]  # (5, 2)
        dense.conv.weight.copy_(torch.einsum("or,rikl->oikl", expand, low.conv.conv.weight))
        dense.conv.bias.copy_(expand @ low.conv.conv.bias + low.conv.expand.bias)
    x = torch.randn(1, in_channels, 3, 4, 7, dtype=torch.float64)
    history = torch.randn(1, in_channels, 2, 4, 7, dtype=torch.float64)
    with torch.no_grad(), contextlib.nullcontext() if fast else plain_ops():
        (y, (h,)), (want, (wh,)) = low(x, (history,)), dense(x, (history,))
    assert y.shape == (1, 5, 6, 8, 14)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, wh, atol=0, rtol=0)
    directions = y.transpose(0, 1).reshape(5, -1) - low.conv.expand.bias.view(5, 1)
    assert torch.linalg.matrix_rank(directions).item() == 2
    assert sum(p.numel() for p in low.conv.parameters()) == in_channels * 2 * 9 + 2 + 2 * 5 + 5


@pytest.mark.parametrize("rank", [2, 5])
def test_pruning_recovers_a_low_rank_upsample_conv_exactly(rank):
    """Where the teacher's upsample conv maps into r directions (its kernel and bias in the span of
    r output vectors), the fit finds them from the outputs alone: the student then decodes the
    teacher's frames (every other layer is the teacher's own), and the report says nothing was lost."""
    torch.manual_seed(0)
    config = FAMILY.tiny_config()
    teacher = FAMILY.teacher_type(config).eval()
    conv = teacher.decoder.up[1].resample.conv
    with torch.no_grad():
        directions = torch.randn(conv.out_channels, rank)
        conv.weight.copy_(torch.einsum("or,rikl->oikl", directions, torch.randn(rank, conv.in_channels, 3, 3)))
        conv.bias.copy_(directions @ torch.randn(rank))
    calib = calibration_latents("synthetic", teacher, clips=1, frames=5, size=32)
    result = prune_teacher(teacher, dwsep_spec(up1={"resample": "lowrank", "resample_rank": rank}), calib)
    (sub,) = result.substitutions
    assert (sub.conv, sub.op) == ("decoder.up.1.resample.conv", "lowrank2x")
    assert sub.errors["principal_directions"] < 1e-10
    assert result.student.config.layout.up[1].resample_rank == rank
    z = torch.randn(1, config.z_dim, 3, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(result.student.decode(z), teacher.decode(z), atol=1e-5, rtol=0)
    # a rank below the teacher's loses what its dropped directions carried, and says so
    fewer = prune_teacher(teacher, dwsep_spec(up1={"resample": "lowrank", "resample_rank": rank - 1}), calib)
    assert fewer.substitutions[0].errors["principal_directions"] > 1e-3


def test_low_rank_ratio_rounds_like_a_width_without_the_floor():
    """``resample_rank: 1/4`` of the embedded teacher's 32-wide upsample conv is 8 channels (a
    width there would be raised to its floor of 16); a count is taken as written."""
    teacher = FAMILY.teacher_layout(EMBEDDED_LIKE)
    layout, notes = dwsep_spec(up1={"resample": "lowrank"}).resolve(teacher, "wan2.2")
    assert (layout.up[1].resample_conv, layout.up[1].resample_rank) == ("lowrank", 8) and notes == []
    layout, _ = dwsep_spec(up0={"resample": "lowrank", "resample_rank": 3}).resolve(teacher, "wan2.2")
    assert layout.up[0].resample_rank == 3
    with pytest.raises(ValueError, match="resample_rank must be an integer in"):
        replace(layout.up[0], resample_rank=33)  # more directions than outputs: a hostile config


def test_low_rank_up1_on_the_released_teacher(released):
    """flash-wan2.2 with up1's upsample conv at rank 1/4 (256 of 1024 directions): 1/20.5 of the
    teacher's MACs at 704x1280 (benchmarks/RESULTS.md, issue 23's fourth round)."""
    teacher, students, _ = released
    wide = students["flash-wan2.2"][0].config.layout
    spec = StudentSpec.load("flash-wan2.2").to_dict()
    spec["stages"]["up1"] = {**spec["stages"]["up1"], "resample": "lowrank"}
    with torch.device("meta"):
        student, notes = build_student(StudentSpec.from_dict(spec), Wan22Config())
    layout = student.config.layout
    assert notes == [] and layout.up[1].resample_rank == 256
    assert layout == replace(
        wide, up=(wide.up[0], replace(wide.up[1], resample_conv="lowrank", resample_rank=256), *wide.up[2:])
    )
    assert 20 < teacher.macs_steady / summarize(student, 704, 1280).macs_steady < 21


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
def test_dupup_shortcut_fast_paths_equal_the_plain_ops(channels_last):
    """The full-width DupUp (each channel nearest-upsampled in time and space) is added into the
    stage's output in place, and a pruned one gathers its sources along the innermost axis of a
    channels-last input: both give the plain sum exactly, in either layout."""
    from flashvaed.models.families.wan22 import DupUp3D

    torch.manual_seed(0)
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(1, 6, 2, 3, 4).contiguous(memory_format=layout)
    y = torch.randn(1, 6, 4, 6, 8).contiguous(memory_format=layout)
    identity = DupUp3D(6, 6, 2, 2, repeats=8)
    pruned = DupUp3D(8, 4, 1, 2, repeats=2)  # reads 4 x 4 / 2 = 8 of 8 channels; narrowed below
    pruned.reads, pruned.sources = 8, torch.tensor([7, 0, 3, 3, 5, 1, 2, 6])
    with torch.inference_mode():
        want = y + identity(x, False)
        got = identity.add_to(y.clone(memory_format=layout), x, False)
        z = torch.randn(1, 8, 2, 3, 4).contiguous(memory_format=layout)
        gathered = pruned(z, False)
    with plain_ops():
        plain = pruned(z.contiguous(), False)
    assert torch.equal(got, want)
    assert torch.equal(gathered, plain)
