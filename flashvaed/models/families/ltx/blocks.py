"""LTX-Video VAE blocks shared by the decoder and the encoder: the clock a streaming step runs on,
replicate-padded convs, norms, timestep conditioning and the residual block.

Streaming the non-causal decoder exactly: see the package docstring."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...blocks import FrameConv2d, fast_eager, module_conv3d, times_in_dtype
from ...coupling import ChannelFlow, Group
from ...streaming import State, StateSpec

Number = int | Tensor  # a clock value: a Python int in eager streams, a 0-d int64 tensor in graphs


@dataclass(frozen=True)
class Clock:
    """Where a step is in its stream: ``position`` latent frames came before it; ``end`` is the
    clip's length once known; ``frames`` latent frames are in this step. Python ints in eager runs;
    0-d int64 tensors in exported graphs (and traced sizes for ``frames``).

    ``full``: no stream at all, the step is the whole clip (upstream's one-shot semantics, with
    explicit padding and dropped frames): what calibration and distillation run, since every
    position is then a frame of the clip.

    ``windows``: each layer computes only the positions of its step that hold frames of the clip
    (its *window*); the others are never read (every temporal conv replaces them by copies of the
    clip's first or last frame, the stream drops them at the output), so a stream's warm-up and
    flush cost what they compute. With tensor clocks the window sizes are data-dependent (ONNX
    Runtime runs such graphs; a static-shape runtime or compiler asks for ``windows=False``: every
    layer computes its whole step, as before).
    """

    position: Number = 0
    end: Number | None = None
    full: bool = False
    frames: Number | None = None
    windows: bool = True
    # windows computed in this step, by (rate, offset): every layer on one timeline shares them (a traced
    # graph computes each once instead of once per call: fewer nodes, less per-step overhead)
    windows_seen: dict = field(init=False, repr=False, compare=False)
    # tensor clocks: every gather index of the step, computed at once (``StepPlan``, set by the decoder)
    plan: StepPlan | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows_seen", {})
        object.__setattr__(self, "plan", None)

    @property
    def traced(self) -> bool:
        """Whether the clock's values are tensors (an exported graph), not Python ints."""
        return any(isinstance(v, Tensor) for v in (self.position, self.end, self.frames))

    @property
    def narrow(self) -> bool:
        """Whether layers compute their windows only (a stream step that knows its length)."""
        return self.windows and not self.full and self.frames is not None


def _t(v: Number) -> Tensor:
    return v if isinstance(v, Tensor) else torch.tensor(v, dtype=torch.int64)


def _on(v: Number, device: torch.device) -> Tensor:
    """``v`` as a tensor on ``device``; a number is filled there, not copied from the host (a copy
    from pageable memory cannot be captured in a CUDA graph)."""
    return v.to(device) if isinstance(v, Tensor) else torch.full((), v, dtype=torch.int64, device=device)


def window(clock: Clock, rate: int, offset: int) -> tuple[Number, Number]:
    """Step-relative positions [lo, hi) of a layer (``rate`` positions per latent frame, its sequence
    lagging the clip by ``offset``) that hold frames of the clip in this step: the whole step unless
    ``clock.narrow``. A window may be empty, with tensor clocks too: an exported step graph runs each
    conv only on a non-empty window (``onnx_export.allow_empty``: ONNX ``If`` nodes), so an idle
    layer of a warm-up or flush step computes nothing."""
    n = rate * clock.frames  # type: ignore[operator]
    if not clock.narrow:
        return 0, n
    seen = clock.windows_seen.get((rate, offset))
    if seen is None:
        seen = clock.windows_seen[rate, offset] = _window(clock, rate, offset, n)
    return seen


def _window(clock: Clock, rate: int, offset: int, n: Number) -> tuple[Number, Number]:
    start = offset - rate * clock.position  # the clip's first frame, relative to the step
    if not clock.traced:
        lo = min(max(start, 0), n)
        hi = n if clock.end is None else min(max(start + rate * (clock.end - 1) + 1, lo), n)
        return lo, hi
    n_t = _t(n)
    lo_t = torch.minimum(torch.clamp(_t(start), min=0), n_t)
    hi_t = n_t
    if clock.end is not None:
        hi_t = torch.minimum(torch.maximum(_t(start) + rate * (_t(clock.end) - 1) + 1, lo_t), n_t)
    return lo_t, hi_t


def _positions(lo: Number, hi: Number) -> Tensor | range:
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        return torch.arange(_t(lo), _t(hi))
    return range(lo, hi)


def gather(
    history: Tensor | None,
    x: Tensor,
    lo: Number,
    wanted: Tensor | range,
    clamp: tuple[Number, Number | None] | None = None,
) -> Tensor:
    """Frames at step-relative positions ``wanted`` from ``history`` (the positions just before the
    step, -h .. -1) and ``x`` (the step's window, from position ``lo``); with ``clamp`` = (first,
    last), positions are first clamped into the clip's frames (replicate padding). Positions held
    by neither (outside the clip: never read) take any available frame."""
    h = 0 if history is None else history.shape[2]
    if isinstance(wanted, range) and not isinstance(lo, Tensor) and not (clamp and isinstance(clamp[0], Tensor)):
        first, last = clamp if clamp else (None, None)
        size = h + x.shape[2]
        idx = []
        for q in wanted:
            if first is not None:
                q = max(q, first)
            if last is not None:
                q = min(q, last)
            i = q + h if q < 0 else h + q - lo
            idx.append(min(max(i, 0), size - 1))
        return _take_frames(history, x, idx)
    src = x if history is None else torch.cat([history, x], dim=2)
    size = src.shape[2]
    dev = src.device
    q = wanted.to(dev) if isinstance(wanted, Tensor) else torch.arange(wanted.start, wanted.stop, device=dev)
    if clamp:
        q = torch.maximum(q, _on(clamp[0], dev))
        if clamp[1] is not None:
            q = torch.minimum(q, _on(clamp[1], dev))
    i = torch.where(q < 0, q + h, q + h - _on(lo, dev))
    return src.index_select(2, i.clamp(0, size - 1))


def _take_frames(history: Tensor | None, x: Tensor, idx: list[int]) -> Tensor:
    """Frames ``idx`` of ``cat(history, x)`` without making that cat: a run of frames from one of the
    two is a view, and only the runs are copied (a new history is a conv's last frames: without this
    every conv of a step copied its whole input a second time to keep two of them)."""
    h = 0 if history is None else history.shape[2]
    runs: list[tuple[Tensor, int, int]] = []  # (tensor, start, length)
    for i in idx:
        src, j = (history, i) if i < h else (x, i - h)
        if runs and runs[-1][0] is src and runs[-1][1] + runs[-1][2] == j:
            runs[-1] = (src, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((src, j, 1))  # type: ignore[arg-type]
    if len(runs) == 1:
        return runs[0][0].narrow(2, runs[0][1], runs[0][2])
    if not runs:
        return x.narrow(2, 0, 0)
    return torch.cat([t.narrow(2, j, n) for t, j, n in runs], dim=2)


@dataclass(frozen=True, order=True)
class Site:
    """A gather of a windowed step: the frames at positions q in [a, b) of a tensor holding ``h``
    history frames, then the frames of window 1 (a layer at ``r1`` positions per latent frame, its
    sequence lagging the clip by ``o1``). The bounds are sums of the step's numbers: ``a`` is
    a[0]*lo2 + a[1]*n1 + a[2]*lo1 + a[3], with [lo1, hi1) window 1, [lo2, hi2) window 2 (``r2``, ``o2``),
    n1 = r1 * frames; ``b`` the same with hi2 for lo2. ``clamp``: positions first clamped into the
    clip at window 1's layer (replicate padding); ``relative``: index q + h - lo1 for q >= 0 (the
    window's frames), else q + h (history); never outside the tensor, whose frames are
    h + size[0] * (hi1 - lo1) + size[1] * n1. What ``gather`` and ``take`` compute, as numbers."""

    r1: int
    o1: int
    r2: int
    o2: int
    a: tuple[int, int, int, int]
    b: tuple[int, int, int, int]
    h: int = 0
    clamp: bool = False
    relative: bool = True
    size: tuple[int, int] = (1, 0)

    @classmethod
    def conv_input(cls, h: int, rate: int, offset: int, delay: int) -> Site:
        """A temporal conv's kernel input: its output window's positions and ``h`` before them, clamped."""
        return cls(rate, offset, rate, offset + delay, (1, 0, 0, -h), (1, 0, 0, 0), h, clamp=True)

    @classmethod
    def history(cls, h: int, rate: int, offset: int, clamp: bool) -> Site:
        """The last ``h`` positions of the step (the next step's history)."""
        return cls(rate, offset, rate, offset, (0, 1, 0, -h), (0, 1, 0, 0), h, clamp=clamp)

    @classmethod
    def delayed(cls, frames: int, rate: int, offset: int) -> Site:
        """A delay line's output window: its positions, ``frames`` earlier."""
        return cls(rate, offset, rate, offset + frames, (1, 0, 0, -frames), (1, 0, 0, -frames), frames)

    @classmethod
    def window_of(cls, rate: int, offset: int) -> Site:
        """The window's frames of a whole step's tensor."""
        return cls(rate, offset, rate, offset, (1, 0, 0, 0), (1, 0, 0, 0), relative=False, size=(0, 1))

    @classmethod
    def doubled(cls, conv: tuple[int, int], out: tuple[int, int]) -> Site:
        """Depth-to-space: a conv's window [c, d) became positions [2c, 2d); the output window's of those."""
        return cls(*conv, *out, (1, 0, -2, 0), (1, 0, -2, 0), relative=False, size=(2, 0))


class _Split(torch.autograd.Function):
    """``torch.split`` by sizes held in a tensor: one ONNX ``Split`` node (opset 13+), whatever the sizes."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in torch.split(x, [int(v) for v in sizes]))

    @staticmethod
    def symbolic(g: Any, x: Any, sizes: Any) -> Any:
        n = sizes.type().sizes()[0]
        return g.op("Split", x, sizes, axis_i=0, outputs=n)


_FAR = 1 << 40  # a bound no position reaches: sites that do not clamp


class StepPlan:
    """Every gather index of a step with tensor clocks (an exported graph), computed at once: the
    windows of all layers as vectors, each site's index range laid end to end in one vector and split
    (a few dozen graph nodes, where computing them layer by layer took thousands). Equal, index for
    index, to what ``gather`` and ``take`` compute for each site alone."""

    def __init__(self, clock: Clock, sites: Sequence[Site], device: torch.device | str = "cpu") -> None:
        self.sites = {site: i for i, site in enumerate(sites)}
        self.index: tuple[Tensor, ...] = ()
        if not sites:
            return
        col = list(zip(*(dataclasses.astuple(s) for s in sites), strict=True))

        def const(values: Sequence[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        r1, o1, r2, o2 = (const(v) for v in col[:4])
        a, b = (const(v) for v in col[4:6])  # (S, 4)
        h, clamp, relative = const(col[6]), const(col[7]).bool(), const(col[8]).bool()
        size = const(col[9])
        position, k = _t(clock.position).to(device), _t(clock.frames).to(device)
        end = None if clock.end is None else _t(clock.end).to(device)

        def windows(rate: Tensor, offset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            n = rate * k
            start = offset - rate * position
            lo = torch.minimum(start.clamp(min=0), n)
            hi = n if end is None else torch.minimum(torch.maximum(start + rate * (end - 1) + 1, lo), n)
            return start, lo, hi

        n1 = r1 * k
        start1, lo1, hi1 = windows(r1, o1)
        _, lo2, hi2 = windows(r2, o2)
        lo_terms = torch.stack([lo2, n1, lo1, torch.ones_like(n1)], dim=1)
        hi_terms = torch.stack([hi2, n1, lo1, torch.ones_like(n1)], dim=1)
        first = (lo_terms * a).sum(1)
        lengths = ((hi_terms * b).sum(1) - first).clamp(min=0)
        top = h + size[:, 0] * (hi1 - lo1) + size[:, 1] * n1 - 1
        low = torch.where(clamp, start1, -_FAR)
        high = torch.where(clamp, start1 + r1 * (end - 1), _FAR) if end is not None else torch.full_like(low, _FAR)
        base = torch.where(relative, lo1, 0)
        # each site's positions end to end (site s's from entry ends[s] - lengths[s]), each entry with its
        # site's numbers: their differences placed where each site starts, summed (no per-entry gather)
        ends = lengths.cumsum(0)
        t = torch.arange(ends[-1] + 1, device=device)
        params = torch.stack([first - (ends - lengths), low, high, h, base, top], dim=1)
        steps = torch.cat([params[:1], params[1:] - params[:-1]])
        at = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])[:, None].expand_as(steps)
        placed = torch.zeros(1, params.shape[1], dtype=torch.int64, device=device).expand(t.shape[0], -1)
        shift, low_t, high_t, h_t, base_t, top_t = placed.scatter_add(0, at, steps).cumsum(0)[:-1].unbind(1)
        t = t[:-1]
        q = torch.minimum(torch.maximum(t + shift, low_t), high_t)
        i = torch.where(q < 0, q + h_t, q + h_t - base_t)
        i = torch.maximum(torch.minimum(i, top_t), torch.zeros_like(i))
        self.index = _Split.apply(i, lengths)

    def get(self, site: Site) -> Tensor | None:
        """The site's indices into its tensor, None where the step did not plan it."""
        i = self.sites.get(site)
        return None if i is None else self.index[i]


def planned(clock: Clock, site: Site) -> Tensor | None:
    """``site``'s indices from the step's plan (tensor clocks), None without one."""
    return None if clock.plan is None else clock.plan.get(site)


def with_history(history: Tensor | None, x: Tensor) -> Tensor:
    """History frames, then the window's: what a site's indices index."""
    return x if history is None else torch.cat([history, x], dim=2)


def clip_range(clock: Clock, rate: int, offset: int) -> tuple[Number, Number | None]:
    """Step-relative positions of the clip's first and (once known) last frame at a layer."""
    first = offset - rate * clock.position
    last = None if clock.end is None else first + rate * (clock.end - 1)
    return first, last


def take(x: Tensor, lo: Number, hi: Number) -> Tensor:
    """Frames [lo, hi) of ``x`` (a slice, or a gather when the bounds are tensors)."""
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        return x.index_select(2, torch.arange(_t(lo), _t(hi)).to(x.device).clamp(0, x.shape[2] - 1))
    return x[:, :, lo:hi]


def spread(x: Tensor, lo: Number, hi: Number, n: Number) -> Tensor:
    """A window's frames [lo, hi) placed in a step of ``n`` positions (zeros elsewhere)."""
    if not isinstance(lo, Tensor) and not isinstance(hi, Tensor) and not isinstance(n, Tensor):
        if lo == 0 and hi == n:
            return x
        b, c, _, hh, ww = x.shape
        return torch.cat([x.new_zeros(b, c, lo, hh, ww), x, x.new_zeros(b, c, n - hi, hh, ww)], dim=2)
    j = torch.arange(n, device=x.device)
    lo_d, hi_d = _on(lo, x.device), _on(hi, x.device)
    inside = (j >= lo_d) & (j < hi_d)
    b, c, _, hh, ww = x.shape  # the window may be empty: the zero frame is not sliced from it
    src = torch.cat([x, x.new_zeros(b, c, 1, hh, ww)], dim=2)
    return src.index_select(2, torch.where(inside, j - lo_d, hi_d - lo_d))


def pointwise(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """A 1x1x1 conv that also takes an empty window (torch's conv3d refuses zero frames; a traced
    graph's windows are not empty where it was traced, and the export runs its convs only on non-empty ones)."""
    if int(x.shape[2]):  # traced: the size where it was traced (a 0-d tensor)
        return conv(x)
    b, _, _, h, w = x.shape
    return x.new_empty(b, conv.out_channels, 0, h, w)


def replicate_edges(joined: Tensor, rate: int, offset: int, history: int, clock: Clock) -> Tensor:
    """Frames of ``joined`` (``history`` earlier frames, then this step's) lying before the clip's
    first or after its last frame at this layer, replaced by copies of those frames.

    The layer runs ``rate`` positions per latent frame and its input lags the clip by ``offset``:
    position p holds frame p - offset of this layer's input sequence, which has rate*(end-1)+1 frames.
    """
    n = joined.shape[2]
    first = offset + history - rate * clock.position  # index in ``joined`` of the clip's first frame
    if isinstance(first, int) and not isinstance(clock.end, Tensor):
        last = None if clock.end is None else first + rate * (clock.end - 1)
        if first <= 0 and (last is None or last >= n - 1):
            return joined
        top = n - 1 if last is None else last
        idx = [min(max(min(max(i, first), top), 0), n - 1) for i in range(n)]
        return joined.index_select(2, torch.tensor(idx, device=joined.device))
    idx = torch.maximum(torch.arange(n, device=joined.device), torch.as_tensor(first, device=joined.device))
    if clock.end is not None:
        idx = torch.minimum(idx, first + rate * (torch.as_tensor(clock.end, device=joined.device) - 1))
    return joined.index_select(2, idx.clamp(0, n - 1))


Span = tuple[tuple[int, int], tuple[int, int]]  # (rate, offset) of a block's input and of its output


class ReplicateConv3d(nn.Conv3d):
    """LTX's temporal conv: replicate padding in time (first frame in front; last frame at the end
    unless causal), ``spatial_padding_mode`` in space.

    ``full`` applies it to a whole clip (the encoder); ``forward`` is the streaming step, whose
    state is the last ``kernel_t - 1`` frames it read. A non-causal conv's output lags its input by
    ``delay`` positions.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        causal: bool,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        k = kernel_size
        super().__init__(
            in_channels, out_channels, k, stride=stride, padding=(0, k // 2, k // 2), groups=groups, bias=bias,
            padding_mode=padding_mode,
        )  # fmt: skip
        self.causal = causal
        self.history = k - 1
        self.delay = 0 if causal else (k - 1) // 2
        self.current_tap = self.history - self.delay  # the tap that reads the frame being produced
        self.num_states = 1 if self.history else 0
        self.timeline = (1, 0)  # (rate, offset) of its input, set by the decoder

    def padded(self, x: Tensor) -> Tensor:
        front = self.history if self.causal else self.history // 2
        back = self.history - front
        return torch.cat([x[:, :, :1].expand(-1, -1, front, -1, -1), x, x[:, :, -1:].expand(-1, -1, back, -1, -1)], 2)

    def full(self, x: Tensor) -> Tensor:
        return module_conv3d(self, self.padded(x))

    def kernel_input(self, args: tuple) -> Tensor:
        """What the kernel ran on in a call with ``args`` (padded frames, or history then new frames:
        with windows, those its output window reads)."""
        x, state, clock = (*args, (), None, None)[:3]
        if isinstance(clock, StepContext):
            clock = clock.clock
        if not self.history:
            return x
        if not isinstance(clock, Clock) or clock.full:
            return self.padded(x)
        if clock.frames is None:  # a clock without the step's length: the whole step, as ever
            return replicate_edges(torch.cat([state[0], x], dim=2), *self.timeline, self.history, clock)
        rate, offset = self.timeline
        index = planned(clock, Site.conv_input(self.history, rate, offset, self.delay))
        if index is not None:
            return with_history(state[0], x).index_select(2, index)
        lo, _ = window(clock, rate, offset)
        c, d = window(clock, rate, offset + self.delay)
        return gather(state[0], x, lo, _positions(c - self.history, d), clip_range(clock, rate, offset))

    def index_sites(self) -> list[Site]:
        """The gathers of its windowed steps (``StepPlan``)."""
        if not self.history:
            return []
        rate, offset = self.timeline
        return [Site.conv_input(self.history, rate, offset, self.delay), Site.history(self.history, rate, offset, True)]

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group | None) -> Group:
        """As a stage of its own (``conv_in``): it reads the latents and starts the first stream."""
        if stream is not None:
            flow.consume(stream, path, stage)
        return flow.start("stream", self.out_channels, path)

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return [StateSpec(name, self.in_channels, self.history, scale)] if self.history else []

    def forward(
        self, x: Tensor, state: State = (), clock: Clock | bool | None = None, context: StepContext | None = None
    ) -> tuple[Tensor, State]:
        """A step (or, with a ``full`` clock, a whole clip). As a stage of its own (``conv_in``) it is
        called like the others, ``(x, state, first, context)``."""
        if context is not None:
            clock = context.clock
        elif not isinstance(clock, Clock):
            clock = None
        if not self.history:
            return module_conv3d(self, x), ()
        if clock is not None and clock.full:
            return self.full(x), tuple(state)
        if clock is None or clock.frames is None:
            joined = replicate_edges(torch.cat([state[0], x], dim=2), *self.timeline, self.history, clock or Clock())
            y = module_conv3d(self, joined)
            return y, (joined[:, :, -self.history :].clone(memory_format=torch.contiguous_format),)
        joined = self.kernel_input((x, state, clock))
        if joined.shape[2] > self.history:  # (a traced step: where it was traced; the export skips it when empty)
            y = module_conv3d(self, joined)
        else:  # an empty output window: nothing to compute
            b, _, _, h, w = x.shape
            y = x.new_empty(b, self.out_channels, 0, h, w)
        rate, offset = self.timeline
        index = planned(clock, Site.history(self.history, rate, offset, True))
        if index is not None:
            history = with_history(state[0], x).index_select(2, index)
        else:
            lo, _ = window(clock, rate, offset)
            n = rate * clock.frames  # type: ignore[operator]
            history = gather(state[0], x, lo, _positions(n - self.history, n), clip_range(clock, rate, offset))
        return y, (history.clone(memory_format=torch.contiguous_format),)

    def set_timeline(self, rate: int, offset: int) -> tuple[int, int]:
        self.timeline = (rate, offset)
        return rate, offset + self.delay


class DepthwiseSeparable(nn.Module):
    """A depthwise temporal 3x3x3 conv (the teacher's padding rule) and a pointwise 1x1x1 conv."""

    substitutes_as = "dwsep3d"

    def __init__(self, in_channels: int, out_channels: int, *, causal: bool, padding_mode: str) -> None:
        super().__init__()
        self.depthwise = ReplicateConv3d(
            in_channels, in_channels, 3, causal=causal, groups=in_channels, bias=False, padding_mode=padding_mode
        )
        self.pointwise = nn.Conv3d(in_channels, out_channels, 1)
        self.delay, self.num_states = self.depthwise.delay, 1

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return self.depthwise.state_specs(name, scale)

    def forward(self, x: Tensor, state: State = (), clock: Clock | None = None) -> tuple[Tensor, State]:
        y, state = self.depthwise(x, state, clock)
        return pointwise(self.pointwise, y), state

    def set_timeline(self, rate: int, offset: int) -> tuple[int, int]:
        return self.depthwise.set_timeline(rate, offset)


class FrameConv(FrameConv2d):
    """A per-frame 3x3 conv: no temporal mixing, no delay, no state."""

    delay = 0

    def forward(self, x: Tensor, state: State = (), clock: Clock | None = None) -> tuple[Tensor, State]:  # type: ignore[override]
        return super().forward(x)

    def set_timeline(self, rate: int, offset: int) -> tuple[int, int]:
        return rate, offset


def make_conv(
    op: str, in_channels: int, out_channels: int, padding_mode: str = "zeros", causal: bool = False
) -> nn.Module:
    """The conv of kind ``op``; ``causal``: the decoder's temporal convs read no future frame."""
    if op in ("conv3d", "causal3d"):
        return ReplicateConv3d(in_channels, out_channels, 3, causal=op == "causal3d", padding_mode=padding_mode)
    if op == "dwsep3d":
        return DepthwiseSeparable(in_channels, out_channels, causal=causal, padding_mode=padding_mode)
    if op == "spatial2d":
        return FrameConv(in_channels, out_channels)
    raise ValueError(f"unknown operator {op!r} for an LTX decoder")


class DelayLine(nn.Module):
    """Hands frames on ``frames`` positions later: the skip of a block whose convs lag."""

    def __init__(self, channels: int, frames: int) -> None:
        super().__init__()
        self.channels, self.frames = channels, frames
        self.num_states = 1 if frames else 0
        self.timeline = (1, 0)  # (rate, offset) of its input, set by its block

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return [StateSpec(name, self.channels, self.frames, scale)] if self.frames else []

    def index_sites(self) -> list[Site]:
        """The gathers of its windowed steps (``StepPlan``)."""
        if not self.frames:
            return []
        rate, offset = self.timeline
        return [Site.delayed(self.frames, rate, offset), Site.history(self.frames, rate, offset, False)]

    def forward(self, x: Tensor, state: State, clock: Clock) -> tuple[Tensor, State]:
        if not self.frames or clock.full:
            return x, tuple(state)
        if not clock.narrow:
            joined = torch.cat([state[0], x], dim=2)
            history = joined[:, :, -self.frames :].clone(memory_format=torch.contiguous_format)
            return joined[:, :, : x.shape[2]], (history,)
        # windows: the output window's frames, ``frames`` positions earlier (the state, then the input window)
        rate, offset = self.timeline
        index = planned(clock, Site.delayed(self.frames, rate, offset))
        if index is not None:
            both = with_history(state[0], x)
            history = both.index_select(2, planned(clock, Site.history(self.frames, rate, offset, False)))  # type: ignore[arg-type]
            return both.index_select(2, index), (history.clone(memory_format=torch.contiguous_format),)
        lo, _ = window(clock, rate, offset)
        c, d = window(clock, rate, offset + self.frames)
        y = gather(state[0], x, lo, _positions(c - self.frames, d - self.frames))
        n = rate * clock.frames  # type: ignore[operator]
        history = gather(state[0], x, lo, _positions(n - self.frames, n))
        return y, (history.clone(memory_format=torch.contiguous_format),)


def idle(clock: Clock, span: Span, x: Tensor) -> bool:
    """Whether a block's eager step computes nothing: neither its input nor its output window holds a
    frame of the clip (every position before the clip's first frame, so its state keeps nothing of
    the clip; or every output past the clip's last frame, so it never runs again). It then returns
    an empty window and leaves its state as it was."""
    if not clock.narrow or clock.traced or x.shape[2]:
        return False
    lo, hi = window(clock, *span[1])
    return lo >= hi


def pixel_norm(x: Tensor) -> Tensor:
    """x / sqrt(mean over channels of x^2 + 1e-8): LTX's parameter-free norm (fp32 for half types)."""
    if fast_eager() and x.dtype in (torch.float16, torch.bfloat16):  # no float32 copy of x (as RMSNorm)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        inv = norm.square_().div_(x.shape[1]).add_(1e-8).rsqrt_()
        return times_in_dtype(x, inv)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + 1e-8)).to(x.dtype)


def channel_layer_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A LayerNorm over the channels of (B, C, T, H, W) (explicit permutes: they export to ONNX)."""
    return norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class PixelNorm(nn.Module):
    """``pixel_norm`` as a module; students add a per-channel ``gamma`` (pruning rescales it, as the
    mean over fewer channels changes). A ``coupling.PrunableNorm``: an RMS norm over channels, whose
    teacher (no ``gamma``) stands for a unit gain."""

    channel_params: ClassVar[tuple[str, ...]] = ("gamma",)
    kept_norm_share: ClassVar[bool] = True
    student_params: ClassVar[tuple[str, ...]] = ("gamma",)

    def __init__(self, channels: int, affine: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels)) if affine else None

    def pruned_scale(self, kept: int, total: int) -> float:
        return (total / kept) ** 0.5

    def forward(self, x: Tensor) -> Tensor:
        y = pixel_norm(x)
        return y if self.gamma is None else y * self.gamma.view(1, -1, 1, 1, 1).to(y.dtype)


def modulation(embedding: Tensor, table: Tensor, index: Tensor | None, parts: int) -> list[Tensor]:
    """Scale/shift terms (B, C, 1, 1, 1): the embedding (read at ``index`` in a student, whose
    embedder keeps the teacher's width) split in ``parts``, plus each part's table row."""
    if index is not None:
        embedding = embedding.index_select(1, index)
    # one add, reshape and split (an exported step computes these every step, from its timestep input)
    ada = (embedding + table.flatten().to(embedding.dtype)).view(-1, table.numel(), 1, 1, 1)
    return list(ada.split(table.shape[1], dim=1))


class TimestepEmbedder(nn.Module):
    """256-d sinusoid ([cos | sin], frequencies 10000^(-i/128)), linear, SiLU, linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timestep: Tensor, dtype: torch.dtype) -> Tensor:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32, device=timestep.device) / 128)
        args = timestep.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


