"""Building blocks of causal video VAEs, each a pure function of (input, its state).

Every block takes the slice of the state tuple it owns and returns its new slice; blocks that
carry nothing take and return ``()``. Layer semantics follow the Wan VAE (see docs/architecture.md).
Blocks also declare how their channels are coupled (``channel_flow``, see ``coupling``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coupling import ROWS, TIME_ROWS, V_ROWS, ChannelFlow, Group
from .streaming import State, StateSpec, StreamingBlock, blocks_state_specs, run_blocks


def fold_time(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), so 2D layers act on every frame alone."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def unfold_time(y: Tensor, batch: int) -> Tensor:
    """Inverse of ``fold_time``."""
    bt, c, h, w = y.shape
    return y.reshape(batch, bt // batch, c, h, w).transpose(1, 2)


def streaming_conv3d(
    x: Tensor, history: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], groups: int
) -> tuple[Tensor, Tensor]:
    """The streaming causal conv every implementation must match: conv3d over ``cat(history, x)``
    (no temporal padding, ``padding`` spatially) and the last ``P`` frames of it as the new history."""
    joined = torch.cat([history, x], dim=2)
    y = F.conv3d(joined, weight, bias, padding=(0, *padding), groups=groups)
    return y, joined[:, :, -history.shape[2] :].clone(memory_format=torch.contiguous_format)


class CausalConv3d(nn.Conv3d, StreamingBlock):
    """A Conv3d that sees only present and past frames.

    Spatial padding is symmetric zeros. The temporal padding in front is the state: the last
    ``kernel_t - 1`` input frames of earlier chunks (zeros before the first frame), so chunked
    and one-shot application agree exactly.

    ``fused_step`` swaps in another implementation of ``step`` with the signature
    ``(x, history, weight, bias, padding, groups) -> (y, new_history)``: the fused Triton kernel
    (engines) or a plugin node (ONNX export). ``None`` runs the plain torch ops.
    """

    fused_step: Callable[..., tuple[Tensor, Tensor]] | None = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(
            in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2), groups=groups, bias=bias
        )
        self.history = kt - 1
        self.current_tap = kt - 1  # the kernel tap that reads the frame being produced
        self.num_states = 1 if self.history else 0

    def kernel_input(self, args: tuple) -> Tensor:
        """What the kernel ran on in a call with ``args`` (history, then the new frames)."""
        return torch.cat([args[1][0], args[0]], dim=2) if self.history else args[0]

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        if not self.history:
            return []
        return [StateSpec(name, self.in_channels, self.history, scale)]

    def step(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Convolve ``x`` after ``history``; return the output and the new history."""
        step = self.fused_step or streaming_conv3d
        return step(x, history, self.weight, self.bias, self.padding[1:], self.groups)

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:
        if not self.history:
            return self._conv_forward(x, self.weight, self.bias), ()
        y, history = self.step(x, state[0])
        return y, (history,)

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group | None) -> Group:
        """As a stage of its own (``conv_in``): it reads the latents and starts the first stream."""
        if stream is not None:
            flow.consume(stream, path, stage)
        return flow.start("stream", self.out_channels, path)


def streaming_convs(model: nn.Module) -> list[CausalConv3d]:
    """Every causal conv of ``model`` that carries history (the ones a fused step can replace)."""
    return [m for m in model.modules() if isinstance(m, CausalConv3d) and m.history]


