"""Exact tiled decoding over any decoder: frames larger than memory (or an engine) allows.

``TiledDecoder(inner, tile)`` decodes every latent frame as tiles whose regions are ``tile``
latent pixels (core plus halo, ``flashvaed.models.tiling``) and equals decoding untiled. Two
orders serve the two ways of decoding:

* whole clips (``decode``, ``iter_decode``) go **tile by tile**: each tile streams the whole clip
  and writes its core into the output, so only one tile's stream state and working memory are
  alive at once: memory is bounded by the tile, not the frame (plus the output clip itself);
* streams (``stream()``, ``push``) go **chunk by chunk**: every push steps every tile, each with
  its own state (explicit, fixed-shape, saved and loaded like any stream's).

Frame-wide modules (Wan's middle attention, per-frame group norms) are exact in both: before the
pass that decodes, each tile runs up to such a module and contributes its core to the frame's
context there (``TilePlan``), once per frame-wide module. Torch models tile with every family.
Engines (ONNX Runtime, TensorRT) tile at the size they were built for, so one static engine serves
every larger frame: any export of a decoder without frame-wide modules, and an export made with
``tiling`` of one with them (its capture graphs do the passes; ``engines.tiled_engine``), which
goes chunk by chunk for whole clips too (a capture graph does not advance the state).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..models.memory import decode_step_bytes
from ..models.streaming import (
    Stream,
    as_tensor,
    check_chunk,
    check_latents,
    clocked,
    conditioning_inputs,
    push_clip,
)
from ..models.tiling import Captured, Tile, TilePlan, merge, plan_tiling, redundancy, tile_grid
from ..safeload import gib
from . import tiled_engine
from .base import ContractDecoder, Decoder
from .torch_backend import TorchDecoder, TorchStream

__all__ = ["TiledDecoder", "parse_tile", "tiled"]


def parse_tile(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``HxW`` or ``N`` (square), latent pixels, as (height, width); None stays None."""
    if text is None or isinstance(text, tuple):
        return text
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"{{tile}} must be HxW or N latent pixels, got {text!r}", "tile") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise InputError(f"{{tile}} must be HxW or N latent pixels (each at least 1), got {text!r}", "tile")
    return values[0], values[1]


class TileTorchStream(TorchStream):
    """One tile's stream of a torch model, whose steps run the frame-wide modules with the frame's
    contexts (``contexts``: step -> module index -> resolved) and capture module ``capture``."""

    def __init__(self, model: Any, source: Any, options: dict, plan: TilePlan, tile: Tile, frame: tuple[int, int]):
        super().__init__(model, source=source, options=options)
        self.plan, self.tile, self.frame = plan, tile, frame
        self.contexts: dict[int, dict[int, Any]] = {}
        self.capture: int | None = None
        # tile by tile, a stopped step keeps the state entries it produced before the stop; chunk by
        # chunk the step is run again from the chunk's state, so nothing of it is kept
        self.keep_state = True
        self.captured: dict[int, Captured] = {}
        self.steps = 0

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        n = self.steps
        self.steps += 1
        # a capture stops the step where the state it leaves is known (or not wanted); else the step
        # runs on with the module's own output on the region
        stop = self.plan.producers is not None or not self.keep_state
        with self.plan.hooks(self.tile, self.frame, self.contexts.get(n, {}), self.capture, stop) as record:
            try:
                frames = super()._step(latents, first)
            except Captured as c:
                c.__traceback__ = None  # its frames would keep this tile's activations alive
                self.captured[n] = c
                if self.keep_state:  # the entries produced before the stop; later ones are never read here
                    self.state = record.state(self.state)  # type: ignore[arg-type]
                b, _, k, h, w = latents.shape
                src, s = self.source, self.source.spatial_factor
                t = 1 if first and not clocked(src) else src.temporal_factor * k
                return torch.zeros(b, 3, t, h * s, w * s)
        if record.captured is not None:
            self.captured[n] = record.captured
        return frames


