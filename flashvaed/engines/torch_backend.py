"""The PyTorch backend: a teacher or student module behind the engine API.

With ``kernel="triton"`` (CUDA only) every streaming causal conv runs the fused Triton kernel
instead of concatenate + conv + slice. With ``compile`` (``flashvaed.engines.compiled``) a
stream's steady steps run compiled (torch.compile, CUDA graphs); the first step and odd ones eager.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..models.blocks import other_temporal_convs, streaming_convs
from ..models.memory import check_decode
from ..models.streaming import ANY_CHUNK, StreamingDecoder, model_fingerprint
from ..models.vae import LatentDecoder
from .base import Decoder
from .compiled import SteadyStep, resolve_compile

KERNELS = ("torch", "triton")
FRAMES_ON = ("cpu", "device")


def check_frames_on(frames_on: str) -> None:
    if frames_on not in FRAMES_ON:
        raise InputError(f"{{frames_on}} must be cpu or device, got {frames_on!r}", "frames_on")


class TorchStream(StreamingDecoder):
    """A torch model's stream, handing frames back as float32 on the CPU like every engine, or on
    the model's device (``frames_on="device"``)."""

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        return self.hand_back(super()._step(latents, first))

    def hand_back(self, frames: Tensor) -> Tensor:
        frames = frames.float()
        return frames if self.source.frames_on == "device" else frames.cpu()

    def _flush(self) -> Tensor:
        frames = super()._flush()  # empty: placed, not copied
        # the model's device now, not at load: an offloading pipeline moves it between steps
        return frames.to(next(self.model.parameters()).device) if self.source.frames_on == "device" else frames


class CompiledStream(TorchStream):
    """A stream whose steady steps (see ``compiled``) run its decoder's ``SteadyStep``.

    Every step runs under ``no_grad`` rather than ``inference_mode``: compiled graphs guard on the
    kind of tensor they are given, and inference tensors would make the second step compile again.
    """

    def __init__(self, model: LatentDecoder, *, source: TorchDecoder, options: dict, steady: SteadyStep) -> None:
        super().__init__(model, source=source, options=options, inference=False)  # no_grad in _step
        self.steady = steady
        self.steady_chunk: int | None = None  # the stream's chunk length: its first step after the first

    def reset(self) -> None:
        super().reset()
        self.steady_chunk = None

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        n = latents.shape[2]
        if not first and self.steady_chunk is None:
            self.steady_chunk = n
        with torch.no_grad():
            if first or n != self.steady_chunk or not self.steady.takes(self.position, self.end):
                return super()._step(latents, first)  # eager
            p = next(self.model.parameters())
            x = latents.to(p.device, p.dtype)
            frames, self.state = self.steady(self, x, self.state, self.inputs, self.position, self.clamp)  # type: ignore[arg-type]
        return self.hand_back(frames)

    def _set_state(self, tensors: list[Tensor]) -> None:
        super()._set_state([t.detach().clone() for t in tensors])  # plain tensors, whatever mode made them


class TorchDecoder(Decoder):
    backend = "torch"
    chunk_range = ANY_CHUNK

    def __init__(
        self, model: LatentDecoder, kernel: str = "torch", compile: str | None = None, frames_on: str = "cpu"
    ) -> None:
        if kernel not in KERNELS:
            raise InputError(f"unknown {{kernel}} {kernel!r} (use {' or '.join(KERNELS)})", "kernel")
        check_frames_on(frames_on)
        self.frames_on = frames_on
        self.model = model.eval()
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.compile = resolve_compile(compile, p.device)
        self.steady = SteadyStep(model, self.compile) if self.compile != "none" else None
        self.latent_channels = model.latent_channels
        self.temporal_factor = model.temporal_factor
        self.spatial_factor = model.spatial_factor
        self.latency, self.output_offset = model.latency, model.output_offset
        self.step_inputs = model.step_inputs
        self.noise_scales = tuple(model.noise_scales)
        self.default_timestep, self.default_noise_scale = model.default_timestep, model.default_noise_scale
        self._fingerprint: str | None = None
        self._fits: set[tuple] = set()  # (latent shape, chunk) whose decode check_memory found to fit
        self.kernel = kernel
        if kernel == "triton":
            use_triton_kernel(model)

    @property
    def fingerprint(self) -> str:  # hashing full-size weights takes a moment: only when asked
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def stream(self, **options: Any) -> TorchStream:
        if self.steady is not None:
            return CompiledStream(self.model, source=self, options=options, steady=self.steady)
        return TorchStream(self.model, source=self, options=options)

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        return self.model.state_shapes(batch, height, width)

    def check_memory(self, shape: tuple[int, ...], chunk: int | None = None) -> None:
        """Measured once per shape and chunk: a pipeline decoding clip after clip pays it once."""
        key = (tuple(shape), chunk or self.default_chunk(), self.dtype, str(self.device))
        if key not in self._fits:
            check_decode(self.model, key[0], key[1], self.dtype, self.device)
            self._fits.add(key)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "kernel": self.kernel,
            "compile": self.compile,
            "frames_on": self.frames_on,
            "device": str(self.device),
            "dtype": str(self.dtype),
        }


def use_triton_kernel(model: LatentDecoder) -> int:
    """Route every streaming causal conv of a CUDA model through the fused Triton kernel."""
    from .kernel import streaming_causal_conv3d, triton_available

    if not triton_available():
        raise InputError("the triton kernel needs the triton package (pip install triton)")
    if next(model.parameters()).device.type != "cuda":
        raise InputError("the triton kernel runs on CUDA devices only; use {device} cuda or the torch kernel", "device")
    convs = streaming_convs(model)
    for conv in convs:
        conv.fused_step = streaming_causal_conv3d
    decoder = getattr(model, "decoder", model)  # what decoding runs: an encoder's convs are not its business
    others = other_temporal_convs(decoder if isinstance(decoder, nn.Module) else model)
    if others:  # said, not skipped in silence
        names = ", ".join(sorted({type(m).__name__ for m in others}))
        warnings.warn(
            f"the triton kernel runs {len(convs)} convs; {len(others)} temporal convs ({names}) stay torch ops",
            stacklevel=2,
        )
    return len(convs)
