"""Hostile input over every command: each case exits 2 with one line, no traceback, and leaves
nothing at the output path (an output that existed before is left exactly as it was).

Cases that would cost unbounded memory run in their own process under an address-space limit
(a check that was skipped shows up as an allocation failure: exit 1, not 2); cases that could
hang (FIFOs) run under a timeout. The fixtures are the embedded teacher, a student pruned from it,
its export and ONNX Runtime engine: built once for the module.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flashvaed import api
from flashvaed.atomic import atomic_output, clean_stale, swap_in
from flashvaed.cli import app
from flashvaed.demo import embedded_teacher_path
from flashvaed.models import load_vae, save_teacher

runner = CliRunner()
CLI = [sys.executable, "-m", "flashvaed.cli"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """teacher.safetensors, z.pt, student/, export/, engine/: the things hostile cases tamper with."""
    d = tmp_path_factory.mktemp("world")
    shutil.copy(embedded_teacher_path(), d / "teacher.safetensors")
    torch.manual_seed(0)
    torch.save({"latents": torch.randn(1, 16, 3, 4, 4)}, d / "z.pt")
    api.prune(
        d / "teacher.safetensors", d / "student", preset="flash-wan2.1", calib_clips=1, calib_frames=5, calib_size=32
    )
    api.export(d / "student", d / "export", chunk="1:1:2", height="32:32:64", width="32:32:64", batch="1")
    api.build_engine(d / "export", d / "engine")
    return d


@pytest.fixture
def d(world, tmp_path) -> Path:
    """A private copy of the world for one case to tamper with."""
    shutil.copytree(world, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def tamper_manifest(d: Path, change: Callable[[dict], object], which: str = "engine") -> None:
    path = d / which / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def snapshot(path: Path) -> dict[str, bytes] | None:
    """The bytes of every file under ``path`` (None if it does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_refused(output: str, code: int, needle: str, out: Path | None, before: dict | None) -> None:
    lines = output.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output and "internal error" not in output, output
    assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert snapshot(out) == before, f"{out} changed"
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------
# the cases: setup(d) -> (argv, needle, output path or None)
# ---------------------------------------------------------------------------------------------
Case = Callable[[Path], tuple[list, str, "Path | None"]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def decode_to(d: Path, latents: Path | str, out: str = "o.pt", model: str = "teacher.safetensors") -> list:
    return ["decode", d / latents, "-m", d / model, "-o", d / out, "-q"]


# --- manifests may only name files inside their folder --------------------------------------
@case
def manifest_graph_dotdot(d):
    (d / "secret").mkdir()
    shutil.copy(d / "engine" / "steady.optimized.onnx", d / "secret" / "x.onnx")
    tamper_manifest(d, lambda m: m["graphs"]["steady"].update(file="../secret/x.onnx"))
    return ["info", d / "engine"], "inside the directory", None


@case
def manifest_graph_absolute(d):
    tamper_manifest(d, lambda m: m["graphs"]["steady"].update(file=str(d / "export" / "steady.onnx")))
    return decode_to(d, "z.pt", "o.mp4", "engine"), "inside the directory", d / "o.mp4"


@case
def manifest_graph_symlink_out(d):
    os.symlink(d / "export" / "steady.onnx", d / "engine" / "link.onnx")
    tamper_manifest(d, lambda m: m["graphs"]["steady"].update(file="link.onnx"))
    return decode_to(d, "z.pt", "o.mp4", "engine"), "leads outside", d / "o.mp4"


@case
def manifest_graph_missing(d):
    (d / "engine" / "first.optimized.onnx").unlink()
    return decode_to(d, "z.pt", "o.mp4", "engine"), "lacks", d / "o.mp4"


@case
def onnx_external_data_outside(d):
    import onnx

    (d / "outside").mkdir()
    (d / "outside" / "w.bin").write_bytes(b"\0" * 4096)
    graph = onnx.load(str(d / "engine" / "steady.optimized.onnx"))
    tensor = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../outside/w.bin")
    (d / "engine" / "steady.optimized.onnx").write_bytes(graph.SerializeToString())  # onnx.save would refuse
    return decode_to(d, "z.pt", "o.mp4", "engine"), "external data", d / "o.mp4"


# --- tampered manifests ------------------------------------------------------------------------
@case
def manifest_state_channels_lie(d):
    tamper_manifest(d, lambda m: m["state"][0].update(channels=7))
    return decode_to(d, "z.pt", "o.mp4", "engine"), "does not describe its graphs", d / "o.mp4"


@case
def manifest_state_frames_not_a_number(d):
    tamper_manifest(d, lambda m: m["state"][0].update(frames="two"))
    return decode_to(d, "z.pt", "o.mp4", "engine"), "malformed", d / "o.mp4"


@case
def manifest_range_min_above_max(d):
    tamper_manifest(d, lambda m: m["shapes"].update(chunk={"min": 4, "opt": 2, "max": 1}))
    return decode_to(d, "z.pt", "o.mp4", "engine"), "min <= opt <= max", d / "o.mp4"


@case
def manifest_range_huge(d):
    tamper_manifest(d, lambda m: m["shapes"].update(height={"min": 1, "opt": 1, "max": 10**12}))
    return ["info", d / "engine"], "min <= opt <= max", None


@case
def manifest_shapes_not_a_mapping(d):
    tamper_manifest(d, lambda m: m.update(shapes=[1, 2]))
    return ["info", d / "engine"], "malformed", None


@case
def manifest_negative_scale(d):
    tamper_manifest(d, lambda m: m["state"][0].update(scale="-1/2"))
    return decode_to(d, "z.pt", "o.mp4", "engine"), "impossible", d / "o.mp4"


@case
def manifest_zero_scale_denominator(d):
    tamper_manifest(d, lambda m: m["state"][0].update(scale="1/0"))
    return ["info", d / "engine"], "malformed", None


@case
def manifest_version_not_a_number(d):
    tamper_manifest(d, lambda m: m.update(version="x"))
    return ["info", d / "engine"], "malformed", None


@case
def manifest_model_field_not_a_number(d):
    tamper_manifest(d, lambda m: m["model"].update(temporal_factor="x"))
    return decode_to(d, "z.pt", "o.mp4", "engine"), "malformed", d / "o.mp4"


@case
def manifest_unknown_precision(d):
    tamper_manifest(d, lambda m: m.update(precision="fp8"))
    return ["info", d / "engine"], "precision", None


@case
def manifest_not_json(d):
    (d / "engine" / "manifest.json").write_text("{ not json")
    return ["info", d / "engine"], "unreadable", None


@case
def manifest_huge(d):
    (d / "engine" / "manifest.json").write_text(" " * (5 << 20) + "{}")
    return ["info", d / "engine"], "at most", None


@case
def manifest_corrupt_graph_file(d):
    (d / "engine" / "steady.optimized.onnx").write_bytes(b"\x08\x07garbage, not protobuf")
    return decode_to(d, "z.pt", "o.mp4", "engine"), "cannot load graph", d / "o.mp4"


# --- outputs replace only what is ours, never the input -----------------------------------------
def web_app(d: Path, manifest: str = "{}") -> Path:
    web = d / "web"
    web.mkdir()
    (web / "manifest.json").write_text(manifest)
    (web / "index.html").write_text("<html>mine</html>")
    return web


@case
def export_over_a_web_app(d):
    web = web_app(d)
    return ["export", d / "student", "-o", web, "--chunk", "1", "--height", "32", "--width", "32"], "not an export", web


@case
def engine_over_a_web_app(d):
    web = web_app(d, '{"name": "app", "format": "pwa"}')
    return ["build-engine", d / "export", "-o", web], "not an export", web


@case
def pngs_over_a_foreign_folder(d):
    (d / "docs").mkdir()
    (d / "docs" / "notes.txt").write_text("mine")
    return decode_to(d, "z.pt", "docs"), "not a folder of decoded frames", d / "docs"


@case
def student_over_a_foreign_folder(d):
    (d / "proj").mkdir()
    (d / "proj" / "config.json").write_text('{"name": "not a student"}')
    argv = ["prune", "-t", d / "teacher.safetensors", "-o", d / "proj", "--preset", "flash-wan2.1"]
    return argv, "not a student directory", d / "proj"


@case
def demo_over_a_foreign_folder(d):
    (d / "home").mkdir()
    (d / "home" / "student").mkdir()
    (d / "home" / "student" / "thesis.tex").write_text("years of work")
    return ["demo", "-o", d / "home", "-q"], "not a demo output", d / "home"


@case
def decode_over_its_own_latents(d):
    return decode_to(d, "z.pt", "z.pt"), "would overwrite the input", d / "z.pt"


@case
def decode_over_its_model(d):
    return decode_to(d, "z.pt", "teacher.safetensors"), "would overwrite the input", d / "teacher.safetensors"


@case
def engine_over_its_export(d):
    return ["build-engine", d / "export", "-o", d / "export"], "would overwrite the input", d / "export"


@case
def export_into_its_student(d):
    return ["export", d / "student", "-o", d / "student"], "would overwrite the input", d / "student"


@case
def validate_report_over_latents(d):
    argv = ["validate", d / "engine", "-r", d / "student", "-l", d / "z.pt", "--json", d / "z.pt"]
    return argv, "would overwrite the input", d / "z.pt"


@case
def distill_into_the_teacher_file(d):
    argv = ["distill", "-t", d / "teacher.safetensors", "-s", d / "student", "-d", "synthetic"]
    argv += ["-o", d / "teacher.safetensors"]
    return argv, "would overwrite the input", d / "teacher.safetensors"


@case
def file_output_is_a_directory(d):
    (d / "o.mp4").mkdir()
    return decode_to(d, "z.pt", "o.mp4"), "is a directory", d / "o.mp4"


@case
def output_parent_is_a_file(d):
    return decode_to(d, "z.pt", "z.pt/o.mp4"), "not a directory", None


@case
def output_is_a_fifo(d):
    os.mkfifo(d / "o.pt")
    return decode_to(d, "z.pt", "o.pt"), "not a regular file", None


# --- files that are not what they claim --------------------------------------------------------
@case
def text_file_named_pth(d):
    (d / "t.pth").write_text("hello, not a checkpoint")
    return ["info", d / "t.pth"], "cannot read", None


@case
def pickle_that_runs_code(d):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'pwned'}",))

    with zipfile.ZipFile(d / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(Payload(), protocol=2))
        z.writestr("evil/version", "3\n")
        z.writestr("evil/byteorder", "little")
    return decode_to(d, "evil.pt"), "pickled code", d / "o.pt"


@case
def empty_npy(d):
    (d / "e.npy").write_bytes(b"")
    return decode_to(d, "e.npy"), "not a .npy file", d / "o.pt"


@case
def npy_of_objects(d):
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return decode_to(d, "obj.npy"), "not a plain numeric type", d / "o.pt"


@case
def latents_path_is_a_directory(d):
    (d / "dir.pt").mkdir()
    return decode_to(d, "dir.pt"), "is a directory", d / "o.pt"


@case
def diffusers_config_not_json(d):
    save_teacher(load_vae(d / "teacher.safetensors"), d / "dd", "diffusers")
    (d / "dd" / "config.json").write_text("{not json")
    return ["info", d / "dd"], "malformed JSON", None


@case
def diffusers_config_not_utf8(d):
    save_teacher(load_vae(d / "teacher.safetensors"), d / "dd", "diffusers")
    (d / "dd" / "config.json").write_bytes(b'{"a": "\xff\xfe"}')
    return ["info", d / "dd"], "not UTF-8", None


@case
def diffusers_config_huge_block_count(d):
    save_teacher(load_vae(d / "teacher.safetensors"), d / "dd", "diffusers")
    config = json.loads((d / "dd" / "config.json").read_text())
    (d / "dd" / "config.json").write_text(json.dumps({**config, "num_res_blocks": 10**6}))
    return ["info", d / "dd"], "num_res_blocks", None


@case
def diffusers_config_huge_dim_mult(d):
    save_teacher(load_vae(d / "teacher.safetensors"), d / "dd", "diffusers")
    config = json.loads((d / "dd" / "config.json").read_text())
    (d / "dd" / "config.json").write_text(json.dumps({**config, "dim_mult": [1, 2, 4, 10**7]}))
    return ["info", d / "dd"], "dim_mult", None


@case
def student_config_huge_width(d):
    config = json.loads((d / "student" / "config.json").read_text())
    config["layout"]["up"][0]["width"] = 10**9
    (d / "student" / "config.json").write_text(json.dumps(config))
    return ["info", d / "student"], "width must be an integer in", None


@case
def student_config_float_width(d):
    config = json.loads((d / "student" / "config.json").read_text())
    config["layout"]["up"][0]["width"] = 12.5
    (d / "student" / "config.json").write_text(json.dumps(config))
    return ["info", d / "student"], "malformed", None


@case
def nan_weights(d):
    tensors = load_file(d / "teacher.safetensors")
    with safe_open(str(d / "teacher.safetensors"), "pt") as f:
        metadata = f.metadata()
    key = next(k for k in tensors if k.startswith("decoder") and tensors[k].is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, d / "nan.safetensors", metadata=metadata)
    return decode_to(d, "z.pt", "o.mp4", "nan.safetensors"), "NaN or Inf weights", d / "o.mp4"


@case
def safetensors_header_claims_a_terabyte(d):
    (d / "h.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    return ["info", d / "h.safetensors"], "cannot read", None


@case
def safetensors_offsets_past_the_end(d):
    header = {"latents": {"dtype": "F32", "shape": [1, 16, 10**5, 100, 100], "data_offsets": [0, 64]}}
    raw = json.dumps(header).encode()
    (d / "l.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    return decode_to(d, "l.safetensors"), "cannot read", d / "o.pt"


@case
def yaml_alias_bomb(d):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, name = chr(96 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (d / "bomb.yaml").write_text("\n".join(lines))
    argv = ["prune", "-t", d / "teacher.safetensors", "--config", d / "bomb.yaml", "-o", d / "s2"]
    return argv, "aliases", d / "s2"


@case
def distill_config_not_a_mapping(d):
    (d / "cfg.yaml").write_text("- just\n- a list\n")
    argv = [
        "distill",
        "-t",
        d / "teacher.safetensors",
        "-s",
        d / "student",
        "-d",
        "synthetic",
        "-o",
        d / "run",
        "--config",
        d / "cfg.yaml",
    ]
    return argv, "expected a mapping", d / "run"


def distill_argv(d: Path, *extra) -> list:
    return ["distill", "-t", d / "teacher.safetensors", "-s", d / "student", "-o", d / "run", "-q", *extra]


@case
def distill_cache_entry_corrupt(d):
    (d / "cache").mkdir()
    (d / "cache" / "clip-0-0.safetensors").write_bytes(b"garbage")
    return (
        distill_argv(d, "-d", "synthetic", "--cache-latents", d / "cache", "--steps-per-phase", "1"),
        "cached clip",
        None,
    )


@case
def distill_cache_is_a_file(d):
    return (
        distill_argv(d, "-d", "synthetic", "--cache-latents", d / "z.pt", "--steps-per-phase", "1"),
        "not a directory",
        None,
    )


@case
def distill_data_is_a_fifo(d):
    os.mkfifo(d / "clip.mp4")
    return distill_argv(d, "-d", d / "clip.mp4", "--steps-per-phase", "1"), "not a regular file", d / "run"


@case
def float_frames_in_pixel_range(d):
    torch.save({"frames": torch.rand(1, 3, 5, 32, 32) * 255}, d / "f.pt")
    return ["encode", d / "f.pt", "-m", d / "teacher.safetensors", "-o", d / "o.pt", "-q"], "[-1, 1]", d / "o.pt"


@case
def frames_of_integers(d):
    torch.save({"frames": torch.zeros(1, 3, 5, 32, 32, dtype=torch.int32)}, d / "f.pt")
    return ["encode", d / "f.pt", "-m", d / "teacher.safetensors", "-o", d / "o.pt", "-q"], "uint8", d / "o.pt"


# --- impossible options ------------------------------------------------------------------------
@case
def negative_threads(d):
    return ["build-engine", d / "export", "-o", d / "e2", "--threads", "-4"], "--threads", d / "e2"


@case
def zero_workspace(d):
    return ["build-engine", d / "export", "-o", d / "e2", "--workspace", "0"], "--workspace", d / "e2"


@case
def provider_that_cannot_run_here(d):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA provider may run")
    argv = ["build-engine", d / "export", "-o", d / "e2", "--provider", "CUDAExecutionProvider"]
    return argv, "CUDAExecutionProvider", d / "e2"


@case
def negative_fps(d):
    return [*decode_to(d, "z.pt", "o.mp4"), "--fps", "-3"], "--fps", d / "o.mp4"


@case
def info_chunk_zero(d):
    return ["info", d / "teacher.safetensors", "--chunk", "0"], "chunk", None


@case
def evaluate_zero_clips(d):
    argv = ["evaluate", "-m", d / "student", "-t", d / "teacher.safetensors", "-d", "synthetic", "--clips", "0"]
    return argv, "--clips", None


@case
def model_is_an_empty_directory(d):
    (d / "empty").mkdir()
    return ["info", d / "empty"], "not a model directory", None


@case
def latents_file_empty(d):
    (d / "zero.pt").write_bytes(b"")
    return decode_to(d, "zero.pt"), "cannot read", d / "o.pt"


@case
def encode_max_frames_zero(d):
    argv = ["encode", d / "z.pt", "-m", d / "teacher.safetensors", "-o", d / "o.pt", "--max-frames", "0"]
    return argv, "max_frames", d / "o.pt"


@case
def prune_negative_calibration(d):
    argv = ["prune", "-t", d / "teacher.safetensors", "-o", d / "s2", "--preset", "flash-wan2.1", "--calib-clips", "-1"]
    return argv, "--calib-clips", d / "s2"


@case
def demo_frames_not_4n_plus_1(d):
    return ["demo", "-o", d / "demo", "--frames", "6", "-q"], "--frames", d / "demo"


@case
def demo_of_an_unknown_family(d):
    return ["demo", "-o", d / "demo", "--family", "sd3", "-q"], "--family", d / "demo"


@case
def demo_without_room_for_a_latent_grid(d):
    return ["demo", "-o", d / "demo", "--family", "ltx", "--height", "32", "-q"], "--height", d / "demo"


@case
def validate_a_student_as_engine(d):
    argv = ["validate", d / "student", "-r", d / "student", "-l", d / "z.pt"]
    return argv, "not an export or engine directory", None


@case
def distill_no_evaluation_clips(d):
    return distill_argv(d, "-d", "synthetic", "--eval-clips", "0"), "--eval-clips", d / "run"


@case
def decode_negative_batch_index(d):
    return [*decode_to(d, "z.pt"), "--batch-index", "-1"], "--batch-index", d / "o.pt"


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_in_one_line(d, name):
    argv, needle, out = CASES[name](d)
    before = snapshot(out) if out is not None else None
    r = runner.invoke(app, [str(a) for a in argv])
    assert_refused(r.output, r.exit_code, needle, out, before)
    assert not (d / "pwned").exists()


def test_the_suite_tries_enough_cases():
    assert len(CASES) + len(BOUNDED) + len(HANGING) + 3 >= 40  # + usage errors, SIGTERM, SIGKILL below


# ---------------------------------------------------------------------------------------------
# bounded memory: each in its own process under an address-space limit
# ---------------------------------------------------------------------------------------------
LIMIT = 6 << 30  # torch itself reserves ~3 GB of address space; every case below would need tens of GB


def run_limited(argv: list, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    return subprocess.run(
        [*CLI, *[str(a) for a in argv]],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        env={**os.environ, "FLASHVAED_MEMORY_LIMIT": str(LIMIT), **(env or {})},
    )


def zero_stride_latents(d):
    torch.save({"latents": torch.zeros(1).expand(1, 16, 2000, 800, 800)}, d / "big.pt")  # 80 GB as floats
    return decode_to(d, "big.pt"), "would expand", d / "o.pt"


def zero_stride_checkpoint(d):
    tensors = load_file(d / "teacher.safetensors")
    key = next(k for k in tensors if k.startswith("decoder") and tensors[k].dim() == 5)
    tensors[key] = torch.zeros(1).expand(10**5, 10**5, 1, 1, 1)
    torch.save(tensors, d / "big.pth")
    return ["info", d / "big.pth"], "would expand", None


def compressed_torch_file(d):
    torch.save({"latents": torch.zeros(1, 16, 3, 4, 4)}, d / "raw.pt")
    with zipfile.ZipFile(d / "raw.pt") as src, zipfile.ZipFile(d / "c.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return decode_to(d, "c.pt"), "compressed", d / "o.pt"


def npy_header_larger_than_its_data(d):
    with open(d / "h.npy", "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (1, 16, 10**5, 1000, 1000)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    return decode_to(d, "h.npy"), "header declares", d / "o.pt"


def video_larger_than_memory(d):
    with av.open(str(d / "v.mp4"), "w") as c:  # 48 frames of 512x512: ~340 MiB of float frames
        stream = c.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
        for _ in range(48):
            frame = av.VideoFrame.from_ndarray(np.zeros((512, 512, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    argv = ["encode", d / "v.mp4", "-m", d / "teacher.safetensors", "-o", d / "o.pt", "-q"]
    return argv, "would need", d / "o.pt", {"FLASHVAED_MEMORY_LIMIT": str(256 << 20)}


BOUNDED = {
    f.__name__: f
    for f in (
        zero_stride_latents,
        zero_stride_checkpoint,
        compressed_torch_file,
        npy_header_larger_than_its_data,
        video_larger_than_memory,
    )
}


@pytest.mark.parametrize("name", list(BOUNDED))
def test_unbounded_cost_is_refused_before_allocation(d, name):
    argv, needle, out, *env = BOUNDED[name](d)
    start = time.monotonic()
    r = run_limited(argv, env=env[0] if env else None)
    assert_refused(r.stderr + r.stdout, r.returncode, needle, out, None)
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------------------------
# special files are refused unopened (a FIFO would block forever)
# ---------------------------------------------------------------------------------------------
def fifo_model(d):
    os.mkfifo(d / "f.pth")
    return ["info", d / "f.pth"]


def fifo_latents(d):
    os.mkfifo(d / "f.pt")
    return decode_to(d, "f.pt")


def fifo_config(d):
    os.mkfifo(d / "preset.yaml")
    return ["prune", "-t", d / "teacher.safetensors", "--config", d / "preset.yaml", "-o", d / "s2"]


def device_as_latents(d):
    os.symlink("/dev/zero", d / "zero.npy")
    return decode_to(d, "zero.npy")


HANGING = {f.__name__: f for f in (fifo_model, fifo_latents, fifo_config, device_as_latents)}


@pytest.mark.parametrize("name", list(HANGING))
def test_special_files_are_refused_unopened(d, name):
    r = run_limited(HANGING[name](d), timeout=60)
    assert_refused(r.stderr + r.stdout, r.returncode, "not a regular file", None, None)


# ---------------------------------------------------------------------------------------------
# the real console script: usage errors, signals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["decode", "z.pt"], "Missing option '--model'"),
        (["decode", "z.pt", "-m", "t", "-o", "o.pt", "--chunk", "two"], "--chunk"),
        (["no-such-command"], "No such command"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, argv, needle):
    r = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and needle in r.stderr, r.stderr


def long_decode(d: Path, out: str) -> list[str]:
    torch.save({"latents": torch.randn(1, 16, 400, 8, 8)}, d / "long.pt")
    return [*CLI, *[str(a) for a in decode_to(d, "long.pt", out)]]


def wait_for_temporary(folder: Path, name: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while not any(p.name.startswith(f".{name}.") and ".tmp" in p.name for p in folder.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the decode never started writing"
        time.sleep(0.05)
    time.sleep(0.3)


def test_sigterm_cleans_up_like_ctrl_c_and_keeps_the_old_output(d):
    r = runner.invoke(app, [str(a) for a in decode_to(d, "z.pt", "frames")])
    assert r.exit_code == 0, r.output
    before = snapshot(d / "frames")
    proc = subprocess.Popen(long_decode(d, "frames"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_temporary(d, "frames", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip() == "error: interrupted", err
    assert snapshot(d / "frames") == before
    assert not [p for p in d.iterdir() if p.name.startswith(".frames.")]


def test_sigkill_leaves_the_old_output_and_the_next_run_cleans_up(d):
    r = runner.invoke(app, [str(a) for a in decode_to(d, "z.pt", "frames")])
    assert r.exit_code == 0, r.output
    before = snapshot(d / "frames")
    proc = subprocess.Popen(long_decode(d, "frames"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_temporary(d, "frames", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert snapshot(d / "frames") == before
    assert [p for p in d.iterdir() if p.name.startswith(".frames.")], "the killed run left no temporary?"
    r = runner.invoke(app, [str(a) for a in decode_to(d, "z.pt", "frames")])
    assert r.exit_code == 0, r.output
    assert not [p for p in d.iterdir() if p.name.startswith(".frames.")]


# ---------------------------------------------------------------------------------------------
# the swap itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_directory_swap_replaces_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr("flashvaed.atomic._exchange", lambda a, b: False)
    final = tmp_path / "out"
    final.mkdir()
    (final / "frame_00000.png").write_text("old")
    with atomic_output(final, directory=True, replaceable=lambda p: True) as tmp:
        (tmp / "frame_00000.png").write_text("new")
        (tmp / "frame_00001.png").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["frame_00000.png", "frame_00001.png"]
    assert (final / "frame_00000.png").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_swap_is_undone_by_the_next_run(tmp_path):
    """A rename-aside swap killed between its two renames: the old output comes back."""
    final = tmp_path / "out"
    aside = tmp_path / ".out.999999999-0123abcd.old"
    aside.mkdir()
    (aside / "frame_00000.png").write_text("old")
    stale = tmp_path / ".out.999999999-89abcdef.tmp"
    stale.mkdir()
    alive = tmp_path / f".out.{os.getppid()}-00000000.tmp"  # a live writer's: left alone
    alive.mkdir()
    clean_stale(final)
    assert (final / "frame_00000.png").read_text() == "old"
    assert not aside.exists() and not stale.exists() and alive.exists()


def test_swap_in_replaces_a_file_atomically(tmp_path):
    final, tmp = tmp_path / "a.pt", tmp_path / ".a.pt.1-00000000.tmp.pt"
    final.write_text("old")
    tmp.write_text("new")
    swap_in(tmp, final)
    assert final.read_text() == "new" and not tmp.exists()


# ---------------------------------------------------------------------------------------------
# what used to be wrong answers with exit 0
# ---------------------------------------------------------------------------------------------
def test_uint8_frames_encode_as_pixels(d):
    """uint8 frames are 0..255 pixels: they encode like the same frames given in [-1, 1]."""
    pixels = torch.randint(0, 256, (1, 3, 5, 32, 32), dtype=torch.uint8)
    torch.save({"frames": pixels}, d / "u8.pt")
    torch.save({"frames": pixels.float() / 127.5 - 1}, d / "f32.pt")
    for name in ("u8", "f32"):
        args = ["encode", d / f"{name}.pt", "-m", d / "teacher.safetensors", "-o", d / f"{name}-z.pt", "-q"]
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    got = [torch.load(d / f"{n}-z.pt", weights_only=True)["latents"] for n in ("u8", "f32")]
    torch.testing.assert_close(got[0], got[1], atol=1e-6, rtol=0)


def test_a_previous_export_is_replaced(d):
    """Replacing our own outputs still works: an export over an export, pngs over pngs."""
    argv = ["export", d / "student", "-o", d / "export", "--chunk", "1", "--height", "32", "--width", "32"]
    r = runner.invoke(app, [str(a) for a in argv])
    assert r.exit_code == 0, r.output
    assert json.loads((d / "export" / "manifest.json").read_text())["shapes"]["chunk"]["max"] == 1


def test_a_raw_output_larger_than_memory_is_refused_before_decoding(d, monkeypatch):
    """Raw tensor outputs hold every frame at once: their size is checked before the decode."""
    torch.save({"latents": torch.randn(1, 16, 50, 16, 16)}, d / "long.pt")  # 39 MiB of frames
    monkeypatch.setenv("FLASHVAED_MEMORY_LIMIT", str(16 << 20))
    r = runner.invoke(app, [str(a) for a in decode_to(d, "long.pt")])
    assert_refused(r.output, r.exit_code, "would need 37.5 MiB", d / "o.pt", None)
