"""One command for the days a GPU is at hand: what only a CUDA device can show, in one report.

    PYTHONPATH=. python benchmarks/gpu_suite.py                    # about 4-6 min on an H200 (see below)
    PYTHONPATH=. python benchmarks/gpu_suite.py --sections kernel,fidelity --out /tmp/suite
    PYTHONPATH=. python benchmarks/gpu_suite.py --family wan2.2 --height 704 --width 1280
    python benchmarks/gpu_suite.py --smoke --out /tmp/suite        # CPU, tiny, ~30 s: the script still runs

Writes OUT/gpu_suite.json (every number) and OUT/gpu_suite.md (the tables, also printed at the
end), atomically and again after every section, so a run cut short keeps what it measured
(default OUT: benchmarks/gpu_suite_out/). Sections are independent: one that fails is recorded
as {"status": "failed", "error": ...}, the rest still run, and the exit status is 1. Random
weights throughout (speed and memory do not depend on the values). Sections:

decode       The released teacher configuration (Wan2.1: base 96, 73.3 M decoder parameters) vs
             the flash-<family> student built on it, streaming decode of --frames frames (81 = 21
             latent frames for Wan; 79 = 14 for Mochi) at --height x --width (480x832) in --dtype
             (bf16), steady chunks of --chunk latent frames. Modes (--modes): torch eager;
             "cudagraph" (the eager steady step captured once with torch.cuda.CUDAGraph and
             replayed); "channels-last" (eager with every stage's activations stored
             channels_last_3d, as eager CPU decoders run; off on CUDA by default); "cudnn-benchmark"
             (eager with torch.backends.cudnn.benchmark: cuDNN times its algorithms per conv shape,
             off by default; the first call pays the timing); "compile"
             (torch.compile, default mode); "compile-ro" (torch.compile mode="reduce-overhead":
             Inductor + CUDA graphs); optional "triton" (eager with the fused Triton conv). The
             first (one-frame) step runs eager in every mode. Seconds per clip, frames/s, the
             student's speed-up and each mode's speed-up over eager, all from this one run; the
             first call (compile / capture + one decode) separately; every mode's frames vs eager's.
profile      torch.profiler over --repeats eager steady steps of each model (--dtype, --chunk): wall ms
             per step, the device's busy ms per step (the sum of its kernels: busy / wall below 1 is
             launch- or host-bound time), and the top kernels by device time with their calls and
             share (on the CPU: ops by CPU time); the same step pushed through the production stream
             (engines.load, frames kept on the device and handed to the host): what a stream adds.
             Then the student's production stream
             (engines.load(compile="cudagraphs", frames_on="device"), 5 latent frames): memory
             allocated and reserved after loading, after the first step, after the steady step that
             captures, after a replay, after empty_cache and at the end, with the peak in between.
kernel       The fused Triton streaming causal conv vs cuDNN (torch.cat([history, x]) + conv3d +
             the new history) at the 3x3x3 layer shapes a steady chunk runs, found by running both
             models on the meta device: the teacher's dense convs (Wan2.1 at 480x832: 384 ch at
             60x104 and 120x208, 192 at 240x416, 96 at 480x832) and the student's depthwise ones;
             fp32 (TF32 as torch allows) and --dtype; median ms, ratio, max abs error.
onnxruntime  The student exported (flashvaed.export.onnx_export.export, fp32, sizes up to
             --height x --width) and built for ONNX Runtime's CUDA provider; clip decode vs torch
             eager fp32 on the same device through the same engines API: seconds, ratio, max abs
             difference. Skipped where ORT lacks CUDAExecutionProvider or cannot load it.
fidelity     Teacher and student decoded in fp16 and bf16 vs their own fp32 decode (TF32 off),
             same latents: PSNR and max abs difference.
memory       Peak torch.cuda.max_memory_allocated of streaming decode (k=1, k=--chunk) vs one-shot
             (everything after the first frame as one chunk: the causal models' one-shot path),
             chunk outputs dropped as made, teacher and student in --dtype.
exactness    Small random models: fp32 streaming on the device vs a float64 CPU reference, every
             chunking vs one-shot, the Triton kernel inside the model vs torch convs.
runtimes     The production API's compiled streams (flashvaed.engines.load(model, compile=MODE)) vs
             the eager stream on the device, fp32 with TF32 off, for every family's tiny teacher
             and its flash student: "cudagraphs" for all of them, "max" (inductor inside a CUDA
             graph; "inductor" on the CPU) for the first family's student (a compile);
             max abs difference (the tests' bar is 1e-5) and the first-call seconds.

Measured on an H200 (2026-12-04, bf16, 480x832): exactness 29 s, runtimes 29 s (one inductor
compile), kernel 26 s, decode 64 s with eager, cudagraph and compile-ro (two compiles of about 20 s),
fidelity and memory a few seconds each at 17 frames (the fp32 references make 81 frames slower).
benchmarks/gpu_lease.sh runs the sections and `flashvaed bench` in one lease.

--smoke runs every path that needs no CUDA on the CPU, with tiny models (the family's tiny_config) and sizes
(16x16, 1 + 2t frames, fp32): torch.compile with the "eager" backend (Dynamo only), the Triton kernel
under TRITON_INTERPRET=1 (skipped if triton is missing), ONNX Runtime's CPU provider. CUDA graphs
are skipped there and peak memory is not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flashvaed.atomic import atomic_output
from flashvaed.metrics import psnr
from flashvaed.models import StudentSpec, families, zero_state
from flashvaed.models.blocks import channels_last_on, fused_steps, streaming_conv3d
from flashvaed.models.streaming import chunk_bounds, clocked, iter_decode, state_nbytes
from flashvaed.models.student import build_student

SECTIONS = ("decode", "profile", "kernel", "onnxruntime", "fidelity", "memory", "exactness", "runtimes")  # report order
# cheap sections first, the compiles late; ONNX Runtime (rarely with CUDA in GPU images) last
RUN_ORDER = ("exactness", "runtimes", "profile", "kernel", "fidelity", "memory", "decode", "onnxruntime")
MODES = ("eager", "cudagraph", "compile", "compile-ro", "triton", "channels-last", "cudnn-benchmark")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "gpu_suite_out"
TITLES = {
    "decode": "Teacher vs student, streaming decode per mode",
    "profile": "Where a steady step's device time goes (torch.profiler), and the production stream's memory",
    "kernel": "Fused Triton streaming causal conv vs cuDNN (cat + conv3d + new history)",
    "onnxruntime": "ONNX Runtime engine vs torch eager (student, fp32)",
    "fidelity": "Half precisions vs the same model in fp32 (same latents)",
    "memory": "Peak memory: streaming vs one-shot decode",
    "exactness": "Exactness (small random models, TF32 off)",
    "runtimes": "Production compile modes (engines.load(compile=...)) vs eager, every family (small models)",
}

State = tuple[Tensor, ...]
Step = Callable[[Tensor, State], tuple[Tensor, State]]


class Skip(Exception):
    """A section or mode that does not apply here; its message is the reason."""


@dataclass
class Settings:
    family: str
    device: torch.device
    dtype: torch.dtype
    height: int
    width: int
    latent_frames: int
    chunk: int
    repeats: int
    modes: list[str]
    compile_backend: str
    smoke: bool
    started: float  # time.perf_counter() at the start
    deadline: float  # time.perf_counter() after which optional work (compiles, sections) is skipped
    compile_guess_s: float = 90.0  # what one compile is expected to take: the longest seen so far

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def out_of_time(self, needed: float = 0.0) -> bool:
        return time.perf_counter() + needed > self.deadline


def say(message: str) -> None:
    print(f"[gpu_suite] {message}", flush=True)


def describe(e: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call with the device drained before and after, and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def free(device: torch.device) -> None:
    """Hand freed CUDA blocks back so the next measurement starts clean (a no-op elsewhere)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for fp32 convs and matmuls on or off within the block (references want it off)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------
