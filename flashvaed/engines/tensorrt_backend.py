"""The TensorRT backend: build plan files from an export, and run them.

Kept thin on purpose: TensorRT cannot be installed on the machines this project is developed
and tested on, so everything here is a direct use of the documented TensorRT 10 / polygraphy
APIs, and everything around it (the ONNX it parses, op coverage, the plugin kernel, the
contract) is tested elsewhere. Tests for this module run only where ``tensorrt`` imports and a
GPU is present.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..export.contract import Contract
from ..models.streaming import clocked
from .base import ContractDecoder, Stream

INSTALL_HINT = "pip install flashvaed[tensorrt]"


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or a one-line error naming the extra to install."""
    try:
        import tensorrt
    except ImportError:
        raise InputError(f"the TensorRT backend needs TensorRT, which is not installed here: {INSTALL_HINT}") from None
    if not torch.cuda.is_available():
        raise InputError("the TensorRT backend needs an NVIDIA GPU, and CUDA is not available here")
    return tensorrt


def _profile_shapes(contract: Contract, graph: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shapes of every input of ``graph`` from the manifest's shape ranges."""
    levels = [
        contract.io(graph, {k: getattr(r, level) for k, r in contract.shapes.items()})["inputs"]
        for level in ("min", "opt", "max")
    ]
    return {ts[0]["name"]: tuple(tuple(t["shape"]) for t in ts) for ts in zip(*levels, strict=True)}


def build(export_dir: Path, contract: Contract, out_dir: Path, timing_cache: Path | None, workspace_gib: float) -> dict:
    """Parse both graphs (plugins registered), build strongly typed plans, write them into ``out_dir``."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    if contract.plugins == "flashvaed":
        from .tensorrt_plugin import register_plugins

        register_plugins()
    files = {}
    for graph, name in contract.files.items():
        profile = Profile()
        for input_name, (lo, opt, hi) in _profile_shapes(contract, graph).items():
            profile.add(input_name, min=lo, opt=opt, max=hi)
        network = network_from_onnx_path(str(export_dir / name), strongly_typed=True)
        config = CreateConfig(
            profiles=[profile],
            load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gib * (1 << 30))},
        )
        plan = engine_bytes_from_network(
            network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None
        )
        files[graph] = f"{graph}.plan"
        (out_dir / files[graph]).write_bytes(plan)
    return {"name": "tensorrt", "tensorrt_version": trt.__version__, "plan_files": files}


class TensorRTStream(Stream):
    source: TensorRTDecoder

    def __init__(self, source: TensorRTDecoder, options: dict[str, Any] | None = None) -> None:
        super().__init__(source)
        self.options = dict(options or {})

    def _start(self, batch: int, height: int, width: int) -> None:
        d = self.source
        dtype = getattr(torch, d.contract.state_dtype)
        shapes = d.state_shapes(batch, height, width)
        self.buffers = [[torch.zeros(s, dtype=dtype, device="cuda") for s in shapes] for _ in range(2)]
        self.current = 0
        self.contexts = {g: e.create_execution_context() for g, e in d.engines.items()}
        self.cuda_stream = torch.cuda.Stream()
        # per-stream inputs (a timestep, noise maps), and the clock's scalars, live on the device
        inputs = d.stream_inputs(batch, height, width, self.options)
        self.inputs = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}
        self.clock = {k: torch.zeros((), dtype=torch.int64, device="cuda") for k in ("position", "end")}

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        d = self.source
        graph = d.step_graph(first, self.end)
        context = self.contexts[graph]
        b, _, k, h, w = latents.shape
        s = d.spatial_factor
        x = latents.to("cuda", torch.float32).contiguous()
        n = d.step_frames(first, k)
        frames = torch.empty((b, 3, n, h * s, w * s), device="cuda")
        context.set_input_shape("latents", tuple(x.shape))
        context.set_tensor_address("latents", x.data_ptr())
        context.set_tensor_address("frames", frames.data_ptr())
        extra = dict(self.inputs)
        if clocked(d) and not first:
            self.clock["position"].fill_(self.position)
            extra["position"] = self.clock["position"]
            if graph == "last":
                self.clock["end"].fill_(self.end)
                extra["end"] = self.clock["end"]
        for name, value in extra.items():
            context.set_input_shape(name, tuple(value.shape))
            context.set_tensor_address(name, value.data_ptr())
        src, dst = self.buffers[self.current], self.buffers[1 - self.current]
        for i, t in enumerate(d.contract.state):
            if not first:
                context.set_input_shape(t.input, tuple(src[i].shape))
                context.set_tensor_address(t.input, src[i].data_ptr())
            context.set_tensor_address(t.output, dst[i].data_ptr())
        if not context.execute_async_v3(self.cuda_stream.cuda_stream):
            raise InputError(f"TensorRT failed to run the {graph} graph")
        self.cuda_stream.synchronize()
        self.current = 1 - self.current
        return frames.cpu()

    def _state(self) -> tuple[list[str], list[Tensor]]:
        return [t.name for t in self.source.contract.state], [b.cpu() for b in self.buffers[self.current]]

    def _set_state(self, tensors: list[Tensor]) -> None:
        for buf, t in zip(self.buffers[self.current], tensors, strict=True):
            buf.copy_(t)


class TensorRTDecoder(ContractDecoder):
    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, contract: Contract) -> None:
        trt = require_tensorrt()
        if contract.plugins == "flashvaed":
            from .tensorrt_plugin import register_plugins

            register_plugins()  # AOT plugins run without it; JIT ones need their Python code
        super().__init__(contract)
        self.path = Path(path)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        plans = (contract.backend or {}).get("plan_files", {})
        self.engines = {g: runtime.deserialize_cuda_engine((self.path / f).read_bytes()) for g, f in plans.items()}
        if set(self.engines) != set(contract.graphs) or not all(self.engines.values()):
            raise InputError(
                f"{path} does not hold loadable TensorRT plans for its graphs ({', '.join(contract.graphs)})"
            )

    def stream(self, **options: Any) -> TensorRTStream:
        self.check_options(options)
        return TensorRTStream(self, options)
