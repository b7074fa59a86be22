"""Compiled runtimes for torch models: a stream's steady step run compiled.

A stream's *steady* step — every step after the first whose chunk length is the stream's own,
and, for a decoder on a clock (LTX), one past the warm-up whose clip end is not yet known — is a
pure function of fixed-shape tensors (latents, state, the stream's inputs): what compilers want.
The first step, a short last chunk and a clocked decoder's warm-up and flush stay eager (they run
once per stream; compiling them would cost more than it saves).

Modes (``COMPILE_MODES``; see docs/runtimes.md for measurements):

* ``none``: eager;
* ``inductor``: ``torch.compile`` with static shapes, CPU and CUDA. Compiled once per (shape,
  chunk, dtype, device), in the stream's first steady step (tens of seconds on a CPU);
* ``cudagraphs`` (CUDA): the eager steady step captured as a CUDA graph, its latents, state and
  inputs in static buffers, replayed: no per-kernel launch cost, nothing to compile;
* ``max`` (CUDA): the inductor step captured as a CUDA graph;
* ``auto``: ``cudagraphs`` on CUDA, ``none`` elsewhere (a CPU compile costs more than a one-off
  decode saves).

A clocked decoder's compiled steps take their clock as a 0-d tensor (as its ONNX export does), so
one compiled step serves every position; its layers then compute the whole step (``windows=False``
where the decoder has windows), which past the warm-up and before the end is what they compute anyway.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..models.streaming import State, clocked

__all__ = ["AUTO", "COMPILE_MODES", "CUDA_ONLY", "SteadyStep", "resolve_compile"]

COMPILE_MODES = ("none", "inductor", "cudagraphs", "max", "auto")
CUDA_ONLY = ("cudagraphs", "max")
AUTO = {"cuda": "cudagraphs"}  # device type -> what "auto" runs; every other device: "none"
RECOMPILE_LIMIT = 64  # compiled shapes per process (dynamo's default of 8 is hit by a few models x sizes)
BACKEND = "inductor"  # torch.compile backend of the inductor modes (tests may trace with a cheaper one)


def resolve_compile(mode: str | None, device: str | torch.device) -> str:
    """The mode a torch model on ``device`` runs (``auto`` resolved); refused in one line where
    unknown or where it needs a device the model is not on."""
    if mode is None:
        return "none"
    if not isinstance(mode, str) or mode not in COMPILE_MODES:
        raise InputError(f"unknown {{compile}} mode {mode!r} (use {', '.join(COMPILE_MODES)})", "compile")
    kind = torch.device(device).type
    if mode == "auto":
        return AUTO.get(kind, "none")
    if mode in CUDA_ONLY and kind != "cuda":
        raise InputError(
            f"{{compile}} {mode} runs on CUDA devices only, this model is on {kind} (use inductor or none)", "compile"
        )
    return mode


def refuse_for_engine(mode: str | None, backend: str) -> None:
    """Engines run their own runtime's optimised graphs: a compile mode does not apply to them."""
    if mode not in (None, "none"):
        raise InputError(
            f"{{compile}} applies to torch models; this is a {backend} engine, which runs its own optimised graphs",
            "compile",
        )


def _steady(model: Any, latents: Tensor, state: State, clamp: bool, inputs: dict, clock: dict) -> tuple[Tensor, State]:
    return model.decode_step(latents, state, first=False, clamp=clamp, **inputs, **clock)


