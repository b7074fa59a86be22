"""A command line that explains itself: --version, -h, capitals in usage, examples that parse,
progress that reaches a log file, no temporary path recorded as a source."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

import flashvaed
from flashvaed import api
from flashvaed.atomic import TEMP, atomic_output, final_path, temp_sibling
from flashvaed.cli import app
from flashvaed.distill.trainer import Distiller
from flashvaed.models import save_teacher
from flashvaed.progress import LogLines, progress_bar, track

runner = CliRunner()
GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)  # type: ignore[attr-defined]
TEMP_NAME = re.compile(r"\.\d+-[0-9a-f]{8}\.tmp")
TYPE_NOISE = re.compile(r"<[a-z\[\]]+>|\{[a-z_]+\}|list\[")


def help_of(*args: str) -> str:
    r = runner.invoke(app, [*args], terminal_width=100)
    assert r.exit_code == 0, r.output
    return r.output


def test_every_command_is_covered():
    expected = {"info", "decode", "encode", "convert", "prune", "distill", "evaluate", "export"}
    expected |= {"build-engine", "validate", "bench", "demo"}
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_names_values_in_capitals_and_ends_with_examples(name):
    text = help_of(name, "--help")
    assert help_of(name, "-h") == text  # -h is --help
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: flashvaed {name} [OPTIONS]"), usage
    for piece in usage.split()[4:]:  # the arguments: capitals, [optional], ... for several
        assert re.fullmatch(r"\[?[A-Z][A-Z_-]*\]?(\.\.\.)?", piece), usage
    assert not TYPE_NOISE.search(text), TYPE_NOISE.search(text)
    examples = text.split("\nExamples:\n", 1)[1].splitlines()
    examples = [e.strip() for e in examples if e.strip()]
    assert 2 <= len(examples) <= 3, text
    assert all(e.startswith(f"flashvaed {name}") for e in examples), examples


def test_option_metavars_are_capitals():
    """Every option that takes a value shows it in capitals (HxW for frame sizes)."""
    for name in COMMANDS:
        command = GROUP.commands[name]  # type: ignore[attr-defined]
        for param in command.params:
            if param.param_type_name == "argument":
                assert re.fullmatch(r"[A-Z][A-Z_-]*", param.metavar), (name, param.name)
            elif not (param.is_flag or param.count):
                assert re.fullmatch(r"[A-Z][A-Z-]*|HxW", param.metavar), (name, param.name, param.metavar)


@pytest.mark.parametrize("name", COMMANDS)
def test_examples_parse(name):
    """The examples name options the command has, with values it accepts (nothing runs)."""
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    for line in command.epilog.splitlines():
        words = shlex.split(line.split("  #")[0])
        assert words[:2] == ["flashvaed", name]
        command.make_context(name, words[2:])


def test_top_level_help_and_version():
    text = help_of("--help")
    assert help_of("-h") == text
    assert "--version" in text and "Examples:" in text
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output == f"flashvaed {flashvaed.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", flashvaed.__version__)


def test_version_is_instant_without_torch():
    """The console script in its own process: --version imports no torch."""
    code = textwrap.dedent(
        """
        import sys, time
        start = time.perf_counter()
        from flashvaed.cli import main
        sys.argv = ["flashvaed", "--version"]
        try:
            main()
        except SystemExit as e:
            code = e.code
        print("torch" in sys.modules, code, time.perf_counter() - start, file=sys.stderr)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    torch_loaded, exit_code, seconds = proc.stderr.split()
    assert proc.stdout == f"flashvaed {flashvaed.__version__}\n"
    assert torch_loaded == "False" and exit_code == "0", proc.stderr
    assert float(seconds) < 5, proc.stderr  # a fraction of a second on an idle machine


