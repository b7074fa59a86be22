"""End to end: a diffusers WanPipeline run split into denoising and decoding, per VAE.

The pipeline is the real ``WanPipeline`` with a random ``WanTransformer3DModel`` whose depth and
width are parameters (the transformer's cost is what the decode share depends on), no text
encoder (random prompt embeddings), no classifier-free guidance unless ``--cfg``. VAEs, all random
weights at the released Wan2.1 configuration unless ``--vae-base`` says otherwise:

  teacher     diffusers' own AutoencoderKLWan (what the pipeline ships with)
  flash       FlashVAE over a flash-wan2.1 student, torch
  flash-ort   FlashVAE over the same student's ONNX Runtime engine (static shapes of this run)

Decode time is measured inside ``vae.decode``; denoising time is the rest of the call. The
end-to-end speed-up and the decode share are from this one run (ratios, not absolute times, are
what compare across machines). Speed does not depend on weight values; quality is not measured.

    python benchmarks/pipeline_e2e.py --smoke                               # CPU, tiny, ~1 min
    python benchmarks/pipeline_e2e.py --device cuda --dtype bfloat16 \\
        --height 480 --width 832 --frames 81 --layers 30 --heads 12 --steps 50   # Wan2.1-1.3B-like
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

PRESETS = {  # transformer shapes: (layers, heads, head dim, ffn)
    "wan2.1-1.3b": (30, 12, 128, 8960),
    "tiny": (2, 2, 12, 32),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny everything, on the CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--transformer", default="wan2.1-1.3b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, help="override the transformer depth")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance (two transformer passes per step)")
    p.add_argument("--vae-base", type=int, default=96, help="VAE base width (96: the released Wan2.1 VAE)")
    p.add_argument("--vaes", default="teacher,flash,flash-ort")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.smoke:
        args.height = args.width = 32
        args.frames, args.steps, args.transformer, args.vae_base = 9, 2, "tiny", 8
    return args


def build_transformer(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    layers, heads, head_dim, ffn = PRESETS[args.transformer]
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=args.layers or layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ).to(args.device, dtype)


def build_vaes(args: argparse.Namespace, dtype: torch.dtype, work: Path) -> dict[str, Any]:
    """The teacher (diffusers) and FlashVAEs over a flash-wan2.1 student of it."""
    from diffusers import AutoencoderKLWan

    from flashvaed import api
    from flashvaed.diffusers import FlashVAE
    from flashvaed.models import StudentSpec, load_teacher, save_student
    from flashvaed.models.student import build_student

    torch.manual_seed(0)
    teacher = AutoencoderKLWan(base_dim=args.vae_base).eval()
    teacher.save_pretrained(work / "teacher")
    student, _ = build_student(StudentSpec.load("flash-wan2.1"), load_teacher(work / "teacher").config)
    save_student(student.eval(), work / "student")
    wanted = args.vaes.split(",")
    vaes: dict[str, Any] = {}
    if "teacher" in wanted:
        vaes["teacher"] = teacher.to(args.device, dtype)
    if "flash" in wanted:
        vaes["flash"] = FlashVAE.from_pretrained(work / "student", device=args.device, dtype=dtype)
    if "flash-ort" in wanted:
        size = f"{args.height}x{args.width}"
        print(f"exporting the student for ONNX Runtime at {size} ...", file=sys.stderr, flush=True)
        api.export(
            work / "student", work / "export", chunk="2", height=str(args.height), width=str(args.width), batch="1"
        )
        api.build_engine(work / "export", work / "engine")
        vaes["flash-ort"] = FlashVAE.from_pretrained(work / "engine", chunk=2)
    return vaes


def timed_decode(vae: Any) -> list[float]:
    """Wrap ``vae.decode`` to record its wall time (synchronised on CUDA)."""
    spent: list[float] = []
    decode = vae.decode

    def timed(*a: Any, **k: Any) -> Any:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = decode(*a, **k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
        return out

    vae.decode = timed
    return spent


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    dtype = getattr(torch, args.dtype)
    transformer = build_transformer(args, dtype)
    embeds = torch.randn(1, 16, 32, device=args.device, dtype=dtype)
    results: dict[str, Any] = {"config": vars(args) | {"json": str(args.json) if args.json else None}, "vaes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        vaes = build_vaes(args, dtype, Path(tmp))
        for name, vae in vaes.items():
            pipe = WanPipeline(
                tokenizer=None,
                text_encoder=None,
                vae=vae,
                transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            )
            pipe.set_progress_bar_config(disable=True)
            extra = {"negative_prompt_embeds": embeds, "guidance_scale": 5.0} if args.cfg else {"guidance_scale": 1.0}
            with torch.inference_mode():  # warm-up (one-time costs: allocators, thread pools, kernels)
                pipe(prompt_embeds=embeds, height=args.height, width=args.width, num_frames=5, num_inference_steps=1,
                     output_type="pt", **extra)  # fmt: skip
            spent = timed_decode(vae)
            with torch.inference_mode():
                start = time.perf_counter()
                frames = pipe(
                    prompt_embeds=embeds,
                    height=args.height,
                    width=args.width,
                    num_frames=args.frames,
                    num_inference_steps=args.steps,
                    generator=torch.Generator(args.device).manual_seed(0),
                    output_type="pt",
                    **extra,
                ).frames
                total = time.perf_counter() - start
            decode = sum(spent)
            results["vaes"][name] = {
                "total_s": total,
                "denoise_s": total - decode,
                "decode_s": decode,
                "decode_share": decode / total,
                "frames": list(frames.shape),
            }
            print(f"{name}: total {total:.2f} s, decode {decode:.2f} s ({decode / total:.0%})", file=sys.stderr)
    base = results["vaes"].get("teacher")
    if base:
        for r in results["vaes"].values():
            r["e2e_speedup_x"] = base["total_s"] / r["total_s"]
            r["decode_speedup_x"] = base["decode_s"] / r["decode_s"]
    return results


def markdown(results: dict[str, Any]) -> str:
    c = results["config"]
    layers = c["layers"] or PRESETS[c["transformer"]][0]
    lines = [
        f"WanPipeline, {c['frames']} frames {c['height']}x{c['width']}, {c['steps']} steps, transformer "
        f"{c['transformer']} ({layers} layers){' with CFG' if c['cfg'] else ''}, {c['dtype']} on {c['device']}, "
        f"VAE base {c['vae_base']}",
        "",
        "| VAE | total s | denoise s | decode s | decode share | end-to-end speed-up | decode speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["vaes"].items():
        lines.append(
            f"| {name} | {r['total_s']:.2f} | {r['denoise_s']:.2f} | {r['decode_s']:.2f} | {r['decode_share']:.0%} "
            f"| {r.get('e2e_speedup_x', float('nan')):.2f}x | {r.get('decode_speedup_x', float('nan')):.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse()
    results = run(args)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
