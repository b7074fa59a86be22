"""The ONNX Runtime backend: drive an export (or an optimised engine) through its contract.

One pair of sessions serves every stream (``run_with_iobinding`` is safe from many threads);
each stream owns its IO bindings and two sets of state buffers, allocated once when it starts
and swapped after every step: step n reads set A and writes set B, step n+1 the other way.
Where the sessions run on CUDA first, the buffers live on the device (``state_device``), so the
state never crosses PCIe between steps; on the CPU they are host buffers. State buffers are torch
tensors bound as zero-copy OrtValues through DLPack, which holds every state dtype of the contract
(float32, float16 and bfloat16, which numpy lacks) on either device, one code path for both.

Sessions are tuned (``session_options``): every graph optimisation, intra-op threads = the
physical cores this process may run on, sequential execution, workers that stop spinning when a run
ends (the next run is often another session's), unless an engine manifest's ``session_options`` say
otherwise. On CUDA a stream's first start per size runs both step graphs
once (``warm_up``: kernel selection and memory arenas) so that its first steps run at speed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from ..errors import InputError
from ..export.contract import PRECISIONS, Contract, check_external_data
from ..models.streaming import clocked
from ..safeload import member_file
from .base import ContractDecoder, Stream

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Intra-op threads a session may ask for: ONNX Runtime starts them all at once (100000 of them take
# minutes and 16 GiB), and it counts them in an int32. The limit of --threads and of engine manifests.
MAX_THREADS = 1024


def check_precision(contract: Contract, providers: list[str] | None = None) -> None:
    """Refuse an export whose state ONNX Runtime streams cannot hold: float32 and float16 anywhere;
    bfloat16 (numpy lacks it; ONNX Runtime's CPU kernels too) in torch tensors on CUDA only."""
    if contract.state_dtype in NUMPY_DTYPES:
        return
    if providers and providers[0] == "CUDAExecutionProvider" and torch.cuda.is_available():
        return
    takes = " or ".join(p for p, dtype in PRECISIONS.items() if dtype in NUMPY_DTYPES)
    raise InputError(
        f"ONNX Runtime streams take {takes} state ({contract.precision} on CUDA only); this export is "
        f"{contract.precision} (run it with the CUDA provider, build a tensorrt engine from it, or export it as "
        f"{takes})"
    )


def torch_holds(device: tuple[str, int]) -> bool:
    """Whether torch can hold a stream's state on ``device`` (a CPU build of torch cannot on CUDA)."""
    return device[0] == "cpu" or (device[0] == "cuda" and torch.cuda.is_available())


def physical_cores() -> int:
    """Physical cores this process may run on: ONNX Runtime's own default counts the machine's,
    which oversubscribes a container or a process pinned to fewer (hyperthreads do not help convs)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    cores = None
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    if not cores:
        cores = _cpuinfo_cores()
    return max(1, min(allowed, cores or allowed))


def _cpuinfo_cores() -> int | None:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo (Linux), None where it says nothing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pairs, phys = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or None


def default_providers() -> list[str]:
    """CUDA first where ONNX Runtime has it and a GPU is present, then CPU (TensorRT EP only when asked).

    onnxruntime-gpu lists the CUDA provider even on machines without a GPU, hence the torch check.
    """
    available = ort.get_available_providers()
    gpu = torch.cuda.is_available() and "CUDAExecutionProvider" in available
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]


def check_providers(providers: list[str]) -> list[str]:
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise InputError(f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(available)})")
    return providers


def session_options(settings: dict | None = None) -> ort.SessionOptions:
    """ONNX Runtime session options from ``settings`` (an engine manifest's ``session_options``):
    an optimisation level or thread count ONNX Runtime would choke on is refused in one line."""
    settings = settings or {}
    if not isinstance(settings, dict):
        raise InputError(f"session options must be a mapping, got {type(settings).__name__}")
    level = settings.get("graph_optimization_level", "ORT_ENABLE_ALL")
    levels = ort.GraphOptimizationLevel.__members__
    if not isinstance(level, str) or level not in levels:
        raise InputError(f"session option graph_optimization_level {level!r} is not one of {', '.join(levels)}")
    threads = settings.get("intra_op_num_threads", None)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS
    ):
        raise InputError(f"session option intra_op_num_threads must be in 0..{MAX_THREADS}, got {threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    # unset or 0 ("all cores", what build-engine writes by default): the physical cores this process may use
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1  # one graph at a time: a step's ops run in order
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # a stream alternates sessions (first, steady, last or flush; tiles): each session's workers would spin
    # on for ~20 ms after its run, on the cores the next session's run needs. They spin within a run only.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    return options


def rewrites_on(settings: dict | None) -> bool:
    """Whether CPU sessions load graphs through ``ort_rewrites`` (session option ``rewrites``, default on)."""
    value = (settings or {}).get("rewrites", True)
    if not isinstance(value, bool):
        raise InputError(f"session option rewrites must be true or false, got {value!r}"[:200])
    return value


def check_backend(backend: dict, where: str) -> None:
    """Refuse an engine manifest's ``backend`` section ONNX Runtime would choke on, when the manifest
    is read (``info`` starts no session). Providers must be names ONNX Runtime knows; whether this
    machine has them is asked when a session starts (``check_providers``)."""
    providers = backend.get("providers")
    if providers is not None:
        if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
            raise InputError(f"{where}: backend.providers must be a list of provider names, got {providers!r}"[:300])
        known = ort.get_all_providers()
        unknown = [p for p in providers if p not in known]
        if unknown:
            raise InputError(f"{where}: backend.providers names {unknown[0]!r}, which ONNX Runtime does not know"[:300])
    try:
        session_options(backend.get("session_options"))
        rewrites_on(backend.get("session_options"))
    except InputError as e:
        raise InputError(f"{where}: in backend.session_options, {e}"[:300]) from None


def load_session(folder: Path, name: str, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """A session for the graph ``folder/name`` as it is (its external data must stay inside ``folder``)."""
    return open_graph(folder, name, options, providers, rewrites=False)[0]


def open_graph(
    folder: Path, name: str, options: ort.SessionOptions, providers: list[str], rewrites: bool
) -> tuple[ort.InferenceSession, bool]:
    """A session for the graph ``folder/name``, whose external data must stay inside ``folder``, and
    whether it runs rewritten: with ``rewrites``, a session that runs on the CPU first loads the
    graph through ``ort_rewrites`` (its slow CPU patterns as faster equivalent ops)."""
    path = member_file(folder, name, InputError, "graph")
    check_external_data(path)
    ort.set_default_logger_severity(4)  # failures become our one-line errors, not ORT's log lines
    rewritten = None
    if rewrites and providers[0] == "CPUExecutionProvider":
        from .ort_rewrites import rewrite_for_cpu

        rewritten = rewrite_for_cpu(path)  # one thread: the pass only optimises and saves
    if rewritten is not None:
        return ort.InferenceSession(rewritten, options, providers=providers), True  # a failure here is our bug
    try:
        return ort.InferenceSession(str(path), options, providers=providers), False
    except Exception as e:  # ONNX Runtime's own exception types are not importable by a stable name
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot load graph {path}: {first[:300]}") from None


def state_device(providers: list[str], provider_options: dict[str, dict[str, Any]]) -> tuple[str, int]:
    """Where a stream keeps its state, from its session's providers (in order) and their options:
    ``("cuda", device_id)`` when CUDA runs first, else ``("cpu", 0)``.

    State bound as CPU OrtValues to a CUDA session is copied to the device and back on every step;
    device OrtValues bound as outputs and rebound as the next step's inputs stay where they are.
    """
    if providers and providers[0] == "CUDAExecutionProvider":
        return "cuda", int(provider_options.get("CUDAExecutionProvider", {}).get("device_id", 0))
    return "cpu", 0


class TensorState:
    """Both state sets as torch tensors on the state's device, bound as zero-copy OrtValues
    (DLPack): any dtype, CPU or CUDA; copied to the host only to save a state."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: str, device: tuple[str, int]) -> None:
        where = torch.device(device[0], device[1]) if device[0] == "cuda" else torch.device("cpu")
        self.tensors = [[torch.zeros(s, dtype=TORCH_DTYPES[dtype], device=where) for s in shapes] for _ in range(2)]
        self.values = [[ortvalue(t) for t in tensors] for tensors in self.tensors]

    def read(self, index: int) -> list[Tensor]:
        return [t.cpu() for t in self.tensors[index]]

    def write(self, index: int, tensors: list[Tensor]) -> None:
        for dst, src in zip(self.tensors[index], tensors, strict=True):
            dst.copy_(src)

    def zero(self) -> None:
        for tensors in self.tensors:
            for t in tensors:
                t.zero_()


class DeviceState:
    """Both state sets as OrtValues on ``device`` where torch cannot hold them (a CPU build of
    torch beside onnxruntime-gpu): numpy dtypes only (``check_precision``)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: Any, device: str, device_id: int) -> None:
        self.dtype = np.dtype(dtype)
        self.values = [
            [ort.OrtValue.ortvalue_from_numpy(np.zeros(s, self.dtype), device, device_id) for s in shapes]
            for _ in range(2)
        ]

    def read(self, index: int) -> list[Tensor]:
        return [torch.from_numpy(v.numpy()) for v in self.values[index]]

    def write(self, index: int, tensors: list[Tensor]) -> None:
        for v, t in zip(self.values[index], tensors, strict=True):
            v.update_inplace(np.ascontiguousarray(t.numpy(), dtype=self.dtype))

    def zero(self) -> None:
        for values in self.values:
            for v in values:
                v.update_inplace(np.zeros(v.shape(), self.dtype))


def ortvalue(t: Tensor) -> Any:
    """A zero-copy OrtValue of a contiguous tensor (the tensor must outlive it)."""
    try:
        return ort.OrtValue.from_dlpack(t)
    except TypeError:  # onnxruntime before 1.20 takes the capsule and a bool flag
        return ort.OrtValue.from_dlpack(t.__dlpack__(), False)


def make_state(shapes: list[tuple[int, ...]], dtype: str, device: tuple[str, int]) -> TensorState | DeviceState:
    return TensorState(shapes, dtype, device) if torch_holds(device) else DeviceState(shapes, dtype, *device)


MAX_SPARES_PER_SIZE = 2  # closed streams' buffers kept for reuse, per (batch, size, device) ...
MAX_SPARE_SIZES = 2  # ... and for so many sizes (a tiled run's interior and edge tiles)


class StreamBuffers:
    """What a stream of one size allocates when it starts: both state sets and the IO bindings that bind
    them, and a reusable buffer for the positions of warm-up and flush steps that are not frames of the
    clip. A closed stream hands them to the next (``OnnxRuntimeDecoder.spares``)."""

    def __init__(self, stream: OrtStream, batch: int, height: int, width: int, device: tuple[str, int]) -> None:
        d, prefix = stream.source, stream.prefix
        self.state = make_state(d.state_shapes(batch, height, width), d.contract.state_dtype, device)
        values = self.state.values
        # state is bound once: ``first`` writes set 0; steady (and last) binding i reads set i, writes the other
        self.first = d.sessions[prefix + "first"].io_binding()
        for i, t in enumerate(d.contract.state):
            self.first.bind_ortvalue_output(t.output, values[0][i])
        self.steps: dict[str, list] = {}
        for graph in d.contract.graphs[1:]:
            self.steps[graph] = []
            for src in (0, 1):
                binding = d.sessions[prefix + graph].io_binding()
                for i, t in enumerate(d.contract.state):
                    binding.bind_ortvalue_input(t.input, values[src][i])
                    binding.bind_ortvalue_output(t.output, values[1 - src][i])
                self.steps[graph].append(binding)
        self._frames: dict[tuple[int, ...], np.ndarray] = {}

    def frames(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape not in self._frames:
            self._frames[shape] = np.empty(shape, np.float32)
        return self._frames[shape]


class OrtStream(Stream):
    source: OnnxRuntimeDecoder
    prefix = ""  # of the step graphs' names: "tile." for a tile of a tiled run (``OrtTileStream``)

    def __init__(self, source: OnnxRuntimeDecoder, options: dict[str, Any] | None = None) -> None:
        super().__init__(source)
        self.options = dict(options or {})
        self.held: Tensor | None = None  # the frames a flush made with the final chunk, for close()
        self.buffers: StreamBuffers | None = None

    def _start(self, batch: int, height: int, width: int) -> None:
        d = self.source
        session = d.sessions[self.prefix + "first"]
        device = state_device(session.get_providers(), session.get_provider_options())
        self._release()
        self.spare_key = (self.prefix, batch, height, width, device)
        try:  # list.pop is atomic: two threads never take the same buffers
            self.buffers = d.spares.get(self.spare_key, []).pop()
        except IndexError:
            self.buffers = StreamBuffers(self, batch, height, width, device)
        self.state, self.first_binding, self.bindings = self.buffers.state, self.buffers.first, self.buffers.steps
        self.current = 0  # the set holding the state the next step reads
        # per-stream inputs (a timestep, noise maps) are bound to every graph when the stream starts
        self.inputs = {
            k: ort.OrtValue.ortvalue_from_numpy(v)
            for k, v in d.stream_inputs(batch, height, width, self.options).items()
        }
        for binding in [self.first_binding] + [b for pair in self.bindings.values() for b in pair]:
            for name, value in self.inputs.items():
                binding.bind_ortvalue_input(name, value)
        warm = (self.prefix, batch, height, width)
        if (d.warm_up if d.warm_up is not None else device[0] == "cuda") and warm not in d.warmed:
            self._warm_up(batch, height, width)
            d.warmed.add(warm)

    def _warm_up(self, batch: int, height: int, width: int) -> None:
        """Run the first and the steady graph once on zeros, then zero the state again: the sessions'
        kernel choices and memory arenas are made before the stream's first real step."""
        d = self.source
        zeros = torch.zeros(batch, d.latent_channels, 1, height, width)
        self._step(zeros, first=True)
        if "steady" in d.contract.graphs:
            self._step(zeros.expand(-1, -1, d.chunk_range.opt, -1, -1), first=False)
        self.state.zero()
        self.current = 0

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        d = self.source
        graph = d.step_graph(first, self.end)
        final = graph == "last" and self.position < self.end <= self.position + latents.shape[2]  # type: ignore[operator]
        if final and self.prefix + "flush" in d.sessions:  # the chunk holding the clip's last latent frame
            return self._final_step(latents)
        binding = self.first_binding if first else self.bindings[graph][self.current]
        b, _, k, h, w = latents.shape
        s = d.spatial_factor
        n = d.step_frames(first, k)
        shape = (b, 3, n, h * s, w * s)
        lo, hi = self.clip_positions(n)
        # a step whose positions the stream keeps writes fresh memory (the caller's frames); the positions
        # of a warm-up or flush step that are not frames of the clip go to a buffer reused step after step
        # (fresh pages cost a page fault each: on a small model, more than the step's compute)
        frames = np.empty(shape, np.float32) if (lo, hi) == (0, n) else self.buffers.frames(shape)
        binding.bind_ortvalue_input("latents", ort.OrtValue.ortvalue_from_numpy(latents_array(latents)))
        binding.bind_ortvalue_output("frames", ort.OrtValue.ortvalue_from_numpy(frames))
        if clocked(d) and not first:
            binding.bind_ortvalue_input("position", ort.OrtValue.ortvalue_from_numpy(np.array(self.position, np.int64)))
            if graph == "last":
                binding.bind_ortvalue_input("end", ort.OrtValue.ortvalue_from_numpy(np.array(self.end, np.int64)))
        self._bind_more(binding)
        d.sessions[self.prefix + graph].run_with_iobinding(binding)
        if not first:
            self.current = 1 - self.current
        if (lo, hi) == (0, n):
            return torch.from_numpy(frames)
        out = torch.empty(shape)  # the stream keeps positions lo..hi only (``Stream._advance``)
        out[:, :, lo:hi] = torch.from_numpy(frames[:, :, lo:hi])
        return out

    def _release(self) -> None:
        """Hand this stream's buffers to the next stream of the same size (a closed stream's state is
        never read again: ``first`` writes it before any step reads it)."""
        buffers, self.buffers = getattr(self, "buffers", None), None
        if buffers is None:
            return
        spares = self.source.spares
        kept = spares.pop(self.spare_key, [])  # re-inserted last: the most recently used size
        if len(kept) < MAX_SPARES_PER_SIZE:
            kept.append(buffers)
        spares[self.spare_key] = kept
        while len(spares) > MAX_SPARE_SIZES:  # a long-lived decoder of many sizes keeps only recent ones
            spares.pop(next(iter(spares), None), None)  # (another thread may have dropped it already)

    def _bind_more(self, binding: Any) -> None:
        """Bind a step's further inputs (a tile's contexts)."""

    def close(self) -> Tensor:
        """End the stream. With a ``flush`` graph (the contract's FLUSH_RULE) the chunk holding the clip's
        last latent frame made every frame it still holds back in one run; a stream never told its end
        (no ``final`` push) flushes in ``last`` runs, a chunk at a time."""
        held, self.held = self.held, None
        if held is None:
            return super().close()
        self.reset()
        return held

    def reset(self) -> None:
        super().reset()
        self.held = None
        self._release()

    def _run_flush(self, latents: Tensor) -> Tensor:
        """The ``flush`` graph on the chunk holding the clip's last latent frame: every frame still held back."""
        d = self.source
        session = d.sessions[self.prefix + "flush"]
        binding = session.io_binding()
        feeds = {
            "latents": ort.OrtValue.ortvalue_from_numpy(latents_array(latents)),
            "position": ort.OrtValue.ortvalue_from_numpy(np.array(self.position, np.int64)),
            "end": ort.OrtValue.ortvalue_from_numpy(np.array(self.end, np.int64)),
            **self.inputs,
        }
        for t, value in zip(d.contract.state, self.state.values[self.current], strict=True):
            feeds[t.input] = value
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        # its length depends on the clock (FLUSH_RULE): written straight into the caller's frames, no copy
        b, _, _, h, w = latents.shape
        s = d.spatial_factor
        frames = np.empty((b, 3, d.contract.flush_frames(self.position, self.end), h * s, w * s), np.float32)  # type: ignore[arg-type]
        binding.bind_ortvalue_output("frames", ort.OrtValue.ortvalue_from_numpy(frames))
        session.run_with_iobinding(binding)
        return torch.from_numpy(frames)

    def _final_step(self, latents: Tensor) -> Tensor:
        """The chunk holding the clip's last latent frame through ``flush``: its positions' frames now
        (as a step's), the rest of the clip held for ``close``."""
        d = self.source
        clip = self._run_flush(latents)
        b, _, k, h, w = latents.shape
        n, s = d.step_frames(False, k), d.spatial_factor
        lo, hi = self.clip_positions(n)  # the step's positions that hold frames of the clip: its first ones
        frames = torch.empty(b, 3, n, h * s, w * s)  # the stream keeps positions lo .. hi only
        frames[:, :, lo:hi] = clip[:, :, : hi - lo]
        self.held = clip[:, :, hi - lo :]
        return frames

    def _state(self) -> tuple[list[str], list[Tensor]]:
        return [t.name for t in self.source.contract.state], self.state.read(self.current)

    def _set_state(self, tensors: list[Tensor]) -> None:
        self.state.write(self.current, tensors)


class OrtTileStream(OrtStream):
    """One tile of a tiled run of an export made for tiling (``flashvaed.engines.tiled_engine``): its
    steps run the ``tile.*`` graphs with the frame's ``frame_contexts`` (name -> tensor) bound, and
    ``capture`` runs a ``capture.J.*`` graph on its current state without advancing it."""

    prefix = "tile."

    def __init__(self, source: OnnxRuntimeDecoder, options: dict[str, Any] | None = None) -> None:
        super().__init__(source, options)
        self.frame_contexts: dict[str, Tensor] = {}

    def _bind_more(self, binding: Any) -> None:
        self._keep = [_value(v) for v in self.frame_contexts.values()]  # alive until the step has run
        for name, value in zip(self.frame_contexts, self._keep, strict=True):
            binding.bind_ortvalue_input(name, value)

    def capture(self, index: int, latents: Tensor, first: bool, contexts: dict[str, Tensor]) -> Tensor:
        """Frame-wide module ``index``'s input over this tile's region, in this step."""
        d = self.source
        graph = f"capture.{index}.{d.step_graph(first, self.end)}"
        session = d.sessions[graph]
        takes = {i.name for i in session.get_inputs()}
        feeds: dict[str, Any] = {"latents": latents_array(latents), **self.inputs, **contexts}
        if not first:
            feeds.update({t.input: v for t, v in zip(d.contract.state, self.state.values[self.current], strict=True)})
        if clocked(d) and not first:
            feeds["position"] = np.array(self.position, np.int64)
            feeds["end"] = np.array(self.end if self.end is not None else 0, np.int64)
        binding = session.io_binding()
        keep = {name: _value(v) for name, v in feeds.items() if name in takes}
        for name, value in keep.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("partial")
        session.run_with_iobinding(binding)
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0])


