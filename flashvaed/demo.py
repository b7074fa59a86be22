"""`flashvaed demo`: the whole toolkit on a clip it makes itself, for every family.

The chain a user runs on a real VAE, on the family's small embedded teacher (``flashvaed/data``,
see docs/demo.md) and a procedural clip of the family's scene (``DEMO_SCENES``), nothing downloaded:

1. teacher: encode the clip, decode the latents streaming (checked against one-shot decoding);
2. prune: the family's flash preset, with the width floors small teachers need;
3. distill: a short three-phase distillation on other clips of the scene and a few synthetic ones;
4. export: streaming ONNX graphs;
5. build-engine: an ONNX Runtime engine;
6. validate: the engine against the torch student chunk by chunk, and the student against the teacher;
7. decode: the clip's latents through the engine, the production path;
8. write: videos, a contact sheet, ``report.json`` and ``report.md``.

The whole folder is written aside and swapped in at the end: an interrupted demo leaves the
previous one as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from torch import Tensor

from . import api  # the demo runs the library's commands: it depends on api, never the reverse
from .atomic import atomic_output, check_output
from .devices import resolve_device
from .errors import InputError
from .io import check_fps, write_tensor, write_video
from .metrics import psnr, ssim
from .models import families, load_model, load_teacher
from .models.memory import clip_bytes
from .models.streaming import iter_decode
from .models.student import StudentSpec, preset_names
from .safeload import check_work, json_format
from .synthetic import scene_description, scene_names, synthetic_clip, synthetic_clip_bytes

DEMO_FORMAT = "flashvaed-demo"
DEMO_DIR = "a demo output"
DEMO_REPORT = "report.json"
STAGES = ("teacher", "prune", "distill", "export", "build_engine", "validate", "decode", "write")
DEMO_COPIES = 10  # the clip as frames the demo holds at once: input, decodes, comparison panels
CLIP_SEED = 1_000_003  # the demo clip's seeds start here: far from the seeds distillation draws its clips from
# each family's clip (``flashvaed.synthetic`` scenes): content its embedded teacher reconstructs at
# >= 25 dB, a different scene per family (docs/demo.md lists every teacher on every scene)
DEMO_SCENES = {"wan2.1": "objects", "wan2.2": "shapes", "ltx": "gradient", "mochi": "pan"}
ERROR_FULL_SCALE = 0.5  # the error map's brightest colour: a quarter of the [-1, 1] range or more
SHEET_MARGIN = 48  # the contact sheet's left column: frame numbers
DISTILL_SCENE_CLIPS = 24  # distillation's clips of the demo's scene ...
DISTILL_SHAPES_CLIPS = 8  # ... and of distillation's own synthetic data (the shapes scene)
DISTILL_SEED = 2_000_003  # their seeds: none is the demo clip's


def is_demo_dir(path: Path) -> bool:
    """Whether ``path`` holds an earlier demo's output (which a new demo replaces): its report
    says so. Never judged by file names: a folder of someone's input.mp4 and report.md survives."""
    return json_format(path / DEMO_REPORT) == DEMO_FORMAT


def embedded_teacher_path(family: str = "wan2.1") -> Path:
    """The small VAE of ``family``'s architecture shipped with the package (see docs/demo.md)."""
    name = families.get(family).embedded_teacher
    if name is None:
        raise InputError(f"no embedded teacher ships for {family}; pass a teacher checkpoint as {{model}}", "model")
    return Path(str(resources.files("flashvaed") / "data" / name))


def demo_families() -> list[str]:
    """Families with an embedded teacher: those ``demo --family`` takes."""
    return [name for name in families.names() if families.get(name).embedded_teacher]


@dataclass
class DemoGeometry:
    """The clip the demo decodes and the clips its student learns on, from the teacher's factors."""

    frames: int
    height: int
    width: int
    train_frames: int
    train_size: int

    @classmethod
    def for_model(cls, temporal: int, spatial: int) -> DemoGeometry:
        size = max(128, 4 * spatial)  # at least a 4x4 latent grid
        return cls(1 + 4 * temporal, size, size, 1 + 2 * temporal, max(64, 4 * spatial))


