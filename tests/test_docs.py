"""Runnable docs: every block of README.md and docs/*.md marked ``runnable`` runs here, so the docs
cannot drift from the code.

The convention (also in docs/architecture.md, "Runnable docs"):
- a fenced block opened by exactly ```` ```bash runnable ```` or ```` ```python runnable ```` runs;
  an HTML comment opened by a line ``<!-- runnable bash`` / ``<!-- runnable python`` and closed by a
  line ``-->`` is hidden setup (fixtures a reader already has), run the same way;
- each file runs in one fresh temporary directory, its blocks in document order; the first failing
  block stops the file and the test names ``FILE:LINE`` with the block's output;
- a bash block is one ``bash -euo pipefail`` script; the python blocks of a file share one namespace
  in one fresh interpreter; ``.venv/bin/flashvaed`` works from the directory (``.venv`` links to
  this interpreter's environment, whose ``bin`` is also on PATH);
- the directory starts with the fixtures ``FIXTURES`` lists: the embedded tiny teachers, as shipped
  and (Wan) in the releases' original layout under the releases' file names, and short clips.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MIN_RUNNABLE_BLOCKS = 8  # the docs hold more; fewer means the marker broke, not that docs got shorter
BLOCK_TIMEOUT_S = 600  # a loaded 2-core machine runs the quick tour in minutes
FIXTURES = {
    "wan21-tiny.safetensors": "the embedded Wan2.1 teacher",
    "wan22-tiny.safetensors": "the embedded Wan2.2 teacher",
    "ltx-tiny.safetensors": "the embedded LTX-Video teacher",
    "mochi-tiny.safetensors": "the embedded Mochi teacher",
    "Wan2.1_VAE.pth": "the embedded Wan2.1 teacher in the release's original layout",
    "Wan2.2_VAE.pth": "the embedded Wan2.2 teacher in the release's original layout",
    "clip.mp4": "9 frames, 64x64, 16 fps",
    "videos/a.mp4": "9 frames, 64x64",
    "videos/b.mp4": "9 frames, 64x64",
}

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(.*)$")  # indented fences too (inside list items)
RUNNABLE_FENCE = re.compile(r"^\s*```(bash|python) runnable$")
HIDDEN_OPEN = re.compile(r"^<!-- runnable (bash|python)$")


@dataclass(frozen=True)
class Block:
    """One runnable block: where it is (1-based line of its opening fence) and what it runs."""

    doc: Path
    line: int
    lang: str
    code: str
    hidden: bool

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


class DocFormatError(ValueError):
    """A doc whose runnable markers are malformed (an unclosed block, a misspelt marker)."""


def parse_blocks(doc: Path) -> list[Block]:
    """The runnable blocks of one Markdown file, in order. A fence that mentions ``run...`` but is not
    exactly a runnable fence is an error, so a typo cannot silently turn a test off."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence and fence.group(2)[0] == "`" and "`" in fence.group(3):
            fence = None  # CommonMark: a backtick fence's info string has no backticks (inline code instead)
        hidden = HIDDEN_OPEN.match(line)
        if fence is None and hidden is None:
            if line.startswith("<!--") and "runnable" in line:
                opening = "'<!-- runnable bash' or '<!-- runnable python'"
                raise DocFormatError(f"{doc.name}:{i + 1}: a runnable comment opens with exactly {opening}")
            i += 1
            continue
        if hidden is not None:
            end = _find(lines, i + 1, lambda s: s.strip() == "-->")
            if end is None:
                raise DocFormatError(f"{doc.name}:{i + 1}: runnable comment never closed by a line '-->'")
            blocks.append(Block(doc, i + 1, hidden.group(1), "\n".join(lines[i + 1 : end]) + "\n", True))
            i = end + 1
            continue
        assert fence is not None
        indent, marker, info = fence.group(1), fence.group(2), fence.group(3)
        if re.search(r"\brun", info) and RUNNABLE_FENCE.match(line) is None:
            fences = "'```bash runnable' or '```python runnable'"
            raise DocFormatError(f"{doc.name}:{i + 1}: runnable fences are exactly {fences}")
        end = _find(lines, i + 1, lambda s, m=marker: s.strip() == m)
        if end is None:
            raise DocFormatError(f"{doc.name}:{i + 1}: code block never closed")
        runnable = RUNNABLE_FENCE.match(line)
        if runnable is not None:
            body = [t[len(indent) :] if t.startswith(indent) else t.lstrip() for t in lines[i + 1 : end]]
            blocks.append(Block(doc, i + 1, runnable.group(1), "\n".join(body) + "\n", False))
        i = end + 1
    return blocks


