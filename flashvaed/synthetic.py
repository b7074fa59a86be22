"""Procedural video clips with real motion, for demos, tests and calibration without downloads.

A clip is one of several scenes (``SCENES``), each drawn from a seed so that the same seed gives
the same clip on every machine, in milliseconds, with nothing downloaded:

- ``shapes``: a textured background under a panning, zooming camera, with discs, boxes and rings
  moving across it (the default, and what distillation's ``synthetic`` data draws);
- ``objects``: textured balls and tiles (checkers, stripes, dots) moving and turning over a lit,
  shaded floor, each with a soft shadow;
- ``pan``: a landscape under a camera pan: a sky gradient, a sun, and ridges of hills at three
  depths that move at different speeds (parallax);
- ``gradient``: smooth colour fields (drifting hue bands, a travelling light), the kind of
  content video VAEs compress best;
- ``detail``: fine detail: a brick wall and a woven fabric under a slow zoom and pan, a
  ball rolling past;
- ``text``: text-like high-frequency content: lines of glyphs (random 5x3 bitmaps) scrolling up a
  page under a coloured title bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError


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


def _grid(frames: int, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Time (F, 1, 1) in [0, 1] and pixel centres y (1, H, 1), x (1, 1, W) in [-1, 1] (x scaled by
    the aspect ratio, so that circles stay round)."""
    t = torch.linspace(0, 1, frames).view(-1, 1, 1)
    ys = ((torch.arange(height) + 0.5) / height * 2 - 1).view(1, -1, 1)
    xs = ((torch.arange(width) + 0.5) / width * 2 - 1).view(1, 1, -1) * (width / height)
    return t, ys, xs


def _colour(gen: torch.Generator, low: float = -0.9, high: float = 0.9) -> Tensor:
    """A random colour (3, 1, 1, 1) for (3, F, H, W) clips."""
    return (low + (high - low) * torch.rand(3, generator=gen)).view(3, 1, 1, 1)


def _blend(video: Tensor, colour: Tensor, mask: Tensor) -> Tensor:
    """``colour`` (3, ...) over ``video`` (3, F, H, W) where ``mask`` (F, H, W) is 1."""
    return video * (1 - mask) + colour * mask


def _warp(image: Tensor, theta: Tensor, height: int, width: int) -> Tensor:
    """A still image (3, h, w) seen through per-frame affine cameras ``theta`` (F, 2, 3): (3, F, H, W)."""
    frames = theta.shape[0]
    grid = F.affine_grid(theta, [frames, 3, height, width], align_corners=False)
    out = F.grid_sample(image[None].expand(frames, -1, -1, -1), grid, align_corners=False, padding_mode="reflection")
    return out.transpose(0, 1)


def _shapes(gen: torch.Generator, frames: int, height: int, width: int, shapes: int = 3) -> Tensor:
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
    return video.permute(1, 0, 2, 3)