# ---------------------------------------------------------------------------------------------
# progress where stderr is not a terminal
# ---------------------------------------------------------------------------------------------
def test_plain_lines_with_step_rate_and_eta(capsys):
    assert list(track(range(4), 4, "encoding", interval=0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("encoding: ") for line in lines), lines
    assert lines[0].startswith("encoding: 1/4 (25%), ") and "eta " in lines[0] and "elapsed " in lines[0]
    assert re.search(r"steps/s|s/step", lines[0]), lines[0]
    assert lines[-1].startswith("encoding: 4/4 (100%)") and lines[-1].endswith("done")


def test_short_work_prints_nothing_and_quiet_nothing_at_all(capsys, monkeypatch):
    monkeypatch.delenv("FLASHVAED_PROGRESS_INTERVAL", raising=False)
    list(track(range(3), 3, "quick"))  # shorter than the interval: no line, not even a blank one
    list(track(range(3), 3, "quiet", enabled=False, interval=0))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("FLASHVAED_PROGRESS_INTERVAL", "0")
    with progress_bar("distill", 3, completed=1, info=True) as bar:  # a resumed run starts at 1
        bar.update(description="distill align", info="loss 0.1")
    err = capsys.readouterr().err
    assert "distill align: 2/3 (67%)" in err and "loss 0.1" in err


def test_failed_work_does_not_say_done(capsys):
    with pytest.raises(RuntimeError), progress_bar("work", 2, interval=0) as bar:
        bar.update()
        raise RuntimeError("boom")
    assert "done" not in capsys.readouterr().err


def test_line_format_over_time():
    p = LogLines("distill", 100, interval=1e9)
    p.completed = 25
    line = p.line(p.start + 50.0)
    assert line == "distill: 25/100 (25%), 2.00 s/step, elapsed 0:00:50, eta 0:02:30", line


@pytest.fixture(scope="module")
def teacher_file(teacher_8, tmp_path_factory):
    d = tmp_path_factory.mktemp("help")
    save_teacher(teacher_8, d / "teacher.pth", "original")
    torch.manual_seed(0)
    torch.save({"latents": torch.randn(1, 16, 3, 2, 2)}, d / "z.pt")
    return d


def test_decode_prune_and_distill_report_progress_in_a_log(teacher_file, monkeypatch):
    """Through the CLI with stderr captured (not a terminal): lines, no blank ones; -q: none."""
    d = teacher_file
    monkeypatch.setenv("FLASHVAED_PROGRESS_INTERVAL", "0")
    decode = ["decode", d / "z.pt", "-m", d / "teacher.pth", "-o", d / "f.pt", "--chunk", "1", "--device", "cpu"]
    r = runner.invoke(app, [str(a) for a in decode])
    assert r.exit_code == 0, r.output
    assert "decoding: 3/3 (100%)" in r.output and "done" in r.output
    r = runner.invoke(app, [str(a) for a in decode] + ["-q"])
    assert r.exit_code == 0 and r.output.startswith("decoded "), r.output

    calib = ["--calib-clips", "1", "--calib-frames", "5", "--calib-size", "16", "--chunk", "1"]
    small = ["--height", "32", "--width", "32", "--device", "cpu"]  # the report's MACs at a small size: cheap
    prune = ["prune", "-t", str(d / "teacher.pth"), "--preset", "flash-wan2.1", "-o", str(d / "student")]
    r = runner.invoke(app, [*prune, *calib, *small])
    assert r.exit_code == 0, r.output
    assert "calibration clips: 1/1 (100%)" in r.output, r.output
    assert "" not in r.output.splitlines() and r.output.splitlines()[-1].startswith("student flash-wan2.1")

    def fake_step(self, step):  # the loop and its reporting, not the training (tests/test_distill.py)
        return self.phase_at(step)[0], 0.5, {}, 1e-3

    monkeypatch.setattr(Distiller, "train_step", fake_step)
    monkeypatch.setattr(Distiller, "held_out_psnr", lambda self, weights=None: 20.0)

    cfg = {"batch_size": 1, "clip_frames": 5, "clip_size": 16, "synthetic_clips": 2, "chunk": 1}
    (d / "distill.yaml").write_text(yaml.safe_dump({**cfg, "checkpoint_every": 100}))
    distill = ["distill", "-t", d / "teacher.pth", "-s", d / "student", "-d", "synthetic", "-o", d / "run"]
    r = runner.invoke(app, [str(a) for a in distill] + ["--config", str(d / "distill.yaml"), "--steps-per-phase", "1"])
    assert r.exit_code == 0, r.output
    steps = [line for line in r.output.splitlines() if line.startswith("distill ")]
    assert [s.split(":")[1].split()[0] for s in steps] == ["1/3", "2/3", "3/3"], r.output
    assert "loss " in steps[0] and "eta " in steps[0] and steps[-1].split(", ")[-2] == "done", steps


def test_export_and_build_engine_report_each_graph(teacher_file, tmp_path, monkeypatch):
    """A full-size teacher traces for minutes: export and build-engine say which graph they are at."""
    d = teacher_file
    monkeypatch.setenv("FLASHVAED_PROGRESS_INTERVAL", "0")
    shapes = ["--chunk", "1:1:2", "--height", "16:16:32", "--width", "16:16:32", "--batch", "1"]
    r = runner.invoke(app, ["export", str(d / "teacher.pth"), "-o", str(tmp_path / "e"), *shapes])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("exporting: ")]
    assert lines[0].startswith("exporting: 0/2 (0%)") and lines[0].endswith("first"), lines  # being traced
    assert lines[1].startswith("exporting: 1/2 (50%)") and lines[1].endswith("steady"), lines
    assert lines[-1].startswith("exporting: 2/2 (100%)") and lines[-1].endswith("done"), lines
    r = runner.invoke(app, ["build-engine", str(tmp_path / "e"), "-o", str(tmp_path / "g"), "-q"])
    assert r.exit_code == 0 and r.output.startswith("built onnxruntime engine"), r.output
    if "CPUExecutionProvider" in r.output.splitlines()[0]:  # where ORT would run on CUDA, no note
        assert "note: chunk, height, width dynamic: on a CPU an export of one" in r.output, r.output
    r = runner.invoke(app, ["build-engine", str(tmp_path / "e"), "-o", str(tmp_path / "g2")])
    assert "building onnxruntime: 2/2 (100%)" in r.output, r.output


