"""Configurations and manifests that lie (issue 20, item 7): each is refused where it is read, in
one line naming the field, with exit 2 and the output path untouched, never accepted.

Latent statistics (a zero or negative std, NaN, the wrong length, a string for a list) in every
place they come from: a .safetensors file's metadata, a diffusers config.json, a student's
config.json, LTX statistics tensors and an engine manifest; manifests naming an unknown family or
holding ONNX Runtime settings it would choke on; metadata JSON nested past Python's recursion limit.
Conventions and the world tampered with: tests/hostile.py, shared with test_fuzz.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import assert_case_refused, tamper_json, tamper_manifest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flashvaed.cli import app

runner = CliRunner()
NESTED = "[" * 100000 + "]" * 100000  # json.loads recurses once per bracket


@pytest.fixture
def d(hostile_copy: Path) -> Path:
    return hostile_copy


def tamper_metadata(path: Path, key: str, change: Callable[[dict], object] | str) -> None:
    """Rewrite the JSON in metadata ``key`` of a .safetensors file (or replace it by a string)."""
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
    if isinstance(change, str):
        metadata[key] = change
    else:
        data = json.loads(metadata[key])
        change(data)
        metadata[key] = json.dumps(data)
    save_file(load_file(str(path)), str(path), metadata=metadata)


def tamper_tensor(path: Path, key: str, value: torch.Tensor) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors[key] = value
    save_file(tensors, str(path), metadata=metadata)


def put(key: str, value: object, index: int | None = None) -> Callable[[dict], None]:
    """A change setting ``data[key]`` (or its entry ``index``) to ``value``."""

    def change(data: dict) -> None:
        if index is None:
            data[key] = value
        else:
            data[key][index] = value

    return change


def encode(d: Path, model: str, needle: str, frames: str = "f.pt") -> tuple[list, str, Path]:
    return ["encode", d / frames, "-m", d / model, "-o", d / "o.pt", "-q"], needle, d / "o.pt"


def decode(d: Path, model: str, needle: str) -> tuple[list, str, Path]:
    return ["decode", d / "z.pt", "-m", d / model, "-o", d / "o.mp4", "-q"], needle, d / "o.mp4"


def info(d: Path, model: str, needle: str) -> tuple[list, str, None]:
    return ["info", d / model], needle, None


# ---------------------------------------------------------------------------------------------
# the cases: setup(d) -> (argv, needle, output path or None)
# ---------------------------------------------------------------------------------------------
Case = Callable[[Path], tuple[list, str, "Path | None"]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


# --- latent statistics in a .safetensors file's metadata ---------------------------------------
@case
def encode_with_a_zero_std(d):
    tamper_metadata(d / "teacher.safetensors", "flashvaed.config", put("latents_std", 0.0, 3))
    return encode(d, "teacher.safetensors", "latents_std")


@case
def negative_std(d):
    tamper_metadata(d / "teacher.safetensors", "flashvaed.config", put("latents_std", -1.0, 0))
    return decode(d, "teacher.safetensors", "latents_std")


@case
def nan_std(d):
    tamper_metadata(d / "teacher.safetensors", "flashvaed.config", put("latents_std", float("nan"), 0))
    return info(d, "teacher.safetensors", "latents_std")


@case
def mean_of_three_entries(d):
    tamper_metadata(d / "teacher.safetensors", "flashvaed.config", put("latents_mean", [0.0, 0.0, 0.0]))
    return info(d, "teacher.safetensors", "latents_mean")


@case
def std_as_a_string(d):
    tamper_metadata(d / "teacher.safetensors", "flashvaed.config", put("latents_std", "1" * 16))
    return info(d, "teacher.safetensors", "latents_std")


@case
def metadata_nested_past_the_recursion_limit(d):
    tamper_metadata(d / "teacher.safetensors", "flashvaed.config", NESTED)
    return info(d, "teacher.safetensors", "flashvaed.config")


@case
def metadata_of_an_unknown_family(d):
    tamper_metadata(d / "teacher.safetensors", "flashvaed.family", "sd3")
    return info(d, "teacher.safetensors", "flashvaed.family")


# --- latent statistics in a diffusers config.json ----------------------------------------------
@case
def diffusers_encode_with_a_zero_std(d):
    tamper_json(d / "dd" / "config.json", put("latents_std", 0.0, 15))
    return encode(d, "dd", "latents_std")


@case
def diffusers_mean_of_three_entries(d):
    tamper_json(d / "dd" / "config.json", put("latents_mean", [0.1, 0.2, 0.3]))
    return info(d, "dd", "latents_mean")


@case
def diffusers_infinite_std(d):
    tamper_json(d / "dd" / "config.json", put("latents_std", float("inf"), 2))
    return decode(d, "dd", "latents_std")


@case
def diffusers_std_that_float32_rounds_to_zero(d):
    tamper_json(d / "dd" / "config.json", put("latents_std", 1e-50, 4))
    return encode(d, "dd", "latents_std")


@case
def diffusers_std_as_a_mapping(d):
    tamper_json(d / "dd" / "config.json", put("latents_std", {"0": 1.0}))
    return info(d, "dd", "latents_std")


@case
def diffusers_z_dim_contradicts_the_shapes(d):
    tamper_json(d / "dd" / "config.json", put("z_dim", 32))
    return info(d, "dd", "z_dim")


@case
def diffusers_mean_without_std(d):
    tamper_json(d / "dd" / "config.json", lambda c: c.pop("latents_std"))
    return info(d, "dd", "latents_std")


# --- the teacher's configuration inside a student's config.json ----------------------------------
@case
def student_with_a_zero_std(d):
    tamper_json(d / "student" / "config.json", lambda c: c["teacher"]["latents_std"].__setitem__(0, 0.0))
    return decode(d, "student", "latents_std")


@case
def student_channel_map_past_the_teacher(d):
    def past(c: dict) -> None:
        kept = c["teacher_channels"]["up.1"]
        kept[-1] = 4096  # the teacher's stage is far narrower

    tamper_json(d / "student" / "config.json", past)
    return decode(d, "student", "teacher_channels")


@case
def student_channel_map_repeating_a_channel(d):
    def repeat(c: dict) -> None:
        kept = c["teacher_channels"]["up.1"]
        kept[1] = kept[0]

    tamper_json(d / "student" / "config.json", repeat)
    return info(d, "student", "distinct channels")


@case
def student_mean_of_three_entries(d):
    tamper_json(d / "student" / "config.json", lambda c: c["teacher"].update(latents_mean=[0.0, 1.0, 2.0]))
    return info(d, "student", "latents_mean")


@case
def student_std_as_a_string(d):
    tamper_json(d / "student" / "config.json", lambda c: c["teacher"].update(latents_std="1" * 16))
    return decode(d, "student", "latents_std")


@case
def student_teacher_negative_z_dim(d):
    tamper_json(d / "student" / "config.json", lambda c: c["teacher"].update(z_dim=-16))
    return info(d, "student", "z_dim")


@case
def student_teacher_base_dim_a_string(d):
    tamper_json(d / "student" / "config.json", lambda c: c["teacher"].update(base_dim="96"))
    return info(d, "student", "base_dim")


@case
def student_teacher_dim_mult_a_string(d):
    tamper_json(d / "student" / "config.json", lambda c: c["teacher"].update(dim_mult="1244"))
    return info(d, "student", "dim_mult")


@case
def student_teacher_not_a_mapping(d):
    tamper_json(d / "student" / "config.json", lambda c: c.update(teacher=[1, 2]))
    return info(d, "student", "teacher")


@case
def student_teacher_channels_a_string(d):
    tamper_json(d / "student" / "config.json", lambda c: c.update(teacher_channels="all"))
    return info(d, "student", "teacher_channels")


@case
def student_version_a_string(d):
    tamper_json(d / "student" / "config.json", lambda c: c.update(version="2"))
    return decode(d, "student", "version")


# --- LTX: its configuration in our metadata, its statistics as tensors ---------------------------
@case
def ltx_encode_with_a_zero_std(d):
    tamper_metadata(d / "ltx.safetensors", "flashvaed.config", put("latents_std", 0.0, 5))
    return encode(d, "ltx.safetensors", "latents_std", "ltx_f.pt")


@case
def ltx_mean_of_three_entries(d):
    tamper_metadata(d / "ltx.safetensors", "flashvaed.config", put("latents_mean", [0.0, 0.0, 0.0]))
    return info(d, "ltx.safetensors", "latents_mean")


@case
def ltx_std_as_a_string(d):
    tamper_metadata(d / "ltx.safetensors", "flashvaed.config", put("latents_std", "1" * 128))
    return info(d, "ltx.safetensors", "latents_std")


@case
def ltx_metadata_nested_past_the_recursion_limit(d):
    tamper_metadata(d / "ltx.safetensors", "flashvaed.config", NESTED)
    return info(d, "ltx.safetensors", "flashvaed.config")


@case
def ltx_negative_patch_size(d):
    tamper_metadata(d / "ltx.safetensors", "flashvaed.config", put("patch_size", -4))
    return info(d, "ltx.safetensors", "patch_size")


@case
def ltx_blocks_as_a_string(d):
    tamper_metadata(d / "ltx.safetensors", "flashvaed.config", put("decoder_blocks", "res_x"))
    return info(d, "ltx.safetensors", "decoder_blocks")


@case
def ltx_original_config_nested_past_the_recursion_limit(d):
    tamper_metadata(d / "ltx_original.safetensors", "config", NESTED)
    return info(d, "ltx_original.safetensors", "config")


@case
def ltx_original_zero_std_tensor(d):
    key = "vae.per_channel_statistics.std-of-means"
    tamper_tensor(d / "ltx_original.safetensors", key, torch.zeros(128))
    return encode(d, "ltx_original.safetensors", "std-of-means", "ltx_f.pt")


@case
def ltx_diffusers_zero_std_tensor(d):
    std = torch.ones(128)
    std[7] = 0.0
    tamper_tensor(d / "ltx_dd" / "diffusion_pytorch_model.safetensors", "latents_std", std)
    return info(d, "ltx_dd", "latents_std")


@case
def ltx_diffusers_mean_tensor_of_three(d):
    tamper_tensor(d / "ltx_dd" / "diffusion_pytorch_model.safetensors", "latents_mean", torch.zeros(3))
    return info(d, "ltx_dd", "latents_mean")


# --- engine and export manifests ----------------------------------------------------------------
@case
def engine_of_an_unknown_family(d):
    tamper_manifest(d, lambda m: m["model"].update(family="sd3"))
    return info(d, "engine", "family")


@case
def export_of_an_unknown_family(d):
    tamper_manifest(d, lambda m: m["model"].update(family="sd3"), "export")
    return decode(d, "export", "family")


@case
def engine_family_a_list(d):
    tamper_manifest(d, lambda m: m["model"].update(family=["wan2.1"]))
    return decode(d, "engine", "family")


@case
def engine_zero_std(d):
    tamper_manifest(d, lambda m: m["model"]["latents_std"].__setitem__(0, 0.0))
    return info(d, "engine", "latents_std")


@case
def engine_mean_of_three_entries(d):
    tamper_manifest(d, lambda m: m["model"].update(latents_mean=[0.0, 0.0, 0.0]))
    return decode(d, "engine", "latents_mean")


@case
def engine_source_not_a_string(d):
    tamper_manifest(d, lambda m: m["model"].update(source={"x": 1}))
    return info(d, "engine", "source")


@case
def engine_provider_as_a_nested_list(d):
    tamper_manifest(d, lambda m: m["backend"].update(providers=[["CPUExecutionProvider"]]))
    return decode(d, "engine", "providers")


@case
def engine_providers_as_a_string(d):
    tamper_manifest(d, lambda m: m["backend"].update(providers="CPUExecutionProvider"))
    return info(d, "engine", "providers")


@case
def tensorrt_engine_providers_not_names(d):
    tamper_manifest(d, lambda m: m["backend"].update(name="tensorrt", providers=[1, 2]))
    return info(d, "engine", "providers")


@case
def engine_unknown_provider(d):
    tamper_manifest(d, lambda m: m["backend"].update(providers=["NoSuchExecutionProvider"]))
    return info(d, "engine", "NoSuchExecutionProvider")


@case
def engine_unknown_optimization_level(d):
    tamper_manifest(d, lambda m: m["backend"]["session_options"].update(graph_optimization_level="ORT_FASTEST"))
    return info(d, "engine", "graph_optimization_level")


@case
def engine_negative_threads(d):
    tamper_manifest(d, lambda m: m["backend"]["session_options"].update(intra_op_num_threads=-1))
    return decode(d, "engine", "intra_op_num_threads")


@case
def engine_threads_a_string_in_validate(d):
    tamper_manifest(d, lambda m: m["backend"]["session_options"].update(intra_op_num_threads="4"))
    return ["validate", d / "engine", "-r", d / "student", "-l", d / "z.pt"], "intra_op_num_threads", None


@case
def engine_session_options_a_list(d):
    tamper_manifest(d, lambda m: m["backend"].update(session_options=["ORT_ENABLE_ALL"]))
    return info(d, "engine", "session_options")


@case
def engine_backend_name_a_list(d):
    tamper_manifest(d, lambda m: m["backend"].update(name=["onnxruntime"]))
    return decode(d, "engine", "backend")


@case
def engine_opset_a_fraction(d):
    tamper_manifest(d, lambda m: m.update(opset=17.5))
    return info(d, "engine", "opset")


@case
def engine_default_timestep_a_string(d):
    tamper_manifest(d, lambda m: m["model"].update(default_timestep="late"))
    return decode(d, "engine", "default_timestep")


@case
def engine_of_an_unknown_backend(d):
    tamper_manifest(d, lambda m: m["backend"].update(name="tvm"))
    return info(d, "engine", "backend.name")


@pytest.mark.parametrize("name", list(CASES))
def test_a_lying_config_is_refused_in_one_line(d, name):
    assert_case_refused(CASES[name], d)


def test_refusals_name_the_file(d):
    """The one line says which file lies, not only which field."""
    tamper_metadata(d / "teacher.safetensors", "flashvaed.config", put("latents_std", 0.0, 3))
    tamper_json(d / "student" / "config.json", lambda c: c["teacher"].update(latents_mean=[0.0]))
    tamper_manifest(d, lambda m: m["model"].update(family="sd3"))
    for model, name in (
        ("teacher.safetensors", "teacher.safetensors"),
        ("student", "config.json"),
        ("engine", "manifest.json"),
    ):
        r = runner.invoke(app, ["info", str(d / model)])
        assert r.exit_code == 2 and name in r.output, r.output


def test_the_untampered_world_loads(hostile_world):
    """The cases fail for what they change: every file they start from is accepted."""
    for model in (
        "teacher.safetensors",
        "dd",
        "ltx.safetensors",
        "ltx_dd",
        "ltx_original.safetensors",
        "student",
        "engine",
    ):
        r = runner.invoke(app, ["info", str(hostile_world / model)])
        assert r.exit_code == 0, (model, r.output)
