"""Export a streaming decoder (teacher or student) to ONNX graphs and their contract.

``first`` maps latent frame 0 to its frame and the initial state; ``steady`` maps k latent
frames and a state to 4k frames and the next state. A decoder with latency (LTX-Video) runs on a
clock: ``steady`` also takes the stream ``position``, and a third graph ``last`` the clip's
``end`` (see ``flashvaed.models.streaming``); per-stream inputs (a timestep, noise maps) enter
every graph. Latents enter in diffusion space (the
de-normalisation is inside the graph) as float32, frames leave as float32 in [-1, 1]; the state
is kept in the export precision. Graphs are traced by torch's TorchScript exporter, with the
streaming causal convs ``plugins`` names (all, depthwise ones, none) written as one plugin node
each, carrying a standard-op function body.

With ``tiling`` (``ExportOptions.tiling``), a decoder with frame-wide modules (Wan's middle
attention, per-frame group norms) also gets the graphs of an exact tiled run (the contract's
``TILING_RULE``): ``tile.*`` (the step graphs with each such module's context as inputs),
``capture.J.*`` (a tile's step up to module J, returning J's input) and ``frame.J`` (a "place"
module on the whole frame), so that an engine built for a tile size decodes any larger frame.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from ..atomic import atomic_output
from ..errors import InputError
from ..models.memory import decode_step_bytes
from ..models.streaming import StateSpec, clocked, model_fingerprint
from ..models.tiling import TilingError, plan_tiling
from ..models.vae import LatentDecoder
from ..progress import progress_bar
from ..safeload import check_work
from .contract import (
    LIMITS,
    METADATA_KEY,
    OURS,
    PLUGIN_MODES,
    PRECISIONS,
    Contract,
    FrameWideModule,
    ShapeRange,
    StateTensor,
    Tiling,
    graph_kind,
    is_ours,
    plugin_mode,
    shape_in_limits,
)
from .op_coverage import unsupported_by_tensorrt
from .plugin_nodes import attach_function_bodies, plugin_nodes, plugin_plan

MIN_OPSET = 18  # the lowest opset the traced graphs and the plugin function bodies are written for
# The lowest opset whose operators take each precision: ONNX adds bfloat16 to Conv in opset 22.
PRECISION_OPSETS = {"fp32": MIN_OPSET, "fp16": MIN_OPSET, "bf16": 22}


@dataclass
class ExportOptions:
    """Shapes as ``N`` (static), ``MIN:MAX`` or ``MIN:OPT:MAX``; height/width in pixels."""

    chunk: str = "1:2:8"
    height: str = "64:256:1280"
    width: str = "64:256:1280"
    batch: str = "1:1:4"
    precision: str = "fp32"
    plugins: str = "all"  # PLUGIN_MODES ("flashvaed" = "all"); the default until GPU runs have measured "depthwise"
    opset: int | None = None  # None: the lowest that supports the precision (PRECISION_OPSETS)
    # also write the graphs that decode frames larger than height x width as exact tiles, where the
    # decoder has frame-wide modules (decoders without one tile with the step graphs alone)
    tiling: bool = False
    tiling_frame: str = "1088x1920"  # HxW pixels: the largest whole frame a tiled run takes (frame.J graphs)
    # decoders with latency: each layer of a step computes only the positions holding frames of the
    # clip (warm-up and flush cost what they compute; sizes inside the graphs depend on the clock);
    # False: every layer computes its whole step (static shapes inside, as exports before had)
    windows: bool = True


@dataclass
class ExportResult:
    out_dir: Path
    contract: Contract
    tensorrt_unsupported: list[str] = field(default_factory=list)


def tiling_facts(model: LatentDecoder) -> dict:
    """What tiling an export needs to know: its decoder's halo (latent pixels: rows, columns) and
    its frame-wide modules (an engine of a decoder with one tiles only if exported with ``tiling``)."""
    plan = plan_tiling(model)
    return {"halo": list(plan.halo), "frame_wide": [name for name, _ in plan.mixing]}


def frame_wide_modules(model: LatentDecoder) -> list[tuple[nn.Module, FrameWideModule]]:
    """The decoder's frame-wide modules in run order, with what a tiled run of its export needs to
    know of each, measured on the graphs' own steps (first, then steady chunks of 1 and 2 latent
    frames): channels, grid scale and frames at the module, and for "sum" modules (per-frame group
    norms: torch's ``nn.GroupNorm`` semantics) groups and eps."""
    plan = plan_tiling(model)
    if not plan.mixing:
        return []
    names = [name for name, _ in plan.mixing]
    seen: dict[str, list[tuple[int, ...]]] = {name: [] for name in names}

    def record(name: str) -> Any:
        return lambda module, args: seen[name].append(tuple(args[0].shape))

    ph, pw = 4, 6
    p = next(model.parameters())
    latents = torch.randn(1, model.latent_channels, 4, ph, pw, generator=torch.Generator().manual_seed(0)).to(p.dtype)
    extra: tuple[Tensor, ...] = ()
    if "timestep" in model.step_inputs:
        extra += (torch.full((1,), 0.05),)
    extra += tuple(torch.randn(int(ph * s), int(pw * s)) for s in model.noise_scales)
    handles = [module.register_forward_pre_hook(record(name)) for name, module in plan.mixing]
    frames: list[dict[str, tuple[int, ...]]] = []
    try:
        state = FirstGraph(model, p.dtype)(latents[:, :, :1], *extra)[1:]
        frames.append({n: v[-1] for n, v in seen.items() if len(v) == 1})
        for k, at in ((1, 1), (2, 2)):
            clock = (torch.tensor(at),) if clocked(model) else ()
            before = {n: len(v) for n, v in seen.items()}
            state = SteadyGraph(model, p.dtype)(latents[:, :, at : at + k], *state, *clock, *extra)[1:]
            frames.append({n: v[-1] for n, v in seen.items() if len(v) == before[n] + 1})
    finally:
        for handle in handles:
            handle.remove()
    facts = []
    for name, module in plan.mixing:
        shapes = [f.get(name) for f in frames]
        if any(s is None or len(s) != 5 for s in shapes):
            raise TilingError(
                f"{name} does not run once per step on a (B, C, T, H, W) input: it cannot be exported for tiling"
            )
        (_, c, t0, h, w), (_, _, t1, _, _), (_, _, t2, _, _) = shapes  # type: ignore[misc]
        scale = Fraction(h, ph)
        if Fraction(w, pw) != scale or t2 - t1 < 1 or t1 != t2 - t1:
            raise TilingError(
                f"{name} sees frames or a grid not proportional to the latents': it cannot be exported for tiling"
            )
        kind = module.frame_context
        groups, eps = 0, 0.0
        if kind == "sum":
            if not isinstance(module, nn.GroupNorm):
                raise TilingError(
                    f"{name} ({type(module).__name__}) sums frame statistics but is no group norm: "
                    "engines tile group norms only"
                )
            groups, eps = module.num_groups, float(module.eps)
        facts.append((module, FrameWideModule(name, kind, c, scale, t0, t1, groups, eps)))
    return facts


def model_facts(model: LatentDecoder, source: str | None) -> dict:
    config = getattr(model, "config", None)
    return {
        "family": model.family,
        "kind": model.kind,
        "source": source,
        "fingerprint": model_fingerprint(model),
        "latent_channels": model.latent_channels,
        "temporal_factor": model.temporal_factor,
        "spatial_factor": model.spatial_factor,
        "latency": model.latency,
        "output_offset": model.output_offset,
        "step_inputs": list(model.step_inputs),
        "noise_scales": [str(s) for s in model.noise_scales],
        "default_timestep": model.default_timestep,
        "default_noise_scale": model.default_noise_scale,
        "latents_mean": [float(v) for v in model.latents_mean.flatten()],
        "latents_std": [float(v) for v in model.latents_std.flatten()],
        "scaling_factor": model.scaling_factor,
        "config": config.to_dict() if config is not None else None,
        "tiling": tiling_facts(model),
    }


def _scaled(size: Tensor | int, scale) -> Tensor | int:  # traced sizes stay symbolic
    return size * scale.numerator // scale.denominator


def _conditioning(model: LatentDecoder, dtype: torch.dtype, extra: tuple[Tensor, ...]) -> dict:
    """The step inputs of a conditioned decoder from a graph's trailing inputs (timestep, noise/i)."""
    inputs: dict = {}
    if "timestep" in model.step_inputs:
        inputs["timestep"], extra = extra[0], extra[1:]
    if model.noise_scales:
        inputs["noise"] = tuple(n.to(dtype) for n in extra)
    return inputs


def _float(frames: Tensor) -> Tensor:
    """Frames as float32: a Cast only where they are not (a traced ``.float()`` copies them)."""
    return frames if frames.dtype == torch.float32 else frames.float()


class FirstGraph(nn.Module):
    """latents (B, z, 1, h, w) [, conditioning] -> frames (B, 3, 1 or t, s*h, s*w), initial state."""

    def __init__(self, model: LatentDecoder, dtype: torch.dtype, windows: bool = True) -> None:
        super().__init__()
        self.model, self.dtype, self.windows = model, dtype, windows
        self.specs: list[StateSpec] = model.decoder_state_specs()

    def forward(self, latents: Tensor, *extra: Tensor) -> tuple[Tensor, ...]:
        x = latents.to(self.dtype)
        b, h, w = x.shape[0], x.shape[3], x.shape[4]
        zeros = tuple(
            x.new_zeros((b, s.channels, s.frames, _scaled(h, s.scale), _scaled(w, s.scale))) for s in self.specs
        )
        # the first step's windows are known (position 0, any end: the stream applies the end later): an int
        # clock computes them here, and idle layers leave no ops in the graph; without windows, a tensor clock
        clock: dict[str, Any] = {}
        if clocked(self.model):
            clock = {"position": 0, "end": None} if self.windows else {"position": torch.zeros((), dtype=torch.int64)}
            clock.update({} if self.windows else {"end": None, "windows": False})
        inputs = _conditioning(self.model, self.dtype, extra)
        frames, state = self.model.decode_step(x, zeros, first=True, **clock, **inputs)
        return (_float(frames), *state)


class SteadyGraph(nn.Module):
    """latents (B, z, k, h, w), state [, position [, end]] [, conditioning] -> frames (B, 3, t*k, s*h, s*w),
    next state. ``last`` is this graph with the clip's end as an input."""

    def __init__(self, model: LatentDecoder, dtype: torch.dtype, last: bool = False, windows: bool = True) -> None:
        super().__init__()
        self.model, self.dtype, self.last, self.windows = model, dtype, last, windows
        self.states = len(model.decoder_state_specs())

    def forward(self, latents: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        state, rest = rest[: self.states], rest[self.states :]
        clock = {}
        if clocked(self.model):
            clock = {"position": rest[0], "end": rest[1] if self.last else None}
            if not self.windows:
                clock["windows"] = False
            rest = rest[2 if self.last else 1 :]
        inputs = _conditioning(self.model, self.dtype, rest)
        frames, state = self.model.decode_step(latents.to(self.dtype), state, **clock, **inputs)
        return (_float(frames), *state)


class FlushGraph(nn.Module):
    """latents (B, z, k, h, w), state, position, end [, conditioning] -> every frame of the clip the
    stream still holds back (B, 3, F, s*h, s*w): the chunk holding the clip's last latent frame and the
    decoder's latency in one step (``latency`` more latent frames, never read), whose layers compute only
    their windows (exports with windows). Every window holds frames of the clip then (none is empty: its
    convs need no ``If``, and ONNX Runtime fuses them as in a one-shot graph). No next state."""

    def __init__(self, model: LatentDecoder, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype
        self.states = len(model.decoder_state_specs())

    def forward(self, latents: Tensor, *rest: Tensor) -> Tensor:
        state, rest = rest[: self.states], rest[self.states :]
        clock = {"position": rest[0], "end": rest[1], "clip_only": True}
        inputs = _conditioning(self.model, self.dtype, rest[2:])
        b, z, _, h, w = latents.shape
        x = torch.cat([latents, latents.new_zeros(b, z, self.model.latency, h, w)], dim=2)
        frames, _ = self.model.decode_step(x.to(self.dtype), state, **clock, **inputs)
        return _float(frames)


def allow_empty(path: Path, convs: bool) -> None:
    """Let the windowed graph at ``path`` take empty windows: its reshapes of computed sizes read a 0 as an
    empty window's size (``allowzero``), not as "copy the input's"; with ``convs``, every Conv runs only
    when its output is not empty (an ONNX ``If``, whose else branch gives the empty output), since ONNX
    Runtime's Conv refuses an empty output: idle layers compute nothing instead of a placeholder position."""
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for n, node in enumerate(graph.node if convs else ()):
        weight = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is None:  # only convs whose kernel is known here
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = list(weight.dims[2:])
        rank = len(kernel)
        pads = list(attrs.get("pads", [0] * 2 * rank))
        strides = list(attrs.get("strides", [1] * rank))
        dilations = list(attrs.get("dilations", [1] * rank))
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            nodes.append(node)
            continue
        p = f"/skip_empty/{n}"
        spans = enumerate(zip(dilations, kernel, strict=True))
        reach = [d * (k - 1) + 1 - pads[i] - pads[i + rank] for i, (d, k) in spans]  # input frames a position reads
        const = {
            f"{p}/least": ([1, 0, *reach], [2 + rank]),  # from the input sizes: all >= 0 iff the output is not empty
            f"{p}/reach": (reach, [rank]),
            f"{p}/strides": (strides, [rank]),
            f"{p}/channels": ([weight.dims[0]], [1]),
            f"{p}/starts": ([2], [1]),
            f"{p}/ends": ([2 + rank], [1]),
            f"{p}/zero": ([0], [1]),
            f"{p}/one": ([1], [1]),
            f"{p}/minus_one": ([-1], []),
        }
        for name, (values, dims) in const.items():
            graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, dims, values))
        x, out = node.input[0], node.output[0]
        pre = [  # a batch of 0, or a span of input sizes shorter than the kernel reaches: an empty output
            helper.make_node("Shape", [x], [f"{p}/shape"]),
            helper.make_node("Sub", [f"{p}/shape", f"{p}/least"], [f"{p}/spare"]),
            helper.make_node("ReduceMin", [f"{p}/spare"], [f"{p}/fewest"], keepdims=0),
            helper.make_node("Less", [f"{p}/minus_one", f"{p}/fewest"], [f"{p}/nonempty"]),
        ]
        then_out = helper.make_tensor_value_info(f"{p}/then", weight.data_type, None)
        else_out = helper.make_tensor_value_info(f"{p}/else", weight.data_type, None)
        conv = helper.make_node("Conv", list(node.input), [f"{p}/then"], name=node.name, **attrs)
        zero = helper.make_tensor(f"{p}/zero_value", weight.data_type, [1], [0])  # of the output's type
        if strides == [1] * rank and reach[1:] == [1] * (rank - 1):  # "same" in space (LTX's convs): fewer nodes
            graph.initializer.extend(
                [  # (batch, channels, frames, ...) -> (batch, out channels, max(frames - reach + 1, 0), ...)
                    helper.make_tensor(f"{p}/keep", TensorProto.INT64, [2 + rank], [1, 0] + [1] * rank),
                    helper.make_tensor(
                        f"{p}/add", TensorProto.INT64, [2 + rank], [0, weight.dims[0], 1 - reach[0]] + [0] * (rank - 1)
                    ),
                ]
            )
            empty = [
                helper.make_node("Mul", [f"{p}/shape", f"{p}/keep"], [f"{p}/kept"]),
                helper.make_node("Add", [f"{p}/kept", f"{p}/add"], [f"{p}/sizes"]),
                helper.make_node("Max", [f"{p}/sizes", f"{p}/zero"], [f"{p}/out_shape"]),
                helper.make_node("ConstantOfShape", [f"{p}/out_shape"], [f"{p}/else"], value=zero),
            ]
        else:
            empty = [  # sizes (D + pads - dilation*(k-1) - 1) // stride + 1, at least 0
                helper.make_node("Slice", [f"{p}/shape", f"{p}/zero", f"{p}/one"], [f"{p}/batch"]),
                helper.make_node("Slice", [f"{p}/shape", f"{p}/starts", f"{p}/ends"], [f"{p}/dims"]),
                helper.make_node("Sub", [f"{p}/dims", f"{p}/reach"], [f"{p}/span"]),
                helper.make_node("Div", [f"{p}/span", f"{p}/strides"], [f"{p}/steps"]),
                helper.make_node("Add", [f"{p}/steps", f"{p}/one"], [f"{p}/sizes"]),
                helper.make_node("Max", [f"{p}/sizes", f"{p}/zero"], [f"{p}/clamped"]),
                helper.make_node("Concat", [f"{p}/batch", f"{p}/channels", f"{p}/clamped"], [f"{p}/out_shape"], axis=0),
                helper.make_node("ConstantOfShape", [f"{p}/out_shape"], [f"{p}/else"], value=zero),
            ]
        branch = helper.make_node(
            "If",
            [f"{p}/nonempty"],
            [out],
            name=f"{node.name}/if_not_empty",
            then_branch=helper.make_graph([conv], f"{p}/conv", [], [then_out]),
            else_branch=helper.make_graph(empty, f"{p}/empty", [], [else_out]),
        )
        nodes += [*pre, branch]
    if convs:
        del graph.node[:]
        graph.node.extend(nodes)
    for node in graph.node:  # reshapes of computed sizes: 0 is an empty window's size, not "copy"
        if node.op_type == "Reshape" and node.input[1] not in inits:
            for a in node.attribute:
                if a.name == "allowzero":
                    a.i = 1
            if not any(a.name == "allowzero" for a in node.attribute):
                node.attribute.append(helper.make_attribute("allowzero", 1))
    onnx.save(model, str(path))


class _Stop(Exception):  # not an error: a capture graph ends at its module
    def __init__(self, x: Tensor) -> None:
        self.x = x


def _with_groups(module: nn.GroupNorm, mean: Tensor, rstd: Tensor) -> Any:
    """The group norm's forward with the whole frame's statistics (B, T, groups), in float32."""

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        b, c, t, h, w = x.shape
        g = module.num_groups
        xs = x.float().reshape(b, g, -1, t, h, w)
        m = mean.transpose(1, 2)[:, :, None, :, None, None]
        r = rstd.transpose(1, 2)[:, :, None, :, None, None]
        y = ((xs - m) * r).reshape(b, c, t, h, w)
        if module.weight is not None:
            y = y * module.weight.float().view(1, c, 1, 1, 1) + module.bias.float().view(1, c, 1, 1, 1)
        return y.to(x.dtype)

    return forward


def _placed(module: nn.Module, context: Tensor) -> Any:
    """The module's forward returning its output over the region from the whole frame's (``context``)."""

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return module.frame_apply(x, context, (0, x.shape[-2], 0, x.shape[-1]))

    return forward


def _stopping(x: Tensor, *args: Any, **kwargs: Any) -> Any:
    raise _Stop(x)


class ContextGraph(nn.Module):
    """A step graph (``FirstGraph``/``SteadyGraph``) whose frame-wide modules take the whole frame's
    contexts as trailing inputs: ``tile.*``; with ``stop`` J, it ends at module J and returns J's
    input (contexts of the modules before J only): ``capture.J.*``."""

    def __init__(self, step: nn.Module, modules: list[tuple[nn.Module, FrameWideModule]], stop: int | None) -> None:
        super().__init__()
        self.step, self.stop = step, stop
        self.frame_wide = list(modules)  # a plain list: the modules belong to the model, not to this wrapper
        self.contexts = sum(
            (1 if f.context == "place" else 2) for j, (_, f) in enumerate(modules) if stop is None or j < stop
        )

    def forward(self, *args: Tensor) -> Any:
        base, contexts = args[: len(args) - self.contexts], list(args[len(args) - self.contexts :])
        patched = []
        try:
            for j, (module, fact) in enumerate(self.frame_wide):
                if j == self.stop:
                    module.forward = _stopping
                elif fact.context == "place":
                    module.forward = _placed(module, contexts.pop(0))
                else:
                    module.forward = _with_groups(module, contexts.pop(0), contexts.pop(0))
                patched.append(module)
                if j == self.stop:
                    break
            try:
                return self.step(*base)
            except _Stop as stop:
                return stop.x
        finally:
            for module in patched:
                del module.forward


class FrameGraph(nn.Module):
    """A "place" frame-wide module on the whole frame's input: its output there (``frame.J``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        # the module's own forward on the frame: ``frame_resolve`` may loop over sizes (attention in
        # blocks of queries), which a trace would freeze at the traced size; the graph stays dynamic
        out = type(self.module).forward(self.module, x)
        return out[0] if isinstance(out, tuple) else out


def max_opset() -> int:
    """The highest opset both torch's TorchScript exporter and the installed onnx can write (torch
    fails above its own maximum, onnx's checker above its)."""
    try:
        from torch.onnx import _constants  # torch states its exporter's range nowhere public

        exporter = int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        exporter = 20  # what the TorchScript exporter has supported since torch 2.1
    return min(onnx.defs.onnx_opset_version(), exporter)


def _opset(options: ExportOptions) -> int:
    """The opset to write: the user's, if this precision and the installed exporter allow it; else
    the lowest that supports the precision."""
    need, top, opset = PRECISION_OPSETS[options.precision], max_opset(), options.opset
    here = f"the most torch {torch.__version__} and onnx {onnx.__version__} here can write"
    if opset is None:
        if need > top:
            raise InputError(f"{{precision}} {options.precision} needs ONNX opset {need}; {top} is {here}", "precision")
        return need
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise InputError(f"{{opset}} must be a whole number, got {opset!r}", "opset")
    if not MIN_OPSET <= opset <= top:
        raise InputError(f"{{opset}} must be within {MIN_OPSET}..{top} ({top} is {here}), got {opset}", "opset")
    if opset < need:
        raise InputError(
            f"{{precision}} {options.precision} needs {{opset}} {need} or higher (ONNX takes {options.precision} "
            f"convolutions from opset {need}): give {{opset}} {need}, or leave {{opset}} out to get it",
            "precision",
            "opset",
        )
    return opset


def _shape(text: str, name: str, what: str = "", multiple: int = 1, unit: str = "") -> ShapeRange:
    """The range ``text`` of the option ``name`` (its errors name it), within what a manifest may
    declare: the limits manifests are read by, in the option's unit (pixels: ``multiple`` per latent)."""
    try:
        r = ShapeRange.parse(text, f"{{{name}}}{what}", multiple=multiple)
    except InputError as e:
        raise InputError(str(e), name) from None
    if not shape_in_limits(r):
        top = LIMITS["shape"] * multiple
        most = f"at most {top}{unit}"
        raise InputError(f"{{{name}}} {r.max * multiple}{unit} is more than an export may declare ({most})", name)
    return r


def _check_options(options: ExportOptions, model: LatentDecoder) -> tuple[dict[str, ShapeRange], int]:
    """The shape ranges and the opset of an export, or the option at fault named, before any work."""
    if options.precision not in PRECISIONS:
        raise InputError(f"unknown {{precision}} {options.precision!r} (use {', '.join(PRECISIONS)})", "precision")
    try:
        plugin_mode(options.plugins)
    except ValueError:
        choices = ", ".join(PLUGIN_MODES)
        raise InputError(f"unknown {{plugins}} {options.plugins!r} (use {choices})", "plugins") from None
    opset = _opset(options)
    f = model.spatial_factor
    shapes = {
        "batch": _shape(options.batch, "batch"),
        "chunk": _shape(options.chunk, "chunk", " (latent frames per steady chunk)"),
        "height": _shape(options.height, "height", " (pixels)", multiple=f, unit=" px"),
        "width": _shape(options.width, "width", " (pixels)", multiple=f, unit=" px"),
    }
    return shapes, opset


def _frame_range(text: str, f: int) -> dict[str, ShapeRange]:
    """``HxW`` pixels (the largest whole frame of a tiled run) as latent ranges 1..H/f and 1..W/f."""
    parts = str(text).lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 1:
        raise InputError(f"{{tiling_frame}} must be HxW pixels, got {text!r}", "tiling_frame")
    ranges = {}
    for name, v in zip(("height", "width"), values, strict=True):
        if v % f:
            raise InputError(f"{{tiling_frame}} {name} must be a multiple of {f}, got {v}", "tiling_frame")
        r = ShapeRange(1, v // f, v // f)
        if not shape_in_limits(r):
            raise InputError(f"{{tiling_frame}} {v} px is more than an export may declare", "tiling_frame")
        ranges[name] = r
    return ranges


def _example_input(spec: dict) -> Tensor:
    """A tracing value of a context input: any values of its shape (1/std: positive)."""
    if spec["dtype"] == "float32":
        return torch.rand(spec["shape"]) + 0.5
    return torch.randn(spec["shape"]).to(getattr(torch, spec["dtype"]))


def _example(r: ShapeRange) -> int:
    """A tracing size: the optimum, but never 1 on a dynamic axis (a traced 1 can broadcast)."""
    return r.opt if r.static or r.opt > 1 else min(2, r.max)


def _dynamic_axes(io: dict[str, list[dict]]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for t in io["inputs"] + io["outputs"]:
        named = {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
        if named:
            axes[t["name"]] = named
    return axes


def _trace(module: nn.Module, args: tuple, path: Path, io: dict[str, list[dict]], opset: int) -> None:
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[t["name"] for t in io["inputs"]],
        output_names=[t["name"] for t in io["outputs"]],
        dynamic_axes=_dynamic_axes(io),
        do_constant_folding=True,
    )


def _finish(path: Path, graph: str, contract: Contract) -> list[str]:
    """Attach function bodies and the contract, check the graph; return ops TensorRT cannot parse."""
    model = onnx.load(str(path))
    attach_function_bodies(model, contract.opset)
    model.doc_string = f"flashvaed {graph} graph of a {contract.model['family']} {contract.model['kind']}"
    for key, value in ((METADATA_KEY, contract.to_json()), ("flashvaed.graph", graph)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return unsupported_by_tensorrt(model)


@torch.no_grad()
def export(
    model: LatentDecoder,
    out_dir: str | os.PathLike,
    options: ExportOptions | None = None,
    source: str | None = None,
    progress: bool = False,
) -> ExportResult:
    """Write ``first.onnx``, ``steady.onnx`` (``last.onnx`` with latency), the graphs of a tiled run
    (``tiling``, decoders with frame-wide modules) and ``manifest.json`` into ``out_dir`` (atomically).
    ``progress``: a bar on stderr, one step per graph (a full-size teacher takes minutes to trace)."""
    options = options or ExportOptions()
    shapes, opset = _check_options(options, model)
    tiling_frame = _frame_range(options.tiling_frame, model.spatial_factor) if options.tiling else {}
    dtype = getattr(torch, PRECISIONS[options.precision])
    p = next(model.parameters())
    if p.dtype != dtype or p.device.type != "cpu":  # convert a copy: the caller's model stays as it was
        model = copy.deepcopy(model).to("cpu", dtype)
    model = model.eval()
    plan = plugin_plan(model, plugin_mode(options.plugins))
    if plan.fallback:  # the manifest says so too (plugin_convs)
        warnings.warn(f"plugin nodes: {'; '.join(plan.fallback)}", stacklevel=2)
    contract = Contract(
        model=model_facts(model, source),
        precision=options.precision,
        plugins=plan.kinds,
        plugin_convs=plan.to_dict(),
        opset=opset,
        shapes=shapes,
        state=[StateTensor.from_spec(s) for s in model.decoder_state_specs()],
        files={"first": "first.onnx", "steady": "steady.onnx", **({"last": "last.onnx"} if model.latency else {})},
        windows=options.windows if clocked(model) else None,
    )
    if model.latency and options.windows:  # the flush in one step costs what it computes
        contract.files["flush"] = "flush.onnx"
    frame_wide: list[tuple[nn.Module, FrameWideModule]] = []
    if options.tiling:
        try:
            frame_wide = frame_wide_modules(model)
        except TilingError as e:
            raise InputError(f"{{tiling}}: {e}", "tiling") from None
    if frame_wide:
        contract.tiling = Tiling([f for _, f in frame_wide], tiling_frame, {})
        contract.files.update({g: f"{g}.onnx" for g in contract.tiling_graphs})
    Contract.from_dict(json.loads(contract.to_json()), "the manifest of this export")  # what we would not read back
    b, h, w = (_example(shapes[k]) for k in ("batch", "height", "width"))
    k = _example(shapes["chunk"])
    check_work(  # the graphs are traced by running the model once at these sizes
        decode_step_bytes(model, b, k, h, w, dtype),
        f"tracing the export at batch {b}, chunk {k}, {h * model.spatial_factor}x{w * model.spatial_factor} pixels",
        "lower the opt values of {chunk}, {height}, {width} or {batch}", "chunk", "height", "width", "batch",
    )  # fmt: skip
    latents = torch.randn(b, model.latent_channels, 1 + k, h, w)
    extra: tuple[Tensor, ...] = ()
    if "timestep" in model.step_inputs:
        extra += (torch.full((b,), 0.05),)
    extra += tuple(torch.randn(int(h * s), int(w * s)) for s in model.noise_scales)
    first = FirstGraph(model, dtype, options.windows)
    state: tuple[Tensor, ...] = ()

    def step_args(step: str) -> tuple[Tensor, ...]:
        nonlocal state
        if step == "first":
            return (latents[:, :, :1], *extra)
        state = state or first(latents[:, :, :1], *extra)[1:]
        clock: tuple[Tensor, ...] = ()
        if clocked(model):  # a stream past its warm-up (with windows, every layer's window then holds frames
            # of the clip: no traced size is 0 or 1); for 'last' and 'flush', a clip ending in the chunk
            at = model.latency + 1 if options.windows else 3
            clock = (torch.tensor(at),) + ((torch.tensor(at + k),) if step in ("last", "flush") else ())
        return (latents[:, :, 1:], *state, *clock, *extra)

    def step_graph(step: str) -> nn.Module:
        if step == "flush":
            return FlushGraph(model, dtype)
        return first if step == "first" else SteadyGraph(model, dtype, last=step == "last", windows=options.windows)

    sizes = {"batch": b, "chunk": k, "height": h, "width": w}
    if contract.tiling is not None:
        fh, fw = (
            r.min if r.static else min(r.max, max(2, n)) for r, n in zip(tiling_frame.values(), (h, w), strict=True)
        )
        sizes.update(frame_height=fh, frame_width=fw)
    out_dir = Path(out_dir)
    unsupported: set[str] = set()
    graphs = contract.all_graphs
    with (
        atomic_output(out_dir, directory=True, replaceable=is_ours, what=OURS) as tmp,
        warnings.catch_warnings(),
        progress_bar("exporting", len(graphs), progress, info=True) as bar,
    ):
        warnings.simplefilter("ignore")  # tracer notes on constants we mean to be constant
        for i, graph in enumerate(graphs):
            bar.update(1 if i else 0, info=graph)  # the graph being traced
            kind, step, j = graph_kind(graph)
            module: nn.Module
            if kind == "frame":
                fact = frame_wide[j][1]
                sizes["frames"] = max(2, fact.frames_per_chunk * k)  # a traced 1 can broadcast
                spec = contract.io(graph, sizes)["inputs"][0]
                module, args = FrameGraph(frame_wide[j][0]), (torch.randn(spec["shape"]).to(dtype),)
            else:
                module, args = step_graph(step), step_args(step)
                if kind != "step":
                    module = ContextGraph(module, frame_wide, j if kind == "capture" else None)
                    args += tuple(_example_input(t) for t in contract.io(graph, sizes)["inputs"][len(args) :])
            with nullcontext() if contract.plugins == "none" else plugin_nodes(model, contract.plugins, plan):
                _trace(module, args, tmp / contract.files[graph], contract.io(graph), opset)
            if contract.windows and kind != "frame":  # steady, last: their idle layers compute nothing
                allow_empty(tmp / contract.files[graph], convs=step in ("steady", "last"))
            if kind == "capture":  # a graph that stops at its module reads no later input: ONNX drops those
                traced = onnx.load(str(tmp / contract.files[graph]), load_external_data=False)
                contract.tiling.capture_inputs[graph] = [i.name for i in traced.graph.input]  # type: ignore[union-attr]
        bar.update(info="")
        for graph in graphs:  # the contract is complete: into every graph's metadata
            unsupported.update(_finish(tmp / contract.files[graph], graph, contract))
        (tmp / "manifest.json").write_text(contract.to_json())
    return ExportResult(out_dir, contract, sorted(unsupported))
