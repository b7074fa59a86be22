"""The Wan2.2 (TI2V-5B) VAE family: 48 latent channels, 4x16x16 compression.

What changes from Wan2.1 (facts: ../shared/docs/wan22-vae.md in the planning repo):
- frames are patchified 2x2 into 12 channels before the encoder and the decoder's 12 output
  channels are unpatchified back (channel ``c*4 + r*2 + q``, r the column and q the row offset);
- a separate, wider decoder (``decoder_base_dim``, 256 released) whose upsample convs keep the
  width, and whose first three up stages add a parameter-free shortcut of their input
  (``DupUp3D``: repeat channels, then depth-to-space in time and space; on the first chunk it
  drops its first factor_t - 1 frames, as the temporal upsampler passes that chunk through);
- the encoder's down stages add the mirror shortcut (``AvgDown3D``: space/time-to-depth, then the
  mean over consecutive channel groups);
- nested checkpoint keys (``decoder.upsamples.i.upsamples.j``), the real 48-value statistics.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import CheckpointError
from ..blocks import Downsample, ResidualBlock, Stage, exporting, fast_eager, is_channels_last, observed
from ..coupling import ChannelFlow, Group
from ..layout import DecoderLayout, StageLayout, channel_spaces
from ..streaming import State, StreamingBlock, run_blocks
from ..vae import TeacherVAE
from .base import check_int, config_int, conv_shape, patchify, register, tiny_statistics, unpatchify
from .wan21 import LAYOUT_KEYS, Rule, WanConfig, WanDecoder, WanEncoder, WanFamily, resample_name, residual_name

# fmt: off
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
# fmt: on


@dataclass(frozen=True)
class Wan22Config(WanConfig):
    """Architecture of a Wan2.2-style VAE; the defaults are the released TI2V-5B one."""

    base_dim: int = 160
    decoder_base_dim: int | None = 256
    z_dim: int = 48
    latents_mean: tuple[float, ...] = field(default=WAN22_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=WAN22_LATENTS_STD)
    patch_size: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("patch_size", self.patch_size, 1, 8)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size


class DupUp3D(nn.Module):
    """The decoder's parameter-free shortcut: each input channel repeated ``repeats`` times, read
    as (t, y, x) sub-positions of the output channels (depth-to-space).

    ``repeats`` is the teacher's (out * factor / in). A pruned student keeps it and reads only the
    input channels its kept outputs need: ``sources`` (a buffer, set by pruning) picks them when
    fewer than all input channels are read.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int, repeats: int) -> None:
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        self.factor = factor_t * factor_s * factor_s
        self.in_channels, self.out_channels, self.repeats = in_channels, out_channels, repeats
        if (out_channels * self.factor) % repeats:
            raise ValueError(f"DupUp3D: {out_channels} x {self.factor} output slots do not split into {repeats}s")
        reads = out_channels * self.factor // repeats
        if reads > in_channels:
            raise ValueError(f"DupUp3D: {out_channels} outputs read {reads} channels, the input has {in_channels}")
        self.reads = reads
        self.sources: Tensor | None
        if reads < in_channels:
            self.register_buffer("sources", torch.arange(reads))
        else:
            self.sources = None

    def teacher_sources(self, out_channel: int) -> list[int]:
        """The input channels output channel ``out_channel`` reads, in slot order."""
        return [(out_channel * self.factor + k) // self.repeats for k in range(0, self.factor, self.repeats)]

    def forward(self, x: Tensor, first: bool) -> Tensor:
        if self.sources is not None and is_channels_last(x):  # gather along the innermost axis: no
            x = x.permute(0, 2, 3, 4, 1).index_select(4, self.sources).permute(0, 4, 1, 2, 3)  # contiguous copy
        elif self.sources is not None:
            x = x.index_select(1, self.sources)
        b, c, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        if self.nearest and exporting():  # frames as channels of a 2D nearest Resize, then whole frames
            # repeated: two fast ops on any runtime (the 8D transpose below took ONNX Runtime 6x as long)
            up = F.interpolate(x.reshape(b, c * t, h, w), scale_factor=fs, mode="nearest")
            up = up.reshape(b, c, t, 1, h * fs * w * fs).expand(b, c, t, ft, h * fs * w * fs)
            up = up.reshape(b, c, t * ft, h * fs, w * fs)
            return up[:, :, ft - 1 :] if first else up
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w)  # repeat_interleave along channels
        x = x.reshape(b, self.out_channels, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first else x

    @property
    def nearest(self) -> bool:
        """Every output channel reads its own input channel in every slot: a nearest upsampling in
        time and space (Wan2.2's full-width stream)."""
        return self.sources is None and self.repeats == self.factor and self.out_channels == self.in_channels

    def add_to(self, y: Tensor, x: Tensor, first: bool) -> Tensor:
        """``y + self(x, first)``, possibly written into ``y`` (which nothing else may hold). Where the
        shortcut is ``nearest`` and nothing needs gradients, ``x`` is added in place through a
        broadcast view of ``y``: no upsampled copy, which at up1 is two 128 MB passes per chunk (the
        same sums, exactly)."""
        b, c, t, h, w = x.shape
        ft, fs = self.factor_t, self.factor_s
        if not (self.nearest and fast_eager() and not first and y.shape == (b, c, t * ft, h * fs, w * fs)):
            return y + self(x, first)
        try:
            grid = y.view(b, c, t, ft, h, fs, w, fs)  # y's own memory: contiguous or channels-last
        except RuntimeError:  # another layout: the plain sum
            return y + self(x, first)
        grid.add_(x[:, :, :, None, :, None, :, None])
        return y


class ResidualUpStage(Stage):
    """An up stage whose output adds a ``DupUp3D`` of its input (Wan2.2's ``Up_ResidualBlock``)."""

    def __init__(self, blocks: list[StreamingBlock], resample: StreamingBlock | None, shortcut: DupUp3D | None) -> None:
        super().__init__(blocks, resample)
        self.shortcut = shortcut

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        y, state = run_blocks(self.sequence(), x, state, first)
        if self.shortcut is None:
            return y, state
        if self.shortcut.nearest and not any(observed(m) for m in self.sequence()[-1].modules()):
            return self.shortcut.add_to(y, x, first), state  # no hook holds y: it may be written into
        return y + self.shortcut(x, first), state

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        out = super().channel_flow(flow, path, stage, stream)
        if self.shortcut is None:
            return out
        return flow.couple(stream, out, f"{path}.shortcut", self.shortcut.teacher_sources)


class AvgDown3D(nn.Module):
    """The encoder's parameter-free shortcut: zero-pad time in front to a multiple of factor_t,
    space/time-to-depth (channel ``c*f + t*fs*fs + y*fs + x``), mean over consecutive groups."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if (in_channels * factor) % out_channels:
            raise ValueError(f"AvgDown3D: {in_channels} x {factor} channels do not split into {out_channels} groups")
        self.out_channels, self.group = out_channels, in_channels * factor // out_channels

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class ResidualDownStage(Stage):
    """A down stage whose output adds an ``AvgDown3D`` of its input (Wan2.2's ``Down_ResidualBlock``)."""

    def __init__(self, blocks: list[StreamingBlock], resample: StreamingBlock | None, shortcut: AvgDown3D) -> None:
        super().__init__(blocks, resample)
        self.shortcut = shortcut

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        y, state = run_blocks(self.sequence(), x, state, first)
        return y + self.shortcut(x), state


def teacher_layout(config: Wan22Config) -> DecoderLayout:
    """Causal 3D convs at full width; upsample convs keep the width; 3p^2 output channels."""
    widths = config.decoder_widths
    nrb = config.num_res_blocks
    last = len(config.dim_mult) - 1
    up = [
        StageLayout(
            op="causal3d",
            in_width=in_dim,
            width=out_dim,
            hidden=(out_dim,) * (nrb + 1),
            resample_width=out_dim if i < last else None,
            temporal=2 if i < last and config.temporal_upsample[i] else 1,
        )
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(widths))
    ]
    middle = StageLayout("causal3d", widths[0], widths[0], (widths[0], widths[0]))
    # a DupUp from a stage's input to its output of the same width is an identity map: one space
    joins = [st.resample_width == st.in_width for st in up]
    spaces = channel_spaces(up, joins)
    out = 3 * config.patch_size**2
    return DecoderLayout(
        config.z_dim, middle, tuple(up), widths[0], widths[0], out_channels=out, family=Wan22Family.name, spaces=spaces
    )


class Wan22Decoder(WanDecoder):
    """Wan2.1's decoder with DupUp shortcuts on the upsampling stages and an unpatchified output."""

    def __init__(self, config: Wan22Config, layout: DecoderLayout) -> None:
        # the teacher's widths fix each DupUp's repeats, also in students (a plain attribute, set
        # before the base class builds the stages: nn.Module allows it)
        self.teacher = teacher_layout(config)
        super().__init__(layout)
        self.patch_size = config.patch_size
        self.spatial_factor *= config.patch_size

    def up_stage(self, index: int, st: StageLayout) -> StreamingBlock:
        stage = super().up_stage(index, st)
        shortcut = None
        if st.resample_width is not None:
            ft, fs = st.temporal, 2
            t = self.teacher.up[index]
            repeats = t.resample_width * ft * fs * fs // t.in_width
            shortcut = DupUp3D(st.in_width, st.resample_width, ft, fs, repeats)
        return ResidualUpStage(list(stage.blocks), stage.resample, shortcut)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        y, state = super().forward(x, state, first)
        return unpatchify(y, self.patch_size), state


class Wan22Encoder(WanEncoder):
    """Patchify, then Wan2.1's encoder with AvgDown shortcuts on the down stages."""

    def __init__(self, config: Wan22Config) -> None:
        super().__init__(config, in_channels=3 * config.patch_size**2)
        self.patch_size = config.patch_size

    def down_stage(self, index: int, in_dim: int, out_dim: int, config: WanConfig, resample: bool) -> StreamingBlock:
        temporal = resample and config.temporal_downsample[index]
        blocks = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(config.num_res_blocks)]
        shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if resample else 1)
        return ResidualDownStage(blocks, Downsample(out_dim, temporal) if resample else None, shortcut)

    def iter_encode(self, video: Tensor):  # type: ignore[override]
        return super().iter_encode(patchify(video, self.patch_size))


