"""Calibration: latents to run the teacher on, and statistics gathered while it decodes them.

Latents come from a latents file or folder (e.g. sampled by a diffusion model), from a folder of
videos encoded by the teacher's own encoder, or from ``synthetic`` clips (also encoded). The
teacher then decodes them through the streaming step, chunk by chunk, while forward hooks
accumulate what pruning needs: Gram matrices of the inputs of the layers that consume each
channel group, and norm statistics. Nothing is kept but the statistics, so memory stays flat.
A layer's input holds its channels on dim 1 unless it says otherwise (``norms.input_channel_dim``:
an ``nn.Linear`` over channel-last tensors reads the last dim).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..io import TENSOR_SUFFIXES, VIDEO_SUFFIXES, VideoOptions, read_tensor, read_video
from ..models import families
from ..models.streaming import check_latents, clocked, iter_decode
from ..models.vae import TeacherVAE
from ..progress import track
from ..synthetic import synthetic_clip
from .norms import input_channel_dim
from .select import augmented_gram


def calibration_latents(
    source: str | os.PathLike,
    teacher: TeacherVAE,
    *,
    clips: int = 4,
    frames: int | None = None,
    size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[Tensor]:
    """Normalised latents (1, z, T, h, w) per clip from ``source``.

    ``source``: ``synthetic`` (``clips`` generated clips of ``frames`` x ``size`` x ``size``), a
    latents file (.pt/.npy/.safetensors, (B, z, T, h, w): one clip per batch element), a video
    file, or a folder of either kind. ``frames`` None: the family's ``clip_frames``.
    """
    if frames is None:
        frames = families.get(teacher.family).clip_frames
    if str(source) == "synthetic":
        videos: Iterable[Tensor] = (synthetic_clip(frames, size, size, seed=seed + i) for i in range(clips))
        return _encode_all(teacher, videos, clips, progress)
    path = Path(source)
    if not path.exists():
        raise InputError(f"calibration data not found: {path} (give latents, videos, a folder, or 'synthetic')")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    latent_files = [p for p in files if p.suffix.lower() in TENSOR_SUFFIXES]
    video_files = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
    if not latent_files and not video_files:
        raise InputError(
            f"no calibration latents or videos in {path} (expected {', '.join(TENSOR_SUFFIXES + VIDEO_SUFFIXES)})"
        )
    latents = []
    for file in latent_files:
        z = read_tensor(file, "latents").float()
        check_latents(teacher, z)
        latents.extend(z.split(1))
    options = VideoOptions(height=size, width=size, max_frames=frames)
    latents += _encode_all(teacher, (read_video(f, options) for f in video_files), len(video_files), progress)
    return latents


@torch.inference_mode()
def _encode_all(teacher: TeacherVAE, videos: Iterable[Tensor], total: int, progress: bool) -> list[Tensor]:
    return [teacher.encode(v).float() for v in track(videos, total, "encoding calibration clips", progress)]


@contextmanager
def hooks(model: nn.Module, callbacks: dict[str, Callable[[Tensor], None]]):
    """Call ``callbacks[path](input)`` with the first input of each named module on every call,
    its channels moved to dim 1 (``norms.input_channel_dim``)."""
    handles = []
    for path, fn in callbacks.items():
        module = model.get_submodule(path)
        dim = input_channel_dim(module)

        def hook(_m: nn.Module, args: tuple, fn: Callable[[Tensor], None] = fn, dim: int = dim) -> None:
            fn(args[0] if dim == 1 else args[0].movedim(dim, 1))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def run(model: nn.Module, latents: list[Tensor], chunk: int, description: str, progress: bool) -> None:
    """Decode every calibration clip, discarding the frames: through the streaming step, or for a
    decoder with latency in its one-shot form (its stream's warm-up positions are not frames)."""
    for z in track(latents, len(latents), description, progress):
        if clocked(model):
            model.decode_clip(z)
            continue
        for _ in iter_decode(model, z, chunk):
            pass


def input_grams(
    model: nn.Module,
    paths: list[str],
    latents: list[Tensor],
    *,
    chunk: int = 2,
    max_rows: int = 32768,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Augmented Gram matrix of the inputs of each module in ``paths`` over all calibration clips."""
    grams: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(0)

    def accumulate(path: str) -> Callable[[Tensor], None]:
        module = model.get_submodule(path)
        width = getattr(module, "in_channels", getattr(module, "in_features", None))

        def fn(x: Tensor) -> None:
            if width is not None and x.shape[1] != width:
                raise AssertionError(
                    f"{path} takes {width} channels but its input has {x.shape[1]} on its channel dim "
                    f"{input_channel_dim(module)} (declare input_channel_dim)"
                )
            g = augmented_gram(x, max_rows, generator)
            grams[path] = grams[path] + g if path in grams else g

        return fn

    with hooks(model, {p: accumulate(p) for p in paths}):
        run(model, latents, chunk, "calibrating: feature statistics", progress)
    return grams


def norm_ratios(
    model: nn.Module, keeps: dict[str, list[int]], latents: list[Tensor], *, chunk: int = 2, progress: bool = False
) -> dict[str, float]:
    """For each norm path: mean over positions of ||x_keep|| / ||x|| over its input's channels, the
    share the kept channels carry (for norms that divide by a statistic over all channels)."""
    sums: dict[str, list[float]] = {p: [0.0, 0.0] for p in keeps}

    def accumulate(path: str) -> Callable[[Tensor], None]:
        keep = torch.tensor(keeps[path])

        def fn(x: Tensor) -> None:
            full = x.double().norm(dim=1)
            kept = x.double().index_select(1, keep).norm(dim=1)
            sums[path][0] += float((kept / full.clamp(min=1e-12)).sum())
            sums[path][1] += full.numel()

        return fn

    with hooks(model, {p: accumulate(p) for p in keeps}):
        run(model, latents, chunk, "calibrating: norm statistics", progress)
    return {p: s / max(n, 1) for p, (s, n) in sums.items()}
