"""`flashvaed demo`: the whole flow on a clip it makes itself, with the embedded teacher.

1. Encode a procedural clip with the teacher and decode it through the streaming step (checked
   against one-shot decoding).
2. Prune a student from the teacher (flash-wan2.1's operators; up2/up3 at 1/2 width, since the
   embedded teacher is 8 channels wide at full resolution) and distil it briefly on synthetic
   clips; decode the same latents with it.
3. Write the videos side by side and report quality and speed on one line each.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from .atomic import atomic_output, check_output
from .devices import resolve_device
from .errors import InputError
from .io import write_tensor, write_video
from .metrics import psnr
from .models import StudentSpec, load_model, load_teacher, save_student
from .models.checkpoint import is_student_dir
from .models.streaming import chunk_bounds, iter_decode
from .progress import track
from .safeload import json_format
from .synthetic import synthetic_clip

EMBEDDED_TEACHER = "wan21-tiny.safetensors"
DEMO_STUDENT = {
    "name": "flash-demo",
    "description": "flash-wan2.1's operators; up2/up3 at 1/2 width for an 8-channel-wide teacher",
    "stages": {
        **{k: {"op": "dwsep3d"} for k in ("middle", "up0", "up1")},
        **{k: {"op": "spatial2d", "width": 0.5} for k in ("up2", "up3")},
    },
}


DEMO_FORMAT = "flashvaed-demo"
DEMO_DIR = "a demo output"
DEMO_REPORT = "report.json"
DEMO_NAMES = {  # what demos write; folders of these alone are earlier demo outputs
    "latents.safetensors",
    "input.mp4",
    "reconstruction.mp4",
    "student.mp4",
    "comparison.mp4",
    "student-pruned",
    "student",
    "distill.yaml",
    DEMO_REPORT,
}


def is_demo_dir(path: Path) -> bool:
    """Whether ``path`` holds an earlier demo's output (which a new demo replaces)."""
    if json_format(path / DEMO_REPORT) == DEMO_FORMAT:
        return True
    try:
        entries = list(path.iterdir())  # an older demo's, without a report: its names, its students
        return all(p.name in DEMO_NAMES and (p.is_file() or is_student_dir(p)) for p in entries)
    except OSError:
        return False


def embedded_teacher_path() -> Path:
    """The small Wan2.1-architecture VAE shipped with the package (see docs/demo.md)."""
    return Path(str(resources.files("flashvaed") / "data" / EMBEDDED_TEACHER))


