"""The Mochi 1 VAE family (diffusers' ``AutoencoderKLMochi``): encoder, streaming decoder, layouts.

Compression 6x in time and 8x8 in space, 12 latent channels. The decoder has no attention: a 1x1x1
``conv_in``, residual blocks (a GroupNorm of 32 groups computed over each frame alone, SiLU, a
causal 3x3x3 conv padded by replication: the first frame repeated in front, edges repeated in
space; twice, plus the identity), and up stages that end in a linear projection read as
depth-to-space, channel ``c`` filling ``(time, row, column)`` of its ``st x 2 x 2`` block (time x3,
x2, x1). A latent frame becomes 6 frames; the first latent frame's first 5 are not frames of the
clip (diffusers drops them), so N latent frames decode to 6(N-1)+1 frames. Here the decoder
computes those 5 positions in its first step (later frames' convs read them through their
history) and returns only the clip's frame: a plain causal decoder, chunk 0 one latent frame -> one
frame, any later chunk of k -> 6k.

The encoder (Fourier features, a linear ``proj_in``, residual blocks with causal self-attention
over the frames at each position, strided down convs) runs over the whole clip at once, as
diffusers' does (its attention sees every earlier frame, so it does not stream).

Latents in diffusion space are ``(mu - mean) * scaling_factor / std`` per channel (diffusers'
``MochiPipeline`` convention); the decoder de-normalises them first. Layouts: ``diffusers``
(a model directory or its state dict) and ``flashvaed`` (ours). Genmo's original release ships the
decoder and encoder as two files (``decoder.safetensors``, ``encoder.safetensors``); convert those
with diffusers' ``scripts/convert_mochi_to_diffusers.py``.

Students: the teacher's operator kinds (``causal3d``) or ``dwsep3d``/``spatial2d`` with the same
replicate padding, and ``pointwise`` (a 1x1x1 linear layer: conv_in and the head). A student's
GroupNorms have ``gcd(32, width)`` groups: the teacher's 32 wherever the width allows (every
teacher width is a multiple of 32), else the largest divisor of 32 that divides the pruned width,
so any width builds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import CheckpointError
from ..blocks import (
    CausalConv3d,
    GroupNorm,
    Head,
    ResidualBlock,
    Stage,
    is_channels_last,
    make_conv,
    module_conv3d,
    register_op,
    to_channels_last,
)
from ..coupling import D2S_ROWS, ChannelFlow, Group
from ..layout import DecoderLayout, StageLayout, channel_spaces
from ..streaming import State, StateSpec, StreamingBlock, run_blocks
from ..vae import TeacherVAE
from .base import (
    Family,
    Match,
    check_int,
    check_sequence,
    checked_statistics,
    config_list,
    our_metadata,
    register,
)

# fmt: off
MOCHI_LATENTS_MEAN = (
    -0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
    0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
    -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285,
)
MOCHI_LATENTS_STD = (
    0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
    0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
    0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041,
)
# fmt: on
GROUPS = 32  # GroupNorm groups and attention head width of the release (diffusers hard-codes both)
GROUP_EPS = 1e-5
MAX_WIDTH = 8192
MAX_LATENT = 4096
FOURIER = (6, 8)  # the encoder's Fourier feature frequencies 2^6, 2^7 (times 2 pi)
PADDING = {"padding_mode": "replicate", "history": "replicate"}  # every conv of the family


@dataclass(frozen=True)
class MochiConfig:
    """Architecture of a Mochi-style VAE, with diffusers' field names; the defaults are Mochi 1's.

    ``layers_per_block`` lists, as diffusers does, the residual blocks of the encoder's stages
    from the input (block_in, down blocks, block_out); the decoder reads it reversed.
    """

    encoder_block_out_channels: tuple[int, ...] = (64, 128, 256, 384)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 768)
    latent_channels: int = 12
    layers_per_block: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)
    add_attention_block: tuple[bool, ...] = (False, True, True, True, True)
    latents_mean: tuple[float, ...] = field(default=MOCHI_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=MOCHI_LATENTS_STD)
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        """Every field checked (ValueError naming it): configurations come from untrusted files."""
        for name in ("encoder_block_out_channels", "decoder_block_out_channels"):
            widths = check_sequence(name, getattr(self, name), 6)
            for w in widths:
                check_int(f"{name} entries", w, GROUPS, MAX_WIDTH)
                if w % GROUPS:
                    raise ValueError(f"{name} entries must be multiples of {GROUPS} (GroupNorm groups), got {w}")
            object.__setattr__(self, name, widths)
        n = len(self.decoder_block_out_channels)
        if len(self.encoder_block_out_channels) != n or n < 2:
            raise ValueError("encoder_block_out_channels and decoder_block_out_channels need the same 2 to 6 entries")
        check_int("latent_channels", self.latent_channels, 1, MAX_LATENT)
        for name, length, lo, hi in (
            ("layers_per_block", n + 1, 1, 16),
            ("temporal_expansions", n - 1, 1, 8),
            ("spatial_expansions", n - 1, 1, 4),
        ):
            values = check_sequence(name, getattr(self, name), 8)
            if len(values) != length:
                raise ValueError(f"{name} needs {length} entries, got {len(values)}")
            for v in values:
                check_int(f"{name} entries", v, lo, hi)
            object.__setattr__(self, name, values)
        attention = check_sequence("add_attention_block", self.add_attention_block, 8)
        if len(attention) != n + 1 or not all(isinstance(a, bool) for a in attention):
            raise ValueError(f"add_attention_block must hold {n + 1} true/false entries, got {list(attention)!r}"[:200])
        object.__setattr__(self, "add_attention_block", attention)
        mean, std = checked_statistics(self.latents_mean, self.latents_std, self.latent_channels)
        object.__setattr__(self, "latents_mean", mean)
        object.__setattr__(self, "latents_std", std)
        sf = self.scaling_factor
        if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 1e-6 <= sf <= 1e6:
            raise ValueError(f"scaling_factor must be a positive number, got {sf!r}"[:200])
        object.__setattr__(self, "scaling_factor", float(sf))

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.temporal_expansions)

    @property
    def spatial_factor(self) -> int:
        return math.prod(self.spatial_expansions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MochiConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------
class FrameGroupNorm(GroupNorm):
    """The shared per-frame group norm (``blocks.GroupNorm``: statistics per sample, group and
    frame, so it mixes a whole frame; pruning keeps its ``weight``/``bias`` at the kept channels)
    with Mochi's eps 1e-5 and ``gcd(32, channels)`` groups: the release's 32 at every teacher width."""

    def __init__(self, channels: int, groups: int | None = None) -> None:
        super().__init__(groups or math.gcd(GROUPS, channels), channels, eps=GROUP_EPS)


class ChannelLinear(nn.Linear):
    """A linear layer over the channels (dim 1) of a video (B, C, T, H, W): a 1x1x1 conv with a
    (out, in) weight, as diffusers' ``nn.Linear`` projections store it."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        last = x.dim() - 1  # explicit permutations: ONNX takes no negative axes in a Transpose
        y = F.linear(x.permute(0, *range(2, last + 1), 1), self.weight, self.bias)
        return y.permute(0, last, *range(1, last))


