"""`flashvaed bench`: the smoke run (library and command line), its JSON, ratios from medians,
interleaved runs, and one-line refusals. No timed assertions: speeds here are whatever they are."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from flashvaed.bench import BenchReport, Row, bench, check_runtime, load_report, schedule, speedups
from flashvaed.cli import app
from flashvaed.demo import embedded_teacher_path
from flashvaed.errors import InputError

runner = CliRunner()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    return bench(smoke=True, device="cpu", warmup=1, json_path=path), path


def test_smoke_rows_teacher_student_diffusers(smoke):
    report, _ = smoke
    roles = [(r.name, r.role) for r in report.rows]
    assert roles[:2] == [("wan2.1", "teacher"), ("flash-wan2.1", "model")]
    if importlib.util.find_spec("diffusers") is not None:
        assert roles[2] == ("diffusers AutoencoderKLWan", "diffusers")
    else:
        assert report.skipped and "diffusers" in report.skipped[0]["what"]
    teacher, student = report.rows[0], report.rows[1]
    assert teacher.source == str(embedded_teacher_path("wan2.1"))
    assert teacher.frames == student.frames == 1 + 4 * 2  # smoke: the first frame + one steady chunk of 2
    for r in report.rows:
        assert r.repeats == 1 and r.clip_seconds > 0 and r.first_chunk_ms > 0 and r.frames_per_second > 0
        assert r.group == "wan2.1"
    assert student.ms_per_frame_steady is not None and student.macs_ratio > 1
    assert teacher.speedup_vs_teacher == 1.0 and teacher.macs_ratio == 1.0
    assert student.speedup_vs_teacher == pytest.approx(
        (student.frames / student.clip_seconds) / (teacher.frames / teacher.clip_seconds)
    )
    assert student.peak_memory_source.startswith(("rss", "not measured"))
    assert student.memory_estimate_bytes > 0


def test_json_round_trip(smoke):
    report, path = smoke
    d = json.loads(path.read_text())
    assert d["format"] == "flashvaed-bench" and d["version"] == 1
    assert {"runtime", "device", "dtype", "height", "width", "chunk", "repeats", "machine"} <= set(d["settings"])
    assert set(d["rows"][0]) >= {
        "name", "ms_per_frame_steady", "first_chunk_ms", "frames_per_second", "peak_memory_bytes",
        "speedup_vs_teacher", "speedup_vs_diffusers", "macs_per_frame", "macs_ratio", "runs",
    }  # fmt: skip
    assert load_report(path) == report
    with pytest.raises(InputError, match="not a flashvaed bench report"):
        BenchReport.from_dict({"format": "something else"})


def test_runs_are_interleaved(smoke):
    report, _ = smoke
    n = len(report.rows)
    for i, r in enumerate(report.rows):  # warm-up round 0..n-1, then repeat round n..2n-1, row by row
        assert [run["order"] for run in r.runs] == [n + i]
    assert schedule(2, 1, 2) == [
        ("warmup", 0, 0), ("warmup", 0, 1), ("repeat", 0, 0), ("repeat", 0, 1), ("repeat", 1, 0), ("repeat", 1, 1)
    ]  # fmt: skip


def _row(name: str, role: str, fps: float, steady: float | None, macs: float | None) -> Row:
    return Row(
        name=name, role=role, family="wan2.1", kind="x", runtime="torch", source="", group="g", latent_frames=3,
        frames=9, repeats=1, ms_per_frame_steady=steady, first_chunk_ms=1.0, frames_per_second=fps,
        clip_seconds=9 / fps, warmup_seconds=None, peak_memory_bytes=None, peak_memory_source="",
        macs_per_frame=macs,
    )  # fmt: skip


def test_speedups_are_ratios_of_the_medians():
    rows = [
        _row("t", "teacher", 2.0, 400.0, 300.0),
        _row("s", "model", 10.0, 50.0, 10.0),
        _row("d", "diffusers", 1.0, None, 300.0),
    ]
    speedups(rows)
    t, s, d = rows
    assert (t.speedup_vs_teacher, s.speedup_vs_teacher, d.speedup_vs_teacher) == (1.0, 5.0, 0.5)
    assert s.speedup_vs_teacher_steady == 8.0 and d.speedup_vs_teacher_steady is None
    assert (s.speedup_vs_diffusers, t.speedup_vs_diffusers) == (10.0, 2.0)
    assert s.macs_ratio == 30.0
    alone = [_row("m", "model", 3.0, 1.0, 1.0)]  # no teacher known: no ratios
    speedups(alone)
    assert alone[0].speedup_vs_teacher is None and alone[0].speedup_vs_diffusers is None


def test_cli_model_that_is_its_own_teacher(tmp_path):
    path = embedded_teacher_path("wan2.1")
    out = tmp_path / "self.json"
    r = runner.invoke(
        app,
        ["bench", str(path), "--teacher", str(path), "--smoke", "--no-diffusers", "--device", "cpu", "-q",
         "--warmup", "0", "--json", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "median of 1" in r.output and "skipped diffusers: not asked for" in r.output
    (row,) = load_report(out).rows
    assert row.role == "model+teacher" and row.speedup_vs_teacher == 1.0 and row.speedup_vs_diffusers is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-model"], "unknown model 'no-such-model'"),
        (["flash-wan2.1", "--teacher", "flash-wan2.1"], "is a student; --teacher names a teacher"),
        (["flash-wan2.1", "--teacher", "ltx"], "preset flash-wan2.1 is for wan2.1 teachers"),
        (["flash-wan2.1", "--frames", "8"], "--frames must be 1 + 4n output frames"),
        (["flash-wan2.1", "--runtime", "tvm"], "unknown --runtime 'tvm'"),
        (["flash-wan2.1", "--height", "30"], "--height and --width must be multiples of 8"),
        (["flash-wan2.1", "--frames-on", "gpu"], "--frames-on must be cpu or device, got 'gpu'"),
        (["wan2.1", "--runtime", "onnxruntime", "--frames-on", "device"], "--frames-on device applies to the torch"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    r = runner.invoke(app, ["bench", *args, "--smoke", "--device", "cpu", "-q", "--no-diffusers"])
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.startswith("error: ") and r.output.count("\n") == 1


def test_bad_model_name_is_input_error():
    with pytest.raises(InputError, match="unknown model 'wan9'"):
        bench(["wan9"], device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt imports here")
def test_tensorrt_refused_when_it_cannot_import():
    with pytest.raises(InputError, match="needs TensorRT, which cannot be imported here"):
        bench(["flash-wan2.1"], runtime="tensorrt", smoke=True, device="cpu")
    r = runner.invoke(app, ["bench", "flash-wan2.1", "--runtime", "tensorrt", "--smoke", "--device", "cpu"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--runtime needs TensorRT" in r.output


def test_onnxruntime_smoke():
    pytest.importorskip("onnxruntime")
    report = bench(["wan2.1"], smoke=True, device="cpu", runtime="onnxruntime", warmup=0, compare_diffusers=False)
    (row,) = report.rows  # one tiny export: exporting takes seconds per model
    assert (row.name, row.runtime, row.role, row.speedup_vs_teacher) == ("wan2.1", "onnxruntime", "model+teacher", 1.0)
    assert row.macs_per_frame > 0 and row.peak_memory_source.startswith(("rss", "not measured"))


@pytest.mark.skipif(
    importlib.util.find_spec("flashvaed.engines.compiled") is None,
    reason="the compiled runtime (flashvaed/engines/compiled.py, helper R) is not in this tree yet",
)
def test_compiled_smoke(monkeypatch):
    from flashvaed.engines import compiled

    monkeypatch.setattr(compiled, "BACKEND", "eager")  # dynamo traces, nothing is compiled: seconds
    report = bench(["wan2.1"], smoke=True, device="cpu", runtime="compiled", compile_mode="inductor",
                   compare_diffusers=False, frames_on="device")  # fmt: skip
    (row,) = report.rows
    assert row.runtime == "compiled (inductor)" and row.role == "model+teacher" and row.speedup_vs_teacher == 1.0
    assert report.settings["compile"] == "inductor" and row.warmup_seconds is not None
    assert report.settings["frames_on"] == "device"
    assert check_runtime("compiled", torch.device("cpu"), "auto") == "compiled (none)"  # auto: eager on a CPU


def test_a_clip_within_a_decoders_latency_has_no_steady_rows_and_says_why():
    """LTX's stream holds back its latency: a smoke clip comes out in the flush, so its steady
    column is empty, and the report says why instead of leaving a bare dash."""
    report = bench(["ltx"], smoke=True, device="cpu", warmup=0, repeats=1, compare_diffusers=False)
    (row,) = report.rows
    assert row.ms_per_frame_steady is None and row.frames_per_second > 0
    (note,) = [n for n in report.notes if n.startswith("ltx: no steady frames")]
    assert "holds back 8 latent frames" in note
    full = bench(["wan2.1"], smoke=True, device="cpu", warmup=0, repeats=1, compare_diffusers=False)
    assert full.rows[0].ms_per_frame_steady is not None and not any("steady" in n for n in full.notes)
