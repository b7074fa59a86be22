"""Train the small Wan2.1-architecture VAE shipped as ``flashvaed/data/wan21-tiny.safetensors``.

No VAE weights can be downloaded where flashvaed is built and tested, so the demo's teacher is
trained here, from scratch, on procedural clips (``flashvaed.synthetic``). It is a real VAE of
the Wan2.1 architecture at base width 8: encoder and decoder, KL-regularised towards the Wan2.1
latent statistics so that its normalised latents are roughly N(0, 1) like diffusion latents.
Reproduce with ``python scripts/train_embedded_teacher.py`` (seeded; about half an hour on 2 cores).
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
    return model.quant_conv(torch.cat(outs, dim=2)).chunk(2, dim=1)


def reconstruct(model: WanVAE, latents: torch.Tensor) -> torch.Tensor:
    state = zero_state(model.decoder_state_specs(), latents.shape[0], *latents.shape[-2:])
    first, state = model.decode_step(latents[:, :, :1], state, first=True, clamp=False)
    rest, _ = model.decode_step(latents[:, :, 1:], state, clamp=False)
    return torch.cat([first, rest], dim=2)


def batch(step: int, size: int, frames: int, res: int) -> torch.Tensor:
    return torch.cat([synthetic_clip(frames, res, res, seed=10_000 + step * size + i) for i in range(size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--base-dim", type=int, default=8)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl", type=float, default=1e-6)
    parser.add_argument("-o", "--out", type=Path, default=Path("flashvaed/data/wan21-tiny.safetensors"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = WanVAE(WanConfig(base_dim=args.base_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    held_out = torch.cat([synthetic_clip(17, 64, 64, seed=i) for i in range(4)])
    start = time.time()
    for step in range(args.steps):
        video = batch(step, args.batch, args.frames, args.res)
        mu, logvar = posterior(model, video)
        logvar = logvar.clamp(-30, 20)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        latents = (z - model.latents_mean) / model.latents_std
        recon = reconstruct(model, latents)
        # KL to the prior N(latents_mean, latents_std^2): normalised latents ~ N(0, 1)
        var_ratio = torch.exp(logvar) / model.latents_std**2
        kl = 0.5 * (var_ratio + ((mu - model.latents_mean) / model.latents_std) ** 2 - 1 - torch.log(var_ratio))
        loss = F.l1_loss(recon, video) + F.mse_loss(recon, video) + args.kl * kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            with torch.no_grad():
                rec = model.decode(model.encode(held_out))
            print(
                f"step {step:5d} loss {loss.item():.4f} kl {kl.mean().item():.2f} "
                f"held-out PSNR {psnr(rec, held_out):.2f} dB  {time.time() - start:.0f}s",
                flush=True,
            )
    save_wan(model.eval(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