def _find(lines: list[str], start: int, pred) -> int | None:
    return next((j for j in range(start, len(lines)) if pred(lines[j])), None)


def _all_blocks() -> dict[Path, list[Block]]:
    return {doc: parse_blocks(doc) for doc in DOCS}


BLOCKS = _all_blocks()
RUNNABLE_DOCS = [doc for doc, blocks in BLOCKS.items() if blocks]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files every doc's directory starts with, made once (FIXTURES)."""
    from flashvaed.demo import embedded_teacher_path
    from flashvaed.io import write_video
    from flashvaed.models import load_model, save_teacher
    from flashvaed.synthetic import synthetic_clip

    root = tmp_path_factory.mktemp("docs-fixtures")
    for family in ("wan2.1", "wan2.2", "ltx", "mochi"):
        source = embedded_teacher_path(family)
        shutil.copyfile(source, root / source.name)
    save_teacher(load_model(embedded_teacher_path("wan2.1")), root / "Wan2.1_VAE.pth", "original")
    save_teacher(load_model(embedded_teacher_path("wan2.2")), root / "Wan2.2_VAE.pth", "original")
    (root / "videos").mkdir()
    for seed, name in enumerate(("clip.mp4", "videos/a.mp4", "videos/b.mp4")):
        write_video(synthetic_clip(frames=9, height=64, width=64, seed=seed), root / name, fps=16)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(FIXTURES)
    return root


