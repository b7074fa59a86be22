"""The LTX-Video VAE family (0.9.0, 0.9.1, 0.9.5/0.9.7): 128 latent channels, 8x32x32 compression.

Facts (../shared/docs/ltx-vae.md in the planning repo; diffusers' ``AutoencoderKLLTXVideo`` is the
test oracle):

- frames are patchified 4x4 (channel ``c*16 + r*4 + q``, r the column offset) into 48 channels;
- the encoder is causal (replicate padding: two copies of the first frame in front);
- the decoder is **not** causal: its temporal convs pad by replicating the first frame in front
  and the last frame at the end, so every output frame depends on later latent frames;
- residual blocks use parameter-free pixel norms; a width-changing block has a LayerNorm + 1x1 shortcut;
- the decoder upsamples by depth-to-space (channel ``c*8 + t*4 + y*2 + x``) and drops the first
  output frame; from 0.9.1 on with a residual skip (depth-to-space of the input, tiled) and a
  channel reduction;
- 0.9.1+ decoders are conditioned on a timestep (sinusoidal embedding -> scale/shift of every
  residual block's norms and of the final norm); 0.9.1 adds per-channel scaled spatial noise after
  each conv of its noisy blocks;
- latents are normalised with per-channel statistics stored in the checkpoint.

Streaming the non-causal decoder exactly: every temporal layer runs on a clock (see
``flashvaed.models.streaming``). A step maps k latent frames to a fixed number of positions at
each layer; a conv that reads one future frame delays its output by one position (the residual
skip of its block by the same, a delay line), depth-to-space doubles positions without dropping
the first one, and each layer, knowing the stream position and (once known) the clip's end,
replaces the frames before the clip's start and past its end by copies of its first and last
frame, which is upstream's replicate padding. The decoder declares the resulting constant: the
output positions before the first frame, ``output_offset``, and the ``latency`` in latent frames.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import CheckpointError, InputError
from ..blocks import FrameConv2d
from ..coupling import D2S_ROWS, ChannelFlow, Group
from ..layout import DecoderLayout, StageLayout
from ..streaming import State, StateSpec, conditioning_inputs
from ..vae import TeacherVAE
from .base import Family, Match, any_key, check_int, checked_statistics, register
from .wan21 import config_int, our_metadata
from .wan22 import patchify, unpatchify

DEFAULT_TIMESTEP = 0.05  # the released pipelines' decode_timestep
DEFAULT_NOISE_SCALE = 0.025  # ... and decode_noise_scale
MAX_WIDTH = 16384  # no released VAE comes near; an untrusted config asking for more is refused
MAX_LAYERS = 64  # res blocks per block, in either layout's config
MAX_BLOCKS = 64  # entries of an encoder or decoder block list

# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
DECODER_KINDS = ("res_x", "res_x_y", "compress_all")
ENCODER_KINDS = ("res_x", "res_x_y", "compress_all", "compress_all_res", "compress_space_res", "compress_time_res")
# (time, space) stride of each encoder downsampler
ENCODER_STRIDES = {
    "compress_all": (2, 2),
    "compress_all_res": (2, 2),
    "compress_space_res": (1, 2),
    "compress_time_res": (2, 1),
}
# diffusers' downsample_type of each 0.9.5 encoder downsampler
DIFFUSERS_DOWNSAMPLE = {
    "compress_space_res": "spatial",
    "compress_time_res": "temporal",
    "compress_all_res": "spatiotemporal",
}
DOWNSAMPLE_FROM_DIFFUSERS = {v: k for k, v in DIFFUSERS_DOWNSAMPLE.items()}


@dataclass(frozen=True)
class Block:
    """One entry of an LTX block list, as upstream configs write it (``["res_x", {"num_layers": 4}]``)."""

    kind: str
    layers: int = 1  # res_x: residual blocks
    multiplier: int = 1  # res_x_y and compress_*: the width factor
    residual: bool = False  # decoder compress_all: the depth-to-space skip
    inject_noise: bool = False  # decoder res_x

    def to_item(self) -> list[Any]:
        if self.kind == "res_x":
            params: dict[str, Any] = {"num_layers": self.layers}
            if self.inject_noise:
                params["inject_noise"] = True
            return [self.kind, params]
        params = {"multiplier": self.multiplier}
        if self.residual:
            params["residual"] = True
        return [self.kind, params]

    @classmethod
    def from_item(cls, item: Any, side: str) -> Block:
        """A block list entry of an untrusted config, validated."""
        kinds = DECODER_KINDS if side == "decoder" else ENCODER_KINDS
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
            raise CheckpointError(f"{side} block {item!r} is not a [name, parameters] pair"[:200])
        kind, params = item
        if kind not in kinds:
            raise CheckpointError(f"{side} block {kind!r} is not supported (supported: {', '.join(kinds)})"[:200])
        if isinstance(params, bool) or not isinstance(params, (int, dict)):
            raise CheckpointError(
                f"{side} block {kind} has parameters {params!r}, expected a number or a mapping"[:200]
            )
        if isinstance(params, int):
            params = {"num_layers": params}
        known = {"num_layers", "multiplier", "residual", "inject_noise"}
        if set(params) - known:
            raise CheckpointError(f"{side} block {kind} has unsupported parameters {sorted(set(params) - known)}"[:200])
        default_multiplier = 1 if (kind == "compress_all") else 2
        layers = config_int(params, "num_layers", 1, 1, MAX_LAYERS)
        multiplier = config_int(params, "multiplier", default_multiplier, 1, 8)
        residual, noise = params.get("residual", False), params.get("inject_noise", False)
        if not isinstance(residual, bool) or not isinstance(noise, bool):
            raise CheckpointError(f"{side} block {kind}: residual and inject_noise must be true or false")
        if noise and (kind != "res_x" or side != "decoder"):
            raise CheckpointError(f"{side} block {kind}: noise injection is supported in decoder res_x blocks only")
        if residual and (kind != "compress_all" or side != "decoder"):
            raise CheckpointError(f"{side} block {kind}: 'residual' applies to decoder compress_all blocks only")
        if kind == "compress_all" and side == "encoder" and multiplier != 1:
            raise CheckpointError("encoder compress_all blocks keep their width (use compress_all_res)")
        return cls(kind, layers if kind == "res_x" else 1, multiplier if kind != "res_x" else 1, residual, noise)


V090_BLOCKS = (
    Block("res_x", 4), Block("compress_all"), Block("res_x_y", multiplier=2), Block("res_x", 3),
    Block("compress_all"), Block("res_x_y", multiplier=2), Block("res_x", 3), Block("compress_all"),
    Block("res_x", 3), Block("res_x", 4),
)  # fmt: skip
V091_DECODER = (
    Block("res_x", 5, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
    Block("res_x", 6, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
    Block("res_x", 7, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
    Block("res_x", 8),
)  # fmt: skip
V095_ENCODER = (
    Block("res_x", 4), Block("compress_space_res", multiplier=2), Block("res_x", 6),
    Block("compress_time_res", multiplier=2), Block("res_x", 6), Block("compress_all_res", multiplier=2),
    Block("res_x", 2), Block("compress_all_res", multiplier=2), Block("res_x", 2),
)  # fmt: skip
V095_DECODER = (
    Block("res_x", 5), Block("compress_all", residual=True, multiplier=2), Block("res_x", 5),
    Block("compress_all", residual=True, multiplier=2), Block("res_x", 5),
    Block("compress_all", residual=True, multiplier=2), Block("res_x", 5),
)  # fmt: skip


@dataclass(frozen=True)
class LTXConfig:
    """Architecture of an LTX-Video VAE; the defaults are the released 0.9.0 one.

    Block lists are in upstream order (the decoder's runs reversed); ``released(generation)``
    gives the 0.9.1 and 0.9.5 ones. Statistics default to zero mean / unit std: real checkpoints
    carry their own (``per_channel_statistics``), read when they are loaded.
    """

    latent_channels: int = 128
    patch_size: int = 4
    encoder_base: int = 128
    decoder_base: int = 128
    encoder_blocks: tuple[Block, ...] = V090_BLOCKS
    decoder_blocks: tuple[Block, ...] = V090_BLOCKS
    timestep_conditioning: bool = False
    causal_decoder: bool = False
    spatial_padding_mode: str = "zeros"
    latents_mean: tuple[float, ...] = field(default=(0.0,) * 128)
    latents_std: tuple[float, ...] = field(default=(1.0,) * 128)

    def __post_init__(self) -> None:
        """Every field checked (ValueError naming it): configurations come from untrusted files."""
        check_int("latent_channels", self.latent_channels, 1, 4096)
        check_int("patch_size", self.patch_size, 1, 16)
        check_int("encoder_base", self.encoder_base, 1, MAX_WIDTH)
        check_int("decoder_base", self.decoder_base, 1, MAX_WIDTH)
        for name in ("encoder_blocks", "decoder_blocks"):
            blocks = getattr(self, name)
            if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, Block) for b in blocks):
                raise ValueError(f"{name} must be a list of blocks, got {blocks!r}"[:200])
            object.__setattr__(self, name, tuple(blocks))
        for name in ("timestep_conditioning", "causal_decoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}"[:200])
        mean, std = checked_statistics(self.latents_mean, self.latents_std, self.latent_channels)
        object.__setattr__(self, "latents_mean", mean)
        object.__setattr__(self, "latents_std", std)
        if self.spatial_padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown spatial_padding_mode {self.spatial_padding_mode!r}"[:200])
        width = self.encoder_base
        for b in self.encoder_blocks:
            width *= b.multiplier if b.kind != "res_x" else 1
        if max(width, self.decoder_top_width) > MAX_WIDTH:
            raise ValueError(f"the block lists widen the network past {MAX_WIDTH} channels")
        run = self.decoder_run
        if not run or run[0].kind != "res_x" or run[-1].kind != "res_x":
            raise ValueError("the decoder must start and end with res_x blocks (in running order)")
        if any(b.kind == "res_x_y" and b.multiplier < 2 for b in run):
            raise ValueError("decoder res_x_y blocks must narrow the width (multiplier >= 2)")
        for b in run:
            if b.kind == "compress_all" and b.residual and (8 % b.multiplier):
                raise ValueError("a residual compress_all's multiplier must divide 8")
        t_enc = s_enc = 0
        for b in self.encoder_blocks:
            if b.kind in ENCODER_STRIDES:
                t, s = ENCODER_STRIDES[b.kind]
                t_enc, s_enc = t_enc + (t == 2), s_enc + (s == 2)
        ups = sum(b.kind == "compress_all" for b in run)
        if self.encoder_blocks and (t_enc, s_enc) != (ups, ups):
            raise ValueError(
                f"the encoder compresses 2^{t_enc} in time and 2^{s_enc} in space, the decoder expands 2^{ups}"
            )

    @classmethod
    def released(cls, generation: str, **overrides: Any) -> LTXConfig:
        """The released architecture of ``generation`` (0.9.0, 0.9.1, 0.9.5; 0.9.7 is 0.9.5's)."""
        generation = "0.9.5" if generation == "0.9.7" else generation
        if generation == "0.9.0":
            base: dict[str, Any] = {}
        elif generation == "0.9.1":
            base = {"decoder_blocks": V091_DECODER, "timestep_conditioning": True}
        elif generation == "0.9.5":
            base = {"encoder_blocks": V095_ENCODER, "decoder_blocks": V095_DECODER, "timestep_conditioning": True}
        else:
            raise ValueError(f"unknown LTX-Video generation {generation!r} (0.9.0, 0.9.1, 0.9.5, 0.9.7)")
        return cls(**{**base, **overrides})

    @property
    def decoder_run(self) -> tuple[Block, ...]:
        """The decoder's blocks in the order they run."""
        return self.decoder_blocks[::-1]

    @property
    def generation(self) -> str:
        if not self.timestep_conditioning:
            return "0.9.0"
        if any(b.inject_noise for b in self.decoder_blocks):
            return "0.9.1"
        return "0.9.5"

    @property
    def noise_injection(self) -> bool:
        return any(b.inject_noise for b in self.decoder_blocks)

    @property
    def decoder_top_width(self) -> int:
        width = self.decoder_base
        for b in self.decoder_blocks:
            if b.kind in ("res_x_y", "compress_all"):
                width *= b.multiplier
        return width

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(b.kind == "compress_all" for b in self.decoder_blocks)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * self.temporal_factor

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent_channels": self.latent_channels,
            "patch_size": self.patch_size,
            "encoder_base": self.encoder_base,
            "decoder_base": self.decoder_base,
            "encoder_blocks": [b.to_item() for b in self.encoder_blocks],
            "decoder_blocks": [b.to_item() for b in self.decoder_blocks],
            "timestep_conditioning": self.timestep_conditioning,
            "causal_decoder": self.causal_decoder,
            "spatial_padding_mode": self.spatial_padding_mode,
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LTXConfig:
        d = dict(d)
        for side in ("encoder", "decoder"):
            items = d.get(f"{side}_blocks", ())
            if not isinstance(items, (list, tuple)) or len(items) > MAX_BLOCKS:
                raise ValueError(f"{side}_blocks must be a list of up to {MAX_BLOCKS} [name, parameters] blocks")
            d[f"{side}_blocks"] = tuple(Block.from_item(b, side) for b in items)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class StageStructure:
    """What a decoder stage is made of beyond its widths (the teacher's, shared by its students).

    ``groups``: (original block index, residual blocks, noise) of each res_x block; ``narrow``:
    (index, multiplier) of a res_x_y that narrows the width before the upsampler; ``upsample``:
    (index, residual, multiplier) of the depth-to-space upsampler.
    """

    groups: tuple[tuple[int, int, bool], ...]
    narrow: tuple[int, int] | None = None
    upsample: tuple[int, bool, int] | None = None

    @property
    def layers(self) -> int:
        return sum(n for _, n, _ in self.groups)


def decoder_structure(config: LTXConfig) -> list[StageStructure]:
    """Stages in running order: consecutive res_x blocks, then the transitions that follow them."""
    stages: list[dict[str, Any]] = []
    for index, block in enumerate(config.decoder_run):
        if block.kind == "res_x":
            if not stages or stages[-1]["narrow"] or stages[-1]["upsample"]:
                stages.append({"groups": [], "narrow": None, "upsample": None})
            stages[-1]["groups"].append((index, block.layers, block.inject_noise))
        elif block.kind == "res_x_y":
            if stages[-1]["narrow"] or stages[-1]["upsample"]:
                raise CheckpointError("unsupported LTX decoder: a res_x_y must directly follow res_x blocks")
            stages[-1]["narrow"] = (index, block.multiplier)
        else:
            if stages[-1]["upsample"]:
                raise CheckpointError("unsupported LTX decoder: two upsamplers without res_x blocks between them")
            stages[-1]["upsample"] = (index, block.residual, block.multiplier)
    if any(s["narrow"] and not s["upsample"] for s in stages):
        raise CheckpointError("unsupported LTX decoder: a res_x_y must be followed by a compress_all")
    return [StageStructure(tuple(s["groups"]), s["narrow"], s["upsample"]) for s in stages]


def teacher_layout(config: LTXConfig) -> DecoderLayout:
    """The teacher's stages: full widths; a stage's resample is its (narrow +) depth-to-space."""
    width = config.decoder_top_width
    op = "causal3d" if config.causal_decoder else "conv3d"
    stages = []
    for st in decoder_structure(config):
        out = None
        if st.narrow or st.upsample:
            out = width // (st.narrow[1] if st.narrow else 1) // (st.upsample[2] if st.upsample else 1)
        stages.append(StageLayout(op, width, width, (width,) * st.layers, out, temporal=st.upsample is not None))
        width = out or width
    spaces: dict[str, str] = {}
    for i, (name, st) in enumerate(zip(["middle"] + [f"up.{j}" for j in range(len(stages) - 1)], stages, strict=True)):
        spaces[f"{name}.in_width"] = spaces[f"{name}.width"] = f"s{i}"  # identity shortcuts throughout a stage
        if st.resample_width is not None:
            spaces[f"{name}.resample_width"] = f"s{i + 1}"
    out_channels = 3 * config.patch_size**2
    return DecoderLayout(
        config.latent_channels, stages[0], tuple(stages[1:]), 0, 0, op, out_channels, causal=config.causal_decoder,
        family=LTXFamily.name, spaces=spaces,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------
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
    mean over fewer channels changes)."""

    def __init__(self, channels: int, affine: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels)) if affine else None

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


def depth_to_space(x: Tensor) -> Tensor:
    """(B, C*8, T, H, W) -> (B, C, 2T, 2H, 2W), channel ``c*8 + t*4 + y*2 + x``."""
    b, c8, t, h, w = x.shape
    x = x.reshape(b, c8 // 8, 2, 2, 2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c8 // 8, 2 * t, 2 * h, 2 * w)


class Upsample(nn.Module):
    """A stage's resample: an optional narrowing res_x_y, then a conv to 8x the output width and
    depth-to-space in time and space; with ``residual``, plus depth-to-space of the conv's input
    tiled to the output width. Upstream drops the first output frame; here that is a clock offset."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        narrow: bool,
        residual: bool,
        op: str,
        padding_mode: str,
        student: bool = False,
    ) -> None:
        super().__init__()
        causal = op == "causal3d"
        self.narrow = (
            ResBlock(in_channels, out_channels, op, padding_mode=padding_mode, student=student, causal=causal)
            if narrow
            else None
        )
        mid = out_channels if narrow else in_channels
        self.conv = ReplicateConv3d(mid, 8 * out_channels, 3, causal=op == "causal3d", padding_mode=padding_mode)
        self.residual = residual
        if residual and (mid % 8 or (8 * out_channels) % mid):
            raise InputError(
                f"a residual depth-to-space upsampler from {mid} to {out_channels} channels cannot tile its skip "
                "(its input width must be a multiple of 8 that divides 8x its output width)"
            )
        self.repeats = 8 * out_channels // mid if residual else 0
        self.skip = DelayLine(mid, self.conv.delay if residual else 0)
        narrow_states = self.narrow.num_states if self.narrow is not None else 0
        self.num_states = narrow_states + self.conv.num_states + self.skip.num_states

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        specs = self.narrow.state_specs(f"{name}.narrow", scale) if self.narrow is not None else []
        return specs + self.conv.state_specs(f"{name}.conv", scale) + self.skip.state_specs(f"{name}.skip", scale)

    def set_timeline(self, rate: int, offset: int) -> tuple[int, int]:
        start = (rate, offset)
        if self.narrow is not None:
            rate, offset = self.narrow.set_timeline(rate, offset)
        rate, offset = self.conv.set_timeline(rate, offset)
        self.span: Span = (start, (2 * rate, 2 * offset + 1))
        return self.span[1]  # depth-to-space doubles positions; the first frame is dropped: an offset

    def forward(self, x: Tensor, state: State, context: StepContext) -> tuple[Tensor, State]:
        if idle(context.clock, self.span, x.shape[2]):
            b, _, t, h, w = x.shape
            return x.new_zeros(b, self.conv.out_channels // 8, 2 * t, 2 * h, 2 * w), tuple(state)
        states: list[Tensor] = []
        i = 0
        if self.narrow is not None:
            x, s = self.narrow(x, state[: self.narrow.num_states], context)
            states.extend(s)
            i = self.narrow.num_states
        y, s = self.conv(x, state[i : i + self.conv.num_states], context.clock)
        states.extend(s)
        y = depth_to_space(y)
        if self.residual:
            skip, s = self.skip(x, state[i + self.conv.num_states :], context.clock)
            states.extend(s)
            y = y + depth_to_space(skip).repeat(1, self.repeats, 1, 1, 1)
        return (y[:, :, 1:] if context.clock.full else y), tuple(states)


class Stage(nn.Module):
    """Consecutive res_x groups at one width (each with its own timestep embedder when
    conditioned), then an optional ``Upsample``."""

    def __init__(
        self,
        st: StageLayout,
        structure: StageStructure,
        *,
        conditioned: bool,
        padding_mode: str,
        conv_op: str,
        teacher_width: int,
        student: bool = False,
    ) -> None:
        super().__init__()
        causal = conv_op == "causal3d" or st.causal  # the stage's own convs; its upsampler follows the decoder
        self.groups = [n for _, n, _ in structure.groups]
        noise = [flag for _, n, flag in structure.groups for _ in range(n)]
        if any(h != st.width for h in st.hidden):
            raise ValueError("an LTX residual block's hidden width is its stream width")
        self.blocks = nn.ModuleList(
            [
                ResBlock(
                    st.width,
                    st.width,
                    st.op,
                    padding_mode=padding_mode,
                    conditioned=conditioned,
                    noise=flag,
                    student=student,
                    embedding_width=teacher_width,
                    causal=causal,
                    shortcut=st.shortcut,
                )
                for flag in noise
            ]
        )
        # a student keeps the teacher's embedders (cheap: once per stream) and reads them at its channels
        self.embedders = nn.ModuleList(
            [TimestepEmbedder(4 * teacher_width) for _ in self.groups] if conditioned else []
        )
        self.resample: Upsample | None = None
        if st.resample_width is not None:
            self.resample = Upsample(
                st.width,
                st.resample_width,
                narrow=structure.narrow is not None,
                residual=bool(structure.upsample and structure.upsample[1]),
                op=conv_op,
                padding_mode=padding_mode,
                student=student,
            )
        self.num_states = sum(b.num_states for b in self.blocks) + (self.resample.num_states if self.resample else 0)

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        specs = [s for j, b in enumerate(self.blocks) for s in b.state_specs(f"{name}.blocks.{j}", scale)]
        if self.resample is not None:
            specs += self.resample.state_specs(f"{name}.resample", scale)
        return specs

    def set_timeline(self, rate: int, offset: int) -> tuple[int, int]:
        for block in self.blocks:
            rate, offset = block.set_timeline(rate, offset)
        return self.resample.set_timeline(rate, offset) if self.resample is not None else (rate, offset)

    def forward(self, x: Tensor, state: State, first: bool = False, context: StepContext | None = None):  # type: ignore[no-untyped-def]
        if context is None:
            raise TypeError("an LTX decoder block runs with its decoder's step context (LTXDecoder.context)")
        states: list[Tensor] = []
        i = 0
        j = 0
        for g, count in enumerate(self.groups):
            embedding = None
            if self.embedders:
                embedding = self.embedders[g](context.timestep, x.dtype)  # type: ignore[arg-type]
            for block in self.blocks[j : j + count]:
                x, s = block(x, state[i : i + block.num_states], context, embedding)
                states.extend(s)
                i += block.num_states
            j += count
        if self.resample is not None:
            x, s = self.resample(x, state[i:], context)
            states.extend(s)
        return x, tuple(states)

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        for j, block in enumerate(self.blocks):
            stream = block.channel_flow(flow, f"{path}.blocks.{j}", stage, stream)
        if self.resample is not None:
            r = self.resample
            if r.narrow is not None:
                stream = r.narrow.channel_flow(flow, f"{path}.resample.narrow", stage, stream)
            flow.consume(stream, f"{path}.resample.conv", stage)
            # the residual skip (parameter-free tiling) is not a coupling: a student tiles its own widths
            stream = flow.start("stream", r.conv.out_channels // 8, f"{path}.resample.conv", D2S_ROWS)
        return stream


class Head(nn.Module):
    """Pixel norm, [final scale/shift from the timestep], SiLU, conv to 3 * patch^2 channels."""

    def __init__(
        self,
        width: int,
        out_channels: int,
        op: str,
        *,
        conditioned: bool,
        padding_mode: str,
        teacher_width: int,
        student: bool = False,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.norm = PixelNorm(width, student)
        self.embedder = TimestepEmbedder(2 * teacher_width) if conditioned else None
        self.scale_shift_table = nn.Parameter(torch.randn(2, width) / width**0.5) if conditioned else None
        self.ada_index: Tensor | None
        if conditioned and student:
            self.register_buffer(
                "ada_index", (torch.arange(2)[:, None] * teacher_width + torch.arange(width)).flatten()
            )
        else:
            self.ada_index = None
        self.conv = make_conv(op, width, out_channels, padding_mode, causal)
        self.num_states = self.conv.num_states

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return self.conv.state_specs(f"{name}.conv", scale)

    def set_timeline(self, rate: int, offset: int) -> tuple[int, int]:
        out = self.conv.set_timeline(rate, offset)
        self.span: Span = ((rate, offset), out)
        return out

    def forward(self, x: Tensor, state: State, first: bool = False, context: StepContext | None = None):  # type: ignore[no-untyped-def]
        if context is None:
            raise TypeError("an LTX decoder block runs with its decoder's step context (LTXDecoder.context)")
        if idle(context.clock, self.span, x.shape[2]):
            b, _, t, h, w = x.shape
            conv = self.conv.pointwise if isinstance(self.conv, DepthwiseSeparable) else self.conv
            return x.new_zeros(b, conv.out_channels, t, h, w), tuple(state)
        x = self.norm(x)
        if self.embedder is not None:
            embedding = self.embedder(context.timestep, x.dtype)  # type: ignore[arg-type]
            shift, scale = modulation(embedding, self.scale_shift_table, self.ada_index, 2)  # type: ignore[arg-type]
            x = x * (1 + scale) + shift
        return self.conv(F.silu(x), state, context.clock)

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> None:
        flow.consume(stream, f"{path}.conv", stage, norm=f"{path}.norm")
        if self.scale_shift_table is not None:
            c = self.scale_shift_table.shape[1]
            for part in range(2):
                flow.slice(stream, f"{path}.scale_shift_table", part * c)
                flow.gather(stream, f"{path}.ada_index", part * c)


class LTXDecoder(nn.Module):
    """conv_in, stages (middle, up.0, ...), head, unpatchify; a pure step on a clock.

    A ``student`` decoder (students and pruned teachers) has norm gains and embedding gathers for
    pruning to set, whatever its widths: at its teacher's widths (a small teacher, whose width
    floors keep every stage) as well.
    """

    def __init__(self, config: LTXConfig, layout: DecoderLayout, student: bool = False) -> None:
        super().__init__()
        self.layout = layout
        structure = decoder_structure(config)
        stages = [layout.middle, *layout.up]
        if len(structure) != len(stages):
            raise ValueError(f"an LTX decoder of this configuration has {len(structure)} stages, got {len(stages)}")
        conditioned, pad = config.timestep_conditioning, config.spatial_padding_mode
        causal = config.causal_decoder or layout.causal  # a causal student of a non-causal teacher: no latency
        conv_op = "causal3d" if causal else "conv3d"
        if causal and "conv3d" in [st.op for st in stages] + [layout.head_op]:
            raise ValueError("a causal LTX decoder has no conv3d (a conv reading a future frame) stage")
        teacher = teacher_layout(config)
        teacher_stages = [teacher.middle, *teacher.up]
        self.conv_in = make_conv(conv_op, layout.z_dim, layout.middle.width, pad)
        built = [
            Stage(
                st,
                s,
                conditioned=conditioned,
                padding_mode=pad,
                conv_op=conv_op,
                teacher_width=t.width,
                student=student,
            )
            for st, s, t in zip(stages, structure, teacher_stages, strict=True)
        ]
        self.middle = built[0]
        self.up = nn.ModuleList(built[1:])
        self.head = Head(
            stages[-1].out_width, layout.out_channels, layout.head_op, conditioned=conditioned, padding_mode=pad,
            teacher_width=teacher_stages[-1].out_width, student=student, causal=causal,
        )  # fmt: skip
        self.timestep_scale_multiplier = nn.Parameter(torch.tensor(1000.0)) if conditioned else None
        self.patch_size = config.patch_size
        ups = sum(s.upsample is not None for s in structure)
        self.temporal_factor = 2**ups
        self.spatial_factor = config.patch_size * 2**ups
        # noise maps in upstream's drawing order: block by block, resnet by resnet, conv1 then conv2
        self.noise_scales: list[Fraction] = []
        for _, scale, block in self.stages():
            for res in [m for m in block.modules() if isinstance(m, ResBlock) and m.noise1 is not None]:
                res.noise_index = len(self.noise_scales)
                self.noise_scales += [scale, scale]
        self.step_inputs = (("timestep",) if conditioned else ()) + (("noise",) if self.noise_scales else ())
        self.default_timestep = DEFAULT_TIMESTEP if conditioned else None
        self.default_noise_scale = DEFAULT_NOISE_SCALE if conditioned else None
        rate, offset = 1, 0
        for _, _, block in self.stages():
            rate, offset = block.set_timeline(rate, offset)
        self.output_offset = offset  # output positions before the clip's first frame
        tf = self.temporal_factor
        self.latency = max(0, -(-(offset + 1) // tf) - 1)  # latent frames to push after the last one

    def context(
        self, batch: int, clock: Clock, timestep: Tensor | None, noise: Sequence[Tensor], device: torch.device
    ) -> StepContext:
        """What the blocks of a step read: the clock, the timestep scaled by the checkpoint's
        multiplier (the released default when none is given), the noise maps."""
        if self.timestep_scale_multiplier is not None:
            t = torch.full((batch,), DEFAULT_TIMESTEP) if timestep is None else timestep
            timestep = t.to(device).float() * self.timestep_scale_multiplier.float()
        return StepContext(clock, timestep, noise)

    def one_shot_context(self, batch: int, height: int, width: int, seed: int = 0) -> StepContext:
        """A stage run alone on whole clips (distillation's teacher-forced phase): default
        timestep, the seed's noise maps."""
        p = next(self.parameters())
        inputs = self.stream_inputs(batch, height, width, dtype=p.dtype, device=p.device, seed=seed)
        return self.context(batch, Clock(full=True), inputs.get("timestep"), inputs.get("noise", ()), p.device)

    def stages(self) -> list[tuple[str, Fraction, nn.Module]]:
        items: list[tuple[str, Fraction, nn.Module]] = [("conv_in", Fraction(1), self.conv_in)]
        scale = Fraction(1)
        for name, stage in [("middle", self.middle)] + [(f"up.{i}", s) for i, s in enumerate(self.up)]:
            items.append((name, scale, stage))
            scale *= 2 if stage.resample is not None else 1
        items.append(("head", scale, self.head))
        return items

    def stage_ops(self) -> dict[str, str]:
        conv_op = "causal3d" if isinstance(self.conv_in, ReplicateConv3d) and self.conv_in.causal else "conv3d"
        return {"conv_in": conv_op, **{n: st.op for n, st in self.layout.stages.items()}, "head": self.layout.head_op}

    def state_specs(self) -> list[StateSpec]:
        specs = []
        for name, scale, block in self.stages():
            specs += block.state_specs(name, scale)
        return specs

    def stream_inputs(
        self,
        batch: int | None,
        height: int,
        width: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        **options: Any,
    ) -> dict[str, Any]:
        """A stream's timestep (B,) and noise maps (``streaming.conditioning_inputs``)."""
        return conditioning_inputs(
            self.step_inputs, self.noise_scales, batch, height, width, dtype=dtype, device=device,
            default_timestep=DEFAULT_TIMESTEP, **options,
        )  # fmt: skip

    def forward(
        self,
        x: Tensor,
        state: State,
        first: bool = False,
        *,
        position: int | Tensor = 0,
        end: int | Tensor | None = None,
        full: bool = False,
        timestep: Tensor | None = None,
        noise: Sequence[Tensor] = (),
    ) -> tuple[Tensor, State]:
        context = self.context(x.shape[0], Clock(position, end, full), timestep, noise, x.device)
        states: list[Tensor] = []
        i = 0
        for _, _, block in self.stages():
            n = block.num_states
            if block is self.conv_in:
                x, s = block(x, state[i : i + n], context.clock)
            else:
                x, s = block(x, state[i : i + n], False, context)
            states.extend(s)
            i += n
        return unpatchify(x, self.patch_size), tuple(states)


# ---------------------------------------------------------------------------------------------
# encoder: causal, run on a whole clip at once
# ---------------------------------------------------------------------------------------------
def space_to_depth(x: Tensor, ft: int, fs: int) -> Tensor:
    """(B, C, T*ft, H*fs, W*fs) -> (B, C*ft*fs*fs, T, H, W), channel ``c*f + t*fs*fs + y*fs + x``."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * ft * fs * fs, t // ft, h // fs, w // fs)


class ResidualDownsample(nn.Module):
    """0.9.5's space-to-depth downsampler: a causal conv to out/f channels then space-to-depth,
    plus space-to-depth of the input averaged over groups of channels (f = ft * fs^2)."""

    def __init__(self, in_channels: int, out_channels: int, ft: int, fs: int, padding_mode: str) -> None:
        super().__init__()
        self.ft, self.fs = ft, fs
        f = ft * fs * fs
        self.conv = ReplicateConv3d(in_channels, out_channels // f, 3, causal=True, padding_mode=padding_mode)
        self.group = in_channels * f // out_channels

    def full(self, x: Tensor) -> Tensor:
        if self.ft == 2:
            x = torch.cat([x[:, :, :1], x], dim=2)
        skip = space_to_depth(x, self.ft, self.fs)
        skip = skip.unflatten(1, (-1, self.group)).mean(dim=2)
        return space_to_depth(self.conv.full(x), self.ft, self.fs) + skip


class StridedDownsample(nn.Module):
    """0.9.0's compress_all: a causal 3x3x3 conv with stride 2 in time and space."""

    def __init__(self, channels: int, padding_mode: str) -> None:
        super().__init__()
        self.conv = ReplicateConv3d(channels, channels, 3, causal=True, stride=2, padding_mode=padding_mode)

    def full(self, x: Tensor) -> Tensor:
        return self.conv.full(x)


class ResGroup(nn.Module):
    def __init__(self, width: int, layers: int, padding_mode: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResBlock(width, width, "causal3d", padding_mode=padding_mode) for _ in range(layers)]
        )

    def full(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block.full(x)
        return x


class LTXEncoder(nn.Module):
    """Patchify, conv_in, the block list, pixel norm, SiLU, conv_out; the mean is the first
    ``latent_channels`` outputs (the last one is a shared log-variance)."""

    def __init__(self, config: LTXConfig) -> None:
        super().__init__()
        pad = config.spatial_padding_mode
        self.patch_size, self.latent_channels = config.patch_size, config.latent_channels
        width = config.encoder_base
        self.conv_in = ReplicateConv3d(3 * config.patch_size**2, width, 3, causal=True, padding_mode=pad)
        blocks: list[nn.Module] = []
        for b in config.encoder_blocks:
            if b.kind == "res_x":
                blocks.append(ResGroup(width, b.layers, pad))
            elif b.kind == "res_x_y":
                blocks.append(ResBlock(width, width * b.multiplier, "causal3d", padding_mode=pad))
                width *= b.multiplier
            elif b.kind == "compress_all":
                blocks.append(StridedDownsample(width, pad))
            else:
                ft, fs = ENCODER_STRIDES[b.kind]
                blocks.append(ResidualDownsample(width, width * b.multiplier, ft, fs, pad))
                width *= b.multiplier
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = ReplicateConv3d(width, config.latent_channels + 1, 3, causal=True, padding_mode=pad)

    def forward(self, video: Tensor) -> Tensor:
        x = self.conv_in.full(patchify(video, self.patch_size))
        for block in self.blocks:
            x = block.full(x)
        return self.conv_out.full(F.silu(pixel_norm(x)))  # the mean, then the shared log-variance

    def iter_encode(self, video: Tensor):  # type: ignore[no-untyped-def]
        """The posterior (mean, log-variance channels) of the whole clip, at once (not streamed)."""
        yield self(video)


class LTXVAE(TeacherVAE):
    """The LTX-Video VAE: ``encode`` videos to 128-channel latents, ``decode_step`` them back."""

    def __init__(self, config: LTXConfig | None = None) -> None:
        super().__init__(config or LTXConfig())


# ---------------------------------------------------------------------------------------------
# checkpoint layouts
# ---------------------------------------------------------------------------------------------
STATISTICS = "per_channel_statistics."


def _res_param(rest: str, layout: str) -> str:
    """A residual block's parameter in ``layout`` (ours: conv1.weight, norm3.weight, shortcut.bias, noise1)."""
    head, _, tail = rest.partition(".")
    if head in ("conv1", "conv2"):
        return f"{head}.conv.{tail}"
    if head == "norm3":
        return f"norm3.norm.{tail}" if layout == "original" else f"norm3.{tail}"
    if head == "shortcut":
        return f"conv_shortcut.{tail}" if layout == "original" else f"conv_shortcut.conv.{tail}"
    if head in ("noise1", "noise2"):
        return f"per_channel_scale{head[-1]}"
    if head == "scale_shift_table":
        return head
    raise KeyError(rest)


def _embedder_param(rest: str) -> str:
    return f"time_embedder.timestep_embedder.{rest}"


def decoder_names(config: LTXConfig, layout: str) -> dict[str, str]:
    """Our module prefix -> its prefix in ``layout``, for the decoder's blocks."""
    run = config.decoder_run
    diffusers: dict[int, str] = {}
    block, has_res = -1, True
    for index, b in enumerate(run):
        if index == 0:
            diffusers[index] = "mid_block"
            continue
        if has_res:
            block, has_res = block + 1, False
        if b.kind == "res_x_y":
            diffusers[index] = f"up_blocks.{block}.conv_in"
        elif b.kind == "compress_all":
            diffusers[index] = f"up_blocks.{block}.upsamplers.0"
        else:
            diffusers[index], has_res = f"up_blocks.{block}", True
    names: dict[str, str] = {}

    def theirs(index: int) -> str:
        return f"up_blocks.{index}" if layout == "original" else diffusers[index]

    structure = decoder_structure(config)
    for i, st in enumerate(structure):
        ours = "middle" if i == 0 else f"up.{i - 1}"
        j = 0
        for g, (index, count, _) in enumerate(st.groups):
            group = theirs(index)
            res = f"{group}.res_blocks" if layout == "original" else f"{group}.resnets"
            for k in range(count):
                names[f"{ours}.blocks.{j + k}"] = f"{res}.{k}"
            names[f"{ours}.embedders.{g}"] = group
            j += count
        if st.narrow:
            names[f"{ours}.resample.narrow"] = theirs(st.narrow[0])
        if st.upsample:
            names[f"{ours}.resample.conv"] = theirs(st.upsample[0])
    return names


def diffusers_encoder_groups(blocks: Sequence[Block]) -> tuple[list[list[int]], int | None]:
    """diffusers' encoder structure over our block list: down blocks (indices of a res_x and the
    transitions after it) and the mid block (the index of the final res_x; ``None`` when the list
    ends with a transition: then that last group is a down block too, and the mid block is empty)."""
    groups: list[list[int]] = []
    for k, b in enumerate(blocks):
        if b.kind == "res_x" or not groups:
            groups.append([k])
        else:
            groups[-1].append(k)
    if groups and len(groups[-1]) == 1 and blocks[groups[-1][0]].kind == "res_x":
        return groups[:-1], groups[-1][0]
    return groups, None


def encoder_names(config: LTXConfig, layout: str) -> dict[str, str]:
    """Our encoder block prefix -> its prefix in ``layout``."""
    if layout == "original":
        names = {}
        for k, b in enumerate(config.encoder_blocks):
            names[f"blocks.{k}"] = f"down_blocks.{k}.res_blocks" if b.kind == "res_x" else f"down_blocks.{k}"
        return names
    blocks = config.encoder_blocks
    downs, mid = diffusers_encoder_groups(blocks)
    names = {} if mid is None else {f"blocks.{mid}": "mid_block.resnets"}
    for down, group in enumerate(downs):
        for k in group:
            kind = blocks[k].kind
            part = {"res_x": "resnets", "res_x_y": "conv_out"}.get(kind, "downsamplers.0")
            names[f"blocks.{k}"] = f"down_blocks.{down}.{part}"
    return names


def rename_key(key: str, config: LTXConfig, layout: str, tables: dict[str, dict[str, str]]) -> str:
    """Our parameter name -> its name in ``layout`` (without the original layout's ``vae.`` prefix)."""
    side, _, rest = key.partition(".")
    if side == "decoder":
        if rest.startswith("conv_in."):
            return f"decoder.conv_in.conv.{rest[8:]}"
        if rest == "timestep_scale_multiplier":
            return "decoder.timestep_scale_multiplier"
        if rest.startswith("head."):
            part = rest[5:]
            if part.startswith("conv."):
                return f"decoder.conv_out.conv.{part[5:]}"
            if part.startswith("embedder."):
                prefix = "last_time_embedder" if layout == "original" else "time_embedder"
                return f"decoder.{prefix}.timestep_embedder.{part[9:]}"
            if part == "scale_shift_table":
                return "decoder.last_scale_shift_table" if layout == "original" else "decoder.scale_shift_table"
        m = re.fullmatch(
            r"((?:middle|up\.\d+)\.(?:blocks\.\d+|embedders\.\d+|resample\.narrow|resample\.conv))\.(.*)", rest
        )
        if m:
            prefix, param = m[1], m[2]
            theirs = tables["decoder"][prefix]
            if ".embedders." in prefix:
                return f"decoder.{theirs}.{_embedder_param(param)}"
            if prefix.endswith("resample.conv"):
                return f"decoder.{theirs}.conv.conv.{param}"
            return f"decoder.{theirs}.{_res_param(param, layout)}"
    if side == "encoder":
        if rest.startswith("conv_in.") or rest.startswith("conv_out."):
            name, _, param = rest.partition(".")
            return f"encoder.{name}.conv.{param}"
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", rest)
        if m:
            k, param = int(m[1]), m[2]
            theirs = tables["encoder"][f"blocks.{k}"]
            kind = config.encoder_blocks[k].kind
            if kind == "res_x":
                j, _, p = param.removeprefix("blocks.").partition(".")
                return f"encoder.{theirs}.{j}.{_res_param(p, layout)}"
            if kind == "res_x_y":
                return f"encoder.{theirs}.{_res_param(param, layout)}"
            if kind == "compress_all":  # a plain causal conv: one .conv level
                return f"encoder.{theirs}.{param}"
            return f"encoder.{theirs}.conv.{param}"
    raise KeyError(f"no name for parameter {key}")


def statistics_keys(layout: str) -> dict[str, str]:
    """Statistic -> its tensor name: the latent mean and std a checkpoint carries beside its weights."""
    if layout == "original":
        return {"mean": f"vae.{STATISTICS}mean-of-means", "std": f"vae.{STATISTICS}std-of-means"}
    if layout == "diffusers":
        return {"mean": "latents_mean", "std": "latents_std"}
    return {}


def original_config(metadata: Mapping) -> dict:
    """The VAE config from an original single file's safetensors metadata (``config`` -> ``vae``)."""
    raw = metadata.get("config")
    if raw is None:
        return {}
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except (json.JSONDecodeError, RecursionError):  # RecursionError: arrays nested past Python's stack
        raise CheckpointError("the checkpoint's 'config' metadata is not valid JSON") from None
    vae = data.get("vae", data) if isinstance(data, dict) else None
    if not isinstance(vae, dict):
        raise CheckpointError("the checkpoint's 'config' metadata holds no VAE configuration")
    return vae


def _bool(config: Mapping, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"config field {key}={value!r} must be true or false"[:200])
    return value


def _int_list(
    config: Mapping, key: str, default: Sequence[Any], kind: type = int, max_len: int = 8, hi: int = 1 << 16
) -> list[Any]:
    """A list field of an untrusted config; integers in [0, ``hi``] (block counts share the
    original layout's cap of 64 per block, so both layouts accept the same models)."""
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= max_len:
        raise CheckpointError(f"config field {key} must be a list of 1 to {max_len} entries, got {value!r}"[:200])
    for v in value:
        ok = isinstance(v, bool) if kind is bool else (isinstance(v, kind) and not isinstance(v, bool))
        if not ok:
            raise CheckpointError(f"config field {key} must hold {kind.__name__} values, got {value!r}"[:200])
        if kind is int and not 0 <= v <= hi:
            raise CheckpointError(f"config field {key} must hold integers in [0, {hi}], got {value!r}"[:200])
    return list(value)


def config_from_original(vae: Mapping) -> dict[str, Any]:
    """Our configuration fields from an upstream (``CausalVideoAutoencoder``) config."""
    cls = vae.get("_class_name", "CausalVideoAutoencoder")
    if cls != "CausalVideoAutoencoder":
        raise CheckpointError(f"the checkpoint's VAE is a {cls!r}, not an LTX-Video CausalVideoAutoencoder"[:200])
    if vae.get("dims", 3) not in (3, [2, 1], (2, 1)) or vae.get("dims", 3) != 3:
        raise CheckpointError(f"only 3D LTX-Video VAEs are supported (dims {vae.get('dims')!r})"[:200])
    if vae.get("norm_layer", "pixel_norm") != "pixel_norm":
        raise CheckpointError(
            f"only pixel_norm LTX-Video VAEs are supported (norm_layer {vae.get('norm_layer')!r})"[:200]
        )
    if vae.get("latent_log_var", "uniform") != "uniform" or vae.get("use_quant_conv", False):
        raise CheckpointError("only LTX-Video VAEs with latent_log_var 'uniform' and no quant conv are supported")
    if any(vae.get(k, 3) != 3 for k in ("in_channels", "out_channels")):
        raise CheckpointError("only RGB LTX-Video VAEs (in/out_channels 3) are supported")
    both = vae.get("blocks")
    enc, dec = vae.get("encoder_blocks", both), vae.get("decoder_blocks", both)
    for name, items in (("encoder_blocks", enc), ("decoder_blocks", dec)):
        if not isinstance(items, list) or not 0 < len(items) <= MAX_BLOCKS:
            raise CheckpointError(f"the VAE config's {name} must be a list of 1 to {MAX_BLOCKS} blocks")
    padding = vae.get("spatial_padding_mode", "zeros")
    if padding not in ("zeros", "reflect", "replicate", "circular"):
        raise CheckpointError(f"unknown spatial_padding_mode {padding!r}"[:200])
    return {
        "latent_channels": config_int(vae, "latent_channels", 128, 1, 4096),
        "patch_size": config_int(vae, "patch_size", 4, 1, 16),
        "encoder_base": config_int(vae, "encoder_base_channels", 128, 1, 8192),
        "decoder_base": config_int(vae, "decoder_base_channels", 128, 1, 8192),
        "encoder_blocks": tuple(Block.from_item(b, "encoder") for b in enc),
        "decoder_blocks": tuple(Block.from_item(b, "decoder") for b in dec),
        "timestep_conditioning": _bool(vae, "timestep_conditioning", False),
        "causal_decoder": _bool(vae, "causal_decoder", False),
        "spatial_padding_mode": padding,
    }


def config_from_diffusers(c: Mapping) -> dict[str, Any]:
    """Our configuration fields from an ``AutoencoderKLLTXVideo`` config.json."""
    boc = _int_list(c, "block_out_channels", (128, 256, 512, 512))
    layers = _int_list(c, "layers_per_block", (4, 3, 3, 3, 4), max_len=9, hi=MAX_LAYERS)
    spatio = _int_list(c, "spatio_temporal_scaling", (True, True, True, False), bool)
    types = c.get("down_block_types", ["LTXVideoDownBlock3D"] * len(boc))
    down_type = _int_list(c, "downsample_type", ("conv",) * len(boc), str)
    v095 = isinstance(types, list) and bool(types) and types[-1] == "LTXVideo095DownBlock3D"
    n = len(boc) - (1 if v095 else 0)
    if len(layers) != n + 1 or len(spatio) < n:
        raise CheckpointError("config.json: layers_per_block must have one entry per down block plus the mid block")
    enc: list[Block] = []
    width = boc[0]
    for i in range(n):
        out = boc[i + 1] if v095 else (boc[i + 1] if i + 1 < n else boc[i])
        enc.append(Block("res_x", layers[i]))
        if v095:
            if spatio[i]:
                kind = DOWNSAMPLE_FROM_DIFFUSERS.get(down_type[i])
                if kind is None or out % width:
                    raise CheckpointError(f"config.json: unsupported encoder downsampler {down_type[i]!r}"[:200])
                enc.append(Block(kind, multiplier=out // width))
                width = out
        else:
            if spatio[i]:
                enc.append(Block("compress_all"))
            if out != width:
                if out % width:
                    raise CheckpointError("config.json: encoder widths must grow by integer factors")
                enc.append(Block("res_x_y", multiplier=out // width))
                width = out
    if layers[-1]:  # an empty mid block: the encoder ends with its last down block's transitions
        enc.append(Block("res_x", layers[-1]))
    dboc = _int_list(c, "decoder_block_out_channels", (128, 256, 512, 512))[::-1]
    dlayers = _int_list(c, "decoder_layers_per_block", (4, 3, 3, 3, 4), max_len=9, hi=MAX_LAYERS)[::-1]
    dspatio = _int_list(c, "decoder_spatio_temporal_scaling", (True, True, True, False), bool)[::-1]
    noise = _int_list(c, "decoder_inject_noise", (False,) * (len(dboc) + 1), bool, max_len=9)[::-1]
    residual = _int_list(c, "upsample_residual", (False,) * len(dboc), bool)[::-1]
    factor = _int_list(c, "upsample_factor", (1,) * len(dboc), hi=8)[::-1]
    m = len(dboc)
    if len(dlayers) != m + 1 or len(noise) != m + 1 or len(dspatio) != m or len(residual) != m or len(factor) != m:
        raise CheckpointError("config.json: the decoder lists must have one entry per up block (layers: plus one)")
    run: list[Block] = [Block("res_x", dlayers[0], inject_noise=noise[0])]
    output = dboc[0]
    for i in range(m):
        if factor[i] < 1:
            raise CheckpointError("config.json: upsample_factor entries must be positive")
        inp, out = output // factor[i], dboc[i] // factor[i]
        if inp != out:
            if factor[i] != 1 or inp % out:
                raise CheckpointError("config.json: unsupported decoder up block (width change with channel reduction)")
            run.append(Block("res_x_y", multiplier=inp // out))
        if dspatio[i]:
            run.append(Block("compress_all", residual=residual[i], multiplier=factor[i]))
        run.append(Block("res_x", dlayers[i + 1], inject_noise=noise[i + 1]))
        output = out
    top = dboc[0]
    mult = 1
    for b in run:
        if b.kind in ("res_x_y", "compress_all"):
            mult *= b.multiplier
    if top % mult:
        raise CheckpointError("config.json: decoder widths do not follow from one base width")
    if c.get("patch_size_t", 1) != 1:
        raise CheckpointError("only LTX-Video VAEs with patch_size_t 1 are supported")
    if c.get("encoder_causal", True) is not True:
        raise CheckpointError("only LTX-Video VAEs with a causal encoder are supported")
    return {
        "latent_channels": config_int(c, "latent_channels", 128, 1, 4096),
        "patch_size": config_int(c, "patch_size", 4, 1, 16),
        "encoder_base": boc[0],
        "decoder_base": top // mult,
        "encoder_blocks": tuple(enc),
        "decoder_blocks": tuple(run[::-1]),
        "timestep_conditioning": _bool(c, "timestep_conditioning", False),
        "causal_decoder": _bool(c, "decoder_causal", False),
    }


def diffusers_config(config: LTXConfig) -> dict[str, Any]:
    """config.json of the ``AutoencoderKLLTXVideo`` that holds ``config`` (refused if none can)."""
    unfit = CheckpointError(f"this LTX-Video architecture ({config.generation}) has no diffusers equivalent")
    if config.spatial_padding_mode != "zeros":  # diffusers' LTX convs pad with zeros, and its config has no key
        raise unfit
    blocks = config.encoder_blocks
    downs, mid = diffusers_encoder_groups(blocks)
    groups = [[blocks[k] for k in g] for g in downs]
    if any(g[0].kind != "res_x" for g in groups):
        raise unfit
    v095 = any(b.kind.endswith("_res") for b in blocks)
    width, inputs, outputs = config.encoder_base, [], []
    layers, spatio, down = [], [], []
    for g in groups:
        inputs.append(width)
        layers.append(g[0].layers)
        kinds = [b.kind for b in g[1:]]
        spatio.append(any(k.startswith("compress") for k in kinds))
        if v095:  # a 0.9.5 down block: resnets, then at most one space-to-depth downsampler
            if len(kinds) > 1 or any(k not in DIFFUSERS_DOWNSAMPLE for k in kinds):
                raise unfit
        elif kinds not in ([], ["compress_all"], ["res_x_y"], ["compress_all", "res_x_y"]):
            raise unfit
        for b in g[1:]:
            if b.kind == "res_x_y" or b.kind.endswith("_res"):
                width *= b.multiplier
        down.append(DIFFUSERS_DOWNSAMPLE[kinds[0]] if v095 and kinds else "conv")  # read where spatio is true
        outputs.append(width)
    layers.append(blocks[mid].layers if mid is not None else 0)  # the mid block (empty after a transition)
    if v095:
        boc = [config.encoder_base, *outputs]
    else:
        boc = inputs
        if outputs[-1] != inputs[-1] or any(o != i for o, i in zip(outputs[:-1], inputs[1:], strict=True)):
            raise unfit
    run = config.decoder_run
    dboc, dlayers, dspatio, residual, factor = [], [run[0].layers], [], [], []
    noise = [run[0].inject_noise]
    output, i = config.decoder_top_width, 1
    while i < len(run):
        narrow = run[i] if run[i].kind == "res_x_y" else None
        i += narrow is not None
        up = run[i] if run[i].kind == "compress_all" else None
        i += up is not None
        f = up.multiplier if up else 1
        if narrow is not None and f != 1:
            raise unfit
        out = output // (narrow.multiplier if narrow else 1) // f
        dboc.append(out * f)
        dspatio.append(up is not None)
        residual.append(bool(up and up.residual))
        factor.append(f)
        dlayers.append(run[i].layers)
        noise.append(run[i].inject_noise)
        output, i = out, i + 1
    if dboc[0] != config.decoder_top_width:
        raise unfit
    return {
        "_class_name": "AutoencoderKLLTXVideo",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": config.latent_channels,
        "block_out_channels": boc,
        "down_block_types": ["LTXVideo095DownBlock3D" if v095 else "LTXVideoDownBlock3D"] * len(spatio),
        "layers_per_block": layers,
        "spatio_temporal_scaling": spatio,
        "downsample_type": down,
        "decoder_block_out_channels": dboc[::-1],
        "decoder_layers_per_block": dlayers[::-1],
        "decoder_spatio_temporal_scaling": dspatio[::-1],
        "decoder_inject_noise": noise[::-1],
        "upsample_residual": residual[::-1],
        "upsample_factor": factor[::-1],
        "timestep_conditioning": config.timestep_conditioning,
        "patch_size": config.patch_size,
        "patch_size_t": 1,
        "resnet_norm_eps": 1e-6,
        "scaling_factor": 1.0,
        "encoder_causal": True,
        "decoder_causal": config.causal_decoder,
    }


class LTXFamily(Family):
    name: ClassVar[str] = "ltx"
    title: ClassVar[str] = "LTX-Video VAE"
    diffusers_vae: ClassVar[str] = "AutoencoderKLLTXVideo"
    embedded_teacher: ClassVar[str | None] = "ltx-tiny.safetensors"
    config_type: ClassVar[type] = LTXConfig
    teacher_type: ClassVar[type] = LTXVAE
    default_resolution: ClassVar[tuple[int, int]] = (512, 768)
    ops: ClassVar[tuple[str, ...]] = ("conv3d", "causal3d", "dwsep3d", "spatial2d")

    markers: ClassVar[dict[str, str]] = {
        "original": "vae.decoder.conv_in.conv.weight",
        "diffusers": "decoder.conv_in.conv.weight",
        "flashvaed": "decoder.head.conv.weight",
    }

    def layouts_present(self, keys: Collection[str]) -> dict[str, str]:
        # our own layout is recognised by its metadata (``detect``), its names overlap the Wan families'
        return {layout: key for layout, key in self.markers.items() if key in keys and layout != "flashvaed"}

    def detect(self, keys: Collection[str], tensors: Mapping[str, Tensor], config: Mapping) -> list[Match]:
        matches = []
        if self.markers["original"] in keys:
            matches.append(Match(self, "original", self.markers["original"]))
        if self.markers["diffusers"] in keys:
            evidence = "decoder.mid_block.resnets.0.conv1.conv.weight"
            if evidence in keys:
                matches.append(Match(self, "diffusers", evidence))
        if "decoder.head.conv.weight" in keys and our_metadata(config)[0] == self.name:
            matches.append(Match(self, "flashvaed", "flashvaed.family metadata: ltx"))
        from .ltx_release import MARKER

        official = any_key(keys, MARKER)
        if official and "decoder.conv_in.conv.weight" in keys:  # the Flash-VAED release's student
            matches.append(Match(self, "official", official, student=True))
        return matches

    def read_student(
        self, tensors: Mapping[str, Tensor], layout: str, config: Mapping, where: str
    ) -> tuple[Any, dict[str, Tensor]]:
        from .ltx_release import read_student  # the one student layout: "official" (see ``detect``)

        return read_student(self, tensors, where)

    def config_tensor_keys(self, layout: str, keys: Collection[str]) -> set[str]:
        """Checkpoint tensors that hold configuration (statistics), read by ``infer_config``."""
        if layout == "original":
            return {k for k in keys if k.startswith(f"vae.{STATISTICS}") or not k.startswith("vae.")}
        return set(statistics_keys(layout).values()) & set(keys)

    def infer_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> LTXConfig:
        if layout == "flashvaed":
            _, ours = our_metadata(config)
            if not ours:
                raise CheckpointError(
                    "an LTX-Video checkpoint in flashvaed's layout needs its flashvaed.config metadata"
                )
            try:
                return LTXConfig.from_dict(ours)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"its flashvaed.config metadata is inconsistent: {e}") from None
        if layout == "original":
            vae = original_config(config)
            if not vae:
                raise CheckpointError(
                    "an LTX-Video single-file checkpoint needs its VAE configuration in the safetensors metadata "
                    "('config' -> 'vae')"
                )
            fields = config_from_original(vae)
        else:
            fields = config_from_diffusers(config)
        z = fields["latent_channels"]
        mean, std = [], []
        for name, key in statistics_keys(layout).items():
            t = tensors.get(key)
            if t is None:
                raise CheckpointError(f"the checkpoint lacks the latent statistics tensor {key}")
            if tuple(t.shape) != (z,) or not t.is_floating_point() or not torch.isfinite(t).all():
                raise CheckpointError(f"{key} must hold {z} finite values, got shape {tuple(t.shape)}")
            if name == "std" and (t <= 0).any():  # latents are divided by it
                raise CheckpointError(f"{key} must be positive, it holds {float(t.min())}")
            (mean if name == "mean" else std).extend(float(v) for v in t)
        try:
            return LTXConfig(**fields, latents_mean=tuple(mean), latents_std=tuple(std))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"inconsistent VAE configuration: {e}") from None

    def key_names(self, model: nn.Module, layout: str) -> dict[str, str]:
        keys = model.state_dict()
        if layout == "flashvaed":
            return {k: k for k in keys}
        config = model.config  # type: ignore[attr-defined]
        tables = {"decoder": decoder_names(config, layout), "encoder": encoder_names(config, layout)}
        prefix = "vae." if layout == "original" else ""
        return {k: prefix + rename_key(k, config, layout, tables) for k in keys}

    def config_tensors(self, config: LTXConfig, layout: str) -> dict[str, Tensor]:
        """The statistics tensors a checkpoint in ``layout`` carries."""
        keys = statistics_keys(layout)
        if not keys:
            return {}
        return {
            keys["mean"]: torch.tensor(config.latents_mean, dtype=torch.float32),
            keys["std"]: torch.tensor(config.latents_std, dtype=torch.float32),
        }

    def file_metadata(self, config: LTXConfig, layout: str) -> dict[str, str] | None:
        if layout != "original":
            return None
        vae = {
            "_class_name": "CausalVideoAutoencoder",
            "dims": 3,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": config.latent_channels,
            "encoder_blocks": [b.to_item() for b in config.encoder_blocks],
            "decoder_blocks": [b.to_item() for b in config.decoder_blocks],
            "encoder_base_channels": config.encoder_base,
            "decoder_base_channels": config.decoder_base,
            "scaling_factor": 1.0,
            "norm_layer": "pixel_norm",
            "patch_size": config.patch_size,
            "latent_log_var": "uniform",
            "use_quant_conv": False,
            "causal_decoder": config.causal_decoder,
            "timestep_conditioning": config.timestep_conditioning,
            "spatial_padding_mode": config.spatial_padding_mode,
        }
        return {"config": json.dumps({"vae": vae})}

    def diffusers_config(self, config: LTXConfig) -> dict[str, Any]:
        return diffusers_config(config)

    def describe(self, config: LTXConfig) -> str:
        return (
            f"generation {config.generation}, decoder width {config.decoder_top_width}, "
            f"latent_channels {config.latent_channels}"
        )

    def teacher_layout(self, config: LTXConfig) -> DecoderLayout:
        return teacher_layout(config)

    def upgrade_student_layout(self, layout: dict[str, Any], version: int) -> dict[str, Any]:
        """Before format 2 LTX decoders ignored ``shortcut`` (a spatial2d stage had it set but built none)."""
        if version >= 2:
            return layout
        stages = {k: {**layout[k], "shortcut": False} for k in ("middle",) if isinstance(layout.get(k), dict)}
        up = [{**st, "shortcut": False} if isinstance(st, dict) else st for st in layout.get("up", [])]
        return {**layout, **stages, "up": up}

    def build_decoder(self, config: LTXConfig, layout: DecoderLayout, student: bool = False) -> nn.Module:
        return LTXDecoder(config, layout, student)

    def build_encoder(self, config: LTXConfig) -> nn.Module:
        return LTXEncoder(config)


LTX = register(LTXFamily())
LTXVAE.family_def = LTX