class TiledDecoder(Decoder):
    """``inner`` decoding every frame as tiles of ``tile`` latent pixels (region: core and halo)."""

    def __init__(self, inner: Decoder, tile: tuple[int, int] | None = None) -> None:
        if not isinstance(inner, (TorchDecoder, ContractDecoder)):
            raise InputError(f"{type(inner).__name__} decoders cannot be tiled (torch models, exports and engines can)")
        self.inner = inner
        self.adopt_facts(inner)
        self.plan: TilePlan | None = None
        if isinstance(inner, TorchDecoder):
            self.plan = plan_tiling(inner.model)
            self.halo = self.plan.halo
        else:
            self.halo = engine_halo(inner)
        self.tile = tile
        self._grids: dict[tuple[int, int], list[Tile]] = {}

    # facts ----------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint}/tiles"

    def grid(self, height: int, width: int) -> list[Tile]:
        """The tiles of a latent frame of ``height`` x ``width``."""
        key = (height, width)
        if key not in self._grids:
            try:
                self._grids[key] = tile_grid(height, width, self.region_size(height, width), self.halo)
            except InputError as e:
                if not isinstance(self.inner, ContractDecoder):
                    raise
                raise InputError(_engine_too_small(self.inner, self.halo, height, width, e)) from None
        return self._grids[key]

    def region_size(self, height: int, width: int) -> tuple[int, int]:
        """The latent size each tile decodes: the given tile, or an engine's largest."""
        if isinstance(self.inner, ContractDecoder):
            shapes = self.inner.contract.shapes
            size = (min(height, shapes["height"].max), min(width, shapes["width"].max))
            if self.tile is not None:
                size = (min(size[0], self.tile[0]), min(size[1], self.tile[1]))
            return size
        return self.tile if self.tile is not None else (height, width)

    def check_geometry(self, batch: int, height: int, width: int) -> None:
        if tiled_engine.has_contexts(self.inner):
            tiled_engine.check_frame(self.inner, height, width)  # type: ignore[arg-type]
        tiles = self.grid(height, width)
        for size in sorted({t.size for t in tiles}):
            try:
                self.inner.check_geometry(batch, *size)
            except InputError as e:
                raise InputError(f"a tile of {size[0]}x{size[1]} latent pixels: {e}") from None

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        return [s for t in self.grid(height, width) for s in self.inner.state_shapes(batch, *t.size)]

    def check_memory(self, shape: tuple[int, ...], chunk: int | None = None) -> None:
        b, c, t, h, w = shape
        sizes = {tile.size for tile in self.grid(h, w)}
        for th, tw in sizes:
            self.inner.check_memory((b, c, t, th, tw), chunk)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "tiling": {"tile": self.tile, "halo": list(self.halo)}}

    def tiling_report(self, height: int, width: int) -> dict[str, Any]:
        """The grid of a latent frame and the compute its halos cost."""
        tiles = self.grid(height, width)
        return {
            "tiles": len(tiles),
            "region": list(self.region_size(height, width)),
            "halo": list(self.halo),
            "redundancy": redundancy(height, width, tiles),
            "frame_wide": [name for name, _ in self.plan.mixing] if self.plan else self._engine_frame_wide(),
        }

    def _engine_frame_wide(self) -> list[str]:
        tiling = getattr(self.inner, "contract", None) and self.inner.contract.model.get("tiling")  # type: ignore[attr-defined]
        return [str(n) for n in tiling.get("frame_wide") or []] if isinstance(tiling, dict) else []

    # decoding -------------------------------------------------------------------------------
    def tile_options(self, options: dict[str, Any], batch: int, height: int, width: int) -> list[dict[str, Any]]:
        """Each tile's stream options: a noise-injecting decoder's maps are drawn once for the
        whole frame (as untiled decoding draws them) and each tile takes its part."""
        tiles = self.grid(height, width)
        if not self.noise_scales:
            return [dict(options) for _ in tiles]
        drawn = conditioning_inputs(
            self.step_inputs, self.noise_scales, batch, height, width,
            default_timestep=self.default_timestep, **options,
        )["noise"]  # fmt: skip
        rest = {k: v for k, v in options.items() if k not in ("seed", "generator", "noise")}
        per_tile = []
        for tile in tiles:
            crops = []
            for s, m in zip(self.noise_scales, drawn, strict=True):
                y0, y1, x0, x1 = (v * s for v in tile.region)
                if any(v.denominator != 1 for v in (y0, y1, x0, x1)):
                    raise InputError(f"a tile at {tile.region} does not fall on the grid of a noise map (scale {s})")
                crops.append(m[int(y0) : int(y1), int(x0) : int(x1)].cpu())
            per_tile.append({**rest, "noise": tuple(crops)})
        return per_tile

    def tile_stream(self, options: dict[str, Any], tile: Tile, frame: tuple[int, int]) -> Stream:
        if self.plan is not None and self.plan.has_mixing:
            inner = self.inner
            assert isinstance(inner, TorchDecoder)
            return TileTorchStream(inner.model, inner, options, self.plan, tile, frame)
        if tiled_engine.has_contexts(self.inner):
            return self.inner.tile_stream(**options)  # type: ignore[attr-defined]
        return self.inner.stream(**options)

    def stream(self, **options: Any) -> TiledStream:
        self.inner.stream(**options)  # refuses options the decoder does not take, before any step
        return TiledStream(self, options)

    def iter_decode(self, latents: Tensor | np.ndarray, chunk: int | None = None, **options: Any) -> Iterator[Tensor]:
        """Frames of the whole clip, decoded tile by tile (see the module docstring); the input is
        checked up front, and the pieces come in the chunks untiled decoding gives."""
        latents, chunk = self._checked(latents, chunk, options)
        if len(self.grid(latents.shape[3], latents.shape[4])) == 1:  # one tile: no halo, no capture pass
            return self.inner.iter_decode(latents, chunk, **options)

        def pieces() -> Iterator[Tensor]:
            out, sizes = self._tile_by_tile(latents, chunk, options)
            at = 0
            for n in sizes:
                yield out[:, :, at : at + n]
                at += n

        return pieces()

    def decode(self, latents: Tensor | np.ndarray, chunk: int | None = None, **options: Any) -> Tensor:
        """The whole clip's frames: the buffer the tiles fill (not a copy of it)."""
        latents, chunk = self._checked(latents, chunk, options)
        if len(self.grid(latents.shape[3], latents.shape[4])) == 1:
            return self.inner.decode(latents, chunk, **options)
        return self._tile_by_tile(latents, chunk, options)[0]

    def _checked(self, latents: Tensor | np.ndarray, chunk: int | None, options: dict[str, Any]) -> tuple[Tensor, int]:
        latents = as_tensor(latents)
        check_latents(self, latents)
        chunk = check_chunk(self, chunk)
        b, _, _, h, w = latents.shape
        self.check_geometry(b, h, w)
        self.inner.stream(**options)  # refuses options the decoder does not take
        return latents, chunk

    def _tile_by_tile(self, latents: Tensor, chunk: int, options: dict[str, Any]) -> tuple[Tensor, list[int]]:
        """The clip's frames and the frames of each chunk, filled tile by tile."""
        b, _, t, h, w = latents.shape
        s, tf = self.spatial_factor, self.temporal_factor
        if tiled_engine.has_contexts(self.inner):  # capture graphs never advance a tile: chunk by chunk
            out, sizes = torch.empty(b, 3, 1 + tf * (t - 1), h * s, w * s), []
            for piece in push_clip(self.stream(**options), latents, chunk):
                out[:, :, sum(sizes) : sum(sizes) + piece.shape[2]] = piece
                sizes.append(piece.shape[2])
            return out, sizes
        tiles = self.grid(h, w)
        per_tile = self.tile_options(options, b, h, w)
        contexts = self._contexts(latents, chunk, tiles, per_tile) if self.plan and self.plan.has_mixing else {}
        out = torch.empty(b, 3, 1 + tf * (t - 1), h * s, w * s)
        sizes: list[int] = []
        for i, tile in enumerate(tiles):
            stream = self.tile_stream(per_tile[i], tile, (h, w))
            if isinstance(stream, TileTorchStream):
                stream.contexts = contexts
            at = 0
            for piece in push_clip(stream, _crop(latents, tile), chunk):
                n = piece.shape[2]
                tile.place(out[:, :, at : at + n], piece, s)
                at += n
                if i == 0:
                    sizes.append(n)
        return out, sizes

    def _contexts(
        self, latents: Tensor, chunk: int, tiles: list[Tile], per_tile: list[dict[str, Any]]
    ) -> dict[int, dict[int, Any]]:
        """Every step's context at every frame-wide module: one pass over the tiles per module,
        each tile streaming the clip up to it (with the contexts found before)."""
        assert self.plan is not None
        h, w = latents.shape[3], latents.shape[4]
        contexts: dict[int, dict[int, Any]] = defaultdict(dict)
        for j, (_, module) in enumerate(self.plan.mixing):
            captured: dict[int, list[Captured]] = defaultdict(list)
            for i, tile in enumerate(tiles):
                stream = self.tile_stream(per_tile[i], tile, (h, w))
                assert isinstance(stream, TileTorchStream)
                stream.contexts, stream.capture = contexts, j
                for _ in push_clip(stream, _crop(latents, tile), chunk):
                    pass
                for n, c in stream.captured.items():
                    captured[n].append(c)
            for n, cs in captured.items():
                contexts[n][j] = merge(module, cs)
        return dict(contexts)