def _objects(gen: torch.Generator, frames: int, height: int, width: int) -> Tensor:
    t, ys, xs = _grid(frames, height, width)
    # a floor lit from one side: a two-colour gradient with a soft light spot
    a, b = _colour(gen, -0.6, 0.6), _colour(gen, -0.6, 0.6)
    light = (torch.rand(2, generator=gen) - 0.5) * 1.2
    mix = ((ys + 1) / 2).expand(frames, height, width)
    spot = torch.exp(-((ys - light[0]) ** 2 + (xs - light[1]) ** 2) / 0.8)
    video = a * (1 - mix) + b * mix + 0.35 * spot
    edge = 0.3 * height  # soft edges, a few pixels wide at any size
    for i in range(4):
        start = (torch.rand(2, generator=gen) - 0.5) * 1.4
        velocity = (torch.rand(2, generator=gen) - 0.5) * 1.0
        size = 0.18 + 0.14 * torch.rand(1, generator=gen).item()
        spin = (torch.rand(1, generator=gen).item() - 0.5) * 3.0
        c1, c2 = _colour(gen), _colour(gen)
        cy, cx = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        angle = spin * t
        dy, dx = ys - cy, xs - cx
        u = dx * torch.cos(angle) + dy * torch.sin(angle)  # object coordinates: it turns as it moves
        v = -dx * torch.sin(angle) + dy * torch.cos(angle)
        ball = i % 2 == 0
        inside = (size - torch.sqrt(u**2 + v**2)) if ball else (size - torch.maximum(u.abs(), v.abs()))
        shadow = torch.sigmoid((size - torch.sqrt((dy - 0.08) ** 2 + (dx - 0.08) ** 2)) * edge * 0.3)
        video = video * (1 - 0.45 * shadow)
        pattern = i % 3
        freq = math.pi * (1.0 + 1.0 * torch.rand(1, generator=gen).item()) / size  # a few cells across
        if pattern == 0:  # checkers
            texture = 0.5 + 0.5 * torch.tanh(4 * torch.sin(freq * u) * torch.sin(freq * v))
        elif pattern == 1:  # stripes
            texture = 0.5 + 0.5 * torch.sin(freq * (u + v))
        else:  # dots
            texture = torch.sigmoid(8 * (torch.cos(freq * u) * torch.cos(freq * v) - 0.4))
        shade = 1 - 0.3 * ((u + v) / (2 * size)).clamp(-1, 1) if ball else torch.ones_like(u)
        colour = (c1 * texture + c2 * (1 - texture)) * shade
        video = _blend(video, colour, torch.sigmoid(inside * edge))
    return video


def _ridge(gen: torch.Generator, xs: Tensor, height: float, roughness: float) -> Tensor:
    """A hill line y(x): a few sines, rougher for nearer hills."""
    y = torch.full_like(xs, height)
    for k in range(4):
        freq = (1 + 2 * k) * (0.8 + 0.8 * torch.rand(1, generator=gen).item())
        phase = 2 * math.pi * torch.rand(1, generator=gen).item()
        y = y + roughness / (1 + k) * torch.sin(freq * xs + phase)
    return y


def _pan(gen: torch.Generator, frames: int, height: int, width: int) -> Tensor:
    t, ys, xs = _grid(frames, height, width)
    speed = (0.5 + 0.5 * torch.rand(1, generator=gen).item()) * (1 if torch.rand(1, generator=gen) < 0.5 else -1)
    horizon = _colour(gen, 0.2, 0.9)
    zenith = torch.tensor([-0.7, -0.2, 0.6]).view(3, 1, 1, 1) + 0.3 * (_colour(gen) * 0.5)
    sky = zenith + (horizon - zenith) * ((ys + 1) / 2).clamp(0, 1)
    video = sky.expand(3, frames, height, width).clone()
    sun = torch.rand(2, generator=gen) - 0.5
    sx = sun[1] - 0.15 * speed * t  # far away: moves least
    sun_mask = torch.sigmoid((0.18 - torch.sqrt((ys - (sun[0] * 0.6 - 0.3)) ** 2 + (xs - sx) ** 2)) * 40)
    video = _blend(video, torch.tensor([0.95, 0.8, 0.2]).view(3, 1, 1, 1), sun_mask)
    edge = 60.0 * height / 128
    for depth, (level, rough) in enumerate(((-0.05, 0.12), (0.3, 0.15), (0.6, 0.2))):
        x = xs + speed * (0.4 + 0.8 * depth) * t  # nearer ridges pass faster: parallax
        ridge = _ridge(gen, x, level, rough)
        base = _colour(gen, -0.7, 0.5)
        haze = 0.5 - 0.25 * depth  # far hills fade into the sky colour
        colour = base * (1 - haze) + horizon * haze
        # texture on the slope: trees/grass as fine bumps, more visible up close
        bumps = torch.sin(x * (20 + 15 * depth)) * torch.sin(ys * (25 + 20 * depth) + 3 * torch.sin(4 * x))
        colour = colour * (1 + 0.08 * (1 + depth) * bumps) - 0.25 * ((ys - ridge).clamp(0, 1))
        video = _blend(video, colour, torch.sigmoid((ys - ridge) * edge))
    return video


