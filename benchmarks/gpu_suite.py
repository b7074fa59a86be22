"""What a CPU cannot show, in one run on a CUDA GPU (prints tables; JSON with --json).

1. Exactness on the GPU, per family (small random models): fp32 streaming decode vs a float64
   CPU reference, every chunking vs one-shot, the fused Triton kernel vs the torch ops.
2. The streaming causal conv alone at full-size layer shapes: Triton kernel vs cuDNN (cat +
   conv3d + slice), fp32 and bf16.
3. Decode speed and peak memory, per family at its resolution (Wan2.1 480x832, Wan2.2
   704x1280), full-size teacher vs its flash student, fp32 and bf16, torch convs and the Triton
   kernel (random weights: speed does not depend on the values).
4. Fidelity of half precisions: bf16 / fp16 decodes vs fp32 (PSNR), teacher and student.

Needs only torch, triton, safetensors, pyyaml and numpy (no PyAV, ONNX Runtime or polygraphy):

    PYTHONPATH=. python benchmarks/gpu_suite.py                # about 5 minutes on an H100/H200
    PYTHONPATH=. python benchmarks/gpu_suite.py --quick        # smaller clips, one family
    python benchmarks/gpu_suite.py --smoke                     # on the CPU, tiny: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time

import torch

from flashvaed.models import StreamingDecoder, StudentSpec, families
from flashvaed.models.blocks import fused_steps, streaming_conv3d
from flashvaed.models.student import build_student

RESULTS: dict[str, list[dict]] = {"exactness": [], "kernel": [], "speed": [], "fidelity": [], "errors": []}
SMOKE = False  # --smoke: CPU, tiny models and sizes, no Triton (a dry run of the script itself)
DEVICE = "cuda"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    print(f"\n### {title}\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


def attempt(label: str, fn, *args) -> None:
    """Run one measurement; a failure is recorded and the suite goes on to the next."""
    try:
        fn(*args)
    except Exception as e:
        RESULTS["errors"].append({"where": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(f"[{label} failed: {type(e).__name__}: {e}]", flush=True)


def sync_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, and its last result."""
    fn()
    synchronize()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        synchronize()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), out


