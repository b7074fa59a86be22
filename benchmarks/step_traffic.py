"""Memory traffic of one steady streaming step, op by op: what an unfused eager GPU run must move.

    PYTHONPATH=. python benchmarks/step_traffic.py                        # Wan2.1 teacher vs flash-wan2.1, 480x832
    PYTHONPATH=. python benchmarks/step_traffic.py --family wan2.2 --height 704 --width 1280 --top 5
    PYTHONPATH=. python benchmarks/step_traffic.py --family ltx --height 512 --width 768   # past the warm-up

Runs the full-size models on the meta device (nothing is allocated) under a dispatch mode that
adds up, for every aten op that is not a view, the bytes of its tensor inputs and outputs. This
is an upper bound on what a fused implementation must move and a lower bound on what eager torch
moves (each op reads its inputs from memory and writes its outputs back). Divided by a GPU's
bandwidth it gives the time a memory-bound eager step cannot beat. Also printed: ops per step,
which are kernel launches in eager mode.
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashvaed.models import StudentSpec, families, zero_state
from flashvaed.models.memory import meta_step_inputs
from flashvaed.models.streaming import clocked
from flashvaed.models.student import build_student

VIEWS = {
    "aten.view.default", "aten._unsafe_view.default", "aten.slice.Tensor", "aten.select.int", "aten.permute.default",
    "aten.transpose.int", "aten.expand.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
    "aten.alias.default", "aten.as_strided.default", "aten.t.default", "aten.detach.default", "aten.split.Tensor",
    "aten.chunk.default", "aten.unbind.int", "aten.reshape.default", "aten.narrow.default",
}  # fmt: skip
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Traffic(TorchDispatchMode):
    """Bytes read and written per op name (views excluded: they move nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name not in VIEWS and not name.startswith("aten.empty"):  # an allocation moves nothing
            outputs = list(out) if isinstance(out, tuple | list) else [out]
            inputs = [*args, *(v for k, v in kwargs.items() if k != "out")]  # ``out=`` is written, not read
            tensors = [t for a in [*inputs, *outputs]
                       for t in (a if isinstance(a, tuple | list) else [a]) if isinstance(t, torch.Tensor)]  # fmt: skip
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
            self.calls[name] += 1
        return out


def step_traffic(model: torch.nn.Module, height: int, width: int, chunk: int, dtype: torch.dtype) -> Traffic:
    """One steady step (after the first) of ``model`` on the meta device, counted; a decoder on a
    clock (LTX) is counted deep inside a clip, past its warm-up, every layer busy."""
    f = model.spatial_factor
    h, w = height // f, width // f
    latents = torch.empty(1, model.latent_channels, 1 + chunk, h, w, device="meta", dtype=dtype)
    state = zero_state(model.decoder_state_specs(), 1, h, w, device="meta", dtype=dtype)
    inputs = {  # a stream's timestep and noise maps, in the model's dtype
        k: [t.to(dtype) for t in v] if isinstance(v, list) else v.to(dtype) if isinstance(v, torch.Tensor) else v
        for k, v in meta_step_inputs(model, 1, h, w).items()
    }
    traffic = Traffic()
    with torch.no_grad():
        if clocked(model):
            with traffic:
                model.decode_step(latents[:, :, 1:], state, position=1 << 20, **inputs)
            return traffic
        _, state = model.decode_step(latents[:, :, :1], state, first=True, **inputs)
        with traffic:
            model.decode_step(latents[:, :, 1:], state, **inputs)
    return traffic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="wan2.1", help="a model family (default wan2.1)")
    parser.add_argument("--presets", nargs="*", default=None, help="students (default: flash-FAMILY)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--chunk", type=int, default=2, help="latent frames per steady step")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--bandwidth", type=float, default=4.3, help="TB/s for the time bound (H200: 4.3 copy rate)")
    parser.add_argument("--top", type=int, default=6, help="ops listed per model")
    args = parser.parse_args()
    family = families.get(args.family)
    dtype = DTYPES[args.dtype]
    models: dict[str, Any] = {"teacher": lambda c: family.teacher_type(c)}
    for preset in args.presets or [f"flash-{args.family}"]:
        models[preset] = lambda c, p=preset: build_student(StudentSpec.load(p), c)[0]
    print(f"{args.family} at {args.height}x{args.width}, chunk {args.chunk}, {args.dtype}, meta device")
    for name, build in models.items():
        with torch.device("meta"):
            model = build(family.config_type()).eval().to(dtype)
        traffic = step_traffic(model, args.height, args.width, args.chunk, dtype)
        frames = model.temporal_factor * args.chunk
        gb = sum(traffic.bytes.values()) / frames / 1e9
        ops = sum(traffic.calls.values())
        print(
            f"{name}: {ops} ops per step ({ops / frames:.0f} per frame), {gb:.2f} GB per frame read + written, "
            f">= {gb / args.bandwidth:.2f} ms per frame at {args.bandwidth} TB/s"
        )
        for op, n in traffic.bytes.most_common(args.top):
            print(f"    {op:40s} {n / frames / 1e9:6.2f} GB/frame  {traffic.calls[op]:4d} calls per step")


if __name__ == "__main__":
    main()
