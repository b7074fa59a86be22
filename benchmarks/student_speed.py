"""Teacher vs student decode speed on one runtime (torch eager), in one run (prints tables).

A full-size teacher of one family (random weights: the released configuration, e.g. Wan2.1 base
96, Wan2.2 base 160 / decoder 256) and every student preset of that family built on it, at
256x256 on the CPU by default, streaming with chunks of k = 2 latent frames. For each model:
MACs per output frame (meta-device count), measured seconds per output frame, and both ratios
to the teacher. A per-stage table then says where the time goes (share of time vs share of
MACs), which is what to look at when the measured speed-up falls short of the MACs ratio.

    python benchmarks/student_speed.py                       # Wan2.1 and its presets
    python benchmarks/student_speed.py --family wan2.2       # Wan2.2 (TI2V-5B) and flash-wan2.2
    python benchmarks/student_speed.py --size 128 --frames 3 # quicker
    python benchmarks/student_speed.py --family mochi --size 128 --frames 3   # Mochi 1 (6n+1 frames)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from flashvaed.models import StudentSpec, families, summarize
from flashvaed.models.streaming import iter_decode
from flashvaed.models.student import build_student, preset_names


@torch.inference_mode()
def seconds_per_frame(model: torch.nn.Module, latents: torch.Tensor, chunk: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        frames = sum(piece.shape[2] for piece in iter_decode(model, latents, chunk))
        runs.append((time.perf_counter() - start) / frames)
    return statistics.median(runs)


@torch.inference_mode()
def stage_seconds(model: torch.nn.Module, latents: torch.Tensor, chunk: int) -> dict[str, float]:
    """Wall time spent in each decoder stage over one decode (hooks around each stage)."""
    totals: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, _, block in model.decoder.stages():
        handles.append(block.register_forward_pre_hook(lambda *_a, n=name: starts.__setitem__(n, time.perf_counter())))
        handles.append(
            block.register_forward_hook(
                lambda *_a, n=name: totals.__setitem__(n, totals[n] + time.perf_counter() - starts[n])
            )
        )
    try:
        for _ in iter_decode(model, latents, chunk):
            pass
    finally:
        for h in handles:
            h.remove()
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan2.1", choices=families.names())
    parser.add_argument(
        "--base-dim", type=int, default=None, help="encoder and decoder width, Wan families (default: released)"
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=3, help="latent frames per clip (first + steady chunks)")
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per student (median)")
    parser.add_argument("--presets", nargs="+", default=None, help="default: every preset of the family")
    args = parser.parse_args()

    torch.manual_seed(0)
    family = families.get(args.family)
    config = family.config_type()
    if args.base_dim is not None:
        if "decoder_base_dim" not in getattr(family.config_type, "__dataclass_fields__", {}):
            parser.error(f"--base-dim is for the Wan families; {args.family} is measured at its released widths")
        config = family.config_type(base_dim=args.base_dim, decoder_base_dim=args.base_dim)
    teacher = family.teacher_type(config).eval()
    models = {"teacher": teacher}
    for name in args.presets or preset_names(args.family):
        models[name] = build_student(StudentSpec.load(name), config)[0].eval()
    s, t = teacher.spatial_factor, teacher.temporal_factor
    latents = torch.randn(1, teacher.latent_channels, args.frames, args.size // s, args.size // s)
    frames = 1 + t * (args.frames - 1)
    print(
        f"{family.title} ({family.describe(config)}), {args.size}x{args.size}, {args.frames} latent frames -> "
        f"{frames} frames, chunk {args.chunk}, CPU {torch.get_num_threads()} threads, torch {torch.__version__}, eager"
    )

    summaries = {n: summarize(m, args.size, args.size, chunk=args.chunk) for n, m in models.items()}
    timings = {}
    for name, model in models.items():
        seconds_per_frame(model, latents[:, :, :2], args.chunk, 1)  # warm-up
        timings[name] = seconds_per_frame(model, latents, args.chunk, 1 if name == "teacher" else args.repeats)
    t_macs, t_time = summaries["teacher"].macs_per_frame, timings["teacher"]
    print("\n| model | params (M) | GMACs/frame | MACs ratio | s/frame | frames/s | measured speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        s = summaries[name]
        print(
            f"| {name} | {s.params_decoder / 1e6:.2f} | {s.macs_per_frame / 1e9:.2f} | "
            f"{t_macs / s.macs_per_frame:.1f}x | {timings[name]:.4f} | {1 / timings[name]:.2f} | "
            f"{t_time / timings[name]:.1f}x |"
        )

    print("\nwhere the time goes (share of decode time vs share of MACs, per stage):")
    names = [n for n, _, _ in teacher.decoder.stages()]
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, model in models.items():
        sec = stage_seconds(model, latents, args.chunk)
        total_t = sum(sec.values())
        macs = {st.name: st.macs for st in summaries[name].stages}
        total_m = sum(macs.values())
        cells = [f"{100 * sec.get(n, 0) / total_t:.0f}% t / {100 * macs[n] / total_m:.0f}% m" for n in names]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
