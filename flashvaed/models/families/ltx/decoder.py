"""The LTX-Video VAE decoder: conv_in, stages (middle, up.0, ...), head; a pure step on a clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....errors import InputError
from ...coupling import D2S_ROWS, ChannelFlow, Group
from ...layout import DecoderLayout, StageLayout
from ...streaming import State, StateSpec, conditioning_inputs
from ..base import (
    unpatchify,
)
from .blocks import (
    Clock,
    DelayLine,
    DepthwiseSeparable,
    PixelNorm,
    ReplicateConv3d,
    ResBlock,
    Site,
    Span,
    StepContext,
    StepPlan,
    TimestepEmbedder,
    idle,
    make_conv,
    modulation,
    planned,
    spread,
    take,
    window,
)
from .config import LTXConfig, StageStructure, decoder_structure, teacher_layout

DEFAULT_TIMESTEP = 0.05  # the released pipelines' decode_timestep
DEFAULT_NOISE_SCALE = 0.025  # ... and decode_noise_scale


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
        self.skip.timeline = (rate, offset)
        rate, offset = self.conv.set_timeline(rate, offset)
        self.conv_out = (rate, offset)
        self.span: Span = (start, (2 * rate, 2 * offset + 1))
        return self.span[1]  # depth-to-space doubles positions; the first frame is dropped: an offset

    def index_sites(self) -> list[Site]:
        """The gather of its windowed steps (``StepPlan``): the output window of depth-to-space's positions."""
        return [Site.doubled(self.conv_out, self.span[1])]

    def forward(self, x: Tensor, state: State, context: StepContext) -> tuple[Tensor, State]:
        clock = context.clock
        if idle(clock, self.span, x):
            b, _, _, h, w = x.shape
            return x.new_empty(b, self.conv.out_channels // 8, 0, 2 * h, 2 * w), tuple(state)
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
        if clock.full:
            y = y[:, :, 1:]
        elif clock.narrow:  # the conv's window [c, d) became positions [2c, 2d): keep the output window's
            index = planned(clock, Site.doubled(self.conv_out, self.span[1]))
            if index is not None:
                return y.index_select(2, index), tuple(states)
            c, _ = window(clock, *self.conv_out)
            lo, hi = window(clock, *self.span[1])
            y = take(y, lo - 2 * c, hi - 2 * c)
        return y, tuple(states)


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
        if idle(context.clock, self.span, x):
            b, _, _, h, w = x.shape
            conv = self.conv.pointwise if isinstance(self.conv, DepthwiseSeparable) else self.conv
            return x.new_empty(b, conv.out_channels, 0, h, w), tuple(state)
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
        windows: bool = True,
        clip_only: bool = False,
    ) -> tuple[Tensor, State]:
        """One step (``full``: the whole clip in upstream's one-shot form). ``windows=False`` makes every
        layer compute its whole step (static shapes with tensor clocks, for compilers that need them);
        the frames of the clip are the same either way. ``clip_only``: return only the step's frames of
        the clip (its output window), not placed among its positions: a flush that runs the rest of a
        stream's latency in one step returns its few frames, not zeros for every position."""
        clock = Clock(position, end, full, x.shape[2], windows)
        context = self.context(x.shape[0], clock, timestep, noise, x.device)
        if clock.narrow and clock.traced:  # every gather index of the step at once
            sites = {s for m in self.modules() if hasattr(m, "index_sites") for s in m.index_sites()}
            object.__setattr__(clock, "plan", StepPlan(clock, sorted(sites | {Site.window_of(1, 0)}), x.device))
        if clock.narrow:
            index = planned(clock, Site.window_of(1, 0))
            x = take(x, *window(clock, 1, 0)) if index is None else x.index_select(2, index)
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
        frames = unpatchify(x, self.patch_size)
        rate, offset = self.head.span[1]
        if clip_only and not full and not clock.narrow:  # the whole step was computed: keep the clip's part
            frames = take(frames, *window(replace(clock, windows=True), rate, offset))
        elif clock.narrow and not clip_only:  # the window's frames in the step's positions (the stream keeps those)
            frames = spread(frames, *window(clock, rate, offset), rate * clock.frames)
        return frames, tuple(states)
