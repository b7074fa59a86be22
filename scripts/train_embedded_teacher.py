"""Train the small Wan2.1-architecture VAE shipped as ``flashvaed/data/wan21-tiny.safetensors``.

No VAE weights can be downloaded where flashvaed is built and tested, so the demo's teacher is
trained here, from scratch, on procedural clips (``flashvaed.synthetic``). It is a real VAE of
the Wan2.1 architecture at base width 8 (encoder and decoder), KL-regularised towards the Wan2.1
latent statistics so that its normalised latents are roughly N(0, 1) like diffusion latents.
Two phases: single frames (the first-chunk path, cheap), then 5-frame clips (the temporal path).
Reproduce with ``python scripts/train_embedded_teacher.py`` (seeded, CPU).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flashvaed.metrics import psnr
from flashvaed.models import WanConfig, WanVAE, save_wan, zero_state
from flashvaed.synthetic import synthetic_clip


def posterior(model: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable (mu, logvar) of the encoder over chunks 1, 4, 4, ..."""
    b, _, t, h, w = video.shape
    state = zero_state(model.encoder.state_specs(), b, h, w)
    outs = []
    for start, stop in [(0, 1)] + [(s, s + 4) for s in range(1, t, 4)]:
        out, state = model.encoder(video[:, :, start:stop], state, first=start == 0)
        outs.append(out)
    mu, logvar = model.quant_conv(torch.cat(outs, dim=2)).chunk(2, dim=1)
    return mu, logvar.clamp(-30.0, 20.0)


def reconstruct(model: WanVAE, latents: torch.Tensor) -> torch.Tensor:
    """Differentiable streaming decode: the first frame, then the rest in one step."""
    state = zero_state(model.decoder_state_specs(), latents.shape[0], *latents.shape[-2:])
    frames, state = model.decode_step(latents[:, :, :1], state, first=True, clamp=False)
    if latents.shape[2] > 1:
        rest, _ = model.decode_step(latents[:, :, 1:], state, clamp=False)
        frames = torch.cat([frames, rest], dim=2)
    return frames


def train_step(model: WanVAE, video: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, float]:
    mu, logvar = posterior(model, video)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    recon = reconstruct(model, (z - model.latents_mean) / model.latents_std)
    # KL to the prior N(latents_mean, latents_std^2), so normalised latents are ~N(0, 1)
    var_ratio = torch.exp(logvar) / model.latents_std**2
    kl = 0.5 * (var_ratio + ((mu - model.latents_mean) / model.latents_std) ** 2 - 1 - torch.log(var_ratio))
    loss = F.l1_loss(recon, video) + F.mse_loss(recon, video) + kl_weight * kl.mean()
    return loss, kl.mean().item()


def clips(step: int, size: int, frames: int, res: int) -> torch.Tensor:
    return torch.cat([synthetic_clip(frames, res, res, seed=10_000 + step * size + i) for i in range(size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-steps", type=int, default=6000)
    parser.add_argument("--clip-steps", type=int, default=2500)
    parser.add_argument("--base-dim", type=int, default=8)
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--kl", type=float, default=1e-6)
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("-o", "--out", type=Path, default=Path("flashvaed/data/wan21-tiny.safetensors"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = WanVAE(WanConfig(base_dim=args.base_dim))
    with torch.no_grad():  # start nearly deterministic: the posterior's noise grows as KL asks
        model.quant_conv.bias[model.latent_channels :].fill_(-8.0)
    total = args.image_steps + args.clip_steps
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    )
    held_out = torch.cat([synthetic_clip(17, 128, 128, seed=i) for i in range(2)])
    start = time.time()
    for step in range(total):
        # phase 1: single frames (batch 4); phase 2: 5-frame clips (batch 2)
        video = clips(step, 4, 1, args.res) if step < args.image_steps else clips(step, 2, 5, args.res)
        loss, kl = train_step(model, video, args.kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == total - 1:
            with torch.no_grad():
                rec = model.decode(model.encode(held_out))
            print(
                f"step {step:5d} loss {loss.item():.4f} kl {kl:.2f} held-out (17x128x128) PSNR "
                f"{psnr(rec, held_out):.2f} dB  {time.time() - start:.0f}s",
                flush=True,
            )
    save_wan(model.eval(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