def _value(v: Any) -> Any:
    """An OrtValue of a tensor, array or OrtValue (CPU tensors and arrays are not copied)."""
    if isinstance(v, ort.OrtValue):
        return v
    if isinstance(v, Tensor):
        v = v.detach().cpu().contiguous().numpy()
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))


def latents_array(latents: Tensor) -> np.ndarray:
    return np.ascontiguousarray(latents.detach().cpu().float().numpy())


class OnnxRuntimeDecoder(ContractDecoder):
    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        contract: Contract,
        providers: list[str] | None = None,
        settings: dict | None = None,
    ) -> None:
        super().__init__(contract)
        self.path = Path(path)
        backend = contract.backend or {}
        self.providers = check_providers(providers or backend.get("providers") or default_providers())
        check_precision(contract, self.providers)
        settings = settings or backend.get("session_options")
        options, rewrites = session_options(settings), rewrites_on(settings)
        self.sessions, self.rewritten = {}, []  # rewritten: the graphs that run through ort_rewrites
        for g, f in contract.files.items():
            self.sessions[g], rewritten = open_graph(self.path, f, options, self.providers, rewrites)
            if rewritten:
                self.rewritten.append(g)
        for g, session in self.sessions.items():
            inputs = {i.name: i.shape for i in session.get_inputs()}
            problem = contract.io_problem(g, inputs, {o.name: o.shape for o in session.get_outputs()})
            if problem:
                raise InputError(f"{self.path}: {problem}; its manifest does not describe its graphs")
        # warm-up runs at a stream's first start per size: None = where the state is on CUDA
        self.warm_up: bool | None = None
        # buffers of closed streams, by (graph prefix, batch, height, width, state device), for the next
        self.spares: dict[tuple, list[StreamBuffers]] = {}
        self.warmed: set[tuple] = set()

    def stream(self, **options: Any) -> OrtStream:
        self.check_options(options)
        return OrtStream(self, options)

    def tile_stream(self, **options: Any) -> OrtTileStream:
        """A stream of one tile of a tiled run (exports made for tiling: ``contract.tiling``)."""
        self.check_options(options)
        return OrtTileStream(self, options)

    def run_frame(self, index: int, frame: Tensor) -> Tensor:
        """Graph ``frame.{index}``: a "place" frame-wide module on the whole frame's input."""
        x = np.ascontiguousarray(frame.detach().cpu().numpy())
        return torch.from_numpy(self.sessions[f"frame.{index}"].run(None, {"input": x})[0])

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers, "rewritten_graphs": self.rewritten}