@dataclass
class Stages:
    """Runs the demo's stages in order: a line each on stderr (when shown) and their wall times."""

    show: bool
    seconds: dict[str, float] = field(default_factory=dict)
    console: Console = field(default_factory=lambda: Console(stderr=True))

    @contextmanager
    def run(self, name: str, what: str) -> Iterator[None]:
        index = STAGES.index(name) + 1
        if self.show:
            self.console.print(f"[bold][{index}/{len(STAGES)}][/bold] {what}", highlight=False)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        if self.show:
            self.console.print(f"      [green]done[/green] in {self.seconds[name]:.1f} s", highlight=False)


@dataclass
class DemoResult:
    out_dir: Path
    report: dict[str, Any]

    def table(self) -> str:
        """The report's numbers as a Markdown table (report.md and the printed summary)."""
        return summary_table(self.report)

    def summary(self) -> str:
        r = self.report
        return (
            f"{self.table()}\n\nvalidate {'PASSED' if r['validate']['passed'] else 'FAILED'}; "
            f"total {r['total_seconds']:.0f} s; wrote {self.out_dir} "
            "(comparison.mp4, contact_sheet.png, report.md)"
        )


def describe_teacher(teacher: Any, embedded: bool) -> str:
    """What the teacher is, in one line for the report: its family and size, and for LTX its
    decoder generation (upsamplers, timestep conditioning, noise injection) and decode conditions."""
    fam = families.get(teacher.family)
    params = sum(p.numel() for p in teacher.decoder.parameters())
    t, sf, z = teacher.temporal_factor, teacher.spatial_factor, teacher.latent_channels
    what = f"{fam.title} architecture"
    if embedded:
        what += " at small widths, trained from scratch on procedural clips"
    text = f"{what}: {z} latent channels, {t}x{sf}x{sf} compression, {params / 1e6:.2f} M decoder parameters"
    config = getattr(teacher, "config", None)
    if teacher.family == "ltx" and config is not None:
        residual = any(b.kind == "compress_all" and b.residual for b in config.decoder_blocks)
        ups = "0.9.1+ residual depth-to-space upsamplers" if residual else "0.9.0's depth-to-space upsamplers"
        conditioned = config.timestep_conditioning
        noise = config.noise_injection
        text += (
            f"; decoder base width {config.decoder_base}, {ups}, "
            + ("timestep-conditioned" if conditioned else "no timestep conditioning")
            + (" with noise injection" if noise else "")
            + (
                f" (0.9.1-style; decoded as the pipelines do: timestep {teacher.decoder.default_timestep:g}, "
                f"decode noise {teacher.decoder.default_noise_scale:g})"
                if conditioned
                else ""
            )
        )
    return text


def full_size_macs(teacher: Any, preset: str | Any, embedded: bool = True) -> dict[str, Any] | None:
    """MACs per frame of the family's released VAE and of ``preset`` built on it, at the family's
    default resolution, counted on the meta device (nothing allocated): what the student saves
    where decoding costs, unlike the demo's tiny sizes where a step's fixed overhead dominates.
    A full-size ``teacher`` (not the embedded one) is counted as it is."""
    from .models.student import build_student
    from .models.summary import summarize

    fam = families.get(teacher.family)
    config = teacher.config
    generation = getattr(config, "generation", None)  # LTX: the released VAE of the teacher's generation
    if embedded:
        config = fam.config_type.released(generation) if generation else fam.config_type()
    height, width = fam.default_resolution
    try:
        with torch.device("meta"):
            full = fam.teacher_type(config)
            spec = StudentSpec.load(preset) if isinstance(preset, str) else preset
            student, _ = build_student(spec, config)
        teacher_macs = summarize(full, height, width).macs_per_frame
        student_macs = summarize(student, height, width).macs_per_frame
    except (InputError, ValueError):
        return None
    return {
        "teacher": (f"the released {fam.title}" if embedded else "this teacher")
        + (f" {generation}" if generation and embedded else ""),
        "height": height,
        "width": width,
        "teacher_macs_per_frame": teacher_macs,
        "student_macs_per_frame": student_macs,
        "macs_ratio": teacher_macs / student_macs,
    }