class Wan22VAE(TeacherVAE):
    """The Wan2.2 (TI2V-5B) VAE: ``encode`` videos to 48-channel latents, ``decode_step`` them back."""

    def __init__(self, config: Wan22Config | None = None) -> None:
        super().__init__(config or Wan22Config())


def stage_rules(layout: str, nrb: int) -> list[Rule]:
    """Wan2.2's stages are nested in both external layouts."""
    orig = layout == "original"
    return [
        (
            r"encoder\.down\.(\d+)\.blocks\.(\d+)\.(.*)",
            lambda m: (
                (
                    f"encoder.downsamples.{m[1]}.downsamples.{m[2]}."
                    if orig
                    else f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."
                )
                + residual_name(m[3], layout)
            ),
        ),
        (
            r"encoder\.down\.(\d+)\.resample\.(conv|time_conv)\.(.*)",
            lambda m: (
                (
                    f"encoder.downsamples.{m[1]}.downsamples.{nrb}."
                    if orig
                    else f"encoder.down_blocks.{m[1]}.downsampler."
                )
                + f"{resample_name(m[2])}.{m[3]}"
            ),
        ),
        (
            r"decoder\.up\.(\d+)\.blocks\.(\d+)\.(.*)",
            lambda m: (
                (f"decoder.upsamples.{m[1]}.upsamples.{m[2]}." if orig else f"decoder.up_blocks.{m[1]}.resnets.{m[2]}.")
                + residual_name(m[3], layout)
            ),
        ),
        (
            r"decoder\.up\.(\d+)\.resample\.(conv|time_conv)\.(.*)",
            lambda m: (
                (f"decoder.upsamples.{m[1]}.upsamples.{nrb + 1}." if orig else f"decoder.up_blocks.{m[1]}.upsampler.")
                + f"{resample_name(m[2])}.{m[3]}"
            ),
        ),
    ]


