"""LTX-Video VAE blocks shared by the decoder and the encoder: the clock a streaming step runs on,
replicate-padded convs, norms, timestep conditioning and the residual block.

Streaming the non-causal decoder exactly: see the package docstring."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...blocks import FrameConv2d
from ...coupling import ChannelFlow, Group
from ...streaming import State, StateSpec


@dataclass(frozen=True)
class Clock:
    """Where a step is in its stream: ``position`` latent frames came before it; ``end`` is the
    clip's length once known. Python ints in eager runs; 0-d int64 tensors in exported graphs.

    ``full``: no stream at all, the step is the whole clip (upstream's one-shot semantics, with
    explicit padding and dropped frames): what calibration and distillation run, since every
    position is then a frame of the clip.
    """

    position: int | Tensor = 0
    end: int | Tensor | None = None
    full: bool = False


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


def idle(clock: Clock, span: Span, positions: int) -> bool:
    """Whether a block's step lies wholly outside the clip, so it can be skipped (eager streams only):
    every input position before the clip's first frame (its outputs are too, and its state keeps
    nothing of the clip), or every output position after the clip's last frame (downstream reads
    copies of the last frame instead, and the block never runs again). A skipped block outputs zeros.
    This is what keeps a stream's warm-up and flush from costing a full step of every layer."""
    if clock.full or not isinstance(clock.position, int) or isinstance(clock.end, Tensor):
        return False
    (r_in, o_in), (r_out, o_out) = span
    if r_in * clock.position + positions - 1 - o_in < 0:
        return True
    return clock.end is not None and r_out * clock.position - o_out >= r_out * (clock.end - 1) + 1


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
        return self._conv_forward(self.padded(x), self.weight, self.bias)

    def kernel_input(self, args: tuple) -> Tensor:
        """What the kernel ran on in a call with ``args`` (padded frames, or history then new frames)."""
        x, state, clock = (*args, (), None, None)[:3]
        if not self.history:
            return x
        if clock is None or clock.full:
            return self.padded(x)
        return replicate_edges(torch.cat([state[0], x], dim=2), *self.timeline, self.history, clock)

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
            return self._conv_forward(x, self.weight, self.bias), ()
        if clock is not None and clock.full:
            return self.full(x), tuple(state)
        joined = replicate_edges(torch.cat([state[0], x], dim=2), *self.timeline, self.history, clock or Clock())
        y = self._conv_forward(joined, self.weight, self.bias)
        return y, (joined[:, :, -self.history :].clone(memory_format=torch.contiguous_format),)

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
        return self.pointwise(y), state

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

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return [StateSpec(name, self.channels, self.frames, scale)] if self.frames else []

    def forward(self, x: Tensor, state: State, clock: Clock) -> tuple[Tensor, State]:
        if not self.frames or clock.full:
            return x, tuple(state)
        joined = torch.cat([state[0], x], dim=2)
        return joined[:, :, : x.shape[2]], (joined[:, :, -self.frames :].clone(memory_format=torch.contiguous_format),)


def pixel_norm(x: Tensor) -> Tensor:
    """x / sqrt(mean over channels of x^2 + 1e-8): LTX's parameter-free norm (fp32 for half types)."""
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
    ada = embedding.unflatten(1, (parts, -1)) + table[None].to(embedding.dtype)
    return [a[:, :, None, None, None] for a in ada.unbind(dim=1)]


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
        self.span: Span = ((rate, offset), out)
        return out

    def forward(
        self, x: Tensor, state: State, context: StepContext, embedding: Tensor | None = None
    ) -> tuple[Tensor, State]:
        if idle(context.clock, self.span, x.shape[2]):
            b, _, t, h, w = x.shape
            return x.new_zeros(b, self.out_channels, t, h, w), tuple(state)
        n1, n2 = self.conv1.num_states, self.conv2.num_states
        h = self.norm1(x)
        if self.scale_shift_table is not None:
            shift1, scale1, shift2, scale2 = modulation(embedding, self.scale_shift_table, self.ada_index, 4)  # type: ignore[arg-type]
            h = h * (1 + scale1) + shift1
        h, s1 = self.conv1(F.silu(h), state[:n1], context.clock)
        if self.noise1 is not None and context.noise:
            h = h + context.noise[self.noise_index][None, None, None] * self.noise1[None, :, None]
        h = self.norm2(h)
        if self.scale_shift_table is not None:
            h = h * (1 + scale2) + shift2
        h, s2 = self.conv2(F.silu(h), state[n1 : n1 + n2], context.clock)
        if self.noise2 is not None and context.noise:
            h = h + context.noise[self.noise_index + 1][None, None, None] * self.noise2[None, :, None]
        skip, s3 = self.skip(x, state[n1 + n2 :], context.clock)
        if self.shortcut is not None:
            skip = self.shortcut(channel_layer_norm(self.norm3, skip))  # type: ignore[misc]
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