def summary_table(r: dict[str, Any]) -> str:
    t, s, e, sp = r["teacher"], r["student"], r["engine"], r["speed"]

    def db(key: str) -> list[str]:
        return [f"{m[key]:.2f} dB" if key in m else "-" for m in (t, s, e)]

    def ratio(key: str) -> list[str]:
        return [f"{m[key]:.4f}" if key in m else "-" for m in (t, s, e)]

    slower = [sp[k] < sp["teacher_fps"] for k in ("teacher_fps", "student_fps", "engine_fps")]
    fps = [
        f"{sp[k]:.1f} frames/s" + (" *" if slow else "")
        for k, slow in zip(("teacher_fps", "student_fps", "engine_fps"), slower, strict=True)
    ]
    rows = [
        ("", "teacher", "student (torch)", "student (ONNX Runtime)"),
        ("decoder parameters", f"{t['params'] / 1e6:.3f} M", f"{s['params'] / 1e6:.3f} M", "same"),
        ("MACs / frame", f"{t['macs_per_frame'] / 1e6:.1f} M", f"{s['macs_per_frame'] / 1e6:.1f} M", "same"),
        ("PSNR vs input", *db("psnr_vs_input")),
        ("SSIM vs input", *ratio("ssim_vs_input")),
        ("PSNR vs teacher", *db("psnr_vs_teacher")),
        ("SSIM vs teacher", *ratio("ssim_vs_teacher")),
        (f"decode speed at {sp.get('size', 'the clip size')}", *fps),
    ]
    full = r.get("full_size")
    if full:
        rows.insert(
            3,
            (
                f"MACs / frame at {full['height']}x{full['width']} (full size)",
                f"{full['teacher_macs_per_frame'] / 1e9:.1f} G",
                f"{full['student_macs_per_frame'] / 1e9:.1f} G",
                "same",
            ),
        )
    lines = ["| " + " | ".join(rows[0]) + " |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    lines.append(
        f"\nStudent PSNR vs teacher: {s['psnr_vs_teacher_pruned']:.2f} dB after pruning, "
        f"{s['psnr_vs_teacher']:.2f} dB after distillation; MACs ratio {r['macs_ratio']:.1f}x at the clip's size"
        + (
            f", {full['macs_ratio']:.1f}x at full size ({full['teacher']} vs {s['preset']} at "
            f"{full['height']}x{full['width']})."
            if full
            else "."
        )
    )
    lines.append(
        f"Decode speed: {sp.get('device', 'cpu')}, {sp.get('threads', '?')} threads, at the demo's size, where a "
        "streaming step's fixed cost (operator dispatch, state handling) outweighs its arithmetic on these tiny "
        "models: it measures overhead, not the MACs the student saves (the full-size row shows those; "
        "`flashvaed bench` times real sizes)."
    )
    if any(slower):
        lines.append(
            "* slower than the teacher here: at this size both decoders spend their time on per-step overhead, "
            "and the student runs at least as many layers (its width floors keep every stage); its savings are "
            "in MACs, which only dominate at full size."
        )
    return "\n".join(lines)


def _frames(decoder: Any, z: Tensor, chunk: int, options: dict[str, Any]) -> Tensor:
    """Frames of ``decoder`` streaming ``z`` in chunks of ``chunk`` latent frames."""
    with torch.inference_mode():
        return torch.cat([p.float().cpu() for p in iter_decode(decoder, z, chunk, **options)], dim=2)


def _decode(decoder: Any, z: Tensor, chunk: int, options: dict[str, Any]) -> tuple[Tensor, float]:
    """``_frames`` and their speed in frames/s (the better of two runs, since the first pays
    one-off costs: allocation, graph warm-up)."""
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        frames = _frames(decoder, z, chunk, options)
        best = min(best, time.perf_counter() - start)
    return frames, frames.shape[0] * frames.shape[2] / max(best, 1e-9)


def demo_scene(family: str) -> str:
    """The scene ``family``'s demo shows by default."""
    return DEMO_SCENES.get(family, "shapes")


