"""`flashvaed bench`: how fast a decoder is on this machine, against its teacher and diffusers' VAE.

Every model runs on one runtime (eager torch, compiled torch, ONNX Runtime or TensorRT) through
the production API (``engines.load`` and a stream), decoding one whole clip per run: warm-up runs
first, then interleaved repeats (round-robin over the models, so a machine that slows down slows
every model alike) and medians. A model's teacher runs on the same runtime; diffusers' own VAE
class for the family (what users run today) runs as its pipelines call it, ``vae.decode``, in
eager torch on the same device and dtype. Weights are random where no checkpoint is given (a
family or preset name): speed does not depend on their values.

What a row reports (docs/cli.md, "bench"):
- ``ms_per_frame_steady``: the steady chunks only (after the first, one-latent-frame chunk; a
  clip's short last chunk and a flush left out), the cost per frame of a long clip;
- ``first_chunk_ms``: from the start of a stream until its first frames come back (diffusers'
  ``decode`` returns the whole clip at once: its whole decode);
- ``frames_per_second`` over the whole clip, and the speed-ups from it: ``speedup_vs_teacher``
  and ``speedup_vs_diffusers`` are ratios of whole-clip medians (``speedup_vs_teacher_steady`` of
  steady ones), so a model benched against itself gives exactly 1.0;
- ``peak_memory_bytes``: CUDA: ``torch.cuda.max_memory_allocated`` over the model's runs (weights
  included; reset per run). CPU: the growth of the process's resident set over a run, its
  high-water mark reset per run (``/proc/self/clear_refs``) after freed heap memory is returned
  (weights, loaded before, excluded; the largest over all its runs, warm-up included, since an
  ONNX Runtime arena grows once). ``memory_estimate_bytes``: the meta-device estimate of one steady
  step (``flashvaed.models.memory.decode_step_bytes``) where a torch model exists;
- ``macs_per_frame`` (meta-device count, as ``info``) and ``macs_ratio`` (teacher MACs / model MACs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import inspect
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import engines
from .atomic import atomic_output, check_output
from .devices import resolve_device, resolve_dtype
from .engines.torch_backend import check_frames_on
from .errors import InputError
from .export.contract import is_manifest_dir, read_manifest
from .models import StudentConfig, families, load_model, summarize
from .models.memory import decode_step_bytes
from .models.streaming import chunk_bounds, push_clip
from .models.student import FlashStudent, StudentSpec, build_student, preset_names
from .models.vae import LatentDecoder, TeacherVAE, latent_frames
from .progress import track

__all__ = ["BENCH_FORMAT", "RUNTIMES", "BenchReport", "Row", "bench", "schedule", "speedups"]

BENCH_FORMAT = "flashvaed-bench"
BENCH_VERSION = 1
RUNTIMES = ("torch", "compiled", "onnxruntime", "tensorrt")
PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SMOKE_LATENT_PIXELS = 4  # --smoke: frames of 4x4 latent pixels, the embedded teachers' smallest useful size


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One whole-clip decode: its times and the memory it took."""

    clip_s: float
    first_s: float  # until the first frames came back
    steady_s: float  # in steady chunks (0 when the clip has none)
    steady_frames: int
    frames: int
    peak_bytes: int | None = None
    order: int = -1  # its place among all the bench's runs (warm-up included): the interleaving, on record