def triton_convs(model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    if SMOKE:
        return contextlib.nullcontext()
    from flashvaed.engines.kernel import streaming_causal_conv3d

    return fused_steps(model, streaming_causal_conv3d)


def decode(model: torch.nn.Module, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    stream = StreamingDecoder(model)
    pieces = [stream.push(latents[:, :, :1])]
    pieces += [stream.push(latents[:, :, s : s + chunk]) for s in range(1, latents.shape[2], chunk)]
    return torch.cat(pieces, dim=2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def models_of(family_name: str, small: bool, device: str) -> dict[str, torch.nn.Module]:
    family = families.get(family_name)
    config = family.config_type(base_dim=8, decoder_base_dim=16 if SMOKE else 64) if small else family.config_type()
    with torch.device(device):
        torch.manual_seed(0)
        teacher = family.teacher_type(config).eval()
        student = build_student(StudentSpec.load(f"flash-{family_name}"), config)[0].eval()
    return {"teacher": teacher, f"flash-{family_name}": student}


# ---------------------------------------------------------------------------------------------
def exactness(family_name: str) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for name, model in models_of(family_name, small=True, device=DEVICE).items():
        torch.manual_seed(1)
        z = torch.randn(2, model.latent_channels, 5, 4, 6, device=DEVICE)
        with torch.inference_mode():
            one_shot = model.decode(z)
            ref = model.double().cpu().decode(z.double().cpu())
            model.float().to(DEVICE)
            chunked = max((model.decode(z, chunk=k) - one_shot).abs().max().item() for k in (1, 2, 3))
            try:
                with triton_convs(model):
                    fused = (model.decode(z, chunk=2) - one_shot).abs().max().item()
            except Exception as e:
                fused = f"failed: {type(e).__name__}"
        rel = float((one_shot.double().cpu() - ref).norm() / ref.norm())
        RESULTS["exactness"].append(
            {"family": family_name, "model": name, "fp32 vs fp64 (rel)": rel, "chunkings max diff": chunked,
             "triton vs torch max diff": fused}
        )  # fmt: skip


def kernel_alone(dtype: torch.dtype) -> None:
    """The streaming causal conv of Wan2.1's up.3 (96 ch) and Wan2.2's up.3 (256 ch), chunk 2 -> 8 frames."""
    from triton.testing import do_bench

    from flashvaed.engines.kernel import streaming_causal_conv3d

    for label, c, h, w, groups in (
        ("wan2.1 up.3 3x3x3, 96 ch, 480x832", 96, 480, 832, 1),
        ("wan2.2 up.3 3x3x3, 256 ch, 352x640", 256, 352, 640, 1),
        ("flash-wan2.1 up.1 depthwise, 384 ch, 120x208", 384, 120, 208, 384),
    ):
        torch.manual_seed(0)
        x = torch.randn(1, c, 8, h, w, device="cuda", dtype=dtype)
        hist = torch.randn(1, c, 2, h, w, device="cuda", dtype=dtype)
        weight = torch.randn(c, c // groups, 3, 3, 3, device="cuda", dtype=dtype) * 0.05
        bias = torch.randn(c, device="cuda", dtype=dtype)
        args = (x, hist, weight, bias, (1, 1), groups)
        ref, _ = streaming_conv3d(*args)
        got, _ = streaming_causal_conv3d(*args)
        err = float((got.float() - ref.float()).norm() / ref.float().norm())
        if not err < 3e-2:
            raise AssertionError(f"{label}: the kernel's relative error is {err:.3g}")
        t_cudnn = do_bench(lambda: streaming_conv3d(*args), return_mode="median")  # noqa: B023
        t_triton = do_bench(lambda: streaming_causal_conv3d(*args), return_mode="median")  # noqa: B023
        RESULTS["kernel"].append(
            {"layer": label, "dtype": str(dtype)[6:], "cuDNN ms": t_cudnn, "triton ms": t_triton,
             "triton speed-up": t_cudnn / t_triton, "rel err": err}
        )  # fmt: skip


def speed_and_fidelity(
    family_name: str, frames: int, repeats: int, chunk: int, dtypes: list[str], kernels: list[str]
) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # as deployed
    family = families.get(family_name)
    height, width = (64, 96) if SMOKE else family.default_resolution
    models = models_of(family_name, small=SMOKE, device=DEVICE)
    times: dict[tuple[str, str, str], float] = {}
    for name, model in models.items():
        s = model.spatial_factor
        torch.manual_seed(2)
        z = torch.randn(1, model.latent_channels, frames, height // s, width // s, device=DEVICE)
        n_frames = 1 + model.temporal_factor * (frames - 1)
        reference = None
        for dtype in (getattr(torch, d) for d in dtypes):
            model.to(dtype)
            for kernel in [k for k in kernels if k == "torch" or dtype != torch.float16]:
                ctx = triton_convs(model) if kernel == "triton" else contextlib.nullcontext()
                try:
                    with ctx, torch.inference_mode():
                        if DEVICE == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        seconds, out = sync_time(lambda m=model: decode(m, z.to(dtype), chunk), repeats)  # noqa: B023
                        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
                        out = out.float()
                except Exception as e:
                    label = f"{family_name} {name} {str(dtype)[6:]} {kernel}"
                    RESULTS["errors"].append({"where": label, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                times[name, str(dtype)[6:], kernel] = seconds
                RESULTS["speed"].append(
                    {"family": family_name, "model": name, "dtype": str(dtype)[6:], "kernel": kernel,
                     "size": f"{height}x{width}", "frames": n_frames, "chunk": chunk,
                     "ms/frame": 1000 * seconds / n_frames, "frames/s": n_frames / seconds, "peak GiB": peak,
                     "speed-up vs teacher": 1.0}
                )  # fmt: skip
                if dtype == torch.float32 and kernel == "torch":
                    reference = out
                elif kernel == "torch" and reference is not None:
                    diff = float((out - reference).abs().max())
                    RESULTS["fidelity"].append(
                        {"family": family_name, "model": name, "dtype": str(dtype)[6:],
                         "PSNR vs fp32 (dB)": psnr(out, reference), "max abs diff": diff}
                    )  # fmt: skip
                del out
        model.cpu()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    for row in RESULTS["speed"]:
        key = (row["dtype"], row["kernel"])
        if row["family"] == family_name and ("teacher", *key) in times:
            row["speed-up vs teacher"] = times[("teacher", *key)] / times[(row["model"], *key)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Wan2.1 only")
    parser.add_argument("--frames", type=int, default=3, help="latent frames per timed clip")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2, help="latent frames per steady chunk")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--kernels", default="torch,triton")
    parser.add_argument("--skip-checks", action="store_true", help="only the decode speed")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global SMOKE, DEVICE
    SMOKE, DEVICE = args.smoke, "cpu" if args.smoke else "cuda"
    if not SMOKE:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite needs a CUDA GPU")
        import triton

        print(
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}"
        )
    names = ["wan2.1"] if args.quick else families.names()
    started = time.perf_counter()

    def done(what: str) -> None:  # numbers so far are kept even if a later step runs out of time
        print(f"[{what} done after {time.perf_counter() - started:.0f} s]", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(RESULTS, f, indent=2)

    if not args.skip_checks:
        for name in names:
            attempt(f"exactness {name}", exactness, name)
        for dtype in (torch.float32, torch.bfloat16) if not SMOKE else ():
            attempt(f"kernel {dtype}", kernel_alone, dtype)
        done("checks")
    for name in names:
        dtypes, kernels = args.dtypes.split(","), args.kernels.split(",")
        attempt(f"speed {name}", speed_and_fidelity, name, args.frames, args.repeats, args.chunk, dtypes, kernels)
        done(name)
    table("Exactness on the GPU (small random models; TF32 off)", RESULTS["exactness"])
    table("Streaming causal conv alone: Triton kernel vs cuDNN (cat + conv3d + slice)", RESULTS["kernel"])
    table(f"Decode speed, full size, chunk {args.chunk} (TF32 on for fp32)", RESULTS["speed"])
    table("Half-precision fidelity vs fp32 (same model, same latents)", RESULTS["fidelity"])
    table("Failures", RESULTS["errors"])


if __name__ == "__main__":
    main()
