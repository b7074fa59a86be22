"""Train the small Wan2.1-architecture VAE shipped as ``flashvaed/data/wan21-tiny.safetensors``.

No VAE weights can be downloaded where flashvaed is built and tested, so the demo's teacher is
trained here, from scratch, on procedural clips (``flashvaed.synthetic``): a real VAE of the
Wan2.1 architecture at base width 8 (encoder and decoder).

Deep, narrow, norm-heavy decoders trained end to end from random weights sit for thousands of
steps predicting the mean frame. A linear code gets them moving at once, so training has three
phases:
  A. the decoder learns to invert a PCA code: the first latent frame is the top 16 principal
     components of the first frame's 8x8 patches, every later one those of 4-frame x 8x8 patches
     (the Wan2.1 latent grid), scaled to unit variance (diffusion latents are ~N(0, 1));
  B. the encoder learns to produce that code;
  C. both are fine-tuned end to end on reconstruction, KL-regularised towards the Wan2.1 latent
     statistics (a real VAE posterior, normalised latents ~N(0, 1)).
Reproduce (seeded, CPU, about an hour on 2 cores) the shipped file with two runs: phase C first
on 5-frame clips, then continued on 13-frame clips, which the decoder's and encoder's later
chunks (with non-zero history) need:
    python scripts/train_embedded_teacher.py --joint-frames 5 -o /tmp/stage1.safetensors
    python scripts/train_embedded_teacher.py --init /tmp/stage1.safetensors --steps 0 0 1500
(a single run with the defaults, 13-frame clips from the start of phase C, is the intended
recipe for the next retraining).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flashvaed.metrics import psnr
from flashvaed.models import WanConfig, WanVAE, load_model, save_teacher, zero_state
from flashvaed.synthetic import synthetic_clip

FRAMES, SIZE = 5, 64  # phases A/B: 2 latent frames (the first-chunk path and one steady chunk)


def clips(seed: int, batch: int, frames: int = FRAMES) -> Tensor:
    return torch.cat([synthetic_clip(frames, SIZE, SIZE, seed=seed * batch + i) for i in range(batch)])


def patches(video: Tensor) -> tuple[Tensor, Tensor]:
    """8x8 patches of frame 0 (B*64, 192) and 4-frame x 8x8 patches of frames 1..4 (B*64, 768)."""
    first = F.unfold(video[:, :, 0], 8, stride=8).transpose(1, 2).reshape(-1, 192)
    rest = video[:, :, 1:5].transpose(1, 2).reshape(video.shape[0], 12, SIZE, SIZE)  # frames into channels
    return first, F.unfold(rest, 8, stride=8).transpose(1, 2).reshape(-1, 768)


class PCACode:
    """A linear 16-component code of the latent grid, fitted on synthetic clips."""

    def __init__(self, samples: Tensor, components: int = 16) -> None:
        first, rest = patches(samples)
        self.bases = [self._fit(first, components), self._fit(rest, components)]

    @staticmethod
    def _fit(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        return mean, vh[:k], s[:k] / math.sqrt(x.shape[0])  # mean, directions, std per component

    def encode(self, video: Tensor) -> Tensor:
        """Normalised latents (B, 16, 2, 8, 8) of clips (B, 3, 5, 64, 64)."""
        b, g = video.shape[0], SIZE // 8
        codes = []
        for x, (mean, directions, std) in zip(patches(video), self.bases, strict=True):
            z = (x - mean) @ directions.T / std
            codes.append(z.reshape(b, g, g, -1).permute(0, 3, 1, 2))
        return torch.stack(codes, dim=2)


def posterior(model: WanVAE, video: Tensor) -> tuple[Tensor, Tensor]:
    """Differentiable (mu, logvar) of the encoder over chunks 1, 4, 4, ..."""
    b, _, t, h, w = video.shape
    state = zero_state(model.encoder.state_specs(), b, h, w)
    outs = []
    for start, stop in [(0, 1)] + [(s, s + 4) for s in range(1, t, 4)]:
        out, state = model.encoder(video[:, :, start:stop], state, first=start == 0)
        outs.append(out)
    mu, logvar = model.quant_conv(torch.cat(outs, dim=2)).chunk(2, dim=1)
    return mu, logvar.clamp(-30.0, 20.0)


def reconstruct(model: WanVAE, latents: Tensor) -> Tensor:
    """Differentiable streaming decode: the first frame, then the rest in one step."""
    state = zero_state(model.decoder_state_specs(), latents.shape[0], *latents.shape[-2:])
    frames, state = model.decode_step(latents[:, :, :1], state, first=True, clamp=False)
    rest, _ = model.decode_step(latents[:, :, 1:], state, clamp=False)
    return torch.cat([frames, rest], dim=2)


def recon_loss(recon: Tensor, video: Tensor) -> Tensor:
    return F.l1_loss(recon, video) + F.mse_loss(recon, video)


def run_phase(
    name: str, steps: int, params: list, lr: float, step_fn, model: WanVAE, held_out: Tensor, log_every: int
) -> None:
    if steps == 0:
        return
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    start = time.time()
    for step in range(steps):
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            with torch.no_grad():
                rec = model.decode(model.encode(held_out))
            print(
                f"{name} step {step:5d} loss {loss.item():.4f}  held-out (17x128x128) PSNR "
                f"{psnr(rec, held_out):.2f} dB  {time.time() - start:.0f}s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs=3, default=(3000, 1500, 2000), help="phases A, B, C")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--kl", type=float, default=1e-6)
    parser.add_argument(
        "--joint-frames",
        type=int,
        default=13,
        help="clip length in phase C (several "
        "steady chunks, so that both the encoder and decoder learn to use their history)",
    )
    parser.add_argument("--init", type=Path, help="start from these weights (e.g. with --steps 0 0 N)")
    parser.add_argument("--log-every", type=int, default=250)
    parser.add_argument("-o", "--out", type=Path, default=Path("flashvaed/data/wan21-tiny.safetensors"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = WanVAE(WanConfig(base_dim=8))
    with torch.no_grad():  # start nearly deterministic: the posterior's noise grows as KL asks
        model.quant_conv.bias[model.latent_channels :].fill_(-8.0)
    if args.init is not None:
        model = load_model(args.init).train()
    code = PCACode(clips(999_999, 64))
    held_out = torch.cat([synthetic_clip(17, 128, 128, seed=i) for i in range(2)])
    a, b, c = args.steps

    def decoder_step(step: int) -> Tensor:
        video = clips(step, args.batch)
        return recon_loss(reconstruct(model, code.encode(video)), video)

    def encoder_step(step: int) -> Tensor:
        video = clips(a + step, args.batch)
        mu, _ = posterior(model, video)
        return F.mse_loss((mu - model.latents_mean) / model.latents_std, code.encode(video))

    def joint_step(step: int) -> Tensor:
        video = clips(a + b + step, args.batch, args.joint_frames)
        mu, logvar = posterior(model, video)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = reconstruct(model, (z - model.latents_mean) / model.latents_std)
        var_ratio = torch.exp(logvar) / model.latents_std**2  # KL to N(latents_mean, latents_std^2)
        kl = 0.5 * (var_ratio + ((mu - model.latents_mean) / model.latents_std) ** 2 - 1 - torch.log(var_ratio))
        return recon_loss(recon, video) + args.kl * kl.mean()

    run_phase(
        "A decoder",
        a,
        list(model.decoder.parameters()) + list(model.post_quant_conv.parameters()),
        1e-3,
        decoder_step,
        model,
        held_out,
        args.log_every,
    )
    run_phase(
        "B encoder",
        b,
        list(model.encoder.parameters()) + list(model.quant_conv.parameters()),
        1e-3,
        encoder_step,
        model,
        held_out,
        args.log_every,
    )
    run_phase("C joint", c, list(model.parameters()), 3e-4, joint_step, model, held_out, args.log_every)
    save_teacher(model.eval(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