class SteadyStep:
    """One model's steady step in ``mode``, shared by every stream of its decoder; compiled
    functions and CUDA graphs are cached per (shape, chunk, dtype, device)."""

    def __init__(self, model: Any, mode: str) -> None:
        if mode not in ("inductor", "cudagraphs", "max"):
            raise ValueError(f"SteadyStep runs inductor, cudagraphs or max, not {mode!r}")
        self.model, self.mode = model, mode
        self.clocked = clocked(model)
        # a clocked decoder's layers run on the clip from this position on (before: its warm-up)
        self.warmup = math.ceil(model.output_offset / model.temporal_factor) if self.clocked else 0
        decoder = getattr(model, "decoder", None)
        takes = inspect.signature(decoder.forward).parameters if decoder is not None else {}
        self.extra = {"windows": False} if self.clocked and "windows" in takes else {}
        self.fn: Any = _steady
        if mode in ("inductor", "max"):
            limit = torch._dynamo.config.cache_size_limit
            torch._dynamo.config.cache_size_limit = max(limit, RECOMPILE_LIMIT)
            self.fn = torch.compile(_steady, dynamic=False, backend=BACKEND)
        self.graphs: dict[tuple, GraphStep] = {}
        self.compile_seconds: dict[tuple, float] = {}  # (shape key) -> seconds the first call took
        self._failed: set[tuple] = set()  # shapes whose capture failed: they run uncaptured

    def takes(self, position: int, end: int | None) -> bool:
        """Whether a step at this clock is steady (always, for a causal decoder)."""
        return not self.clocked or (end is None and position >= self.warmup)

    def __call__(
        self, stream: Any, latents: Tensor, state: State, inputs: dict, position: int, clamp: bool
    ) -> tuple[Tensor, State]:
        clock: dict[str, Any] = {}
        if self.clocked:
            clock = {"position": torch.tensor(position, dtype=torch.int64, device=latents.device), **self.extra}
        # one memory layout whoever made the state (the eager first step's slices, a compiled step,
        # a loaded state): static shapes guard on strides, and a new layout would compile again
        state = tuple(t.contiguous() for t in state)
        key = (tuple(latents.shape), latents.dtype, str(latents.device), clamp)
        graphed = self.mode in CUDA_ONLY and latents.device.type == "cuda" and key not in self._failed
        if not graphed:
            return self._timed(key, lambda: self.fn(self.model, latents, state, clamp, inputs, clock))
        params = _param_key(self.model)
        graph = self.graphs.get(key)
        if graph is None or graph.params != params:
            if graph is not None:  # the model moved (offloading): its graphs read freed memory
                self.graphs = {k: g for k, g in self.graphs.items() if g.params == params}
            try:
                graph = self._timed(key, lambda: GraphStep(self, latents, state, inputs, clock, clamp))
            except RuntimeError as e:  # said, not hidden: the step runs uncaptured
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0][:200]}); running uncaptured",
                              stacklevel=3)  # fmt: skip
                self._failed.add(key)
                return self.fn(self.model, latents, state, clamp, inputs, clock)
            self.graphs[key] = graph
        return graph.run(stream, latents, state, inputs, clock)

    def _timed(self, key: tuple, run: Any) -> Any:
        if key in self.compile_seconds:
            return run()
        start = time.perf_counter()
        out = run()
        self.compile_seconds[key] = time.perf_counter() - start
        return out


def _param_key(model: Any) -> tuple[int, ...]:
    params = list(model.parameters())
    return (params[0].data_ptr(), params[-1].data_ptr(), len(params))


class GraphStep:
    """The steady step of one shape captured as a CUDA graph (after a warm-up on a side stream).

    Latents, state and inputs are copied into static buffers before each replay; the new state
    is copied into the static state buffers after it, which the stream then holds as its state (a
    stream stepping again copies nothing in); frames are cloned out. Another stream taking the
    graph first hands the previous owner its state back as its own tensors.
    """

    def __init__(self, step: SteadyStep, latents: Tensor, state: State, inputs: dict, clock: dict, clamp: bool) -> None:
        self.params = _param_key(step.model)
        self.latents = latents.clone()
        self.state = tuple(t.clone() for t in state)
        self.inputs = _clone(inputs)
        self.clock = _clone(clock)
        self.owner: Any = None

        def run() -> tuple[Tensor, State]:
            return step.fn(step.model, self.latents, self.state, clamp, self.inputs, self.clock)

        side = torch.cuda.Stream(device=latents.device)
        side.wait_stream(torch.cuda.current_stream(latents.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # allocator warm-up (and, with inductor, the compile)
                run()
        torch.cuda.current_stream(latents.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.frames, self.new_state = run()

    def run(self, stream: Any, latents: Tensor, state: State, inputs: dict, clock: dict) -> tuple[Tensor, State]:
        owner = self.owner() if self.owner is not None else None
        mine = owner is stream and all(a is b for a, b in zip(state, self.state, strict=True))
        if owner is not None and owner is not stream and _holds(owner, self.state):
            owner.state = tuple(t.clone() for t in self.state)  # its state, out of buffers about to change
        self.latents.copy_(latents)
        if not mine:
            for dst, src in zip(self.state, state, strict=True):
                dst.copy_(src)
        _copy_into(self.inputs, inputs)
        _copy_into(self.clock, clock)
        self.graph.replay()
        for dst, src in zip(self.state, self.new_state, strict=True):
            dst.copy_(src)
        self.owner = weakref.ref(stream)
        return self.frames.clone(), self.state


def _holds(stream: Any, buffers: State) -> bool:
    state = getattr(stream, "state", None)
    return state is not None and len(state) == len(buffers) and all(a is b for a, b in zip(state, buffers, strict=True))


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)