class Pointwise(ChannelLinear, StreamingBlock):
    """Operator kind ``pointwise``: a 1x1x1 linear layer, no state (Mochi's conv_in and head)."""

    def __init__(self, in_channels: int, out_channels: int, **options: Any) -> None:
        super().__init__(in_channels, out_channels)

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:  # type: ignore[override]
        return ChannelLinear.forward(self, x), ()


register_op("pointwise", Pointwise)


def group_norm(channels: int) -> nn.Module:
    return FrameGroupNorm(channels)


def replicate_conv(op: str, in_channels: int, out_channels: int) -> StreamingBlock:
    """The family's convs: replicate padding in space, the first frame repeated before the clip."""
    return make_conv(op, in_channels, out_channels, **PADDING)


def residual_block(in_dim: int, out_dim: int, hidden: int, op: str, shortcut: bool) -> ResidualBlock:
    return ResidualBlock(in_dim, out_dim, hidden, op, shortcut, norm=group_norm, conv=replicate_conv)


class DepthToSpace(StreamingBlock):
    """An up stage's end: a linear projection to ``out * st * s * s`` channels, channel ``c`` then
    filling the ``(time, row, column)`` positions of its ``st x s x s`` block. Frame-local, no state:
    every latent frame (the first too) becomes ``st`` frames."""

    def __init__(self, dim: int, out_dim: int, temporal: int, spatial: int) -> None:
        super().__init__()
        self.temporal, self.spatial = temporal, spatial
        self.proj = ChannelLinear(dim, out_dim * temporal * spatial * spatial)

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:
        y = self.proj(x)
        b, cf, t, h, w = y.shape
        st, s = self.temporal, self.spatial
        c = cf // (st * s * s)
        if is_channels_last(y) and not torch.jit.is_tracing():
            # memory (b, t, h, w, c, st, s, s) -> (b, t, st, h, s, w, s, c)
            z = y.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, c, st, s, s).permute(0, 1, 5, 2, 6, 3, 7, 4)
            return z.reshape(b, t * st, h * s, w * s, c).permute(0, 4, 1, 2, 3), ()  # one copy, channels-last out
        y = y.reshape(b, c, st, s, s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, c, t * st, h * s, w * s), ()

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        flow.consume(stream, f"{path}.proj", stage)
        rows = self.temporal * self.spatial * self.spatial
        return flow.start("stream", self.proj.out_features // rows, f"{path}.proj", D2S_ROWS)


def teacher_layout(config: MochiConfig) -> DecoderLayout:
    """middle = block_in; up.i = up_blocks[i] (its projection to the next width and its temporal
    factor); the last up stage = block_out; causal 3x3x3 convs at full width everywhere."""
    widths = config.decoder_block_out_channels[::-1]  # 768, 512, 256, 128
    layers = config.layers_per_block[::-1]  # block_in first
    temporal = config.temporal_expansions[::-1]
    middle = StageLayout("causal3d", widths[0], widths[0], (widths[0],) * layers[0])
    up = []
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        up.append(
            StageLayout(
                "causal3d",
                width,
                width,
                (width,) * layers[i + 1],
                resample_width=None if last else widths[i + 1],
                temporal=1 if last else temporal[i],
            )
        )
    spaces = channel_spaces(up, [False] * len(up))
    return DecoderLayout(
        config.latent_channels, middle, tuple(up), 0, 0, head_op="pointwise", family=MochiFamily.name, spaces=spaces
    )


class MochiDecoder(nn.Module):
    """conv_in (1x1x1), middle (block_in), up stages (residual blocks, depth-to-space), head."""

    channels_last = True  # every stage's input channels-last in eager CPU steps (``forward``)

    def __init__(self, config: MochiConfig, layout: DecoderLayout) -> None:
        super().__init__()
        self.layout = layout
        m = layout.middle
        self.conv_in = CausalConv3d(layout.z_dim, m.width, 1)
        self.middle = Stage([residual_block(m.width, m.width, h, m.op, m.shortcut) for h in m.hidden])
        spatial = config.spatial_expansions[::-1]
        stages = []
        for i, st in enumerate(layout.up):
            blocks = [
                residual_block(st.in_width if j == 0 else st.width, st.width, h, st.op, st.shortcut)
                for j, h in enumerate(st.hidden)
            ]
            resample = None
            if st.resample_width is not None:
                resample = DepthToSpace(st.width, st.resample_width, st.temporal, spatial[i])
            stages.append(Stage(blocks, resample))
        self.up = nn.ModuleList(stages)
        # SiLU and a linear layer (operator kind ``pointwise``), no norm before it
        self.head = Head(layout.up[-1].width, layout.out_channels, layout.head_op, norm=None, conv=replicate_conv)
        self.temporal_factor = config.temporal_factor
        self.spatial_factor = config.spatial_factor

    def stages(self) -> list[tuple[str, Fraction, StreamingBlock]]:
        """Blocks in the order they run, with their names and spatial scale (latent grid = 1)."""
        items: list[tuple[str, Fraction, StreamingBlock]] = [
            ("conv_in", Fraction(1), self.conv_in),
            ("middle", Fraction(1), self.middle),
        ]
        scale = Fraction(1)
        for i, stage in enumerate(self.up):
            items.append((f"up.{i}", scale, stage))
            if stage.resample is not None:
                scale *= stage.resample.spatial
        items.append(("head", scale, self.head))
        return items

    def stage_ops(self) -> dict[str, str]:
        """The operator kind of each stage, for cost reports."""
        return {"conv_in": "pointwise", **{n: st.op for n, st in self.layout.stages.items()}, "head": "pointwise"}

    def state_specs(self) -> list[StateSpec]:
        return [s for name, scale, block in self.stages() for s in block.state_specs(name, scale)]

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        # every stage's input channels-last (eager CPU, see ``to_channels_last``), the usual layout out
        y, state = run_blocks([block for _, _, block in self.stages()], x, state, first, to_channels_last)
        # the first latent frame's positions before the clip's first frame are computed (later
        # frames read them through the convs' history) but are not frames
        return (y[:, :, self.temporal_factor - 1 :] if first else y).contiguous(), state


# ---------------------------------------------------------------------------------------------
# encoder (one pass over a whole clip)
# ---------------------------------------------------------------------------------------------
class ClipCausalConv3d(nn.Conv3d):
    """A causal conv over a whole clip: the first frame repeated ``kernel_t - 1`` times in front,
    edges replicated in space (``(kernel - 1) // 2`` each side); ``stride`` as given."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int], stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        kt, kh, kw = self.kernel_size
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        return module_conv3d(self, F.pad(x, (pw, pw, ph, ph, kt - 1, 0), mode="replicate"))


class EncoderResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(dim)
        self.conv1 = ClipCausalConv3d(dim, dim, (3, 3, 3))
        self.norm2 = FrameGroupNorm(dim)
        self.conv2 = ClipCausalConv3d(dim, dim, (3, 3, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class TimeAttention(nn.Module):
    """Causal self-attention over the frames at each position: heads of 32 channels, q and k
    L2-normalised (eps 1e-5), softmax scale 1/sqrt(32); no bias on q, k, v."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = dim // GROUPS
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        s = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        if t == 1:  # one frame attends to itself: its value
            y = self.to_out(self.to_v(s))
        else:
            q, k, v = (
                p(s).view(b * h * w, t, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v)
            )
            q, k = F.normalize(q, dim=-1, eps=GROUP_EPS), F.normalize(k, dim=-1, eps=GROUP_EPS)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = self.to_out(y.transpose(1, 2).reshape(b * h * w, t, c))
        return y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)


