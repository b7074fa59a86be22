"""The commands users type, as library functions of the same names (the CLI is a thin shell).

Each takes paths and options, refuses bad input with a one-line ``FlashVAEDError`` before any
output exists, and writes its output whole or not at all. ONNX, ONNX Runtime and polygraphy are
imported by the functions that use them, so importing this module stays light.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import engines
from .atomic import atomic_output, check_output, final_path
from .devices import resolve_device, resolve_dtype
from .distill.evaluate import Evaluation, evaluate
from .distill.run import distill
from .engines.tiled import choose_tile, parse_memory, parse_tile, tiled
from .engines.torch_backend import TorchDecoder
from .errors import InputError
from .export.contract import OURS, Contract, is_manifest_dir, is_ours, read_manifest
from .io import (
    PNG_DIR,
    VideoOptions,
    check_fps,
    frame_sink,
    is_png_dir,
    output_kind,
    read_tensor,
    read_video,
    write_tensor,
)
from .models import DecoderSummary, StudentSpec, families, load_model, save_student, summarize
from .models.checkpoint import STUDENT_DIR, is_student_dir, load_teacher
from .models.memory import clip_bytes, encode_bytes
from .models.streaming import check_latents, chunk_bounds, mix_decode_noise
from .models.student import FlashStudent
from .models.vae import LatentDecoder, TeacherVAE
from .progress import track
from .safeload import check_budget, check_work
from .synthetic import synthetic_clip_bytes

if TYPE_CHECKING:
    from .engines.validate import Validation
    from .export.onnx_export import ExportResult

__all__ = [
    "ConvertResult",
    "DecodeResult",
    "EncodeResult",
    "Evaluation",
    "PrunePlan",
    "build_engine",
    "convert",
    "decode",
    "distill",
    "encode",
    "engine_info",
    "evaluate",
    "explain",
    "export",
    "info",
    "prune",
    "resolve_device",
    "resolve_dtype",
    "validate",
]


# ---------------------------------------------------------------------------------------------
def info(
    model: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    chunk: int = 1,
    dtype: str = "float32",
) -> DecoderSummary:
    """Family, configuration, parameters, MACs per latent chunk and state size of MODEL.

    ``height``/``width`` default to the family's resolution (480x832 for Wan2.1, 704x1280 for
    Wan2.2). For a student, ``summary.teacher`` holds the same figures for its teacher (built from
    the teacher configuration the student records, on the meta device: no teacher file needed).
    """
    loaded = load_model(model)
    family = families.get(loaded.family)
    default_h, default_w = family.default_resolution
    height, width = height or default_h, width or default_w
    summary = summarize(loaded, height, width, chunk=chunk, dtype=resolve_dtype(dtype))
    if isinstance(loaded, FlashStudent):
        with torch.device("meta"):
            teacher = family.teacher_type(loaded.config.teacher)
        summary.teacher = summarize(teacher, height, width, chunk=chunk, dtype=resolve_dtype(dtype))
    return summary


# ---------------------------------------------------------------------------------------------
@dataclass
class DecodeResult:
    output: Path
    shape: tuple[int, ...]  # (B, 3, F, H, W) of the decoded frames
    seconds: float
    written: bool = True  # False on the ranks of a sharded decode other than 0 (rank 0 writes)

    @property
    def frames_per_second(self) -> float:
        return self.shape[0] * self.shape[2] / max(self.seconds, 1e-9)


def decode(
    latents: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    chunk: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_index: int = 0,
    fps: int = 16,
    decode_timestep: float | None = None,
    decode_noise_scale: float | None = None,
    seed: int = 0,
    tile: str | tuple[int, int] | None = None,
    max_memory: str | int | None = None,
    shard: str | None = None,
    progress: bool = False,
    compile: str | None = None,
) -> DecodeResult:
    """Decode normalised diffusion-space latents (B, z, T, h, w) to frames, video or PNGs.

    MODEL may be a checkpoint, a student, an export or an engine directory (``engines.load``);
    ``chunk=None`` takes the engine's optimal chunk (2 latent frames for torch models).

    Timestep-conditioned models (LTX-Video 0.9.1+) decode as upstream's pipeline does: noise mixed
    into the normalised latents with ``decode_noise_scale`` (default 0.025), the decoder conditioned
    on ``decode_timestep`` (default 0.05); ``seed`` fixes every random draw (the mixing noise and
    0.9.1's injected noise maps). Both options are refused for models they do not apply to.

    Memory stays flat in the clip length: chunks are decoded and handed to the output one by
    one (raw tensor outputs do keep all frames, since they are written as one tensor).

    Exact spatial tiling (``flashvaed.engines.tiled``): ``tile`` (``HxW`` latent pixels each tile
    decodes, halo included) or ``max_memory`` (a size such as ``8GB``: the largest tile whose decode
    fits) bounds memory in the frame size; the frames equal untiled decoding. An engine given a frame
    larger than it was built for tiles at its own size. ``shard="spatial"`` (under ``torchrun``)
    splits every frame across the ranks; rank 0 writes the output.

    ``compile`` (torch models; ``engines.load``): None/"none" eager, "inductor", "cudagraphs",
    "max" or "auto" run the steady streaming steps compiled; the compile is paid once per shape.
    """
    kind = output_kind(out)
    check_output(out, directory=kind == "png", replaceable=is_png_dir, what=PNG_DIR, inputs=[latents, model])
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if chunk is not None and chunk < 1:
        raise InputError(f"{{chunk}} must be at least 1, got {chunk}", "chunk")
    check_fps(fps)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise InputError(f"{{seed}} must be a non-negative integer, got {seed!r}", "seed")
    if shard not in (None, "spatial"):
        raise InputError(f"{{shard}} must be 'spatial' (split every frame across torchrun's ranks), got {shard!r}")
    if shard is not None and (tile is not None or max_memory is not None):
        raise InputError(
            "{shard} splits frames across ranks: give it without {tile} or {max_memory}", "shard", "tile", "max_memory"
        )
    if shard is not None and compile not in (None, "none"):
        raise InputError("{shard} ranks run eager steps: give it without {compile}", "shard", "compile")
    if tile is not None and max_memory is not None:
        raise InputError("give {tile} or {max_memory}, not both ({max_memory} picks the tile)", "tile", "max_memory")
    tile = parse_tile(tile)
    budget = parse_memory(max_memory) if max_memory is not None else None
    writer = True  # sharded: rank 0 writes the output, the other ranks decode their bands
    if shard is not None:
        from .engines.sharded import init_distributed, rank_device

        rank, _ = init_distributed()
        writer = rank == 0
        if dev.type == "cuda":  # each rank on its own GPU (LOCAL_RANK)
            dev = rank_device()
    z = read_tensor(latents, "latents")
    # a torch model's frames stay on its device until the sink has made them uint8 (a quarter of the
    # float32 bytes cross to the host, and the host does not convert them); tiles and ranks take host frames
    frames_on = "cpu" if is_manifest_dir(Path(model)) or shard or tile or budget else "device"
    decoder = engines.load(model, device=dev, dtype=dt, compile=compile, frames_on=frames_on)
    check_latents(decoder, z)
    decoder = spatial_decoder(decoder, z.shape, chunk, tile, budget, shard)
    if batch_index < 0 or (kind != "tensor" and batch_index >= z.shape[0]):
        raise InputError(f"{{batch_index}} {batch_index} is out of range for a batch of {z.shape[0]}", "batch_index")
    if kind == "tensor":  # a raw tensor output is written whole: all frames are held at once
        b, _, t, h, w = z.shape
        sf = decoder.spatial_factor
        check_budget(
            b * 3 * decoder.temporal_factor * t * h * sf * w * sf * 4, f"decoding {latents} to {out}", InputError
        )
    decoder.check_memory(tuple(z.shape), chunk)
    z, options = decode_conditions(decoder, z, decode_timestep, decode_noise_scale, seed)
    pieces = decoder.iter_decode(z, chunk, **options)  # checks chunk range, size, options before any output
    n_chunks = len(chunk_bounds(z.shape[2], chunk or decoder.default_chunk())) + (1 if decoder.latency else 0)
    start = time.perf_counter()
    frames = 0
    with frame_sink(out, fps=fps, batch_index=batch_index) if writer else nullcontext() as sink:
        for piece in track(pieces, n_chunks, "decoding", progress and writer):
            if sink is not None:
                sink.write(piece)
            frames += piece.shape[2]
            last_shape = piece.shape
    seconds = time.perf_counter() - start
    b, c, _, h, w = last_shape
    return DecodeResult(Path(out), (b, c, frames, h, w), seconds, written=writer)


def spatial_decoder(
    decoder: engines.Decoder,
    shape: tuple[int, ...],
    chunk: int | None,
    tile: tuple[int, int] | None,
    budget: int | None,
    shard: str | None,
) -> engines.Decoder:
    """``decoder`` as the spatial options ask: tiled, or sharded across ranks; an engine given a
    frame larger than it was built for tiles at its own size."""
    from .engines.base import ContractDecoder

    if shard == "spatial":
        from .engines.sharded import sharded

        return sharded(decoder, gather="rank0")
    if budget is not None:
        if not isinstance(decoder, TorchDecoder):
            raise InputError("{max_memory} picks tiles for torch models; an engine tiles at its size", "max_memory")
        tile = choose_tile(decoder, tuple(shape), chunk or decoder.default_chunk(), budget)
        return decoder if tile is None else tiled(decoder, tile)
    if tile is not None:
        return tiled(decoder, tile)
    if isinstance(decoder, ContractDecoder):
        from .engines.tiled import engine_halo

        shapes = decoder.contract.shapes
        if shape[3] > shapes["height"].max or shape[4] > shapes["width"].max:
            try:
                engine_halo(decoder)
            except InputError:  # an engine that cannot tile: its own size error names the range it takes
                return decoder
            return tiled(decoder)
    return decoder


MAX_CONDITION = 1000.0  # timesteps and noise scales live in [0, 1]; past float32's range they would be Inf


def decode_conditions(
    decoder: Any, latents: torch.Tensor, timestep: float | None, noise_scale: float | None, seed: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The latents after upstream's decode-time noise, and the stream options, for ``decoder``."""
    inputs = decoder.step_inputs
    if "timestep" not in inputs:
        for value, name in ((timestep, "decode_timestep"), (noise_scale, "decode_noise_scale")):
            if value is not None:
                raise InputError(f"this model is not timestep-conditioned: {{{name}}} does not apply", name)
        return latents, {}
    timestep = decoder.default_timestep if timestep is None else timestep
    noise_scale = (decoder.default_noise_scale or 0.0) if noise_scale is None else noise_scale
    for value, name in ((timestep, "decode_timestep"), (noise_scale, "decode_noise_scale")):
        if not math.isfinite(value) or not 0 <= value <= MAX_CONDITION:
            raise InputError(f"{{{name}}} must be a number in [0, {MAX_CONDITION:g}], got {value}", name)
    options: dict[str, Any] = {"timestep": float(timestep)}
    if "noise" in inputs:
        options["seed"] = seed
    return mix_decode_noise(latents, float(noise_scale), seed), options


# ---------------------------------------------------------------------------------------------
@dataclass
class EncodeResult:
    output: Path
    video_shape: tuple[int, ...]
    latents_shape: tuple[int, ...]
    seconds: float


def encode(
    video: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: VideoOptions | None = None,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = False,
) -> EncodeResult:
    """Encode a video file or raw frames tensor to normalised latents (dict key ``latents``).

    The video is fitted to the model's factors (frames tn+1, size a multiple of s) as ``options`` say.
    """
    if output_kind(out) != "tensor":
        raise InputError(f"latents are written as .pt, .npy or .safetensors, not {Path(out).name!r}")
    check_output(out, inputs=[video, model])
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    vae = load_model(model)
    if not vae.has_encoder:
        raise InputError(f"{model} is a student: it has no encoder; encode with its teacher (same latents)")
    options = replace(options or VideoOptions(), multiple=vae.spatial_factor, temporal_factor=vae.temporal_factor)
    frames = read_video(video, options)
    b, _, f, h, w = frames.shape
    need = encode_bytes(vae, b, f, h, w, dtype=dt)
    check_work(
        need, f"encoding {tuple(frames.shape)} frames", "lower {height}/{width} or {max_frames}", "height", "width",
        "max_frames", device=dev,
    )  # fmt: skip
    vae = vae.to(device=dev, dtype=dt)
    start = time.perf_counter()
    chunks = 1 + (frames.shape[2] - 1) // vae.temporal_factor
    with torch.inference_mode():
        pieces = list(track(vae.iter_encode(frames), chunks, "encoding", progress))
    latents = torch.cat(pieces, dim=2).float()
    seconds = time.perf_counter() - start
    write_tensor(latents, out, "latents")
    return EncodeResult(Path(out), tuple(frames.shape), tuple(latents.shape), seconds)


# ---------------------------------------------------------------------------------------------
@dataclass
class ConvertResult:
    output: Path
    name: str
    family: str
    params: int  # decoder parameters
    encoder: bool  # the directory carries an encoder (encode works with it alone)


def convert(model: str | os.PathLike, out: str | os.PathLike) -> ConvertResult:
    """Write any student (a released file such as ``Flash_VAED_Wan.pth``, or a student directory) as
    a flashvaed student directory (config.json + model.safetensors) that decodes identically: to
    version it, distil it further, share it."""
    check_output(out, directory=True, replaceable=is_student_dir, what=STUDENT_DIR, inputs=[model])
    student = load_model(model)
    if not isinstance(student, FlashStudent):
        raise InputError(f"{model} is a teacher: convert writes students (make one with `flashvaed prune`)")
    save_student(student, out)
    params = sum(p.numel() for p in student.decoder.parameters()) + sum(
        p.numel() for p in student.post_quant_conv.parameters()
    )
    return ConvertResult(Path(out), student.config.name, student.family, params, student.has_encoder)


# ---------------------------------------------------------------------------------------------
def _spec(preset: str | None, config: str | os.PathLike | None) -> StudentSpec:
    if (preset is None) == (config is None):
        raise InputError("give exactly one of {preset} or {config}", "preset", "config")
    return StudentSpec.load(preset if preset is not None else config)  # type: ignore[arg-type]


@dataclass
class PrunePlan:
    """What ``prune`` will do, before any calibration: the layout and every channel group."""

    layout: dict[str, Any]
    notes: list[str]
    groups: list[dict[str, Any]]


def explain(
    teacher: str | os.PathLike, *, preset: str | None = None, config: str | os.PathLike | None = None
) -> PrunePlan:
    """The resolved student layout and the channel groups with their kept/total widths."""
    from .models.student import StudentConfig
    from .prune.groups import channel_graph, channel_groups
    from .prune.pipeline import pruned_layout

    spec = _spec(preset, config)
    model = load_teacher(teacher)
    family = families.get(model.family)
    t_layout = family.teacher_layout(model.config)
    layout, notes = spec.resolve(t_layout, family=model.family)
    with torch.device("meta"):
        config_ = StudentConfig("plan", pruned_layout(layout, t_layout), model.config, family=model.family)
        pruned = FlashStudent(config_)
    graph = channel_graph(model.decoder)
    groups = [
        {
            "name": g.name,
            "kind": g.kind,
            "kept": p.size,
            "total": g.size,
            "producers": [x for x, _ in g.producers],
            "consumers": g.consumers,
            "norms": g.norms,
            "read_by": [f"{link.path} -> {link.target.name}" for link in graph.links if link.source is g],
        }
        for g, p in zip(graph.groups, channel_groups(pruned.decoder), strict=True)
    ]
    return PrunePlan(layout.to_dict(), sorted(set(notes)), groups)


def prune(
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    config: str | os.PathLike | None = None,
    calib: str | os.PathLike = "synthetic",
    criterion: str = "independence",
    calib_clips: int = 4,
    calib_frames: int | None = None,
    calib_size: int = 64,
    chunk: int = 2,
    height: int | None = None,
    width: int | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Initialise a student from a teacher and write the student directory; returns the report.

    ``height``/``width``: the resolution of the report's MACs (default: the family's);
    ``calib_frames``: frames per calibration clip (default: the family's ``clip_frames``).
    """
    from .prune.calibration import calibration_latents
    from .prune.pipeline import CRITERIA, prune_teacher

    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r} (use {' or '.join(CRITERIA)})")
    spec = _spec(preset, config)
    model = load_teacher(teacher).to(resolve_device(device))
    tf, sf = model.temporal_factor, model.spatial_factor
    family = families.get(model.family)
    if calib_frames is None:
        calib_frames = family.clip_frames
    if calib_clips < 1 or calib_frames < 1 or (calib_frames - 1) % tf or calib_size <= 0 or calib_size % sf:
        raise InputError(
            f"{{calib_clips}} >= 1, {{calib_frames}} {tf}n+1 and {{calib_size}} a multiple of {sf} are required",
            "calib_clips",
            "calib_frames",
            "calib_size",
        )
    spec.resolve(family.teacher_layout(model.config), family=model.family)  # refuse a bad fit before any work
    check_output(out, directory=True, replaceable=is_student_dir, what=STUDENT_DIR, inputs=[teacher, calib, config])
    if str(calib) == "synthetic":
        z_bytes = model.latent_channels * (1 + (calib_frames - 1) // tf) * (calib_size // sf) ** 2 * 4 + 1024
        check_work(
            calib_clips * z_bytes
            + max(
                clip_bytes([model], calib_frames, calib_size, calib_size, chunk),
                synthetic_clip_bytes(calib_frames, calib_size, calib_size),
            ),
            f"calibrating on {calib_clips} clips of {calib_frames} frames at {calib_size}x{calib_size}",
            "lower {calib_clips}, {calib_frames} or {calib_size}", "calib_clips", "calib_frames", "calib_size",
            device=model.latents_mean.device,
        )  # fmt: skip
    latents = calibration_latents(
        calib, model, clips=calib_clips, frames=calib_frames, size=calib_size, progress=progress
    )
    size = (height, width) if height and width else family.default_resolution
    result = prune_teacher(model, spec, latents, criterion=criterion, chunk=chunk, report_size=size, progress=progress)
    result.report["calibration"]["source"] = final_path(calib)
    save_student(result.student.cpu(), out, {"prune_report.json": result.report})
    return result.report


# ---------------------------------------------------------------------------------------------
def export(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    chunk: str = "1:2:8",
    height: str = "64:256:1280",
    width: str = "64:256:1280",
    batch: str = "1:1:4",
    precision: str = "fp32",
    plugins: str = "all",
    opset: int | None = None,
    tiling: bool = False,
    tiling_frame: str = "1088x1920",
    windows: bool = True,
    progress: bool = False,
) -> ExportResult:
    """Export MODEL (teacher or student) to ``first.onnx`` + ``steady.onnx`` + ``manifest.json``.

    ``opset=None`` writes the lowest opset that supports ``precision`` (18; 22 for bf16).
    ``tiling``: a decoder with frame-wide modules (Wan's attention, group norms) also gets the graphs
    an engine needs to decode frames larger than its tiles, up to ``tiling_frame`` (HxW pixels);
    decoders without them tile from any export. ``windows`` (decoders with latency, LTX): each layer
    of a step computes only the clip's positions, sized from the clock inputs; False keeps every
    shape inside the graphs static (whole steps computed), which static-shape builders need."""
    from .export.onnx_export import ExportOptions
    from .export.onnx_export import export as onnx_export

    if is_manifest_dir(model):
        raise InputError(f"{model} is already an export or engine; export takes a checkpoint or student")
    out = check_output(out, directory=True, replaceable=is_ours, what=OURS, inputs=[model])
    options = ExportOptions(
        chunk=chunk, height=height, width=width, batch=batch, precision=precision, plugins=plugins, opset=opset,
        tiling=tiling, tiling_frame=tiling_frame, windows=windows,
    )  # fmt: skip
    return onnx_export(load_model(model), out, options, source=final_path(model), progress=progress)


def build_engine(
    export_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backend: str = "onnxruntime",
    providers: list[str] | None = None,
    threads: int = 0,
    timing_cache: str | os.PathLike | None = None,
    workspace_gib: float = 4.0,
    progress: bool = False,
) -> Contract:
    """Build an engine directory for ``backend`` from an export directory (``progress``: a bar, one
    step per graph)."""
    from .engines.build import build_engine as engines_build

    out = check_output(out, directory=True, replaceable=is_ours, what=OURS, inputs=[export_dir, timing_cache])
    return engines_build(export_dir, out, backend, providers, threads, timing_cache, workspace_gib, progress)


def validate(
    engine: str | os.PathLike,
    reference: str | os.PathLike,
    latents: str | os.PathLike,
    *,
    teacher: str | os.PathLike | None = None,
    chunk: int | None = None,
    out_json: str | os.PathLike | None = None,
) -> Validation:
    """Engine vs the PyTorch model it came from, every chunk, with polygraphy; and vs the teacher."""
    from .engines.validate import validate as engines_validate

    if not is_manifest_dir(engine):
        raise InputError(f"{engine} is not an export or engine directory (no manifest.json)")
    if out_json is not None:
        check_output(out_json, inputs=[engine, reference, latents, teacher])
    decoder = engines.load(engine)
    z = read_tensor(latents, "latents")
    check_latents(decoder, z)
    ref = load_model(reference)
    teacher_model: LatentDecoder | None = ref if isinstance(ref, TeacherVAE) else None
    if teacher is not None:
        teacher_model = load_model(teacher)
    report = engines_validate(
        decoder, ref, z, chunk, teacher_model, engine_name=str(engine), reference_name=str(reference)
    )
    if out_json is not None:
        with atomic_output(out_json) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2))
    return report


def engine_info(path: str | os.PathLike) -> dict[str, Any]:
    """What ``info`` shows for an export or engine directory: its contract and files."""
    contract = read_manifest(path)
    d = contract.to_dict()
    if d["model"].get("source"):  # manifests written before sources were recorded by their final names
        d["model"]["source"] = final_path(d["model"]["source"])
    if (d.get("backend") or {}).get("source_export"):
        d["backend"]["source_export"] = final_path(d["backend"]["source_export"])
    opt = contract.shapes
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[contract.precision]
    shapes = [t.shape(opt["batch"].opt, opt["height"].opt, opt["width"].opt) for t in contract.state]
    state_bytes = sum(itemsize * math.prod(int(v) for v in s) for s in shapes)
    files = {g: (Path(path) / f).stat().st_size for g, f in contract.files.items()}
    return {**d, "state_bytes_at_opt": state_bytes, "file_bytes": files}