# ---------------------------------------------------------------------------------------------
# sources are recorded by their final names
# ---------------------------------------------------------------------------------------------
def test_final_path_drops_temporary_names(tmp_path):
    tmp = temp_sibling(tmp_path / "demo-output", TEMP)
    assert final_path(tmp / "student") == str(tmp_path / "demo-output" / "student")
    assert final_path(temp_sibling(tmp_path / "x.onnx", TEMP)) == str(tmp_path / "x.onnx")
    assert final_path("student/.hidden") == "student/.hidden" and final_path("a.tmp/b") == "a.tmp/b"


def test_export_engine_and_info_written_inside_an_output_name_final_paths(teacher_file, tmp_path):
    """A chain written aside and swapped in (as the demo does) records where things end up."""
    final = tmp_path / "chain"
    with atomic_output(final, directory=True) as tmp:
        (tmp / "teacher.pth").write_bytes((teacher_file / "teacher.pth").read_bytes())
        shapes = {"chunk": "1:1:2", "height": "16:16:32", "width": "16:16:32", "batch": "1:1:1"}
        api.export(tmp / "teacher.pth", tmp / "export", **shapes)
        api.build_engine(tmp / "export", tmp / "engine")
    for kind in ("export", "engine"):
        text = (final / kind / "manifest.json").read_text()
        assert not TEMP_NAME.search(text), kind
        assert json.loads(text)["model"]["source"] == str(final / "teacher.pth")
    assert json.loads((final / "engine" / "manifest.json").read_text())["backend"]["source_export"] == str(
        final / "export"
    )
    r = runner.invoke(app, ["info", str(final / "engine")])
    assert r.exit_code == 0 and not TEMP_NAME.search(r.output), r.output
    r = runner.invoke(app, ["info", str(final / "engine"), "--json"])
    assert json.loads(r.output)["model"]["source"] == str(final / "teacher.pth"), r.output

    # a manifest written before: shown (and rebuilt) with the final name
    manifest = json.loads((final / "export" / "manifest.json").read_text())
    manifest["model"]["source"] = str(temp_sibling(final, TEMP) / "teacher.pth")
    (final / "export" / "manifest.json").write_text(json.dumps(manifest))
    r = runner.invoke(app, ["info", str(final / "export"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["model"]["source"] == str(final / "teacher.pth"), r.output
