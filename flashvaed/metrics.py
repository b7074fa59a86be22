"""Reconstruction metrics on frames in [-1, 1], (B, 3, F, H, W)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (frames in [-1, 1]: range 2)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    if mse == 0:
        return math.inf
    return 10 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> Tensor:
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim_map(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-pixel SSIM of every frame (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5),
    computed per channel and averaged over channels: (B, F, H-10, W-10)."""
    if a.shape[-1] < 11 or a.shape[-2] < 11:
        raise ValueError(f"SSIM needs frames of at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    x = a.transpose(1, 2).flatten(0, 1).float()  # (B*F, 3, H, W)
    y = b.transpose(1, 2).flatten(0, 1).float()
    w = _gaussian_window(dtype=x.dtype).to(x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, w, groups=3), F.conv2d(y, w, groups=3)
    sxx = F.conv2d(x * x, w, groups=3) - mu_x**2
    syy = F.conv2d(y * y, w, groups=3) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=3) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean(1).reshape(a.shape[0], a.shape[2], *s.shape[-2:])


def ssim(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    return float(ssim_map(a, b, data_range).mean())


def flicker(a: Tensor, reference: Tensor) -> float:
    """Temporal flicker of ``a`` against ``reference``: mean |(a_t - a_t-1) - (ref_t - ref_t-1)|.

    Zero when ``a`` changes from frame to frame exactly as the reference does, whatever its
    per-frame error; 0 for single-frame clips.
    """
    if a.shape[2] < 2:
        return 0.0
    da = a[:, :, 1:].double() - a[:, :, :-1].double()
    dr = reference[:, :, 1:].double() - reference[:, :, :-1].double()
    return float((da - dr).abs().mean())


def psnr_per_sample(a: Tensor, b: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR in dB of each batch element (B,), capped at 100 dB for identical samples."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(data_range**2 * 1e-10)
    return 10 * torch.log10(data_range**2 / mse)
