"""benchmarks/gpu_suite.py --smoke: the GPU suite's every path that needs no CUDA still runs.

The suite is run on GPUs only now and then, so it would rot silently; its smoke mode runs it on
the CPU with tiny models (the Triton kernel interpreted), in a subprocess as a user would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("decode", "profile", "kernel", "onnxruntime", "fidelity", "memory", "exactness", "runtimes")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_suite") / "report"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    return proc, out


def ratios(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every ``*_x`` entry (the suite's ratios) anywhere in the report, with its path."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k).endswith("_x"):
                found.append((f"{path}.{k}", v))
            found += ratios(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += ratios(v, f"{path}[{i}]")
    return found


def test_smoke_report(smoke: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    sections = report["sections"]
    assert set(sections) == set(SECTIONS)
    for name, sec in sections.items():
        assert sec["status"] in ("ok", "skipped"), (name, sec.get("error"), sec.get("traceback"))
        assert sec["status"] == "ok" or sec["reason"], name
        for row in sec.get("rows", []):
            assert not str(row.get("status", "ok")).startswith("failed"), (name, row)
    for name in ("decode", "profile", "onnxruntime", "fidelity", "memory", "exactness", "runtimes"):  # no CUDA
        assert sections[name]["status"] == "ok", name

    # the profile: a step row and its top ops per model, their times inside the step's
    profile = sections["profile"]["rows"]
    assert {(r["model"], r["how"]) for r in profile} == {
        (m, how) for m in ("teacher", "flash-wan2.1") for how in ("decode_step", "stream, frames on cpu")
    }
    for model in ("teacher", "flash-wan2.1"):
        (step,) = [r for r in profile if (r["model"], r["how"], r["what"]) == (model, "decode_step", "step")]
        ops = [r for r in profile if (r["model"], r["how"]) == (model, "decode_step") and r["what"] != "step"]
        assert 0 < step["cpu_busy_ms"] and ops and all(0 < r["cpu_ms"] <= step["cpu_busy_ms"] for r in ops)
        assert sum(r["share"] for r in ops) <= 1 + 1e-9 and ops[0]["cpu_ms"] >= ops[-1]["cpu_ms"]

    # every mode has a row per model; compile runs on the CPU, CUDA graphs say why they cannot
    decode = sections["decode"]["rows"]
    modes = {(r["model"], r["mode"]): r["status"] for r in decode}
    assert {m for _, m in modes} == {"eager", "cudagraph", "compile", "compile-ro"}
    assert all(status == "ok" for (_, mode), status in modes.items() if mode in ("eager", "compile"))
    assert all(status.startswith("skipped: ") for (_, mode), status in modes.items() if mode == "cudagraph")
    assert all(r["max_abs_vs_eager"] < 1e-5 for r in decode if r["mode"] == "compile")

    # the production compile modes: on the CPU, inductor (traced by --compile-backend) for the first student
    runtimes = sections["runtimes"]["rows"]
    assert [(r["model"], r["compile"]) for r in runtimes] == [("flash-wan2.1", "inductor")]
    assert all(r["max_abs_vs_eager"] <= 1e-5 and r["repeat_max_abs"] <= 1e-5 for r in runtimes)

    found = dict(ratios(report))
    present = {path.rsplit(".", 1)[1] for path, v in found.items() if v is not None}
    assert {"student_speedup_x", "vs_eager_x", "ort_speedup_x"} <= present
    if sections["kernel"]["status"] == "ok":
        assert "triton_speedup_x" in present
        assert all(r["match"] for r in sections["kernel"]["rows"])
    for path, value in found.items():
        if value is not None:  # the CPU measures no peak memory: its ratio is absent, not made up
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (path, value)
    assert all(math.isfinite(r["psnr_vs_fp32_db"]) and r["psnr_vs_fp32_db"] > 30 for r in sections["fidelity"]["rows"])

    md = (out / "gpu_suite.md").read_text()
    for name in SECTIONS:
        assert f"## {name}:" in md
    assert "| model | mode |" in md and md in proc.stdout  # the tables are printed too
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
