"""``distill``: the whole command as a library function — a teacher and a student directory in,
the trained student directory (with its checkpoint, logs and report) out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..atomic import check_output
from ..devices import rank_device, resolve_device
from ..errors import InputError
from ..models.checkpoint import load_student_for, load_teacher
from .config import DistillConfig
from .data import ClipDataset, ClipSpec
from .trainer import CHECKPOINT, Distiller


def distill(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    data: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    steps_per_phase: int | None = None,
    resume: bool = False,
    cache_latents: str | os.PathLike | None = None,
    eval_clips: int = 2,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Distil ``student`` towards ``teacher`` on ``data``; ``out`` becomes the trained student
    directory (EMA weights) with its checkpoint, logs and report. Returns the report."""
    if isinstance(eval_clips, bool) or not isinstance(eval_clips, int) or eval_clips < 1:
        raise InputError(f"{{eval_clips}} must be at least 1, got {eval_clips!r}", "eval_clips")
    cfg = DistillConfig.load(config)
    if steps_per_phase is not None:
        if steps_per_phase < 0:
            raise InputError(f"{{steps_per_phase}} must be >= 0, got {steps_per_phase}", "steps_per_phase")
        cfg = cfg.with_steps_per_phase(steps_per_phase)
    spec = ClipSpec(cfg.clip_frames, cfg.clip_size, cfg.frame_stride, cfg.synthetic_clips)
    run = check_output(
        out,
        directory=True,
        replaceable=lambda p: resume or (p / CHECKPOINT).exists(),
        what="a distillation run",
        inputs=[teacher, student, config, cache_latents, *data],
    )
    if cache_latents is not None and Path(cache_latents).exists() and not Path(cache_latents).is_dir():
        raise InputError(f"{{cache_latents}} {cache_latents} is not a directory", "cache_latents")
    dev = rank_device(resolve_device(device))
    teacher_model = load_teacher(teacher)
    student_model = load_student_for(student, teacher_model)
    if not data:
        raise InputError("no {data} given (videos, latents, folders of them, or 'synthetic')", "data")
    dataset = ClipDataset(list(data), teacher_model.to(dev), spec, seed=cfg.seed, cache_dir=cache_latents)
    identity = {
        "teacher": teacher_model.config.to_dict(),
        "student": student_model.config.to_dict(),
        "data": [str(d) for d in data],
    }
    trainer = Distiller(
        teacher_model,
        student_model,
        dataset,
        cfg,
        run,
        device=dev,
        resume=resume,
        eval_clips=eval_clips,
        progress=progress,
        identity=identity,
    )
    report = trainer.run().to_dict()
    report["skipped_videos"] = dataset.skipped
    return report
