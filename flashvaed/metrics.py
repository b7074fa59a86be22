"""Reconstruction metrics on frames in [-1, 1]."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def psnr(a: Tensor, b: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (frames in [-1, 1]: range 2)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    if mse == 0:
        return math.inf
    return 10 * math.log10(data_range**2 / mse)