def _crop(latents: Tensor, tile: Tile) -> Tensor:
    y0, y1, x0, x1 = tile.region
    return latents[..., y0:y1, x0:x1]


class TiledStream(Stream):
    """A stream decoding every chunk tile by tile; each tile keeps its own state."""

    source: TiledDecoder

    def __init__(self, source: TiledDecoder, options: dict[str, Any]) -> None:
        super().__init__(source)
        self.options = options
        self.tiles: list[Tile] = []
        self.streams: list[Stream] = []

    def reset(self) -> None:
        super().reset()
        self.tiles, self.streams = [], []

    def _start(self, batch: int, height: int, width: int) -> None:
        d = self.source
        self.tiles = d.grid(height, width)
        self.frame = (height, width)
        per_tile = d.tile_options(self.options, batch, height, width)
        self.streams = []
        for tile, options in zip(self.tiles, per_tile, strict=True):
            stream = d.tile_stream(options, tile, self.frame)
            stream._start(batch, *tile.size)
            stream.geometry = (batch, *tile.size)
            self.streams.append(stream)

    def _sync(self, stream: Stream) -> None:
        stream.position, stream.end = self.position, self.end

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        d = self.source
        if tiled_engine.has_contexts(d.inner):
            return tiled_engine.step(d.inner, self.tiles, self.streams, latents, first, self._sync)
        contexts: dict[int, Any] = {}
        if d.plan is not None and d.plan.has_mixing:
            for j, (_, module) in enumerate(d.plan.mixing):
                captured = []
                for tile, stream in zip(self.tiles, self.streams, strict=True):
                    assert isinstance(stream, TileTorchStream)
                    saved = stream.state, stream.steps
                    self._sync(stream)
                    stream.contexts, stream.capture, stream.keep_state = {stream.steps: contexts}, j, False
                    stream.captured = {}
                    try:
                        stream._step(_crop(latents, tile), first)
                    finally:
                        stream.state, stream.steps = saved
                    captured.extend(stream.captured.values())
                if captured:
                    contexts[j] = merge(module, captured)
        out: Tensor | None = None
        s = d.spatial_factor
        b, _, _, h, w = latents.shape
        for tile, stream in zip(self.tiles, self.streams, strict=True):
            self._sync(stream)
            if isinstance(stream, TileTorchStream):
                stream.contexts, stream.capture = {stream.steps: contexts}, None
            frames = stream._step(_crop(latents, tile), first)
            if out is None:
                out = frames.new_empty((b, 3, frames.shape[2], h * s, w * s))
            tile.place(out, frames, s)
        assert out is not None
        return out

    def _state(self) -> tuple[list[str], list[Tensor]]:
        names, tensors = [], []
        for i, stream in enumerate(self.streams):
            n, t = stream._state()
            names += [f"tile{i}/{name}" for name in n]
            tensors += t
        return names, tensors

    def _set_state(self, tensors: list[Tensor]) -> None:
        at = 0
        for stream in self.streams:
            n = len(stream.source.state_shapes(*stream.geometry))  # type: ignore[misc]
            stream._set_state(tensors[at : at + n])
            at += n


