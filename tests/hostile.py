"""What the hostile-input suites (test_fuzz*.py) share: the world they tamper with, and what a
refusal must look like (exit 2, one ``error:`` line, no traceback, the output path untouched)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from flashvaed import api
from flashvaed.demo import embedded_teacher_path
from flashvaed.models import load_vae, save_teacher
from flashvaed.models.families.ltx import LTXVAE


def build_world(d: Path) -> Path:
    """The files hostile cases tamper with: the embedded Wan2.1 teacher (a .safetensors file with its
    metadata, and as a diffusers directory), the embedded LTX teacher in three layouts (diffusers':
    unconditioned), a student pruned from the Wan2.1 teacher, its export and ONNX Runtime engine,
    latents and frames."""
    wan, ltx = load_vae(embedded_teacher_path()), load_vae(embedded_teacher_path("ltx"))
    save_teacher(wan, d / "teacher.safetensors")  # our layout: the configuration is in the metadata
    save_teacher(wan, d / "dd", "diffusers")
    shutil.copy(embedded_teacher_path("ltx"), d / "ltx.safetensors")
    # diffusers cannot hold the embedded LTX teacher's conditioned, narrowing up blocks: its directory
    # holds the same teacher without the timestep conditioning (its other weights as they are)
    unconditioned = LTXVAE(replace(ltx.config, timestep_conditioning=False)).eval()
    unconditioned.load_state_dict(ltx.state_dict(), strict=False)
    save_teacher(unconditioned, d / "ltx_dd", "diffusers")
    save_teacher(ltx, d / "ltx_original.safetensors", "original")
    torch.manual_seed(0)
    torch.save({"latents": torch.randn(1, 16, 3, 4, 4)}, d / "z.pt")
    torch.save({"frames": torch.zeros(1, 3, 5, 32, 32)}, d / "f.pt")
    torch.save({"frames": torch.zeros(1, 3, 9, 64, 64)}, d / "ltx_f.pt")
    api.prune(
        d / "teacher.safetensors", d / "student", preset="flash-wan2.1", calib_clips=1, calib_frames=5, calib_size=32
    )
    api.export(d / "student", d / "export", chunk="1:1:2", height="32:32:64", width="32:32:64", batch="1")
    api.build_engine(d / "export", d / "engine")
    return d


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


def assert_case_refused(case: Callable[[Path], tuple], d: Path) -> None:
    """Set up a hostile case in ``d`` (it returns argv, the needle, the output path or None), run
    the command in-process and check the refusal."""
    from typer.testing import CliRunner

    from flashvaed.cli import app

    argv, needle, out = case(d)
    before = snapshot(out) if out is not None else None
    r = CliRunner().invoke(app, [str(a) for a in argv])
    assert_refused(r.output, r.exit_code, needle, out, before)


def tamper_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))  # NaN and Infinity are written as JSON's extensions


def tamper_manifest(d: Path, change: Callable[[dict], object], which: str = "engine") -> None:
    tamper_json(d / which / "manifest.json", change)