@dataclass
class Row:
    """One model's medians on this runtime, and its ratios to its teacher and to diffusers."""

    name: str  # as given (a path, family or preset name), or "diffusers <Class>"
    role: str  # "model", "teacher" (a model's teacher), "model+teacher" (a model that is its own), "diffusers"
    family: str
    kind: str  # teacher | student | diffusers
    runtime: str  # torch | compiled | onnxruntime | tensorrt | diffusers (eager torch)
    source: str  # what was run: a path, or "random weights, <config>"
    group: str  # the teacher it is compared with (rows of one group share a teacher and a diffusers row)
    latent_frames: int
    frames: int
    repeats: int
    ms_per_frame_steady: float | None
    first_chunk_ms: float
    frames_per_second: float
    clip_seconds: float
    warmup_seconds: float | None  # the first run (a compile or engine warm-up happens there)
    peak_memory_bytes: int | None
    peak_memory_source: str
    memory_estimate_bytes: int | None = None
    macs_per_frame: float | None = None
    macs_ratio: float | None = None
    speedup_vs_teacher: float | None = None
    speedup_vs_teacher_steady: float | None = None
    speedup_vs_diffusers: float | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class BenchReport:
    """Settings, one row per model (its teacher and diffusers' VAE included), what was skipped."""

    settings: dict[str, Any]
    rows: list[Row]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"what": ..., "reason": ...}
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BENCH_FORMAT,
            "version": BENCH_VERSION,
            "settings": self.settings,
            "rows": [asdict(r) for r in self.rows],
            "skipped": self.skipped,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchReport:
        if d.get("format") != BENCH_FORMAT:
            raise InputError(f"not a flashvaed bench report (format {d.get('format')!r})")
        return cls(d["settings"], [Row.from_dict(r) for r in d["rows"]], d.get("skipped", []), d.get("notes", []))

    def write_json(self, path: str | os.PathLike) -> Path:
        """The report as JSON at ``path``, whole or not at all."""
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    def memory_label(self) -> str:
        return (
            "peak allocated (torch.cuda.max_memory_allocated, weights included)"
            if str(self.settings.get("device", "cpu")).startswith("cuda")
            else "resident-set growth during a decode (weights excluded)"
        )

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Column names and one row of cells per model, as the command line prints them."""
        columns = [
            "model", "runtime", "GMACs/frame", "MACs ratio", "ms/frame steady", "first chunk ms", "frames/s",
            "peak MiB", "vs teacher", "vs diffusers",
        ]  # fmt: skip

        def num(v: float | None, spec: str, suffix: str = "") -> str:
            return "-" if v is None else f"{v:{spec}}{suffix}"

        cells = []
        for r in self.rows:
            label = r.name + (" (teacher)" if r.role in ("teacher", "model+teacher") else "")
            cells.append([
                label,
                r.runtime,
                num(None if r.macs_per_frame is None else r.macs_per_frame / 1e9, ".3g"),
                num(r.macs_ratio, ".1f", "x"),
                num(r.ms_per_frame_steady, ".1f"),
                num(r.first_chunk_ms, ".1f"),
                num(r.frames_per_second, ".3g"),
                num(None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20, ".0f"),
                num(r.speedup_vs_teacher, ".2f", "x"),
                num(r.speedup_vs_diffusers, ".2f", "x"),
            ])  # fmt: skip
        return columns, cells


# ---------------------------------------------------------------------------------------------
# the order of runs, and the ratios
# ---------------------------------------------------------------------------------------------
def schedule(models: int, warmup: int, repeats: int) -> list[tuple[str, int, int]]:
    """The runs in order, as (phase, round, model index): every model's warm-up runs first, then the
    timed repeats round-robin over the models (A B C A B C ...), so drift in the machine's speed
    (other work, heat) falls on every model alike instead of on whichever ran last."""
    runs = [("warmup", r, i) for r in range(warmup) for i in range(models)]
    return runs + [("repeat", r, i) for r in range(repeats) for i in range(models)]


def speedups(rows: list[Row]) -> None:
    """Fill each row's ratios from the medians of its group's teacher and diffusers rows (ratios of
    whole-clip frames/s; the steady one of steady ms/frame) and MACs ratio; a model that is its own
    teacher gets exactly 1.0."""
    for r in rows:
        group = [g for g in rows if g.group == r.group]
        teacher = next((g for g in group if g.role in ("teacher", "model+teacher")), None)
        ref = next((g for g in group if g.role == "diffusers"), None)
        if teacher is not None:
            r.speedup_vs_teacher = r.frames_per_second / teacher.frames_per_second
            if r.ms_per_frame_steady and teacher.ms_per_frame_steady:
                r.speedup_vs_teacher_steady = teacher.ms_per_frame_steady / r.ms_per_frame_steady
            if r.macs_per_frame and teacher.macs_per_frame:
                r.macs_ratio = teacher.macs_per_frame / r.macs_per_frame
        if ref is not None:
            r.speedup_vs_diffusers = r.frames_per_second / ref.frames_per_second


# ---------------------------------------------------------------------------------------------
# what MODEL names
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    """A model to bench, resolved: its torch model (or the export/engine it is), family and teacher."""

    name: str
    family: str
    kind: str  # teacher | student
    origin: str  # a path, or "random weights, <config>"
    model: LatentDecoder | None  # None: an export/engine directory (``engine``)
    engine: Path | None = None
    shape: LatentDecoder | None = None  # the architecture on the meta device (MACs), for engines
    teacher_config: Any = None  # the configuration of the teacher it was made from (None: unknown)

    @property
    def key(self) -> str:
        """Equal keys: the same model (a MODEL that is also the --teacher runs once)."""
        return self.origin


def _random_teacher(family: str, config: Any = None) -> TeacherVAE:
    fam = families.get(family)
    torch.manual_seed(0)
    return fam.teacher_type(config if config is not None else fam.config_type()).eval()


def _embedded_teacher(family: str) -> tuple[TeacherVAE, str]:
    from .demo import embedded_teacher_path

    path = embedded_teacher_path(family)
    return load_model(path).eval(), str(path)  # type: ignore[return-value]


def _teacher_source(name: str, family: str, smoke: bool) -> Source:
    """The teacher a family name stands for: the released configuration with random weights (the
    embedded tiny teacher under ``smoke``)."""
    if smoke:
        model, path = _embedded_teacher(family)
        return Source(name, family, "teacher", path, model, teacher_config=model.config)
    model = _random_teacher(family)
    return Source(name, family, "teacher", _random_origin(family, model.config), model, teacher_config=model.config)


def _random_origin(family: str, config: Any) -> str:
    return f"random weights, {families.get(family).describe(config)}"


def _path_source(name: str) -> Source:
    path = Path(name)
    if is_manifest_dir(path):
        contract = read_manifest(path)
        m = contract.model
        config, family, kind = m.get("config"), m["family"], m["kind"]
        shape, teacher_config = None, None
        if config is not None:
            with torch.device("meta"):
                if kind == "student":
                    cfg = StudentConfig.from_dict(config)
                    shape, teacher_config = FlashStudent(cfg), cfg.teacher
                else:
                    teacher_config = families.get(family).config_from_dict(config)
                    shape = families.get(family).teacher_type(teacher_config)
        return Source(name, family, kind, str(path.resolve()), None, engine=path, shape=shape,
                      teacher_config=teacher_config)  # fmt: skip
    model = load_model(path).eval()
    teacher_config = model.config.teacher if isinstance(model, FlashStudent) else model.config
    return Source(name, model.family, model.kind, str(path.resolve()), model, teacher_config=teacher_config)


def resolve(name: str, *, teacher: Source | None, smoke: bool, what: str = "models") -> Source:
    """A MODEL as the user wrote it: an existing path (``engines.load`` takes it), a family name (its
    released teacher, random weights) or a preset (built on ``teacher``, else the family's teacher)."""
    if Path(name).exists():
        return _path_source(name)
    if name in families.names():
        return _teacher_source(name, name, smoke)
    if name in preset_names():
        spec = StudentSpec.load(name)
        if teacher is not None:
            if teacher.kind != "teacher" or teacher.teacher_config is None:
                raise InputError(f"cannot build preset {name} on {teacher.name}: not a teacher we can read", "teacher")
            family, config = teacher.family, teacher.teacher_config
        elif spec.family is None:
            raise InputError(f"preset {name} fits any family: name its teacher with {{teacher}}", "teacher")
        else:
            family = spec.family
            config = _embedded_teacher(family)[0].config if smoke else families.get(family).config_type()
        if spec.family is not None and spec.family != family:
            raise InputError(f"preset {name} is for {spec.family} teachers; {teacher.name} is {family}", "teacher")
        torch.manual_seed(0)
        student = build_student(spec, config)[0].eval()
        origin = f"random weights, {name} on {families.get(family).describe(config)}"
        return Source(name, family, "student", origin, student, teacher_config=config)
    label, params = ("{teacher}", ("teacher",)) if what == "teacher" else ("model", ())
    raise InputError(
        f"unknown {label} {name!r}: not a file or directory, a family ({', '.join(families.names())}) "
        f"or a preset ({', '.join(preset_names())})",
        *params,
    )


def _teacher_for(source: Source, named: Source | None, smoke: bool, known: dict[str, Source]) -> Source | None:
    """The teacher ``source`` is compared with: ``named`` (--teacher) when given, else the one its
    configuration records (random weights: speed does not depend on them; the embedded teacher
    under ``smoke`` when it is that one); None if unknown. ``known``: teachers so far, by key."""
    if named is not None:
        if named.family != source.family:
            raise InputError(
                f"{source.name} is a {source.family} model; the teacher {named.name} is {named.family}", "teacher"
            )
        return known.get(named.key, named)
    if source.kind == "teacher":
        return known.get(source.key, source)
    config, family = source.teacher_config, source.family
    if config is None:
        return None
    fam = families.get(family)
    if smoke:
        model, path = _embedded_teacher(family)
        if model.config == config:
            return known.get(path) or Source(family, family, "teacher", path, model, teacher_config=config)
    origin = _random_origin(family, config)
    if origin in known:
        return known[origin]
    name = family if config == fam.config_type() else f"{family} teacher of {source.name}"
    return Source(name, family, "teacher", origin, _random_teacher(family, config), teacher_config=config)


# ---------------------------------------------------------------------------------------------
# runtimes
# ---------------------------------------------------------------------------------------------
def check_runtime(runtime: str, device: torch.device, compile_mode: str) -> str:
    """Refuse, before any work, a runtime this machine cannot run; the runtime as rows name it
    (the compiled one with the mode ``compile_mode`` resolves to on ``device``)."""
    if runtime not in RUNTIMES:
        raise InputError(f"unknown {{runtime}} {runtime!r} (use {', '.join(RUNTIMES)})", "runtime")
    if runtime == "compiled":
        if "compile" not in inspect.signature(engines.load).parameters:
            raise InputError("the compiled {runtime} needs engines.load(compile=...), not in this version", "runtime")
        from .engines.compiled import resolve_compile

        return f"compiled ({resolve_compile(compile_mode, device)})"
    if runtime == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except Exception as e:  # ImportError, or the native libraries failing to load
            raise InputError(
                f"the tensorrt {{runtime}} needs TensorRT, which cannot be imported here ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no module'})",
                "runtime",
            ) from None
        if device.type != "cuda":
            raise InputError("the tensorrt {runtime} runs on CUDA only; give {device} cuda", "runtime", "device")
    if runtime == "onnxruntime":
        try:
            import onnxruntime
        except ImportError:
            raise InputError(
                "the onnxruntime {runtime} needs onnxruntime (pip install onnxruntime)", "runtime"
            ) from None
        if device.type == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise InputError(
                "the onnxruntime here has no CUDAExecutionProvider; give {device} cpu or install onnxruntime-gpu",
                "device",
            )
    return runtime


def _providers(device: torch.device) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]


