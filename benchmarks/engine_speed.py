"""Per-chunk latency of a teacher and its flash student on each runtime, in one run (prints a table).

A family's full-width teacher (``--family``, default Wan2.1 at base 96; random weights) and the
flash-<family> student built on it, at 256x256, steady chunks of k = 2 latent frames (8 output
frames for Wan). Runtimes: torch eager (CPU, and CUDA where present, with and without the fused
Triton kernel) and ONNX Runtime (CPU provider) on a static export with plugin nodes. Each cell
is the median of timed steady chunks after a warm-up chunk; the state carried between chunks is
real.

    python benchmarks/engine_speed.py                 # the issue's table
    python benchmarks/engine_speed.py --size 128      # quicker
    python benchmarks/engine_speed.py --family mochi --size 64 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flashvaed import engines
from flashvaed.engines.base import Decoder
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.models import StudentSpec, families
from flashvaed.models.student import build_student


def chunk_latency(decoder: Decoder, latents: torch.Tensor, chunk: int, repeats: int) -> float:
    """Median seconds per steady chunk (after the first frame and one warm-up chunk)."""
    stream = decoder.stream()
    stream.push(latents[:, :, :1])
    stream.push(latents[:, :, 1 : 1 + chunk])
    times = []
    for i in range(repeats):
        piece = latents[:, :, 1 + chunk * (i % 2) : 1 + chunk * (i % 2 + 1)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        stream.push(piece)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan2.1", help="a model family (its released configuration)")
    parser.add_argument("--base-dim", type=int, default=None, help="Wan families: the base width (default 96)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    family = families.get(args.family)
    config = family.config_type(**({"base_dim": args.base_dim} if args.base_dim else {}))
    student = f"flash-{family.name}"
    models = {"teacher": family.teacher_type(config).eval()}
    models[student] = build_student(StudentSpec.load(student), config)[0]
    teacher = models["teacher"]
    if getattr(teacher, "latency", 0):
        raise SystemExit(f"engine_speed: {family.name} decodes on a clock; see benchmarks/ltx_streaming.py")
    h = args.size // teacher.spatial_factor
    latents = torch.randn(1, teacher.latent_channels, 1 + 2 * args.chunk, h, h)
    rows: dict[str, dict[str, float]] = {name: {} for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            model.eval()
            rows[name]["torch eager CPU"] = chunk_latency(engines.load(model), latents, args.chunk, args.repeats)
            options = ExportOptions(chunk=str(args.chunk), height=str(args.size), width=str(args.size), batch="1")
            export(model, Path(tmp) / name, options)
            decoder = engines.load(Path(tmp) / name, providers=["CPUExecutionProvider"])
            rows[name]["onnxruntime CPU"] = chunk_latency(decoder, latents, args.chunk, args.repeats)
            if torch.cuda.is_available():
                cuda = engines.load(model, device="cuda")
                rows[name]["torch eager CUDA"] = chunk_latency(cuda, latents, args.chunk, args.repeats * 3)
                try:
                    fused = engines.load(model, device="cuda", kernel="triton")
                    rows[name]["torch CUDA + Triton kernel"] = chunk_latency(
                        fused, latents, args.chunk, args.repeats * 3
                    )
                except Exception as e:  # report, do not hide, a kernel that cannot run here
                    print(f"triton kernel unavailable for {name}: {e}")
                models[name] = model.to("cpu")
    runtimes = list(rows["teacher"])
    print(
        f"{family.title} ({family.describe(config)}), {args.size}x{args.size}, steady chunk k={args.chunk} "
        f"({teacher.temporal_factor * args.chunk} frames), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{'runtime':28} {'teacher s/chunk':>16} {'student s/chunk':>16} {'speed-up':>9}")
    for rt in runtimes:
        t, s = rows["teacher"][rt], rows[student].get(rt, float("nan"))
        print(f"{rt:28} {t:16.3f} {s:16.4f} {t / s:8.1f}x")
    base = "torch eager CPU"
    for rt in runtimes:
        if rt != base and "CPU" in rt:
            ratios = ", ".join(f"{n} {rows[n][base] / rows[n][rt]:.2f}x" for n in rows)
            print(f"{rt} vs {base}: {ratios}")


if __name__ == "__main__":
    main()
