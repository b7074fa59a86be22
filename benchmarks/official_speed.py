"""The released Flash-VAED Wan2.1 student vs the Wan2.1 teacher, CPU, in one run (prints a table).

Both at full size with random weights: the teacher is the released Wan2.1 configuration (base 96);
the student is the released file's architecture (``official-wan2.1``, which tests/test_official.py
shows is exactly the layout flashvaed reads from ``Flash_VAED_Wan.pth``), built in the release's key
layout and read back through the official loader, so the timed model is what a user loading the file
gets. Streaming decode of T latent frames (chunk 1 after the first, as the release decodes) at
480x832 on torch eager; the student also through its ONNX Runtime engine (static 480x832 export,
first + steady graphs). MACs per output frame from the meta-device count.

    python benchmarks/official_speed.py                  # 480x832, 2 latent frames (5 frames)
    python benchmarks/official_speed.py --frames 3 --teacher-ort
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flashvaed import api, engines
from flashvaed.models import StudentSpec, families, load_model, summarize
from flashvaed.models.families.wan21 import WanConfig, common_rules, rename, stage_rules
from flashvaed.models.student import build_student


def release_state_dict(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student's parameters in the release's key names (depthwise biases zero)."""
    rules = common_rules("original") + stage_rules("original", 2)
    out = {}
    for key, value in student.state_dict().items():
        name = rename(key, rules).replace(".depthwise.", ".depthwise_conv.")
        name = name.replace(".pointwise.", ".pointwise_conv.")
        if ".depthwise_conv.weight" in name and ".shortcut." not in name:
            out[name.replace("weight", "bias")] = torch.zeros(value.shape[0])
        if ".shortcut." in key and key.startswith("decoder.up.1.blocks.0"):  # 1x1x1 depthwise + pointwise
            base = name.rsplit(".", 1)[0]
            if key.endswith("weight"):
                out[f"{base}.depthwise_conv.weight"] = torch.ones(value.shape[1], 1, 1, 1, 1)
                out[f"{base}.depthwise_conv.bias"] = torch.zeros(value.shape[1])
                out[f"{base}.pointwise_conv.weight"] = value
            else:
                out[f"{base}.pointwise_conv.bias"] = value
            continue
        per_frame = key.startswith(("decoder.up.2.", "decoder.up.3."))  # Conv2d kernels, (C, 1, 1) gains
        if per_frame and (name.endswith("gamma") or ".shortcut.weight" in name):
            value = value[..., 0]
        out[name] = value
    return out


@torch.inference_mode()
def seconds(decode, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=2, help="latent frames")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--teacher-ort", action="store_true", help="also the teacher through ONNX Runtime (slow)")
    args = parser.parse_args()
    torch.manual_seed(0)
    family = families.get("wan2.1")
    teacher = family.teacher_type(WanConfig()).eval()
    built, _ = build_student(StudentSpec.load("official-wan2.1"), WanConfig())
    h, w = args.height // 8, args.width // 8
    latents = torch.randn(1, 16, args.frames, h, w)
    out_frames = 1 + 4 * (args.frames - 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "Flash_VAED_Wan.pth"
        torch.save(release_state_dict(built), path)
        student = load_model(path).eval()  # through the official loader
        macs_t = summarize(teacher, args.height, args.width, chunk=1).macs_per_frame
        macs_s = summarize(student, args.height, args.width, chunk=1).macs_per_frame
        t_torch = seconds(lambda: teacher.decode(latents, chunk=1), args.repeats)
        s_torch = seconds(lambda: student.decode(latents, chunk=1), args.repeats)
        rows.append(("teacher (torch)", macs_t, t_torch))
        rows.append(("released student (torch)", macs_s, s_torch))
        for name, model_path, macs in [("released student (ORT)", path, macs_s)] + (
            [("teacher (ORT)", None, macs_t)] if args.teacher_ort else []
        ):
            src = model_path
            if src is None:
                src = Path(tmp) / "teacher.safetensors"
                from flashvaed.models import save_teacher

                save_teacher(teacher, src)
            export = Path(tmp) / f"x-{len(rows)}"
            api.export(src, export, chunk="1", height=str(args.height), width=str(args.width), plugins="none")
            api.build_engine(export, Path(tmp) / f"e-{len(rows)}")
            decoder = engines.load(Path(tmp) / f"e-{len(rows)}")
            decoder.decode(latents[:, :, :2], chunk=1)  # warm-up
            rows.append((name, macs, seconds(lambda d=decoder: d.decode(latents, chunk=1), args.repeats)))
    print(f"Wan2.1 at {args.height}x{args.width}, {args.frames} latent frames ({out_frames} frames), CPU")
    print(f"{'model':28} {'GMACs/frame':>12} {'s/frame':>9} {'speed-up vs teacher (torch)':>28}")
    for name, macs, secs in rows:
        print(f"{name:28} {macs / 1e9:12.1f} {secs / out_frames:9.3f} {t_torch / secs:27.1f}x")
    print(f"MACs ratio teacher/student: {macs_t / macs_s:.1f}")


if __name__ == "__main__":
    main()