def engine_halo(decoder: ContractDecoder) -> tuple[int, int]:
    """An export's halo, from its manifest (``model.tiling``); refused where the export predates it
    or its decoder has a frame-wide module (engines tile only decoders without one)."""
    tiling = decoder.contract.model.get("tiling")
    if not isinstance(tiling, dict):
        raise InputError("this export does not record its halo (model.tiling): export it again to tile with it")
    frame_wide = tiling.get("frame_wide") or []
    if frame_wide and not tiled_engine.has_contexts(decoder):  # exports made with tiling carry the graphs it takes
        raise InputError(
            f"this engine's decoder mixes whole frames ({', '.join(map(str, frame_wide))[:120]}): tiling it takes "
            "an export made with tiling (export it again with tiling on); decode it untiled, or tile its torch model"
        )
    if tiled_engine.has_contexts(decoder) and frame_wide != [m.name for m in decoder.contract.tiling.modules]:  # type: ignore[union-attr]
        raise InputError("the export's tiling.modules and model.tiling.frame_wide name different modules")
    halo = tiling.get("halo")
    if (
        not isinstance(halo, list)
        or len(halo) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1 << 16 for v in halo)
    ):
        raise InputError(f"the export's model.tiling.halo must be two whole numbers, got {halo!r:.80}")
    return halo[0], halo[1]


