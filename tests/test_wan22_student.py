"""The Wan2.2 students: flash-wan2.2-narrow (the low-resolution stream pruned to 5/8) needs under
1/20 of the teacher's MACs at 704x1280, where flash-wan2.2 (the paper's literal full-width layout)
needs 1/10.5. The narrow one builds on any Wan2.2 teacher, streams exactly like one-shot decoding,
and prunes through the DupUp link on its narrowed stream."""

from __future__ import annotations

import pytest
import torch

from flashvaed.models import StreamingDecoder, StudentSpec, families, zero_state
from flashvaed.models.families.wan22 import Wan22Config
from flashvaed.models.student import build_student, preset_names
from flashvaed.models.summary import summarize
from flashvaed.prune.calibration import calibration_latents
from flashvaed.prune.pipeline import prune_teacher

FAMILY = families.get("wan2.2")
PRESETS = ["flash-wan2.2", "flash-wan2.2-narrow", "lite-wan2.2"]
EMBEDDED_LIKE = Wan22Config(base_dim=8, decoder_base_dim=8)  # the embedded teacher's widths: 32/32/32/16/8


def test_presets_ship():
    assert preset_names("wan2.2") == sorted(PRESETS)


@pytest.fixture(scope="module")
def released():
    """The released TI2V-5B teacher and its flash students on the meta device, costed at 704x1280."""
    config = Wan22Config()
    with torch.device("meta"):
        teacher = FAMILY.teacher_type(config)
        students = {name: build_student(StudentSpec.load(name), config) for name in PRESETS[:2]}
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