def load_runtime(
    source: Source,
    runtime: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    height: int,
    width: int,
    chunk: int,
    workdir: Path,
    compile_mode: str = "auto",
    frames_on: str = "cpu",
) -> engines.Decoder:
    """``source`` as a decoder on ``runtime``: a torch model loaded (compiled) or exported to an
    engine of the bench's exact shape (static: batch 1, ``chunk``, ``height`` x ``width``);
    an export/engine directory loaded as it is."""
    if source.engine is not None:
        if runtime not in ("onnxruntime", "tensorrt"):
            raise InputError(
                f"{source.name} is an export or engine directory: bench it with {{runtime}} onnxruntime or tensorrt",
                "runtime",
            )
        return engines.load(source.engine, providers=_providers(device) if runtime == "onnxruntime" else None)
    assert source.model is not None
    if runtime == "torch":
        return engines.load(source.model, device=device, dtype=dtype, frames_on=frames_on)
    if runtime == "compiled":
        return engines.load(source.model, device=device, dtype=dtype, compile=compile_mode, frames_on=frames_on)
    from .export.onnx_export import ExportOptions
    from .export.onnx_export import export as onnx_export

    out = workdir / f"export-{len(list(workdir.iterdir()))}"
    options = ExportOptions(
        chunk=str(chunk), height=str(height), width=str(width), batch="1", precision=PRECISIONS[dtype]
    )
    onnx_export(source.model, out, options, source=source.origin)
    if runtime == "onnxruntime":
        return engines.load(out, providers=_providers(device))
    from .engines.build import build_engine

    built = workdir / f"engine-{len(list(workdir.iterdir()))}"
    build_engine(out, built, "tensorrt")
    return engines.load(built)


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
class Memory:
    """Peak memory of one run: CUDA's allocator peak, or the CPU process's resident-set growth."""

    def __init__(self, device: torch.device, counted: bool = True) -> None:
        self.device, self.counted = device, counted
        self.base = 0
        self.clear_refs = Path("/proc/self/clear_refs")
        self.can = device.type == "cuda" or (self.clear_refs.exists() and os.access(self.clear_refs, os.W_OK))

    @property
    def source(self) -> str:
        if not self.counted:
            return "not measured (ONNX Runtime's own CUDA allocator)"
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        return (
            "rss growth (VmHWM - VmRSS, clear_refs per run)" if self.can else "not measured (no /proc/self/clear_refs)"
        )

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if not (self.can and self.counted):
            return
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        libc = ctypes.util.find_library("c")
        if libc is not None:
            trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
            if trim is not None:
                trim(0)  # hand freed heap back, so a run's growth is its own
        self.clear_refs.write_text("5")
        self.base = self._status("VmRSS")

    def peak(self) -> int | None:
        if not (self.can and self.counted):
            return None
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, self._status("VmHWM") - self.base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stream(decoder: engines.Decoder, latents: Tensor, chunk: int, device: torch.device, memory: Memory) -> Run:
    """One clip through a new stream (``push_clip``: the first push alone, steady pushes of ``chunk``
    latent frames, a flush for decoders with latency); each push timed as it returns its frames."""
    bounds = chunk_bounds(latents.shape[2], chunk)
    memory.start()
    _sync(device)
    start = time.perf_counter()
    first_s: float | None = None
    steady_s, steady_frames, frames = 0.0, 0, 0
    before = start
    for i, out in enumerate(push_clip(decoder.stream(), latents, chunk)):  # a push runs when asked for
        _sync(device)  # frames on the CPU: the device is done already; frames left on it: wait for them
        now = time.perf_counter()
        frames += out.shape[2]
        if first_s is None and out.shape[2]:
            first_s = now - start
        if 0 < i < len(bounds) and bounds[i][1] - bounds[i][0] == chunk:
            steady_s += now - before
            steady_frames += out.shape[2]
        before = now
    clip_s = time.perf_counter() - start
    return Run(clip_s, clip_s if first_s is None else first_s, steady_s, steady_frames, frames, memory.peak())