def _engine_too_small(decoder: ContractDecoder, halo: tuple[int, int], height: int, width: int, e: InputError) -> str:
    """An engine too small to hold a tile and its halo on both sides, and the smallest that would serve."""
    s, shapes = decoder.spatial_factor, decoder.contract.shapes
    for what, value, h in (("height", height, halo[0]), ("width", width, halo[1])):
        top = shapes[what].max
        if value > top and top < 2 * h + 1:
            need = 2 * h + 1
            return (
                f"this engine takes tiles of {what} up to {top} latent ({top * s} px), too small for this decoder's "
                f"halo of {h} on both sides: a {value * s} px frame needs an engine of {what} at least {need} latent "
                f"({need * s} px)"
            )
    return str(e)


def tiled(decoder: Decoder, tile: tuple[int, int] | str | None = None) -> TiledDecoder:
    """``decoder`` decoding frames as tiles (``tile``: region size in latent pixels, ``HxW``; for
    engines, default: the largest size they were built for)."""
    if isinstance(decoder, TiledDecoder):
        decoder = decoder.inner
    return TiledDecoder(decoder, parse_tile(tile))


SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
              "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # fmt: skip


def parse_memory(text: str | int) -> int:
    """A memory size: bytes, or a number with a unit (``8GB``, ``6.5GiB``, ``512MiB``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in SIZE_UNITS:
            raise InputError(f"{{max_memory}} must be a size like 8GB, 6GiB or 512MiB, got {text!r}", "max_memory")
        value = int(float(m.group(1)) * SIZE_UNITS[unit])
    if value < 1:
        raise InputError(f"{{max_memory}} must be more than 0 bytes, got {text!r}", "max_memory")
    return value


def tiled_decode_bytes(decoder: TorchDecoder, shape: tuple[int, ...], chunk: int, region: tuple[int, int]) -> int:
    """Peak memory of decoding latents of ``shape`` tile by tile with tiles of ``region`` latent
    pixels: one tile's step (with its state) and the output clip (float32) the tiles fill."""
    b, _, t, h, w = shape
    steady = max(1, min(chunk, t - 1))
    step = decode_step_bytes(decoder.model, b, steady, min(region[0], h), min(region[1], w), decoder.dtype)
    s = decoder.spatial_factor
    return step + b * 3 * (1 + decoder.temporal_factor * (t - 1)) * h * s * w * s * 4


def choose_tile(decoder: TorchDecoder, shape: tuple[int, ...], chunk: int, budget: int) -> tuple[int, int] | None:
    """The largest square-ish tile whose tiled decode of ``shape`` fits ``budget`` bytes (None: the
    whole frame fits untiled); refused in one line when even the smallest tile does not fit."""
    b, _, t, h, w = shape
    steady = max(1, min(chunk, t - 1))
    s = decoder.spatial_factor
    if decode_step_bytes(decoder.model, b, steady, h, w, decoder.dtype) <= budget:
        return None
    halo = plan_tiling(decoder.model).halo
    smallest = (2 * halo[0] + 1, 2 * halo[1] + 1)
    if tiled_decode_bytes(decoder, shape, chunk, smallest) > budget:
        need = tiled_decode_bytes(decoder, shape, chunk, smallest)
        raise InputError(
            f"{{max_memory}} {gib(budget)} is too little: even the smallest tile ({smallest[0]}x{smallest[1]} "
            f"latent pixels, {smallest[0] * s}x{smallest[1] * s} px) needs {gib(need)} with the output clip",
            "max_memory",
        )
    lo, hi = 0, max(h - smallest[0], w - smallest[1])  # grow both sides together from the smallest tile
    while lo < hi:
        mid = (lo + hi + 1) // 2
        region = (min(h, smallest[0] + mid), min(w, smallest[1] + mid))
        if tiled_decode_bytes(decoder, shape, chunk, region) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return min(h, smallest[0] + lo), min(w, smallest[1] + lo)
