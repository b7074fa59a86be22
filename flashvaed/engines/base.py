"""One streaming decoder API over every backend.

A ``Decoder`` decodes whole clips (``decode(latents, chunk=k)``) and opens independent streams
(``stream()``) that take latent chunks in order. The loop itself — input checks, splitting pushes
into chunks the engine accepts, padding a clip's last short chunk, saved states — is
``flashvaed.models.streaming.Stream``, the same one torch models use; a backend implements how a
stream starts and one step.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..export.contract import Contract
from ..models.streaming import (
    ANY_CHUNK,
    ShapeRange,
    Stream,
    StreamState,
    as_tensor,
    clocked,
    conditioning_inputs,
    iter_decode,
)

__all__ = ["ContractDecoder", "Decoder", "Stream", "StreamState", "as_tensor"]


class Decoder:
    """Facts every backend provides, and whole-clip decoding written once over ``stream()``."""

    backend: str
    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    latency: int = 0
    output_offset: int = 0
    step_inputs: tuple[str, ...] = ()  # extra per-stream inputs (an LTX timestep, noise maps)
    noise_scales: tuple[Fraction, ...] = ()  # the noise maps' grids relative to the latent grid
    default_timestep: float | None = None  # conditioned decoders: their pipeline's decode timestep ...
    default_noise_scale: float | None = None  # ... and decode-time latent noise
    chunk_range: ShapeRange = ANY_CHUNK

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def stream(self, **options: Any) -> Stream:
        """A new stream; ``options`` are the model's stream options (a timestep, a seed)."""
        raise NotImplementedError

    def adopt_facts(self, inner: Decoder) -> None:
        """Take ``inner``'s facts: a decoder wrapping another (tiled, sharded) decodes what it decodes."""
        for name in (
            "backend", "latent_channels", "temporal_factor", "spatial_factor", "latency", "output_offset",
            "step_inputs", "noise_scales", "default_timestep", "default_noise_scale", "chunk_range",
        ):  # fmt: skip
            setattr(self, name, getattr(inner, name))

    def check_geometry(self, batch: int, height: int, width: int) -> None:
        """Refuse a batch or latent size the engine was not built for (torch models take any)."""

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def check_memory(self, shape: tuple[int, ...], chunk: int | None = None) -> None:
        """Refuse latents whose decode would not fit in memory (engines: their build ranges bound it)."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "fingerprint": self.fingerprint}

    def iter_decode(self, latents: Tensor | np.ndarray, chunk: int | None = None, **options: Any) -> Iterator[Tensor]:
        """Frames chunk by chunk, in a new stream; the latents, chunk and size are checked up front."""
        return iter_decode(self, latents, chunk, **options)  # chunk None: the engine's optimum

    def decode(self, latents: Tensor | np.ndarray, chunk: int | None = None, **options: Any) -> Tensor:
        """Frames (B, 3, 1 + t(T-1), s*h, s*w) in [-1, 1], float32 on the CPU."""
        return torch.cat(list(self.iter_decode(latents, chunk, **options)), dim=2)

    def default_chunk(self) -> int:
        return self.chunk_range.opt


class ContractDecoder(Decoder):
    """A decoder driven by an export's contract: its facts, shape ranges and state shapes."""

    def __init__(self, contract: Contract) -> None:
        self.contract = contract
        self.latent_channels = contract.latent_channels
        self.temporal_factor = contract.temporal_factor
        self.spatial_factor = contract.spatial_factor
        self.latency, self.output_offset = contract.latency, contract.output_offset
        self.step_inputs = tuple(contract.step_inputs)
        self.noise_scales = tuple(contract.noise_scales)
        self.default_timestep, self.default_noise_scale = contract.default_timestep, contract.default_noise_scale
        self._fingerprint = contract.model["fingerprint"]
        self.chunk_range = contract.shapes["chunk"]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def step_graph(self, first: bool, end: int | None) -> str:
        """The graph a stream step runs: ``first``, then ``steady``; ``last`` once a decoder with
        latency knows the clip's end (see the contract's clock rule)."""
        if first:
            return "first"
        return "last" if self.latency and end is not None else "steady"

    def step_frames(self, first: bool, chunk: int) -> int:
        """Output frames (positions, for a clocked decoder) of a step over ``chunk`` latent frames."""
        return 1 if first and not clocked(self) else self.temporal_factor * chunk

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse stream options this engine does not take (before any step)."""
        self.stream_inputs(None, 1, 1, options)

    def stream_inputs(self, batch: int | None, height: int, width: int, options: dict[str, Any]) -> dict[str, Any]:
        """The per-stream graph inputs (``timestep``, ``noise/i``) as float32 numpy arrays."""
        if not self.step_inputs:
            if options:
                raise InputError(f"this engine's graphs take no stream options, got {', '.join(sorted(options))}")
            return {}
        c = self.contract
        inputs = conditioning_inputs(
            c.step_inputs, c.noise_scales, batch, height, width, default_timestep=c.default_timestep, **options
        )
        arrays = {"timestep": inputs["timestep"].numpy()} if "timestep" in inputs else {}
        arrays.update({f"noise/{i}": n.numpy() for i, n in enumerate(inputs.get("noise", ()))})
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

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
