"""Building blocks of causal video VAEs, each a pure function of (input, its state).

Every block takes the slice of the state tuple it owns and returns its new slice; blocks that
carry nothing take and return ``()``. Layer semantics follow the Wan VAE (see docs/architecture.md).
Blocks also declare how their channels are coupled (``channel_flow``, see ``coupling``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, KeysView
from contextlib import contextmanager
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coupling import ROWS, TIME_ROWS, V_ROWS, ChannelFlow, Group
from .streaming import State, StateSpec, StreamingBlock, blocks_state_specs, run_blocks


def fold_time(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), so 2D layers act on every frame alone."""
    b, c, t, h, w = x.shape
    return settled(x.transpose(1, 2).reshape(b * t, c, h, w))


def unfold_time(y: Tensor, batch: int) -> Tensor:
    """Inverse of ``fold_time``."""
    bt, c, h, w = y.shape
    return settled(y.reshape(batch, bt // batch, c, h, w).transpose(1, 2))


def settled(x: Tensor) -> Tensor:
    """A channels-last ``x`` as the same memory with the strides torch itself gives such a tensor.

    A size-1 dim's stride is arbitrary (one frame, a batch of one), and reshapes and oneDNN leave
    odd ones there; torch's convs and ``cat`` then take the tensor for contiguous and answer
    contiguous, and every layer after them runs channels-first (its norms 10x slower). A view: no
    copy; eager inference only (``fast_eager``: an as_strided view would cost autograd a scatter).
    """
    b, c, *space = x.shape
    if x.dim() not in (4, 5) or c == 1 or 1 not in (b, *space) or x.stride(1) != 1 or not fast_eager():
        return x  # without a size-1 dim, channels-last strides are unique already
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.is_contiguous() or not x.is_contiguous(memory_format=fmt):
        return x
    strides = [c]  # the spatial dims', innermost last; the batch's spans them all
    for size in reversed(space[1:]):
        strides.insert(0, strides[0] * size)
    canonical = (strides[0] * space[0], 1, *strides)
    return x if x.stride() == canonical else x.as_strided(x.shape, canonical)


_FAST_PATHS = [True]  # plain_ops() turns them off (process-wide: tests and benchmarks only)
# device types whose eager decoders run channels-last: measured faster on CPUs (oneDNN); on CUDA not
# yet measured, so off (benchmarks/gpu_suite.py's "channels-last" mode turns it on for one run)
CHANNELS_LAST_DEVICES = {"cpu"}


@contextmanager
def channels_last_on(device_type: str) -> Iterator[None]:
    """Within the block, eager decoders on ``device_type`` also run channels-last (a measurement
    switch, process-wide like ``plain_ops``)."""
    added = device_type not in CHANNELS_LAST_DEVICES
    CHANNELS_LAST_DEVICES.add(device_type)
    try:
        yield
    finally:
        if added:
            CHANNELS_LAST_DEVICES.discard(device_type)


@contextmanager
def plain_ops() -> Iterator[None]:
    """Within the block, the blocks run their plain ops in the layout they are given: no
    channels-last, nothing in place. The reference the fast paths are tested against, and the
    "before" column of benchmarks/student_speed.py. Process-wide, not thread-safe."""
    _FAST_PATHS.append(False)
    try:
        yield
    finally:
        _FAST_PATHS.pop()


def fast_eager() -> bool:
    """Whether the in-place, one-pass eager paths apply: no autograd to feed, and no tracer (an
    exported graph keeps the plain ops, which every runtime maps one to one)."""
    return (
        _FAST_PATHS[-1]
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()  # compilers fuse the plain ops (oneDNN's op has no meta kernel)
    )


def exporting() -> bool:
    """Whether an ONNX export is tracing the model: graph forms of the fast paths apply (standard
    ops that every runtime maps one to one, cheaper than the plain ops they equal)."""
    return _FAST_PATHS[-1] and torch.onnx.is_in_onnx_export()


def is_channels_last(x: Tensor) -> bool:
    """A (B, C, T, H, W) tensor stored frame-major with channels innermost (``channels_last_3d``):
    folding time into the batch gives a channels-last 2D view of it, without a copy."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def to_channels_last(x: Tensor) -> Tensor:
    """``x`` stored as ``channels_last_3d`` for a decoder's eager CPU run: oneDNN's native layout,
    where per-channel norms reduce over contiguous memory and the small-width, depthwise and 1x1
    convs of the students run 2-7x faster (benchmarks/RESULTS.md). Values are unchanged; devices
    not in ``CHANNELS_LAST_DEVICES`` and traced exports keep the layout they were given."""
    if x.dim() != 5 or x.device.type not in CHANNELS_LAST_DEVICES or torch.jit.is_tracing() or not _FAST_PATHS[-1]:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d)


def state_format(model: Any) -> torch.memory_format:
    """The layout a stream of ``model`` (a ``LatentDecoder``) keeps its 5D state in: channels-last
    where its decoder runs so (``channels_last`` on a device ``to_channels_last`` converts on: a
    joined history keeps its chunk's layout, so a first step then converts no state)."""
    device = next(model.parameters()).device
    if getattr(model, "channels_last", False) and device.type in CHANNELS_LAST_DEVICES and _FAST_PATHS[-1]:
        return torch.channels_last_3d
    return torch.contiguous_format


def like_layout(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in ``x``'s layout when ``x`` is channels-last: torch runs small convs with its own
    kernel, whose output is contiguous, and one such conv would turn the rest of a decoder back."""
    if is_channels_last(x) and not is_channels_last(y) and not torch.jit.is_tracing():
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y


def conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: tuple[int, int, int],
    groups: int = 1,
    stride: tuple[int, int, int] = (1, 1, 1),
) -> Tensor:
    """``F.conv3d``, but in fast eager runs an fp32 CPU input goes to oneDNN where torch's heuristic
    would pick torch's own kernel for it (below ~20k rows of N*C*T*H, a 2D rule: an LTX conv of 10
    frames of 32x32 at 64 channels, a 12-channel first frame). There that kernel is 1.3-15x slower
    and answers contiguous (benchmarks/RESULTS.md). Always for a channels-last input; for a
    contiguous one unless it is a 1x1x1 conv or its weight dwarfs its input (oneDNN reorders the
    weight each call: a few frames of 8x8 into a 4096-channel upsampler conv)."""
    if (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and fast_eager()
        and torch.backends.mkldnn.is_available()
        and (is_channels_last(x) or _onednn_pays(x, weight))
    ):
        one = [1, 1, 1]
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), one, groups)
    return F.conv3d(x, weight, bias, stride=stride, padding=padding, groups=groups)


WEIGHT_PER_POSITION = 16384  # measured: oneDNN 0.8-2x torch's kernel below, 0.44-1.0x above


def _onednn_pays(x: Tensor, weight: Tensor) -> bool:
    """Whether oneDNN beats torch's own kernel on a contiguous input (measured on a 2-core CPU)."""
    positions = x.shape[2] * x.shape[3] * x.shape[4]
    spatial = weight.shape[-1] > 1 or weight.shape[-2] > 1
    return spatial and weight.numel() <= WEIGHT_PER_POSITION * positions


def module_conv3d(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """What ``conv(x)`` computes, through ``conv3d`` (its padding mode applied first)."""
    if conv.dilation != (1, 1, 1) or isinstance(conv.padding, str):
        return conv._conv_forward(x, conv.weight, conv.bias)
    if conv.padding_mode == "zeros":
        return conv3d(x, conv.weight, conv.bias, conv.padding, conv.groups, conv.stride)
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    return conv3d(padded, conv.weight, conv.bias, (0, 0, 0), conv.groups, conv.stride)


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 conv, run as ``conv3d`` runs its convs: a channels-last fp32 input on a CPU goes to
    oneDNN whatever its size (torch's own kernel, which it picks for one latent frame, is slower and
    answers contiguous)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return conv3d(x, self.weight, self.bias, (0, 0, 0))


def join_history(history: Tensor, x: Tensor) -> Tensor:
    """``cat(history, x)`` over time, in ``x``'s layout (a channels-last chunk stays channels-last:
    a contiguous state, e.g. a stream's zero state, is converted, not the chunk)."""
    if is_channels_last(x) and not torch.jit.is_tracing():
        history, x = settled(history.contiguous(memory_format=torch.channels_last_3d)), settled(x)
    return torch.cat([history, x], dim=2)


PADDING_MODES = ("zeros", "replicate")  # spatial padding of the convs here (torch's names)
HISTORY_MODES = ("zeros", "replicate")  # what precedes a clip's first frame


def check_padding_mode(mode: str, what: str = "padding_mode", allowed: tuple[str, ...] = PADDING_MODES) -> str:
    """``mode`` if it is one of ``allowed``; a ValueError naming it otherwise."""
    if mode not in allowed:
        raise ValueError(f"unknown {what} {mode!r} (expected one of {', '.join(allowed)})"[:200])
    return mode


def spatially_padded_conv3d(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], groups: int, padding_mode: str
) -> Tensor:
    """``conv3d`` without temporal padding, ``padding`` spatially: zeros, or the edge values
    replicated, as ``padding_mode`` says."""
    if padding_mode == "zeros":
        return conv3d(x, weight, bias, (0, *padding), groups)
    check_padding_mode(padding_mode)  # raises, naming it, unless "replicate"
    ph, pw = padding
    return conv3d(F.pad(x, (pw, pw, ph, ph, 0, 0), mode="replicate"), weight, bias, (0, 0, 0), groups)


def streaming_conv3d(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: tuple[int, int],
    groups: int,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    """The streaming causal conv every implementation must match: conv3d over ``cat(history, x)``
    (no temporal padding; ``padding`` spatially, zeros or the edge values replicated as
    ``padding_mode`` says) and the last ``P`` frames of it as the new history."""
    joined = join_history(history, x)
    y = spatially_padded_conv3d(joined, weight, bias, padding, groups, padding_mode)
    # the new history in the chunk's layout (channels-last: frames are outermost, so it is one block
    # of memory to copy, and the next step's join converts nothing); contiguous otherwise
    keep = torch.preserve_format if is_channels_last(joined) else torch.contiguous_format
    return like_layout(y, x), joined[:, :, -history.shape[2] :].clone(memory_format=keep)


class CausalConv3d(nn.Conv3d, StreamingBlock):
    """A Conv3d that sees only present and past frames.

    Spatial padding is symmetric, zeros or the edge values replicated (``padding_mode``). The
    temporal padding in front is the state: the last ``kernel_t - 1`` input frames of earlier
    chunks, so chunked and one-shot application agree exactly. Before the clip's first frame,
    ``history`` says what there is: zeros (Wan), or the first frame repeated (``"replicate"``,
    Mochi and CogVideoX): then ``forward(x, state, first=True)`` ignores ``state`` and puts
    ``x[:, :, :1]`` repeated ``kernel_t - 1`` times in front (attribute ``history_init``).

    ``fused_step`` swaps in another implementation of ``step`` with the signature
    ``(x, history, weight, bias, padding, groups, padding_mode=...) -> (y, new_history)``: the fused
    Triton kernel (engines) or a plugin node (ONNX export). ``None`` runs the plain torch ops.
    """

    fused_step: Callable[..., tuple[Tensor, Tensor]] | None = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        history: str = "zeros",
    ) -> None:
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(
            in_channels,
            out_channels,
            (kt, kh, kw),
            padding=(0, kh // 2, kw // 2),
            groups=groups,
            bias=bias,
            padding_mode=check_padding_mode(padding_mode),
        )
        self.history_init = check_padding_mode(history, "history", HISTORY_MODES)
        self.history = kt - 1
        self.current_tap = kt - 1  # the kernel tap that reads the frame being produced
        self.num_states = 1 if self.history else 0

    def initial_history(self, x: Tensor, state: State, first: bool) -> Tensor:
        """The frames in front of ``x``: the state, or on a clip's first chunk with a replicated
        history, its first frame repeated."""
        if first and self.history_init == "replicate":
            return torch.cat([x[:, :, :1]] * self.history, dim=2)
        return state[0]

    def kernel_input(self, args: tuple) -> Tensor:
        """What the kernel ran on in a call with ``args`` (history, then the new frames)."""
        if not self.history:
            return args[0]
        first = len(args) > 2 and bool(args[2])
        return torch.cat([self.initial_history(args[0], args[1], first), args[0]], dim=2)

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        if not self.history:
            return []
        return [StateSpec(name, self.in_channels, self.history, scale, self.history_init)]

    def step(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Convolve ``x`` after ``history``; return the output and the new history."""
        step = self.fused_step or streaming_conv3d
        return step(x, history, self.weight, self.bias, self.padding[1:], self.groups, padding_mode=self.padding_mode)

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:
        if not self.history:
            return module_conv3d(self, x), ()
        if first and self.fused_step is None and fast_eager() and x.shape[2] == 1:
            return self.first_frame(x, state)
        y, history = self.step(x, self.initial_history(x, state, first))
        return y, (history,)

    def first_frame(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """A clip's first frame, one (1, kh, kw) conv for what ``step`` gives, at 1/kt of its work
        (the Wan2.1 teacher's first chunk: 2.8x faster), and the same new history. After a zero
        history (the state before any frame, by contract) only the current tap reads anything; after
        a replicated one every tap reads the frame itself, so their sum does."""
        if self.history_init == "zeros":
            tap = self.weight[:, :, self.current_tap : self.current_tap + 1]
        else:
            tap = self.weight.sum(dim=2, keepdim=True)
        history = join_history(self.initial_history(x, state, True)[:, :, 1:], x)  # as ``step``'s: the last frames
        y = spatially_padded_conv3d(x, tap, self.bias, self.padding[1:], self.groups, self.padding_mode)
        return like_layout(y, x), (history,)

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group | None) -> Group:
        """As a stage of its own (``conv_in``): it reads the latents and starts the first stream."""
        if stream is not None:
            flow.consume(stream, path, stage)
        return flow.start("stream", self.out_channels, path)


def streaming_convs(model: nn.Module) -> list[CausalConv3d]:
    """Every causal conv of ``model`` that carries history (the ones a fused step can replace)."""
    return [m for m in model.modules() if isinstance(m, CausalConv3d) and m.history]


def other_temporal_convs(model: nn.Module) -> list[nn.Conv3d]:
    """Convs of ``model`` with more than one frame in their kernel that are no ``CausalConv3d`` (a
    family's own streaming conv): no fused step replaces them, which the fast paths report."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv3d) and not isinstance(m, CausalConv3d) and m.kernel_size[0] > 1
    ]


@contextmanager
def fused_steps(
    model: nn.Module, step: Callable[..., tuple[Tensor, Tensor]], convs: list[CausalConv3d] | None = None
) -> Iterator[None]:
    """Within the block, every streaming causal conv of ``model`` (or just ``convs``) runs ``step``."""
    convs = streaming_convs(model) if convs is None else convs
    for conv in convs:
        conv.fused_step = step
    try:
        yield
    finally:
        for conv in convs:
            del conv.fused_step


def times_in_dtype(x: Tensor, scale: Tensor) -> Tensor:
    """``x * scale`` for a half ``x`` and a float32 ``scale`` (a norm's per-position factor): each
    product taken in float32 and written in x's dtype, in one pass. The plain ops upcast a float32
    copy of x first: about 10 bytes moved per element here against 32 (benchmarks/step_traffic.py)."""
    return torch.mul(x, scale, out=torch.empty_like(x))


class RMSNorm(nn.Module):
    """x / max(||x||_2, 1e-12) over channels * sqrt(C) * gamma; the norm in fp32 for half types.

    Written as one reduction and a reciprocal square root: ``F.normalize`` over a strided
    channel dim is several times slower on CPUs, and the results agree to float rounding.

    A prunable norm (``coupling.PrunableNorm``): its gain is ``gamma``; over fewer channels the
    norm of its input shrinks and ``sqrt(C)`` with it, so pruning multiplies the gain by
    ``sqrt(total / kept)`` and by the measured share of the input's norm the kept channels carry.
    """

    channel_params: ClassVar[tuple[str, ...]] = ("gamma",)
    kept_norm_share: ClassVar[bool] = True

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        if fast_eager():
            if half:  # the norm in float32 without a float32 copy of x (``times_in_dtype``)
                norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
                return times_in_dtype(x, norm.clamp_min_(1e-12).reciprocal_().mul_(self.scale)).mul_(self.gamma)
            # one reduction pass, a divide and an in-place gain (plain: 5 ops)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
            return torch.div(x, norm).mul_(self.gamma * self.scale)  # x / max(||x||, eps), as documented
        xf = x.float() if half else x
        inv = torch.rsqrt((xf * xf).sum(dim=1, keepdim=True).clamp_min(1e-24)) * self.scale
        return (xf * inv).to(x.dtype) * self.gamma

    def pruned_scale(self, kept: int, total: int) -> float:
        return (total / kept) ** 0.5


class GroupNorm(nn.GroupNorm):
    """Group norm computed per frame: (B, C, T, H, W) statistics over each group's channels and
    one frame's positions (as diffusers' Mochi VAE does, frame by frame); other ranks as
    ``nn.GroupNorm``. Statistics in fp32 for half types.

    A prunable norm (``coupling.PrunableNorm``) with per-channel ``weight`` and ``bias``: its
    statistics stay per group, so pruning only keeps their entries at the kept channels (a
    student's width must stay a multiple of ``num_groups``). It mixes a whole frame.
    """

    channel_params: ClassVar[tuple[str, ...]] = ("weight", "bias")
    kept_norm_share: ClassVar[bool] = False
    mixes_frame: ClassVar[bool] = True

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            return super().forward(x)
        b, c, t, h, w = x.shape
        if c // self.num_groups * h * w == 1:  # one value per group: x - mean is 0 (torch refuses to compute it)
            y = torch.zeros_like(x) if self.bias is None else self.bias.view(1, c, 1, 1, 1).expand(b, c, t, h, w)
            return y.to(x.dtype)
        frames = settled(x.transpose(1, 2).reshape(b * t, c, h, w))  # torch's fused kernel, frame by frame
        weight, bias = self.weight, self.bias
        # eager, the kernel takes half types itself (float32 statistics, one rounding of each output);
        # the plain ops (exports, compiles, training) upcast a copy of x
        if x.dtype in (torch.float16, torch.bfloat16) and not fast_eager():
            frames = frames.float()
            weight, bias = (None, None) if weight is None else (weight.float(), bias.float())
        y = F.group_norm(frames, self.num_groups, weight, bias, self.eps)  # channels-last in, channels-last out
        return y.to(x.dtype).reshape(b, t, c, h, w).transpose(1, 2)

    def pruned_scale(self, kept: int, total: int) -> float:
        return 1.0

    # exact tiling (``flashvaed.models.tiling``): a tile contributes its sums, the frame's statistics
    # are their total, and each tile normalises its own positions with them
    frame_context: ClassVar[str] = "sum"

    def frame_partial(self, x: Tensor) -> Tensor:
        """(B, T, groups, 3) float64: the count, sum and sum of squares of each group in each frame of ``x``."""
        b, c, t, h, w = x.shape
        g = self.num_groups
        xs = x.detach().double().reshape(b, g, c // g, t, h, w)
        n = torch.full((b, g, t), float(c // g * h * w), dtype=torch.float64, device=x.device)
        return torch.stack([n, xs.sum(dim=(2, 4, 5)), (xs * xs).sum(dim=(2, 4, 5))], dim=-1).transpose(1, 2)

    def frame_resolve(self, total: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and 1/std of every (sample, frame, group) from the frame's summed partials."""
        n, s, q = total.unbind(-1)
        mean = s / n
        var = (q / n - mean * mean).clamp_min(0.0)
        return mean, torch.rsqrt(var + self.eps)

    def frame_apply(self, x: Tensor, resolved: tuple[Tensor, Tensor], region: tuple[int, int, int, int]) -> Tensor:
        """This norm of ``x`` (a tile's positions) with the whole frame's statistics."""
        mean, rstd = resolved
        b, c, t, h, w = x.shape
        g = self.num_groups
        xs = x.double().reshape(b, g, c // g, t, h, w)
        m = mean.transpose(1, 2).reshape(b, g, 1, t, 1, 1)
        r = rstd.transpose(1, 2).reshape(b, g, 1, t, 1, 1)
        y = ((xs - m) * r).reshape(b, c, t, h, w)
        if self.weight is not None:
            y = y * self.weight.double().view(1, c, 1, 1, 1) + self.bias.double().view(1, c, 1, 1, 1)
        return y.to(x.dtype)


class DepthwiseSeparableConv3d(StreamingBlock):
    """Depthwise causal 3x3x3 conv (one filter per channel, the same state rule as the dense
    conv: it keeps the last 2 input frames, ``history`` before the first) followed by a pointwise
    1x1x1 conv."""

    num_states = 1
    substitutes_as = "dwsep3d"  # pruning fits it to a dense 3x3x3 conv

    def __init__(
        self, in_channels: int, out_channels: int, padding_mode: str = "zeros", history: str = "zeros"
    ) -> None:
        super().__init__()
        self.depthwise = CausalConv3d(
            in_channels, in_channels, 3, groups=in_channels, bias=False, padding_mode=padding_mode, history=history
        )
        self.pointwise = PointwiseConv3d(in_channels, out_channels)

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return self.depthwise.state_specs(name, scale)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        y, state = self.depthwise(x, state, first)
        return like_layout(self.pointwise(y), y), state


class FrameConv2d(nn.Conv2d, StreamingBlock):
    """A 3x3 conv applied to every frame alone (zero or replicate spatial padding): no temporal
    mixing, no state."""

    substitutes_as = "spatial2d"

    def __init__(self, in_channels: int, out_channels: int, padding_mode: str = "zeros") -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, padding_mode=check_padding_mode(padding_mode))

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:
        return unfold_time(self._conv_forward(fold_time(x), self.weight, self.bias), x.shape[0]), ()


# Operator kinds: the registry of the 3x3(x3) convs a layout can ask for by name. A factory is called
# as ``factory(in_channels, out_channels, **options)`` and returns a ``StreamingBlock`` (``forward(x,
# state, first) -> (y, state)``, ``num_states``, ``state_specs``). The options a family passes through
# ``make_conv`` describe its padding: ``padding_mode`` (spatial: "zeros" or "replicate") and
# ``history`` (what precedes the first frame: "zeros" or "replicate"); a factory takes every option
# it is given, ignoring what does not apply to its kind (a per-frame conv has no history). Built-in
# kinds: a causal 3D conv, a 3D conv that also reads one future frame (LTX-Video's teacher; its
# decoder runs with latency, and builds it itself), depthwise-separable 3D (with the temporal
# behaviour of the family's teacher conv), per-frame 2D. A family registers its own kinds with
# ``register_op`` when its module is imported, and lists the kinds its decoders build in
# ``Family.ops``.
OpFactory = Callable[..., StreamingBlock]
_OP_FACTORIES: dict[str, OpFactory] = {}
OPS: KeysView[str] = _OP_FACTORIES.keys()  # the registered kinds' names: a live view, in registration order


def register_op(name: str, factory: OpFactory, *, replace: bool = False) -> OpFactory:
    """Register operator kind ``name``: ``factory(in_channels, out_channels, **options)`` builds it.

    Registering a name again with another factory is refused unless ``replace``; registering the
    same factory again is a no-op (a module imported twice). Returns ``factory``.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"an operator kind is a lower-case identifier, got {name!r}")
    known = _OP_FACTORIES.get(name)
    if known is not None and known is not factory and not replace:
        raise ValueError(f"operator kind {name!r} is already registered")
    _OP_FACTORIES[name] = factory
    return factory


def unregister_op(name: str) -> None:
    """Forget operator kind ``name`` (tests registering a kind of their own clean up with it)."""
    _OP_FACTORIES.pop(name, None)


def make_conv(op: str, in_channels: int, out_channels: int, **options: Any) -> StreamingBlock:
    """The 3x3(x3) conv of a residual block or head, as operator kind ``op``; ``options``
    (``padding_mode``, ``history``, or a family's own) go to the kind's factory."""
    factory = _OP_FACTORIES.get(op)
    if factory is None:
        raise ValueError(f"unknown operator {op!r} (expected one of {', '.join(OPS)})")
    return factory(in_channels, out_channels, **options)


def _causal3d(in_channels: int, out_channels: int, **options: Any) -> StreamingBlock:
    return CausalConv3d(in_channels, out_channels, 3, **options)


def _future3d(in_channels: int, out_channels: int, **options: Any) -> StreamingBlock:
    raise ValueError("operator conv3d (a 3D conv reading a future frame) does not fit a causal decoder")


def _dwsep3d(in_channels: int, out_channels: int, **options: Any) -> StreamingBlock:
    return DepthwiseSeparableConv3d(in_channels, out_channels, **options)


def _spatial2d(in_channels: int, out_channels: int, *, history: str = "zeros", **options: Any) -> StreamingBlock:
    return FrameConv2d(in_channels, out_channels, **options)  # per frame: nothing precedes a frame


register_op("causal3d", _causal3d)
register_op("conv3d", _future3d)
register_op("dwsep3d", _dwsep3d)
register_op("spatial2d", _spatial2d)


def norm_silu(norm: nn.Module, x: Tensor) -> Tensor:
    """SiLU of ``norm(x)``; in fast eager runs in place on the norm's output when the norm is one of
    ours (they return a new tensor), which saves a tensor the size of the activation per call."""
    y = norm(x)
    return F.silu(y, inplace=fast_eager() and isinstance(norm, (RMSNorm, GroupNorm)) and y is not x)


NormFactory = Callable[[int], nn.Module]  # channels -> a norm over dim 1 of (B, C, T, H, W)
ConvFactory = Callable[[str, int, int], StreamingBlock]  # (op, in, out) -> a conv of operator kind op


class ResidualBlock(StreamingBlock):
    """norm, SiLU, conv, norm, SiLU, conv; plus a 1x1x1 shortcut when widths differ.

    ``hidden`` is the width between the two convs (the output width in the teacher); ``op`` the
    conv kind; ``shortcut=True`` keeps a 1x1x1 shortcut even when in and out widths agree.
    ``norm(channels)`` builds each norm (RMS norms in Wan; ``lambda c: GroupNorm(32, c)`` for a
    family with group norms) and should be a prunable norm (``coupling.PrunableNorm``);
    ``conv(op, in, out)`` builds each conv (``make_conv``, or it with the family's padding bound:
    ``functools.partial(make_conv, padding_mode="replicate", history="replicate")``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int | None = None,
        op: str = "causal3d",
        shortcut: bool = False,
        *,
        norm: NormFactory = RMSNorm,
        conv: ConvFactory = make_conv,
    ) -> None:
        super().__init__()
        self.hidden = hidden = hidden or out_dim
        self.norm1 = norm(in_dim)
        self.conv1 = conv(op, in_dim, hidden)
        self.norm2 = norm(hidden)
        self.conv2 = conv(op, hidden, out_dim)
        self.shortcut = PointwiseConv3d(in_dim, out_dim) if shortcut or in_dim != out_dim else None
        self.num_states = self.conv1.num_states + self.conv2.num_states

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return self.conv1.state_specs(f"{name}.conv1", scale) + self.conv2.state_specs(f"{name}.conv2", scale)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        n1 = self.conv1.num_states
        h, s1 = self.conv1(norm_silu(self.norm1, x), state[:n1], first)
        h, s2 = self.conv2(norm_silu(self.norm2, h), state[n1:], first)
        skip = x if self.shortcut is None else self.shortcut(x)
        if fast_eager() and h.shape == skip.shape and h.data_ptr() != x.data_ptr():
            return h.add_(skip), s1 + s2  # the conv's own output: no third activation-sized tensor
        return h + skip, s1 + s2

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        flow.consume(stream, f"{path}.conv1", stage, norm=f"{path}.norm1")
        hidden = flow.start("hidden", self.hidden, f"{path}.conv1", name=f"{path}.hidden")
        flow.consume(hidden, f"{path}.conv2", stage, norm=f"{path}.norm2")
        if self.shortcut is not None:  # the block maps one stream to another
            flow.consume(stream, f"{path}.shortcut", stage)
            stream = flow.start("stream", self.shortcut.out_channels, f"{path}.shortcut")
        flow.produce(stream, f"{path}.conv2")
        return stream


ATTENTION_BLOCK = 1 << 24  # score values one block of queries may hold when tiles resolve the frame's attention


class AttentionBlock(StreamingBlock):
    """Single-head self-attention over the positions of each frame, with a residual add.

    q and k have ``qk_dim`` channels (the scale is 1/sqrt(qk_dim)), v has ``v_dim``; both are
    the stream width in the teacher. ``norm(channels)`` builds the norm in front, applied to
    (B*T, C, H, W) frames (default: an RMS norm). It mixes a whole frame.
    """

    mixes_frame: ClassVar[bool] = True

    def __init__(
        self, dim: int, qk_dim: int | None = None, v_dim: int | None = None, *, norm: NormFactory | None = None
    ) -> None:
        super().__init__()
        self.qk_dim, self.v_dim = qk_dim or dim, v_dim or dim
        self.norm = norm(dim) if norm is not None else RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, 2 * self.qk_dim + self.v_dim, 1)
        self.proj = nn.Conv2d(self.v_dim, dim, 1)

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:
        b, _, t, h, w = x.shape
        y = self.norm(fold_time(x))
        qkv = self.to_qkv(y).reshape(b * t, -1, h * w).transpose(1, 2)
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.v_dim], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(qk_dim)
        y = self.proj(y.transpose(1, 2).reshape(b * t, self.v_dim, h, w))
        return x + unfold_time(y, b), ()

    # exact tiling (``flashvaed.models.tiling``): the tiles' inputs are placed into the whole frame,
    # attention runs on it once, and each tile takes its positions of the output
    frame_context: ClassVar[str] = "place"

    def frame_partial(self, x: Tensor) -> Tensor:
        return x.clone()  # the core alone: a view would keep the tile's whole region alive until the merge

    def frame_resolve(self, frame: Tensor) -> Tensor:
        """The output over the whole frame, one frame and one block of queries at a time: every
        query's softmax is its own, so the blocks give the same rows, and the scores never exceed
        ``ATTENTION_BLOCK`` values (at 1080p Wan's whole-frame scores would take 4 GiB a frame)."""
        b, _, t, h, w = frame.shape
        y = self.norm(fold_time(frame))
        qkv = self.to_qkv(y).reshape(b * t, -1, h * w).transpose(1, 2)
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.v_dim], dim=-1)
        n = h * w
        block = max(1, ATTENTION_BLOCK // n)
        rows = [
            F.scaled_dot_product_attention(q[i : i + 1, j : j + block], k[i : i + 1], v[i : i + 1])
            for i in range(b * t)
            for j in range(0, n, block)
        ]
        out = torch.cat(rows, dim=1).reshape(b * t, n, self.v_dim)
        y = self.proj(out.transpose(1, 2).reshape(b * t, self.v_dim, h, w))
        return frame + unfold_time(y, b)

    def frame_apply(self, x: Tensor, resolved: Tensor, region: tuple[int, int, int, int]) -> tuple[Tensor, State]:
        y0, y1, x0, x1 = region
        return resolved[:, :, :, y0:y1, x0:x1].to(x.dtype), ()

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        flow.consume(stream, f"{path}.to_qkv", stage, norm=f"{path}.norm")
        flow.produce(stream, f"{path}.proj")
        v = flow.start("attention_v", self.v_dim, f"{path}.to_qkv", V_ROWS, name=f"{path}.v")
        flow.consume(v, f"{path}.proj", stage)
        return stream


def time_factor(temporal: bool | int) -> int:
    """A temporal upsampling factor: an integer >= 1 (1: none, 2: doubles, 3: triples), or a
    boolean as layouts before student format 3 wrote it (True: doubles, False: none)."""
    if isinstance(temporal, bool):
        return 2 if temporal else 1
    if not isinstance(temporal, int) or not 1 <= temporal <= 16:
        raise ValueError(f"a temporal factor is an integer in [1, 16] (1: none), got {temporal!r}"[:200])
    return temporal


def channels_to_frames(y: Tensor, factor: int) -> Tensor:
    """(B, f*C, T, H, W) -> (B, C, f*T, H, W): channels [kC:(k+1)C] are the k-th of the f frames
    that follow each input frame. A channels-last input gives a channels-last output (one copy)."""
    b, cf, t, h, w = y.shape
    f, c = factor, cf // factor
    if is_channels_last(y) and not torch.jit.is_tracing():  # memory (b, t, h, w, f, c) -> (b, t, f, h, w, c)
        x = y.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, f, c).permute(0, 1, 4, 2, 3, 5)
        return x.reshape(b, t * f, h, w, c).permute(0, 4, 1, 2, 3)
    return y.view(b, f, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, f * t, h, w)


def observed(module: nn.Module) -> bool:
    """Whether ``module`` has hooks or a patched ``forward`` (tiling's probes, calibration): then it
    must run as itself, not be replaced by an equivalent computation that skips its call."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def phase_kernels(weight: Tensor) -> list[Tensor]:
    """The 2x2 kernels of the four output phases of a nearest 2x upsampling followed by ``weight``
    (3x3), in phase order (row parity, column parity): an even row reads rows m-1 and m with taps
    w0 and w1 + w2, an odd row rows m and m+1 with w0 + w1 and w2; columns alike."""
    rows = (
        torch.stack([weight[:, :, 0], weight[:, :, 1] + weight[:, :, 2]], dim=2),
        torch.stack([weight[:, :, 0] + weight[:, :, 1], weight[:, :, 2]], dim=2),
    )
    return [
        torch.stack(cols, dim=3)
        for r in rows
        for cols in (
            (r[..., 0], r[..., 1] + r[..., 2]),
            (r[..., 0] + r[..., 1], r[..., 2]),
        )
    ]


def upsample_kernel(weight: Tensor) -> Tensor:
    """``weight`` (O, I, 3, 3) after a nearest 2x upsampling, as the kernel (I, O, 4, 4) of a
    transposed conv with stride 2 and padding 1: output row 2m + a (a the parity) takes input row
    m + a - 1 + u (u = 0, 1) through kernel row 3 - a - 2u, so the phase kernels' taps fill the 4x4
    kernel exactly once each (columns alike)."""
    o, i = weight.shape[:2]
    phases = torch.stack(phase_kernels(weight)).view(2, 2, o, i, 2, 2)  # (a, c, O, I, u, v)
    return phases.permute(3, 2, 4, 0, 5, 1).reshape(i, o, 4, 4).flip(2, 3)  # row index 2u + a, reversed


def upsample2x_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, kernel: Tensor | None = None) -> Tensor:
    """``conv2d(interpolate(x, 2x nearest), weight, bias, padding=1)`` for a 3x3 kernel as one
    transposed conv (``upsample_kernel``, or ``kernel`` where the caller keeps it): no upsampled
    tensor, 16 of the 36 taps per input pixel, and one kernel call (oneDNN's deconvolution on CPU,
    in ``x``'s layout)."""
    kernel = upsample_kernel(weight) if kernel is None else kernel
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


# In exports, the transposed conv replaces ``Resize`` + the 3x3 conv from this many input channels
# on (ONNX Runtime CPU, 2 cores: 1.4-2.2x faster at 192-384 channels into 32-192; at 32-128 its
# col2im scatter loses to the plain pair, benchmarks/RESULTS.md, issue 23)
EXPORT_TRANSPOSED_FROM = 192


MAX_RESAMPLE_RANK = 9  # a 3x3 kernel's taps: at rank 9 a separable upsample conv is the dense one


class SeparableUpsampleConv(nn.Module):
    """Nearest 2x upsampling and a 3x3 conv, made depthwise-separable: a pointwise conv at the
    input's resolution (a 1x1 conv commutes with nearest upsampling, so it runs on a quarter of the
    pixels), then the upsampling and a depthwise 3x3 conv. Per input pixel that is r*I*O + 36*r*O
    MACs against the dense conv's 36*I*O: where a stage keeps a wide stream (Wan2.2's 1024 channels
    at twice the latent resolution), the dense upsample conv is most of a student's cost.

    ``rank`` r: each output channel sums r depthwise filters over r pointwise combinations of the
    input (its kernel, an I x 9 matrix in the dense conv, has rank r; 9 is the dense conv exactly).
    ``forward`` maps (N, I, H, W) to (N, O, 2H, 2W); pruning fits it to the dense conv it replaces
    (``prune.substitute``: a rank-r split of each output channel's kernel, depthwise taps refitted).
    """

    substitutes_as = "dwsep2x"  # the operator kind a fit makes of a nearest-2x + 3x3 conv pair

    def __init__(self, in_channels: int, out_channels: int, rank: int = 1) -> None:
        super().__init__()
        if not 1 <= rank <= MAX_RESAMPLE_RANK:
            raise ValueError(f"a separable upsample conv's rank is between 1 and {MAX_RESAMPLE_RANK}, got {rank}")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.pointwise = nn.Conv2d(in_channels, out_channels * rank, 1, bias=False)
        self.depthwise = nn.Conv2d(out_channels * rank, out_channels, 3, padding=1, groups=out_channels)

    def forward(self, x: Tensor) -> Tensor:
        z = self.pointwise(x)
        return self.depthwise(F.interpolate(z, scale_factor=2.0, mode="nearest"))


class LowRankUpsampleConv(nn.Module):
    """Nearest 2x upsampling and a 3x3 conv whose output is confined to ``rank`` directions: the
    3x3 conv makes ``rank`` channels, a 1x1 conv expands them to the output width. Per input pixel
    that is 36*I*r + 4*r*O MACs against the dense conv's 36*I*O, and unlike a depthwise split it
    keeps every output's full spatial view of every input channel: an upsample conv's outputs
    span few directions (they feed a narrow next stage), so a rank of a quarter of the width
    loses little. ``forward`` maps upsampled frames (N, I, 2H, 2W) to (N, O, 2H, 2W) as the dense
    conv does; ``Upsample`` runs the 3x3 part as one transposed conv where it runs its own so.
    Pruning fits it to the conv it replaces (``prune.substitute``: the principal directions of
    that conv's outputs on calibration features).
    """

    substitutes_as = "lowrank2x"

    def __init__(self, in_channels: int, out_channels: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= out_channels:
            raise ValueError(f"a low-rank upsample conv's rank is between 1 and its {out_channels} outputs, got {rank}")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.conv = nn.Conv2d(in_channels, rank, 3, padding=1)
        self.expand = nn.Conv2d(rank, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.conv(x))


# an upsampler's conv: the teacher's dense 3x3, ``SeparableUpsampleConv`` or ``LowRankUpsampleConv``
RESAMPLE_CONVS = ("conv", "dwsep", "lowrank")


class Upsample(StreamingBlock):
    """Decoder resampling: optional temporal upsampling (``time_conv``), then nearest 2x and a 3x3 conv.

    ``temporal`` is the time factor (1: none; a boolean reads as 2 or 1). ``time_conv`` multiplies
    the channels by it and its output is read as ``temporal`` frames per input frame. On the first
    chunk it does not run at all: the single frame passes through and its history stays zero, so
    the next chunk sees zeros in front (the reference's first-chunk rule). ``conv`` is the spatial
    conv's kind (``RESAMPLE_CONVS``): "dwsep" makes it a ``SeparableUpsampleConv`` of ``rank``,
    "lowrank" a ``LowRankUpsampleConv`` of ``rank`` channels.
    """

    def __init__(self, dim: int, out_dim: int, temporal: bool | int = 1, conv: str = "conv", rank: int = 1) -> None:
        super().__init__()
        if conv not in RESAMPLE_CONVS:
            raise ValueError(f"unknown upsample conv {conv!r} (expected one of {', '.join(RESAMPLE_CONVS)})")
        self.factor = factor = time_factor(temporal)
        self.time_conv = CausalConv3d(dim, dim * factor, (3, 1, 1)) if factor > 1 else None
        self.conv: nn.Module
        if conv == "conv":
            self.conv = nn.Conv2d(dim, out_dim, 3, padding=1)
        elif conv == "dwsep":
            self.conv = SeparableUpsampleConv(dim, out_dim, rank)
        else:
            self.conv = LowRankUpsampleConv(dim, out_dim, rank)
        self.num_states = 1 if factor > 1 else 0
        self._kernel: tuple[tuple, Tensor] | None = None  # (what it was derived from, upsample_kernel)

    def transposed_kernel(self, conv: nn.Conv2d) -> Tensor:
        """``upsample_kernel`` of ``conv``'s weight (the stage's one 3x3 conv), derived once per
        weight version, device and dtype rather than in every streaming step (a 384x192 kernel
        costs ~8 ms to derive on a CPU)."""
        w = conv.weight
        if w.is_inference():  # no version counter to tell an in-place change: derived each time
            return upsample_kernel(w)
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if self._kernel is None or self._kernel[0] != key:
            self._kernel = key, upsample_kernel(w.detach())
        return self._kernel[1]

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        if self.time_conv is None:
            return []
        return self.time_conv.state_specs(f"{name}.time_conv", scale)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        if self.time_conv is not None and not first:
            y, state = self.time_conv(x, state)
            x = channels_to_frames(y, self.factor)
        conv, frames = self.conv, fold_time(x)
        if isinstance(conv, SeparableUpsampleConv):
            y = conv(frames)
        elif isinstance(conv, LowRankUpsampleConv) and observed(conv):  # probed: it runs as itself
            y = conv(F.interpolate(frames, scale_factor=2.0, mode="nearest"))
        elif isinstance(conv, LowRankUpsampleConv):
            y = conv.expand(self.upsample_conv(frames, conv.conv))
        else:
            y = self.upsample_conv(frames, conv)
        return unfold_time(y, x.shape[0]), state

    def upsample_conv(self, x: Tensor, conv: nn.Conv2d) -> Tensor:
        """``conv`` (3x3) on ``x`` upsampled 2x, nearest."""
        if (
            conv.padding == (1, 1)
            and conv.padding_mode == "zeros"
            and not observed(conv)
            and (fast_eager() or (exporting() and conv.in_channels >= EXPORT_TRANSPOSED_FROM))
        ):  # the same numbers as below to float rounding, with 16 of 36 taps (``upsample2x_conv3x3``)
            kernel = self.transposed_kernel(conv) if fast_eager() else None  # an export derives it in its graph
            return upsample2x_conv3x3(x, conv.weight, conv.bias, kernel)
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        if self.time_conv is not None:  # read as ``factor`` frames of the same channels
            flow.consume(stream, f"{path}.time_conv", stage)
            flow.produce(stream, f"{path}.time_conv", TIME_ROWS)
        flow.consume(stream, f"{path}.conv", stage)
        return flow.start("stream", self.conv.out_channels, f"{path}.conv", ROWS)


class Downsample(StreamingBlock):
    """Encoder resampling: stride-2 3x3 conv (zero pad right/bottom), then optional temporal /2.

    The temporal conv (kernel 3, stride 2, no padding) reads the last frame of the previous
    chunk in front of the current one; the first chunk (one frame) passes through.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None
        self.num_states = 1 if temporal else 0
        self.dim = dim

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        if self.time_conv is None:
            return []
        return [StateSpec(f"{name}.time_conv", self.dim, 1, scale / 2)]

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        y = unfold_time(self.conv(F.pad(fold_time(x), (0, 1, 0, 1))), x.shape[0])
        if self.time_conv is None:
            return y, ()
        last = y[:, :, -1:].clone(memory_format=torch.contiguous_format)
        if first:
            return y, (last,)
        return self.time_conv(torch.cat([state[0], y], dim=2)), (last,)


class Stage(StreamingBlock):
    """Blocks run in order at one spatial scale; ``resample`` (if any) ends the stage."""

    def __init__(self, blocks: list[StreamingBlock], resample: StreamingBlock | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample
        self.num_states = sum(b.num_states for b in self.sequence())

    def sequence(self) -> list[StreamingBlock]:
        return [*self.blocks] + ([self.resample] if self.resample is not None else [])

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        specs = blocks_state_specs(list(self.blocks), f"{name}.blocks", scale)
        if self.resample is not None:
            specs += self.resample.state_specs(f"{name}.resample", scale)
        return specs

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        return run_blocks(self.sequence(), x, state, first)

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        for j, block in enumerate(self.blocks):
            stream = block.channel_flow(flow, f"{path}.blocks.{j}", stage, stream)
        if self.resample is not None:
            stream = self.resample.channel_flow(flow, f"{path}.resample", stage, stream)
        return stream


class Head(StreamingBlock):
    """norm, SiLU and a conv of kind ``op`` (a causal 3x3x3 one in Wan's teacher) to the output channels.

    ``norm(channels)`` and ``conv(op, in, out)`` as in ``ResidualBlock``; ``norm=None``: no norm
    (SiLU straight into the conv, as Mochi's head does).
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        op: str = "causal3d",
        *,
        norm: NormFactory | None = RMSNorm,
        conv: ConvFactory = make_conv,
    ) -> None:
        super().__init__()
        self.norm = norm(dim) if norm is not None else None
        self.conv = conv(op, dim, out_dim)
        self.num_states = self.conv.num_states

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return self.conv.state_specs(f"{name}.conv", scale)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        return self.conv(F.silu(x) if self.norm is None else norm_silu(self.norm, x), state, first)

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> None:
        flow.consume(stream, f"{path}.conv", stage, norm=None if self.norm is None else f"{path}.norm")
