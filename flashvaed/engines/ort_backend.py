"""The ONNX Runtime backend: drive an export (or an optimised engine) through its contract.

One pair of sessions serves every stream (``run_with_iobinding`` is safe from many threads);
each stream owns its IO bindings and two sets of state buffers, allocated once when it starts
and swapped after every step: step n reads set A and writes set B, step n+1 the other way.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from ..errors import InputError
from ..export.contract import Contract
from .base import ContractDecoder, Stream

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def default_providers() -> list[str]:
    """CUDA first where ONNX Runtime has it and a GPU is present, then CPU (TensorRT EP only when asked).

    onnxruntime-gpu lists the CUDA provider even on machines without a GPU, hence the torch check.
    """
    available = ort.get_available_providers()
    gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in available
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]


def check_providers(providers: list[str]) -> list[str]:
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise InputError(f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(available)})")
    return providers


def session_options(settings: dict | None = None) -> ort.SessionOptions:
    settings = settings or {}
    options = ort.SessionOptions()
    level = settings.get("graph_optimization_level", "ORT_ENABLE_ALL")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = int(settings.get("intra_op_num_threads", 0))
    options.log_severity_level = 3
    return options


class OrtStream(Stream):
    source: OnnxRuntimeDecoder

    def _start(self, batch: int, height: int, width: int) -> None:
        d = self.source
        dtype = NUMPY_DTYPES[d.contract.state_dtype]
        shapes = d.state_shapes(batch, height, width)
        self.buffers = [[np.zeros(s, dtype) for s in shapes] for _ in range(2)]
        values = [[ort.OrtValue.ortvalue_from_numpy(a) for a in bufs] for bufs in self.buffers]
        self.current = 0  # the set holding the state the next step reads
        # state is bound once: ``first`` writes set 0; steady binding i reads set i, writes the other
        self.first_binding = d.sessions["first"].io_binding()
        for i, t in enumerate(d.contract.state):
            self.first_binding.bind_ortvalue_output(t.output, values[0][i])
        self.steady_bindings = []
        for src in (0, 1):
            binding = d.sessions["steady"].io_binding()
            for i, t in enumerate(d.contract.state):
                binding.bind_ortvalue_input(t.input, values[src][i])
                binding.bind_ortvalue_output(t.output, values[1 - src][i])
            self.steady_bindings.append(binding)

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        d = self.source
        binding = self.first_binding if first else self.steady_bindings[self.current]
        b, _, k, h, w = latents.shape
        s = d.spatial_factor
        frames = np.empty((b, 3, 1 if first else d.temporal_factor * k, h * s, w * s), np.float32)
        binding.bind_ortvalue_input("latents", ort.OrtValue.ortvalue_from_numpy(latents_array(latents)))
        binding.bind_ortvalue_output("frames", ort.OrtValue.ortvalue_from_numpy(frames))
        d.sessions["first" if first else "steady"].run_with_iobinding(binding)
        if not first:
            self.current = 1 - self.current
        return torch.from_numpy(frames)

    def _state(self) -> tuple[list[str], list[Tensor]]:
        return [t.name for t in self.source.contract.state], [torch.from_numpy(a) for a in self.buffers[self.current]]

    def _set_state(self, tensors: list[Tensor]) -> None:
        for a, t in zip(self.buffers[self.current], tensors, strict=True):
            a[...] = t.numpy()


def latents_array(latents: Tensor) -> np.ndarray:
    return np.ascontiguousarray(latents.detach().cpu().float().numpy())


class OnnxRuntimeDecoder(ContractDecoder):
    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        contract: Contract,
        providers: list[str] | None = None,
        settings: dict | None = None,
    ) -> None:
        super().__init__(contract)
        self.path = Path(path)
        if contract.precision not in ("fp32", "fp16"):
            raise InputError(f"ONNX Runtime streams take fp32 or fp16 state; this export is {contract.precision}")
        backend = contract.backend or {}
        self.providers = check_providers(providers or backend.get("providers") or default_providers())
        options = session_options(settings or backend.get("session_options"))
        self.sessions = {
            g: ort.InferenceSession(str(self.path / f), options, providers=self.providers)
            for g, f in contract.files.items()
        }

    def stream(self) -> OrtStream:
        return OrtStream(self)

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers}
