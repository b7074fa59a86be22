"""Families as modules: the registry, the seams everything downstream relies on, and the errors
for models, students and latents of different families."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from flashvaed import api
from flashvaed.cli import app
from flashvaed.errors import CheckpointError, InputError
from flashvaed.models import StudentSpec, Wan22Config, WanConfig, families, load_model, save_student, save_teacher
from flashvaed.models.student import build_student, preset_names
from flashvaed.prune.groups import channel_graph

runner = CliRunner()
CONFIGS = {"wan2.1": WanConfig(base_dim=8), "wan2.2": Wan22Config(base_dim=8, decoder_base_dim=8)}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_registry_and_configs_round_trip():
    from flashvaed.models.families.ltx import LTXConfig

    names = families.names()
    # every family registers itself on import: a new one joins the list without edits here
    assert [n for n in names if n in ("wan2.1", "wan2.2", "ltx")] == ["wan2.1", "wan2.2", "ltx"]
    assert len(set(names)) == len(names) and all(families.get(n).name == n for n in names)
    for name in names:  # every family's tiny teacher configuration round-trips through JSON
        family = families.get(name)
        tiny = family.tiny_config()
        assert family.config_from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny, name
    configs = {**CONFIGS, "ltx": LTXConfig.released("0.9.1", decoder_base=8, encoder_base=8)}
    for name, config in configs.items():
        family = families.get(name)
        assert family.config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
        with torch.device("meta"):
            assert family.teacher_type(config).family == name
        assert {f"flash-{name}", f"lite-{name}"} <= set(preset_names(name))
    with pytest.raises(CheckpointError, match="unknown model family 'hunyuan'"):
        families.get("hunyuan")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_channel_spaces_agree_with_the_channel_groups(name):
    """Two declarations of the same fact: the teacher layout's channel spaces (what students must keep
    equal) and the groups the generic pass finds from the blocks' couplings."""
    family = families.get(name)
    teacher = family.teacher_type(CONFIGS[name])
    layout = family.teacher_layout(CONFIGS[name])
    graph = channel_graph(teacher.decoder)

    def group_of(role: str, path: str):
        for g in graph.groups:
            if (role == "producer" and any(p == path for p, _ in g.producers)) or (
                role == "consumer" and path in g.consumers
            ):
                return g
        raise AssertionError(path)

    fields = {"middle.width": group_of("producer", "decoder.middle.blocks.2.conv2")}
    for i, st in enumerate(layout.up):
        fields[f"up.{i}.in_width"] = group_of("consumer", f"decoder.up.{i}.blocks.0.conv1")
        fields[f"up.{i}.width"] = group_of("producer", f"decoder.up.{i}.blocks.{len(st.hidden) - 1}.conv2")
        if st.resample_width is not None:
            fields[f"up.{i}.resample_width"] = group_of("producer", f"decoder.up.{i}.resample.conv")
    assert set(fields) == set(layout.spaces)
    for a in fields:
        for b in fields:
            assert (layout.spaces[a] == layout.spaces[b]) == (fields[a] is fields[b]), (a, b)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, teacher_8, wan22_teacher_8):
    d = tmp_path_factory.mktemp("families")
    save_teacher(teacher_8, d / "wan21.pth", "original")
    save_teacher(wan22_teacher_8, d / "wan22.pth", "original")
    for name, teacher in (("wan2.1", teacher_8), ("wan2.2", wan22_teacher_8)):
        student, _ = build_student(StudentSpec.load(f"lite-{name}"), teacher.config)
        save_student(student, d / f"student-{name}")
    torch.save({"latents": torch.randn(1, 16, 2, 2, 2)}, d / "z16.pt")
    return d


@pytest.mark.parametrize(
    "student, teacher",
    [("student-wan2.1", "wan22.pth"), ("student-wan2.2", "wan21.pth")],
    ids=["wan21-student-wan22-teacher", "wan22-student-wan21-teacher"],
)
@pytest.mark.parametrize("command", ["evaluate", "distill"])
def test_student_of_another_family_is_refused(mixed, student, teacher, command):
    d = mixed
    args = ["-d", "synthetic", "-q"] + (["-o", d / "run"] if command == "distill" else [])
    flag = "-m" if command == "evaluate" else "-s"
    r = invoke(command, flag, d / student, "-t", d / teacher, *args)
    assert r.exit_code == 2, r.output
    mine, theirs = ("wan2.1", "wan2.2") if student.endswith("2.1") else ("wan2.2", "wan2.1")
    assert r.output.strip() == f"error: the student is for {mine} teachers, the teacher is {theirs}"
    assert not (d / "run").exists()


def test_preset_of_another_family_is_refused(mixed):
    r = invoke("prune", "-t", mixed / "wan21.pth", "--preset", "flash-wan2.2", "-o", mixed / "x", "-q")
    assert r.exit_code == 2 and r.output.strip() == "error: student 'flash-wan2.2' is for wan2.2 teachers, not wan2.1"


def test_latents_of_another_family_are_refused(mixed):
    for model in ("wan22.pth", "student-wan2.2"):
        r = invoke("decode", mixed / "z16.pt", "-m", mixed / model, "-o", mixed / "out.mp4", "-q")
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: latents have 16 channels but the model reads 48")
        assert len(r.output.strip().splitlines()) == 1 and not (mixed / "out.mp4").exists()


def test_student_directory_of_an_unknown_family(mixed, tmp_path):
    import shutil

    shutil.copytree(mixed / "student-wan2.2", tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["family"] = "hunyuan"
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown model family 'hunyuan'"):
        load_model(tmp_path / "s")


def test_library_errors_name_parameters_the_cli_names_flags(mixed):
    with pytest.raises(InputError) as e:
        api.decode(mixed / "z16.pt", mixed / "wan21.pth", mixed / "o.pt", chunk=0)
    assert str(e.value) == "chunk must be at least 1, got 0"
    r = invoke("decode", mixed / "z16.pt", "-m", mixed / "wan21.pth", "-o", mixed / "o.pt", "--chunk", 0)
    assert r.exit_code == 2 and r.output.strip() == "error: --chunk must be at least 1, got 0"
    with pytest.raises(InputError, match=r"^give exactly one of preset or config$"):
        api.prune(mixed / "wan21.pth", mixed / "x")


def test_the_cli_imports_no_runtime_until_a_command_runs():
    """`flashvaed --help` must stay instant: no torch, onnx, onnxruntime or polygraphy behind it."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flashvaed.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0 and 'decode' in r.output\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'polygraphy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_checkpoint_mixing_layouts_is_one_line_exit_2(mixed, tmp_path):
    state = torch.load(mixed / "wan22.pth", weights_only=True)
    state["decoder.upsamples.7.time_conv.weight"] = torch.zeros(1)  # a Wan2.1 (flat) key
    torch.save(state, tmp_path / "mixed.pth")
    torch.save({"latents": torch.randn(1, 48, 2, 2, 2)}, tmp_path / "z48.pt")
    r = invoke("decode", tmp_path / "z48.pt", "-m", tmp_path / "mixed.pth", "-o", tmp_path / "o.pt", "-q")
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert (
        len(lines) == 1
        and "mixes checkpoint layouts: Wan2.1 VAE original" in lines[0]
        and "Wan2.2 VAE original" in lines[0]
    )
    assert not (tmp_path / "o.pt").exists()
