"""Teacher vs student decode speed on one runtime (torch eager), in one run (prints tables).

A full-size teacher of one family (random weights: the released configuration, e.g. Wan2.1 base
96, Wan2.2 base 160 / decoder 256) and every student preset of that family built on it, at
256x256 on the CPU by default, streaming with chunks of k = 2 latent frames. For each model:
MACs per output frame (meta-device count), measured seconds per output frame, the time until a
stream's first frames come back (time to first frame), and both ratios to the teacher. A
per-stage table then says where the time goes (share of time vs share of MACs), which is what to
look at when the measured speed-up falls short of the MACs ratio.

    python benchmarks/student_speed.py                       # Wan2.1 and its presets
    python benchmarks/student_speed.py --family wan2.2       # Wan2.2 (TI2V-5B) and flash-wan2.2
    python benchmarks/student_speed.py --size 128 --frames 3 # quicker
    python benchmarks/student_speed.py --family mochi --size 128 --frames 3   # Mochi 1 (6n+1 frames)
    python benchmarks/student_speed.py --plain               # also the plain ops (before the fast paths)
    python benchmarks/student_speed.py --presets flash-wan2.1 --profile flash-wan2.1   # per-op table
    python benchmarks/student_speed.py --compile inductor    # through engines.load(..., compile=...)

``--plain`` times every model a second time, interleaved, under ``blocks.plain_ops()`` (no
channels-last, nothing in place), so one run gives the before/after of the fast eager paths.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict

import torch

from flashvaed.models import StudentSpec, families, summarize
from flashvaed.models.blocks import plain_ops
from flashvaed.models.streaming import iter_decode
from flashvaed.models.student import build_student, preset_names


@torch.inference_mode()
def one_decode(model: torch.nn.Module, latents: torch.Tensor, chunk: int) -> tuple[float, float]:
    """Seconds per frame over one streaming decode, and seconds until its first frames came back
    (the time to first frame: a causal family's first step, a latency family's warm-up steps too)."""
    start = time.perf_counter()
    frames, first = 0, None
    for piece in iter_decode(model, latents, chunk):
        frames += piece.shape[2]
        if first is None and frames:
            first = time.perf_counter() - start
    return (time.perf_counter() - start) / frames, first


def seconds_per_frame(model: torch.nn.Module, latents: torch.Tensor, chunk: int, repeats: int) -> float:
    return statistics.median(one_decode(model, latents, chunk)[0] for _ in range(repeats))


def interleaved(
    model, latents: torch.Tensor, chunk: int, repeats: int, modes: list[str]
) -> dict[str, tuple[float, float]]:
    """Median seconds per frame and to the first frames under each mode ("fast", "plain"), repeats
    interleaved so that a noisy neighbour on the machine hits both alike."""
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            with plain_ops() if mode == "plain" else contextlib.nullcontext():
                runs[mode].append(one_decode(model, latents, chunk))
    return {m: tuple(statistics.median(column) for column in zip(*v, strict=True)) for m, v in runs.items()}


@torch.inference_mode()
def op_profile(model, latents: torch.Tensor, chunk: int, plain: bool, rows: int = 25) -> str:
    """torch.profiler's per-op table (self CPU time) over one decode, ops grouped by input shape."""
    from torch.profiler import ProfilerActivity, profile

    with plain_ops() if plain else contextlib.nullcontext():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in iter_decode(model, latents, chunk):
                pass
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)


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
    parser.add_argument("--plain", action="store_true", help="also time the plain ops (blocks.plain_ops)")
    parser.add_argument("--profile", nargs="+", default=[], metavar="MODEL", help="per-op tables of these models")
    parser.add_argument("--compile", default=None, help="run through engines.load(model, compile=MODE)")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

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
    runners = dict(models)
    if args.compile is not None:
        from flashvaed import engines

        runners = {n: engines.load(m, compile=args.compile) for n, m in models.items()}
        print(f"runtime: engines.load(..., compile={args.compile!r})")
    modes = ["fast", "plain"] if args.plain else ["fast"]
    timings: dict[str, dict[str, float]] = {}
    for name, model in runners.items():
        start = time.perf_counter()
        for mode in modes:  # warm-up (and compile)
            with plain_ops() if mode == "plain" else contextlib.nullcontext():
                seconds_per_frame(model, latents[:, :, :2], args.chunk, 1)
        if args.compile is not None:
            print(f"{name}: warm-up {time.perf_counter() - start:.1f} s")
        repeats = 1 if name == "teacher" else args.repeats
        timings[name] = interleaved(model, latents, args.chunk, repeats, modes)
    t_macs = summaries["teacher"].macs_per_frame
    for mode in modes:
        t_time = timings["teacher"][mode][0]
        label = "fast paths (default)" if mode == "fast" else "plain ops (blocks.plain_ops, before)"
        print(f"\n{label}:")
        print("| model | params (M) | GMACs/frame | MACs ratio | s/frame | frames/s | first frames ms | speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for name in models:
            s, (sec, first) = summaries[name], timings[name][mode]
            print(
                f"| {name} | {s.params_decoder / 1e6:.2f} | {s.macs_per_frame / 1e9:.2f} | "
                f"{t_macs / s.macs_per_frame:.1f}x | {sec:.4f} | {1 / sec:.2f} | {1e3 * first:.1f} | "
                f"{t_time / sec:.1f}x |"
            )
    if args.plain:
        for i, what in enumerate(("per frame", "to the first frames")):
            gains = ", ".join(f"{n} {t['plain'][i] / t['fast'][i]:.2f}x" for n, t in timings.items())
            print(f"\nfast paths vs plain ops, {what}: {gains}")
    for name in args.profile:
        for mode in modes:
            print(f"\nper-op profile of {name}, {mode}:")
            print(op_profile(models[name], latents, args.chunk, mode == "plain"))
    if args.no_stages:
        return

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
