"""Which kernel each 3D conv of a decode should run on a CPU: torch's own or oneDNN (prints tables).

torch picks its own kernel (im2col + GEMM, ``slow_conv3d``) for a contiguous fp32 conv3d below
~20k rows of N*C*T*H, a rule made for 2D convs; ``blocks.conv3d`` sends such convs to oneDNN
unless they are 1x1x1 or their weight dwarfs their input (``blocks.WEIGHT_PER_POSITION``). This
script decodes a clip with each model (full size, random weights, torch eager, streaming in chunks
of 2 latent frames) and, at every contiguous conv with a spatial kernel, times both kernels on
that very input (best of two each, interleaved). Per model it prints what the routed convs cost in
each kernel, what the unrouted ones would, and the shapes where the two differ most: the before and
after of the routing in one run, and the check of its threshold.

    python benchmarks/conv_choice.py --family ltx                 # teacher and every LTX preset, 256x256
    python benchmarks/conv_choice.py --family mochi --size 128 --frames 3
    python benchmarks/conv_choice.py --family ltx --models lite-ltx --rows 20
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flashvaed.models import StudentSpec, blocks, families
from flashvaed.models.streaming import iter_decode
from flashvaed.models.student import build_student, preset_names


def best_of_two(fn: Callable[[], torch.Tensor], other: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """Seconds of ``fn`` and ``other``, each the best of two calls, interleaved."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(2):
        for i, f in enumerate((fn, other)):
            start = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


class ConvTimes:
    """Wraps ``blocks.conv3d``: times torch's kernel and oneDNN on each contiguous fp32 conv with a
    spatial kernel, grouped by (input shape, weight shape, groups)."""

    def __init__(self) -> None:
        self.rows: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # calls, torch s, oneDNN s
        self.routed: dict[tuple, bool] = {}
        self._real = blocks.conv3d

    def __call__(self, x, weight, bias, padding, groups=1, stride=(1, 1, 1)):
        spatial = weight.shape[-1] > 1 or weight.shape[-2] > 1
        if x.dtype != torch.float32 or blocks.is_channels_last(x) or not spatial:
            return self._real(x, weight, bias, padding, groups, stride)
        one = [1, 1, 1]
        t, o = best_of_two(
            lambda: F.conv3d(x, weight, bias, stride=stride, padding=padding, groups=groups),
            lambda: torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), one, groups),
        )
        key = (tuple(x.shape), tuple(weight.shape), groups)
        row = self.rows[key]
        row[0] += 1
        row[1] += t
        row[2] += o
        self.routed[key] = blocks._onednn_pays(x, weight)
        return self._real(x, weight, bias, padding, groups, stride)

    def __enter__(self) -> ConvTimes:
        blocks.conv3d = self  # module_conv3d and the streaming steps look it up at call time
        return self

    def __exit__(self, *exc: object) -> None:
        blocks.conv3d = self._real


def report(name: str, times: ConvTimes, rows: int) -> None:
    for routed in (True, False):
        keys = [k for k in times.rows if times.routed[k] == routed]
        t = sum(times.rows[k][1] for k in keys)
        o = sum(times.rows[k][2] for k in keys)
        what = "routed to oneDNN" if routed else "left to torch (1x1x1 excluded)"
        ratio = f"{t / o:.2f}x" if o else "-"
        print(f"{name}: {len(keys)} shapes {what}: torch's kernel {1e3 * t:.1f} ms, oneDNN {1e3 * o:.1f} ms ({ratio})")
    print("| input | weight | groups | calls | torch ms | oneDNN ms | torch/oneDNN | routed |")
    print("|---|---|---|---|---|---|---|---|")
    by_gap = sorted(times.rows.items(), key=lambda kv: -abs(kv[1][1] - kv[1][2]))
    for (shape, wshape, groups), (calls, t, o) in by_gap[:rows]:
        routed = "yes" if times.routed[(shape, wshape, groups)] else "no"
        print(f"| {shape} | {wshape} | {groups} | {calls} | {1e3 * t:.2f} | {1e3 * o:.2f} | {t / o:.2f}x | {routed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="ltx", choices=families.names())
    parser.add_argument("--models", nargs="+", default=None, help="teacher and/or presets (default: all)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--rows", type=int, default=8, help="shapes listed per model, largest gap first")
    args = parser.parse_args()

    torch.manual_seed(0)
    family = families.get(args.family)
    config = family.config_type()
    teacher = family.teacher_type(config).eval()
    s = teacher.spatial_factor
    latents = torch.randn(1, teacher.latent_channels, args.frames, args.size // s, args.size // s)
    print(
        f"{family.title} ({family.describe(config)}), {args.size}x{args.size}, {args.frames} latent frames, chunk 2, "
        f"CPU {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for name in args.models or ["teacher", *preset_names(args.family)]:
        model = teacher if name == "teacher" else build_student(StudentSpec.load(name), config)[0].eval()
        with torch.inference_mode(), ConvTimes() as times:
            for _ in iter_decode(model, latents, 2):
                pass
        report(name, times, args.rows)
        print()


if __name__ == "__main__":
    main()