@dataclass
class StepContext:
    """What every block of one decoder step reads besides its input and state."""

    clock: Clock
    timestep: Tensor | None = None  # scaled by the checkpoint's timestep_scale_multiplier
    noise: Sequence[Tensor] = ()  # the stream's spatial noise maps, in injection order


class ResBlock(nn.Module):
    """LTX's residual block: pixel norm, [scale/shift], SiLU, conv, [noise], pixel norm, [scale/shift],
    SiLU, conv, [noise]; the skip is delayed as much as the convs lag, and goes through LayerNorm
    and a 1x1 conv when the width changes (or always, with ``shortcut``: the released students'
    last stages)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        op: str,
        *,
        padding_mode: str = "zeros",
        conditioned: bool = False,
        noise: bool = False,
        student: bool = False,
        embedding_width: int | None = None,
        causal: bool = False,
        shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.norm1, self.norm2 = PixelNorm(in_channels, student), PixelNorm(out_channels, student)
        self.conv1 = make_conv(op, in_channels, out_channels, padding_mode, causal)
        self.conv2 = make_conv(op, out_channels, out_channels, padding_mode, causal)
        self.norm3: nn.LayerNorm | None = None
        self.shortcut: nn.Conv3d | None = None
        if in_channels != out_channels or shortcut:  # a forced shortcut: LayerNorm + 1x1 even at equal widths
            self.norm3 = nn.LayerNorm(in_channels, eps=1e-6)
            self.shortcut = nn.Conv3d(in_channels, out_channels, 1)
        self.noise1 = nn.Parameter(torch.zeros(out_channels, 1, 1)) if noise else None
        self.noise2 = nn.Parameter(torch.zeros(out_channels, 1, 1)) if noise else None
        self.noise_index = -1  # where its two maps sit in the stream's noise maps, set by the decoder
        self.scale_shift_table = nn.Parameter(torch.randn(4, in_channels) / in_channels**0.5) if conditioned else None
        # a student reads the teacher-width shared embedding at its kept channels
        self.ada_index: Tensor | None
        if conditioned and student:
            full = embedding_width or in_channels
            self.register_buffer("ada_index", (torch.arange(4)[:, None] * full + torch.arange(in_channels)).flatten())
        else:
            self.ada_index = None
        self.skip = DelayLine(in_channels, self.conv1.delay + self.conv2.delay)
        self.num_states = self.conv1.num_states + self.conv2.num_states + self.skip.num_states

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return (
            self.conv1.state_specs(f"{name}.conv1", scale)
            + self.conv2.state_specs(f"{name}.conv2", scale)
            + self.skip.state_specs(f"{name}.skip", scale)
        )

    def set_timeline(self, rate: int, offset: int) -> tuple[int, int]:
        out = self.conv2.set_timeline(*self.conv1.set_timeline(rate, offset))
        self.skip.timeline = (rate, offset)
        self.span: Span = ((rate, offset), out)
        return out

    def forward(
        self, x: Tensor, state: State, context: StepContext, embedding: Tensor | None = None
    ) -> tuple[Tensor, State]:
        if idle(context.clock, self.span, x):
            b, _, _, h, w = x.shape
            return x.new_empty(b, self.out_channels, 0, h, w), tuple(state)
        n1, n2 = self.conv1.num_states, self.conv2.num_states
        h = self.norm1(x)
        if self.scale_shift_table is not None:
            shift1, scale1, shift2, scale2 = modulation(embedding, self.scale_shift_table, self.ada_index, 4)  # type: ignore[arg-type]
            h = h * (1 + scale1) + shift1
        h, s1 = self.conv1(F.silu(h), state[:n1], context.clock)
        if self.noise1 is not None and context.noise:
            h = h + self.noise1[None, :, None] * context.noise[self.noise_index]  # (H, W) maps broadcast: no reshapes
        h = self.norm2(h)
        if self.scale_shift_table is not None:
            h = h * (1 + scale2) + shift2
        h, s2 = self.conv2(F.silu(h), state[n1 : n1 + n2], context.clock)
        if self.noise2 is not None and context.noise:
            h = h + self.noise2[None, :, None] * context.noise[self.noise_index + 1]
        skip, s3 = self.skip(x, state[n1 + n2 :], context.clock)
        if self.shortcut is not None:
            skip = pointwise(self.shortcut, channel_layer_norm(self.norm3, skip))  # type: ignore[arg-type]
        return h + skip, s1 + s2 + s3

    def full(self, x: Tensor) -> Tensor:
        """The whole clip at once, with causal or symmetric padding (the encoder's blocks)."""
        h = self.conv1.full(F.silu(self.norm1(x)))
        h = self.conv2.full(F.silu(self.norm2(h)))
        if self.shortcut is not None:
            x = self.shortcut(channel_layer_norm(self.norm3, x))  # type: ignore[misc]
        return h + x

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        flow.consume(stream, f"{path}.conv1", stage, norm=f"{path}.norm1")
        hidden = flow.start("hidden", self.out_channels, f"{path}.conv1", name=f"{path}.hidden")
        flow.consume(hidden, f"{path}.conv2", stage, norm=f"{path}.norm2")
        if self.noise1 is not None:
            flow.slice(hidden, f"{path}.noise1")
        if self.scale_shift_table is not None:  # rows: shift1, scale1 (over the input), shift2, scale2 (hidden)
            c = self.scale_shift_table.shape[1]
            for part, group in enumerate((stream, stream, hidden, hidden)):
                flow.slice(group, f"{path}.scale_shift_table", part * c)
                flow.gather(group, f"{path}.ada_index", part * c)
        if self.shortcut is not None:
            flow.slice(stream, f"{path}.norm3.weight")
            flow.slice(stream, f"{path}.norm3.bias")
            flow.consume(stream, f"{path}.shortcut", stage)
            stream = flow.start("stream", self.shortcut.out_channels, f"{path}.shortcut")
        flow.produce(stream, f"{path}.conv2")
        if self.noise2 is not None:
            flow.slice(stream, f"{path}.noise2")
        return stream
