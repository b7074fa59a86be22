"""The commands users type, as library functions of the same names (the CLI is a thin shell).

Each takes paths and options, refuses bad input with a one-line ``FlashVAEDError`` before any
output exists, and writes its output whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import engines
from .atomic import atomic_output
from .demo import DemoResult, demo, embedded_teacher_path
from .engines.build import build_engine as engines_build
from .engines.validate import Validation
from .engines.validate import validate as engines_validate
from .errors import InputError
from .export.contract import Contract, is_manifest_dir, read_manifest
from .export.onnx_export import ExportOptions, ExportResult
from .export.onnx_export import export as onnx_export
from .io import VideoOptions, frame_sink, output_kind, read_tensor, read_video, write_tensor
from .metrics import psnr
from .models import DecoderSummary, FlashStudent, StudentSpec, WanVAE, load_model, save_student, summarize
from .models.streaming import check_latents, chunk_bounds
from .models.wan import LatentDecoder, teacher_layout
from .progress import track

__all__ = [
    "DecodeResult",
    "DemoResult",
    "EncodeResult",
    "Evaluation",
    "PrunePlan",
    "build_engine",
    "decode",
    "demo",
    "distill",
    "embedded_teacher_path",
    "encode",
    "engine_info",
    "evaluate",
    "explain",
    "export",
    "info",
    "prune",
    "validate",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; naming an absent device is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
def info(
    model: str | os.PathLike, height: int = 480, width: int = 832, chunk: int = 1, dtype: str = "float32"
) -> DecoderSummary:
    """Family, configuration, parameters, MACs per latent chunk and state size of MODEL.

    For a student, ``summary.teacher`` holds the same figures for its teacher (built from the
    teacher configuration the student records, on the meta device: no teacher file needed).
    """
    loaded = load_model(model)
    summary = summarize(loaded, height, width, chunk=chunk, dtype=resolve_dtype(dtype))
    if isinstance(loaded, FlashStudent):
        with torch.device("meta"):
            teacher = WanVAE(loaded.config.teacher)
        summary.teacher = summarize(teacher, height, width, chunk=chunk, dtype=resolve_dtype(dtype))
    return summary


# ---------------------------------------------------------------------------------------------
@dataclass
class DecodeResult:
    output: Path
    shape: tuple[int, ...]  # (B, 3, F, H, W) of the decoded frames
    seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.shape[0] * self.shape[2] / max(self.seconds, 1e-9)


def decode(
    latents: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    chunk: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_index: int = 0,
    fps: int = 16,
    progress: bool = False,
) -> DecodeResult:
    """Decode normalised diffusion-space latents (B, z, T, h, w) to frames, video or PNGs.

    MODEL may be a checkpoint, a student, an export or an engine directory (``engines.load``);
    ``chunk=None`` takes the engine's optimal chunk (2 latent frames for torch models).

    Memory stays flat in the clip length: chunks are decoded and handed to the output one by
    one (raw tensor outputs do keep all frames, since they are written as one tensor).
    """
    kind = output_kind(out)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if chunk is not None and chunk < 1:
        raise InputError(f"--chunk must be at least 1, got {chunk}")
    if fps < 1:
        raise InputError(f"--fps must be at least 1, got {fps}")
    z = read_tensor(latents, "latents")
    decoder = engines.load(model, device=dev, dtype=dt)
    check_latents(decoder, z)
    if kind != "tensor" and not 0 <= batch_index < z.shape[0]:
        raise InputError(f"--batch-index {batch_index} is out of range for a batch of {z.shape[0]}")
    pieces = decoder.iter_decode(z, chunk)  # checks chunk range and size before any output exists
    n_chunks = len(chunk_bounds(z.shape[2], chunk or decoder.default_chunk()))
    start = time.perf_counter()
    frames = 0
    with frame_sink(out, fps=fps, batch_index=batch_index) as sink:
        for piece in track(pieces, n_chunks, "decoding", progress):
            sink.write(piece)
            frames += piece.shape[2]
            last_shape = piece.shape
    seconds = time.perf_counter() - start
    b, c, _, h, w = last_shape
    return DecodeResult(Path(out), (b, c, frames, h, w), seconds)


# ---------------------------------------------------------------------------------------------
@dataclass
class EncodeResult:
    output: Path
    video_shape: tuple[int, ...]
    latents_shape: tuple[int, ...]
    seconds: float


def encode(
    video: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: VideoOptions | None = None,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = False,
) -> EncodeResult:
    """Encode a video file or raw frames tensor to normalised latents (dict key ``latents``)."""
    if output_kind(out) != "tensor":
        raise InputError(f"latents are written as .pt, .npy or .safetensors, not {Path(out).name!r}")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    vae = load_model(model)
    if not isinstance(vae, WanVAE):
        raise InputError(f"{model} is a student: it has no encoder; encode with its teacher (same latents)")
    options = options or VideoOptions(multiple=vae.spatial_factor, temporal_factor=vae.temporal_factor)
    frames = read_video(video, options)
    vae = vae.to(device=dev, dtype=dt)
    start = time.perf_counter()
    chunks = 1 + (frames.shape[2] - 1) // vae.temporal_factor
    with torch.inference_mode():
        pieces = list(track(vae.iter_encode(frames), chunks, "encoding", progress))
    latents = torch.cat(pieces, dim=2).float()
    seconds = time.perf_counter() - start
    write_tensor(latents, out, "latents")
    return EncodeResult(Path(out), tuple(frames.shape), tuple(latents.shape), seconds)


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
def _spec(preset: str | None, config: str | os.PathLike | None) -> StudentSpec:
    if (preset is None) == (config is None):
        raise InputError("give exactly one of --preset or --config")
    return StudentSpec.load(preset if preset is not None else config)  # type: ignore[arg-type]


def _teacher(path: str | os.PathLike) -> WanVAE:
    model = load_model(path)
    if not isinstance(model, WanVAE):
        raise InputError(f"{path} is a student; --teacher needs a teacher checkpoint (original, diffusers, ...)")
    return model


@dataclass
class PrunePlan:
    """What ``prune`` will do, before any calibration: the layout and every channel group."""

    layout: dict[str, Any]
    notes: list[str]
    groups: list[dict[str, Any]]


def explain(
    teacher: str | os.PathLike, *, preset: str | None = None, config: str | os.PathLike | None = None
) -> PrunePlan:
    """The resolved student layout and the channel groups with their kept/total widths."""
    from .prune.groups import channel_groups
    from .prune.pipeline import pruned_layout

    spec = _spec(preset, config)
    model = _teacher(teacher)
    t_layout = teacher_layout(model.config)
    layout, notes = spec.resolve(t_layout, family=model.family)
    with torch.device("meta"):
        pruned = LatentDecoder(pruned_layout(layout, t_layout), model.config.latents_mean, model.config.latents_std)
    groups = [
        {
            "name": g.name,
            "kind": g.kind,
            "kept": p.size,
            "total": g.size,
            "producers": [x for x, _ in g.producers],
            "consumers": g.consumers,
            "norms": g.norms,
        }
        for g, p in zip(channel_groups(model.decoder), channel_groups(pruned.decoder), strict=True)
    ]
    return PrunePlan(layout.to_dict(), sorted(set(notes)), groups)


def prune(
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    config: str | os.PathLike | None = None,
    calib: str | os.PathLike = "synthetic",
    criterion: str = "independence",
    calib_clips: int = 4,
    calib_frames: int = 9,
    calib_size: int = 64,
    chunk: int = 2,
    height: int = 480,
    width: int = 832,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Initialise a student from a teacher and write the student directory; returns the report."""
    from .prune.calibration import calibration_latents
    from .prune.pipeline import CRITERIA, prune_teacher

    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r} (use {' or '.join(CRITERIA)})")
    if calib_clips < 1 or calib_frames < 1 or (calib_frames - 1) % 4 or calib_size <= 0 or calib_size % 8:
        raise InputError("--calib-clips >= 1, --calib-frames 4n+1 and --calib-size a multiple of 8 are required")
    spec = _spec(preset, config)
    model = _teacher(teacher).to(resolve_device(device))
    spec.resolve(teacher_layout(model.config), family=model.family)  # refuse a bad fit before any work
    check_student_target(out)
    latents = calibration_latents(
        calib, model, clips=calib_clips, frames=calib_frames, size=calib_size, progress=progress
    )
    result = prune_teacher(
        model, spec, latents, criterion=criterion, chunk=chunk, report_size=(height, width), progress=progress
    )
    result.report["calibration"]["source"] = str(calib)
    save_student(result.student.cpu(), out, {"prune_report.json": result.report})
    return result.report


