"""Hostile input over every command: each case exits 2 with one line, no traceback, and leaves
nothing at the output path (an output that existed before is left exactly as it was).

Cases that would cost unbounded memory run in their own process under an address-space limit
(a check that was skipped shows up as an allocation failure: exit 1, not 2); cases that could
hang (FIFOs) run under a timeout. The fixtures are the embedded teacher, a student pruned from it,
its export and ONNX Runtime engine: built once for the session (tests/hostile.py).

Siblings: test_fuzz_config.py (configurations and manifests that lie), test_fuzz_export.py (export
options, every precision x plugin mode), test_fuzz_ltx.py (degenerate but legal teachers and the
round trip of every layout: what must work, not be refused).
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
from hostile import assert_case_refused, assert_refused, snapshot, tamper_manifest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flashvaed.atomic import PARTIAL, atomic_output, clean_stale, swap_in
from flashvaed.cli import app
from flashvaed.models import load_vae, save_teacher
from flashvaed.safeload import json_format

runner = CliRunner()
CLI = [sys.executable, "-m", "flashvaed.cli"]


@pytest.fixture
def d(hostile_copy: Path) -> Path:
    return hostile_copy


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
def demo_over_files_named_like_a_demo(d):
    (d / "mine").mkdir()
    shutil.copy(d / "z.pt", d / "mine" / "input.mp4")  # names a demo writes, but not a demo's
    (d / "mine" / "report.md").write_text("notes")
    return ["demo", "-o", d / "mine", "-q"], "not a demo output", d / "mine"


@case
def pngs_over_someones_frames(d):
    (d / "frames").mkdir()
    (d / "frames" / "frame_00000.png").write_bytes(b"an ffmpeg export, named like ours")
    return decode_to(d, "z.pt", "frames"), "not a folder of decoded frames", d / "frames"


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


MALFORMED_PICKLES = {
    "text": b"this is a text file, not a checkpoint\n",
    "empty_stack": b"\x80\x02.",  # STOP with nothing on the stack
    "truncated_dict": b"\x80\x02}q\x00(X\x01\x00\x00\x00aq",
    "pop_mark": b"\x80\x021.",  # POP_MARK without a mark
    "legacy_magic": pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\x80\x02K\x03.",  # torch's old magic, cut
    "zip_without_pickle": b"",  # filled below: a zip holding no data.pkl
    "garbage": bytes(range(256)) * 4,
}


def _malformed_pickle(d: Path, kind: str) -> Path:
    path = d / f"{kind}.pth"
    if kind == "zip_without_pickle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/version", "3\n")
    else:
        path.write_bytes(MALFORMED_PICKLES[kind])
    return path


for _kind in MALFORMED_PICKLES:

    def _as_model(d, kind=_kind):
        return decode_to(d, "z.pt", "y.pt", _malformed_pickle(d, kind).name), "not a checkpoint", d / "y.pt"

    def _as_latents(d, kind=_kind):
        return decode_to(d, _malformed_pickle(d, kind).name, "y.pt"), "not a checkpoint", d / "y.pt"

    CASES[f"malformed_pickle_{_kind}_as_model"] = _as_model
    CASES[f"malformed_pickle_{_kind}_as_latents"] = _as_latents


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


# --- outputs flashvaed could not read back, opsets, numbers past every limit --------------------
def export_argv(d: Path, *options) -> list:
    return ["export", d / "student", "-o", d / "e2", "--chunk", "1", "--height", "32", "--width", "32", *options]


@case
def export_height_a_manifest_cannot_hold(d):
    return [*export_argv(d), "--height", "8:8:10000000"], "--height", d / "e2"


@case
def export_batch_a_manifest_cannot_hold(d):
    return [*export_argv(d), "--batch", "1:1:100000000000"], "--batch", d / "e2"


@case
def export_chunk_past_int64(d):
    return [*export_argv(d), "--chunk", "99999999999999999999"], "--chunk", d / "e2"


@case
def export_opset_the_installed_onnx_cannot_write(d):
    return [*export_argv(d), "--opset", "99"], "--opset", d / "e2"


@case
def export_bf16_at_an_opset_without_bf16(d):
    return [*export_argv(d), "--precision", "bf16", "--opset", "18"], "--opset 22", d / "e2"


@case
def info_four_gigapixel_frames(d):
    return ["info", d / "teacher.safetensors", "--height", "65536", "--width", "65536"], "gigapixels", None


@case
def info_chunk_past_int64(d):
    return ["info", d / "teacher.safetensors", "--chunk", "99999999999999999999"], "--chunk", None


@case
def decode_fps_past_any_video(d):
    return [*decode_to(d, "z.pt", "o.mp4"), "--fps", "100000000000000"], "--fps", d / "o.mp4"


@case
def decode_timestep_for_an_unconditioned_model(d):
    return [*decode_to(d, "z.pt", "o.mp4"), "--decode-timestep", "1e308"], "--decode-timestep", d / "o.mp4"


@case
def output_on_a_pseudo_filesystem(d):
    return decode_to(d, "z.pt", "/proc/o.mp4"), "cannot write /proc/o.mp4", None


@case
def output_where_writing_is_refused(d):
    (d / "locked").mkdir()
    (d / "locked").chmod(0o500)
    if os.access(d / "locked", os.W_OK):  # root: permissions do not bind; /sys refuses even root
        return decode_to(d, "z.pt", "/sys/o.pt"), "cannot write /sys/o.pt", None
    return decode_to(d, "z.pt", "locked/o.pt"), "cannot write", None


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_in_one_line(d, name):
    assert_case_refused(CASES[name], d)
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


# --- memory for the work itself, not only the files -------------------------------------------
def attention_at_latent_resolution(d):
    torch.save({"latents": torch.zeros(1, 16, 1, 256, 256)}, d / "wide.pt")  # 4 MiB; Wan's attention: 40 GiB
    return decode_to(d, "wide.pt"), "would need", d / "o.pt"


def chunk_too_large_for_memory(d):
    torch.save({"latents": torch.zeros(1, 16, 33, 64, 64)}, d / "long.pt")
    argv = [*decode_to(d, "long.pt", "o.mp4"), "--chunk", "32"]
    return argv, "lower --chunk to", d / "o.mp4", {"FLASHVAED_MEMORY_LIMIT": str(3 << 30)}


def write_clip(path: Path, frames: int, size: int) -> Path:
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        black = av.VideoFrame.from_ndarray(np.zeros((size, size, 3), np.uint8), format="rgb24")
        for _ in range(frames):
            for packet in stream.encode(black):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path


def encode_to_a_huge_height(d):
    write_clip(d / "v.mp4", 5, 32)
    argv = ["encode", d / "v.mp4", "-m", d / "teacher.safetensors", "-o", d / "o.pt", "-q", "--height", "80000"]
    return argv, "--height", d / "o.pt"


def encode_one_4k_frame(d):
    write_clip(d / "v.mp4", 1, 4096)
    argv = ["encode", d / "v.mp4", "-m", d / "teacher.safetensors", "-o", d / "o.pt", "-q"]
    return argv, "lower --height/--width", d / "o.pt"


def prune_args(d: Path, *extra) -> list:
    return ["prune", "-t", d / "teacher.safetensors", "-o", d / "s2", "--preset", "flash-wan2.1", "-q", *extra]


def prune_a_hundred_million_clips(d):
    return prune_args(d, "--calib-clips", "100000000"), "--calib-clips", d / "s2"


def prune_huge_calibration_size(d):
    return prune_args(d, "--calib-size", "8192"), "--calib-size", d / "s2"


def prune_huge_calibration_length(d):
    return prune_args(d, "--calib-frames", "400001"), "--calib-frames", d / "s2"


def evaluate_args(d: Path, *extra) -> list:
    return ["evaluate", "-m", d / "student", "-t", d / "teacher.safetensors", "-d", "synthetic", "-q", *extra]


def evaluate_huge_size(d):
    return evaluate_args(d, "--size", "8192"), "--size", None


def evaluate_huge_length(d):
    return evaluate_args(d, "--frames", "400001"), "--frames", None


def demo_huge_height(d):
    return ["demo", "-o", d / "demo", "-q", "--height", "16384", "--width", "16384"], "--height", d / "demo"


def demo_huge_length(d):
    return ["demo", "-o", d / "demo", "-q", "--frames", "400001"], "--frames", d / "demo"


def export_traced_at_a_huge_size(d):
    argv = ["export", d / "student", "-o", d / "e2", "--chunk", "1", "--height", "32768", "--width", "32768"]
    return argv, "tracing the export", d / "e2"


def ltx_diffusers_config_with_65536_layers(d):
    shutil.copytree(d / "ltx_dd", d / "ltx")  # the world's LTX teacher in diffusers' layout
    config = json.loads((d / "ltx" / "config.json").read_text())
    config["decoder_layers_per_block"] = [65536] * len(config["decoder_layers_per_block"])
    (d / "ltx" / "config.json").write_text(json.dumps(config))
    return ["info", d / "ltx"], "decoder_layers_per_block must hold integers in [0, 64]", None


BOUNDED = {
    f.__name__: f
    for f in (
        zero_stride_latents,
        zero_stride_checkpoint,
        compressed_torch_file,
        npy_header_larger_than_its_data,
        video_larger_than_memory,
        attention_at_latent_resolution,
        chunk_too_large_for_memory,
        encode_to_a_huge_height,
        encode_one_4k_frame,
        prune_a_hundred_million_clips,
        prune_huge_calibration_size,
        prune_huge_calibration_length,
        evaluate_huge_size,
        evaluate_huge_length,
        demo_huge_height,
        demo_huge_length,
        ltx_diffusers_config_with_65536_layers,
        export_traced_at_a_huge_size,
    )
}


RUN_JOBS = """
import json, os, sys, time
from typer.testing import CliRunner
from flashvaed.cli import app
results, base = {}, dict(os.environ)
for job in json.load(open(sys.argv[1])):
    os.environ.clear()
    os.environ.update({**base, **job["env"]})
    start = time.monotonic()
    r = CliRunner().invoke(app, job["argv"])
    results[job["name"]] = {"code": r.exit_code, "output": r.output, "seconds": time.monotonic() - start}
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def bounded(hostile_world, tmp_path_factory) -> dict[str, tuple[dict, str, Path | None]]:
    """Every BOUNDED case, run in one process under the address-space limit (one torch import, not
    one per case): name -> (its result, the needle, the output path)."""
    root = tmp_path_factory.mktemp("bounded")
    jobs, expected = [], {}
    for name, make in BOUNDED.items():
        d = shutil.copytree(hostile_world, root / name, symlinks=True)
        argv, needle, out, *env = make(d)
        jobs.append({"name": name, "argv": [str(a) for a in argv], "env": env[0] if env else {}})
        expected[name] = (needle, out)
    (root / "jobs.json").write_text(json.dumps(jobs))
    r = run_limited_script(RUN_JOBS, root / "jobs.json", root / "results.json", timeout=60 * len(jobs))
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((root / "results.json").read_text())
    return {name: (results[name], *expected[name]) for name in BOUNDED}


