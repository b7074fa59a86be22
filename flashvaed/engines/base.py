"""One streaming decoder API over every backend.

A ``Decoder`` decodes whole clips (``decode(latents, chunk=k)``) and opens independent
``Stream`` sessions that take latent chunks in order. A backend implements two things: how to
start a stream (its state buffers, allocated once) and one step. Everything else — input checks,
splitting pushes into chunks the engine accepts, padding a clip's last short chunk — lives here,
written once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..export.contract import Contract, ShapeRange
from ..models.streaming import check_latents, chunk_bounds


@dataclass
class StreamState:
    """A stream's state lifted out of its session: resume it later, in another stream of the same model."""

    fingerprint: str  # the model it belongs to
    geometry: tuple[int, int, int]  # batch, latent height, latent width
    names: list[str]
    tensors: list[Tensor]


def as_tensor(latents: Tensor | np.ndarray) -> Tensor:
    if isinstance(latents, np.ndarray):
        return torch.from_numpy(latents)
    if not isinstance(latents, Tensor):
        raise InputError(f"latents must be a torch tensor or numpy array, got {type(latents).__name__}")
    return latents


class Stream:
    """One stream's session. Subclasses implement ``_start`` and ``_step``."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.geometry: tuple[int, int, int] | None = None

    @property
    def started(self) -> bool:
        return self.geometry is not None

    def reset(self) -> None:
        self.geometry = None

    def push(self, latents: Tensor | np.ndarray, final: bool = False) -> Tensor:
        """Decode the next latent frames of this stream; returns their frames (float32, CPU).

        Pushes are split into chunks the engine accepts. A remainder shorter than the engine's
        minimum chunk is refused unless ``final`` (the stream ends there): it is then padded by
        repeating its last latent frame and the extra frames are dropped, which is exact because
        the decoder is causal.
        """
        latents = as_tensor(latents)
        check_latents(self.decoder, latents)
        b, _, _, h, w = latents.shape
        if self.geometry is None:
            self.decoder.check_geometry(b, h, w)
        elif self.geometry != (b, h, w):
            raise InputError(f"chunk has batch/size {(b, h, w)} but this stream started with {self.geometry}")
        outputs: list[Tensor] = []
        if self.geometry is None:
            self.geometry = (b, h, w)
            self._start(b, h, w)
            outputs.append(self._step(latents[:, :, :1], first=True))
            latents = latents[:, :, 1:]
        rng = self.decoder.chunk_range
        while latents.shape[2]:
            n = min(latents.shape[2], rng.max)
            piece, latents = latents[:, :, :n], latents[:, :, n:]
            if n < rng.min:
                if not final:
                    raise InputError(
                        f"a chunk of {n} latent frames is below this engine's minimum of {rng.min} "
                        f"(built for chunks {rng.describe()}); push more frames or pass final=True"
                    )
                pad = piece[:, :, -1:].expand(-1, -1, rng.min - n, -1, -1)
                frames = self._step(torch.cat([piece, pad], dim=2), first=False)
                outputs.append(frames[:, :, : n * self.decoder.temporal_factor])
            else:
                outputs.append(self._step(piece, first=False))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

    def save_state(self) -> StreamState:
        if self.geometry is None:
            raise InputError("this stream has not started: there is no state to save")
        names, tensors = self._state()
        return StreamState(self.decoder.fingerprint, self.geometry, names, [t.clone() for t in tensors])

    def load_state(self, state: StreamState) -> None:
        """Continue from a saved state; refused if it belongs to another model or has other shapes."""
        if state.fingerprint != self.decoder.fingerprint:
            raise InputError(
                f"state belongs to model {state.fingerprint}, but this decoder runs model {self.decoder.fingerprint}"
            )
        self.decoder.check_geometry(*state.geometry)
        expected = self.decoder.state_shapes(*state.geometry)
        if len(state.tensors) != len(expected):
            raise InputError(f"state has {len(state.tensors)} tensors, this model needs {len(expected)}")
        for name, t, shape in zip(state.names, state.tensors, expected, strict=True):
            if tuple(t.shape) != shape:
                raise InputError(f"state tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        self.geometry = state.geometry
        self._start(*state.geometry)
        self._set_state(state.tensors)

    # backends -----------------------------------------------------------------------------------
    def _start(self, batch: int, height: int, width: int) -> None:
        raise NotImplementedError

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        raise NotImplementedError

    def _state(self) -> tuple[list[str], list[Tensor]]:
        raise NotImplementedError

    def _set_state(self, tensors: list[Tensor]) -> None:
        raise NotImplementedError


class Decoder:
    """Facts every backend provides, and whole-clip decoding written once over ``stream()``."""

    backend: str
    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    fingerprint: str
    chunk_range: ShapeRange = ShapeRange(1, 1, 1 << 30)

    def stream(self) -> Stream:
        raise NotImplementedError

    def check_geometry(self, batch: int, height: int, width: int) -> None:
        """Refuse a batch or latent size the engine was not built for (torch models take any)."""

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "fingerprint": self.fingerprint}

    def iter_decode(self, latents: Tensor | np.ndarray, chunk: int | None = None) -> Iterator[Tensor]:
        """Frames chunk by chunk, in a new stream; the latents, chunk and size are checked up front."""
        latents = as_tensor(latents)
        check_latents(self, latents)
        chunk = self.default_chunk() if chunk is None else chunk
        if chunk < 1:
            raise InputError(f"chunk must be at least 1 latent frame, got {chunk}")
        if chunk not in self.chunk_range:
            raise InputError(f"chunk {chunk} is outside this engine's chunk range {self.chunk_range.describe()}")
        self.check_geometry(latents.shape[0], latents.shape[3], latents.shape[4])
        t = latents.shape[2]

        def pieces() -> Iterator[Tensor]:
            stream = self.stream()
            for start, stop in chunk_bounds(t, chunk):
                yield stream.push(latents[:, :, start:stop], final=stop == t)

        return pieces()

    def decode(self, latents: Tensor | np.ndarray, chunk: int | None = None) -> Tensor:
        """Frames (B, 3, 1 + 4(T-1), 8h, 8w) in [-1, 1], float32 on the CPU."""
        return torch.cat(list(self.iter_decode(latents, chunk)), dim=2)

    def default_chunk(self) -> int:
        return self.chunk_range.opt


class ContractDecoder(Decoder):
    """A decoder driven by an export's contract: its facts, shape ranges and state shapes."""

    def __init__(self, contract: Contract) -> None:
        self.contract = contract
        self.latent_channels = contract.latent_channels
        self.temporal_factor = contract.temporal_factor
        self.spatial_factor = contract.spatial_factor
        self.fingerprint = contract.model["fingerprint"]
        self.chunk_range = contract.shapes["chunk"]

    def check_geometry(self, batch: int, height: int, width: int) -> None:
        shapes, s = self.contract.shapes, self.spatial_factor
        if batch not in shapes["batch"]:
            raise InputError(f"this engine was built for batch {shapes['batch'].describe()}, got {batch}")
        for what, value in (("height", height), ("width", width)):
            r = shapes[what]
            if value not in r:
                raise InputError(
                    f"this engine was built for {what} {r.describe()} latent ({r.min * s}..{r.max * s} px), "
                    f"got {value} latent ({value * s} px)"
                )

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        return [tuple(int(v) for v in t.shape(batch, height, width)) for t in self.contract.state]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.contract.precision, "plugins": self.contract.plugins}
