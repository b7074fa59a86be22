"""Degenerate but legal inputs that must work (exit 0), not be refused:

- every shipped preset pruned from a teacher at its family's width floor, where every stage of the
  student resolves to the teacher's own width (the students used to be built as teachers there, and
  pruning failed with "Unexpected key(s) in state_dict: ...norm1.gamma"); Mochi's widths are
  multiples of its 32 GroupNorm groups, so its floor teacher is 32 wide and its presets prune it
  below the teacher's widths, to the student floor (GroupNorms of fewer groups);
- every teacher through every layout ``save_teacher`` writes, read back with the same config and
  bit-identical frames and latents (the embedded LTX teacher's diffusers config.json used to lose its
  encoder's last downsampler); a file form that cannot say the architecture is refused, not written.

The teachers are built once for the module; the models are as small as their families allow.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from importlib import resources

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from flashvaed.cli import app
from flashvaed.demo import embedded_teacher_path
from flashvaed.errors import CheckpointError, InputError
from flashvaed.models import families, load_model, load_teacher, save_student, save_teacher
from flashvaed.models.families.ltx import LTXVAE, LTXConfig, config_from_diffusers
from flashvaed.models.families.wan21 import WanConfig, WanVAE
from flashvaed.models.families.wan22 import Wan22Config, Wan22VAE
from flashvaed.models.student import MIN_WIDTH, FlashStudent, StudentSpec, preset_names
from flashvaed.models.vae import TeacherVAE
from flashvaed.prune.pipeline import prune_teacher

runner = CliRunner()
LTX_Z = 16  # latent channels of the small LTX teachers


def perturbed(vae: TeacherVAE, seed: int) -> TeacherVAE:
    """Every parameter that starts at a neutral value (norm gains, biases, noise scales, the timestep
    multiplier) moved off it, so that a dropped or swapped tensor changes the frames."""
    g = torch.Generator().manual_seed(seed)
    group_norms = {f"{path}.weight" for path, m in vae.named_modules() if isinstance(m, nn.GroupNorm)}
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("timestep_scale_multiplier"):
                p.fill_(700.0)
            elif name.endswith(("gamma", "norm3.weight")) or name in group_norms:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias") or "noise" in name:
                p.copy_(0.05 * noise)
    return vae.eval()


def ltx_config(generation: str, seed: int) -> LTXConfig:
    """An upstream-style LTX config (as diffusers' config.json writes it) whose narrowest decoder
    stage is the width floor: decoder widths 16/16/8/4 (0.9.0) or 32/16/8/4 (0.9.1, 0.9.5)."""
    encoder = {"block_out_channels": [4, 8, 16, 16], "layers_per_block": [1, 1, 1, 1, 2]}
    if generation == "0.9.0":
        decoder = {"decoder_block_out_channels": [4, 8, 16, 16], "decoder_layers_per_block": [1, 1, 1, 1, 2]}
    else:
        decoder = {
            "decoder_block_out_channels": [8, 16, 32],
            "decoder_layers_per_block": [1, 1, 1, 2],
            "decoder_spatio_temporal_scaling": [True, True, True],
            "decoder_inject_noise": [generation == "0.9.1"] * 3 + [False],
            "upsample_residual": [True, True, True],
            "upsample_factor": [2, 2, 2],
            "timestep_conditioning": True,
        }
    if generation == "0.9.5":
        encoder = {
            "block_out_channels": [4, 8, 16, 32, 64],
            "down_block_types": ["LTXVideo095DownBlock3D"] * 4,
            "layers_per_block": [1, 1, 1, 1, 1],
            "spatio_temporal_scaling": [True] * 4,
            "downsample_type": ["spatial", "temporal", "spatiotemporal", "spatiotemporal"],
        }
    fields = config_from_diffusers({"latent_channels": LTX_Z, **encoder, **decoder})
    g = torch.Generator().manual_seed(seed)
    mean, std = 0.1 * torch.randn(LTX_Z, generator=g), 0.5 + torch.rand(LTX_Z, generator=g)
    return LTXConfig(**fields, latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))


def floor_teacher(name: str) -> TeacherVAE:
    torch.manual_seed(0)
    if name == "wan2.1":
        return perturbed(WanVAE(WanConfig(base_dim=MIN_WIDTH)), 1)
    if name == "wan2.2":
        return perturbed(Wan22VAE(Wan22Config(base_dim=MIN_WIDTH, decoder_base_dim=MIN_WIDTH)), 2)
    if name == "mochi":  # the family's smallest teacher: widths 32, one residual block per stage
        mochi = families.get("mochi")
        return perturbed(mochi.teacher_type(mochi.tiny_config()), 4)
    generation = name.removeprefix("ltx-")
    return perturbed(LTXVAE(ltx_config(generation, 3)), 3)


FLOOR_TEACHERS = ("wan2.1", "wan2.2", "ltx-0.9.0", "ltx-0.9.1", "ltx-0.9.5", "mochi")
# the teachers every preset of their family is pruned from: one per family, plus 0.9.1's decoder
# (timestep conditioning, noise, residual upsamplers) for flash-ltx
PRUNED_FROM = {"wan2.1": None, "wan2.2": None, "ltx-0.9.0": None, "ltx-0.9.1": ("flash-ltx",), "mochi": None}
# a family whose teacher widths cannot reach the student floor: its narrowest legal teacher width
WIDTH_FLOOR = {"mochi": 32}  # Mochi: multiples of its 32 GroupNorm groups


def preset_family(preset: str) -> str | None:
    return yaml.safe_load(resources.files("flashvaed").joinpath("presets", f"{preset}.yaml").read_text()).get("family")


@pytest.fixture(scope="module")
def teachers() -> dict[str, TeacherVAE]:
    return {name: floor_teacher(name) for name in FLOOR_TEACHERS}


# ---------------------------------------------------------------------------------------------
# A: every preset at the width floor
# ---------------------------------------------------------------------------------------------
def test_the_floor_teachers_cover_every_family_and_preset():
    """A new family (or a preset for one) needs a floor teacher here, or this suite goes blind to it."""
    teacher_families = {floor_teacher_family(n) for n in PRUNED_FROM}
    assert teacher_families == set(families.names())
    assert {preset_family(p) for p in preset_names()} - {None} <= teacher_families


def floor_teacher_family(name: str) -> str:
    return "ltx" if name.startswith("ltx") else name


def test_the_mochi_floor_teacher_is_the_narrowest_mochi_teacher():
    """Mochi refuses any width that is not a multiple of 32, so 32 is its floor."""
    mochi = families.get("mochi")
    assert {w for w in mochi.tiny_config().decoder_block_out_channels} == {WIDTH_FLOOR["mochi"]}
    for width in (16, 48):  # below the floor, or not a multiple of it
        with pytest.raises(ValueError, match="32"):
            mochi.config_type(encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4)


CASES = [
    (preset, name)
    for preset in preset_names()
    for name, only in PRUNED_FROM.items()
    if preset_family(preset) in (None, floor_teacher_family(name)) and (only is None or preset in only)
]


@pytest.mark.parametrize(("preset", "name"), CASES, ids=[f"{p}@{n}" for p, n in CASES])
def test_every_preset_prunes_a_teacher_at_the_width_floor(teachers, preset, name, tmp_path):
    teacher = teachers[name]
    family = families.get(teacher.family)
    t_layout = family.teacher_layout(teacher.config)
    narrowest = min(w for st in t_layout.stages.values() for w in (st.in_width, st.width, *st.hidden))
    assert narrowest == WIDTH_FLOOR.get(teacher.family, MIN_WIDTH)  # the fixture is what this test is about
    layout, _ = StudentSpec.load(preset).resolve(t_layout)
    for stage, st in layout.stages.items():
        if narrowest == MIN_WIDTH:  # every width floored to the teacher's own
            assert (st.in_width, st.width, st.hidden) == (
                t_layout.stages[stage].in_width,
                t_layout.stages[stage].width,
                t_layout.stages[stage].hidden,
            ), stage
        else:  # a ratio's width, floored at the student floor
            assert MIN_WIDTH <= min(st.in_width, st.width, *st.hidden) <= narrowest, stage
    tf, sf = teacher.temporal_factor, teacher.spatial_factor
    torch.manual_seed(5)
    # a 1x1 grid at Mochi's floor would give its GroupNorms one value per group, which torch refuses
    grid = (1, 2) if teacher.family == "mochi" else (1, 1)
    calibration = [torch.randn(1, teacher.latent_channels, 2, *grid)]
    result = prune_teacher(teacher, StudentSpec.load(preset), calibration, report_size=(grid[0] * sf, grid[1] * sf))
    save_student(result.student, tmp_path / "s", {"prune_report.json": result.report})
    student = load_model(tmp_path / "s")  # a strict load: every key of the directory, no other
    assert isinstance(student, FlashStudent) and student.config.layout == layout
    json.loads((tmp_path / "s" / "prune_report.json").read_text(), parse_constant=not_json)  # no Infinity
    with torch.no_grad():
        frames = student.decode(torch.randn(1, teacher.latent_channels, 3, 2, 3), 2)
    assert frames.shape == (1, 3, 1 + 2 * tf, 2 * sf, 3 * sf)  # the teacher's frames for these latents
    assert torch.isfinite(frames).all()


def not_json(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def test_the_reported_ltx_090_teacher_prunes_with_flash_ltx_from_the_command_line(teachers, tmp_path):
    """The report's case as typed: a 0.9.0 teacher at decoder width 4, ``flashvaed prune --preset flash-ltx``."""
    save_teacher(teachers["ltx-0.9.0"], tmp_path / "teacher.safetensors", "original")
    r = runner.invoke(
        app,
        ["prune", "-t", str(tmp_path / "teacher.safetensors"), "-o", str(tmp_path / "s"), "--preset", "flash-ltx",
         "-q", "--calib-clips", "1", "--calib-size", "32", "--height", "32", "--width", "32"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    student = load_model(tmp_path / "s")
    assert [st.op for st in student.config.layout.stages.values()] == ["dwsep3d", "dwsep3d", "dwsep3d", "spatial2d"]
    assert [st.width for st in student.config.layout.stages.values()] == [16, 16, 8, 4]


# ---------------------------------------------------------------------------------------------
# B: every teacher through every layout save_teacher writes
# ---------------------------------------------------------------------------------------------
FORMS = (
    ("flashvaed", "t.safetensors"),
    ("flashvaed", "t.pth"),
    ("original", "t.safetensors"),
    ("original", "t.pth"),
    ("diffusers", "t"),  # a diffusers model directory
    ("diffusers", "t.safetensors"),  # its state dict alone
)
# file forms that cannot carry an LTX architecture (no metadata in a .pth; a diffusers state dict
# without its config.json): save_teacher refuses them rather than write what would not load
REFUSED = {
    ("ltx", "flashvaed", "t.pth"),
    ("ltx", "original", "t.pth"),
    ("ltx", "diffusers", "t.safetensors"),
    ("mochi", "flashvaed", "t.pth"),  # widths only in the metadata (a diffusers state dict's shapes say them)
}
# the embedded LTX teacher is conditioned on the timestep and narrows inside its up blocks, which
# diffusers' AutoencoderKLLTXVideo cannot hold (its up block's timestep embedder takes the input width)
REFUSED_TEACHERS = {("embedded-ltx", "diffusers", "t")}
NO_LAYOUT = {("mochi", "original")}  # Mochi has diffusers and flashvaed layouts only: genmo's files are converted
ROUND_TRIP_TEACHERS = (
    *FLOOR_TEACHERS,
    *(f"embedded-{f}" for f in families.names() if families.get(f).embedded_teacher),
)


@dataclass
class Reference:
    """A teacher with latents and a video, and what it makes of them."""

    teacher: TeacherVAE
    latents: torch.Tensor
    video: torch.Tensor
    frames: torch.Tensor
    encoded: torch.Tensor


@pytest.fixture(scope="module")
def references(teachers) -> dict[str, Reference]:
    out = {}
    for name in ROUND_TRIP_TEACHERS:
        if name.startswith("embedded-"):
            teacher = load_teacher(embedded_teacher_path(name.removeprefix("embedded-")))
        else:
            teacher = teachers[name]
        tf, sf = teacher.temporal_factor, teacher.spatial_factor
        torch.manual_seed(7)
        z = torch.randn(1, teacher.latent_channels, 3, 1, 2)
        video = torch.rand(1, 3, 1 + tf, sf, 2 * sf) * 2 - 1
        with torch.no_grad():
            out[name] = Reference(teacher, z, video, teacher.decode(z, 2), teacher.encode(video))
    return out


def test_the_embedded_ltx_teacher_is_the_reported_layout():
    """Encoder and decoder blocks differ, and the encoder ends with a compress_all_res of multiplier 1
    (no trailing res_x): diffusers' last down block with an empty mid block."""
    config = load_teacher(embedded_teacher_path("ltx")).config
    assert config.encoder_blocks != config.decoder_blocks
    assert (config.encoder_blocks[-1].kind, config.encoder_blocks[-1].multiplier) == ("compress_all_res", 1)
    written = families.get("ltx").diffusers_config(replace(config, timestep_conditioning=False))
    assert written["layers_per_block"][-1] == 0 and len(written["down_block_types"]) == 4
    assert LTXConfig(**config_from_diffusers(written), latents_mean=config.latents_mean,
                     latents_std=config.latents_std) == replace(config, timestep_conditioning=False)  # fmt: skip


@pytest.mark.parametrize(("layout", "target"), FORMS, ids=[f"{layout}-{t}" for layout, t in FORMS])
@pytest.mark.parametrize("name", ROUND_TRIP_TEACHERS)
def test_every_teacher_round_trips_through_every_layout(references, name, layout, target, tmp_path):
    ref = references[name]
    teacher, video = ref.teacher, ref.video
    path = tmp_path / target
    if (teacher.family, layout) in NO_LAYOUT:
        with pytest.raises(CheckpointError, match=f"no {layout} layout"):
            save_teacher(teacher, path, layout)
        assert not path.exists() and not list(tmp_path.iterdir())
        return
    if (teacher.family, layout, target) in REFUSED or (name, layout, target) in REFUSED_TEACHERS:
        with pytest.raises(InputError, match="cannot write this"):
            save_teacher(teacher, path, layout)
        assert not path.exists() and not list(tmp_path.iterdir())
        return
    back = load_model(save_teacher(teacher, path, layout))
    assert type(back) is type(teacher) and back.config == teacher.config
    with torch.no_grad():
        assert torch.equal(back.decode(ref.latents, 2), ref.frames)
        assert torch.equal(back.encode(video), ref.encoded)
    if layout == "diffusers" and path.is_dir():
        import diffusers

        family = families.get(teacher.family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, info = getattr(diffusers, family.diffusers_vae).from_pretrained(path, output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        with torch.no_grad():  # and the config means the same encoder
            mean = theirs.encode(video).latent_dist.mean
        torch.testing.assert_close(mean, teacher.posterior(video)[0], atol=1e-5, rtol=1e-5)