def run_limited_script(script: str, *args: Path, timeout: float) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    env = {**os.environ, "FLASHVAED_MEMORY_LIMIT": str(LIMIT)}
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(BOUNDED))
def test_unbounded_cost_is_refused_before_allocation(bounded, name):
    result, needle, out = bounded[name]
    assert_refused(result["output"], result["code"], needle, out, None)
    assert result["seconds"] < 30


# ---------------------------------------------------------------------------------------------
# special files are refused unopened (a FIFO would block forever)
# ---------------------------------------------------------------------------------------------
def fifo_model(d):
    os.mkfifo(d / "f.pth")
    return ["info", d / "f.pth"]


def fifo_latents(d):
    os.mkfifo(d / "fifo.pt")
    return decode_to(d, "fifo.pt")


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
        (["info", "t.safetensors", "--height", "1e30"], "--height"),
        (["decode", "z.pt", "-m", "t", "-o", "o.mp4", "--fps", "1e14"], "--fps"),
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
    (aside / "manifest.json").write_text('{"format": "ours"}')
    stale = tmp_path / ".out.999999999-89abcdef.tmp"
    stale.mkdir()
    (stale / "half.onnx").write_text("partial")
    (stale / PARTIAL).touch()
    alive = tmp_path / f".out.{os.getppid()}-00000000.tmp"  # a live writer's: left alone
    alive.mkdir()
    clean_stale(final, replaceable=lambda p: json_format(p / "manifest.json") == "ours")
    assert json_format(final / "manifest.json") == "ours"
    assert not aside.exists() and not stale.exists() and alive.exists()


