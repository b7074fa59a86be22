"""Exact spatial tiling: what a tile of the latent frame must read, and how frame-wide operations
are computed exactly when a frame is decoded tile by tile.

Every decoder here is a composition of stride-1 convolutions, per-position operations,
integer up-sampling and a few operations that mix a whole frame (Wan's middle attention,
per-frame group norms). A tile of the latent frame decodes its *region* (its *core* plus a halo
on every side that is not the frame's edge); the halo is the decoder's receptive field in latent
pixels, measured from the convolutions the decoder runs (``derive_halo``), so a new family or
student needs no hand-written halo. Output positions of the core are then exact: whatever the
decoder computes wrongly at a region's inner edge (padding where a neighbour's pixels belong)
spreads at most one conv reach per layer, and the halo is the sum of all reaches.

Frame-wide operations cannot be computed from a region. A module that mixes a whole frame says
how to tile it (``mixes_frame = True`` and the frame-context methods): ``frame_context`` is
``"sum"`` (each tile's ``frame_partial`` of its core is summed over the tiles: group statistics)
or ``"place"`` (the cores are placed into the whole frame: attention's input);
``frame_resolve`` turns the total into what every tile needs (the frame's mean and 1/std; the
attention's output over the whole frame) and ``frame_apply(x, resolved, region)`` is the
module's output on a region. ``TilePlan.hooks`` runs one decode step of one tile with those
contexts applied and, optionally, stops it at the next frame-wide module to capture its partial.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..errors import InputError

PROBE = (5, 7)  # latent size of the probe decode: small, and unequal so that rows and columns differ
FRAME_CONTEXTS = ("sum", "place")

Region = tuple[int, int, int, int]  # y0, y1, x0, x1 (latent pixels, or a module's own pixels)


@dataclass(frozen=True)
class Tile:
    """One tile of a latent frame: the positions it produces (``core``) and reads (``region``)."""

    core: Region
    region: Region

    @property
    def size(self) -> tuple[int, int]:
        y0, y1, x0, x1 = self.region
        return y1 - y0, x1 - x0

    def core_in_region(self) -> Region:
        """The core's positions within the region."""
        (c0, c1, c2, c3), (r0, _, r2, _) = self.core, self.region
        return c0 - r0, c1 - r0, c2 - r2, c3 - r2

    def place(self, frames: Tensor, piece: Tensor, scale: int) -> None:
        """Write the core of ``piece`` (this tile's frames, ``scale`` pixels per latent pixel) into
        ``frames`` (the whole frame's), along the last two dimensions."""
        y0, y1, x0, x1 = (v * scale for v in self.core)
        c0, c1, c2, c3 = (v * scale for v in self.core_in_region())
        frames[..., y0:y1, x0:x1] = piece[..., c0:c1, c2:c3]


def split_axis(length: int, size: int, halo: int, what: str = "tile") -> list[tuple[int, int, int, int]]:
    """``(core_lo, core_hi, region_lo, region_hi)`` along an axis of ``length`` latent pixels, each
    region ``size`` long (the whole axis if that is shorter): cores partition the axis and stay
    ``halo`` pixels inside their region wherever the region does not end at the frame's edge."""
    if length <= size:
        return [(0, length, 0, length)]
    if size < 2 * halo + 1:
        raise InputError(
            f"a {what} of {size} latent pixels cannot hold this decoder's halo of {halo} on both sides: "
            f"it needs at least {2 * halo + 1} ({2 * halo} of halo and 1 of its own)"
        )
    spans = []
    core = 0
    while core < length:
        lo = max(0, core - halo)
        if lo + size >= length:
            spans.append((core, length, length - size, length))
            break
        spans.append((core, lo + size - halo, lo, lo + size))
        core = lo + size - halo
    return spans


def tile_grid(height: int, width: int, tile: tuple[int, int], halo: tuple[int, int]) -> list[Tile]:
    """Tiles of an ``height`` x ``width`` latent frame whose regions are ``tile`` (or the frame)."""
    rows = split_axis(height, tile[0], halo[0], "tile height")
    cols = split_axis(width, tile[1], halo[1], "tile width")
    return [Tile((a, b, c, d), (e, f, g, h)) for a, b, e, f in rows for c, d, g, h in cols]