def check_student_target(out: str | os.PathLike) -> None:
    from .models.checkpoint import is_student_dir

    out = Path(out)
    if out.exists() and not is_student_dir(out) and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(f"{out} exists and is not a student directory; choose a new output")


# ---------------------------------------------------------------------------------------------
def _student(path: str | os.PathLike, teacher: WanVAE) -> FlashStudent:
    model = load_model(path)
    if not isinstance(model, FlashStudent):
        raise InputError(f"{path} is not a student directory (make one with `flashvaed prune`)")
    if model.config.family != teacher.family:
        raise InputError(f"the student is for {model.config.family} teachers, the teacher is {teacher.family}")
    mine, theirs = model.config.teacher, teacher.config
    if (mine.base_dim, mine.z_dim, mine.dim_mult) != (theirs.base_dim, theirs.z_dim, theirs.dim_mult):
        raise InputError(
            f"the student was pruned from a teacher with base_dim {mine.base_dim}, z_dim {mine.z_dim}; "
            f"this teacher has base_dim {theirs.base_dim}, z_dim {theirs.z_dim}"
        )
    return model


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
    """Distil ``student`` towards ``teacher`` on ``data``; RUN (``out``) becomes the trained student
    directory (EMA weights) with its checkpoint, logs and report. Returns the report."""
    from .distill.config import DistillConfig
    from .distill.data import ClipDataset, ClipSpec
    from .distill.trainer import CHECKPOINT, Distiller

    cfg = DistillConfig.load(config)
    if steps_per_phase is not None:
        if steps_per_phase < 0:
            raise InputError(f"--steps-per-phase must be >= 0, got {steps_per_phase}")
        cfg = cfg.with_steps_per_phase(steps_per_phase)
    spec = ClipSpec(cfg.clip_frames, cfg.clip_size, cfg.frame_stride, cfg.synthetic_clips)
    run = Path(out)
    if run.exists() and not (run / CHECKPOINT).exists() and any(run.iterdir()) and not resume:
        raise InputError(f"{run} exists and is not a distillation run; choose a new -o")
    dev = resolve_device(device)
    teacher_model = _teacher(teacher)
    student_model = _student(student, teacher_model)
    if not data:
        raise InputError("no --data given (videos, latents, folders of them, or 'synthetic')")
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