def _gradient(gen: torch.Generator, frames: int, height: int, width: int) -> Tensor:
    t, ys, xs = _grid(frames, height, width)
    angle = 2 * math.pi * torch.rand(1, generator=gen).item()
    turn = (torch.rand(1, generator=gen).item() - 0.5) * 1.2
    direction = angle + turn * t
    u = xs * torch.cos(direction) + ys * torch.sin(direction)
    drift = (0.1 + 0.2 * torch.rand(1, generator=gen).item()) * t  # a fraction of a band per clip
    phases = 2 * math.pi * torch.rand(3, generator=gen)
    freq = 1.2 + 1.5 * torch.rand(1, generator=gen).item()
    # hue bands: three phase-shifted cosines, a rainbow that drifts and turns
    video = torch.stack([0.75 * torch.cos(freq * u - 2 * math.pi * drift + p) for p in phases])
    centre = (torch.rand(2, generator=gen) - 0.5) * 1.2
    velocity = (torch.rand(2, generator=gen) - 0.5) * 1.2
    ly, lx = centre[0] + velocity[0] * t, centre[1] + velocity[1] * t
    light = torch.exp(-((ys - ly) ** 2 + (xs - lx) ** 2) / 0.15)
    return video * (1 - 0.5 * light) + 0.9 * light


def _detail(gen: torch.Generator, frames: int, height: int, width: int) -> Tensor:
    size = 2 * max(height, width)
    _, ys, xs = _grid(1, size, size)
    ys, xs = ys[0], xs[0]
    # a brick wall (top) and a woven fabric (bottom), both at a few pixels' period
    rows = 14 + int(torch.randint(0, 6, (1,), generator=gen))
    row = torch.floor((ys + 1) * rows)
    offset = (row % 2) * 0.5
    brick = torch.floor((xs + 1) * rows / 2 + offset)
    mortar = ((ys + 1) * rows % 1 < 0.15) | (((xs + 1) * rows / 2 + offset) % 1 < 0.08)
    tone = torch.sin(brick * 12.9898 + row * 78.233).mul(43758.5453).frac() * 0.3  # per-brick shade
    brick_colour = _colour(gen, -0.4, 0.6)
    wall = brick_colour * (0.85 + tone)
    wall = torch.where(mortar, torch.full_like(wall, 0.6), wall)
    weave_freq = math.pi * (24 + 8 * torch.rand(1, generator=gen).item())
    warp_thread = torch.sin(weave_freq * xs) > 0
    weft = torch.sin(weave_freq * ys) > 0
    over = (torch.floor(xs * weave_freq / math.pi) + torch.floor(ys * weave_freq / math.pi)) % 2 == 0
    threads = torch.where(over, warp_thread.float(), weft.float())
    c1, c2 = _colour(gen), _colour(gen)
    fabric = c1 * threads + c2 * (1 - threads)
    split = torch.sigmoid(ys * 40 + 5 * torch.sin(3 * xs)).expand(size, size)
    image = wall * (1 - split) + fabric * split
    t = torch.linspace(0, 1, frames)
    pan = (torch.rand(2, generator=gen) - 0.5) * 0.6
    zoom = 0.55 + 0.1 * torch.rand(1, generator=gen) - 0.12 * t
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom
    theta[:, 0, 2] = pan[0] * (t - 0.5)
    theta[:, 1, 2] = pan[1] * (t - 0.5)
    video = _warp(image[:, 0].clamp(-1, 1), theta, height, width)
    tt, gy, gx = _grid(frames, height, width)
    cy, cx = 0.5 * torch.rand(1, generator=gen).item() - 0.25, -1.3 + 2.6 * tt
    r = torch.sqrt((gy - cy) ** 2 + (gx - cx) ** 2)
    ball = torch.sigmoid((0.3 - r) * 30 * height / 64)
    stripes = 0.5 + 0.5 * torch.sin(40 * (gx - cx) * torch.cos(6 * tt) + 40 * (gy - cy) * torch.sin(6 * tt))
    return _blend(video, _colour(gen) * (0.6 + 0.4 * stripes), ball)