class EncoderStage(nn.Module):
    """An optional strided causal conv (``conv_in``), then residual blocks, each followed by a
    per-frame GroupNorm and time attention (with a residual add) where the stage has attention."""

    def __init__(
        self, in_dim: int, dim: int, layers: int, attention: bool, temporal: int = 0, spatial: int = 0
    ) -> None:
        super().__init__()
        self.conv_in = None
        if temporal:
            kernel = (temporal, spatial, spatial)
            self.conv_in = ClipCausalConv3d(in_dim, dim, kernel, stride=kernel)  # type: ignore[arg-type]
        self.resnets = nn.ModuleList([EncoderResBlock(dim) for _ in range(layers)])
        self.norms = nn.ModuleList([FrameGroupNorm(dim) for _ in range(layers)]) if attention else None
        self.attentions = nn.ModuleList([TimeAttention(dim) for _ in range(layers)]) if attention else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv_in is not None:
            x = self.conv_in(x)
        for j, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = x + self.attentions[j](self.norms[j](x))  # type: ignore[index]
        return x


def fourier_features(x: Tensor) -> Tensor:
    """(B, C, ...) -> (B, C + 2*C*F, ...): the input, then sin and cos of 2 pi 2^f x per channel and
    frequency (channel-major), computed in float32."""
    dtype, x = x.dtype, x.float()
    freqs = 2.0 ** torch.arange(*FOURIER, dtype=torch.float32, device=x.device) * (2 * torch.pi)
    c, n = x.shape[1], freqs.numel()
    h = x.repeat_interleave(n, dim=1) * freqs.repeat(c).view(1, c * n, *(1,) * (x.dim() - 2))
    return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1).to(dtype)