def demo(
    out_dir: str | os.PathLike = "demo-output",
    *,
    family: str = "wan2.1",
    model: str | os.PathLike | None = None,
    student: str | os.PathLike | None = None,
    scene: str | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    chunk: int = 1,
    distill_steps: int = 30,
    device: str = "auto",
    fps: int = 8,
    progress: bool = False,
) -> DemoResult:
    """Run the whole chain on a generated clip of ``scene`` (default: the family's) with
    ``family``'s embedded teacher (or ``model``) and write what it produced into ``out_dir``; see
    the module docstring. ``student`` is a preset or a student config file (default: the
    family's ``flash-`` preset): the demo is also how students are compared on equal terms."""
    from . import engines
    from .distill.run import distill

    out_dir = check_output(out_dir, directory=True, replaceable=is_demo_dir, what=DEMO_DIR, inputs=[model])
    if family not in demo_families() and model is None:
        raise InputError(f"{{family}} must be one of {', '.join(demo_families())}, got {family!r}", "family")
    if scene is not None and scene not in scene_names():
        raise InputError(f"{{scene}} must be one of {', '.join(scene_names())}, got {scene!r}", "scene")
    for name, value, low in (("seed", seed, 0), ("distill_steps", distill_steps, 1), ("chunk", chunk, 1)):
        if value < low:
            raise InputError(f"{{{name}}} must be >= {low}, got {value}", name)
    check_fps(fps)
    spec = StudentSpec.load(student) if student is not None else None  # a bad name or file fails first
    if spec is not None and model is None and spec.family not in (None, family):
        raise InputError(f"student {spec.name!r} is for {spec.family} teachers, not {family}", "student")
    dev = resolve_device(device)
    stages = Stages(progress)
    total_start = time.perf_counter()
    with stages.run("teacher", "teacher: encode the generated clip, decode it streaming"):
        model_path = Path(model) if model is not None else embedded_teacher_path(family)
        teacher = load_teacher(model_path).to(dev)
        family = teacher.family
        tf, sf = teacher.temporal_factor, teacher.spatial_factor
        geometry = DemoGeometry.for_model(tf, sf)
        frames = geometry.frames if frames is None else frames
        height = geometry.height if height is None else height
        width = geometry.width if width is None else width
        if frames < 1 + tf or (frames - 1) % tf:
            raise InputError(f"{{frames}} must be {tf}n+1 with n >= 1 (e.g. {4 * tf + 1}), got {frames}", "frames")
        if height < 2 * sf or width < 2 * sf or height % sf or width % sf:
            raise InputError(
                f"{{height}} and {{width}} must be multiples of {sf} of at least {2 * sf}, got {height}x{width}",
                "height",
                "width",
            )
        kept = DEMO_COPIES * 3 * frames * height * width * 4
        check_work(
            kept + max(clip_bytes([teacher], frames, height, width, None), synthetic_clip_bytes(frames, height, width)),
            f"the demo on {frames} frames at {height}x{width}", "lower {frames}, {height} or {width}",
            "frames", "height", "width", device=dev,
        )  # fmt: skip
        train_frames, train_size = min(geometry.train_frames, frames), min(geometry.train_size, height, width)
        scene = demo_scene(family) if scene is None else scene
        clip = synthetic_clip(frames, height, width, seed=CLIP_SEED + seed, scene=scene)
        with torch.inference_mode():
            latents = teacher.encode(clip).cpu()
        z, options = api.decode_conditions(teacher, latents, None, None, seed)  # LTX: the pipeline's decode noise
        teacher_frames, teacher_fps = _decode(teacher, z, chunk, options)
        with torch.inference_mode():
            one_shot = teacher.decode(z, **options).cpu()
        streaming_diff = (teacher_frames - one_shot).abs().max().item()

    preset = f"flash-{family}" if spec is None else spec.name
    if spec is None and preset not in preset_names(family):
        raise InputError(f"no {preset} preset ships for {family} teachers (presets: {', '.join(preset_names())})")
    if spec is not None and spec.family not in (None, family):
        raise InputError(f"student {spec.name!r} is for {spec.family} teachers, not {family}", "student")
    is_preset = student is not None and str(student) in preset_names()
    with atomic_output(out_dir, directory=True, replaceable=is_demo_dir, what=DEMO_DIR) as tmp:
        with stages.run("prune", f"prune: {preset} from the teacher (independence-aware channel selection)"):
            prune_report = api.prune(
                model_path,
                tmp / "student-pruned",
                preset=preset if spec is None or is_preset else None,
                config=None if spec is None or is_preset else student,
                calib_clips=4,
                calib_frames=train_frames,
                calib_size=train_size,
                height=height,
                width=width,
                device=str(dev),
                progress=progress,
            )
        with stages.run("distill", f"distill: three phases of {distill_steps} steps on clips of the scene"):
            config = {
                "batch_size": 2,
                "clip_frames": train_frames,
                "clip_size": train_size,
                "synthetic_clips": DISTILL_SHAPES_CLIPS,
                "checkpoint_every": 10_000,
                "optimizer": {"lr": 2e-3},
            }
            (tmp / "distill.yaml").write_text(yaml.safe_dump(config))
            # the student learns on the content it is shown on: clips of the demo's scene (other
            # seeds than the demo clip's), and a few of distillation's own synthetic clips
            clips = tmp / "distill-clips"
            clips.mkdir()
            for i in range(DISTILL_SCENE_CLIPS):
                video = synthetic_clip(
                    train_frames, train_size, train_size, seed=DISTILL_SEED + 1000 * seed + i, scene=scene
                )
                write_video(video, clips / f"{scene}-{i:02d}.mp4", fps=fps)
            distill_report = distill(
                model_path,
                tmp / "student-pruned",
                [clips, "synthetic"],
                tmp / "student",
                config=tmp / "distill.yaml",
                steps_per_phase=distill_steps,
                device=str(dev),
                progress=progress,
            )
            shutil.rmtree(clips)
        with stages.run("export", "export: streaming ONNX graphs (first + steady chunk)"):
            t = z.shape[2]
            api.export(
                tmp / "student",
                tmp / "export",
                chunk=f"1:{chunk}:{max(chunk, t - 1)}",
                height=f"{height}:{height}:{height}",
                width=f"{width}:{width}:{width}",
                batch="1:1:1",
            )
        with stages.run("build_engine", "build-engine: ONNX Runtime"):
            api.build_engine(tmp / "export", tmp / "engine")
        write_tensor(latents, tmp / "latents.safetensors", "latents")
        with stages.run("validate", "validate: engine vs torch student every chunk; student vs teacher"):
            validation = api.validate(
                tmp / "engine", tmp / "student", tmp / "latents.safetensors", teacher=model_path, chunk=chunk
            )
        with stages.run("decode", "decode: teacher, pruned and distilled student, and the engine"):
            pruned = load_model(tmp / "student-pruned").to(dev)
            student = load_model(tmp / "student").to(dev)
            engine = engines.load(tmp / "engine")
            pruned_frames = _frames(pruned, z, chunk, options)
            student_frames, student_fps = _decode(student, z, chunk, options)
            engine_frames, engine_fps = _decode(engine, z, chunk, options)
        with stages.run("write", "write: videos, contact sheet, report"):
            write_video(clip, tmp / "input.mp4", fps=fps)
            write_video(teacher_frames, tmp / "teacher.mp4", fps=fps)
            write_video(engine_frames, tmp / "student.mp4", fps=fps)
            panels = {"input": clip, "teacher": teacher_frames, "student (engine)": engine_frames}
            write_video(labelled_side_by_side(panels), tmp / "comparison.mp4", fps=fps)
            contact_sheet(clip, teacher_frames, engine_frames).save(tmp / "contact_sheet.png")
            cost = prune_report["totals"]  # decoder parameters and MACs per frame at the clip's size
            full_size = full_size_macs(teacher, spec or preset, embedded=model is None)
            report = {
                "format": DEMO_FORMAT,
                "family": family,
                "clip": {
                    "frames": frames,
                    "height": height,
                    "width": width,
                    "seed": CLIP_SEED + seed,
                    "scene": scene,
                    "scene_description": scene_description(scene),
                },
                "latents": list(latents.shape),
                "teacher": {
                    "model": str(model_path) if model is not None else f"embedded {family} teacher",
                    "description": describe_teacher(teacher, embedded=model is None),
                    "decode_options": {k: v for k, v in options.items() if k != "seed"},
                    "params": cost["teacher_params"],
                    "macs_per_frame": cost["teacher_macs_per_frame"],
                    "streaming_max_diff": streaming_diff,
                    **_named("vs_input", teacher_frames, clip),
                },
                "student": {
                    "preset": preset,
                    "params": cost["student_params"],
                    "macs_per_frame": cost["student_macs_per_frame"],
                    "widths": prune_report.get("layout"),
                    "width_notes": prune_report.get("notes", []),
                    "distill_steps_per_phase": distill_steps,
                    "distill_eval": distill_report.get("eval"),
                    "psnr_vs_teacher_pruned": psnr(pruned_frames, teacher_frames),
                    **_named("vs_teacher", student_frames, teacher_frames),
                    **_named("vs_input", student_frames, clip),
                },
                "engine": {
                    "backend": "onnxruntime",
                    "max_abs_vs_student": (engine_frames - student_frames).abs().max().item(),
                    **_named("vs_teacher", engine_frames, teacher_frames),
                    **_named("vs_input", engine_frames, clip),
                },
                "speed": {
                    "size": f"{frames}x{height}x{width}",
                    "chunk": chunk,
                    "teacher_fps": teacher_fps,
                    "student_fps": student_fps,
                    "engine_fps": engine_fps,
                    "device": str(dev),
                    "threads": torch.get_num_threads(),
                },
                "macs_ratio": cost["macs_ratio"],
                "full_size": full_size,
                "validate": {
                    "passed": validation.passed,
                    "chunks": len(validation.chunks),
                    "worst_max_abs": max(
                        (o["max_abs"] for c in validation.chunks for o in c["outputs"].values()), default=0.0
                    ),
                    "tolerances": validation.tolerances,
                    "teacher": validation.teacher,
                },
            }
        report["stage_seconds"] = stages.seconds
        report["total_seconds"] = time.perf_counter() - total_start
        (tmp / DEMO_REPORT).write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(report_markdown(report))
    return DemoResult(out_dir, report)