@dataclass
class DemoResult:
    out_dir: Path
    video_shape: tuple[int, ...]
    latents_shape: tuple[int, ...]
    psnr_db: float
    streaming_max_diff: float
    decode_fps: float
    model: str
    params: int
    student_params: int | None = None
    student_psnr_vs_teacher_db: float | None = None
    student_psnr_vs_teacher_before_db: float | None = None
    student_psnr_vs_input_db: float | None = None
    student_decode_fps: float | None = None

    def summary(self) -> str:
        _, _, f, h, w = self.video_shape
        lines = [
            f"demo: {f} frames {h}x{w} -> latents {tuple(self.latents_shape)} -> decoded by {self.model} "
            f"({self.params / 1e6:.2f} M params): PSNR {self.psnr_db:.2f} dB vs the input, streaming == "
            f"one-shot (max |diff| {self.streaming_max_diff:.1e}), {self.decode_fps:.1f} frames/s; "
            f"wrote {self.out_dir / 'comparison.mp4'}"
        ]
        if self.student_params is not None:
            lines.append(
                f"student: {self.student_params / 1e6:.3f} M params, PSNR vs teacher "
                f"{self.student_psnr_vs_teacher_before_db:.2f} dB after pruning -> "
                f"{self.student_psnr_vs_teacher_db:.2f} dB after distillation ({self.student_psnr_vs_input_db:.2f} dB "
                f"vs the input), {self.student_decode_fps:.1f} frames/s "
                f"({self.student_decode_fps / self.decode_fps:.1f}x the teacher); student in {self.out_dir / 'student'}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


def _timed_decode(
    model: Any, latents: torch.Tensor, chunk: int, progress: bool, label: str
) -> tuple[torch.Tensor, float]:
    bounds = chunk_bounds(latents.shape[2], chunk)
    start = time.perf_counter()
    pieces = list(track(iter_decode(model, latents, chunk), len(bounds), label, progress))
    return torch.cat(pieces, dim=2).cpu(), time.perf_counter() - start


def demo(
    out_dir: str | os.PathLike = "demo-output",
    *,
    model: str | os.PathLike | None = None,
    frames: int = 17,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    chunk: int = 1,
    student: bool = True,
    distill_steps: int = 15,
    device: str = "auto",
    fps: int = 8,
    progress: bool = False,
) -> DemoResult:
    """Encode a generated clip with the teacher, decode it streaming; prune and distil a student;
    write videos; report."""
    from .distill.run import distill
    from .prune.calibration import calibration_latents
    from .prune.pipeline import prune_teacher

    out_dir = check_output(out_dir, directory=True, replaceable=is_demo_dir, what=DEMO_DIR, inputs=[model])
    if seed < 0:
        raise InputError(f"{{seed}} must be >= 0, got {seed}", "seed")
    if distill_steps < 0:
        raise InputError(f"{{distill_steps}} must be >= 0, got {distill_steps}", "distill_steps")
    dev = resolve_device(device)
    model_path = Path(model) if model is not None else embedded_teacher_path()
    teacher = load_teacher(model_path).to(dev)
    tf, sf = teacher.temporal_factor, teacher.spatial_factor
    if frames < 1 or (frames - 1) % tf:
        raise InputError(f"{{frames}} must be {tf}n+1 (e.g. {4 * tf + 1}), got {frames}", "frames")
    if height <= 0 or width <= 0 or height % sf or width % sf:
        raise InputError(
            f"{{height}} and {{width}} must be positive multiples of {sf}, got {height}x{width}", "height", "width"
        )
    clip = synthetic_clip(frames, height, width, seed=seed)
    with torch.inference_mode():
        latents = teacher.encode(clip)
        streamed, seconds = _timed_decode(teacher, latents, chunk, progress, "decoding (teacher)")
        one_shot = teacher.decode(latents).cpu()
    with atomic_output(out_dir, directory=True, replaceable=is_demo_dir, what=DEMO_DIR) as tmp:
        write_tensor(latents, tmp / "latents.safetensors", "latents")
        write_video(clip, tmp / "input.mp4", fps=fps)
        write_video(streamed, tmp / "reconstruction.mp4", fps=fps)
        result = DemoResult(
            out_dir=out_dir,
            video_shape=tuple(clip.shape),
            latents_shape=tuple(latents.shape),
            psnr_db=psnr(streamed, clip),
            streaming_max_diff=(streamed - one_shot).abs().max().item(),
            decode_fps=streamed.shape[2] / max(seconds, 1e-9),
            model="the embedded Wan2.1 teacher" if model is None else f"teacher {model_path.name}",
            params=sum(p.numel() for p in teacher.parameters()),
        )
        panels = [clip, streamed]
        if student:
            size = min(height, width)
            calib = calibration_latents("synthetic", teacher, clips=4, frames=9, size=size, seed=seed + 100)
            pruned = prune_teacher(teacher, StudentSpec.from_dict(DEMO_STUDENT), calib, progress=progress).student
            save_student(pruned, tmp / "student-pruned")
            config = {
                "batch_size": 2,
                "clip_frames": 9,
                "clip_size": size,
                "synthetic_clips": 32,
                "checkpoint_every": 1000,
                "optimizer": {"lr": 2e-3},
            }
            (tmp / "distill.yaml").write_text(yaml.safe_dump(config))
            run = tmp / "student"
            distill(
                model_path,
                tmp / "student-pruned",
                ["synthetic"],
                run,
                config=tmp / "distill.yaml",
                steps_per_phase=distill_steps,
                device=str(dev),
                progress=progress,
            )
            trained = load_model(run).to(dev)
            with torch.inference_mode():
                before = pruned.to(dev).decode(latents, chunk).cpu()
                ours, s_seconds = _timed_decode(trained, latents, chunk, progress, "decoding (student)")
            result.student_params = sum(p.numel() for p in trained.parameters())
            result.student_psnr_vs_teacher_before_db = psnr(before, streamed)
            result.student_psnr_vs_teacher_db = psnr(ours, streamed)
            result.student_psnr_vs_input_db = psnr(ours, clip)
            result.student_decode_fps = ours.shape[2] / max(s_seconds, 1e-9)
            write_video(ours, tmp / "student.mp4", fps=fps)
            panels.append(ours)
        write_video(torch.cat(panels, dim=-1), tmp / "comparison.mp4", fps=fps)
        (tmp / DEMO_REPORT).write_text(json.dumps({"format": DEMO_FORMAT, **result.to_dict()}, indent=2))
    return result