# Models, latents and the decode loop shared by the sections.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cuDNN times its algorithms for each new conv shape and keeps the fastest (off by default: its
    heuristics choose without timing); the first decode of a shape pays the timing."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def family_config(s: Settings) -> Any:
    """The released configuration of the family, or a tiny one for --smoke."""
    family = families.get(s.family)
    return family.tiny_config() if s.smoke else family.config_type()


def build_models(
    s: Settings, config: Any = None, device: torch.device | str | None = None, teacher: bool = True
) -> dict[str, nn.Module]:
    """The teacher (unless ``teacher`` is false) and its flash student in fp32, random weights
    (seed 0 for each), built on ``device``."""
    family = families.get(s.family)
    config = config if config is not None else family_config(s)
    models = {}
    with torch.device(device or s.device):
        if teacher:
            torch.manual_seed(0)
            models["teacher"] = family.teacher_type(config).eval()
        torch.manual_seed(0)
        models[f"flash-{s.family}"] = build_student(StudentSpec.load(f"flash-{s.family}"), config)[0].eval()
    return models


def make_latents(s: Settings, model: nn.Module, frames: int | None = None) -> Tensor:
    """Diffusion-space latents (1, z, T, H/f, W/f) on the device, the same for every model (seed 1)."""
    f = model.spatial_factor
    g = torch.Generator().manual_seed(1)
    shape = (1, model.latent_channels, frames or s.latent_frames, s.height // f, s.width // f)
    return torch.randn(shape, generator=g).to(s.device)


def output_frames(model: nn.Module, latent_frames: int) -> int:
    return 1 + model.temporal_factor * (latent_frames - 1)


def clip_buffer(model: nn.Module, latents: Tensor) -> Tensor:
    b, _, t, h, w = latents.shape
    f = model.spatial_factor
    return torch.empty(b, 3, output_frames(model, t), h * f, w * f, dtype=latents.dtype, device=latents.device)


@torch.no_grad()
def decode_clip(model: nn.Module, latents: Tensor, chunk: int, steady: Step | None, out: Tensor) -> Tensor:
    """Stream ``latents`` through ``model.decode_step`` into ``out``.

    The first (one-frame) step runs eager; steady chunks of exactly ``chunk`` frames run
    ``steady`` when given (a compiled or graphed step), any shorter tail eager. The loop is the
    library's streaming contract without the Stream bookkeeping, so every mode times the same work.
    """
    b, _, t, h, w = latents.shape
    p = next(model.parameters())
    state = zero_state(model.decoder_state_specs(), b, h, w, dtype=p.dtype, device=p.device)
    frames, state = model.decode_step(latents[:, :, :1], state, first=True)
    out[:, :, : frames.shape[2]].copy_(frames)
    pos = frames.shape[2]
    for start, stop in chunk_bounds(t, chunk)[1:]:
        piece = latents[:, :, start:stop]
        step = steady if steady is not None and stop - start == chunk else model.decode_step
        frames, state = step(piece, state)
        out[:, :, pos : pos + frames.shape[2]].copy_(frames)
        pos += frames.shape[2]
    return out


class GraphedStep:
    """The eager steady step captured once as a CUDA graph and replayed (one launch per chunk).

    Inputs are copied into the captured buffers; the frames and state it returns are the graph's
    own outputs, overwritten by the next replay (the loop copies the frames out and hands the
    state straight back, which the next call copies in).
    """

    def __init__(self, model: nn.Module, latents: Tensor, state: State) -> None:
        self.latents = latents.clone()
        self.state = tuple(t.clone() for t in state)
        device = latents.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):  # warm-up off the capture: cuDNN workspaces, lazy inits
                model.decode_step(self.latents, self.state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.frames, self.new_state = model.decode_step(self.latents, self.state)

    def __call__(self, latents: Tensor, state: State) -> tuple[Tensor, State]:
        self.latents.copy_(latents)
        for dst, src in zip(self.state, state, strict=True):
            dst.copy_(src)
        self.graph.replay()
        return self.frames, self.new_state


def steady_step(
    mode: str, model: nn.Module, latents: Tensor, s: Settings
) -> tuple[Step | None, contextlib.AbstractContextManager[Any]]:
    """The steady step of one mode (None: eager) and the context it runs in; Skip where it cannot run."""
    if mode == "eager":
        return None, contextlib.nullcontext()
    if mode == "channels-last":  # eager, every stage's activations in channels_last_3d (the CPU default)
        return None, channels_last_on(s.device.type)
    if mode == "cudnn-benchmark":  # eager, cuDNN timing its algorithms per conv shape (a stream's are fixed)
        if not s.cuda:
            raise Skip("cuDNN's benchmark mode needs a CUDA device")
        return None, cudnn_benchmark()
    if mode == "triton":
        from flashvaed.engines.kernel import streaming_causal_conv3d, triton_available

        if not triton_available():
            raise Skip("the Triton kernel needs triton and a CUDA device (or TRITON_INTERPRET=1)")
        return None, fused_steps(model, streaming_causal_conv3d)
    if mode == "cudagraph":
        if not s.cuda:
            raise Skip("CUDA graphs need a CUDA device")
        b, _, t, h, w = latents.shape
        if t < 1 + s.chunk:
            raise Skip(f"no steady chunk of {s.chunk} latent frames in a clip of {t}")
        p = next(model.parameters())
        state = zero_state(model.decoder_state_specs(), b, h, w, dtype=p.dtype, device=p.device)
        return GraphedStep(model, latents[:, :, 1 : 1 + s.chunk], state), contextlib.nullcontext()
    if mode in ("compile", "compile-ro"):
        if s.out_of_time(s.compile_guess_s):
            raise Skip(f"a compile (~{s.compile_guess_s:.0f} s) would overrun the time budget (--budget-s)")
        # dynamic=False: teacher and student share decode_step's code object, and their different
        # state shapes must not turn on automatic dynamic shapes for the second one
        if mode == "compile-ro":
            if not s.cuda:
                raise Skip('mode="reduce-overhead" (CUDA graphs) needs a CUDA device')
            compiled = torch.compile(
                model.decode_step, mode="reduce-overhead", backend=s.compile_backend, dynamic=False
            )

            def step(x: Tensor, state: State) -> tuple[Tensor, State]:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
                frames, new_state = compiled(x, state)
                # the graph's outputs live in its pool and are overwritten by the next replay: the loop
                # copies the frames out at once; the state is read by the next replay, so it is copied
                return frames, tuple(t.clone() for t in new_state)

            return step, contextlib.nullcontext()
        return torch.compile(model.decode_step, backend=s.compile_backend, dynamic=False), contextlib.nullcontext()
    raise ValueError(f"unknown mode {mode!r}")


# ---------------------------------------------------------------------------------------------
# Sections. Each fills sec["rows"] (and sec["notes"]); Skip -> skipped, any other error -> failed.
# ---------------------------------------------------------------------------------------------


def run_mode(mode: str, name: str, model: nn.Module, latents: Tensor, s: Settings, out: Tensor) -> dict[str, Any]:
    """Time one model in one mode: first call (setup + one decode), then the median of --repeats decodes."""
    n = out.shape[2]
    row: dict[str, Any] = {"model": name, "mode": mode}
    if s.cuda:
        torch.cuda.reset_peak_memory_stats(s.device)
    setup, (step, context) = timed(lambda: steady_step(mode, model, latents, s), s.device)
    with context:
        first, _ = timed(lambda: decode_clip(model, latents, s.chunk, step, out), s.device)
        runs = [timed(lambda: decode_clip(model, latents, s.chunk, step, out), s.device)[0] for _ in range(s.repeats)]
    seconds = statistics.median(runs)
    row.update(
        status="ok",
        frames=n,
        seconds=seconds,
        frames_per_s=n / seconds,
        ms_per_frame=1000 * seconds / n,
        first_call_s=setup + first,
    )
    if s.cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    return row


def section_decode(s: Settings, sec: dict[str, Any]) -> None:
    models = build_models(s)
    for model in models.values():
        model.to(s.dtype)
    teacher = models["teacher"]
    latents = make_latents(s, teacher).to(s.dtype)
    n = output_frames(teacher, s.latent_frames)
    sec["setup"] = {
        "family": s.family,
        "size": f"{s.height}x{s.width}",
        "latent_frames": s.latent_frames,
        "frames": n,
        "chunk": s.chunk,
        "dtype": dtype_name(s.dtype),
        "repeats": s.repeats,
        "compile_backend": s.compile_backend,
        "params_m": {k: sum(p.numel() for p in m.decoder.parameters()) / 1e6 for k, m in models.items()},
    }
    modes = ["eager"] + [m for m in s.modes if m != "eager"]  # eager first: the reference of the others
    eager: dict[str, Tensor] = {}
    scratch = {name: clip_buffer(model, latents) for name, model in models.items()}
    for mode in modes:
        # compiles may meet the time budget: the student's, the one users run, comes first
        order = list(models.items())[:: -1 if mode.startswith("compile") else 1]
        for name, model in order:
            out = clip_buffer(model, latents) if mode == "eager" else scratch[name]
            try:
                row = run_mode(mode, name, model, latents, s, out)
            except Skip as e:
                row = {"model": name, "mode": mode, "status": f"skipped: {e}"}
            except Exception as e:  # a mode that breaks (compile, capture) is a result, not the end
                row = {"model": name, "mode": mode, "status": f"failed: {describe(e)}"}
                free(s.device)
            else:
                if mode == "eager":
                    eager[name] = out
                elif name in eager:
                    row["max_abs_vs_eager"] = float((out.float() - eager[name].float()).abs().max())
                    row["psnr_vs_eager_db"] = psnr(out.float(), eager[name].float())
            sec["rows"].append(row)
            if mode.startswith("compile"):
                torch._dynamo.reset()  # drop this model's graphs (and their CUDA graph pools)
                free(s.device)
                if row["status"] == "ok":
                    s.compile_guess_s = max(s.compile_guess_s, row["first_call_s"])
            if row["status"] == "ok":
                say(
                    f"decode {name} {mode}: {row['seconds']:.3f} s, {row['frames_per_s']:.1f} frames/s "
                    f"(first call {row['first_call_s']:.1f} s)"
                )
            else:
                say(f"decode {name} {mode}: {row['status']}")
    ok = {(r["model"], r["mode"]): r["seconds"] for r in sec["rows"] if r["status"] == "ok"}
    for row in sec["rows"]:
        if row["status"] != "ok":
            continue
        if (row["model"], "eager") in ok:
            row["vs_eager_x"] = ok[row["model"], "eager"] / row["seconds"]
        if row["model"] != "teacher" and ("teacher", row["mode"]) in ok:
            row["student_speedup_x"] = ok["teacher", row["mode"]] / row["seconds"]
    sec["notes"].append(
        "seconds: median whole-clip decode after a first call (first_call_s: compile or capture plus one "
        "decode); the one-frame first step runs eager in every mode; frames are written into a preallocated "
        "clip; student_speedup_x: teacher seconds / student seconds in the same mode; vs_eager_x: eager "
        "seconds / this mode's; max_abs_vs_eager / psnr_vs_eager_db: this mode's frames vs eager's."
    )


PROFILE_TOP = 15  # kernels (ops on the CPU) listed per model


def section_profile(s: Settings, sec: dict[str, Any]) -> None:
    from torch.profiler import ProfilerActivity

    from flashvaed import engines

    models = build_models(s)
    for model in models.values():
        model.to(s.dtype)
    latents = make_latents(s, models["teacher"], frames=1 + s.chunk).to(s.dtype)
    piece = latents[:, :, 1:]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.cuda else [])
    where = "device" if s.cuda else "cpu"
    sec["setup"] = {"size": f"{s.height}x{s.width}", "chunk": s.chunk, "dtype": dtype_name(s.dtype),
                    "steps": s.repeats, "timed": where}  # fmt: skip
    for name, model in models.items():
        b, _, _, h, w = latents.shape
        p = next(model.parameters())
        state = zero_state(model.decoder_state_specs(), b, h, w, dtype=p.dtype, device=p.device)

        def loop_step(model: nn.Module = model) -> None:
            nonlocal state
            _, state = model.decode_step(piece, state)

        with torch.no_grad():
            _, state = model.decode_step(latents[:, :, :1], state, first=True)
        profile_steps(s, sec, name, "decode_step", loop_step, activities, where)
        # the same step through the production API: what a stream adds (bookkeeping, frames handed back)
        for frames_on in ("device", "cpu") if s.cuda else ("cpu",):
            stream = engines.load(model, device=s.device, dtype=s.dtype, frames_on=frames_on).stream()
            stream.push(latents[:, :, :1])
            profile_steps(s, sec, name, f"stream, frames on {frames_on}", lambda st=stream: st.push(piece),
                          activities, where, top=5)  # fmt: skip
            del stream
    if s.cuda:
        sec["rows"] += production_memory(s, models[f"flash-{s.family}"])
    sec["notes"].append(
        f"Per steady step of {s.chunk} latent frames, eager, one warm-up step first; how: the model's "
        "decode_step in a loop, or pushes to a production stream. busy: the sum of the "
        "kernels' device times (ops' CPU times on the CPU), so busy_share below 1 is time the device waited "
        "for launches; calls: launches per step. production rows: GiB allocated (above what was allocated "
        "before) and reserved at each point of a 5-latent-frame production stream, with the peak since the "
        "previous row."
    )


