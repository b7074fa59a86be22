"""Procedural video clips with real motion, for demos, tests and calibration without downloads.

A clip is a textured background seen by a camera that pans and zooms, with shapes (discs, boxes,
rings) moving across it on their own paths. Everything is drawn from a seed, so the same seed
gives the same clip on every machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _texture(gen: torch.Generator, height: int, width: int) -> Tensor:
    """A smooth coloured texture (3, H, W) in [-1, 1]: a few random colour gratings."""
    ys = torch.linspace(-1, 1, height).view(-1, 1)
    xs = torch.linspace(-1, 1, width).view(1, -1)
    image = torch.zeros(3, height, width)
    for _ in range(5):
        freq = 1.0 + 5.0 * torch.rand(2, generator=gen)
        phase = 2 * math.pi * torch.rand(1, generator=gen)
        colour = torch.rand(3, 1, 1, generator=gen) * 2 - 1
        image += colour * torch.sin(freq[0] * math.pi * ys + freq[1] * math.pi * xs + phase)
    return torch.tanh(image * 0.8)


GENERATION_COPIES = 6  # peak memory of drawing a clip, in clips' worth (grids, masks, blends; measured)


def synthetic_clip_bytes(frames: int, height: int, width: int) -> int:
    """Peak memory of ``synthetic_clip``: checked before drawing long or large clips."""
    return GENERATION_COPIES * 3 * frames * height * width * 4


def synthetic_clip(frames: int = 17, height: int = 64, width: int = 64, seed: int = 0, shapes: int = 3) -> Tensor:
    """One clip (1, 3, frames, height, width) in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    texture = _texture(gen, 2 * height, 2 * width).unsqueeze(0)
    t = torch.linspace(0, 1, frames)
    # camera: a pan over the double-size texture and a slow zoom
    pan = (torch.rand(2, generator=gen) - 0.5) * 0.8
    zoom = 0.5 + 0.15 * torch.rand(1, generator=gen)
    dzoom = (torch.rand(1, generator=gen) - 0.5) * 0.2
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom + dzoom * t
    theta[:, 0, 2] = pan[0] * (t - 0.5)
    theta[:, 1, 2] = pan[1] * (t - 0.5)
    grid = F.affine_grid(theta, [frames, 3, height, width], align_corners=False)
    video = F.grid_sample(texture.expand(frames, -1, -1, -1), grid, align_corners=False, padding_mode="reflection")

    ys = torch.linspace(-1, 1, height).view(1, -1, 1)
    xs = torch.linspace(-1, 1, width).view(1, 1, -1)
    for _ in range(shapes):
        start = (torch.rand(2, generator=gen) - 0.5) * 1.6
        velocity = (torch.rand(2, generator=gen) - 0.5) * 1.2
        size = 0.15 + 0.25 * torch.rand(1, generator=gen)
        colour = (torch.rand(3, generator=gen) * 2 - 1).view(1, 3, 1, 1)
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        cy = (start[0] + velocity[0] * t).view(-1, 1, 1)
        cx = (start[1] + velocity[1] * t).view(-1, 1, 1)
        dy, dx = ys - cy, xs - cx
        if kind == 0:  # disc
            mask = torch.sigmoid((size - torch.sqrt(dy**2 + dx**2)) * 25)
        elif kind == 1:  # box
            mask = torch.sigmoid((size - torch.maximum(dy.abs(), dx.abs())) * 25)
        else:  # ring
            r = torch.sqrt(dy**2 + dx**2)
            mask = torch.sigmoid((size * 0.35 - (r - size).abs()) * 25)
        stripes = 0.8 + 0.2 * torch.sin(dx * 10).unsqueeze(1)
        mask = mask.unsqueeze(1)
        video = video * (1 - mask) + colour * stripes * mask
    return video.clamp(-1, 1).permute(1, 0, 2, 3).unsqueeze(0).contiguous()
