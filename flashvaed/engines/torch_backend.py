"""The PyTorch backend: a teacher or student module behind the engine API.

With ``kernel="triton"`` (CUDA only) every streaming causal conv runs the fused Triton kernel
instead of concatenate + conv + slice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ..export.contract import ShapeRange
from ..export.onnx_export import model_fingerprint
from ..models.blocks import CausalConv3d
from ..models.streaming import State, zero_state
from ..models.wan import LatentDecoder
from .base import Decoder, Stream

KERNELS = ("torch", "triton")


class TorchStream(Stream):
    decoder: TorchDecoder

    def _start(self, batch: int, height: int, width: int) -> None:
        m = self.decoder
        self.state: State = zero_state(m.specs, batch, height, width, dtype=m.dtype, device=m.device)

    @torch.inference_mode()
    def _step(self, latents: Tensor, first: bool) -> Tensor:
        m = self.decoder
        frames, self.state = m.model.decode_step(latents.to(m.device, m.dtype), self.state, first=first)
        return frames.float().cpu()

    def _state(self) -> tuple[list[str], list[Tensor]]:
        return [s.name for s in self.decoder.specs], [t.cpu() for t in self.state]

    def _set_state(self, tensors: list[Tensor]) -> None:
        m = self.decoder
        self.state = tuple(t.to(m.device, m.dtype) for t in tensors)


class TorchDecoder(Decoder):
    backend = "torch"
    chunk_range = ShapeRange(1, 2, 1 << 30)

    def __init__(self, model: LatentDecoder, kernel: str = "torch") -> None:
        self.model = model.eval()
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.latent_channels = model.latent_channels
        self.temporal_factor = model.temporal_factor
        self.spatial_factor = model.spatial_factor
        self.specs = model.decoder_state_specs()
        self._fingerprint: str | None = None
        self.kernel = kernel
        if kernel not in KERNELS:
            raise InputError(f"unknown kernel {kernel!r} (use {' or '.join(KERNELS)})")
        if kernel == "triton":
            use_triton_kernel(model)

    @property
    def fingerprint(self) -> str:  # hashing full-size weights takes a moment: only when asked
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def stream(self) -> TorchStream:
        return TorchStream(self)

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        return [s.shape(batch, height, width) for s in self.specs]

    def describe(self) -> dict:
        return {**super().describe(), "kernel": self.kernel, "device": str(self.device), "dtype": str(self.dtype)}


def use_triton_kernel(model: LatentDecoder) -> int:
    """Route every streaming causal conv of a CUDA model through the fused Triton kernel."""
    from .kernel import streaming_causal_conv3d, triton_available

    if not triton_available():
        raise InputError("the triton kernel needs the triton package (pip install triton)")
    if next(model.parameters()).device.type != "cuda":
        raise InputError("the triton kernel runs on CUDA devices only; use --device cuda or the torch kernel")
    convs = [m for m in model.modules() if isinstance(m, CausalConv3d) and m.history]
    for conv in convs:
        conv.fused_step = streaming_causal_conv3d
    return len(convs)
