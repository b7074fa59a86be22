"""Latents sampled by a diffusion pipeline: the calibration and distillation data a student serves.

``sample_latents`` runs a diffusers pipeline from a local folder (``DiffusionPipeline.from_pretrained``,
nothing downloaded) once per prompt with ``output_type="latent"`` and writes one latents file per
prompt: ``NNNN.safetensors`` holding ``latents``, (1, z, T, h, w) float32, what ``prune --calib`` and
``distill -d`` read from a folder. They are the pipeline's own latents, **normalised** (diffusion
space: what the transformer denoises), which is what flashvaed's models take: pipelines
de-normalise only for their VAE (Wan ``z * std + mean``, LTX ``z * std / scaling_factor + mean``)
and flashvaed's decoders do the same inside. LTX pipelines return their latents packed into
tokens; they are unpacked to (1, z, T, h, w) here. ``prompts.json`` beside them records each
file's prompt and the settings. The folder is written aside and swapped in whole.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import atomic_output
from .devices import resolve_device, resolve_dtype
from .errors import InputError
from .io import TENSOR_SUFFIXES
from .progress import track
from .safeload import check_file

__all__ = ["MAX_PROMPTS", "MAX_PROMPT_CHARS", "read_prompts", "sample_latents"]

MAX_PROMPTS = 10_000  # a calibration or distillation set; more is a mistake (a wrong file)
MAX_PROMPT_CHARS = 2_000  # text encoders truncate far below this (Wan 512 tokens, LTX 128)
MAX_PROMPTS_BYTES = MAX_PROMPTS * (MAX_PROMPT_CHARS + 1) * 4  # every prompt at its longest, 4 bytes a character
RECORD = "prompts.json"


def read_prompts(prompts: str | os.PathLike | Sequence[str]) -> list[str]:
    """The prompts of a file (one per line, blank lines skipped) or a list, checked."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        size = check_file(path, InputError, "prompts file")  # refused unopened: missing, a pipe, a device
        if size > MAX_PROMPTS_BYTES:
            raise InputError(f"{path} is {size} bytes; a prompts file is at most {MAX_PROMPTS_BYTES} bytes")
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"{path} is not UTF-8 text (one prompt per line)") from None
        where = str(path)
    else:
        lines, where = list(prompts), "the prompts"
    found: list[str] = []
    for number, line in enumerate(lines, 1):
        if not isinstance(line, str):
            raise InputError(f"{where}: prompt {number} is not text ({type(line).__name__})")
        text = line.strip()
        if not text:
            continue
        if len(text) > MAX_PROMPT_CHARS:
            raise InputError(
                f"{where}: line {number} has {len(text)} characters; a prompt has at most {MAX_PROMPT_CHARS}"
            )
        found.append(text)
        if len(found) > MAX_PROMPTS:
            raise InputError(f"{where}: more than {MAX_PROMPTS} prompts; sample them in several runs")
    if not found:
        raise InputError(f"{where} holds no prompt (one per line)")
    return found


def _is_latents_dir(path: Path) -> bool:
    """A folder this module wrote (its record), which a new run may replace."""
    return (path / RECORD).is_file() and all(p.suffix in TENSOR_SUFFIXES or p.name == RECORD for p in path.iterdir())


@contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """Without progress: no loading bars from diffusers and transformers either (restored after)."""
    if not quiet:
        yield
        return
    from diffusers.utils import logging as diffusers_logging

    loggers: list[Any] = [diffusers_logging]
    try:
        from transformers.utils import logging as transformers_logging

        loggers.append(transformers_logging)
    except ImportError:  # a pipeline without text encoders
        pass
    was = [m.is_progress_bar_enabled() for m in loggers]
    for m in loggers:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in zip(loggers, was, strict=True):
            if on:
                m.enable_progress_bar()