def _named(suffix: str, frames: Tensor, reference: Tensor) -> dict[str, float]:
    """PSNR and SSIM of ``frames`` against ``reference``, keyed as the report names them."""
    return {f"psnr_{suffix}": psnr(frames, reference), f"ssim_{suffix}": ssim(frames, reference)}


def report_markdown(r: dict[str, Any]) -> str:
    clip = r["clip"]
    times = " | ".join(f"{k.replace('_', '-')} {v:.1f} s" for k, v in r["stage_seconds"].items())
    notes = "".join(f"\n- {n}" for n in r["student"]["width_notes"]) or "\n- none"
    return (
        f"# flashvaed demo: {r['family']}\n\n"
        f"A {clip['frames']}-frame {clip['height']}x{clip['width']} procedural clip, scene "
        f"`{clip.get('scene', 'shapes')}` ({clip.get('scene_description', '')}), encoded by the "
        f"{r['teacher']['model']} to latents {tuple(r['latents'])}, decoded by the teacher, by the "
        f"{r['student']['preset']} student distilled for {r['student']['distill_steps_per_phase']} steps per phase, "
        f"and by that student's ONNX Runtime engine.\n\n"
        f"Teacher: {r['teacher'].get('description', r['teacher']['model'])}.\n\n"
        f"{summary_table(r)}\n\n"
        f"Validate (engine vs torch student, {r['validate']['chunks']} chunks): "
        f"{'PASSED' if r['validate']['passed'] else 'FAILED'}, "
        f"worst max abs error {r['validate']['worst_max_abs']:.1e}. "
        f"Teacher streaming vs one-shot: max |diff| {r['teacher']['streaming_max_diff']:.1e}.\n\n"
        f"Width floors and roundings of the preset on this teacher:{notes}\n\n"
        f"Stage wall times: {times}; total {r['total_seconds']:.0f} s.\n\n"
        "Files: input.mp4, teacher.mp4, student.mp4 (the engine's frames), comparison.mp4, "
        "contact_sheet.png, latents.safetensors, student/, engine/, report.json.\n"
    )


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------
def _to_image(frame: Tensor) -> Any:
    """A (3, H, W) frame in [-1, 1] as a PIL image."""
    from PIL import Image

    array = ((frame.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _label(text: str, width: int, height: int = 16) -> Any:
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), (24, 24, 24))
    ImageDraw.Draw(strip).text((4, 2), text, fill=(235, 235, 235))
    return strip