def _text(gen: torch.Generator, frames: int, height: int, width: int) -> Tensor:
    cell = max(1, round(height / 64))  # a glyph pixel: glyphs 5 px tall at 64 px, 10 at 128
    line, advance = 8 * cell, 4 * cell  # 5-pixel glyphs with 3 pixels of leading, 3 wide plus a space
    scroll = int(0.6 * height)
    lines = (height + scroll) // line + 2
    columns = width // advance
    bits = torch.rand(lines, columns, 5, 3, generator=gen) < 0.45
    spaces = torch.rand(lines, columns, 1, 1, generator=gen) < 0.18  # word gaps
    lengths = (0.4 + 0.6 * torch.rand(lines, 1, 1, 1, generator=gen)) * columns  # ragged right margin
    keep = ~spaces & (torch.arange(columns).view(1, -1, 1, 1) < lengths)
    glyphs = (bits & keep).float()
    glyphs = F.pad(glyphs, (0, 1, 0, 3))  # (lines, columns, 8, 4): leading and spacing
    page = glyphs.permute(0, 2, 1, 3).reshape(lines * 8, columns * 4)
    page = page.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    page = F.pad(page, (0, width - page.shape[1], 0, 0))[: height + scroll + 2 * line]
    paper, ink = _colour(gen, 0.5, 0.9), _colour(gen, -0.9, -0.3)
    t = torch.linspace(0, 1, frames)
    offsets = t * scroll  # scrolling up, a fraction of a pixel per frame at a time
    theta = torch.zeros(frames, 2, 3)
    h_page = page.shape[0]
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = height / h_page
    theta[:, 1, 2] = (2 * offsets + height) / h_page - 1
    ink_mask = _warp(page[None].expand(3, -1, -1), theta, height, width)[0]
    video = paper * (1 - ink_mask) + ink * ink_mask
    # a title bar with a colour gradient, fixed on screen
    _, ys, xs = _grid(frames, height, width)
    bar = torch.sigmoid((-0.7 - ys) * 50.0 * height / 64)
    bar_colour = _colour(gen) * (0.6 + 0.4 * (xs / (width / height)))
    return _blend(video, bar_colour, bar.expand(frames, height, width))


SCENES: dict[str, tuple[Callable[..., Tensor], str]] = {
    "shapes": (_shapes, "moving discs, boxes and rings over a panning, zooming textured background"),
    "objects": (_objects, "textured balls and tiles moving and turning over a lit floor, with shadows"),
    "pan": (_pan, "a camera pan over a landscape: sky gradient, sun, hills at three depths (parallax)"),
    "gradient": (_gradient, "drifting, turning colour gradients under a travelling light"),
    "detail": (_detail, "fine detail: a brick wall and woven fabric under a slow zoom, a striped ball rolling past"),
    "text": (_text, "text-like high-frequency content: lines of glyphs scrolling up a page under a title bar"),
}


def scene_names() -> list[str]:
    """The scenes ``synthetic_clip`` draws."""
    return list(SCENES)


def scene_description(scene: str) -> str:
    """One line saying what ``scene`` shows (the demo's report names it)."""
    return SCENES[_check_scene(scene)][1]


def _check_scene(scene: str) -> str:
    if scene not in SCENES:
        raise InputError(f"{{scene}} must be one of {', '.join(SCENES)}, got {scene!r}", "scene")
    return scene


def synthetic_clip(
    frames: int = 17, height: int = 64, width: int = 64, seed: int = 0, shapes: int = 3, scene: str = "shapes"
) -> Tensor:
    """One clip (1, 3, frames, height, width) in [-1, 1] of ``scene`` (``SCENES``; ``shapes`` is
    the number of moving shapes in the ``shapes`` scene)."""
    draw = SCENES[_check_scene(scene)][0]
    gen = torch.Generator().manual_seed(seed)
    video = draw(gen, frames, height, width, shapes) if scene == "shapes" else draw(gen, frames, height, width)
    return video.clamp(-1, 1).unsqueeze(0).contiguous()
