"""The TensorRT backend: build plan files from an export, and run them.

Kept thin on purpose: TensorRT cannot be installed on the machines this project is developed
and tested on, so everything here is a direct use of the documented TensorRT 10 / polygraphy
APIs, and everything around it (the ONNX it parses, op coverage, the plugin kernel, the
contract) is tested elsewhere. The decisions are small pure functions tested with fake TensorRT
objects (``network_creation_flags``, ``parse_network``, ``with_activation_resize``,
``DeviceMemory``, ``enqueue``); the rest runs only where ``tensorrt`` imports and a GPU is present.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..export.contract import Contract, graph_kind
from ..models.streaming import clocked
from ..progress import Bar
from ..safeload import member_file
from .base import ContractDecoder, Stream

INSTALL_HINT = "pip install flashvaed[tensorrt]"
AOT_PLUGINS_SINCE = (10, 9)  # TensorRT's ahead-of-time Python plugins and the PREFER_*_PYTHON_PLUGINS flags


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or a one-line error naming the extra to install."""
    try:
        import tensorrt
    except ImportError:
        raise InputError(f"the TensorRT backend needs TensorRT, which is not installed here: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise InputError("the TensorRT backend needs an NVIDIA GPU, and CUDA is not available here")
    return tensorrt


def computes_windows(export_dir: Path, contract: Contract) -> bool:
    """Whether an export's graphs compute windows (``ExportOptions.windows``): recorded in its manifest;
    in a manifest from before it was recorded, a clocked ``steady`` graph with a ``Range`` (a window's
    positions, sized from ``position``) has them."""
    if contract.windows is not None or not contract.clocked:
        return bool(contract.windows)
    import onnx

    graph = onnx.load(
        str(member_file(export_dir, contract.files["steady"], InputError, "graph")), load_external_data=False
    )
    return any(node.op_type == "Range" for node in graph.graph.node)


def refuse_windows(export_dir: Path, contract: Contract) -> None:
    """Refuse, in one line and before TensorRT is imported, an export whose graphs compute windows: the
    sizes of their tensors depend on the values of ``position`` and ``end``, which this backend binds
    as device tensors (not shape tensors, whose values TensorRT reads on the host with a profile of
    each), and their ``flush`` graph returns a number of frames known only once it has run."""
    if computes_windows(export_dir, contract):
        raise InputError(
            f"{export_dir} computes windows (tensor sizes inside its graphs depend on the clock inputs), which "
            "TensorRT cannot build: export it again without them (flashvaed export --no-windows, or "
            "ExportOptions(windows=False))"
        )


def profile_sizes(contract: Contract, graph: str) -> list[dict[str, int]]:
    """The sizes of ``graph``'s min, opt and max profile: the manifest's shape ranges; for a tiled
    run's ``frame.J`` graphs, its tiling frame and the frames module J sees in any step."""
    levels = []
    for level in ("min", "opt", "max"):
        sizes = {k: getattr(r, level) for k, r in contract.shapes.items()}
        if contract.tiling is not None:
            for k in ("height", "width"):
                sizes[f"frame_{k}"] = getattr(contract.tiling.frame[k], level)
        levels.append(sizes)
    kind, _, j = graph_kind(graph)
    if kind == "frame":
        m, chunk = contract.tiling.modules[j], contract.shapes["chunk"]  # type: ignore[union-attr]
        frames = (min(m.frames_first, m.frames_per_chunk * chunk.min), m.frames_per_chunk * chunk.opt)
        frames += (max(m.frames_first, m.frames_per_chunk * chunk.max),)
        for sizes, t in zip(levels, frames, strict=True):
            sizes["frames"] = t
    return levels


def _profile_shapes(contract: Contract, graph: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shapes of every input of ``graph`` from the manifest's shape ranges."""
    levels = [contract.io(graph, sizes)["inputs"] for sizes in profile_sizes(contract, graph)]
    return {ts[0]["name"]: tuple(tuple(t["shape"]) for t in ts) for ts in zip(*levels, strict=True)}


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def network_creation_flags(trt: Any, prefer_aot: bool = True) -> int:
    """Flags for ``builder.create_network``: STRONGLY_TYPED, and on TensorRT >= 10.9 the preference
    for the AOT (or JIT) implementation of Python plugins.

    From TensorRT 10.9 our plugins have both implementations (``tensorrt_plugin``), and the ONNX
    parser creates such a plugin only in a network that states a preference; polygraphy's
    ``network_from_onnx_path`` (0.53.6) sets none, so ``parse_network`` creates the network.
    TensorRT 11 keeps STRONGLY_TYPED as an ignored flag (networks are always strongly typed).
    """
    kinds = trt.NetworkDefinitionCreationFlag
    flags = 0
    strongly_typed = getattr(kinds, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    preference = getattr(kinds, "PREFER_AOT_PYTHON_PLUGINS" if prefer_aot else "PREFER_JIT_PYTHON_PLUGINS", None)
    if preference is not None and _version(trt.__version__) >= AOT_PLUGINS_SINCE:
        flags |= 1 << int(preference)
    return flags


def parse_network(trt: Any, path: Path, logger: Any, graph: bytes | None = None) -> tuple[Any, Any, Any]:
    """(builder, network, parser) for the ONNX graph ``path`` (or its serialized copy ``graph``),
    the network made with ``network_creation_flags``; a graph TensorRT cannot parse is refused in
    one line."""
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(network_creation_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # with the path: external data is found beside it
    parsed = parser.parse_from_file(str(path)) if graph is None else parser.parse(graph, str(path))
    if not parsed:
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors and errors[0] else "no error reported"
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        raise InputError(f"TensorRT cannot parse {path}: {first}{more}")
    return builder, network, parser


def with_activation_resize(trt: Any, create_config: Callable[..., Any]) -> Callable[..., Any]:
    """``create_config`` (a polygraphy ``CreateConfig``) plus TensorRT's RUNTIME_ACTIVATION_RESIZE_10_10
    preview feature where it exists (>= 10.10), set on top of the default preview features.

    With it, ``update_device_memory_size_for_shapes`` sizes a context's activation memory for the
    shapes it runs (``DeviceMemory``), not for the profile's maximum: "reduce runtime memory
    requirement when the actual input tensor shapes are smaller than the maximum" (its doc).
    """
    feature = getattr(getattr(trt, "PreviewFeature", None), "RUNTIME_ACTIVATION_RESIZE_10_10", None)

    def create(builder: Any, network: Any) -> Any:
        config = create_config(builder, network)
        if feature is not None:
            config.set_preview_feature(feature, True)
        return config

    return create


def check_plugin_layout(path: Path) -> None:
    """Refuse a graph whose plugin nodes carry Conv-layout weights (exported before weights were
    packed): today's plugins read packed ones, and would build a wrong engine without a word."""
    import onnx

    from ..export.plugin_nodes import DOMAIN_VERSION, plugin_domain_version

    version = plugin_domain_version(onnx.load(str(path), load_external_data=False))
    if version is not None and version != DOMAIN_VERSION:
        raise InputError(
            f"{path} has plugin nodes of layout version {version} (this flashvaed builds version "
            f"{DOMAIN_VERSION}): export the model again"
        )


def with_padding_modes(path: Path) -> bytes | None:
    """The graph ``path`` serialized with ``padding_mode = "zeros"`` on every plugin node that lacks
    it (exported before the attribute existed: zero padding), or None when none lacks it. Today's
    plugins take the attribute; external data stays where it is (parse with the path)."""
    import onnx

    from ..export.plugin_nodes import DOMAIN

    model = onnx.load(str(path), load_external_data=False)
    missing = [
        n for n in model.graph.node if n.domain == DOMAIN and not any(a.name == "padding_mode" for a in n.attribute)
    ]
    if not missing:
        return None
    for node in missing:
        node.attribute.append(onnx.helper.make_attribute("padding_mode", "zeros"))
    return model.SerializeToString()


def build(
    export_dir: Path,
    contract: Contract,
    out_dir: Path,
    timing_cache: Path | None,
    workspace_gib: float,
    bar: Bar | None = None,
) -> dict:
    """Parse every graph (plugins registered), build strongly typed plans, write them into ``out_dir``
    (``bar``: told of each graph as it starts and ends)."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network

    if contract.plugins != "none":
        from .kernel import require_triton
        from .tensorrt_plugin import register_plugins

        require_triton()  # the AOT plugins compile the kernel while the engine is built
        register_plugins()
        for name in contract.files.values():
            check_plugin_layout(export_dir / name)
    logger = trt.Logger(trt.Logger.WARNING)
    files = {}
    for i, (graph, name) in enumerate(contract.files.items()):
        if bar is not None:
            bar.update(1 if i else 0, info=graph)  # the graph being built
        profile = Profile()
        for input_name, (lo, opt, hi) in _profile_shapes(contract, graph).items():
            profile.add(input_name, min=lo, opt=opt, max=hi)
        serialized = with_padding_modes(export_dir / name) if contract.plugins != "none" else None
        network = parse_network(trt, export_dir / name, logger, serialized)
        config = CreateConfig(
            profiles=[profile],
            load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * (1 << 30))},
        )
        config = with_activation_resize(trt, config)
        plan = engine_bytes_from_network(
            network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None
        )
        files[graph] = f"{graph}.plan"
        (out_dir / files[graph]).write_bytes(plan)
    if bar is not None:
        bar.update(info="")
    return {"name": "tensorrt", "tensorrt_version": trt.__version__, "plan_files": files}


class DeviceMemory:
    """One device allocation shared by a stream's execution contexts, sized for the shapes they run.

    The contexts are created USER_MANAGED (TensorRT >= 10.0) instead of each holding the memory
    of its engine's largest profile: they run one at a time, in order on one CUDA stream, so one
    buffer serves them all. ``bind`` asks the context what the shapes just set need (TensorRT >=
    10.1: ``update_device_memory_size_for_shapes``; less than the profile's maximum for engines
    built with ``with_activation_resize``) and grows the buffer when that is more.
    """

    def __init__(self, allocate: Callable[[int], Tensor]) -> None:
        self.allocate = allocate
        self.buffer: Tensor | None = None

    def bind(self, context: Any) -> int:
        """Give ``context`` the buffer (after its input shapes are set); returns the bytes it needs."""
        size = int(context.update_device_memory_size_for_shapes())
        if self.buffer is None or size > self.buffer.numel():
            # earlier steps are done with the old buffer in stream order (``enqueue``); torch's
            # blocks are 512-byte aligned, TensorRT asks for 256
            self.buffer = self.allocate(max(size, 1))
        context.set_device_memory(self.buffer.data_ptr(), size)
        return size


def enqueue(context: Any, stream: Any, caller: Any) -> bool:
    """Run ``context`` on ``stream`` after everything already queued on ``caller`` (torch's current
    stream: the latents' copy, the clock, a loaded state), and hold ``caller``'s later work (reading
    frames and state, freeing inputs) until it is done."""
    stream.wait_stream(caller)
    ok = context.execute_async_v3(stream.cuda_stream)
    caller.wait_stream(stream)
    return bool(ok)


class TensorRTStream(Stream):
    source: TensorRTDecoder
    prefix = ""  # of the step graphs' names: "tile." for a tile of a tiled run (``TensorRTTileStream``)

    def __init__(self, source: TensorRTDecoder, options: dict[str, Any] | None = None) -> None:
        super().__init__(source)
        self.options = dict(options or {})

    def _runtime(self) -> tuple[dict[str, Any], DeviceMemory, Any]:
        """Execution contexts of the step graphs, the activation memory they share, a CUDA stream."""
        d = self.source
        user_managed = d.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        contexts = {g: d.engines[g].create_execution_context(user_managed) for g in d.contract.graphs}
        memory = DeviceMemory(lambda size: torch.empty(size, dtype=torch.uint8, device="cuda"))
        return contexts, memory, torch.cuda.Stream()  # not the legacy default stream, which TensorRT syncs

    def _start(self, batch: int, height: int, width: int) -> None:
        d = self.source
        dtype = getattr(torch, d.contract.state_dtype)
        shapes = d.state_shapes(batch, height, width)
        self.buffers = [[torch.zeros(s, dtype=dtype, device="cuda") for s in shapes] for _ in range(2)]
        self.current = 0
        self.contexts, self.memory, self.cuda_stream = self._runtime()
        # per-stream inputs (a timestep, noise maps), and the clock's scalars, live on the device
        inputs = d.stream_inputs(batch, height, width, self.options)
        self.inputs = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}
        self.clock = {k: torch.zeros((), dtype=torch.int64, device="cuda") for k in ("position", "end")}

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        d = self.source
        graph = d.step_graph(first, self.end)
        context = self.contexts[self.prefix + graph]
        b, _, k, h, w = latents.shape
        s = d.spatial_factor
        x = latents.to("cuda", torch.float32).contiguous()
        n = d.step_frames(first, k)
        frames = torch.empty((b, 3, n, h * s, w * s), device="cuda")
        inputs = {"latents": x, **self.inputs}
        if clocked(d) and not first:
            self.clock["position"].fill_(self.position)
            inputs["position"] = self.clock["position"]
            if graph == "last":
                self.clock["end"].fill_(self.end)
                inputs["end"] = self.clock["end"]
        src, dst = self.buffers[self.current], self.buffers[1 - self.current]
        if not first:
            inputs.update({t.input: src[i] for i, t in enumerate(d.contract.state)})
        outputs = {"frames": frames, **{t.output: dst[i] for i, t in enumerate(d.contract.state)}}
        inputs.update(self._more_inputs())
        for name, value in inputs.items():
            context.set_input_shape(name, tuple(value.shape))
        self.memory.bind(context)  # after every input shape: it sizes the memory for them
        for name, value in {**inputs, **outputs}.items():
            context.set_tensor_address(name, value.data_ptr())
        if not enqueue(context, self.cuda_stream, torch.cuda.current_stream()):
            raise InputError(f"TensorRT failed to run the {graph} graph")
        self.current = 1 - self.current
        return frames.cpu()  # on torch's stream, which waits for TensorRT's

    def _more_inputs(self) -> dict[str, Tensor]:
        """A step's further inputs (a tile's contexts)."""
        return {}

    def _state(self) -> tuple[list[str], list[Tensor]]:
        return [t.name for t in self.source.contract.state], [b.cpu() for b in self.buffers[self.current]]

    def _set_state(self, tensors: list[Tensor]) -> None:
        for buf, t in zip(self.buffers[self.current], tensors, strict=True):
            buf.copy_(t)


class TensorRTTileStream(TensorRTStream):
    """One tile of a tiled run of an export made for tiling (``flashvaed.engines.tiled_engine``):
    steps run the ``tile.*`` plans with the frame's ``frame_contexts`` (name -> CUDA tensor), and
    ``capture`` runs a ``capture.J.*`` plan on the tile's state without advancing it. Tiles run one
    at a time, so every tile of a decoder shares one set of execution contexts, one activation
    buffer and one CUDA stream (``TensorRTDecoder.tile_runtime``, used under its lock)."""

    prefix = "tile."

    def __init__(self, source: TensorRTDecoder, options: dict[str, Any] | None = None) -> None:
        super().__init__(source, options)
        self.frame_contexts: dict[str, Tensor] = {}

    def _runtime(self) -> tuple[dict[str, Any], DeviceMemory, Any]:
        return self.source.tile_runtime()

    def _more_inputs(self) -> dict[str, Tensor]:
        return {k: v.to("cuda").contiguous() for k, v in self.frame_contexts.items()}

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        with self.source.tile_lock:
            return super()._step(latents, first)

    def capture(self, index: int, latents: Tensor, first: bool, contexts: dict[str, Tensor]) -> Tensor:
        """Frame-wide module ``index``'s input over this tile's region, in this step (on the GPU)."""
        d = self.source
        graph = f"capture.{index}.{d.step_graph(first, self.end)}"
        given: dict[str, Tensor] = {"latents": latents.to("cuda", torch.float32).contiguous(), **self.inputs}
        given.update({k: v.to("cuda").contiguous() for k, v in contexts.items()})
        if not first:
            given.update({t.input: self.buffers[self.current][i] for i, t in enumerate(d.contract.state)})
        if clocked(d) and not first:
            self.clock["position"].fill_(self.position)
            self.clock["end"].fill_(self.end if self.end is not None else 0)
            given.update(self.clock)
        with d.tile_lock:
            context = self.contexts[graph]
            inputs = {name: given[name] for name in d.inputs_of[graph]}
            for name, value in inputs.items():
                context.set_input_shape(name, tuple(value.shape))
            self.memory.bind(context)
            dtype = getattr(torch, d.contract.state_dtype)
            partial = torch.empty(tuple(context.get_tensor_shape("partial")), dtype=dtype, device="cuda")
            for name, value in {**inputs, "partial": partial}.items():
                context.set_tensor_address(name, value.data_ptr())
            if not enqueue(context, self.cuda_stream, torch.cuda.current_stream()):
                raise InputError(f"TensorRT failed to run the {graph} graph")
        return partial


def engine_io(trt: Any, engine: Any) -> tuple[dict[str, list], dict[str, list]]:
    """A deserialised engine's inputs and outputs, name -> shape (dynamic sizes as "?"), for
    ``Contract.io_problem`` (TensorRT 10's named-tensor API)."""
    found: tuple[dict[str, list], dict[str, list]] = ({}, {})
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = [d if d >= 0 else "?" for d in engine.get_tensor_shape(name)]
        found[0 if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else 1][name] = shape
    return found


class TensorRTDecoder(ContractDecoder):
    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, contract: Contract) -> None:
        trt = require_tensorrt()
        if contract.plugins != "none":
            from .tensorrt_plugin import register_plugins

            register_plugins()  # AOT plugins run without it; JIT ones need their Python code (and triton)
        super().__init__(contract)
        self.trt = trt
        self.path = Path(path)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        plans = {g: member_file(self.path, f, InputError, f"its {g} plan") for g, f in contract.files.items()}
        self.engines = {g: runtime.deserialize_cuda_engine(p.read_bytes()) for g, p in plans.items()}
        if set(self.engines) != set(contract.all_graphs) or not all(self.engines.values()):
            raise InputError(
                f"{path} does not hold loadable TensorRT plans for its graphs ({', '.join(contract.all_graphs)})"[:300]
            )
        for g, engine in self.engines.items():
            problem = contract.io_problem(g, *engine_io(trt, engine))
            if problem:
                raise InputError(f"{self.path}: {problem}; its manifest does not describe its plans")
        self.inputs_of = {g: list(engine_io(trt, e)[0]) for g, e in self.engines.items()}
        self.tile_lock = threading.Lock()
        self._tile_runtime: tuple[dict[str, Any], DeviceMemory, Any] | None = None

    def stream(self, **options: Any) -> TensorRTStream:
        self.check_options(options)
        return TensorRTStream(self, options)

    def tile_stream(self, **options: Any) -> TensorRTTileStream:
        """A stream of one tile of a tiled run (exports made for tiling: ``contract.tiling``)."""
        self.check_options(options)
        return TensorRTTileStream(self, options)

    def tile_runtime(self) -> tuple[dict[str, Any], DeviceMemory, Any]:
        """The execution contexts of every tiled-run plan, their activation memory and CUDA stream,
        shared by the tiles (made once)."""
        if self._tile_runtime is None:
            user_managed = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
            contexts = {g: self.engines[g].create_execution_context(user_managed) for g in self.contract.tiling_graphs}
            memory = DeviceMemory(lambda size: torch.empty(size, dtype=torch.uint8, device="cuda"))
            self._tile_runtime = (contexts, memory, torch.cuda.Stream())
        return self._tile_runtime

    def run_frame(self, index: int, frame: Tensor) -> Tensor:
        """Plan ``frame.{index}``: a "place" frame-wide module on the whole frame's input (on the GPU)."""
        contexts, memory, cuda_stream = self.tile_runtime()
        context = contexts[f"frame.{index}"]
        x = frame.to("cuda", getattr(torch, self.contract.state_dtype)).contiguous()
        out = torch.empty_like(x)
        with self.tile_lock:
            context.set_input_shape("input", tuple(x.shape))
            memory.bind(context)
            context.set_tensor_address("input", x.data_ptr())
            context.set_tensor_address("output", out.data_ptr())
            if not enqueue(context, cuda_stream, torch.cuda.current_stream()):
                raise InputError(f"TensorRT failed to run the frame.{index} graph")
        return out
