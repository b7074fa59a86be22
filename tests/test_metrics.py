"""Metrics against independent references (scikit-image's SSIM) and planted facts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flashvaed.metrics import flicker, psnr, ssim


def test_psnr_planted():
    a = torch.zeros(1, 3, 2, 8, 8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.2) == pytest.approx(10 * math.log10(4 / 0.04))


def test_ssim_matches_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    torch.manual_seed(0)
    a = torch.rand(2, 3, 3, 32, 40) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    ours = ssim(a, b)
    ref = np.mean(
        [
            skimage_metrics.structural_similarity(
                a[i, :, t].permute(1, 2, 0).numpy(),
                b[i, :, t].permute(1, 2, 0).numpy(),
                data_range=2.0,
                channel_axis=2,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for i in range(2)
            for t in range(3)
        ]
    )
    assert ours == pytest.approx(ref, abs=2e-3)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)


def test_flicker():
    clip = torch.rand(1, 3, 5, 16, 16)
    assert flicker(clip + 0.5, clip) == pytest.approx(0.0, abs=1e-6)  # a constant offset does not flicker
    noisy = clip.clone()
    noisy[:, :, 2] += 0.1
    assert flicker(noisy, clip) == pytest.approx(0.1 * 2 / 4)
