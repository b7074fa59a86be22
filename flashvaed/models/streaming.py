"""The streaming contract every decoder in flashvaed follows.

A causal decoder is a pure step function, ``frames, state = model.decode_step(latents, state)``.
``state`` is an ordered tuple of tensors whose shapes are fixed for a given (batch, h, w) and are
described up front by ``StateSpec`` records, so that the same model can be exported with its state
as graph inputs and outputs, run for many streams at once, and tested chunk by chunk.

Chunk 0 is a single latent frame decoded with ``first=True`` (the teacher's first-chunk rule: the
temporal upsamplers pass it through, giving one output frame); every later chunk holds any k >= 1
latent frames and gives ``temporal_factor * k`` frames. Concatenating the chunks' outputs equals
decoding the whole clip in one step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..errors import InputError

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: the last ``frames`` input frames of the causal conv called ``name``."""

    name: str
    channels: int
    frames: int
    scale: Fraction  # spatial size of the tensor relative to the model's input grid

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        return (batch, self.channels, self.frames, int(height * self.scale), int(width * self.scale))


def zero_state(
    specs: Sequence[StateSpec],
    batch: int,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> State:
    """The state before any frame was seen: zeros, which is what causal zero padding means."""
    return tuple(torch.zeros(spec.shape(batch, height, width), dtype=dtype, device=device) for spec in specs)


def state_nbytes(specs: Sequence[StateSpec], batch: int, height: int, width: int, itemsize: int) -> int:
    total = 0
    for spec in specs:
        n = 1
        for d in spec.shape(batch, height, width):
            n *= d
        total += n * itemsize
    return total


class StreamingBlock(nn.Module):
    """A module that takes its slice of the state and returns its new slice.

    Subclasses set ``num_states`` (a structural constant) and implement ``state_specs`` and
    ``forward(x, state, first) -> (y, new_state)``.
    """

    num_states: int = 0

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return []


def run_blocks(blocks: Sequence[StreamingBlock], x: Tensor, state: State, first: bool) -> tuple[Tensor, State]:
    """Run blocks in order, handing each the next ``num_states`` tensors of ``state``."""
    new_state: list[Tensor] = []
    i = 0
    for block in blocks:
        x, s = block(x, state[i : i + block.num_states], first)
        new_state.extend(s)
        i += block.num_states
    return x, tuple(new_state)


def blocks_state_specs(blocks: Sequence[StreamingBlock], name: str, scale: Fraction) -> list[StateSpec]:
    specs: list[StateSpec] = []
    for i, block in enumerate(blocks):
        specs.extend(block.state_specs(f"{name}.{i}", scale))
    return specs


@runtime_checkable
class StreamingDecoderModel(Protocol):
    """What teachers and students share: the step function and the facts needed to drive it."""

    latent_channels: int
    temporal_factor: int
    spatial_factor: int

    def decoder_state_specs(self) -> list[StateSpec]: ...

    def decode_step(
        self, latents: Tensor, state: State, first: bool = False, clamp: bool = True
    ) -> tuple[Tensor, State]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


def check_latents(model: StreamingDecoderModel, latents: Tensor) -> None:
    """Refuse latents the model cannot decode, naming the problem in one line."""
    if latents.dim() != 5:
        raise InputError(
            f"latents must have 5 dimensions (batch, {model.latent_channels}, frames, height, width), "
            f"got shape {tuple(latents.shape)}"
        )
    b, c, t, h, w = latents.shape
    if c != model.latent_channels:
        raise InputError(
            f"latents have {c} channels but the model reads {model.latent_channels} "
            f"(shape {tuple(latents.shape)}; expected (batch, {model.latent_channels}, frames, h, w))"
        )
    if b == 0:
        raise InputError("latents hold an empty batch (batch size 0)")
    if t == 0:
        raise InputError("latents hold zero frames")
    if h == 0 or w == 0:
        raise InputError(f"latents have an empty spatial size {h}x{w}")
    if not latents.is_floating_point():
        raise InputError(f"latents must be floating point, got {latents.dtype}")
    if not torch.isfinite(latents).all():
        raise InputError("latents contain NaN or Inf values")


def _model_dtype_device(model: StreamingDecoderModel) -> tuple[torch.dtype, torch.device]:
    p = next(iter(model.parameters()))
    return p.dtype, p.device


class StreamingDecoder:
    """One stream: feed latent chunks in order, get their frames back.

    The model stays pure; this object only holds the state tensors of its own stream, so any
    number of streams can share one model.
    """

    def __init__(self, model: StreamingDecoderModel) -> None:
        self.model = model
        self.state: State | None = None
        self._geometry: tuple[int, int, int] | None = None

    @property
    def started(self) -> bool:
        return self.state is not None

    def reset(self) -> None:
        self.state = None
        self._geometry = None

    @torch.inference_mode()
    def push(self, latents: Tensor) -> Tensor:
        """Decode the next latent frames of this stream (the first call may hold several)."""
        check_latents(self.model, latents)
        dtype, device = _model_dtype_device(self.model)
        latents = latents.to(device=device, dtype=dtype)
        b, _, _, h, w = latents.shape
        if self._geometry is not None and self._geometry != (b, h, w):
            raise InputError(f"chunk has batch/size {(b, h, w)} but this stream started with {self._geometry}")
        outputs = []
        if self.state is None:
            self._geometry = (b, h, w)
            initial = zero_state(self.model.decoder_state_specs(), b, h, w, dtype=dtype, device=device)
            frames, self.state = self.model.decode_step(latents[:, :, :1], initial, first=True)
            outputs.append(frames)
            latents = latents[:, :, 1:]
        if latents.shape[2]:
            frames, self.state = self.model.decode_step(latents, self.state)
            outputs.append(frames)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def chunk_bounds(num_frames: int, chunk: int) -> list[tuple[int, int]]:
    """Latent frame ranges of a clip: [0, 1) first, then ranges of ``chunk`` frames."""
    if chunk < 1:
        raise InputError(f"chunk must be at least 1 latent frame, got {chunk}")
    bounds = [(0, min(1, num_frames))]
    bounds += [(s, min(s + chunk, num_frames)) for s in range(1, num_frames, chunk)]
    return bounds


def iter_decode(model: StreamingDecoderModel, latents: Tensor, chunk: int = 1) -> Iterator[Tensor]:
    """Decode a clip chunk by chunk, yielding each chunk's frames (memory stays flat)."""
    check_latents(model, latents)
    stream = StreamingDecoder(model)
    for start, stop in chunk_bounds(latents.shape[2], chunk):
        yield stream.push(latents[:, :, start:stop])


def decode(model: StreamingDecoderModel, latents: Tensor, chunk: int | None = None) -> Tensor:
    """Decode a whole clip; ``chunk=None`` steps once over everything after the first frame."""
    check_latents(model, latents)
    chunk = max(1, latents.shape[2] - 1) if chunk is None else chunk
    return torch.cat(list(iter_decode(model, latents, chunk)), dim=2)