def redundancy(height: int, width: int, tiles: list[Tile]) -> float:
    """The compute the halos cost: positions decoded over positions of the frame (1.0: none)."""
    return sum(t.size[0] * t.size[1] for t in tiles) / (height * width)


# ---------------------------------------------------------------------------------------------
# the halo and the frame-wide modules, from a probe decode
# ---------------------------------------------------------------------------------------------
class TilingError(ValueError):
    """A decoder whose frames cannot be tiled exactly (a strided conv, a frame-wide module that
    does not say how to tile it)."""


def _conv_reach(name: str, module: nn.Module, x: Tensor, y: Tensor) -> tuple[int, int]:
    """How far, in its own input's pixels, one output position of ``module`` reads (rows, columns).

    The padding is read from the sizes (out = in + 2p - d(k-1)), so convs that pad themselves
    before running (replicate padding) are measured as well as those whose module pads.
    """
    reach = []
    for axis in (-2, -1):
        k, d, s = module.kernel_size[axis], module.dilation[axis], module.stride[axis]
        if s != 1:
            raise TilingError(f"{name} has stride {s}: exact tiling takes stride-1 convolutions only")
        span = d * (k - 1)
        twice_pad = y.shape[axis] - x.shape[axis] + span
        if 0 <= twice_pad <= 2 * span and twice_pad % 2 == 0:
            reach.append(max(twice_pad // 2, span - twice_pad // 2))
        else:  # asymmetric or unusual padding: the whole kernel's span bounds it
            reach.append(span)
    return reach[0], reach[1]


@dataclass
class TilePlan:
    """What exact tiling needs to know of a torch decoder: its halo, its frame-wide modules in the
    order they run, and which module produces each entry of its stream state."""

    halo: tuple[int, int]
    mixing: list[tuple[str, nn.Module]]
    producers: list[tuple[nn.Module, int]] | None  # state entry -> (module, index in its flattened output)
    reach: dict[str, tuple[Fraction, Fraction]] = field(default_factory=dict)

    @property
    def has_mixing(self) -> bool:
        return bool(self.mixing)

    @contextmanager
    def hooks(
        self,
        tile: Tile,
        frame: tuple[int, int],
        contexts: dict[int, Any],
        capture: int | None = None,
        stop: bool = True,
        exchange: Callable[[int, nn.Module, Captured], Any] | None = None,
    ) -> Iterator[StepRecord]:
        """Within the block, one step of ``tile`` (of a ``frame`` latent pixels) runs the frame-wide
        modules with ``contexts`` (index -> resolved) and captures module ``capture``'s partial:
        ``stop`` raises ``Captured`` there (the state entries produced before it are recorded, see
        ``StepRecord.state``), else the step goes on with the module's own output on the region
        and the capture is left in ``record.captured``. With ``exchange`` (sharded decoding: every
        rank one tile, all in step), each frame-wide module captures its tile's partial and runs on
        what ``exchange(index, module, captured)`` resolves from every tile's."""
        record = StepRecord(self)
        patched: list[nn.Module] = []
        handles = []
        try:
            for j, (_, module) in enumerate(self.mixing):
                if j == capture:
                    module.forward = _capturing(module, j, tile, frame, None if stop else record)
                elif j in contexts:
                    module.forward = _applying(module, contexts[j], tile)
                elif exchange is not None:
                    module.forward = _exchanging(module, j, tile, frame, exchange)
                else:
                    continue
                patched.append(module)
            if capture is not None and self.producers is not None:
                for module in {id(m): m for m, _ in self.producers}.values():
                    handles.append(module.register_forward_hook(record.hook))
            yield record
        finally:
            for module in patched:
                del module.forward
            for handle in handles:
                handle.remove()


@dataclass
class Captured(Exception):
    """A tile's step stopped at a frame-wide module, with what its core contributes."""

    index: int
    partial: Tensor
    core: Region  # the core's positions at the module's scale, in the whole frame
    frame: tuple[int, int]  # the whole frame's size at that scale


class StepRecord:
    """The state entries a step produced before it was stopped."""

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        self.outputs: dict[int, list[Tensor]] = {}
        self.captured: Captured | None = None

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.outputs[id(module)] = tree_flatten(output)[0]

    def state(self, old: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``old`` with every entry whose producer ran in this step replaced by what it produced."""
        assert self.plan.producers is not None
        new = list(old)
        for i, (module, k) in enumerate(self.plan.producers):
            flat = self.outputs.get(id(module))
            if flat is not None:
                new[i] = flat[k]
        return tuple(new)


def _scale(x: Tensor, tile: Tile) -> tuple[Fraction, Fraction]:
    h, w = tile.size
    return Fraction(x.shape[-2], h), Fraction(x.shape[-1], w)


def at_scale(region: Region, sy: Fraction, sx: Fraction | None = None) -> Region:
    """A region of the latent grid on a module's grid (``sy``/``sx`` times finer or coarser);
    refused where it does not fall on that grid."""
    sx = sy if sx is None else sx
    values = [region[0] * sy, region[1] * sy, region[2] * sx, region[3] * sx]
    if any(v.denominator != 1 for v in values):
        raise InputError(f"a tile at {region} does not fall on the grid of a frame-wide module (scale {sy}, {sx})")
    y0, y1, x0, x1 = (int(v) for v in values)
    return y0, y1, x0, x1


def _capturing(module: nn.Module, index: int, tile: Tile, frame: tuple[int, int], record: StepRecord | None) -> Any:
    plain = type(module).forward

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        sy, sx = _scale(x, tile)
        y0, y1, x0, x1 = at_scale(tile.core_in_region(), sy, sx)
        partial = module.frame_partial(x[..., y0:y1, x0:x1])
        captured = Captured(index, partial, at_scale(tile.core, sy, sx), (int(frame[0] * sy), int(frame[1] * sx)))
        if record is None:
            raise captured
        record.captured = captured
        return plain(module, x, *args, **kwargs)

    return forward


def _exchanging(module: nn.Module, index: int, tile: Tile, frame: tuple[int, int], exchange: Callable[..., Any]) -> Any:
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        sy, sx = _scale(x, tile)
        y0, y1, x0, x1 = at_scale(tile.core_in_region(), sy, sx)
        partial = module.frame_partial(x[..., y0:y1, x0:x1])
        captured = Captured(index, partial, at_scale(tile.core, sy, sx), (int(frame[0] * sy), int(frame[1] * sx)))
        return module.frame_apply(x, exchange(index, module, captured), at_scale(tile.region, sy, sx))

    return forward


def _applying(module: nn.Module, resolved: Any, tile: Tile) -> Any:
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        sy, sx = _scale(x, tile)
        return module.frame_apply(x, resolved, at_scale(tile.region, sy, sx))

    return forward


def merge(module: nn.Module, captured: list[Captured]) -> Any:
    """The frame's context at ``module`` from every tile's capture, resolved."""
    if module.frame_context == "sum":
        total = captured[0].partial.clone()
        for c in captured[1:]:
            total += c.partial
        return module.frame_resolve(total)
    first = captured[0].partial
    h, w = captured[0].frame
    frame = first.new_zeros((*first.shape[:-2], h, w))
    for c in captured:
        y0, y1, x0, x1 = c.core
        frame[..., y0:y1, x0:x1] = c.partial
    return module.frame_resolve(frame)


def _halo(reach: dict[str, tuple[Fraction, Fraction]], events: list[tuple[str, str]]) -> tuple[int, int]:
    """The reaches summed, in latent pixels, rounded up. A module whose output a tile takes from the
    whole frame (``frame_context == "place"``) is exact on the whole region, so reaches add up from
    there afresh: the halo is the largest sum between such modules (every conv counted once, the
    first step's too)."""
    seen = {name for kind, name in events if kind == "conv"}
    segments = [[Fraction(0), Fraction(0)]]
    for name in [n for n in reach if n not in seen]:  # convs only the first step ran: counted in full
        segments[0][0] += reach[name][0]
        segments[0][1] += reach[name][1]
    for kind, name in events:
        if kind == "frame":
            segments.append([Fraction(0), Fraction(0)])
        else:
            segments[-1][0] += reach[name][0]
            segments[-1][1] += reach[name][1]
    if len(segments) > 1:  # the first-step-only convs (counted in segment 0) may sit anywhere: in every segment
        extra = [sum((reach[n][a] for n in reach if n not in seen), Fraction(0)) for a in (0, 1)]
        for seg in segments[1:]:
            seg[0] += extra[0]
            seg[1] += extra[1]
    return math.ceil(max(seg[0] for seg in segments)), math.ceil(max(seg[1] for seg in segments))


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_tiling(model: Any) -> TilePlan:
    """The ``TilePlan`` of a torch decoder (``LatentDecoder``), from one probe decode of a small
    latent clip: every conv it runs (its reach at its scale), the frame-wide modules it calls, and
    the modules that produce its state."""
    from .streaming import StreamingDecoder

    cached = _PLANS.get(model)
    if cached is not None:
        return cached
    names = {id(m): n for n, m in model.named_modules()}
    reach: dict[str, tuple[Fraction, Fraction]] = {}
    order: list[str] = []
    outputs: dict[int, tuple[nn.Module, int]] = {}  # id of a tensor -> the innermost module that returned it
    keep: list[Tensor] = []  # the probe's tensors stay alive, so that no id is reused
    ph, pw = PROBE
    recording = [False]
    events: list[tuple[str, str]] = []  # convs and whole-frame outputs, in the order a steady step runs them

    def conv_hook(module: nn.Module, args: Any, output: Any) -> None:
        x, y = args[0], output[0] if isinstance(output, tuple) else output
        name = names[id(module)]
        ry, rx = _conv_reach(name, module, x, y)
        sy, sx = Fraction(x.shape[-2], ph), Fraction(x.shape[-1], pw)
        old = reach.get(name, (Fraction(0), Fraction(0)))
        reach[name] = (max(old[0], ry / sy), max(old[1], rx / sx))
        if recording[0]:
            events.append(("conv", name))

    def any_hook(module: nn.Module, args: Any, output: Any) -> None:
        if getattr(type(module), "mixes_frame", False) is True and names[id(module)] not in order:
            order.append(names[id(module)])
        if recording[0] and getattr(module, "frame_context", None) == "place":
            events.append(("frame", names[id(module)]))
        if recording[0]:
            for k, t in enumerate(tree_flatten(output)[0]):
                if isinstance(t, Tensor):
                    keep.append(t)
                    outputs.setdefault(id(t), (module, k))

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(conv_hook))
        handles.append(module.register_forward_hook(any_hook))
    p = next(model.parameters())
    latents = torch.randn(1, model.latent_channels, 3, ph, pw, generator=torch.Generator().manual_seed(0))
    try:
        stream = StreamingDecoder(model)
        stream.push(latents[:, :, :1].to(p.device, p.dtype))
        recording[0] = True
        stream.push(latents[:, :, 1:].to(p.device, p.dtype))
        state = stream.state
        recording[0] = False
        if getattr(model, "latency", 0):
            stream.close()
    finally:
        for handle in handles:
            handle.remove()
    producers: list[tuple[nn.Module, int]] | None = [outputs.get(id(t)) for t in state or ()]  # type: ignore[misc]
    if producers is not None and any(p is None for p in producers):
        producers = None  # a state entry no module returned: capture passes run whole steps instead
    by_name = dict(model.named_modules())
    mixing = [(n, by_name[n]) for n in order]
    for name, module in mixing:
        kind = getattr(module, "frame_context", None)
        if kind not in FRAME_CONTEXTS or not all(
            callable(getattr(module, f, None)) for f in ("frame_partial", "frame_resolve", "frame_apply")
        ):
            raise TilingError(
                f"{name} ({type(module).__name__}) mixes a whole frame but does not say how to tile it "
                f"(frame_context, frame_partial, frame_resolve, frame_apply)"
            )
    plan = TilePlan(_halo(reach, events), mixing, producers, reach)
    _PLANS[model] = plan  # the architecture does not change under a model: planned once
    return plan
