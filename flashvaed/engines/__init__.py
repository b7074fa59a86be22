"""Engines: one streaming decoder API over torch models, ONNX exports and built engines.

``load(path)`` takes whatever a MODEL argument may name — a checkpoint, a student directory, an
export directory or an engine directory — and returns a ``Decoder`` with ``decode(latents,
chunk=k)`` and ``stream()`` sessions, whatever runs underneath.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from ..errors import InputError
from ..export.contract import ENGINE_FORMAT, Contract, is_manifest_dir, read_manifest
from ..models import load_model
from ..models.vae import LatentDecoder
from .base import Decoder, Stream, StreamState
from .compiled import COMPILE_MODES, refuse_for_engine, resolve_compile
from .torch_backend import TorchDecoder, check_frames_on

__all__ = ["COMPILE_MODES", "Decoder", "Stream", "StreamState", "TorchDecoder", "check_backend", "load"]


def check_backend(contract: Contract, where: str) -> None:
    """Refuse an engine manifest whose ``backend`` section its backend would choke on, for every
    reader of the manifest (``read_manifest`` calls this: ``info`` runs nothing, yet must not show a lie)."""
    if contract.format != ENGINE_FORMAT:
        return
    backend = contract.backend or {}
    name = backend.get("name", "onnxruntime")
    providers = backend.get("providers", [])
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        raise InputError(f"{where}: backend.providers must be a list of names, got {providers!r:.80}")
    if name == "onnxruntime":
        from .ort_backend import check_backend as check_onnxruntime

        check_onnxruntime(backend, where)
    elif name != "tensorrt":
        raise InputError(f"{where}: backend.name {name!r} is not a backend this version runs (onnxruntime, tensorrt)")


def load(
    source: str | os.PathLike | LatentDecoder,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    kernel: str = "torch",
    providers: list[str] | None = None,
    compile: str | None = None,
    frames_on: str = "cpu",
) -> Decoder:
    """A decoder for ``source``; ``device``/``dtype``/``kernel``/``compile``/``frames_on`` apply to
    torch models, ``providers`` to ONNX Runtime (default: CUDA when present, then CPU).

    ``compile`` (``compiled.COMPILE_MODES``): None/"none" eager; "inductor" (torch.compile, static
    shapes), "cudagraphs" and "max" (CUDA) run a stream's steady steps compiled, paying the compile
    once per shape; "auto" is the measured fastest safe choice for the device (docs/runtimes.md).

    ``frames_on``: "cpu" (every engine's contract: frames float32 on the host) or "device" (float32
    on the model's device: no host copy and no wait for the GPU per step, what a GPU pipeline wants).
    """
    check_frames_on(frames_on)
    if isinstance(source, LatentDecoder):
        resolve_compile(compile, device)  # refused before a copy of the model is made
        p = next(source.parameters())
        if p.dtype != dtype or p.device != torch.device(device):  # convert a copy, not the caller's model
            source = copy.deepcopy(source).to(device, dtype)
        return TorchDecoder(source, kernel, compile, frames_on)
    path = Path(source)
    if not is_manifest_dir(path):
        resolve_compile(compile, device)  # refused before the checkpoint is read
        return TorchDecoder(load_model(path).to(device, dtype), kernel, compile, frames_on)
    contract = read_manifest(path)
    backend = (contract.backend or {}).get("name", "onnxruntime") if contract.format == ENGINE_FORMAT else "onnxruntime"
    refuse_for_engine(compile, "TensorRT" if backend == "tensorrt" else "ONNX Runtime")
    if frames_on != "cpu":
        runtime = "TensorRT" if backend == "tensorrt" else "ONNX Runtime"
        raise InputError(
            f"{{frames_on}} {frames_on} applies to torch models; {runtime} engines hand frames back on the CPU",
            "frames_on",
        )
    if backend == "onnxruntime":
        from .ort_backend import OnnxRuntimeDecoder

        return OnnxRuntimeDecoder(path, contract, providers)
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTDecoder

        return TensorRTDecoder(path, contract)
    raise InputError(f"{path} is an engine for unknown backend {backend!r}")