@pytest.mark.parametrize("target_exists", [False, True])
def test_planted_folders_named_like_temporaries_are_left_alone(tmp_path, target_exists):
    """Cleanup judges a stale folder by our marker, not by its name: a planted ``.NAME.PID-HEX.old``
    never lands on the target, a planted ``.tmp`` is never deleted."""
    final = tmp_path / "out"
    if target_exists:
        final.mkdir()
        (final / "manifest.json").write_text('{"format": "ours"}')
    planted = {}
    for kind in ("old", "tmp"):
        planted[kind] = tmp_path / f".out.999999999-0123abc{kind[0]}.{kind}"
        planted[kind].mkdir()
        (planted[kind] / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    with atomic_output(final, directory=True, replaceable=lambda p: json_format(p / "manifest.json") == "ours") as tmp:
        (tmp / "manifest.json").write_text('{"format": "ours"}')
    after = snapshot(tmp_path)
    for kind, folder in planted.items():
        assert (folder / "thesis.tex").read_text() == "years of work", kind
    assert {k: v for k, v in after.items() if "thesis" in k} == {k: v for k, v in before.items() if "thesis" in k}
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json"]


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


# ---------------------------------------------------------------------------------------------
# a full disk: one line naming the device and the output, its own exit code, nothing left over
# ---------------------------------------------------------------------------------------------
DISK_FULL = 74  # docs/cli.md, "Exit codes"


def run_on_a_full_disk(d: Path, argv: list, out: str, kib: int = 16) -> tuple[subprocess.CompletedProcess, str]:
    """Run the CLI with its output on a fresh ``kib``-KiB tmpfs (a private mount namespace)."""
    mount = d / "small"
    mount.mkdir()
    script = (
        f'mount -t tmpfs -o size={kib}k none "{mount}" || exit 99\n'
        '"$@"; code=$?\n'
        f'echo "LEFT:$(ls -A "{mount}" | tr "\\n" " ")"\n'
        "exit $code\n"
    )
    args = [str(a) for a in argv] + ["-o", str(mount / out)]
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", *CLI, *args], capture_output=True, text=True, timeout=180
    )
    if r.returncode == 99 or "unshare:" in r.stderr:
        pytest.skip(f"no private tmpfs mounts here: {r.stderr.strip()[:200]}")
    left = r.stdout.rpartition("LEFT:")[2].strip()
    return r, left


