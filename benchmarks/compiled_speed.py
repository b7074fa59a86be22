"""Eager vs compiled (inductor) and ONNX Runtime, full-size Wan2.1 teacher and flash-wan2.1, in one run.

Random weights with the released configuration (as benchmarks/student_speed.py), streaming through
``engines.load``; prints each model's first decode (the inductor one includes its compile), then
interleaved repeats and a table of medians (seconds per output frame) with speed-ups.

    python benchmarks/compiled_speed.py --ort            # 256x256, 3 latent frames, chunk 2
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flashvaed import engines
from flashvaed.models import StudentSpec, families
from flashvaed.models.student import build_student

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=256)
ap.add_argument("--frames", type=int, default=3)
ap.add_argument("--chunk", type=int, default=2)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--ort", action="store_true")
args = ap.parse_args()
torch.manual_seed(0)
fam = families.get("wan2.1")
cfg = fam.config_type()
models = {
    "teacher": fam.teacher_type(cfg).eval(),
    "flash-wan2.1": build_student(StudentSpec.load("flash-wan2.1"), cfg)[0].eval(),
}
s = 8
z = torch.randn(1, 16, args.frames, args.size // s, args.size // s)
nframes = 1 + 4 * (args.frames - 1)
print(
    f"Wan2.1 {args.size}x{args.size}, {args.frames} latent frames -> {nframes} frames, chunk {args.chunk}, "
    f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    flush=True,
)
decoders = {}
compile_s = {}
for name, m in models.items():
    decoders[(name, "eager")] = engines.load(m)
    t = time.perf_counter()
    decoders[(name, "eager")].decode(z, chunk=args.chunk)
    first = time.perf_counter() - t
    print(f"{name} eager first decode {first:.2f}s", flush=True)
    d = engines.load(m, compile="inductor")
    t = time.perf_counter()
    d.decode(z, chunk=args.chunk)
    total = time.perf_counter() - t
    compile_s[name] = (total, sum(d.steady.compile_seconds.values()))
    print(
        f"{name} inductor first decode {total:.2f}s (steady step incl. compile {compile_s[name][1]:.2f}s)", flush=True
    )
    decoders[(name, "inductor")] = d
if args.ort:
    from flashvaed.export.onnx_export import ExportOptions, export

    tmp = Path(tempfile.mkdtemp())
    for name, m in models.items():
        t = time.perf_counter()
        export(
            m, tmp / name, ExportOptions(chunk=str(args.chunk), height=str(args.size), width=str(args.size), batch="1")
        )
        d = engines.load(tmp / name)
        d.decode(z, chunk=args.chunk)
        print(f"{name} onnx export+load+first decode {time.perf_counter() - t:.1f}s", flush=True)
        decoders[(name, "onnxruntime")] = d
runs = {k: [] for k in decoders}
for r in range(args.repeats):
    for k, d in decoders.items():
        if k[0] == "teacher" and r >= max(1, args.repeats - 1):
            continue
        t = time.perf_counter()
        d.decode(z, chunk=args.chunk)
        runs[k].append((time.perf_counter() - t) / nframes)
    print("repeat", r, {f"{k[0]}/{k[1]}": round(v[-1], 4) for k, v in runs.items() if v}, flush=True)
med = {k: statistics.median(v) for k, v in runs.items()}
base = med[("teacher", "eager")]
print("\n| model | runtime | s/frame | frames/s | vs teacher eager | vs teacher same runtime | first decode (s) |")
print("|---|---|---|---|---|---|---|")
for (name, rt), v in med.items():
    same = med.get(("teacher", rt))
    comp = f"{compile_s[name][0]:.1f}" if rt == "inductor" else ""
    vs_same = f"{same / v:.1f}x" if same else ""
    print(f"| {name} | {rt} | {v:.4f} | {1 / v:.2f} | {base / v:.1f}x | {vs_same} | {comp} |")
