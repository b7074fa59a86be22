"""Independence-aware pruning: planted redundancy, the L1 baseline, operator substitution, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturbed_diffusers_vae
from typer.testing import CliRunner

from flashvaed.cli import app
from flashvaed.errors import InputError
from flashvaed.metrics import psnr
from flashvaed.models import StudentSpec, WanConfig, WanVAE, load_model, save_teacher
from flashvaed.models.checkpoint import match_keys
from flashvaed.prune.calibration import calibration_latents
from flashvaed.prune.groups import channel_groups
from flashvaed.prune.pipeline import prune_teacher
from flashvaed.prune.select import augmented_gram, compensation, independence_select

runner = CliRunner()


def teacher_from_diffusers(base_dim: int, seed: int) -> WanVAE:
    ref = perturbed_diffusers_vae(base_dim, seed)
    teacher = WanVAE(WanConfig(base_dim=base_dim))
    state, report = match_keys(teacher, ref.state_dict(), "diffusers")
    assert report.ok
    teacher.load_state_dict(state)
    return teacher.eval()


def test_pivoted_selection_keeps_a_basis_and_compensation_is_exact():
    torch.manual_seed(0)
    base = torch.randn(4, 2000)
    mix = torch.randn(3, 4)
    features = torch.cat([3 * (mix @ base) + 1.0, base, 0.05 * torch.randn(1, 2000)])  # 3 big redundant, 1 tiny
    gram = augmented_gram(features.unsqueeze(0))
    sel = independence_select(gram, 5)
    assert 7 in sel.keep  # the small but independent channel survives
    assert torch.linalg.matrix_rank(features[sel.keep]) == 5
    comp = compensation(gram, sel.keep)
    assert comp.error_before > 0.01 and comp.error_after < 1e-8


def plant_duplicates(teacher: WanVAE, name: str = "up.3+head.stream") -> None:
    """Make the second half of a stream's channels exactly twice the first half, with halved norm gains.

    The stream is a sum of its producers' outputs, so doubling their rows doubles the channels;
    halving the gains of the norms over it makes the silu inputs of the consumers identical.
    """
    group = next(g for g in channel_groups(teacher.decoder) if g.name == name)
    half = group.size // 2
    with torch.no_grad():
        for path, _ in group.producers:
            layer = teacher.get_submodule(path)
            layer.weight[half:] = 2 * layer.weight[:half]
            layer.bias[half:] = 2 * layer.bias[:half]
        for path in group.norms:
            gamma = teacher.get_submodule(path).gamma
            gamma[half:] = gamma[:half] / 2


def test_planted_redundancy_independence_is_exact_l1_is_not():
    teacher = teacher_from_diffusers(8, seed=3)
    plant_duplicates(teacher)
    spec = StudentSpec.from_dict(
        {"name": "half-up3", "stages": {"up3": {"op": "causal3d", "width": 0.5, "hidden": 1.0}}}
    )
    calib = calibration_latents("synthetic", teacher, clips=2, frames=5, size=32)
    held_out = torch.randn(2, 16, 4, 3, 5)
    with torch.no_grad():
        expected = teacher.decode(held_out, chunk=2)
    errors = {}
    for criterion in ("independence", "l1"):
        result = prune_teacher(teacher, spec, calib, criterion=criterion)
        group = next(g for g in result.report["groups"] if g["name"] == "up.3+head.stream")
        assert group["kept"] == 4 and group["total"] == 8
        with torch.no_grad():
            errors[criterion] = (result.student.decode(held_out, chunk=2) - expected).abs().max().item()
        if criterion == "independence":
            assert sorted(i % 4 for i in group["keep"]) == [0, 1, 2, 3]  # one of each pair: a basis
            assert group["error_after"] < 1e-8 < group["error_before"]
        else:
            assert group["keep"] == [4, 5, 6, 7]  # the larger copies
    assert errors["independence"] < 1e-4
    assert errors["l1"] > 100 * max(errors["independence"], 1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_independence_beats_l1_on_held_out_latents(seed):
    teacher = teacher_from_diffusers(16, seed)
    spec = StudentSpec.from_dict(
        {
            "name": "half",
            "stages": {k: {"op": "causal3d", "width": 0.5} for k in ("middle", "up0", "up1", "up2", "up3")},
        }
    )
    calib = calibration_latents("synthetic", teacher, clips=3, frames=9, size=64, seed=seed)
    held_out = calibration_latents("synthetic", teacher, clips=2, frames=9, size=64, seed=100 + seed)
    with torch.no_grad():
        expected = torch.cat([teacher.decode(z, 2) for z in held_out])
    scores = {}
    for criterion in ("independence", "l1"):
        student = prune_teacher(teacher, spec, calib, criterion=criterion).student
        with torch.no_grad():
            scores[criterion] = psnr(torch.cat([student.decode(z, 2) for z in held_out]), expected)
    assert scores["independence"] > scores["l1"] + 0.5, scores


def test_substitution_recovers_planted_operators():
    """A conv that only uses its current frame becomes an exact 2D conv; a separable one an exact dwsep."""
    teacher = teacher_from_diffusers(8, seed=5)
    with torch.no_grad():
        for j in range(3):
            block = teacher.decoder.up[3].blocks[j]
            for conv in (block.conv1, block.conv2):
                conv.weight[:, :, :2] = 0  # no past taps
        for j in range(3):
            for conv in (teacher.decoder.up[0].blocks[j].conv1, teacher.decoder.up[0].blocks[j].conv2):
                cout, cin = conv.weight.shape[:2]
                conv.weight.copy_(torch.randn(cout, cin, 1, 1, 1) * torch.randn(1, cin, 3, 3, 3) * 0.05)
    spec = StudentSpec.from_dict(
        {"name": "ops", "stages": {"up0": {"op": "dwsep3d"}, "up3": {"op": "spatial2d", "shortcut": "auto"}}}
    )
    calib = calibration_latents("synthetic", teacher, clips=2, frames=5, size=32)
    result = prune_teacher(teacher, spec, calib)
    subs = {s["conv"]: s for s in result.report["substitutions"]}
    for j in range(3):
        s2d = subs[f"decoder.up.3.blocks.{j}.conv1"]
        assert s2d["op"] == "spatial2d" and s2d["errors"]["current_tap"] < 1e-10
        dw = subs[f"decoder.up.0.blocks.{j}.conv2"]
        assert dw["op"] == "dwsep3d" and dw["errors"]["svd"] < 1e-10
    held_out = torch.randn(1, 16, 3, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(result.student.decode(held_out), teacher.decode(held_out), atol=1e-4, rtol=0)


def test_report_contents(tmp_path):
    teacher = teacher_from_diffusers(8, seed=0)
    save_teacher(teacher, tmp_path / "t.pth", "original")
    r = runner.invoke(
        app,
        [
            "prune",
            "-t",
            str(tmp_path / "t.pth"),
            "--preset",
            "flash-wan2.1",
            "-o",
            str(tmp_path / "s"),
            "--calib-clips",
            "2",
            "--calib-frames",
            "5",
            "--calib-size",
            "32",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "fewer MACs" in r.output and "PSNR vs teacher" in r.output
    assert "up3: width 8 x 1/8 = 1, raised to the floor of 4" in r.output  # the floor, said
    report = json.loads((tmp_path / "s" / "prune_report.json").read_text())
    assert report["criterion"] == "independence" and report["student"] == "flash-wan2.1"
    up2 = next(g for g in report["groups"] if g["name"] == "up.2.stream")
    assert up2["kept"] == 8 and up2["total"] == 16 and len(up2["scores"]) == 16  # 16 x 1/8, floored at 8
    assert "up2: width 16 x 1/8 = 2, raised to the floor of 8" in report["notes"]
    assert up2["error_after"] <= up2["error_before"]
    assert {s["name"] for s in report["stages"]} == {"conv_in", "middle", "up.0", "up.1", "up.2", "up.3", "head"}
    assert all(s["student_macs"] <= s["teacher_macs"] for s in report["stages"])
    assert {s["op"] for s in report["substitutions"]} == {"dwsep3d", "spatial2d"}
    student = load_model(tmp_path / "s")
    assert student.kind == "student"
    z = torch.randn(1, 16, 3, 2, 2)
    torch.save({"latents": z}, tmp_path / "z.pt")
    r = runner.invoke(
        app,
        [
            "decode",
            str(tmp_path / "z.pt"),
            "-m",
            str(tmp_path / "s"),
            "-o",
            str(tmp_path / "f.pt"),
            "--chunk",
            "1",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert torch.equal(torch.load(tmp_path / "f.pt", weights_only=True)["frames"], student.decode(z, 1))
    r = runner.invoke(app, ["info", str(tmp_path / "s"), "--json", "--height", "64", "--width", "64"])
    info = json.loads(r.output)
    assert info["kind"] == "student" and info["teacher"]["params_decoder"] > info["params_decoder"]
    r = runner.invoke(app, ["prune", "-t", str(tmp_path / "t.pth"), "--preset", "lite-wan2.1", "--explain"])
    assert r.exit_code == 0 and "up.1.input  [input]  8 / 16" in r.output  # 1/4, floored at 1/2 here


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune-cli")
    teacher = teacher_from_diffusers(8, seed=0)
    save_teacher(teacher, d / "t.pth", "original")
    torch.save({"latents": torch.randn(1, 8, 2, 2, 2)}, d / "bad_channels.pt")
    (d / "empty").mkdir()
    (d / "bad.yaml").write_text("stages: {up2: {op: warp}}")
    (d / "tiny.yaml").write_text("stages: {up3: {op: causal3d, width: 0.01}}\nmin_width: 0")
    (d / "ltx.yaml").write_text("family: ltx-video\nstages: {up3: {op: causal3d}}")
    (d / "taken").mkdir()
    (d / "taken" / "notes.txt").write_text("keep me")
    return d


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--preset", "flash-wan9"], "unknown preset"),
        (["--config", "bad.yaml"], "unknown op"),
        (["--config", "tiny.yaml"], "rounds to 0"),
        (["--config", "ltx.yaml"], "ltx-video teachers"),
        (["--preset", "flash-wan2.1", "--calib", "empty"], "no calibration latents or videos"),
        (["--preset", "flash-wan2.1", "--calib", "bad_channels.pt"], "8 channels"),
        (["--preset", "flash-wan2.1", "--calib", "missing"], "calibration data not found"),
        (["--preset", "flash-wan2.1", "--criterion", "l2"], "unknown criterion"),
        (["--preset", "flash-wan2.1", "--config", "bad.yaml"], "exactly one of"),
        (["--preset", "flash-wan2.1", "-o", "taken"], "not a student directory"),
    ],
)
def test_bad_prune_input(cli_files, args, needle, monkeypatch):
    monkeypatch.chdir(cli_files)
    if "-o" not in args:
        args = [*args, "-o", "out"]
    r = runner.invoke(app, ["prune", "-t", "t.pth", *args, "-q"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and needle in r.output and len(r.output.strip().splitlines()) == 1
    assert not (cli_files / "out").exists()
    assert (cli_files / "taken" / "notes.txt").exists()


def test_student_is_not_a_teacher(cli_files, tmp_path):
    r = runner.invoke(
        app,
        [
            "prune",
            "-t",
            str(cli_files / "t.pth"),
            "--preset",
            "lite-wan2.1",
            "-o",
            str(tmp_path / "s"),
            "--calib-clips",
            "1",
            "--calib-frames",
            "5",
            "--calib-size",
            "16",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["prune", "-t", str(tmp_path / "s"), "--preset", "lite-wan2.1", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "is a student" in r.output


def test_calibration_refuses_mismatched_latents():
    teacher = teacher_from_diffusers(8, seed=0)
    with pytest.raises(InputError, match="calibration data is empty"):
        prune_teacher(teacher, StudentSpec.load("lite-wan2.1"), [])


def test_calibration_from_a_video_folder(tmp_path):
    """Videos are read with PyAV, fitted to the calibration size and encoded by the teacher."""
    import av
    import numpy as np

    teacher = teacher_from_diffusers(8, seed=0)
    rng = np.random.default_rng(0)
    for i in range(2):
        with av.open(str(tmp_path / f"clip{i}.mp4"), "w") as c:
            s = c.add_stream("libx264", rate=8)
            s.height, s.width, s.pix_fmt = 40, 48, "yuv420p"
            for _ in range(7):
                frame = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    (tmp_path / "notes.txt").write_text("ignored")
    latents = calibration_latents(tmp_path, teacher, frames=5, size=32)
    assert [tuple(z.shape) for z in latents] == [(1, 16, 2, 4, 4)] * 2
    result = prune_teacher(teacher, StudentSpec.load("flash-wan2.1"), latents)
    assert result.report["calibration"]["clips"] == 2


def test_a_student_cannot_encode(tmp_path):
    teacher = teacher_from_diffusers(8, seed=0)
    from flashvaed.models import save_student
    from flashvaed.models.student import build_student

    save_student(build_student(StudentSpec.load("lite-wan2.1"), teacher.config)[0], tmp_path / "s")
    torch.save({"frames": torch.zeros(1, 3, 5, 16, 16)}, tmp_path / "v.pt")
    r = runner.invoke(app, ["encode", str(tmp_path / "v.pt"), "-m", str(tmp_path / "s"), "-o", str(tmp_path / "z.pt")])
    assert r.exit_code == 2 and "has no encoder" in r.output
