"""Hostile options of export and build-engine, and every precision x plugin mode an export offers.

Each hostile case exits 2 with one line, no traceback, and leaves the output path as it was: in
particular, no export is written that the manifest reader would refuse (one definition of the
limits serves both), and no opset is asked of torch or onnx that they cannot write. The fixture is
a tiny student (flash-wan2.1 at base width 8), its fp32 export and ONNX Runtime engine: built once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hostile import assert_refused, snapshot
from typer.testing import CliRunner

from flashvaed import api
from flashvaed.cli import app
from flashvaed.engines import load
from flashvaed.engines.ort_backend import MAX_THREADS, NUMPY_DTYPES
from flashvaed.errors import InputError
from flashvaed.export.contract import LIMITS, PLUGIN_MODES, PRECISIONS, read_manifest
from flashvaed.export.onnx_export import MIN_OPSET, PRECISION_OPSETS, ExportOptions, export, max_opset
from flashvaed.models import StudentSpec, WanConfig, load_model, save_student
from flashvaed.models.student import build_student

runner = CliRunner()
SHAPES = ["--chunk", "1:1:2", "--height", "16", "--width", "16", "--batch", "1"]  # 2x2 latents, chunks of 1-2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Graphs of 2x2 latents: a second torch thread only waits on the first (minutes on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> Path:
    """student/, z.pt (3 latent frames of 2x2), export/ (fp32, default opset), engine/."""
    d = tmp_path_factory.mktemp("export-world")
    torch.manual_seed(0)
    save_student(build_student(StudentSpec.load("flash-wan2.1"), WanConfig(base_dim=8))[0], d / "student")
    torch.save({"latents": torch.randn(1, 16, 3, 2, 2)}, d / "z.pt")
    api.export(d / "student", d / "export", chunk="1:1:2", height="16", width="16", batch="1")
    api.build_engine(d / "export", d / "engine", threads=1)
    return d


@pytest.fixture
def d(world, tmp_path) -> Path:
    """A private copy of the world for one case to tamper with."""
    shutil.copytree(world, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def invoke(*argv: object):
    return runner.invoke(app, [str(a) for a in argv])


# ---------------------------------------------------------------------------------------------
# the cases: setup(d) -> (argv, needle, output path or None)
# ---------------------------------------------------------------------------------------------
Case = Callable[[Path], tuple[list, str, "Path | None"]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def export_argv(d: Path, *options: object, out: str = "e2") -> list:
    return ["export", d / "student", "-o", d / out, *SHAPES, *options]


def tamper_engine(d: Path, change: Callable[[dict], object]) -> None:
    path = d / "engine" / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --- ranges a manifest could not hold ------------------------------------------------------------
@case
def export_height_beyond_what_a_manifest_holds(d):
    return export_argv(d, "--height", "8:8:10000000", out="export"), "--height", d / "export"  # over the old one


@case
def export_batch_beyond_what_a_manifest_holds(d):
    return export_argv(d, "--batch", "1:1:100000000000"), "--batch", d / "e2"


@case
def export_chunk_beyond_int64(d):
    return export_argv(d, "--chunk", "99999999999999999999"), "--chunk", d / "e2"


@case
def export_width_opt_beyond_int64(d):
    return export_argv(d, "--width", f"16:{10**20}:{10**20}"), "--width", d / "e2"  # 10**20 is a multiple of 8


@case
def export_chunk_zero(d):
    return export_argv(d, "--chunk", "0"), "--chunk", d / "e2"


@case
def export_batch_not_a_range(d):
    return export_argv(d, "--batch", "1:2:3:4"), "--batch", d / "e2"


# --- opsets --------------------------------------------------------------------------------------
@case
def export_opset_beyond_the_installed_onnx(d):
    return export_argv(d, "--opset", "99"), "--opset", d / "e2"


@case
def export_opset_beyond_int64(d):
    return export_argv(d, "--opset", "99999999999999999999"), "--opset", d / "e2"


@case
def export_opset_below_the_lowest(d):
    return export_argv(d, "--opset", str(MIN_OPSET - 1)), "--opset", d / "e2"


@case
def export_bf16_at_an_opset_without_bf16_convs(d):
    return (
        export_argv(d, "--precision", "bf16", "--opset", str(MIN_OPSET)),
        f"--opset {PRECISION_OPSETS['bf16']}",
        d / "e2",
    )


@case
def export_unknown_precision(d):
    return export_argv(d, "--precision", "int8"), "--precision", d / "e2"


# --- build-engine and the engine manifests it writes ---------------------------------------------
@case
def build_engine_threads_beyond_int64(d):
    return ["build-engine", d / "export", "-o", d / "e2", "--threads", "99999999999999999999"], "--threads", d / "e2"


@case
def build_engine_threads_beyond_int32(d):
    return ["build-engine", d / "export", "-o", d / "e2", "--threads", str(3 << 30)], "--threads", d / "e2"


@case
def build_engine_threads_beyond_the_limit(d):
    return ["build-engine", d / "export", "-o", d / "e2", "--threads", str(MAX_THREADS + 1)], "--threads", d / "e2"


@case
def build_engine_workspace_infinite(d):
    return ["build-engine", d / "export", "-o", d / "e2", "--workspace", "1e400"], "--workspace", d / "e2"


@case
def engine_manifest_threads_beyond_int64(d):
    tamper_engine(d, lambda m: m["backend"]["session_options"].update(intra_op_num_threads=10**20))
    return ["decode", d / "z.pt", "-m", d / "engine", "-o", d / "o.pt", "-q"], "intra_op_num_threads", d / "o.pt"


@case
def engine_manifest_optimization_level_not_a_level(d):
    tamper_engine(d, lambda m: m["backend"]["session_options"].update(graph_optimization_level="__class__"))
    return ["decode", d / "z.pt", "-m", d / "engine", "-o", d / "o.pt", "-q"], "graph_optimization_level", d / "o.pt"


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_export_options_are_refused_in_one_line(d, name):
    argv, needle, out = CASES[name](d)
    before = snapshot(out) if out is not None else None
    r = invoke(*argv)
    assert_refused(r.output, r.exit_code, needle, out, before)


# ---------------------------------------------------------------------------------------------
# what export writes, the reader takes
# ---------------------------------------------------------------------------------------------
def test_ranges_up_to_the_reader_limits_export_and_read_back(world, tmp_path):
    """The largest ranges a manifest may hold export and read back; one more is refused, before any work."""
    top = LIMITS["shape"]
    r = invoke(*export_argv(world, "--batch", f"1:1:{top}", "--height", f"16:16:{top * 8}", out=str(tmp_path / "e")))
    assert r.exit_code == 0, r.output
    shapes = read_manifest(tmp_path / "e").shapes
    assert shapes["batch"].max == top and shapes["height"].max == top
    for flag, value in (("--batch", f"1:1:{top + 1}"), ("--height", f"16:16:{(top + 1) * 8}")):
        r = invoke(*export_argv(world, flag, value, out=str(tmp_path / "x")))
        assert_refused(r.output, r.exit_code, flag, tmp_path / "x", None)


def test_export_refuses_whatever_the_reader_would(world, tmp_path, monkeypatch):
    """The contract is read back as a manifest before any graph is traced: a reader stricter than
    today's (no state frames allowed) makes the export refuse, writing nothing."""
    monkeypatch.setitem(LIMITS, "frames", 0)
    student = load_model(world / "student")
    with pytest.raises(InputError, match="state tensor"):
        export(student, tmp_path / "e", ExportOptions(chunk="1", height="16", width="16", batch="1"))
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------
# every precision x plugin mode
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(world) -> np.ndarray:
    """The student's own frames of z.pt (torch, fp32)."""
    z = torch.load(world / "z.pt", weights_only=True)["latents"]
    with torch.no_grad():
        return load_model(world / "student").decode(z).numpy()


TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}  # max abs error vs torch fp32, precisions ONNX Runtime runs


# "depthwise" mixes what "all" (both plugin node kinds) and "none" (plain convs of both kinds) write
# at every precision: it runs at fp32 only
PRECISION_PLUGINS = [(p, m) for p in PRECISIONS for m in PLUGIN_MODES if m != "depthwise" or p == "fp32"]


def test_every_precision_meets_every_kind_of_conv():
    assert {m for _, m in PRECISION_PLUGINS} == set(PLUGIN_MODES) == {"all", "depthwise", "none"}
    assert {p for p, m in PRECISION_PLUGINS if m == "all"} == {p for p, m in PRECISION_PLUGINS if m == "none"}
    assert {p for p, _ in PRECISION_PLUGINS} == set(PRECISIONS)


@pytest.mark.parametrize(("precision", "plugins"), PRECISION_PLUGINS)
def test_every_precision_exports_with_every_plugin_mode(world, reference, tmp_path, precision, plugins):
    """Without --opset, the lowest opset that takes the precision; the graphs pass onnx's checker,
    and where ONNX Runtime streams the precision an engine decodes like torch."""
    out = tmp_path / "e"
    r = invoke(*export_argv(world, "--precision", precision, "--plugins", plugins, out=str(out)))
    assert r.exit_code == 0, r.output
    contract = read_manifest(out)
    assert (contract.precision, contract.plugins, contract.opset) == (precision, plugins, PRECISION_OPSETS[precision])
    for name in contract.files.values():
        graph = onnx.load(str(out / name))
        onnx.checker.check_model(graph, full_check=True)
        assert {o.domain: o.version for o in graph.opset_import}[""] == contract.opset
    if PRECISIONS[precision] not in NUMPY_DTYPES:  # bf16: TensorRT's; ONNX Runtime engines are refused
        r = invoke("build-engine", out, "-o", tmp_path / "engine")
        assert_refused(r.output, r.exit_code, f"this export is {precision}", tmp_path / "engine", None)
        return
    r = invoke("build-engine", out, "-o", tmp_path / "engine", "--threads", "1")
    assert r.exit_code == 0, r.output
    r = invoke("decode", world / "z.pt", "-m", tmp_path / "engine", "-o", tmp_path / "o.pt", "--chunk", "2", "-q")
    assert r.exit_code == 0, r.output
    frames = torch.load(tmp_path / "o.pt", weights_only=True)["frames"].numpy()
    assert frames.shape == reference.shape
    assert np.abs(frames - reference).max() < TOLERANCE[precision]


def test_the_highest_opset_decodes_like_the_lowest(world, tmp_path):
    """torch's TorchScript exporter writes opsets past 20 with its opset-20 ops: the graphs must
    still mean the same (the checker passes, ONNX Runtime decodes the same frames)."""
    top = max_opset()
    assert top >= PRECISION_OPSETS["bf16"], "bf16 exports need torch and onnx that write opset 22"
    out = tmp_path / "e"
    r = invoke(*export_argv(world, "--opset", str(top), out=str(out)))
    assert r.exit_code == 0, r.output
    assert read_manifest(out).opset == top
    z = torch.load(world / "z.pt", weights_only=True)["latents"]
    got, want = (load(path).decode(z, chunk=2) for path in (out, world / "export"))  # first and steady graphs
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
