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
    python benchmarks/engine_speed.py --compile inductor   # adds torch compiled (engines.load(compile=...))
    python benchmarks/engine_speed.py --ort-profile        # ONNX Runtime's time per op type, per model
    python benchmarks/engine_speed.py --dynamic --no-teacher   # + `flashvaed export`'s default ranges
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


def ort_profile(folder: Path, rows: int = 15) -> str:
    """ONNX Runtime's own profile of one step of the graph in ``folder`` (random inputs of its static
    shapes, after a warm-up run): total time and count per op type, largest first."""
    import json

    import numpy as np
    import onnxruntime as ort

    graph = max(folder.glob("*.onnx"), key=lambda p: p.stat().st_size)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort_profile")
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    session.run(None, feed)  # warm-up
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    last = runs[-1]["ts"] if runs else 0
    totals: dict[str, list[float]] = {}
    for e in kernels:
        if e["ts"] >= last:
            t = totals.setdefault(e["args"]["op_name"], [0.0, 0])
            t[0] += e["dur"] / 1e3
            t[1] += 1
    total = sum(v[0] for v in totals.values())
    lines = [f"{'op':24} {'ms':>9} {'share':>6} {'nodes':>6}"]
    for op, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{op:24} {ms:9.1f} {100 * ms / total:5.1f}% {n:6d}")
    return "\n".join([*lines, f"{'total':24} {total:9.1f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan2.1", help="a model family (its released configuration)")
    parser.add_argument("--base-dim", type=int, default=None, help="Wan families: the base width (default 96)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default=None, help="also time engines.load(model, compile=MODE) on the CPU")
    parser.add_argument("--ort-profile", action="store_true", help="print ONNX Runtime's time per op type")
    parser.add_argument(
        "--dynamic", action="store_true",
        help="also time an export with `flashvaed export`'s default (dynamic) ranges",
    )  # fmt: skip
    parser.add_argument("--no-teacher", action="store_true", help="time the student only")
    args = parser.parse_args()

    torch.manual_seed(0)
    family = families.get(args.family)
    config = family.config_type(**({"base_dim": args.base_dim} if args.base_dim else {}))
    student = f"flash-{family.name}"
    teacher = family.teacher_type(config).eval()
    models = {} if args.no_teacher else {"teacher": teacher}
    models[student] = build_student(StudentSpec.load(student), config)[0]
    if getattr(teacher, "latency", 0):
        raise SystemExit(f"engine_speed: {family.name} decodes on a clock; see benchmarks/ltx_streaming.py")
    h = args.size // teacher.spatial_factor
    latents = torch.randn(1, teacher.latent_channels, 1 + 2 * args.chunk, h, h)
    rows: dict[str, dict[str, float]] = {name: {} for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            model.eval()
            rows[name]["torch eager CPU"] = chunk_latency(engines.load(model), latents, args.chunk, args.repeats)
            if args.compile is not None:
                compiled = engines.load(model, compile=args.compile)
                rows[name][f"torch {args.compile} CPU"] = chunk_latency(compiled, latents, args.chunk, args.repeats)
            options = ExportOptions(chunk=str(args.chunk), height=str(args.size), width=str(args.size), batch="1")
            export(model, Path(tmp) / name, options)
            decoder = engines.load(Path(tmp) / name, providers=["CPUExecutionProvider"])
            rows[name]["onnxruntime CPU"] = chunk_latency(decoder, latents, args.chunk, args.repeats)
            if args.ort_profile:
                print(f"\nONNX Runtime, {name}, one steady step: time per op type")
                print(ort_profile(Path(tmp) / name))
            if args.dynamic:  # its 3D convs stay im2col convs: banding needs the frame count
                export(model, Path(tmp) / f"{name}-dynamic", ExportOptions())
                dynamic = engines.load(Path(tmp) / f"{name}-dynamic", providers=["CPUExecutionProvider"])
                timed = chunk_latency(dynamic, latents, args.chunk, args.repeats)
                rows[name]["onnxruntime CPU, dynamic export"] = timed
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
    runtimes = list(next(iter(rows.values())))
    print(
        f"{family.title} ({family.describe(config)}), {args.size}x{args.size}, steady chunk k={args.chunk} "
        f"({teacher.temporal_factor * args.chunk} frames), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"{'runtime':40} {'teacher s/chunk':>16} {'student s/chunk':>16} {'speed-up':>9}")
    for rt in runtimes:
        t, s = rows.get("teacher", {}).get(rt, float("nan")), rows[student].get(rt, float("nan"))
        print(f"{rt:40} {t:16.3f} {s:16.4f} {t / s:8.1f}x")
    base = "torch eager CPU"
    for rt in runtimes:
        if rt != base and "CPU" in rt:
            ratios = ", ".join(f"{n} {rows[n][base] / rows[n][rt]:.2f}x" for n in rows)
            print(f"{rt} vs {base}: {ratios}")


if __name__ == "__main__":
    main()