class Wan22Family(WanFamily):
    name: ClassVar[str] = "wan2.2"
    title: ClassVar[str] = "Wan2.2 VAE"
    config_type: ClassVar[type] = Wan22Config
    teacher_type: ClassVar[type] = Wan22VAE
    default_resolution: ClassVar[tuple[int, int]] = (704, 1280)
    embedded_teacher: ClassVar[str | None] = "wan22-tiny.safetensors"
    order: ClassVar[int] = 20
    residual: ClassVar[bool] = True
    official_layout: ClassVar[bool] = False
    original_marker: ClassVar[str] = r"decoder\.upsamples\.\d+\.upsamples\..*"
    diffusers_marker: ClassVar[str] = r"decoder\.up_blocks\.\d+\.upsampler\..*"

    def owns_head(self, head: Tensor) -> bool:
        channels = head.shape[0] if head.dim() == 5 else 0
        p = math.isqrt(channels // 3)
        return p > 1 and 3 * p * p == channels

    def extra_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> dict[str, Any]:
        out = conv_shape(tensors, LAYOUT_KEYS[layout][2])[0]
        p = config_int(config, "patch_size", math.isqrt(out // 3), 1, 8)
        if 3 * p * p != out:
            raise CheckpointError(f"the decoder emits {out} channels, not 3 x {p}^2 for patch size {p}")
        return {"patch_size": p}

    def stage_rules(self, layout: str, nrb: int) -> list[Rule]:
        return stage_rules(layout, nrb)

    def diffusers_config(self, config: Wan22Config) -> dict[str, Any]:
        p = config.patch_size
        return {
            **super().diffusers_config(config),
            "is_residual": True,
            "in_channels": 3 * p * p,
            "out_channels": 3 * p * p,
            "patch_size": p,
            "scale_factor_temporal": config.temporal_factor,
            "scale_factor_spatial": config.spatial_factor,
        }

    def describe(self, config: Wan22Config) -> str:
        return f"{super().describe(config)}, patch_size {config.patch_size}"

    def tiny_config(self) -> Wan22Config:
        """The width floor, one residual block per stage, patch size 2 and the DupUp/AvgDown shortcuts."""
        return Wan22Config(base_dim=4, decoder_base_dim=4, z_dim=4, num_res_blocks=1, **tiny_statistics(4))

    def teacher_layout(self, config: Wan22Config) -> DecoderLayout:
        return teacher_layout(config)

    def build_decoder(self, config: Wan22Config, layout: DecoderLayout, student: bool = False) -> nn.Module:
        return Wan22Decoder(config, layout)

    def build_encoder(self, config: Wan22Config) -> nn.Module:
        return Wan22Encoder(config)


WAN22 = register(Wan22Family())
Wan22VAE.family_def = WAN22
