"""The LTX-Video VAE encoder: causal, run on a whole clip at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import (
    patchify,
)
from .blocks import ReplicateConv3d, ResBlock, pixel_norm
from .config import ENCODER_STRIDES, LTXConfig


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
