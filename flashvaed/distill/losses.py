"""Distillation losses. Each returns one value per sample (B,): the batch loss is their mean, so
N processes averaging gradients of batches of b equal one process with a batch of N*b."""

from __future__ import annotations

from torch import Tensor

from ..metrics import psnr_per_sample, ssim_map


def feature_loss(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """Relative squared error: ||s - t||^2 / ||t||^2 per sample, so every stage weighs alike."""
    dims = tuple(range(1, student.dim()))
    return ((student - teacher) ** 2).mean(dims) / ((teacher**2).mean(dims) + eps)


def output_loss(student: Tensor, target: Tensor, ssim_weight: float) -> Tensor:
    """L1 plus ``ssim_weight`` * (1 - SSIM) on frames (B, 3, F, H, W); SSIM only from 11x11 frames."""
    loss = (student - target).abs().mean((1, 2, 3, 4))
    if ssim_weight and min(student.shape[-2:]) >= 11:
        loss = loss + ssim_weight * (1 - ssim_map(student, target).mean((1, 2, 3)))
    return loss


def temporal_loss(student: Tensor, target: Tensor) -> Tensor:
    """|(s_t - s_t-1) - (t_t - t_t-1)|: frame-to-frame changes should match the target's."""
    if student.shape[2] < 2:
        return student.new_zeros(student.shape[0])
    ds = student[:, :, 1:] - student[:, :, :-1]
    dt = target[:, :, 1:] - target[:, :, :-1]
    return (ds - dt).abs().mean((1, 2, 3, 4))


def ground_truth_trust(teacher: Tensor, truth: Tensor, psnr_range: tuple[float, float]) -> Tensor:
    """Per sample, 0..1: how far to trust the real frames, from the teacher's own PSNR on them.

    Where the teacher reconstructs a clip well the real frames are a reachable target; where it
    does not, they ask for detail the shared latents do not hold, and the teacher is the target.
    """
    low, high = psnr_range
    quality = psnr_per_sample(teacher.detach(), truth)
    return ((quality - low) / max(high - low, 1e-6)).clamp(0.0, 1.0)