def evaluate(
    model: str | os.PathLike,
    teacher: str | os.PathLike,
    data: list[str | os.PathLike],
    *,
    clips: int = 4,
    frames: int = 17,
    size: int = 128,
    chunk: int = 1,
    device: str = "auto",
    seed: int = 1234,
    out_json: str | os.PathLike | None = None,
    progress: bool = False,
) -> Evaluation:
    """Student vs ground truth, teacher vs ground truth, student vs teacher; retention; flicker;
    decode speed of both on the same runtime. Latent-only data has no ground truth (those are None)."""
    from .distill.data import ClipDataset, ClipSpec
    from .distill.phases import streaming_decode
    from .metrics import flicker, ssim

    if clips < 1:
        raise InputError(f"--clips must be at least 1, got {clips}")
    dev = resolve_device(device)
    teacher_model = _teacher(teacher).to(dev)
    student_model = _student(model, teacher_model).to(dev)
    if not data:
        raise InputError("no --data given (videos, latents, folders of them, or 'synthetic')")
    dataset = ClipDataset(list(data), teacher_model, ClipSpec(frames, size), seed=seed)
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


# ---------------------------------------------------------------------------------------------
def check_replaceable(out: Path, what: str) -> None:
    """An output directory may replace an export/engine or an empty directory, nothing else."""
    if out.exists() and not (is_manifest_dir(out) or (out.is_dir() and not any(out.iterdir()))):
        raise InputError(f"{out} exists and is not an {what} directory; choose a new output")


def export(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    chunk: str = "1:2:8",
    height: str = "64:256:1280",
    width: str = "64:256:1280",
    batch: str = "1:1:4",
    precision: str = "fp32",
    plugins: str = "flashvaed",
    opset: int = 18,
) -> ExportResult:
    """Export MODEL (teacher or student) to ``first.onnx`` + ``steady.onnx`` + ``manifest.json``."""
    if is_manifest_dir(model):
        raise InputError(f"{model} is already an export or engine; export takes a checkpoint or student")
    out = Path(out)
    check_replaceable(out, "export")
    options = ExportOptions(
        chunk=chunk, height=height, width=width, batch=batch, precision=precision, plugins=plugins, opset=opset
    )
    return onnx_export(load_model(model), out, options, source=str(model))


def build_engine(
    export_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backend: str = "onnxruntime",
    providers: list[str] | None = None,
    threads: int = 0,
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: float = 4.0,
) -> Contract:
    """Build an engine directory for ``backend`` from an export directory."""
    out = Path(out)
    check_replaceable(out, "engine")
    return engines_build(export_dir, out, backend, providers, threads, timing_cache, workspace_gib)


def validate(
    engine: str | os.PathLike,
    reference: str | os.PathLike,
    latents: str | os.PathLike,
    *,
    teacher: str | os.PathLike | None = None,
    chunk: int | None = None,
    out_json: str | os.PathLike | None = None,
) -> Validation:
    """Engine vs the PyTorch model it came from, every chunk, with polygraphy; and vs the teacher."""
    if not is_manifest_dir(engine):
        raise InputError(f"{engine} is not an export or engine directory (no manifest.json)")
    decoder = engines.load(engine)
    z = read_tensor(latents, "latents")
    check_latents(decoder, z)
    ref = load_model(reference)
    if teacher is not None:
        teacher_model: LatentDecoder | None = load_model(teacher)
    else:
        teacher_model = ref if isinstance(ref, WanVAE) else None
    report = engines_validate(
        decoder, ref, z, chunk, teacher_model, engine_name=str(engine), reference_name=str(reference)
    )
    if out_json is not None:
        with atomic_output(out_json) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2))
    return report


def engine_info(path: str | os.PathLike) -> dict[str, Any]:
    """What ``info`` shows for an export or engine directory: its contract and files."""
    contract = read_manifest(path)
    d = contract.to_dict()
    opt = contract.shapes
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[contract.precision]
    shapes = [t.shape(opt["batch"].opt, opt["height"].opt, opt["width"].opt) for t in contract.state]
    state_bytes = sum(itemsize * math.prod(int(v) for v in s) for s in shapes)
    files = {g: (Path(path) / f).stat().st_size for g, f in contract.files.items()}
    return {**d, "state_bytes_at_opt": state_bytes, "file_bytes": files}