def diffusers_vae(family: str, config: Any, device: torch.device, dtype: torch.dtype) -> tuple[Any, Tensor | None]:
    """diffusers' own VAE class for ``family`` built from the teacher ``config`` (random weights),
    and the timestep its pipelines pass to ``decode`` (timestep-conditioned LTX configurations)."""
    import diffusers

    fam = families.get(family)
    cls = getattr(diffusers, fam.diffusers_vae)
    torch.manual_seed(0)
    vae = cls(**{k: v for k, v in fam.diffusers_config(config).items() if not k.startswith("_")})
    vae = vae.to(device).eval()
    if dtype != torch.float32:  # (diffusers warns about any dtype given to ``to``, even float32's)
        vae = vae.to(dtype)
    temb = None
    if getattr(vae.config, "timestep_conditioning", False):
        teacher_default = getattr(fam.teacher_type, "default_timestep", None) or 0.05
        temb = torch.tensor([float(teacher_default)], device=device, dtype=dtype)
    return vae, temb


def time_diffusers(vae: Any, temb: Tensor | None, latents: Tensor, device: torch.device, memory: Memory) -> Run:
    """One clip through ``vae.decode`` as diffusers' pipelines call it (the whole clip at once)."""
    z = latents.to(device, vae.dtype)
    memory.start()
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        args = (z, temb) if temb is not None else (z,)
        video = vae.decode(*args, return_dict=False)[0]
    _sync(device)
    clip_s = time.perf_counter() - start
    return Run(clip_s, clip_s, 0.0, 0, int(video.shape[2]), memory.peak())