def profile_steps(
    s: Settings,
    sec: dict[str, Any],
    name: str,
    how: str,
    step: Callable[[], Any],
    activities: list,
    where: str,
    top: int = PROFILE_TOP,
) -> None:
    """One warm-up ``step`` (cuDNN's choices, lazy inits), then --repeats under torch.profiler: a row
    for the step (wall and busy ms) and one per ``top`` kernel (op on the CPU)."""
    from torch.profiler import profile

    with torch.no_grad():
        step()
        sync(s.device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(s.repeats):
                step()
            sync(s.device)
            wall = (time.perf_counter() - start) / s.repeats
    events = prof.key_averages()
    if s.cuda:  # kernels only: an op's device time is its kernels', counted once
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]

    def self_us(e: Any) -> float:
        if not s.cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    busy = sum(self_us(e) for e in events) / 1e3 / s.repeats
    sec["rows"].append({"model": name, "how": how, "what": "step", "wall_ms": 1e3 * wall, f"{where}_busy_ms": busy,
                        "busy_share": busy / (1e3 * wall)})  # fmt: skip
    for e in sorted(events, key=self_us, reverse=True)[:top]:
        ms = self_us(e) / 1e3 / s.repeats
        sec["rows"].append({"model": name, "how": how, "what": e.key[:90], f"{where}_ms": ms,
                            "calls": e.count / s.repeats, "share": ms / busy if busy else None})  # fmt: skip
    say(f"profile {name} {how}: {1e3 * wall:.2f} ms per step, {busy:.2f} ms of it busy ({where})")