def _environment(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(workdir / ".hf"),
        HF_HUB_CACHE=str(workdir / ".hf" / "hub"),
        OMP_NUM_THREADS="1",
        FLASHVAED_REPO=str(REPO),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("PYTHONPATH", None)
    return env


# ---------------------------------------------------------------------------------------------
# running blocks
# ---------------------------------------------------------------------------------------------
PYTHON_RUNNER = r"""
import json, os, sys, traceback
requests = os.fdopen(int(sys.argv[1]), "r")
replies = os.fdopen(int(sys.argv[2]), "w")
namespace = {"__name__": "__main__"}
for request in requests:
    block = json.loads(request)
    ok = True
    try:
        # blank lines in front keep the doc's own line numbers in tracebacks
        exec(compile("\n" * block["line"] + block["code"], block["file"], "exec"), namespace)
    except BaseException:
        ok = False
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    replies.write(json.dumps({"ok": ok}) + "\n")
    replies.flush()
"""


class PythonSession:
    """One interpreter per doc file: its python blocks run there in one namespace, in order."""

    def __init__(self, workdir: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        req_read, self.req_write = os.pipe()
        self.reply_read, reply_write = os.pipe()
        self.log_file = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PYTHON_RUNNER, str(req_read), str(reply_write)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            pass_fds=(req_read, reply_write),
        )
        os.close(req_read)
        os.close(reply_write)
        self.requests = os.fdopen(self.req_write, "w")
        self.replies = os.fdopen(self.reply_read, "r")

    def run(self, block: Block) -> bool:
        self.requests.write(json.dumps({"code": block.code, "line": block.line, "file": str(block.doc)}) + "\n")
        self.requests.flush()
        ready, _, _ = select.select([self.replies], [], [], BLOCK_TIMEOUT_S)
        if not ready:
            self.close()
            raise TimeoutError(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s")
        reply = self.replies.readline()
        if not reply:
            return False  # the interpreter died (os._exit, a crash): its output says why
        return bool(json.loads(reply)["ok"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.requests, self.replies, self.log_file):
            try:
                f.close()
            except OSError:
                pass


def _run_bash(block: Block, workdir: Path, env: dict[str, str], log: Path) -> bool:
    with log.open("ab") as out:
        try:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block.code],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BLOCK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s") from e
    return done.returncode == 0


def _tail(path: Path, start: int, limit: int = 8000) -> str:
    with path.open("rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]


def run_doc(doc: Path, workdir: Path) -> list[tuple[str, float]]:
    """Runs one doc's blocks in ``workdir``; fails naming the first block that fails. Returns each
    block's wall time."""
    env = _environment(workdir)
    log = workdir.parent / f"{workdir.name}.log"
    log.touch()
    session: PythonSession | None = None
    times: list[tuple[str, float]] = []
    try:
        for block in BLOCKS[doc]:
            start = log.stat().st_size
            t0 = time.perf_counter()
            if block.lang == "bash":
                ok = _run_bash(block, workdir, env, log)
            else:
                session = session or PythonSession(workdir, env, log)
                ok = session.run(block)
            times.append((block.where, time.perf_counter() - t0))
            if not ok:
                kind = "hidden setup" if block.hidden else f"{block.lang} block"
                pytest.fail(
                    f"{block.where}: {kind} failed\n--- block ---\n{block.code}--- output ---\n{_tail(log, start)}",
                    pytrace=False,
                )
    finally:
        if session is not None:
            session.close()
    return times


# ---------------------------------------------------------------------------------------------
# flags the docs mention
# ---------------------------------------------------------------------------------------------
CLI_USE = re.compile(r"(?:^|[\s`(/])flashvaed(?:\.cli)? ([a-z][a-z-]+)((?:[^`\n|#]|\|(?=[^ ]))*)")
SCRIPT_USE = re.compile(r"(?:^|[\s`])python3? (benchmarks/[a-z_]+\.py)([^`\n#]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def documented_flags(pattern: re.Pattern[str]) -> dict[str, set[tuple[str, str]]]:
    """{command or script: {(flag, where)}} for every use the docs show (code spans and blocks alike)."""
    uses: dict[str, set[tuple[str, str]]] = {}
    for doc in [*DOCS, REPO / "benchmarks" / "RESULTS.md"]:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for match in pattern.finditer(line):
                for flag in FLAG.findall(match.group(2)):
                    uses.setdefault(match.group(1), set()).add((flag, f"{doc.relative_to(REPO)}:{n}"))
    return uses


def _help(argv: list[str]) -> str:
    return _help_cached(tuple(argv))


@functools.cache
def _help_cached(argv: tuple[str, ...]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr[-2000:]}"
    return done.stdout


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_enough_runnable_blocks() -> None:
    """A parser or marker regression must not pass on zero blocks."""
    total = sum(len(b) for b in BLOCKS.values())
    assert total >= MIN_RUNNABLE_BLOCKS, f"only {total} runnable blocks in README.md and docs/*.md"
    assert BLOCKS[REPO / "README.md"], "README.md's quick tour has no runnable block"


def test_parser_reads_markers(tmp_path: Path) -> None:
    """Runnable fences, hidden setup and plain blocks; a misspelt marker is an error, not a skip."""
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```bash\nnot run\n```\n```bash runnable\necho a\n```\n"
        "<!-- runnable python\nx = 1\n-->\n````markdown\n```python runnable\ninside\n```\n````\n"
        "```python runnable\nprint(x)\n```\n- item\n  ```bash runnable\n  echo b\n  ```\n",
        encoding="utf-8",
    )
    blocks = parse_blocks(doc)
    assert [(b.line, b.lang, b.code, b.hidden) for b in blocks] == [
        (5, "bash", "echo a\n", False),
        (8, "python", "x = 1\n", True),
        (16, "python", "print(x)\n", False),
        (20, "bash", "echo b\n", False),
    ]
    doc.write_text("```bash runable\necho a\n```\n", encoding="utf-8")
    with pytest.raises(DocFormatError, match="x.md:1"):
        parse_blocks(doc)
    doc.write_text("```python runnable\nprint(1)\n", encoding="utf-8")
    with pytest.raises(DocFormatError, match="never closed"):
        parse_blocks(doc)


@pytest.mark.parametrize("doc", RUNNABLE_DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_runnable_blocks(doc: Path, fixture_dir: Path, tmp_path: Path) -> None:
    """Every runnable block of ``doc`` runs, in order, in a fresh directory holding the fixtures."""
    workdir = tmp_path / "work"
    shutil.copytree(fixture_dir, workdir)
    (workdir / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    times = run_doc(doc, workdir)
    print("\n".join(f"{where}: {seconds:.1f} s" for where, seconds in times))


def test_failing_block_names_its_line(fixture_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing block reports FILE:LINE and its output; later blocks see earlier ones' files and names."""
    doc = REPO / "docs" / "_harness_check.md"
    blocks = [
        Block(doc, 3, "bash", "echo hi > made.txt\n", False),
        Block(doc, 7, "python", "text = open('made.txt').read()\n", False),
        Block(doc, 11, "python", "assert text == 'hi\\n'\nprint('checked')\n", False),
        Block(doc, 15, "bash", "echo before\nls missing.pt\necho never\n", False),
    ]
    monkeypatch.setitem(BLOCKS, doc, blocks)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    with pytest.raises(pytest.fail.Exception) as failure:
        run_doc(doc, workdir)
    message = str(failure.value)
    assert "docs/_harness_check.md:15: bash block failed" in message
    output = message.split("--- output ---")[1]
    assert "before" in output and "missing.pt" in output and "never" not in output  # -e: stops at the failure


def test_documented_cli_flags_exist() -> None:
    """Every ``flashvaed COMMAND ... --flag`` in README.md, docs/*.md and benchmarks/RESULTS.md names
    a command and an option that exist (checked against the command's own --help)."""
    cli = str(Path(sys.executable).parent / "flashvaed")
    commands = set(re.findall(r"^  ([a-z][a-z-]+)  ", _help([cli, "--help"]), flags=re.M))
    assert {"decode", "export", "distill"} <= commands
    missing = []
    for command, uses in sorted(documented_flags(CLI_USE).items()):
        if command not in commands:
            continue  # prose such as "flashvaed makes ..." or a module name
        known = set(FLAG.findall(_help([cli, command, "--help"])))
        missing += [f"{where}: flashvaed {command} {flag}" for flag, where in sorted(uses) if flag not in known]
    for command, uses in sorted(cli_md_table_flags().items()):  # docs/cli.md's option tables
        assert command in commands, f"{sorted(uses)[0][1]}: docs/cli.md documents a command 'flashvaed {command}'"
        known = set(FLAG.findall(_help([cli, command, "--help"])))
        missing += [f"{where}: flashvaed {command} {flag}" for flag, where in sorted(uses) if flag not in known]
    assert not missing, "documented options that do not exist:\n" + "\n".join(missing)


def cli_md_table_flags() -> dict[str, set[tuple[str, str]]]:
    """{command: {(flag, where)}} from the first column of each option table in docs/cli.md, per
    section ``## `flashvaed COMMAND ...```."""
    uses: dict[str, set[tuple[str, str]]] = {}
    command = None
    for n, line in enumerate((REPO / "docs" / "cli.md").read_text(encoding="utf-8").splitlines(), 1):
        heading = re.match(r"^## `flashvaed ([a-z][a-z-]+)", line)
        if line.startswith("## "):
            command = heading.group(1) if heading else None
        elif command and line.startswith("| `"):
            for flag in FLAG.findall(line.split("|")[1]):
                uses.setdefault(command, set()).add((flag, f"docs/cli.md:{n}"))
    return uses


def test_documented_benchmark_flags_exist() -> None:
    """Every ``python benchmarks/X.py ... --flag`` the docs show is an option of that script."""
    missing = []
    for script, uses in sorted(documented_flags(SCRIPT_USE).items()):
        path = REPO / script
        assert path.is_file(), f"{sorted(uses)[0][1]}: {script} does not exist"
        known = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", path.read_text(encoding="utf-8")))
        known |= set(re.findall(r"\"(--[a-z0-9-]+)\"", path.read_text(encoding="utf-8")))
        missing += [f"{where}: {script} {flag}" for flag, where in sorted(uses) if flag not in known | {"--help"}]
    assert not missing, "documented options that do not exist:\n" + "\n".join(missing)
