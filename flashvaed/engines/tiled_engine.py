"""Exact tiled decoding with engines whose decoder mixes whole frames: the runtime side of the
contract's tiling rule (``flashvaed.export.contract.TILING_RULE``, docs/onnx-contract.md).

An export made with ``tiling`` of a decoder with frame-wide modules (Wan's middle attention,
Mochi's per-frame group norms) holds, beside its step graphs, the graphs of a tiled run:
``tile.*`` (a tile's step, every frame-wide module taking the whole frame's context as inputs),
``capture.J.*`` (a tile's step up to module J, returning J's input over the tile's region) and
``frame.J`` (a "place" module alone on the whole frame). Each chunk runs, module by module, the
capture graph on every tile, reduces the tiles' cores to the frame's context there (group
statistics summed in float64; or the cores placed into the whole frame and ``frame.J`` run on it),
then ``tile.*`` on every tile with all contexts. The frames equal decoding untiled.

Capture graphs read a tile's state without advancing it, so a whole clip goes chunk by chunk and
the engine holds every tile's state at once (memory: the states of all tiles, the working memory
of one tile's step, and the frame's contexts); torch models can go tile by tile instead.

Backends provide ``decoder.tile_stream(**options)`` (a stream of one tile: ``frame_contexts`` bound at
every step, ``capture(index, latents, first, contexts)``) and ``decoder.run_frame(index, frame)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..export.contract import FrameWideModule
from ..models.tiling import Tile, at_scale
from .base import ContractDecoder

__all__ = ["check_frame", "has_contexts", "step"]


def has_contexts(decoder: Any) -> bool:
    """Whether ``decoder`` is an engine whose tiles take the frame's contexts (an export made with
    ``tiling`` of a decoder with frame-wide modules)."""
    return isinstance(decoder, ContractDecoder) and decoder.contract.tiling is not None


def check_frame(decoder: ContractDecoder, height: int, width: int) -> None:
    """Refuse a whole frame larger than the export's tiling frame (its ``frame.J`` graphs' shapes)."""
    tiling = decoder.contract.tiling
    assert tiling is not None
    s = decoder.spatial_factor
    for what, value in (("height", height), ("width", width)):
        r = tiling.frame[what]
        if value not in r:
            raise InputError(
                f"this engine decodes tiled frames of {what} up to {r.max} latent ({r.max * s} px: its export's "
                f"tiling_frame), got {value} latent ({value * s} px); export it with a larger tiling_frame"
            )


def group_statistics(module: FrameWideModule, tiles: list[Tile], partials: list[Tensor]) -> tuple[Tensor, Tensor]:
    """A per-frame group norm's mean and 1/std of every (sample, frame, group), float32 (B, T, groups),
    from every tile's input over its region: the cores' counts, sums and sums of squares, in float64."""
    g = module.groups
    n = s = q = None
    for tile, partial in zip(tiles, partials, strict=True):
        y0, y1, x0, x1 = at_scale(tile.core_in_region(), module.scale)
        x = partial[..., y0:y1, x0:x1].double()
        b, c, t, h, w = x.shape
        x = x.reshape(b, g, c // g, t, h, w)
        ts, tq = x.sum(dim=(2, 4, 5)), (x * x).sum(dim=(2, 4, 5))
        tn = c // g * h * w
        n, s, q = (tn, ts, tq) if n is None else (n + tn, s + ts, q + tq)
    assert s is not None and q is not None and n is not None
    mean = s / n
    rstd = torch.rsqrt((q / n - mean * mean).clamp_min(0.0) + module.eps)
    return mean.transpose(1, 2).float().contiguous(), rstd.transpose(1, 2).float().contiguous()


def placed(module: FrameWideModule, tiles: list[Tile], partials: list[Tensor], frame: tuple[int, int]) -> Tensor:
    """The whole frame's input of a "place" module, from every tile's core."""
    first = partials[0]
    h, w = at_scale((0, frame[0], 0, frame[1]), module.scale)[1::2]
    whole = first.new_zeros((*first.shape[:-2], h, w))
    for tile, partial in zip(tiles, partials, strict=True):
        y0, y1, x0, x1 = at_scale(tile.core, module.scale)
        c0, c1, c2, c3 = at_scale(tile.core_in_region(), module.scale)
        whole[..., y0:y1, x0:x1] = partial[..., c0:c1, c2:c3]
    return whole


def step(
    decoder: Any,
    tiles: list[Tile],
    streams: list[Any],
    latents: Tensor,
    first: bool,
    sync: Callable[[Any], None],
) -> Tensor:
    """One chunk of a tiled run: the contexts of every frame-wide module, module by module, then
    every tile's step with them; the frame assembled from the tiles' cores. ``sync(stream)`` gives
    a tile's stream the clock of the whole stream before it runs."""
    tiling = decoder.contract.tiling
    b, _, _, height, width = latents.shape
    crops = [latents[..., t.region[0] : t.region[1], t.region[2] : t.region[3]] for t in tiles]
    contexts: list[dict[str, Tensor]] = [{} for _ in tiles]
    for j, module in enumerate(tiling.modules):
        partials = []
        for i, stream in enumerate(streams):
            sync(stream)
            partials.append(stream.capture(j, crops[i], first, contexts[i]))
        if module.context == "sum":
            mean, rstd = group_statistics(module, tiles, partials)
            for c in contexts:
                c[f"context/{j}/mean"], c[f"context/{j}/rstd"] = mean, rstd
        else:
            out = decoder.run_frame(j, placed(module, tiles, partials, (height, width)))
            for tile, c in zip(tiles, contexts, strict=True):
                y0, y1, x0, x1 = at_scale(tile.region, module.scale)
                c[f"context/{j}"] = out[..., y0:y1, x0:x1].contiguous()
        del partials
    s = decoder.spatial_factor
    frames: Tensor | None = None
    for i, (tile, stream) in enumerate(zip(tiles, streams, strict=True)):
        sync(stream)
        stream.frame_contexts = contexts[i]
        piece = stream._step(crops[i], first)
        stream.frame_contexts = {}
        if frames is None:
            frames = piece.new_empty((b, 3, piece.shape[2], height * s, width * s))
        tile.place(frames, piece, s)
    assert frames is not None
    return frames