def production_memory(s: Settings, model: nn.Module) -> list[dict[str, Any]]:
    """Memory of the student's production stream under CUDA graphs, point by point (what capture holds)."""
    from flashvaed import engines

    z = make_latents(s, model, frames=5).to(s.dtype)
    rows = []
    free(s.device)
    torch.cuda.reset_peak_memory_stats(s.device)
    base = torch.cuda.memory_allocated(s.device)

    def point(what: str) -> None:
        rows.append({"model": "production", "what": what,
                     "allocated_gib": (torch.cuda.memory_allocated(s.device) - base) / 2**30,
                     "reserved_gib": torch.cuda.memory_reserved(s.device) / 2**30,
                     "peak_gib": (torch.cuda.max_memory_allocated(s.device) - base) / 2**30})  # fmt: skip
        torch.cuda.reset_peak_memory_stats(s.device)

    decoder = engines.load(model, device=s.device, dtype=s.dtype, compile="cudagraphs", frames_on="device")
    point("loaded")
    stream = decoder.stream()
    stream.push(z[:, :, :1])
    point("first step")
    stream.push(z[:, :, 1 : 1 + s.chunk])
    point("first steady step (two warm-up runs on a side stream, capture, replay)")
    stream.push(z[:, :, 1 : 1 + s.chunk])
    point("second steady step (replay)")
    torch.cuda.empty_cache()
    point("after empty_cache (what the caching allocator held)")
    stream.close()
    del stream, decoder
    free(s.device)
    point("closed and freed")
    return rows


def conv_shapes(s: Settings) -> list[dict[str, Any]]:
    """The 3x3x3 streaming convs a steady chunk runs, recorded through the convs' fused-step slot
    on the meta device: the teacher's dense ones with as many inputs as outputs and the student's
    depthwise ones, one entry per input shape."""
    found: dict[tuple, dict[str, Any]] = {}
    for name, model in build_models(s, device="meta").items():
        seen: list[tuple[tuple[int, ...], tuple[int, ...], int]] = []

        def record(
            x: Tensor, history: Tensor, weight: Tensor, *rest: Any, seen: list = seen, **options: Any
        ) -> tuple[Tensor, Tensor]:
            seen.append((tuple(x.shape), tuple(weight.shape), rest[-1]))
            return streaming_conv3d(x, history, weight, *rest, **options)

        f = model.spatial_factor
        h, w = s.height // f, s.width // f
        latents = torch.empty(1, model.latent_channels, 1 + s.chunk, h, w, device="meta")
        state = zero_state(model.decoder_state_specs(), 1, h, w, device="meta")
        with torch.no_grad(), fused_steps(model, record):
            _, state = model.decode_step(latents[:, :, :1], state, first=True)
            seen.clear()
            model.decode_step(latents[:, :, 1:], state)
        for (_, c, t, height, width), (c_out, _, *kernel), groups in seen:
            depthwise = groups > 1
            if kernel != [3, 3, 3] or depthwise != (name != "teacher") or c_out != c:
                continue
            kind = "depthwise" if depthwise else "dense"
            entry = found.setdefault(
                (depthwise, c, t, height, width),
                {"layer": f"{name} {kind} {c} ch {height}x{width}", "channels": c, "frames": t, "height": height,
                 "width": width, "groups": groups, "layers_per_step": 0},
            )  # fmt: skip
            entry["layers_per_step"] += 1
    shapes = sorted(found.values(), key=lambda e: (e["groups"] > 1, -e["channels"], e["height"]))
    if s.smoke:  # the interpreter is slow: the smallest of each kind runs the same code
        size = {id(e): e["channels"] * e["frames"] * e["height"] * e["width"] for e in shapes}
        kinds = {e["groups"] > 1: e for e in sorted(shapes, key=lambda e: -size[id(e)])}
        shapes = list(kinds.values())
    return shapes


def bench_ms(fn: Callable[[], Any], s: Settings) -> float:
    """Median milliseconds of ``fn``: triton.testing.do_bench on CUDA; elsewhere (the smoke run's
    interpreter) --repeats timed calls, ``fn`` having run once already for the error check."""
    if s.cuda:
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    return 1000 * statistics.median(timed(fn, s.device)[0] for _ in range(s.repeats))