# ---------------------------------------------------------------------------------------------
# the bench
# ---------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    """A row being measured: how to run it once, and its runs so far."""

    name: str
    role: str
    family: str
    kind: str
    runtime: str
    origin: str
    group: str
    latents: Tensor
    run: Callable[[], Run]
    memory_source: str
    macs_per_frame: float | None = None
    memory_estimate: int | None = None
    latency: int = 0  # latent frames its stream holds back (a clocked decoder's)
    warmup: list[Run] = field(default_factory=list)
    repeats: list[Run] = field(default_factory=list)

    def row(self) -> Row:
        runs = self.repeats
        clip = statistics.median(r.clip_s for r in runs)
        frames = runs[0].frames
        steady = [r.steady_s / r.steady_frames for r in runs if r.steady_frames]
        peaks = [r.peak_bytes for r in self.warmup + runs if r.peak_bytes is not None]
        return Row(
            name=self.name, role=self.role, family=self.family, kind=self.kind, runtime=self.runtime,
            source=self.origin, group=self.group, latent_frames=int(self.latents.shape[2]), frames=frames,
            repeats=len(runs),
            ms_per_frame_steady=1e3 * statistics.median(steady) if steady else None,
            first_chunk_ms=1e3 * statistics.median(r.first_s for r in runs),
            frames_per_second=frames / clip, clip_seconds=clip,
            warmup_seconds=self.warmup[0].clip_s if self.warmup else None,
            peak_memory_bytes=max(peaks) if peaks else None, peak_memory_source=self.memory_source,
            memory_estimate_bytes=self.memory_estimate, macs_per_frame=self.macs_per_frame,
            runs=[asdict(r) for r in runs],
        )  # fmt: skip


