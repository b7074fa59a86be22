"""Teacher decode speed and memory on CPU: one-shot vs streaming chunks (prints a table).

Full-width Wan2.1 VAE (base 96, random weights), 256x256 by default. Time is seconds per output
frame over a whole clip; memory is the peak resident set of a fresh process decoding a clip and
dropping each chunk's frames once made (as `flashvaed decode` to .mp4 does), so it shows what the
decoder itself needs. Streaming must stay flat as clips grow; one-shot does not.

    python benchmarks/teacher_decode.py                 # the issue's table (~15 min on 2 cores)
    python benchmarks/teacher_decode.py --size 128 --frames 3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from flashvaed.models import WanConfig, WanVAE
from flashvaed.models.streaming import iter_decode


def make_teacher(base_dim: int) -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(WanConfig(base_dim=base_dim)).eval()


def latents_for(frames: int, size: int) -> torch.Tensor:
    return torch.randn(1, 16, frames, size // 8, size // 8, generator=torch.Generator().manual_seed(1))


def chunk_of(mode: str, frames: int) -> int:
    return max(1, frames - 1) if mode == "one-shot" else int(mode.removeprefix("k="))


@torch.inference_mode()
def time_decode(model: WanVAE, latents: torch.Tensor, chunk: int) -> tuple[float, int]:
    start = time.perf_counter()
    frames = sum(piece.shape[2] for piece in iter_decode(model, latents, chunk))
    return time.perf_counter() - start, frames


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it is not inherited across exec."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: best effort


def memory_child(base_dim: int, frames: int, size: int, mode: str) -> dict:
    """Run in a fresh process: peak RSS while decoding, chunk outputs dropped as they come."""
    model = make_teacher(base_dim)
    latents = latents_for(frames, size)
    before = peak_rss_kib()
    with torch.inference_mode():
        for _ in iter_decode(model, latents, chunk_of(mode, frames)):
            pass
    peak = peak_rss_kib()
    return {"peak_mib": peak / 1024, "decode_mib": (peak - before) / 1024}


def measure_memory(base_dim: int, frames: int, size: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([base_dim, frames, size, mode])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dim", type=int, default=96)
    parser.add_argument("--size", type=int, default=256, help="frame height = width in pixels")
    parser.add_argument("--frames", type=int, default=5, help="latent frames in the timed clip")
    parser.add_argument("--memory-frames", type=int, nargs=2, default=(5, 21), help="short and long clip")
    parser.add_argument("--modes", nargs="+", default=["one-shot", "k=1", "k=2", "k=4"])
    parser.add_argument("--memory-modes", nargs="+", default=["k=1", "k=2", "one-shot"])
    parser.add_argument("--memory-only", action="store_true", help="skip the speed table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(*json.loads(args.child))))
        return

    if not args.memory_only:
        speed_table(args)
    memory_table(args)


def speed_table(args: argparse.Namespace) -> None:
    model = make_teacher(args.base_dim)
    latents = latents_for(args.frames, args.size)
    print(
        f"Wan2.1 teacher, base {args.base_dim} ({sum(p.numel() for p in model.decoder.parameters()) / 1e6:.1f} M "
        f"decoder params), {args.size}x{args.size}, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    time_decode(model, latents[:, :, :2], 1)  # warm-up
    print(f"\nspeed: {args.frames} latent frames -> {1 + 4 * (args.frames - 1)} frames")
    print("| mode | chunk | s/frame | frames/s | vs one-shot |\n|---|---|---|---|---|")
    base = None
    for mode in args.modes:
        seconds, frames = time_decode(model, latents, chunk_of(mode, args.frames))
        base = base or seconds
        print(
            f"| {mode} | {chunk_of(mode, args.frames)} | {seconds / frames:.3f} | {frames / seconds:.2f} | "
            f"{base / seconds:.2f}x |",
            flush=True,
        )


def memory_table(args: argparse.Namespace) -> None:
    short, long = args.memory_frames
    print(f"\npeak memory (fresh process; model + decode), {short} vs {long} latent frames")
    print(f"| mode | {short} frames: peak MiB | decode MiB | {long} frames: peak MiB | decode MiB | growth |")
    print("|---|---|---|---|---|---|")
    for mode in args.memory_modes:
        a = measure_memory(args.base_dim, short, args.size, mode)
        b = measure_memory(args.base_dim, long, args.size, mode)
        print(
            f"| {mode} | {a['peak_mib']:.0f} | {a['decode_mib']:.0f} | {b['peak_mib']:.0f} | {b['decode_mib']:.0f} | "
            f"{b['peak_mib'] / a['peak_mib']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