def _load_pipeline(folder: Path, dtype: torch.dtype) -> Any:
    if not (folder / "model_index.json").is_file():
        raise InputError(f"{folder} is not a diffusers pipeline folder (no model_index.json)", "pipeline")
    from diffusers import DiffusionPipeline

    from . import diffusers as _flashvae  # noqa: F401  (a saved pipeline may hold a FlashVAE)

    options = {"torch_dtype": dtype} if dtype != torch.float32 else {}
    try:
        with warnings.catch_warnings():  # diffusers >= 0.36 renames it `dtype`; older ones take only this
            warnings.filterwarnings("ignore", message=".*use `dtype` instead", category=FutureWarning)
            return DiffusionPipeline.from_pretrained(folder, local_files_only=True, **options)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load the pipeline in {folder}: {first[:240]}") from None


def _call_defaults(pipe: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(pipe.__call__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _as_clip(pipe: Any, latents: Tensor, size: dict[str, int]) -> Tensor:
    """The pipeline's latent output as (B, z, T, h, w): LTX pipelines return tokens (B, T*h*w, z)."""
    if latents.dim() == 5:
        return latents
    if latents.dim() == 3 and hasattr(pipe, "_unpack_latents"):
        t = (size["num_frames"] - 1) // pipe.vae_temporal_compression_ratio + 1
        h = size["height"] // pipe.vae_spatial_compression_ratio
        w = size["width"] // pipe.vae_spatial_compression_ratio
        return pipe._unpack_latents(
            latents, t, h, w, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        )
    raise InputError(f"{type(pipe).__name__} returned latents of shape {tuple(latents.shape)}, not a video's")


def sample_latents(
    pipeline: str | os.PathLike,
    prompts: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    *,
    steps: int = 30,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = False,
) -> list[Path]:
    """Run the pipeline in the folder ``pipeline`` once per prompt (seed ``seed + i`` for the i-th)
    and write ``out``/NNNN.safetensors (normalised latents, (1, z, T, h, w) float32) and
    ``prompts.json``; returns the latents files. ``height``/``width``/``frames``/``guidance_scale``:
    the pipeline's own defaults where not given."""
    for name, value, least in (("steps", steps, 1), ("height", height, 1), ("width", width, 1), ("frames", frames, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise InputError(f"{{{name}}} must be a whole number >= {least}, got {value!r}", name)
    texts = read_prompts(prompts)
    folder, out = Path(pipeline), Path(out)
    if not folder.is_dir():
        raise InputError(f"pipeline folder not found: {folder}", "pipeline")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    from .atomic import check_output

    check_output(out, directory=True, replaceable=_is_latents_dir, what="a latents folder", inputs=[folder])
    with _quiet_loading(not progress):
        pipe = _load_pipeline(folder, dt).to(dev)
    pipe.set_progress_bar_config(disable=True)  # one bar here, per prompt
    defaults = _call_defaults(pipe)
    size = {
        "height": height if height is not None else defaults.get("height"),
        "width": width if width is not None else defaults.get("width"),
        "num_frames": frames if frames is not None else defaults.get("num_frames"),
    }
    options: dict[str, Any] = {"num_inference_steps": steps, "output_type": "latent", **size}
    if guidance_scale is not None:
        options["guidance_scale"] = guidance_scale
    if negative_prompt is not None:
        options["negative_prompt"] = negative_prompt
    record: dict[str, Any] = {
        "pipeline": str(folder),
        "class": type(pipe).__name__,
        "latents": "normalised (diffusion space), (1, z, T, h, w) float32 under the key 'latents'",
        "settings": {"steps": steps, **size, "seed": seed, "guidance_scale": guidance_scale, "dtype": dtype},
        "files": {},
    }
    written: list[Path] = []
    from safetensors.torch import save_file

    with atomic_output(out, directory=True, replaceable=_is_latents_dir, what="a latents folder") as tmp:
        for i, text in enumerate(track(texts, len(texts), "sampling latents", progress)):
            generator = torch.Generator(dev).manual_seed(seed + i)
            with torch.inference_mode():
                result = pipe(prompt=text, generator=generator, **options)
            latents = _as_clip(pipe, result.frames, size).float().cpu().contiguous()
            if not torch.isfinite(latents).all():
                raise InputError(f"the pipeline gave non-finite latents for prompt {i + 1} ({text[:60]!r})")
            name = f"{i:04d}.safetensors"
            save_file({"latents": latents}, str(tmp / name))
            record["files"][name] = {"prompt": text, "seed": seed + i, "shape": list(latents.shape)}
            written.append(out / name)
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
    return written