def labelled_side_by_side(panels: dict[str, Tensor]) -> Tensor:
    """Clips (1, 3, F, H, W) side by side, each under a label strip: (1, 3, F, 16 + H, n W)."""
    import numpy as np

    columns = []
    for name, clip in panels.items():
        w = clip.shape[-1]
        strip = torch.from_numpy(np.array(_label(name, w))).permute(2, 0, 1).float() / 127.5 - 1
        strip = strip[:, None].expand(3, clip.shape[2], -1, w)[None]
        columns.append(torch.cat([strip, clip[:1].clamp(-1, 1)], dim=-2))
    return torch.cat(columns, dim=-1)


def _heat(e: Tensor) -> Tensor:
    """Errors in [0, 1] (any shape) as heat-map colours (3, ...) in [0, 1]: black, red, yellow."""
    return torch.stack([(3 * e).clamp(0, 1), (3 * e - 1).clamp(0, 1), (3 * e - 2).clamp(0, 1) * 0.6])


def error_map(frame: Tensor, reference: Tensor, full_scale: float = ERROR_FULL_SCALE) -> Tensor:
    """|frame - reference| per pixel (mean over colours) as a heat map frame in [-1, 1]: black is
    exact, yellow is an error of ``full_scale`` (a quarter of the [-1, 1] range) or more."""
    e = ((frame - reference).abs().mean(0) / full_scale).clamp(0, 1)
    return _heat(e) * 2 - 1


