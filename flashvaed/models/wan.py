"""The Wan2.1 video VAE: encoder, streaming decoder, latent (de)normalisation.

Compression 4x in time and 8x8 in space. N latent frames decode to 1 + 4(N-1) frames; 4n+1
video frames encode to n+1 latent frames. Latents in diffusion space are normalised per channel,
``(mu - mean) / std``; the decoder de-normalises them first.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .blocks import AttentionBlock, CausalConv3d, Downsample, Head, ResidualBlock, Stage, Upsample
from .layout import DecoderLayout, StageLayout
from .streaming import State, StateSpec, StreamingBlock, run_blocks, zero_state
from .streaming import decode as streaming_decode

# fmt: off
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# fmt: on


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan2.1-style VAE; ``base_dim`` 96 and ``z_dim`` 16 is the released one."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = field(default=WAN21_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=WAN21_LATENTS_STD)

    def __post_init__(self) -> None:
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latent statistics must have z_dim={self.z_dim} entries")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per resampling stage")

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def decoder_widths(self) -> list[int]:
        """Widths of the middle and of each up stage, e.g. 384, 384, 384, 192, 96."""
        return [self.decoder_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def teacher_layout(config: WanConfig) -> DecoderLayout:
    """The decoder layout of a Wan2.1-style VAE: causal 3D convs at full width everywhere."""
    widths = config.decoder_widths
    nrb = config.num_res_blocks
    temporal_upsample = config.temporal_downsample[::-1]
    last = len(config.dim_mult) - 1
    up = []
    for i, (in_dim, out_dim) in enumerate(itertools.pairwise(widths)):
        up.append(
            StageLayout(
                op="causal3d",
                in_width=in_dim // 2 if i > 0 else in_dim,  # the upsample convs halve the width
                width=out_dim,
                hidden=(out_dim,) * (nrb + 1),
                resample_width=out_dim // 2 if i < last else None,
                temporal=i < last and temporal_upsample[i],
            )
        )
    middle = StageLayout("causal3d", widths[0], widths[0], (widths[0], widths[0]))
    return DecoderLayout(config.z_dim, middle, tuple(up), qk_dim=widths[0], v_dim=widths[0])


class WanDecoder(nn.Module):
    """conv_in, middle (res, attention, res), up stages with resampling, head; built from a layout."""

    def __init__(self, layout: DecoderLayout) -> None:
        super().__init__()
        self.layout = layout
        m = layout.middle
        self.conv_in = CausalConv3d(layout.z_dim, m.width, 3)
        self.middle = Stage(
            [
                ResidualBlock(m.width, m.width, m.hidden[0], m.op, m.shortcut),
                AttentionBlock(m.width, layout.qk_dim, layout.v_dim),
                ResidualBlock(m.width, m.width, m.hidden[1], m.op, m.shortcut),
            ]
        )
        up = []
        for st in layout.up:
            blocks = [
                ResidualBlock(st.in_width if j == 0 else st.width, st.width, hidden, st.op, st.shortcut)
                for j, hidden in enumerate(st.hidden)
            ]
            resample = Upsample(st.width, st.resample_width, st.temporal) if st.resample_width else None
            up.append(Stage(blocks, resample))
        self.up = nn.ModuleList(up)
        self.head = Head(layout.up[-1].width, layout.out_channels, layout.head_op)

    def stages(self) -> list[tuple[str, Fraction, StreamingBlock]]:
        """Blocks in the order they run, with their names and spatial scale (latent grid = 1)."""
        items: list[tuple[str, Fraction, StreamingBlock]] = [
            ("conv_in", Fraction(1), self.conv_in),
            ("middle", Fraction(1), self.middle),
        ]
        scale = Fraction(1)
        for i, stage in enumerate(self.up):
            items.append((f"up.{i}", scale, stage))
            scale *= 2 if stage.resample is not None else 1
        items.append(("head", scale, self.head))
        return items

    def state_specs(self) -> list[StateSpec]:
        return [s for name, scale, block in self.stages() for s in block.state_specs(name, scale)]

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        return run_blocks([block for _, _, block in self.stages()], x, state, first)


class WanEncoder(nn.Module):
    """conv_in, down stages with resampling, middle (res, attention, res), head to 2*z_dim."""

    def __init__(self, config: WanConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        last = len(config.dim_mult) - 1
        self.conv_in = CausalConv3d(3, dims[0], 3)
        down = []
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            blocks = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(config.num_res_blocks)]
            resample = Downsample(out_dim, config.temporal_downsample[i]) if i < last else None
            down.append(Stage(blocks, resample))
        self.down = nn.ModuleList(down)
        self.middle = Stage(
            [ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])]
        )
        self.head = Head(dims[-1], 2 * config.z_dim)

    def stages(self) -> list[tuple[str, Fraction, StreamingBlock]]:
        """Blocks in the order they run, with their names and spatial scale (pixel grid = 1)."""
        items: list[tuple[str, Fraction, StreamingBlock]] = [("conv_in", Fraction(1), self.conv_in)]
        items += [(f"down.{i}", Fraction(1, 2**i), stage) for i, stage in enumerate(self.down)]
        bottom = Fraction(1, 2 ** (len(self.down) - 1))
        items += [("middle", bottom, self.middle), ("head", bottom, self.head)]
        return items

    def state_specs(self) -> list[StateSpec]:
        return [s for name, scale, block in self.stages() for s in block.state_specs(name, scale)]

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        return run_blocks([block for _, _, block in self.stages()], x, state, first)


class LatentDecoder(nn.Module):
    """Diffusion-space latents -> frames: de-normalisation, ``post_quant_conv``, a ``WanDecoder``.

    The part teachers and students share, and the streaming contract they both follow.
    """

    family = "wan2.1"
    kind = "teacher"

    def __init__(self, layout: DecoderLayout, latents_mean: tuple[float, ...], latents_std: tuple[float, ...]) -> None:
        super().__init__()
        z = layout.z_dim
        self.latent_channels = z
        self.temporal_factor = 2 ** sum(st.temporal for st in layout.up)
        self.spatial_factor = 2 ** sum(st.resample_width is not None for st in layout.up)
        self.post_quant_conv = nn.Conv3d(z, z, 1)
        self.decoder = WanDecoder(layout)
        stats = torch.tensor([latents_mean, latents_std], dtype=torch.float32)
        self.register_buffer("latents_mean", stats[0].view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", stats[1].view(1, z, 1, 1, 1), persistent=False)

    def decoder_state_specs(self) -> list[StateSpec]:
        return self.decoder.state_specs()

    def decode_step(
        self, latents: Tensor, state: State, first: bool = False, clamp: bool = True
    ) -> tuple[Tensor, State]:
        """Decode one chunk of diffusion-space latents; the first chunk is one frame."""
        if first and latents.shape[2] != 1:
            raise InputError(f"the first chunk must be one latent frame, got {latents.shape[2]}")
        z = latents * self.latents_std + self.latents_mean
        frames, state = self.decoder(self.post_quant_conv(z), state, first)
        return (frames.clamp(-1.0, 1.0) if clamp else frames), state

    def decode(self, latents: Tensor, chunk: int | None = None) -> Tensor:
        """Frames in [-1, 1], (B, 3, 1 + 4(T-1), 8h, 8w), from latents (B, z, T, h, w)."""
        return streaming_decode(self, latents, chunk)


class WanVAE(LatentDecoder):
    """The Wan2.1 VAE: ``encode`` videos to diffusion-space latents, ``decode_step`` them back."""

    def __init__(self, config: WanConfig | None = None) -> None:
        config = config or WanConfig()
        super().__init__(teacher_layout(config), config.latents_mean, config.latents_std)
        self.config = config
        self.encoder = WanEncoder(config)
        self.quant_conv = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)

    # encoding ---------------------------------------------------------------------------------
    def iter_encode(self, video: Tensor) -> Iterator[Tensor]:
        """Normalised latents (the posterior mean) of a video (B, 3, 4n+1, H, W) in [-1, 1].

        Frames go through the encoder in chunks of 1, 4, 4, ... as the reference does; each
        chunk's latent frames are yielded as soon as they are ready.
        """
        check_video(video, self.spatial_factor, self.temporal_factor)
        b, _, t, h, w = video.shape
        p = next(self.parameters())
        video = video.to(device=p.device, dtype=p.dtype)
        state = zero_state(self.encoder.state_specs(), b, h, w, dtype=p.dtype, device=p.device)
        bounds = [(0, 1)] + [(s, s + self.temporal_factor) for s in range(1, t, self.temporal_factor)]
        for start, stop in bounds:
            out, state = self.encoder(video[:, :, start:stop], state, first=start == 0)
            mu = self.quant_conv(out)[:, : self.latent_channels]
            yield (mu - self.latents_mean) / self.latents_std

    def encode(self, video: Tensor) -> Tensor:
        """Normalised latents (B, z, n+1, H/8, W/8) of a video (B, 3, 4n+1, H, W) in [-1, 1]."""
        return torch.cat(list(self.iter_encode(video)), dim=2)


def check_video(video: Tensor, spatial_factor: int = 8, temporal_factor: int = 4) -> None:
    """Refuse videos the encoder cannot take, naming the problem in one line."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise InputError(f"video must be (batch, 3, frames, height, width), got {tuple(video.shape)}")
    _, _, t, h, w = video.shape
    if t == 0 or (t - 1) % temporal_factor:
        raise InputError(f"video must have {temporal_factor}n+1 frames, got {t}")
    if h == 0 or w == 0 or h % spatial_factor or w % spatial_factor:
        raise InputError(f"video height and width must be multiples of {spatial_factor}, got {h}x{w}")
    if not torch.isfinite(video).all():
        raise InputError("video contains NaN or Inf values")


def latent_frames(num_frames: int, temporal_factor: int = 4) -> int:
    return 1 + (num_frames - 1) // temporal_factor


def video_frames(num_latent_frames: int, temporal_factor: int = 4) -> int:
    return 1 + temporal_factor * (num_latent_frames - 1)
