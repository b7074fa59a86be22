"""A Wan2.2 teacher through every command: prune (independence and L1), distill, evaluate,
export, build-engine, validate, decode, encode, info — at small widths, as for Wan2.1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import diffusers_to_wan22_original, perturbed_wan22_vae
from test_export import contract_decode
from test_prune import plant_duplicates
from typer.testing import CliRunner

from flashvaed import engines
from flashvaed.cli import app
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.models import StreamingDecoder, StudentSpec, Wan22VAE, load_model
from flashvaed.prune.calibration import calibration_latents
from flashvaed.prune.groups import channel_graph
from flashvaed.prune.pipeline import prune_teacher

runner = CliRunner()
SMALL = ExportOptions(chunk="1:2:3", height="32:32:64", width="32:48:64", batch="1:1:2")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A Wan2.2 teacher in the original .pth layout, latents, and a flash-wan2.2 student pruned by the CLI."""
    d = tmp_path_factory.mktemp("wan22-flow")
    ref = perturbed_wan22_vae(8, 8, seed=5)
    torch.save(diffusers_to_wan22_original(ref.state_dict()), d / "Wan2.2_VAE.pth")
    torch.manual_seed(0)
    torch.save({"latents": torch.randn(1, 48, 4, 2, 3)}, d / "z.pt")
    r = invoke(
        "prune", "-t", d / "Wan2.2_VAE.pth", "--preset", "flash-wan2.2", "-o", d / "student",
        "--calib-clips", 2, "--calib-frames", 5, "--calib-size", 32, "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return d, ref


def test_prune_report_and_info(files):
    d, _ = files
    report = json.loads((d / "student" / "prune_report.json").read_text())
    assert report["family"] == "wan2.2" and report["student"] == "flash-wan2.2"
    assert report["totals"]["resolution"] == [704, 1280]  # the family's resolution by default
    assert report["totals"]["macs_ratio"] > 4  # the width floors keep this 8-wide teacher's up2/up3 at 8/4
    assert {s["name"]: s["op"] for s in report["stages"]} == {
        "conv_in": "causal3d", "middle": "dwsep3d", "up.0": "dwsep3d", "up.1": "dwsep3d",
        "up.2": "spatial2d", "up.3": "spatial2d", "head": "causal3d",
    }  # fmt: skip
    student = load_model(d / "student")
    assert student.family == "wan2.2" and student.kind == "student"
    # up.2 keeps the teacher's stream (32 ch) as input; its DupUp reads the channels its kept outputs need
    up2 = student.config.layout.up[2]
    assert (up2.in_width, up2.width, up2.resample_width) == (32, 8, 8)  # 16 x 1/8 = 2, raised to the floor of 8
    sources = student.decoder.up[2].shortcut.sources
    kept = student.config.teacher_channels["up.2"]
    assert sources.tolist() == [2 * o + k for o in kept for k in (0, 1)]
    r = invoke("info", d / "student", "--json")
    info = json.loads(r.output)
    assert r.exit_code == 0 and info["family"] == "wan2.2" and (info["height"], info["width"]) == (704, 1280)
    assert info["teacher"]["macs_steady"] / info["macs_steady"] == pytest.approx(report["totals"]["macs_ratio"])
    r = invoke("info", d / "student")
    assert r.exit_code == 0 and "fewer MACs" in r.output and "patch_size=2" in r.output


def test_the_dupup_link_prunes_exactly():
    """Planted: the channels up.3's input drops carry nothing (their conv rows and the teacher-stream
    channels their DupUp reads are zero), and so do the dropped channels of up.2/up.3's streams. The
    pruned teacher then decodes exactly like the teacher: the DupUp gathers the right channels."""
    teacher = Wan22VAE(Wan22VAE.family_def.config_type(base_dim=8, decoder_base_dim=8)).eval()
    graph = channel_graph(teacher.decoder)
    names = {g.name: g for g in graph.groups}
    zero = {"up.3.input": list(range(8)), "up.2.stream": list(range(8)), "up.3+head.stream": list(range(4))}
    zero["middle+up.0+up.1+up.2.stream"] = [2 * o + k for o in zero["up.3.input"] for k in (0, 1)]
    with torch.no_grad():
        for group, channels in zero.items():
            for path, role in names[group].producers:
                layer = teacher.get_submodule(path)
                rows = channels + [c + names[group].size for c in channels] if role == "time_rows" else channels
                layer.weight[rows] = 0
                layer.bias[rows] = 0
    spec = StudentSpec.from_dict(
        {"name": "half-high", "stages": {k: {"op": "causal3d", "width": 0.5, "hidden": 1.0} for k in ("up2", "up3")}}
    )
    calib = calibration_latents("synthetic", teacher, clips=2, frames=5, size=32)
    result = prune_teacher(teacher, spec, calib)
    groups = {g["name"]: g for g in result.report["groups"]}
    assert groups["up.3.input"]["keep"] == list(range(8, 16))
    sources = result.pruned.decoder.up[2].shortcut.sources.tolist()
    assert sources == [2 * o + k for o in range(8, 16) for k in (0, 1)]  # a real gather: 16 of the 32 channels
    z = torch.randn(1, 48, 3, 2, 3)
    expected = StreamingDecoder(teacher, clamp=False).push(z)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(StreamingDecoder(result.pruned, clamp=False).push(z), expected, atol=1e-4, rtol=0)


def test_planted_redundancy_independence_is_exact_l1_is_not():
    ref = perturbed_wan22_vae(8, 8, seed=6)
    teacher = Wan22VAE(Wan22VAE.family_def.config_type(base_dim=8, decoder_base_dim=8)).eval()
    from flashvaed.models.checkpoint import match_keys

    state, report = match_keys(teacher, ref.state_dict(), "diffusers")
    assert report.ok
    teacher.load_state_dict(state)
    plant_duplicates(teacher, "up.2.stream")
    spec = StudentSpec.from_dict(
        {"name": "half-up2", "stages": {"up2": {"op": "causal3d", "width": 0.5, "hidden": 1.0}}}
    )
    calib = calibration_latents("synthetic", teacher, clips=2, frames=5, size=32)
    held_out = torch.randn(1, 48, 3, 2, 3)
    with torch.no_grad():
        expected = teacher.decode(held_out)
    errors = {}
    for criterion in ("independence", "l1"):
        result = prune_teacher(teacher, spec, calib, criterion=criterion)
        assert next(g for g in result.report["groups"] if g["name"] == "up.2.stream")["kept"] == 8
        with torch.no_grad():
            errors[criterion] = (result.student.decode(held_out) - expected).abs().max().item()
    assert errors["independence"] < 1e-4 < errors["l1"], errors


@pytest.fixture(scope="module")
def run(files):
    """The pruned student distilled briefly (library), then evaluated (CLI)."""
    d, _ = files
    config = {"batch_size": 1, "clip_frames": 5, "clip_size": 32, "synthetic_clips": 2, "chunk": 1}
    config.update(optimizer={"lr": 2e-3, "warmup_steps": 1}, checkpoint_every=100)
    (d / "distill.json").write_text(json.dumps(config))
    r = invoke(
        "distill", "-t", d / "Wan2.2_VAE.pth", "-s", d / "student", "-d", "synthetic", "-o", d / "run",
        "--config", d / "distill.json", "--steps-per-phase", 2, "--eval-clips", 1, "--device", "cpu", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return d / "run"


def test_distill_and_evaluate(files, run):
    d, _ = files
    report = json.loads((run / "distill_report.json").read_text())
    assert [p["name"] for p in report["phases"]] == ["align", "transfer", "refine"]
    assert all(p["psnr_vs_teacher_db"] is not None for p in report["phases"])
    r = invoke(
        "evaluate", "-m", run, "-t", d / "Wan2.2_VAE.pth", "-d", "synthetic", "--clips", 1, "--frames", 5,
        "--size", 32, "--json", d / "eval.json", "--device", "cpu", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    metrics = json.loads((d / "eval.json").read_text())["metrics"]
    assert metrics["psnr_student_gt"] is not None and metrics["psnr_teacher_gt"] > metrics["psnr_student_gt"] - 10
    assert metrics["teacher_fps"] > 0 and metrics["student_fps"] > 0


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_engine_validate_decode(files, which, tmp_path):
    """ONNX Runtime driven only by the graphs' metadata equals PyTorch; the CLI builds, validates
    and decodes through the engine."""
    d, _ = files
    source = d / ("Wan2.2_VAE.pth" if which == "teacher" else "student")
    model = load_model(source)
    z = torch.load(d / "z.pt", weights_only=True)["latents"]
    expected = model.decode(z).numpy()
    export(model, tmp_path / "e", SMALL, source=str(source))
    for chunk, got in zip((1, 2, 3), contract_decode(tmp_path / "e", z.numpy(), (1, 2, 3)), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"chunk {chunk}")
    r = invoke("build-engine", tmp_path / "e", "-o", tmp_path / "g")
    assert r.exit_code == 0, r.output
    r = invoke("validate", tmp_path / "g", "-r", source, "-l", d / "z.pt", "-t", d / "Wan2.2_VAE.pth")
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    r = invoke("decode", d / "z.pt", "-m", tmp_path / "g", "-o", tmp_path / "f.pt", "-q")
    assert r.exit_code == 0, r.output
    frames = torch.load(tmp_path / "f.pt", weights_only=True)["frames"]
    assert frames.shape == (1, 3, 13, 32, 48)
    torch.testing.assert_close(frames, torch.from_numpy(expected), atol=1e-4, rtol=0)
    assert engines.load(tmp_path / "g").spatial_factor == 16


def test_encode_and_decode_cli(files, tmp_path):
    d, _ = files
    teacher = load_model(d / "Wan2.2_VAE.pth")
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    torch.save({"frames": video}, tmp_path / "v.pt")
    r = invoke("encode", tmp_path / "v.pt", "-m", d / "Wan2.2_VAE.pth", "-o", tmp_path / "z.safetensors", "-q")
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    z = load_file(tmp_path / "z.safetensors")["latents"]
    assert z.shape == (1, 48, 3, 2, 3)
    torch.testing.assert_close(z, teacher.encode(video), atol=1e-6, rtol=0)
    r = invoke("decode", tmp_path / "z.safetensors", "-m", d / "Wan2.2_VAE.pth", "-o", tmp_path / "out.mp4", "-q")
    assert r.exit_code == 0, r.output
    r = invoke("encode", tmp_path / "v.pt", "-m", d / "Wan2.2_VAE.pth", "-o", tmp_path / "x.pt", "--height", 40, "-q")
    assert r.exit_code == 2 and "--height must be a positive multiple of 16" in r.output
