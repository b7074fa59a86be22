"""How close the meta-device memory estimate (``flashvaed.models.memory``) comes to what a decode
step really takes, for every family's embedded teacher (prints a table).

Each row runs in a fresh process: the estimate of one steady decode step, then the step itself on
the CPU, measured as the growth of the peak resident set. Their ratio is what the budget checks
of decode, encode, prune, evaluate and demo rely on; real runs add a roughly constant overhead
(allocator, library buffers) that the estimate leaves out.

    python benchmarks/memory_estimate.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

ROWS = [("wan2.1", 48, 2), ("wan2.1", 96, 1), ("wan2.2", 48, 2), ("ltx", 24, 2), ("mochi", 48, 2)]

ONE_ROW = """
import gc, json, resource, sys, torch
from flashvaed.demo import embedded_teacher_path
from flashvaed.models import load_model
from flashvaed.models.memory import decode_step_bytes
from flashvaed.models.streaming import clocked, zero_state
family, side, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = load_model(embedded_teacher_path(family)).eval()
estimate = decode_step_bytes(model, 1, chunk, side, side)
state = zero_state(model.decoder_state_specs(), 1, side, side)
inputs = model.stream_inputs(1, side, side) if model.step_inputs else {}
clock = {"position": 1 << 20} if clocked(model) else {}
z = torch.randn(1, model.latent_channels, chunk, side, side)
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    model.decode_step(z, state, **inputs, **clock)
real = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"estimate": estimate, "real": real}))
"""


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("| teacher | latents | chunk | estimate MiB | measured MiB | measured / estimate |")
    print("|---|---|---:|---:|---:|---:|")
    for family, side, chunk in ROWS:
        out = subprocess.run(
            [sys.executable, "-c", ONE_ROW, family, str(side), str(chunk)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        est, real = r["estimate"] / 2**20, r["real"] / 2**20
        print(f"| {family} | {side}x{side} | {chunk} | {est:.0f} | {real:.0f} | {real / est:.2f} |")


if __name__ == "__main__":
    main()
