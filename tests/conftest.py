"""Shared fixtures: random-weight Wan2.1 VAEs in diffusers (the oracle) and in flashvaed."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*NumPy.*")


def perturbed_diffusers_vae(base_dim: int, seed: int = 0):
    """diffusers' AutoencoderKLWan with random weights, norm gains and output scale not at init.

    The head is scaled down so that decoded frames mostly sit inside the [-1, 1] clamp and the
    comparison sees real values, not saturated ones.
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=base_dim).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        vae.decoder.conv_out.weight.mul_(0.5)
    return vae


@pytest.fixture(scope="session")
def diffusers_vae_8():
    return perturbed_diffusers_vae(8, seed=0)


@pytest.fixture(scope="session")
def diffusers_vae_16():
    return perturbed_diffusers_vae(16, seed=1)


@pytest.fixture(scope="session")
def diffusers_dir_8(diffusers_vae_8, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "wan-diffusers-8"
    diffusers_vae_8.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def teacher_8(diffusers_dir_8):
    from flashvaed.models import load_model

    return load_model(diffusers_dir_8)


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std