FULL_DISK_DECODES = ("frames.safetensors", "clip.mp4", "frames")  # each writer of `decode`


@pytest.fixture(scope="module")
def full_disk_decodes(hostile_world, tmp_path_factory) -> dict[str, tuple[dict, Path, str]]:
    """`decode` into each FULL_DISK_DECODES output on its own fresh 16-KiB tmpfs, every case in one
    process (one torch import; RUN_JOBS) in one private mount namespace: name -> (its result, the
    output path, what its tmpfs held afterwards). The real console script meets a full disk in
    test_a_full_disk_is_one_line_and_leaves_nothing[export]."""
    root = tmp_path_factory.mktemp("full-disk")
    jobs, mounts = [], {}
    for i, out in enumerate(FULL_DISK_DECODES):
        d = shutil.copytree(hostile_world, root / f"w{i}", symlinks=True)
        torch.save({"latents": torch.randn(1, 16, 3, 16, 16)}, d / "wide.pt")
        mounts[out] = d / "small"
        mounts[out].mkdir()
        argv = ["decode", d / "wide.pt", "-m", d / "teacher.safetensors", "-q", "-o", mounts[out] / out]
        jobs.append({"name": out, "argv": [str(a) for a in argv], "env": {}})
    (root / "jobs.json").write_text(json.dumps(jobs))
    script = "".join(f'mount -t tmpfs -o size=16k none "{m}" || exit 99\n' for m in mounts.values())
    script += '"$@"; code=$?\n'
    script += "".join(f'echo "LEFT {out}:$(ls -A "{m}" | tr "\\n" " ")"\n' for out, m in mounts.items())
    script += "exit $code\n"
    run = [sys.executable, "-c", RUN_JOBS, str(root / "jobs.json"), str(root / "results.json")]
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *run], capture_output=True, text=True, timeout=300)
    if r.returncode == 99 or "unshare:" in r.stderr:
        pytest.skip(f"no private tmpfs mounts here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((root / "results.json").read_text())
    left = {line.partition(":")[0][5:]: line.partition(":")[2].strip() for line in r.stdout.splitlines()}
    return {out: (results[out], mounts[out] / out, left[out]) for out in FULL_DISK_DECODES}


def assert_full_disk_refusal(code: int, output: str, out: Path, left: str) -> None:
    lines = output.strip().splitlines()
    assert code == DISK_FULL, output
    assert len(lines) == 1 and lines[0].startswith("error: no space left on "), output
    assert f"while writing {out}" in lines[0], lines[0]
    assert left == "", f"left behind: {left}"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private tmpfs")
@pytest.mark.parametrize("out", FULL_DISK_DECODES)
def test_a_full_disk_is_one_line_and_leaves_nothing(full_disk_decodes, out):
    result, path, left = full_disk_decodes[out]
    assert_full_disk_refusal(result["code"], result["output"], path, left)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a private tmpfs")
def test_a_full_disk_is_one_line_and_leaves_nothing_export(d):
    """The real console script (its own process, stderr alone: export prints progress on stdout)."""
    argv = ["export", d / "student", "--chunk", "1", "--height", "32", "--width", "32"]
    r, left = run_on_a_full_disk(d, argv, "export")
    assert_full_disk_refusal(r.returncode, r.stderr, d / "small" / "export", left)


def test_a_full_disk_in_any_writer_is_reported_the_same(d, monkeypatch):
    """However a library words ENOSPC (torch: "file write failed"), it reads the same."""
    from PIL import Image

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    r = runner.invoke(app, [str(a) for a in decode_to(d, "z.pt", "frames")])
    assert r.exit_code == DISK_FULL, r.output
    assert r.output.strip().startswith("error: no space left on ") and len(r.output.strip().splitlines()) == 1
    assert not (d / "frames").exists() and not [p for p in d.iterdir() if p.name.startswith(".frames.")]


# ---------------------------------------------------------------------------------------------
# the drop-in refuses what the CLI refuses, in the same words, as Python's own exceptions
# ---------------------------------------------------------------------------------------------
DROP_IN_LATENTS = {  # name: (latents, exception, words), each also written to a file for the CLI where it can be
    "rank": (lambda: torch.zeros(1, 16, 4, 4), ValueError, "latents must have 5 dimensions"),
    "channels": (lambda: torch.zeros(1, 3, 2, 4, 4), ValueError, "channels but the model reads 16"),
    "integers": (lambda: torch.zeros(1, 16, 2, 4, 4, dtype=torch.int64), ValueError, "must be floating point"),
    "complex": (lambda: torch.zeros(1, 16, 2, 4, 4, dtype=torch.complex64), ValueError, "must be floating point"),
    "nan": (lambda: torch.full((1, 16, 2, 4, 4), float("nan")), ValueError, "NaN or Inf"),
    "inf": (lambda: torch.full((1, 16, 2, 4, 4), float("inf")), ValueError, "NaN or Inf"),
    "meta": (lambda: torch.zeros(1, 16, 2, 4, 4, device="meta"), ValueError, "meta device"),
    "stride_zero": (lambda: torch.zeros(1).expand(1, 16, 2000, 800, 800), ValueError, "would expand"),
    "over_budget": (lambda: torch.zeros(1, 16, 1, 256, 256), ValueError, "would need"),
    "not_a_tensor": (lambda: [[0.0] * 4] * 4, TypeError, "must be a torch tensor"),
    "numpy": (lambda: np.zeros((1, 16, 2, 4, 4), np.float32), TypeError, "must be a torch tensor"),
}
CLI_CAN_SAY = ("rank", "channels", "integers", "nan", "inf")


@pytest.fixture(scope="module")
def drop_in(hostile_world):
    from flashvaed.diffusers import FlashVAE

    return FlashVAE.from_pretrained(hostile_world / "teacher.safetensors", device="cpu")


@pytest.mark.parametrize("name", list(DROP_IN_LATENTS))
def test_flashvae_decode_refuses_like_the_cli(drop_in, d, monkeypatch, name):
    make, exception, words = DROP_IN_LATENTS[name]
    monkeypatch.setenv("FLASHVAED_MEMORY_LIMIT", str(LIMIT))
    with pytest.raises(exception, match=words) as caught:
        drop_in.decode(make(), return_dict=False)
    assert type(caught.value) is exception  # a plain ValueError/TypeError, no foreign torch error
    if name in CLI_CAN_SAY:
        torch.save({"latents": make()}, d / "bad.pt")
        r = runner.invoke(app, [str(a) for a in decode_to(d, "bad.pt")])
        assert r.exit_code == 2 and r.output.strip() == f"error: {caught.value}", (r.output, caught.value)


# What used to fail and must work is in test_fuzz_ltx.py (the 0.9.0 teacher at the width floor pruned
# with flash-ltx from the command line; every teacher, the embedded ones too, through every layout,
# the diffusers one included) and test_fuzz_export.py (every precision x plugin mode).