def section_kernel(s: Settings, sec: dict[str, Any]) -> None:
    try:
        import triton
    except ImportError:
        raise Skip("triton is not importable") from None
    from flashvaed.engines.kernel import reference_streaming_conv3d, streaming_causal_conv3d, triton_available

    if not triton_available():
        raise Skip("the Triton kernel needs a CUDA device or TRITON_INTERPRET=1")
    tf32_on = s.cuda and torch.backends.cudnn.allow_tf32  # the kernel follows torch's conv setting
    sec["setup"] = {"triton": triton.__version__, "interpreted": not s.cuda, "tf32_for_fp32": tf32_on}
    bad = []
    for shape in conv_shapes(s):
        c, t, h, w, groups = (shape[k] for k in ("channels", "frames", "height", "width", "groups"))
        for dtype in dict.fromkeys((torch.float32, s.dtype)):
            g = torch.Generator(s.device).manual_seed(0)  # made on the device: the big ones take GiBs

            def rand(*shape: int, g: torch.Generator = g, dtype: torch.dtype = dtype) -> Tensor:
                return torch.randn(shape, generator=g, device=s.device).to(dtype)

            x, history = rand(1, c, t, h, w), rand(1, c, 2, h, w)
            weight = rand(c, c // groups, 3, 3, 3) / (27 * c // groups) ** 0.5
            bias = 0.1 * rand(c)
            args = (x, history, weight, bias, (1, 1), groups)
            ref_y, ref_h = reference_streaming_conv3d(*args)
            got_y, got_h = streaming_causal_conv3d(*args)
            exact, _ = reference_streaming_conv3d(*(a.double() if isinstance(a, Tensor) else a for a in args))

            def rel_to_exact(y: Tensor, exact: Tensor = exact) -> float:
                return float((y.double() - exact).norm() / exact.norm().clamp_min(1e-30))

            diff = (got_y.float() - ref_y.float()).abs()
            rel = float((got_y.float() - ref_y.float()).norm() / ref_y.float().norm().clamp_min(1e-30))
            rel_triton, rel_cudnn = rel_to_exact(got_y), rel_to_exact(ref_y)
            history_exact = bool(torch.equal(got_h, ref_h))
            # judged against float64, not cuDNN: cuDNN's own TF32 / half algorithms have errors of their own;
            # the kernel may be twice as far off, or up to its operand rounding (TF32 2**-11, bf16 2**-8)
            floor = (5e-3 if tf32_on else 1e-5) if dtype == torch.float32 else 3e-2
            ok = history_exact and rel_triton <= max(2 * rel_cudnn, floor)
            del exact
            cudnn_ms = bench_ms(lambda a=args: reference_streaming_conv3d(*a), s)
            triton_ms = bench_ms(lambda a=args: streaming_causal_conv3d(*a), s)
            row = {**{k: v for k, v in shape.items() if k not in ("channels", "height", "width", "groups")},
                   "dtype": dtype_name(dtype), "cudnn_ms": cudnn_ms, "triton_ms": triton_ms,
                   "triton_speedup_x": cudnn_ms / triton_ms, "max_abs_err": float(diff.max()), "rel_err": rel,
                   "triton_rel_err_fp64": rel_triton, "cudnn_rel_err_fp64": rel_cudnn,
                   "history_exact": history_exact, "match": ok}  # fmt: skip
            sec["rows"].append(row)
            say(
                f"kernel {shape['layer']} x{t} {dtype_name(dtype)}: cuDNN {cudnn_ms:.3f} ms, Triton "
                f"{triton_ms:.3f} ms ({row['triton_speedup_x']:.2f}x), max abs err {row['max_abs_err']:.2e}; "
                f"vs fp64: Triton {rel_triton:.2e}, cuDNN {rel_cudnn:.2e}"
            )
            if not ok:
                bad.append(
                    f"{shape['layer']} {dtype_name(dtype)} (vs fp64: Triton {rel_triton:.2e}, cuDNN {rel_cudnn:.2e}; "
                    f"history exact {history_exact})"
                )
            del x, history, weight, bias, args, ref_y, ref_h, got_y, got_h, diff
            free(s.device)
    sec["notes"].append(
        "frames: input frames of a steady chunk at that layer; layers_per_step: how many such convs one step "
        "runs; cuDNN column = torch.cat([history, x], dim=2) + F.conv3d + the new history copy (what the eager "
        "model runs); triton_speedup_x = cuDNN ms / Triton ms; rel_err: Triton vs cuDNN; *_rel_err_fp64: each vs the "
        "same conv in float64; match: the new history bit-exact and Triton's error vs float64 at most twice cuDNN's "
        "or within its operands' rounding (5e-3 TF32, 1e-5 IEEE fp32, 3e-2 half)."
    )
    if bad:
        raise AssertionError("the kernel differs from cuDNN at " + "; ".join(bad))


def provider_starts(providers: list[str]) -> list[str]:
    """The providers a session on a one-node graph actually runs with (ORT falls back silently),
    asked before the costly export."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 9)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the verdict is get_providers(); ORT's own complaint is noise here
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    except Exception as e:
        return [f"none ({describe(e)})"]
    return session.get_providers()


def section_onnxruntime(s: Settings, sec: dict[str, Any]) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed") from None
    from flashvaed import engines
    from flashvaed.engines.build import build_engine
    from flashvaed.export.onnx_export import ExportOptions, export

    available = ort.get_available_providers()
    if s.cuda:
        if "CUDAExecutionProvider" not in available:
            raise Skip(f"CUDAExecutionProvider not available (ONNX Runtime {ort.__version__}: {', '.join(available)})")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        with contextlib.suppress(Exception):  # ORT >= 1.21: load CUDA/cuDNN from the nvidia wheels torch brought
            ort.preload_dlls()
        started = provider_starts(providers)
        if providers[0] not in started:  # listed by onnxruntime-gpu, but its CUDA libraries do not load
            raise Skip(f"CUDAExecutionProvider does not start in ONNX Runtime {ort.__version__} (runs {started})")
    else:
        providers = ["CPUExecutionProvider"]
    [(name, model)] = build_models(s, device="cpu", teacher=False).items()
    f = model.spatial_factor
    # traced at a small size, run at the full one (dynamic height/width): tracing runs the model on the CPU
    lo = min(64, s.height, s.width) // f * f
    dims = {k: str(v) if v == lo else f"{lo}:{lo}:{v}" for k, v in (("height", s.height), ("width", s.width))}
    options = ExportOptions(chunk=str(s.chunk), batch="1", precision="fp32", **dims)
    latents = make_latents(s, model).cpu()
    sec["setup"] = {"model": name, "providers": providers, "onnxruntime": ort.__version__, "export": vars(options)}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_ort_") as tmp:
        export_s, _ = timed(lambda: export(model, Path(tmp) / "export", options), s.device)
        build_s, _ = timed(lambda: build_engine(Path(tmp) / "export", Path(tmp) / "engine", "onnxruntime",
                                                providers=providers), s.device)  # fmt: skip
        say(f"onnxruntime: exported in {export_s:.1f} s, built in {build_s:.1f} s")
        decoder = engines.load(Path(tmp) / "engine", providers=providers)
        used = decoder.sessions["steady"].get_providers()
        if providers[0] not in used:
            raise Skip(f"{providers[0]} did not load in ONNX Runtime (the session runs {', '.join(used)})")
        runtimes = {f"onnxruntime {providers[0]}": decoder, f"torch eager {s.device.type}": engines.load(
            model, device=str(s.device))}  # fmt: skip
        outputs: dict[str, Tensor] = {}
        n = output_frames(model, s.latent_frames)
        for label, dec in runtimes.items():
            first, out = timed(lambda d=dec: d.decode(latents, s.chunk), s.device)
            runs = [timed(lambda d=dec: d.decode(latents, s.chunk), s.device)[0] for _ in range(max(1, s.repeats))]
            seconds = statistics.median(runs)
            outputs[label] = out
            sec["rows"].append({"runtime": label, "model": name, "seconds": seconds, "frames_per_s": n / seconds,
                                "first_call_s": first})  # fmt: skip
            say(f"onnxruntime: {label} {seconds:.3f} s per clip ({n / seconds:.1f} frames/s)")
    ort_row, torch_row = sec["rows"]
    a, b = outputs[ort_row["runtime"]], outputs[torch_row["runtime"]]
    ort_row["ort_speedup_x"] = torch_row["seconds"] / ort_row["seconds"]
    ort_row["max_abs_vs_torch"] = float((a - b).abs().max())
    ort_row["psnr_vs_torch_db"] = psnr(a, b)
    sec["setup"].update(export_s=export_s, build_s=build_s)
    sec["notes"].append(
        "Both through flashvaed.engines (frames returned as float32 on the CPU); ONNX Runtime streams keep "
        "their state in host buffers bound to the sessions, so each chunk copies the state both ways; "
        "ort_speedup_x = torch seconds / ORT seconds."
    )
    if not ort_row["max_abs_vs_torch"] < 1e-2:
        raise AssertionError(f"ONNX Runtime differs from torch by {ort_row['max_abs_vs_torch']:.3g}")


def section_fidelity(s: Settings, sec: dict[str, Any]) -> None:
    with tf32(False):
        models = build_models(s)
        latents = make_latents(s, models["teacher"])
        for name, model in models.items():
            reference = model.decode(latents, chunk=s.chunk)
            for dtype in (torch.float16, torch.bfloat16):
                half = copy.deepcopy(model).to(dtype)
                out = half.decode(latents.to(dtype), chunk=s.chunk).float()
                diff = (out - reference).abs()
                row = {"model": name, "dtype": dtype_name(dtype), "psnr_vs_fp32_db": psnr(out, reference),
                       "max_abs_vs_fp32": float(diff.max()), "mean_abs_vs_fp32": float(diff.mean()),
                       "finite": bool(torch.isfinite(out).all())}  # fmt: skip
                sec["rows"].append(row)
                say(f"fidelity {name} {dtype_name(dtype)}: {row['psnr_vs_fp32_db']:.2f} dB vs fp32")
                del half, out, diff
                free(s.device)
            del reference
            model.cpu()
            free(s.device)
    sec["setup"] = {"size": f"{s.height}x{s.width}", "latent_frames": s.latent_frames, "chunk": s.chunk}
    sec["notes"].append("reference: the same model and latents in fp32 with TF32 off; frames in [-1, 1] (PSNR range 2)")


def section_memory(s: Settings, sec: dict[str, Any]) -> None:
    models = build_models(s)
    for model in models.values():
        model.to(s.dtype)
    latents = make_latents(s, models["teacher"]).to(s.dtype)
    t = s.latent_frames
    modes = {f"stream k={k}": k for k in dict.fromkeys((1, s.chunk)) if k < t - 1}
    modes["one-shot"] = max(1, t - 1)
    itemsize = torch.empty((), dtype=s.dtype).element_size()
    for name, model in models.items():
        _, _, _, h, w = latents.shape
        state_gib = state_nbytes(model.decoder_state_specs(), 1, h, w, itemsize) / 2**30
        rows: dict[str, dict[str, Any]] = {}
        for label, k in modes.items():
            row: dict[str, Any] = {"model": name, "mode": label, "chunk": k, "state_gib": state_gib}
            free(s.device)
            if s.cuda:
                torch.cuda.reset_peak_memory_stats(s.device)
                before = torch.cuda.memory_allocated(s.device)
            try:
                with torch.no_grad():
                    frames = sum(piece.shape[2] for piece in iter_decode(model, latents, k))  # each dropped when made
                sync(s.device)
            except torch.cuda.OutOfMemoryError as e:
                row.update(status="out of memory", error=describe(e))
            else:
                if frames != output_frames(model, t):
                    raise AssertionError(f"{name} {label} made {frames} frames, expected {output_frames(model, t)}")
                row["status"] = "ok"
                if s.cuda:
                    peak = torch.cuda.max_memory_allocated(s.device)
                    row.update(peak_gib=peak / 2**30, model_and_latents_gib=before / 2**30,
                               decode_gib=(peak - before) / 2**30)  # fmt: skip
                else:
                    row.update(peak_gib=None, decode_gib=None)
            rows[label] = row
            sec["rows"].append(row)
            peak_text = f"{row['decode_gib']:.2f} GiB above the model" if row.get("decode_gib") is not None else ""
            say(f"memory {name} {label}: {row['status']} {peak_text}".rstrip())
        one_shot, stream = rows["one-shot"], rows.get(f"stream k={s.chunk}")
        if stream is not None and s.cuda and one_shot.get("decode_gib") and stream.get("decode_gib"):
            one_shot["oneshot_over_stream_x"] = one_shot["decode_gib"] / stream["decode_gib"]
        model.cpu()
        free(s.device)
    sec["setup"] = {"size": f"{s.height}x{s.width}", "latent_frames": t, "dtype": dtype_name(s.dtype)}
    sec["notes"].append(
        "decode_gib: torch.cuda.max_memory_allocated during the decode minus what was allocated before it "
        "(models, latents); chunk outputs are dropped as they are made; one-shot = the whole clip after the "
        "first frame as one chunk (the causal models' one-shot path); oneshot_over_stream_x = one-shot "
        f"decode_gib / stream k={s.chunk} decode_gib."
    )
    if not s.cuda:
        sec["notes"].append("peak memory needs CUDA: on this device only the decode paths ran (no numbers)")


def section_exactness(s: Settings, sec: dict[str, Any]) -> None:
    family = families.get(s.family)
    small = family.tiny_config()  # the family's smallest teacher: every feature, tiny widths
    fused_ok = False
    if s.cuda:
        from flashvaed.engines.kernel import streaming_causal_conv3d, triton_available

        fused_ok = triton_available()
    bad = []
    chunkings = (1, 2) if s.smoke else (1, 2, 3)

    def latents_shape(model: nn.Module) -> tuple[int, ...]:  # batch 2 and odd sizes; one row in smoke runs
        return (1, model.latent_channels, 3, 2, 2) if s.smoke else (2, model.latent_channels, 5, 4, 6)

    with tf32(False):
        for name, model in build_models(s, config=small).items():
            g = torch.Generator().manual_seed(1)
            z = torch.randn(latents_shape(model), generator=g).to(s.device)
            with torch.no_grad():
                one_shot = model.decode(z)
                reference = copy.deepcopy(model).double().cpu().decode(z.double().cpu())
                chunked = max(float((model.decode(z, chunk=k) - one_shot).abs().max()) for k in chunkings)
                fused: float | str = "skipped: needs CUDA and triton"
                if fused_ok:
                    with fused_steps(model, streaming_causal_conv3d):
                        fused = float((model.decode(z, chunk=2) - one_shot).abs().max())
            rel = float((one_shot.double().cpu() - reference).norm() / reference.norm())
            sec["rows"].append({"model": name, "rel_err_vs_fp64": rel, "chunkings_max_abs": chunked,
                                "triton_vs_torch_max_abs": fused})  # fmt: skip
            say(f"exactness {name}: fp32 vs fp64 {rel:.2e}, chunkings {chunked:.2e}, triton {fused}")
            if not (rel < 1e-4 and chunked < 1e-4 and (not isinstance(fused, float) or fused < 1e-4)):
                bad.append(name)
    sec["setup"] = {"teacher": family.describe(small), "chunkings": chunkings,
                    "device": str(s.device), "reference": "float64 on the CPU"}  # fmt: skip
    if bad:
        raise AssertionError(f"outside 1e-4: {', '.join(bad)}")


def section_runtimes(s: Settings, sec: dict[str, Any]) -> None:
    from flashvaed import engines
    from flashvaed.engines import compiled

    # the families in the order listed, --family first: its models also run the compiling modes
    names = [s.family] + [n for n in families.names() if n != s.family]
    compiling = ("max",) if s.cuda else ("inductor",)  # max: inductor inside a CUDA graph
    old_backend, compiled.BACKEND = compiled.BACKEND, s.compile_backend
    bad = []
    try:
        with tf32(False):
            for index, family_name in enumerate(names):
                family = families.get(family_name)
                built = build_models(dataclasses.replace(s, family=family_name), config=family.tiny_config())
                models = {family_name if k == "teacher" else k: m for k, m in built.items()}  # rows name the family
                for name, model in models.items():
                    side = 2 if clocked(model) else 4
                    frames = 14 if clocked(model) else 6  # a clocked decoder steadies past its warm-up
                    g = torch.Generator().manual_seed(1)
                    z = torch.randn(1, model.latent_channels, frames, side, side, generator=g).to(s.device)
                    eager = engines.load(model, device=s.device).decode(z, chunk=2)
                    # the device's own run-to-run spread (cuDNN may pick split reductions): the bar below
                    eager_spread = float((engines.load(model, device=s.device).decode(z, chunk=2) - eager).abs().max())
                    # compiles are minutes of a GPU lease: only the first family's student compiles
                    student = index == 0 and name != family_name
                    modes = (["cudagraphs"] if s.cuda else []) + (list(compiling) if student else [])
                    for mode in modes:
                        row: dict[str, Any] = {"model": name, "compile": mode}
                        if mode != "cudagraphs" and s.out_of_time(s.compile_guess_s):
                            row["status"] = "skipped: a compile would overrun the time budget (--budget-s)"
                        else:
                            decoder = engines.load(model, device=s.device, compile=mode)
                            first, got = timed(lambda d=decoder, z=z: d.decode(z, chunk=2), s.device)
                            again = decoder.decode(z, chunk=2)
                            err = float((got - eager).abs().max())
                            repeat = float((again - got).abs().max())
                            row.update(status="ok", first_call_s=first, max_abs_vs_eager=err, repeat_max_abs=repeat,
                                       eager_repeat_max_abs=eager_spread)  # fmt: skip
                            if not (err <= 1e-5 and repeat <= max(1e-5, eager_spread)):
                                bad.append(f"{name} {mode} ({err:.2e})")
                            torch._dynamo.reset()
                        sec["rows"].append(row)
                        say(f"runtimes {name} {mode}: {row['status']} {row.get('max_abs_vs_eager', '')}")
                del models, built
                free(s.device)
    finally:
        compiled.BACKEND = old_backend
    sec["setup"] = {"families": names, "compile_backend": s.compile_backend, "tf32": False}
    sec["notes"].append(
        "Each row: engines.load(model, compile=MODE).decode(latents, chunk=2) vs engines.load(model).decode, the "
        "same latents; first_call_s includes the compile or capture; repeat_max_abs: a second decode of the "
        "same clip through the same decoder vs the first; eager_repeat_max_abs: the same for two eager decoders "
        "(the device's own run-to-run spread); both bars 1e-5."
    )
    if bad:
        raise AssertionError("compiled differs from eager beyond 1e-5: " + "; ".join(bad))


SECTION_FUNCTIONS: dict[str, Callable[[Settings, dict[str, Any]], None]] = {
    "decode": section_decode,
    "profile": section_profile,
    "kernel": section_kernel,
    "onnxruntime": section_onnxruntime,
    "fidelity": section_fidelity,
    "memory": section_memory,
    "exactness": section_exactness,
    "runtimes": section_runtimes,
}


# ---------------------------------------------------------------------------------------------
# Report: JSON (non-finite floats as strings, so any JSON reader takes it) and Markdown.
# ---------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path | torch.dtype | torch.device):
        return str(value)
    return value


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "/")


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# flashvaed GPU suite",
        "",
        f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, "
        f"triton {meta['triton']}, onnxruntime {meta['onnxruntime']}; {meta['started']}; "
        f"{'smoke run (CPU, tiny models)' if meta['smoke'] else 'full-size models, random weights'}.",
        f"Command: `{meta['command']}`",
    ]
    for name in SECTIONS:
        sec = report["sections"].get(name)
        if sec is None:
            continue
        took = f", {sec['seconds']:.0f} s" if isinstance(sec.get("seconds"), float) else ""
        lines += ["", f"## {name}: {TITLES[name]} ({sec['status']}{took})"]
        if sec.get("reason"):
            lines.append(f"Skipped: {sec['reason']}")
        if sec.get("error"):
            lines.append(f"Error: `{sec['error']}`")
        if sec.get("setup"):
            lines.append("Setup: " + ", ".join(f"{k} {cell(v)}" for k, v in sec["setup"].items()))
        rows = sec.get("rows") or []
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
        for note in sec.get("notes", []):
            lines += ["", note]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], s: Settings, out_dir: Path) -> None:
    """Both files, each swapped in whole (flashvaed.atomic): a reader never sees half a report."""
    report["meta"]["elapsed_s"] = time.perf_counter() - s.started
    for name, text in (("gpu_suite.json", json.dumps(jsonable(report), indent=2)), ("gpu_suite.md", markdown(report))):
        with atomic_output(out_dir / name) as tmp:
            tmp.write_text(text)


def environment(s: Settings) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "smoke": s.smoke,
        "device": str(s.device),
        "device_name": torch.cuda.get_device_name(s.device) if s.cuda else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if s.cuda else None,
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "cpu_threads": torch.get_num_threads(),
    }
    if s.cuda:
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(s.device).total_memory / 2**30
    for module in ("triton", "onnxruntime", "onnx"):
        try:
            meta[module] = __import__(module).__version__
        except Exception as e:  # absent or broken: say which
            meta[module] = f"unavailable ({describe(e)})"
    meta["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return meta


def run_section(name: str, s: Settings, report: dict[str, Any], out_dir: Path) -> None:
    """Run one section; whatever happens, record it and rewrite the report."""
    sec: dict[str, Any] = {"status": "running", "rows": [], "notes": []}
    report["sections"][name] = sec
    say(f"{name}: {TITLES[name]}")
    start = time.perf_counter()
    try:
        if s.out_of_time():
            raise Skip("time budget spent (--budget-s)")
        SECTION_FUNCTIONS[name](s, sec)
        sec["status"] = "ok"
    except Skip as e:
        sec.update(status="skipped", reason=str(e))
    except Exception as e:
        sec.update(status="failed", error=describe(e), traceback=traceback.format_exc().splitlines()[-12:])
    finally:
        sec["seconds"] = time.perf_counter() - start
        why = f" ({sec.get('reason') or sec.get('error')})" if sec["status"] != "ok" else ""
        say(f"{name}: {sec['status']}{why} after {sec['seconds']:.1f} s")
        torch._dynamo.reset()
        free(s.device)
        write_report(report, s, out_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder (gpu_suite.json, gpu_suite.md)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models and sizes: checks the script runs")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--family", default="wan2.1", help="a causal model family (default wan2.1)")
    parser.add_argument(
        "--frames", type=int, default=None, help="output frames, 1 + tk (default 1 + 80//t * t; smoke 1 + 2t)"
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (default 480; smoke 16)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 832; smoke 16)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="decode/memory dtype (default bf16)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda; smoke cpu)")
    parser.add_argument("--chunk", type=int, default=2, help="latent frames per steady chunk")
    parser.add_argument("--repeats", type=int, default=None, help="timed decodes per cell (default 3; smoke 1)")
    parser.add_argument("--modes", default="eager,cudagraph,compile,compile-ro", help=f"of {', '.join(MODES)}")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke eager)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="after this, compiles and sections are skipped")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device here (use --smoke, or --device cpu for full-size CPU runs)")
    if device.type == "cuda" and device.index is None:  # set_device and the CUDA graph pools want an index
        device = torch.device("cuda", torch.cuda.current_device())
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    for what, given, known in (("section", sections, SECTIONS), ("mode", modes, MODES)):
        unknown = [x for x in given if x not in known]
        if unknown:
            raise SystemExit(f"gpu_suite: unknown {what} {', '.join(unknown)} (use {', '.join(known)})")
    args.sections = sections
    if args.family not in families.names():
        raise SystemExit(f"gpu_suite: unknown --family {args.family!r} (use {', '.join(families.names())})")
    height, width = args.height or (16 if smoke else 480), args.width or (16 if smoke else 832)
    with torch.device("meta"):  # the factors, from a teacher that allocates nothing
        teacher = families.get(args.family).teacher_type(families.get(args.family).config_type())
    if clocked(teacher):  # the decode loops below step a causal decoder
        raise SystemExit(f"gpu_suite: {args.family} decodes on a clock (latency); use a causal family")
    tf, sf = teacher.temporal_factor, teacher.spatial_factor
    frames = args.frames or (1 + 2 * tf if smoke else 1 + 80 // tf * tf)
    if args.chunk < 1 or (frames - 1) % tf or frames < 1 + tf * args.chunk:
        raise SystemExit(f"gpu_suite: --frames must be 1 + {tf}k with k >= --chunk ({args.chunk}), got {frames}")
    if height % sf or width % sf:
        raise SystemExit(f"gpu_suite: --height and --width must be multiples of {sf}, got {height}x{width}")
    return Settings(
        family=args.family,
        device=device,
        dtype=DTYPES[args.dtype or ("float32" if smoke else "bfloat16")],
        height=height,
        width=width,
        latent_frames=1 + (frames - 1) // tf,
        chunk=args.chunk,
        repeats=args.repeats or (1 if smoke else 3),
        modes=modes,
        compile_backend=args.compile_backend or ("eager" if smoke else "inductor"),
        smoke=smoke,
        started=time.perf_counter(),
        deadline=time.perf_counter() + args.budget_s,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    if s.smoke:  # tiny tensors: a thread pool only adds barriers, which stall badly on a busy machine
        torch.set_num_threads(1)
    if s.cuda:  # CUDA graphs and compiles work on the current device
        torch.cuda.set_device(s.device)
    # Triton reads TRITON_INTERPRET when the kernel is first jitted (flashvaed jits it lazily), not at import
    if not s.cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.pop("TRITON_INTERPRET", None):
        say("TRITON_INTERPRET dropped: a GPU run times the compiled kernel")
    report: dict[str, Any] = {"meta": environment(s), "sections": {}}
    meta = report["meta"]
    say(
        f"{meta['device_name']}, torch {meta['torch']}, CUDA {meta['cuda']}, triton {meta['triton']}, "
        f"onnxruntime {meta['onnxruntime']}; out {args.out}"
    )
    for name in SECTIONS:  # report order; each selected one is replaced when it runs
        selected = name in args.sections
        report["sections"][name] = {"status": "pending", "rows": []} if selected else {
            "status": "skipped", "reason": "not selected (--sections)", "rows": []}  # fmt: skip
    for name in RUN_ORDER:
        if name in args.sections:
            run_section(name, s, report, args.out)
    write_report(report, s, args.out)
    print("\n" + markdown(report))
    failed = [n for n, sec in report["sections"].items() if sec["status"] == "failed"]
    say(
        f"done in {report['meta']['elapsed_s']:.0f} s; report in {args.out}"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
