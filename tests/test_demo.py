"""`flashvaed demo`: the whole chain end to end at its smallest setting, for every family; the
pictures and the report it writes."""

from __future__ import annotations

import json

import av
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flashvaed import engines
from flashvaed.cli import app
from flashvaed.demo import STAGES, DemoGeometry, demo, demo_families, embedded_teacher_path, is_demo_dir
from flashvaed.io import read_tensor
from flashvaed.metrics import psnr
from flashvaed.models import families, load_model, load_teacher
from flashvaed.models.checkpoint import is_student_dir
from flashvaed.synthetic import synthetic_clip

runner = CliRunner()
MIN_GAIN_DB = {"wan2.1": 15.0, "wan2.2": 10.0, "ltx": 3.0, "mochi": 10.0}  # over the mean frame: trained, not random
# frames, size: one steady chunk, 2x2+ latents; a family missing here fails the tests below
SMALLEST = {"wan2.1": (5, 32), "wan2.2": (5, 32), "ltx": (9, 64), "mochi": (7, 16)}


def video_shape(path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), *frames[0].shape[:2]


@pytest.fixture(scope="module")
def wan21_demo(tmp_path_factory):
    """`flashvaed demo` (the default family) at its smallest, through the CLI: (folder, printed output)."""
    out = tmp_path_factory.mktemp("demo") / "wan2.1"
    frames, size = SMALLEST["wan2.1"]
    argv = ["demo", "-o", str(out), "--frames", str(frames), "--height", str(size), "--width", str(size)]
    r = runner.invoke(app, [*argv, "--distill-steps", "1", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.mark.parametrize("family", families.names())
def test_every_family_ships_a_trained_teacher(family):
    """A couple of MB each, and trained: it reconstructs a held-out clip of the demo's default
    geometry far better than the clip's mean frame does."""
    assert family in demo_families()
    path = embedded_teacher_path(family)
    assert path.stat().st_size < 4_000_000, path
    teacher = load_teacher(path)
    assert teacher.family == family
    geometry = DemoGeometry.for_model(teacher.temporal_factor, teacher.spatial_factor)
    clip = synthetic_clip(geometry.frames, geometry.height, geometry.width, seed=424_242)
    with torch.no_grad():
        reconstruction = teacher.decode(teacher.encode(clip))
    mean_frame = clip.mean(dim=(2, 3, 4), keepdim=True).expand_as(clip)
    assert psnr(reconstruction, clip) > psnr(mean_frame, clip) + MIN_GAIN_DB[family]


def test_demo_writes_every_output(wan21_demo):
    out, _ = wan21_demo
    frames, size = SMALLEST["wan2.1"]
    for name in ("input.mp4", "teacher.mp4", "student.mp4", "comparison.mp4", "contact_sheet.png", "report.md"):
        assert (out / name).is_file(), name
    assert is_student_dir(out / "student")
    for name in ("input.mp4", "teacher.mp4", "student.mp4"):
        assert video_shape(out / name) == (frames, size, size)
    assert video_shape(out / "comparison.mp4") == (frames, 16 + size, 3 * size)  # labelled, side by side
    sheet = Image.open(out / "contact_sheet.png")
    tile = 128  # a 32-pixel clip is scaled 4x
    assert sheet.size == (4 * tile, 16 + 4 * tile)  # four frames: the first, the last and two between
    assert not list(out.parent.glob(".wan2.1.*"))  # written aside and swapped in: nothing left over


def test_demo_report_holds_the_chain(wan21_demo):
    out, printed = wan21_demo
    r = json.loads((out / "report.json").read_text())
    assert r["format"] == "flashvaed-demo" and r["family"] == "wan2.1"
    assert set(r["stage_seconds"]) == set(STAGES)
    assert r["teacher"]["streaming_max_diff"] < 1e-4
    for key in ("psnr_vs_teacher", "psnr_vs_input", "ssim_vs_teacher", "ssim_vs_input", "psnr_vs_teacher_pruned"):
        assert isinstance(r["student"][key], float), key
    assert all(r["speed"][k] > 0 for k in ("teacher_fps", "student_fps", "engine_fps"))
    assert r["macs_ratio"] > 2 and r["student"]["params"] < r["teacher"]["params"]
    assert r["validate"]["passed"] and r["validate"]["worst_max_abs"] < 1e-3
    assert r["engine"]["max_abs_vs_student"] < 1e-4
    assert any("floor" in note for note in r["student"]["width_notes"])  # an 8-wide teacher under flash-wan2.1
    text = (out / "report.md").read_text()
    assert "| PSNR vs teacher |" in text and "PASSED" in text
    assert text.count("\n|") >= 8  # a table, not a paragraph
    assert "| decode speed |" in printed and "validate PASSED" in printed and "total" in printed
    assert f"{r['student']['psnr_vs_teacher']:.2f} dB" in printed
    assert is_demo_dir(out)  # so the next demo may replace it


def test_demo_outputs_are_what_they_say(wan21_demo):
    """The folder's engine and student decode its latents; the engine equals the torch student."""
    out, _ = wan21_demo
    z = read_tensor(out / "latents.safetensors", "latents")
    student = load_model(out / "student")
    engine = engines.load(out / "engine")
    with torch.no_grad():
        assert torch.allclose(engine.decode(z), student.decode(z), atol=1e-4)


@pytest.mark.parametrize("family", [f for f in demo_families() if f != "wan2.1"])
def test_demo_of_every_other_family(family, tmp_path):
    frames, size = SMALLEST[family]
    result = demo(tmp_path / "d", family=family, frames=frames, height=size, width=size, distill_steps=1, device="cpu")
    r = result.report
    assert r["family"] == family and r["validate"]["passed"]
    assert r["teacher"]["streaming_max_diff"] < 1e-4
    assert r["engine"]["max_abs_vs_student"] < 1e-4
    assert video_shape(tmp_path / "d" / "student.mp4") == (frames, size, size)