class MochiEncoder(nn.Module):
    """Fourier features, proj_in, block_in, down blocks, block_out, norm_out, SiLU, proj_out to
    (mean, logvar) of the latents, over a whole clip of 6n+1 frames (``iter_encode`` yields it once)."""

    def __init__(self, config: MochiConfig, in_channels: int = 3) -> None:
        super().__init__()
        widths, layers, attention = (
            config.encoder_block_out_channels,
            config.layers_per_block,
            config.add_attention_block,
        )
        features = in_channels * (1 + 2 * (FOURIER[1] - FOURIER[0]))
        self.proj_in = ChannelLinear(features, widths[0])
        self.block_in = EncoderStage(widths[0], widths[0], layers[0], attention[0])
        self.down_blocks = nn.ModuleList(
            [
                EncoderStage(
                    widths[i],
                    widths[i + 1],
                    layers[i + 1],
                    attention[i + 1],
                    config.temporal_expansions[i],
                    config.spatial_expansions[i],
                )
                for i in range(len(widths) - 1)
            ]
        )
        self.block_out = EncoderStage(widths[-1], widths[-1], layers[-1], attention[-1])
        self.norm_out = FrameGroupNorm(widths[-1])
        self.proj_out = ChannelLinear(widths[-1], 2 * config.latent_channels, bias=False)

    def forward(self, video: Tensor) -> Tensor:
        x = self.block_in(self.proj_in(fourier_features(video)))
        for block in self.down_blocks:
            x = block(x)
        return self.proj_out(F.silu(self.norm_out(self.block_out(x))))

    def iter_encode(self, video: Tensor) -> Any:
        yield self(video)


