"""``evaluate``: a student against its teacher and the ground truth, as the paper reports it.

PSNR, SSIM and flicker of student vs ground truth, teacher vs ground truth and student vs
teacher; retention (student / teacher metric); decode speed of both on the same runtime.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..atomic import atomic_output, check_output
from ..devices import resolve_device
from ..errors import InputError
from ..metrics import flicker, psnr, ssim
from ..models.checkpoint import load_student_for, load_teacher
from ..models.memory import clip_bytes
from ..progress import track
from ..safeload import check_work
from .data import ClipDataset, ClipSpec
from .phases import streaming_decode


@dataclass
class Evaluation:
    metrics: dict[str, float | None]
    clips: int
    frames: int

    def markdown(self) -> str:
        m = self.metrics

        def f(key: str, fmt: str = ".2f") -> str:
            return "-" if m.get(key) is None else format(m[key], fmt)

        rows = [
            "| metric | student vs ground truth | teacher vs ground truth | student vs teacher | retention |",
            "|---|---|---|---|---|",
            f"| PSNR (dB) | {f('psnr_student_gt')} | {f('psnr_teacher_gt')} | {f('psnr_student_teacher')} | "
            f"{f('retention_psnr', '.3f')} |",
            f"| SSIM | {f('ssim_student_gt', '.4f')} | {f('ssim_teacher_gt', '.4f')} | "
            f"{f('ssim_student_teacher', '.4f')} | {f('retention_ssim', '.3f')} |",
            f"| flicker | {f('flicker_student_gt', '.4f')} | {f('flicker_teacher_gt', '.4f')} | "
            f"{f('flicker_student_teacher', '.4f')} | |",
            "",
            f"decode speed, same runtime: student {f('student_fps', '.1f')} frames/s, teacher "
            f"{f('teacher_fps', '.1f')} frames/s ({f('speedup', '.1f')}x); {self.clips} clips, {self.frames} frames",
        ]
        return "\n".join(rows)


def default_frames(temporal_factor: int, at_least: int = 17) -> int:
    """Frames per evaluated clip: 1 + t*n, the fewest that reach ``at_least`` (17 for Wan and
    LTX-Video, 19 for Mochi's t = 6)."""
    return 1 + temporal_factor * -(-(at_least - 1) // temporal_factor)


def evaluate(
    model: str | os.PathLike,
    teacher: str | os.PathLike,
    data: list[str | os.PathLike],
    *,
    clips: int = 4,
    frames: int | None = None,
    size: int = 128,
    chunk: int = 1,
    device: str = "auto",
    seed: int = 1234,
    out_json: str | os.PathLike | None = None,
    progress: bool = False,
) -> Evaluation:
    """Student vs ground truth, teacher vs ground truth, student vs teacher; retention; flicker;
    decode speed of both on the same runtime. Latent-only data has no ground truth (those are None)."""
    if clips < 1:
        raise InputError(f"{{clips}} must be at least 1, got {clips}", "clips")
    if out_json is not None:
        check_output(out_json, inputs=[model, teacher, *data])
    dev = resolve_device(device)
    teacher_model = load_teacher(teacher).to(dev)
    student_model = load_student_for(model, teacher_model).to(dev)
    if not data:
        raise InputError("no {data} given (videos, latents, folders of them, or 'synthetic')", "data")
    if frames is None:  # the shortest clip of at least 17 frames the family decodes: 1 + t*n
        frames = default_frames(teacher_model.temporal_factor)
    dataset = ClipDataset(list(data), teacher_model, ClipSpec(frames, size), seed=seed)
    kept = 3 * clips * 3 * frames * size * size * 4  # truth, teacher and student frames of every clip
    check_work(
        kept + clip_bytes([teacher_model, student_model], frames, size, size, chunk),
        f"evaluating {clips} clips of {frames} frames at {size}x{size}", "lower {clips}, {frames} or {size}",
        "clips", "frames", "size", device=dev,
    )  # fmt: skip
    outs: dict[str, list[Tensor]] = {"student": [], "teacher": [], "truth": []}
    seconds = {"student": 0.0, "teacher": 0.0}
    with torch.inference_mode():
        for i in track(range(clips), clips, "evaluating", progress):
            clip = dataset.clip(i % len(dataset), epoch=2_000_000 + i)
            z = clip.latents.to(dev)
            for name, m in (("teacher", teacher_model), ("student", student_model)):
                start = time.perf_counter()
                outs[name].append(streaming_decode(m, z, chunk, clamp=True).float().cpu())
                seconds[name] += time.perf_counter() - start
            if clip.frames is not None:
                outs["truth"].append(clip.frames)
    s, t = torch.cat(outs["student"]), torch.cat(outs["teacher"])
    gt = torch.cat(outs["truth"]) if len(outs["truth"]) == clips else None
    n_frames = s.shape[0] * s.shape[2]
    m: dict[str, float | None] = {
        "psnr_student_teacher": psnr(s, t),
        "ssim_student_teacher": ssim(s, t),
        "flicker_student_teacher": flicker(s, t),
        "student_fps": n_frames / seconds["student"],
        "teacher_fps": n_frames / seconds["teacher"],
    }
    m["speedup"] = seconds["teacher"] / seconds["student"]
    for key in (
        "psnr_student_gt",
        "psnr_teacher_gt",
        "ssim_student_gt",
        "ssim_teacher_gt",
        "flicker_student_gt",
        "flicker_teacher_gt",
        "retention_psnr",
        "retention_ssim",
    ):
        m[key] = None
    if gt is not None:
        m.update(
            psnr_student_gt=psnr(s, gt),
            psnr_teacher_gt=psnr(t, gt),
            ssim_student_gt=ssim(s, gt),
            ssim_teacher_gt=ssim(t, gt),
            flicker_student_gt=flicker(s, gt),
            flicker_teacher_gt=flicker(t, gt),
        )
        m["retention_psnr"] = m["psnr_student_gt"] / m["psnr_teacher_gt"]
        m["retention_ssim"] = m["ssim_student_gt"] / m["ssim_teacher_gt"]
    result = Evaluation(m, clips, n_frames)
    if out_json is not None:
        with atomic_output(out_json) as tmp:
            tmp.write_text(json.dumps({"metrics": m, "clips": clips, "frames": n_frames}, indent=2))
    return result
