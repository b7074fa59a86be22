"""Spatially sharded decoding: time and per-rank peak memory, 1 vs N ranks (CPU, gloo).

Each rank count is one launch of torch.distributed's own launcher (``torchrun``) running this file
as a worker: every rank builds the same teacher (random weights; the family's tiny configuration
by default), decodes the same latents sharded (``gather="rank0"``, as ``decode --shard spatial``
does; rank 0 writes each chunk's frames to disk and drops them) and reports its decode time and
peak resident memory (``resource.getrusage``), both whole and above what it held before decoding.
The frames of every rank count are compared with the first rank count's and with a float64
single-process decode of the same model (the exact frames, up to float64 rounding): float32
decodes differ from it by their own rounding, and sharding must not add to that.

    python benchmarks/sharded.py                                   # wan2.1 tiny, 64x112 latent, 1 and 2 ranks
    python benchmarks/sharded.py --family mochi --height 48 --width 80 --ranks 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    """One rank: build, decode sharded, write the frames (rank 0) and this rank's numbers."""
    import torch.distributed as dist

    from flashvaed.engines.sharded import init_distributed, sharded
    from flashvaed.engines.torch_backend import TorchDecoder
    from flashvaed.models import families

    rank, world = init_distributed()
    torch.set_num_threads(args.threads)
    family = families.get(args.family)
    torch.manual_seed(0)
    model = family.teacher_type(family.tiny_config()).eval()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, model.latent_channels, args.frames, args.height, args.width, generator=g)
    decoder = sharded(TorchDecoder(model), gather="rank0")
    report = decoder.sharding_report(args.height, args.width)
    out = Path(args.out)
    before, before_peak = rss_mib(), peak_rss_mib()
    dist.barrier()
    start = time.perf_counter()
    for i, piece in enumerate(decoder.iter_decode(latents, chunk=args.chunk)):
        if rank == 0:
            torch.save(piece, out / f"ranks{world}-piece{i}.pt")
    seconds = time.perf_counter() - start
    numbers = {
        "rank": rank,
        "seconds": seconds,
        "peak_mib": peak_rss_mib(),
        "decode_mib": peak_rss_mib() - before,
        "peak_before_mib": before_peak,
        "rows": report["regions"][rank][1] - report["regions"][rank][0],
        "redundancy": report["redundancy"],
    }
    (out / f"ranks{world}-rank{rank}.json").write_text(json.dumps(numbers))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan2.1")
    parser.add_argument("--height", type=int, default=64, help="latent rows")
    parser.add_argument("--width", type=int, default=112, help="latent columns")
    parser.add_argument("--frames", type=int, default=2, help="latent frames")
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--fp64", action=argparse.BooleanOptionalAction, default=True, help="compare with a float64 decode"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from flashvaed.engines.torch_backend import TorchDecoder
    from flashvaed.models import families

    family = families.get(args.family)
    torch.manual_seed(0)
    model = family.teacher_type(family.tiny_config()).eval()  # the workers' model: the same seed
    s = model.spatial_factor
    truth = None
    if args.fp64:  # the float64 decode: how far each float32 decode is from the exact frames
        g = torch.Generator().manual_seed(1)
        latents = torch.randn(1, model.latent_channels, args.frames, args.height, args.width, generator=g)
        truth = TorchDecoder(model.double()).decode(latents.double(), chunk=args.chunk)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
            cmd += ["--master-port", str(free_port()), __file__, "--worker", "--out", tmp]
            for key in ("family", "height", "width", "frames", "chunk", "threads"):
                cmd += [f"--{key}", str(getattr(args, key))]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
            subprocess.run(cmd, env=env, check=True)
            ranks = [json.loads((Path(tmp) / f"ranks{n}-rank{r}.json").read_text()) for r in range(n)]
            pieces = sorted(Path(tmp).glob(f"ranks{n}-piece*.pt"), key=lambda p: int(p.stem.split("piece")[1]))
            frames = torch.cat([torch.load(p) for p in pieces], dim=2)
            if n == args.ranks[0]:
                reference = frames
            rows.append(
                {
                    "ranks": n,
                    "seconds": max(r["seconds"] for r in ranks),
                    "peak_mib": [round(r["peak_mib"]) for r in ranks],
                    "decode_mib": [round(r["decode_mib"]) for r in ranks],
                    "latent_rows": [r["rows"] for r in ranks],
                    "redundancy": ranks[0]["redundancy"],
                    "max_abs_vs_first": (frames - reference).abs().max().item(),
                    "max_abs_vs_fp64": None if truth is None else (frames - truth).abs().max().item(),
                }
            )
    h, w = args.height, args.width
    size = f"{h}x{w} latent ({h * s}x{w * s} px)"
    print(f"\n{args.family} tiny teacher, {size}, {args.frames} latent frames, chunk {args.chunk}, CPU, gloo\n")
    print("| ranks | time (s) | peak RSS per rank (MiB) | decode's growth per rank (MiB) | latent rows per rank "
          "| redundancy | max abs vs 1 rank | max abs vs float64 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['seconds']:.1f} | {' / '.join(map(str, r['peak_mib']))} "
            f"| {' / '.join(map(str, r['decode_mib']))} | {' / '.join(map(str, r['latent_rows']))} "
            f"| {r['redundancy']:.2f} | {r['max_abs_vs_first']:.1e} "
            f"| {'-' if r['max_abs_vs_fp64'] is None else format(r['max_abs_vs_fp64'], '.1e')} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