class MochiVAE(TeacherVAE):
    """The Mochi 1 VAE: ``encode`` videos (6n+1 frames) to diffusion-space latents, ``decode_step`` them back."""

    def __init__(self, config: MochiConfig | None = None) -> None:
        super().__init__(config or MochiConfig())


# ---------------------------------------------------------------------------------------------
# checkpoint layouts
# ---------------------------------------------------------------------------------------------
def _resnet_part(rest: str) -> str:
    """A residual block's parameter in diffusers' naming: GroupNorms and convs are wrapped."""
    rest = re.sub(r"^(norm[12])\.", r"\1.norm_layer.", rest)
    return re.sub(r"^(conv[12])\.", r"\1.conv.", rest)


def diffusers_name(key: str, stages: int) -> str:
    """Our parameter name -> diffusers' (``stages``: the decoder's up stages, block_out the last)."""
    m = re.fullmatch(r"decoder\.middle\.blocks\.(\d+)\.(.*)", key)
    if m:
        return f"decoder.block_in.resnets.{m[1]}.{_resnet_part(m[2])}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.blocks\.(\d+)\.(.*)", key)
    if m:
        block = "block_out" if int(m[1]) == stages - 1 else f"up_blocks.{m[1]}"
        return f"decoder.{block}.resnets.{m[2]}.{_resnet_part(m[3])}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.resample\.proj\.(.*)", key)
    if m:
        return f"decoder.up_blocks.{m[1]}.proj.{m[2]}"
    if key.startswith("decoder.head.conv."):
        return key.replace("decoder.head.conv.", "decoder.proj_out.")
    if key.startswith("encoder."):  # our encoder is named as diffusers' but for the wrappers
        key = re.sub(r"\.(norm[12]|norms\.\d+|norm_out)\.(weight|bias)$", r".\1.norm_layer.\2", key)
        key = re.sub(r"\.(conv[12]|conv_in)\.(weight|bias)$", r".\1.conv.\2", key)
        return re.sub(r"\.to_out\.(weight|bias)$", r".to_out.0.\1", key)
    return key  # decoder.conv_in


DIFFUSERS_MARKER = "decoder.block_in.resnets.0.norm1.norm_layer.weight"
OUR_MARKER = "decoder.up.0.resample.proj.weight"  # a linear depth-to-space: no other family's


