"""Students as data: presets, specs, layouts, the student model's streaming and its directory."""

from __future__ import annotations

import pytest
import torch

from flashvaed.errors import InputError
from flashvaed.models import FlashStudent, StudentConfig, StudentSpec, WanConfig, WanVAE, load_model, save_student
from flashvaed.models.families.wan21 import teacher_layout
from flashvaed.models.student import build_student, preset_names
from flashvaed.models.summary import summarize

PRESETS = ["flash-wan2.1", "flash-wan2.1-quarter", "lite-wan2.1", "official-wan2.1"]


def test_presets_ship():
    assert preset_names("wan2.1") == sorted(PRESETS)


def test_flash_preset_matches_the_paper_at_full_width():
    """The official Wan2.1 student: ~5.9 M decoder parameters, a few percent of the teacher's MACs."""
    with torch.device("meta"):
        teacher = WanVAE(WanConfig())
        student, notes = build_student(StudentSpec.load("flash-wan2.1"), WanConfig())
    layout = student.config.layout
    assert [st.width for st in layout.up] == [384, 384, 24, 12]  # 192 -> 24, 96 -> 12
    assert [st.op for st in layout.up] == ["dwsep3d", "dwsep3d", "spatial2d", "spatial2d"]
    assert layout.up[1].resample_width == 24 and layout.up[2].resample_width == 12  # upsample convs follow
    assert notes == []
    params = sum(p.numel() for p in student.decoder.parameters())
    assert 5.5e6 < params < 6.3e6
    t, s = summarize(teacher, 480, 832), summarize(student, 480, 832)
    assert t.macs_steady / s.macs_steady >= 20  # <= 1/20 of the teacher's MACs
    assert s.state_bytes < t.state_bytes / 5


@pytest.mark.parametrize("base", [8, 4, 2])
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_fit_any_teacher_width(preset, base):
    student, notes = build_student(StudentSpec.load(preset), WanConfig(base_dim=base))
    teacher = teacher_layout(WanConfig(base_dim=base))
    for st, t in zip(student.config.layout.up, teacher.up, strict=True):  # the floor: 4, or the teacher's own
        assert st.width >= min(4, t.width) and min(st.hidden) >= min(4, min(t.hidden))
    if preset == "flash-wan2.1":
        assert any("raised to the floor of 4" in n for n in notes)  # said when it binds
        assert any("raised to the floor of 2" in n for n in notes) == (base == 2)  # up3 is 2 wide there


@pytest.mark.parametrize("preset", PRESETS)
def test_student_streaming_equals_one_shot(preset):
    """In float64, so that the test sees the state rule and not float32 rounding (narrow RMS norms
    over 1-2 channels are nearly sign functions and amplify rounding differences of convs run
    on chunks of different lengths)."""
    torch.manual_seed(0)
    student, _ = build_student(StudentSpec.load(preset), WanConfig(base_dim=8))
    student.double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    latents = torch.randn(2, 16, 6, 3, 4, dtype=torch.float64)
    one_shot = student.decode(latents)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(student.decode(latents, chunk=chunk), one_shot, atol=1e-10, rtol=0)
    specs = student.decoder_state_specs()
    # per-frame 2D stages carry no state; depthwise convs carry their input's history
    assert not any(s.name.startswith(("up.2.blocks", "up.3.blocks")) for s in specs) or preset == "lite-wan2.1"
    from flashvaed.models import zero_state

    state = zero_state(specs, 2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        _, state = student.decode_step(latents[:, :, :1], state, first=True)
        _, state = student.decode_step(latents[:, :, 1:3], state)
    assert [tuple(t.shape) for t in state] == [s.shape(2, 3, 4) for s in specs]


def test_config_round_trips(tmp_path):
    spec = StudentSpec.load("flash-wan2.1")
    assert StudentSpec.from_dict(spec.to_dict()) == spec
    student, _ = build_student(spec, WanConfig(base_dim=8))
    assert StudentConfig.from_dict(student.config.to_dict()) == student.config
    save_student(student, tmp_path / "s")
    loaded = load_model(tmp_path / "s")
    assert isinstance(loaded, FlashStudent) and loaded.config == student.config
    z = torch.randn(1, 16, 3, 2, 3)
    assert torch.equal(loaded.decode(z), student.decode(z))
    (tmp_path / "cfg.yaml").write_text(
        "name: mine\nstages:\n  up2: {op: spatial2d, width: 6}\n  up3: {op: spatial2d, width: 0.25}\n"
    )
    mine, _ = build_student(StudentSpec.load(tmp_path / "cfg.yaml"), WanConfig(base_dim=8))
    assert [st.width for st in mine.config.layout.up] == [32, 32, 6, 4]  # counts are kept; ratios floored


@pytest.mark.parametrize(
    "text, needle",
    [
        ("stages: [1, 2", "malformed"),
        ("stages: {up2: {op: conv4d}}", "unknown op"),
        ("stages: {up5: {op: causal3d}}", "unknown stage"),
        ("stages: {up2: {op: causal3d, widht: 0.5}}", "unknown keys"),
        ("name: x", "'stages'"),
        ("stages: {up3: {op: causal3d, width: 0.01}}\nmin_width: 0", "rounds to 0"),
        ("stages: {up3: {op: causal3d}}\nmin_width: -1", "min_width must be"),
        ("stages: {up3: {op: causal3d}}\nmultiple_of: four", "multiple_of must be"),
        ("stages: {up3: {op: causal3d, width: 0}}", "between 1 and"),
        ("stages: {up3: {op: causal3d, width: 1.5}}", "(0, 1]"),
        ("stages: {up0: {op: causal3d, width: 0.5}}", "share one residual stream"),
        ("family: ltx-video\nstages: {up3: {op: causal3d}}", "ltx-video teachers"),
    ],
)
def test_bad_specs(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        StudentSpec.load(tmp_path / "c.yaml").resolve(teacher_layout(WanConfig(base_dim=8)))


def test_unknown_preset():
    with pytest.raises(InputError, match="unknown preset"):
        StudentSpec.load("flash-wan9")


def test_teacher_with_other_stage_count_is_refused():
    with pytest.raises(InputError, match="up stages"):
        StudentSpec.load("flash-wan2.1").resolve(
            teacher_layout(WanConfig(base_dim=8, dim_mult=(1, 2, 4), temporal_downsample=(True, True)))
        )