def _latent_frames(frames: int | None, temporal: int, chunk: int, steady: int = 2, what: str = "frames") -> int:
    """Latent frames of a clip of ``frames`` output frames (1 + t(T-1)); default ``steady`` chunks."""
    if frames is None:
        return 1 + steady * chunk
    if frames < 1 or (frames - 1) % temporal:
        raise InputError(
            f"{{{what}}} must be 1 + {temporal}n output frames for this model (temporal factor {temporal}), "
            f"got {frames}",
            what,
        )
    return latent_frames(frames, temporal)


def check_geometry(spatial: int, temporal: int, height: int, width: int, frames: int | None, chunk: int) -> None:
    """Refuse a frame size or clip length a model with these factors cannot decode."""
    for value, name in ((height, "height"), (width, "width")):
        _check_int(value, name, 1)
    if height % spatial or width % spatial:
        raise InputError(
            f"{{height}} and {{width}} must be multiples of {spatial} for this model, got {height}x{width}",
            "height",
            "width",
        )
    _latent_frames(frames, temporal, chunk)


def _check_int(value: int, name: str, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InputError(f"{{{name}}} must be an integer >= {lo}, got {value!r}", name)


def bench(
    models: list[str] | tuple[str, ...] = (),
    *,
    teacher: str | None = None,
    runtime: str = "torch",
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    chunk: int = 2,
    device: str = "auto",
    dtype: str = "float32",
    repeats: int = 3,
    warmup: int = 1,
    compare_diffusers: bool = True,
    compile_mode: str = "auto",
    frames_on: str = "cpu",
    smoke: bool = False,
    json_path: str | os.PathLike | None = None,
    progress: bool = False,
) -> BenchReport:
    """Decode speed of ``models`` against their teacher (same runtime) and diffusers' VAE class.

    ``models``: paths ``engines.load`` takes, family names (released configuration, random
    weights) or presets (built on ``teacher``, else their family's released teacher). ``teacher``:
    a family name or a teacher path (default: the one each model identifies; none known, no
    speed-up). ``frames``: output frames of the clip (1 + t*n; default two steady chunks after the
    first frame). ``height``/``width``: pixels (default 256). ``frames_on``: where torch runtimes
    hand frames back (``engines.load``; "device" is what a GPU pipeline's FlashVAE does).
    ``smoke``: the embedded tiny teachers and their flash students at 4x4 latent pixels, one repeat
    (seconds; ``models`` default ``flash-wan2.1``). ``json_path``: also write the report there (atomically).
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    label = check_runtime(runtime, dev, compile_mode)
    check_frames_on(frames_on)
    if frames_on != "cpu" and runtime not in ("torch", "compiled"):
        raise InputError(f"{{frames_on}} {frames_on} applies to the torch and compiled runtimes", "frames_on")
    _check_int(chunk, "chunk", 1)
    _check_int(repeats, "repeats", 1)
    _check_int(warmup, "warmup", 0)
    if smoke:
        models = list(models) or ["flash-wan2.1"]
        repeats, warmup = 1, min(warmup, 1)
    if not models:
        raise InputError("name at least one model to bench (a path, a family or a preset)")
    if json_path is not None:
        check_output(json_path)
    started = time.perf_counter()

    # what to run --------------------------------------------------------------------------------
    named = resolve(teacher, teacher=None, smoke=smoke, what="teacher") if teacher is not None else None
    if named is not None and named.kind != "teacher":
        raise InputError(f"{teacher} is a {named.kind}; {{teacher}} names a teacher", "teacher")
    sources = [resolve(m, teacher=named, smoke=smoke) for m in models]
    teachers: dict[str, Source] = {}  # key -> the teacher of a group of rows
    pairs: list[tuple[Source, str | None]] = []
    for s in sources:
        t = _teacher_for(s, named, smoke, teachers)
        if t is not None:
            teachers.setdefault(t.key, t)
        pairs.append((s, t.key if t is not None else None))
    archs = [a for a in (s.model or s.shape for s in sources) if a is not None]
    spatial = max((a.spatial_factor for a in archs), default=8)
    default_size = SMOKE_LATENT_PIXELS * spatial if smoke else 256
    height, width = height or default_size, width or default_size
    for a in archs:  # sizes and clip length refused before any model is exported or timed
        check_geometry(a.spatial_factor, a.temporal_factor, height, width, frames, chunk)

    # rows in order: per group, its teacher, its models, diffusers' VAE; ungrouped models last
    order: list[tuple[Source, str, str]] = []  # (source, role, group)
    seen: set[str] = set()
    for key, t in teachers.items():
        group = t.name
        own = [s for s, k in pairs if k == key]
        if t.key not in {s.key for s in own}:
            order.append((t, "teacher", group))
        for s in own:
            if s.key in seen:
                continue
            seen.add(s.key)
            order.append((s, "model+teacher" if s.key == t.key else "model", group))
    for s, k in pairs:
        if k is None and s.key not in seen:
            seen.add(s.key)
            order.append((s, "model", s.name))

    skipped: list[dict[str, str]] = []
    notes: list[str] = []
    entries: list[_Entry] = []
    with tempfile.TemporaryDirectory(prefix="flashvaed-bench-") as tmp:
        for source, role, group in track(order, len(order), f"preparing ({runtime})", progress):
            macs, estimate = None, None
            arch = source.model or source.shape
            if arch is not None:
                sf = arch.spatial_factor
                with torch.device("meta"):  # MACs only: a meta shadow skips summarize's tiling probe decode
                    shadow = arch if next(arch.parameters()).is_meta else type(arch)(arch.config)
                macs = summarize(shadow, height, width, chunk=chunk, dtype=dt).macs_per_frame
                estimate = decode_step_bytes(arch, 1, chunk, height // sf, width // sf, dt)
            decoder = load_runtime(
                source, runtime, device=dev, dtype=dt, height=height, width=width, chunk=chunk,
                workdir=Path(tmp), compile_mode=compile_mode, frames_on=frames_on,
            )  # fmt: skip
            if runtime in ("onnxruntime", "tensorrt"):  # exported: the torch weights are not needed any more
                source.model = None
                gc.collect()
            sf = decoder.spatial_factor
            check_geometry(sf, decoder.temporal_factor, height, width, frames, chunk)
            t = _latent_frames(frames, decoder.temporal_factor, chunk, steady=1 if smoke else 2)
            gen = torch.Generator().manual_seed(0)
            latents = torch.randn(1, decoder.latent_channels, t, height // sf, width // sf, generator=gen)
            memory = Memory(dev, counted=not (runtime in ("onnxruntime", "tensorrt") and dev.type == "cuda"))
            entry = _Entry(
                source.name, role, source.family, source.kind, label, source.origin, group, latents,
                run=lambda d=decoder, z=latents, m=memory: time_stream(d, z, chunk, dev, m),
                memory_source=memory.source, macs_per_frame=macs, memory_estimate=estimate,
                latency=int(getattr(decoder, "latency", 0) or 0),
            )  # fmt: skip
            entries.append(entry)
        if compare_diffusers:
            for t in teachers.values():
                try:
                    vae, temb = diffusers_vae(t.family, t.teacher_config, dev, dt)
                except ImportError as e:
                    skipped.append({"what": f"diffusers ({t.family})", "reason": f"diffusers not importable: {e}"})
                    continue
                except Exception as e:  # a configuration diffusers' class cannot take
                    skipped.append({"what": f"diffusers ({t.family})", "reason": f"{type(e).__name__}: {e}"})
                    continue
                first = next(e for e in entries if e.group == t.name)
                memory = Memory(dev)
                name = f"diffusers {type(vae).__name__}"
                at = max(i for i, e in enumerate(entries) if e.group == t.name) + 1
                entries.insert(at, _Entry(
                    name, "diffusers", t.family, "diffusers", "diffusers", f"diffusers {_diffusers_version()}, "
                    f"random weights, {families.get(t.family).describe(t.teacher_config)}", t.name, first.latents,
                    run=lambda v=vae, e=temb, z=first.latents, m=memory: time_diffusers(v, e, z, dev, m),
                    memory_source=memory.source, macs_per_frame=first.macs_per_frame if first.role != "model"
                    else None,
                ))  # fmt: skip
        else:
            skipped.append({"what": "diffusers", "reason": "not asked for"})
        if label == "compiled (none)":
            notes.append(f"compile mode {compile_mode} runs eager on {dev.type} (docs/runtimes.md); inductor compiles")
        if not teachers:
            notes.append("no teacher identified for these models: no speed-up columns (name one with --teacher)")

        # measure ------------------------------------------------------------------------------------
        plan = schedule(len(entries), warmup, repeats)
        for k, (phase, _, i) in enumerate(track(plan, len(plan), f"benchmarking ({runtime})", progress)):
            e = entries[i]
            run = e.run()
            run.order = k
            (e.warmup if phase == "warmup" else e.repeats).append(run)

    rows = [e.row() for e in entries]
    speedups(rows)
    for e, r in zip(entries, rows, strict=True):
        if r.ms_per_frame_steady is None and e.latency:
            notes.append(
                f"{e.name}: no steady frames: its stream holds back {e.latency} latent frames, so a clip needs more "
                f"than that for its steady chunks to return frames (--frames)"
            )
    report = BenchReport(
        settings=_settings(runtime, label, dev, dt, height, width, frames, chunk, repeats, warmup, compile_mode, smoke,
                           teacher, list(models), time.perf_counter() - started, frames_on),
        rows=rows,
        skipped=skipped,
        notes=notes,
    )  # fmt: skip
    if json_path is not None:
        report.write_json(json_path)
    return report


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _settings(
    runtime: str, label: str, device: torch.device, dtype: torch.dtype, height: int, width: int, frames: int | None,
    chunk: int, repeats: int, warmup: int, compile_mode: str, smoke: bool, teacher: str | None, models: list[str],
    seconds: float, frames_on: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    for module in ("onnxruntime", "diffusers", "tensorrt"):
        try:
            machine[module] = __import__(module).__version__
        except Exception:
            pass
    return {
        "models": models, "teacher": teacher, "runtime": runtime,
        "compile": compile_mode if runtime == "compiled" else None, "runtime_label": label, "device": str(device),
        "frames_on": frames_on,
        "dtype": str(dtype).removeprefix("torch."), "height": height, "width": width, "frames": frames, "chunk": chunk,
        "repeats": repeats, "warmup": warmup, "smoke": smoke, "seconds": seconds,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
    }  # fmt: skip


def load_report(path: str | os.PathLike) -> BenchReport:
    """A report ``bench`` wrote as JSON."""
    return BenchReport.from_dict(json.loads(Path(path).read_text()))