def _shape(tensors: Mapping[str, Tensor], key: str, dims: int) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"the checkpoint lacks {key}")
    shape = tuple(tensors[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"{key} has shape {shape}, expected {dims} dimensions")
    return shape


def _count(keys: Collection[str], pattern: str) -> int:
    """How many consecutive indices from 0 the keys matching ``pattern`` (one group) hold."""
    found = {int(m[1]) for k in keys if (m := re.fullmatch(pattern, k))}
    n = 0
    while n in found:
        n += 1
    if found != set(range(n)):
        raise CheckpointError(f"the checkpoint's indices for {pattern} are not 0..{n - 1} ({sorted(found)[:8]})"[:200])
    return n


def diffusers_shapes(tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """The configuration fields a diffusers-layout state dict's shapes and names say."""
    keys = tensors.keys()
    norm = r"\.resnets\.(\d+)\.norm1\.norm_layer\.weight"
    z = _shape(tensors, "decoder.conv_in.weight", 5)[1]
    ups = _count(keys, r"decoder\.up_blocks\.(\d+)\.proj\.weight")
    decoder = [_shape(tensors, f"decoder.up_blocks.{i}.resnets.0.norm1.norm_layer.weight", 1)[0] for i in range(ups)]
    decoder.append(_shape(tensors, "decoder.block_out.resnets.0.norm1.norm_layer.weight", 1)[0])
    dec_layers = [_count(keys, rf"decoder\.block_in{norm}")]
    dec_layers += [_count(keys, rf"decoder\.up_blocks\.{i}{norm}") for i in range(ups)]
    dec_layers.append(_count(keys, rf"decoder\.block_out{norm}"))
    fields: dict[str, Any] = {
        "latent_channels": z,
        "decoder_block_out_channels": decoder[::-1],
        "layers_per_block": dec_layers[::-1],
    }
    if "encoder.proj_in.weight" in keys:
        widths = [_shape(tensors, "encoder.proj_in.weight", 2)[0]]
        temporal, spatial = [], []
        for i in range(_count(keys, r"encoder\.down_blocks\.(\d+)\.conv_in\.conv\.weight")):
            out, _, kt, kh, _ = _shape(tensors, f"encoder.down_blocks.{i}.conv_in.conv.weight", 5)
            widths.append(out)
            temporal.append(kt)
            spatial.append(kh)
        blocks = ["block_in", *(f"down_blocks.{i}" for i in range(len(widths) - 1)), "block_out"]
        enc_layers = [_count(keys, rf"encoder\.{b.replace('.', chr(92) + '.')}{norm}") for b in blocks]
        if enc_layers != fields["layers_per_block"]:
            raise CheckpointError(
                f"the encoder's residual block counts {enc_layers} differ from the decoder's "
                f"{fields['layers_per_block']}"
            )
        fields.update(
            encoder_block_out_channels=widths,
            temporal_expansions=temporal,
            spatial_expansions=spatial,
            add_attention_block=[f"encoder.{b}.attentions.0.to_q.weight" in keys for b in blocks],
        )
    return fields


class MochiFamily(Family):
    name: ClassVar[str] = "mochi"
    title: ClassVar[str] = "Mochi VAE"
    diffusers_vae: ClassVar[str] = "AutoencoderKLMochi"
    pipelines: ClassVar[str] = "Mochi pipelines (MochiPipeline)"
    # MochiPipeline de-normalises latents itself from these (its factors 8 and 6 are hard-coded)
    pipeline_reads: ClassVar[tuple[str, ...]] = tuple(
        f"config.{k}" for k in ("latents_mean", "latents_std", "scaling_factor")
    )
    config_type: ClassVar[type] = MochiConfig
    teacher_type: ClassVar[type] = MochiVAE
    default_resolution: ClassVar[tuple[int, int]] = (480, 848)
    ops: ClassVar[tuple[str, ...]] = ("causal3d", "dwsep3d", "spatial2d", "pointwise")
    clip_frames: ClassVar[int] = 13  # 6n+1 frames
    embedded_teacher: ClassVar[str | None] = "mochi-tiny.safetensors"  # scripts/train_embedded_teacher.py

    def layouts_present(self, keys: Collection[str]) -> dict[str, str]:
        markers = {"diffusers": DIFFUSERS_MARKER, "flashvaed": OUR_MARKER}
        return {layout: key for layout, key in markers.items() if key in keys}

    def detect(self, keys: Collection[str], tensors: Mapping[str, Tensor], config: Mapping) -> list[Match]:
        matches = []
        if DIFFUSERS_MARKER in keys:  # a tensor missing beside it is named when the weights are matched
            matches.append(Match(self, "diffusers", DIFFUSERS_MARKER))
        if OUR_MARKER in keys and "decoder.conv_in.weight" in keys:
            family, _ = our_metadata(config)
            if family in (None, self.name):
                matches.append(Match(self, "flashvaed", OUR_MARKER))
        return matches

    def infer_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> MochiConfig:
        if layout == "flashvaed":
            _, ours = our_metadata(config)
            fields = dict(ours)
            z = _shape(tensors, "decoder.conv_in.weight", 5)[1]
            if fields.get("latent_channels", z) != z:
                raise CheckpointError(
                    f"config field latent_channels={fields['latent_channels']!r:.40} contradicts the "
                    f"checkpoint's shapes ({z})"
                )
            fields["latent_channels"] = z
        else:
            fields = {}
            for key in ("temporal_expansions", "spatial_expansions", "add_attention_block", "layers_per_block"):
                kind = bool if key == "add_attention_block" else int
                value = config_list(config, key, None, kind)  # type: ignore[arg-type]
                if value is not None:
                    fields[key] = list(value)
            for key in ("scaling_factor",):
                if config.get(key) is not None:
                    fields[key] = config[key]
            shapes = diffusers_shapes(tensors)
            for key, value in shapes.items():  # read from the shapes; a config that says otherwise lies
                given = config.get(key)
                if given is not None and _listed(given) != _listed(value):
                    raise CheckpointError(
                        f"config field {key}={given!r:.60} contradicts the checkpoint's shapes ({_listed(value)})"
                    )
            fields.update(shapes)
            given = [k for k in ("latents_mean", "latents_std") if config.get(k) is not None]
            if len(given) == 1:
                raise CheckpointError(f"config field {given[0]} is given without the other latent statistic")
            if given:
                fields["latents_mean"], fields["latents_std"] = config["latents_mean"], config["latents_std"]
        z = fields.get("latent_channels", MochiConfig().latent_channels)
        if "latents_mean" not in fields and z != MochiConfig().latent_channels:
            raise CheckpointError(f"latent statistics for {z} latent channels are unknown (Mochi has 12)")
        try:
            return MochiConfig.from_dict(fields)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"inconsistent VAE configuration: {e}") from None

    def key_names(self, model: nn.Module, layout: str) -> dict[str, str]:
        keys = model.state_dict()
        if layout == "flashvaed":
            return {k: k for k in keys}
        if layout != "diffusers":
            raise CheckpointError(f"{self.title} checkpoints have no {layout} layout here (diffusers or flashvaed)")
        stages = len(model.decoder.up)
        return {k: diffusers_name(k, stages) for k in keys}

    def file_metadata(self, config: MochiConfig, layout: str) -> dict[str, str] | None:
        return None

    def diffusers_config(self, config: MochiConfig) -> dict[str, Any]:
        return {
            "_class_name": self.diffusers_vae,
            "in_channels": 3 * (1 + 2 * (FOURIER[1] - FOURIER[0])),
            "out_channels": 3,
            "encoder_block_out_channels": list(config.encoder_block_out_channels),
            "decoder_block_out_channels": list(config.decoder_block_out_channels),
            "latent_channels": config.latent_channels,
            "layers_per_block": list(config.layers_per_block),
            "act_fn": "silu",
            "temporal_expansions": list(config.temporal_expansions),
            "spatial_expansions": list(config.spatial_expansions),
            "add_attention_block": list(config.add_attention_block),
            "latents_mean": list(config.latents_mean),
            "latents_std": list(config.latents_std),
            "scaling_factor": config.scaling_factor,
        }

    def describe(self, config: MochiConfig) -> str:
        widths = "/".join(map(str, config.decoder_block_out_channels))
        return f"decoder widths {widths}, latent_channels {config.latent_channels}"

    def scaling_factor(self, config: MochiConfig) -> float:
        return config.scaling_factor

    def pipeline_fields(self, config: MochiConfig, model: Any) -> dict[str, Any]:
        """What ``MochiPipeline`` reads of ``vae.config``: it de-normalises latents itself."""
        return {
            "latents_mean": list(config.latents_mean),
            "latents_std": list(config.latents_std),
            "scaling_factor": config.scaling_factor,
        }

    def tiny_config(self) -> MochiConfig:
        """The smallest teacher: widths 32 (one GroupNorm channel per group, one attention head),
        one residual block per stage; Mochi's factors, latent channels and statistics."""
        return MochiConfig(
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
        )

    def teacher_layout(self, config: MochiConfig) -> DecoderLayout:
        return teacher_layout(config)

    def build_decoder(self, config: MochiConfig, layout: DecoderLayout, student: bool = False) -> nn.Module:
        if layout.head_op != "pointwise":  # a spec naming another kind for the head
            raise ValueError(f"the Mochi head is a linear layer: its op is pointwise, not {layout.head_op}")
        return MochiDecoder(config, layout)

    def build_encoder(self, config: MochiConfig) -> nn.Module:
        return MochiEncoder(config)


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


MOCHI = register(MochiFamily())
MochiVAE.family_def = MOCHI