def colour_bar(width: int, full_scale: float = ERROR_FULL_SCALE, height: int = 34) -> Any:
    """The error map's scale as a PIL strip ``width`` wide: the colours from 0 to ``full_scale``
    with ticks labelled in the clip's [-1, 1] units."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), (24, 24, 24))
    ramp = _heat(torch.linspace(0, 1, width - 8)).permute(1, 0)  # (w, 3)
    bar = (ramp * 255).round().to(torch.uint8)[None].expand(10, -1, -1).contiguous().numpy()
    strip.paste(Image.fromarray(bar), (4, 3))
    draw = ImageDraw.Draw(strip)
    span = width - 9
    for value, text in ((0.0, "0"), (0.5, f"{full_scale / 2:g}"), (1.0, f">={full_scale:g}")):
        x = 4 + round(value * span)
        draw.line([(x, 13), (x, 16)], fill=(235, 235, 235))
        tw = draw.textlength(text)
        draw.text((min(max(x - tw / 2, 2), width - tw - 2), 18), text, fill=(235, 235, 235))
    return strip


def contact_sheet(clip: Tensor, teacher: Tensor, student: Tensor, rows: int = 4, tile: int = 128) -> Any:
    """A PIL image: ``rows`` frames spread over the clip, each row its frame number, then input |
    teacher | student | error map of the student against the teacher (tiles scaled to ``tile``
    pixels high), and under the error map its colour bar (the scale, in [-1, 1] units)."""
    from PIL import Image, ImageDraw

    n = clip.shape[2]
    picks = sorted({round(i * (n - 1) / max(rows - 1, 1)) for i in range(rows)})
    h, w = clip.shape[-2:]
    scale = max(1, tile // h)
    th, tw = h * scale, w * scale
    margin = SHEET_MARGIN
    titles = ["input", "teacher", "student (engine)", "|student - teacher|"]
    bar = colour_bar(tw)
    sheet = Image.new("RGB", (margin + 4 * tw, 16 + len(picks) * th + bar.height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        sheet.paste(_label(title, tw), (margin + c * tw, 0))
    for r, f in enumerate(picks):
        top = 16 + r * th
        draw.text((4, top + th // 2 - 12), "frame", fill=(235, 235, 235))
        draw.text((4, top + th // 2), f"{f} / {n - 1}", fill=(235, 235, 235))
        tiles = [clip[0, :, f], teacher[0, :, f], student[0, :, f], error_map(student[0, :, f], teacher[0, :, f])]
        for c, frame in enumerate(tiles):
            sheet.paste(_to_image(frame).resize((tw, th), Image.NEAREST), (margin + c * tw, top))
    bottom = 16 + len(picks) * th
    caption = "error scale (mean |diff| over RGB):"
    draw.text((margin + 3 * tw - draw.textlength(caption) - 6, bottom + 10), caption, fill=(235, 235, 235))
    sheet.paste(bar, (margin + 3 * tw, bottom))
    return sheet