@contextmanager
def fused_steps(model: nn.Module, step: Callable[..., tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Within the block, every streaming causal conv of ``model`` runs ``step``."""
    convs = streaming_convs(model)
    for conv in convs:
        conv.fused_step = step
    try:
        yield
    finally:
        for conv in convs:
            del conv.fused_step


class RMSNorm(nn.Module):
    """x / max(||x||_2, 1e-12) over channels * sqrt(C) * gamma; the norm in fp32 for half types.

    Written as one reduction and a reciprocal square root: ``F.normalize`` over a strided
    channel dim is several times slower on CPUs, and the results agree to float rounding.
    """

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        inv = torch.rsqrt((xf * xf).sum(dim=1, keepdim=True).clamp_min(1e-24)) * self.scale
        return (xf * inv).to(x.dtype) * self.gamma


class DepthwiseSeparableConv3d(StreamingBlock):
    """Depthwise causal 3x3x3 conv (one filter per channel, the same state rule as the dense
    conv: it keeps the last 2 input frames) followed by a pointwise 1x1x1 conv."""

    num_states = 1
    substitutes_as = "dwsep3d"  # pruning fits it to a dense 3x3x3 conv

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise = CausalConv3d(in_channels, in_channels, 3, groups=in_channels, bias=False)
        self.pointwise = nn.Conv3d(in_channels, out_channels, 1)

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return self.depthwise.state_specs(name, scale)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        y, history = self.depthwise.step(x, state[0])
        return self.pointwise(y), (history,)


class FrameConv2d(nn.Conv2d, StreamingBlock):
    """A 3x3 conv applied to every frame alone: no temporal mixing, no state."""

    substitutes_as = "spatial2d"

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:
        return unfold_time(self._conv_forward(fold_time(x), self.weight, self.bias), x.shape[0]), ()


# operator kinds of decoder convs: a causal 3D conv, a 3D conv that also reads one future frame
# (LTX-Video's teacher; its decoder runs with latency), depthwise-separable 3D (with the temporal
# behaviour of the family's teacher conv), per-frame 2D. A family builds those in ``Family.ops``.
OPS = ("causal3d", "conv3d", "dwsep3d", "spatial2d")


def make_conv(op: str, in_channels: int, out_channels: int) -> StreamingBlock:
    """The 3x3(x3) conv of a residual block or head, as operator kind ``op``."""
    if op == "causal3d":
        return CausalConv3d(in_channels, out_channels, 3)
    if op == "dwsep3d":
        return DepthwiseSeparableConv3d(in_channels, out_channels)
    if op == "spatial2d":
        return FrameConv2d(in_channels, out_channels)
    if op == "conv3d":
        raise ValueError("operator conv3d (a 3D conv reading a future frame) does not fit a causal decoder")
    raise ValueError(f"unknown operator {op!r} (expected one of {', '.join(OPS)})")


class ResidualBlock(StreamingBlock):
    """RMSNorm, SiLU, conv, RMSNorm, SiLU, conv; plus a 1x1x1 shortcut when widths differ.

    ``hidden`` is the width between the two convs (the output width in the teacher); ``op`` the
    conv kind; ``shortcut=True`` keeps a 1x1x1 shortcut even when in and out widths agree.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int | None = None, op: str = "causal3d", shortcut: bool = False
    ) -> None:
        super().__init__()
        hidden = hidden or out_dim
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = make_conv(op, in_dim, hidden)
        self.norm2 = RMSNorm(hidden)
        self.conv2 = make_conv(op, hidden, out_dim)
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if shortcut or in_dim != out_dim else None
        self.num_states = self.conv1.num_states + self.conv2.num_states

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return self.conv1.state_specs(f"{name}.conv1", scale) + self.conv2.state_specs(f"{name}.conv2", scale)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        n1 = self.conv1.num_states
        h, s1 = self.conv1(F.silu(self.norm1(x)), state[:n1], first)
        h, s2 = self.conv2(F.silu(self.norm2(h)), state[n1:], first)
        skip = x if self.shortcut is None else self.shortcut(x)
        return h + skip, s1 + s2

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        flow.consume(stream, f"{path}.conv1", stage, norm=f"{path}.norm1")
        hidden = flow.start("hidden", self.norm2.gamma.shape[0], f"{path}.conv1", name=f"{path}.hidden")
        flow.consume(hidden, f"{path}.conv2", stage, norm=f"{path}.norm2")
        if self.shortcut is not None:  # the block maps one stream to another
            flow.consume(stream, f"{path}.shortcut", stage)
            stream = flow.start("stream", self.shortcut.out_channels, f"{path}.shortcut")
        flow.produce(stream, f"{path}.conv2")
        return stream


class AttentionBlock(StreamingBlock):
    """Single-head self-attention over the positions of each frame, with a residual add.

    q and k have ``qk_dim`` channels (the scale is 1/sqrt(qk_dim)), v has ``v_dim``; both are
    the stream width in the teacher.
    """

    def __init__(self, dim: int, qk_dim: int | None = None, v_dim: int | None = None) -> None:
        super().__init__()
        self.qk_dim, self.v_dim = qk_dim or dim, v_dim or dim
        self.norm = RMSNorm(dim, spatial_dims=2)
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

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        flow.consume(stream, f"{path}.to_qkv", stage, norm=f"{path}.norm")
        flow.produce(stream, f"{path}.proj")
        v = flow.start("attention_v", self.v_dim, f"{path}.to_qkv", V_ROWS, name=f"{path}.v")
        flow.consume(v, f"{path}.proj", stage)
        return stream


class Upsample(StreamingBlock):
    """Decoder resampling: optional temporal 2x (``time_conv``), then nearest 2x and a 3x3 conv.

    ``time_conv`` doubles the channels and its output is read as two frames per input frame.
    On the first chunk it does not run at all: the single frame passes through and its history
    stays zero, so the next chunk sees zeros in front (the reference's first-chunk rule).
    """

    def __init__(self, dim: int, out_dim: int, temporal: bool) -> None:
        super().__init__()
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None
        self.conv = nn.Conv2d(dim, out_dim, 3, padding=1)
        self.num_states = 1 if temporal else 0

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        if self.time_conv is None:
            return []
        return self.time_conv.state_specs(f"{name}.time_conv", scale)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        if self.time_conv is not None and not first:
            y, state = self.time_conv(x, state)
            b, c2, t, h, w = y.shape
            # channels [0:C] are the earlier frame, [C:2C] the later one
            x = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        y = F.interpolate(fold_time(x), scale_factor=2.0, mode="nearest")
        return unfold_time(self.conv(y), x.shape[0]), state

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        if self.time_conv is not None:  # read as two frames of the same channels
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
    """RMSNorm, SiLU and a 3x3(x3) conv (causal in the teacher) to the output channels."""

    def __init__(self, dim: int, out_dim: int, op: str = "causal3d") -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.conv = make_conv(op, dim, out_dim)
        self.num_states = self.conv.num_states

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return self.conv.state_specs(f"{name}.conv", scale)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        return self.conv(F.silu(self.norm(x)), state)

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> None:
        flow.consume(stream, f"{path}.conv", stage, norm=f"{path}.norm")
