"""The I/O contract of an exported decoder: what a runtime needs to drive its two graphs.

The same JSON is written to ``manifest.json`` beside the graphs and into each graph's metadata
(key ``flashvaed.contract``), so a runtime without flashvaed can decode: run ``first`` on latent
frame 0, then ``steady`` on chunks of k latent frames, feeding every ``next_state/...`` output
back as the ``state/...`` input of the same name. docs/onnx-contract.md describes every field.

An export made for tiling a decoder with frame-wide modules (``tiling``) adds graphs that decode a
frame larger than the step graphs take as tiles, exactly: ``tile.*`` (the step graphs with every
frame-wide module's context as inputs), ``capture.J.*`` (a tile up to module J) and ``frame.J``
(a "place" module on the whole frame); ``TILING_RULE`` says how to run them.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..models import families
from ..models.blocks import HISTORY_MODES
from ..models.families.base import checked_statistics
from ..models.streaming import ShapeRange, StateSpec
from ..safeload import json_format, member_file, read_text

__all__ = [
    "CONTEXTS",
    "ENGINE_FORMAT",
    "EXPORT_FORMAT",
    "PLUGIN_MODES",
    "Contract",
    "FrameWideModule",
    "ShapeRange",
    "StateTensor",
    "Tiling",
    "is_manifest_dir",
    "is_ours",
    "read_manifest",
]

EXPORT_FORMAT = "flashvaed-export"
ENGINE_FORMAT = "flashvaed-engine"
CONTRACT_VERSION = 1
METADATA_KEY = "flashvaed.contract"
GRAPHS = ("first", "steady", "last")
FLUSH = "flush"  # exports with windows of decoders with latency: the rest of the latency in one step (FLUSH_RULE)
TILED = ("tile", "capture", "frame")  # graph name prefixes of exports made for tiling (TILING_RULE)
SHAPES = ("batch", "chunk", "height", "width")
STEP_INPUTS = {"timestep", "noise"}
STATE_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,200}")
LIMITS = {"channels": 1 << 16, "frames": 1 << 10, "factor": 1 << 8, "shape": 1 << 16}  # far past any real model
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Which streaming causal convs are plugin nodes: all, only depthwise ones, or none (plain ops).
# "flashvaed" is the spelling of "all" from before there was a choice: manifests keep loading.
PLUGIN_MODES = ("all", "depthwise", "none")
PLUGIN_ALIASES = {"flashvaed": "all"}


def plugin_mode(value: str) -> str:
    """The ``plugins`` value ``value`` names (aliases resolved); ValueError if it names none."""
    mode = PLUGIN_ALIASES.get(value, value)
    if mode not in PLUGIN_MODES:
        raise ValueError(f"plugins {value!r} (use {', '.join(PLUGIN_MODES)})")
    return mode


def plugin_convs_problem(value: Any) -> str | None:
    """What is wrong with a manifest's ``plugin_convs`` (absent: nothing; older manifests lack it)."""
    if value is None:
        return None
    counts = [value.get(k) for k in ("nodes", "plain")] if isinstance(value, dict) else []
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1 << 20 for n in counts):
        return f"plugin_convs must give counts of nodes and plain convs, got {value!r}"[:200]
    if not isinstance(value.get("fallback"), (str, type(None))):
        return f"plugin_convs.fallback must be a reason or null, got {value.get('fallback')!r}"[:200]
    return None


def shape_in_limits(r: ShapeRange) -> bool:
    """Whether a contract may declare the range ``r`` (latent units): the rule manifests are read
    by, which the exporter applies to its options too, so that it never writes what it would refuse."""
    return 1 <= r.min <= r.opt <= r.max <= LIMITS["shape"]


CHUNK_RULE = (
    "Run graph 'first' once on latent frame 0 (one latent frame -> one frame + the initial state). "
    "Then run graph 'steady' on the following latent frames in chunks of k (k within shapes.chunk): "
    "k latent frames + state -> temporal_factor*k frames + next state, feeding every output "
    "'next_state/NAME' back as input 'state/NAME'. Concatenating the frames of all chunks equals "
    "decoding the clip at once."
)
CLOCK_RULE = (
    "This decoder runs on a clock. Every graph maps k latent frames to temporal_factor*k output positions: "
    "'first' (k=1) starts the stream, 'steady' takes input 'position' (int64: latent frames pushed before "
    "this chunk). With model.latency > 0 (not causal) a graph 'last' also takes 'end' (int64: the clip's "
    "length T in latent frames) and runs every chunk once the clip's length is known: a final chunk shorter "
    "than shapes.chunk.min padded with any latents, then chunks of any latents until model.latency latent "
    "frames past the end were pushed (with latency 0, pad a short final chunk and run 'steady'). "
    "Output position p is frame p - model.output_offset of the clip; keep "
    "frames 0 .. temporal_factor*(T-1). 'timestep' (float32, one per sample) and 'noise/i' (float32 maps of "
    "the latent grid scaled by model.noise_scales[i]) are per-stream inputs, the same for every chunk."
)

FLUSH_RULE = (
    "Graph 'flush' (exports with windows) ends a stream in one run: run it instead of 'last' on the chunk "
    "holding the clip's last latent frame (its inputs are 'last''s): it runs that chunk and model.latency "
    "latent frames past it and returns only the frames of the clip still held back, frames "
    "max(0, temporal_factor*position - model.output_offset) .. temporal_factor*(T-1) of the clip, and no next "
    "state; no chunk follows it."
)


TILING_RULE = (
    "A frame larger than shapes.height x shapes.width (latent) is decoded as tiles whose regions (core plus "
    "model.tiling.halo on every side that is not the frame's edge) have a size the graphs take; the tiles' "
    "cores partition the frame. Every tile keeps its own state, and each chunk runs, for every frame-wide "
    "module J in tiling.modules order: graph 'capture.J.STEP' (STEP: the graph the chunk runs, first, steady "
    "or last) on every tile, with the tile's latents, its state (not advanced) and the contexts of the "
    "modules before J; its output 'partial' is module J's input over the tile's region (positions at the "
    "module's scale). Crop each partial to the tile's core. Context 'sum' (a per-frame group norm): over "
    "every tile's core, in float64, count n, sum s and sum of squares q of each (sample, frame, group) "
    "(channels of a group are consecutive); mean = s/n, rstd = 1/sqrt(max(q/n - mean^2, 0) + eps), given to "
    "every tile as inputs 'context/J/mean' and 'context/J/rstd' (float32, (batch, frames, groups)). "
    "Context 'place': place the cores into the whole frame at the module's scale, run graph 'frame.J' on it "
    "(input 'input', output 'output': the module's output on the whole frame) and give every tile the output "
    "over its region as input 'context/J'. Then run graph 'tile.STEP' on every tile with all contexts: its "
    "frames' core positions are the frame's, and its next state is the tile's."
)


CONTEXTS = ("sum", "place")  # how a frame-wide module's context is made from the tiles' partials


@dataclass(frozen=True)
class FrameWideModule:
    """A module that mixes a whole frame, as a tiled run of an export needs to know it."""

    name: str
    context: str  # one of CONTEXTS
    channels: int  # of its input
    scale: Fraction  # of its input's grid relative to the latent grid
    frames_first: int  # frames at it in a step of graph first
    frames_per_chunk: int  # frames at it per latent frame of a steady (or last) step
    groups: int = 0  # "sum": the group norm's groups ...
    eps: float = 0.0  # ... and its eps

    def frames(self, step: str, chunk: str | int) -> str | int:
        if step == "first":
            return self.frames_first
        a = self.frames_per_chunk
        if isinstance(chunk, int):
            return a * chunk
        return chunk if a == 1 else f"{a}*{chunk}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "context": self.context,
            "channels": self.channels,
            "scale": str(self.scale),
            "frames_first": self.frames_first,
            "frames_per_chunk": self.frames_per_chunk,
        }
        if self.context == "sum":
            d.update(groups=self.groups, eps=self.eps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameWideModule:
        eps = d.get("eps", 0.0)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ValueError(f"tiling.modules eps must be a number, got {eps!r}"[:200])
        return cls(
            d["name"],
            d["context"],
            whole(d["channels"], "tiling.modules channels"),
            Fraction(d["scale"]),
            whole(d["frames_first"], "tiling.modules frames_first"),
            whole(d["frames_per_chunk"], "tiling.modules frames_per_chunk"),
            whole(d.get("groups", 0), "tiling.modules groups"),
            float(eps),
        )

    def problem(self) -> str | None:
        if not (isinstance(self.name, str) and STATE_NAME.fullmatch(self.name)):
            return f"tiling module {self.name!r} has an impossible name"[:200]
        if self.context not in CONTEXTS:
            return f"tiling module {self.name}: context must be one of {', '.join(CONTEXTS)}, got {self.context!r}"[
                :200
            ]
        if not (
            1 <= self.channels <= LIMITS["channels"]
            and 0 < self.scale <= LIMITS["factor"]
            and 1 <= self.frames_first <= LIMITS["frames"]
            and 1 <= self.frames_per_chunk <= LIMITS["factor"]
        ):
            return f"tiling module {self.name}: channels, scale or frames out of range"[:200]
        if self.context == "sum" and not (
            1 <= self.groups <= self.channels and self.channels % self.groups == 0 and 0 < self.eps < 1
        ):
            return f"tiling module {self.name}: groups must divide its channels and 0 < eps < 1"[:200]
        return None


@dataclass
class Tiling:
    """The tiling section of a manifest: the frame-wide modules in the order a step runs them, the
    whole frames (latent) a tiled run takes (the ``frame.J`` graphs' shapes), and the inputs each
    capture graph takes (a subset of its step's: a graph that stops at module J reads no later input)."""

    modules: list[FrameWideModule]
    frame: dict[str, ShapeRange]  # height, width
    capture_inputs: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": TILING_RULE,
            "frame": {k: r.to_dict() for k, r in self.frame.items()},
            "modules": [m.to_dict() for m in self.modules],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], graphs: dict[str, Any]) -> Tiling:
        if not isinstance(d, dict) or not isinstance(d.get("modules"), list) or not isinstance(d.get("frame"), dict):
            raise ValueError("tiling must give modules (a list) and frame (a mapping)")
        frame = {k: ShapeRange.from_dict(d["frame"][k]) for k in ("height", "width")}
        modules = [FrameWideModule.from_dict(m) for m in d["modules"]]
        capture = {
            g: [t["name"] for t in spec["inputs"]]
            for g, spec in graphs.items()
            if isinstance(g, str) and g.startswith("capture.")
        }
        return cls(modules, frame, capture)


def graph_kind(graph: str) -> tuple[str, str, int]:
    """(kind, step, module) of a graph's name: ("step", "steady", -1), ("tile", "first", -1),
    ("capture", "steady", 2) for capture.2.steady, ("frame", "", 0) for frame.0."""
    if graph in GRAPHS or graph == FLUSH:
        return "step", graph, -1
    parts = graph.split(".")
    if len(parts) == 2 and parts[0] == "tile" and parts[1] in GRAPHS:
        return "tile", parts[1], -1
    if len(parts) == 3 and parts[0] == "capture" and parts[1].isdigit() and parts[2] in GRAPHS:
        return "capture", parts[2], int(parts[1])
    if len(parts) == 2 and parts[0] == "frame" and parts[1].isdigit():
        return "frame", "", int(parts[1])
    raise ValueError(f"unknown graph {graph!r}"[:200])


BOUNDS = ("min", "opt", "max")  # of each shape range
FIELD_TYPES = {"model": dict, "precision": str, "plugins": str, "state": list, "graphs": dict}


def whole(value: Any, name: str) -> int:
    """A manifest's integer field: ``int()`` would read 16.5 as 16 and "7" as 7, accepting a lie."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}"[:200])
    return value


def scaled(dim: str | int, scale: Fraction) -> str | int:
    """The size of a dimension ``dim`` (a number or a symbol) scaled by ``scale``."""
    if isinstance(dim, int):
        return int(dim * scale)
    if scale == 1:
        return dim
    return f"{dim}*{scale}"


@dataclass(frozen=True)
class StateTensor:
    name: str
    channels: int
    frames: int
    scale: Fraction
    history: str = "zeros"  # before the clip's first frame: zeros, or the first frame replicated

    @property
    def input(self) -> str:
        return f"state/{self.name}"

    @property
    def output(self) -> str:
        return f"next_state/{self.name}"

    def shape(self, batch: str | int, height: str | int, width: str | int) -> list[str | int]:
        return [batch, self.channels, self.frames, scaled(height, self.scale), scaled(width, self.scale)]

    @classmethod
    def from_spec(cls, spec: StateSpec) -> StateTensor:
        return cls(spec.name, spec.channels, spec.frames, spec.scale, spec.history)


@dataclass
class Contract:
    """Everything in ``manifest.json`` of an export (engines add a ``backend`` section)."""

    model: dict[str, Any]
    precision: str
    plugins: str  # one of PLUGIN_MODES
    opset: int
    shapes: dict[str, ShapeRange]
    state: list[StateTensor]
    files: dict[str, str]
    format: str = EXPORT_FORMAT
    backend: dict[str, Any] | None = None
    # what ``plugins`` gave: {"nodes": streaming convs written as plugin nodes, "plain": temporal convs
    # written as plain ops, "fallback": why convs ``plugins`` asked for stayed plain, or None};
    # None in manifests written before it was recorded
    plugin_convs: dict[str, Any] | None = None
    # exports made for tiling a decoder with frame-wide modules: the extra graphs' facts (TILING_RULE)
    tiling: Tiling | None = None
    # clocked decoders: whether each layer of a step computes only its window (sizes inside the graphs
    # depend on the clock inputs) or its whole step; None: not clocked, or a manifest from before it was recorded
    windows: bool | None = None

    # facts of the model ---------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.model["latent_channels"])

    @property
    def temporal_factor(self) -> int:
        return int(self.model["temporal_factor"])

    @property
    def spatial_factor(self) -> int:
        return int(self.model["spatial_factor"])

    @property
    def latency(self) -> int:
        return int(self.model.get("latency", 0))

    @property
    def step_inputs(self) -> list[str]:
        return list(self.model.get("step_inputs", []))

    @property
    def output_offset(self) -> int:
        return int(self.model.get("output_offset", 0))

    @property
    def noise_scales(self) -> list[Fraction]:
        return [Fraction(s) for s in self.model.get("noise_scales", [])]

    @property
    def default_timestep(self) -> float | None:
        value = self.model.get("default_timestep")
        return None if value is None else float(value)

    @property
    def clocked(self) -> bool:
        """Whether the graphs run on a clock (``position`` input, positions cropped): see CLOCK_RULE."""
        return bool(self.latency or self.output_offset)

    @property
    def default_noise_scale(self) -> float | None:
        value = self.model.get("default_noise_scale")
        return None if value is None else float(value)

    @property
    def graphs(self) -> tuple[str, ...]:
        """The graphs of this export: a decoder with latency adds ``last`` (the clip's end known)."""
        return GRAPHS if self.latency else GRAPHS[:2]

    @property
    def tiling_graphs(self) -> tuple[str, ...]:
        """The graphs of a tiled run (``TILING_RULE``): none unless the export was made for tiling."""
        if self.tiling is None:
            return ()
        steps = self.graphs
        names = [f"tile.{g}" for g in steps]
        for j, m in enumerate(self.tiling.modules):
            names += [f"capture.{j}.{g}" for g in steps]
            if m.context == "place":
                names.append(f"frame.{j}")
        return tuple(names)

    @property
    def flush(self) -> bool:
        """Whether the export has a ``flush`` graph (FLUSH_RULE): decoders with latency, exported with windows."""
        return bool(self.latency and self.windows)

    def flush_frames(self, position: int, end: int) -> int:
        """Frames the ``flush`` graph returns run at ``position`` on a clip of ``end`` latent frames
        (FLUSH_RULE): a driver can bind its output before the run."""
        tf = self.temporal_factor
        return max(0, tf * (end - 1) + 1 - max(0, tf * position - self.output_offset))

    @property
    def all_graphs(self) -> tuple[str, ...]:
        return self.graphs + ((FLUSH,) if self.flush else ()) + self.tiling_graphs

    @property
    def state_dtype(self) -> str:
        return PRECISIONS[self.precision]

    def dims(self) -> dict[str, str | int]:
        """Symbolic (dynamic) or fixed (static) sizes of batch, chunk and the latent grid (and, for
        tiling, of the whole frame: ``H``, ``W``, and the frames at a module, ``frames``)."""
        names = {"batch": "batch", "chunk": "chunk", "height": "h", "width": "w"}
        dims: dict[str, str | int] = {k: (r.min if r.static else names[k]) for k, r in self.shapes.items()}
        if self.tiling is not None:
            for k, name in (("height", "H"), ("width", "W")):
                r = self.tiling.frame[k]
                dims[f"frame_{k}"] = r.min if r.static else name
            dims["frames"] = "frames"
        return dims

    def io(self, graph: str, sizes: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Names, shapes and dtypes of one graph's inputs and outputs, in order: symbolic, or concrete
        for ``sizes`` (batch, chunk, height, width in latent units; frame graphs: batch,
        frame_height, frame_width, frames)."""
        d = sizes or self.dims()
        kind, step, j = graph_kind(graph)
        if kind == "step":
            return self._step_io(step, d)
        assert self.tiling is not None, f"graph {graph} belongs to exports made for tiling"
        modules = self.tiling.modules
        if kind == "frame":
            m = modules[j]
            shape = [
                d["batch"],
                m.channels,
                d["frames"],
                scaled(d["frame_height"], m.scale),
                scaled(d["frame_width"], m.scale),
            ]
            return {
                "inputs": [{"name": "input", "shape": shape, "dtype": self.state_dtype}],
                "outputs": [{"name": "output", "shape": shape, "dtype": self.state_dtype}],
            }
        io = self._step_io(step, d)
        contexts = [c for i, m in enumerate(modules) if kind == "tile" or i < j for c in self._context_io(i, step, d)]
        inputs = io["inputs"] + contexts
        if kind == "tile":
            return {"inputs": inputs, "outputs": io["outputs"]}
        takes = self.tiling.capture_inputs.get(graph)
        if takes is not None:
            inputs = [t for t in inputs if t["name"] in takes]
        m = modules[j]
        b, k, h, w = d["batch"], d["chunk"] if step != "first" else 1, d["height"], d["width"]
        shape = [b, m.channels, m.frames(step, k), scaled(h, m.scale), scaled(w, m.scale)]
        return {"inputs": inputs, "outputs": [{"name": "partial", "shape": shape, "dtype": self.state_dtype}]}

    def _context_io(self, index: int, step: str, d: dict[str, Any]) -> list[dict[str, Any]]:
        """The inputs that carry frame-wide module ``index``'s context into a tile's step."""
        assert self.tiling is not None
        m = self.tiling.modules[index]
        b, h, w = d["batch"], d["height"], d["width"]
        t = m.frames(step, d["chunk"] if step != "first" else 1)
        if m.context == "place":
            shape = [b, m.channels, t, scaled(h, m.scale), scaled(w, m.scale)]
            return [{"name": f"context/{index}", "shape": shape, "dtype": self.state_dtype}]
        return [
            {"name": f"context/{index}/{stat}", "shape": [b, t, m.groups], "dtype": "float32"}
            for stat in ("mean", "rstd")
        ]

    def _step_io(self, graph: str, d: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        b, h, w = d["batch"], d["height"], d["width"]
        k = 1 if graph == "first" else d["chunk"]
        if graph == "first" and not self.clocked:
            f: str | int = 1
        else:
            f = self.temporal_factor * k if isinstance(k, int) else f"{self.temporal_factor}*chunk"
        s = self.spatial_factor
        latents = {"name": "latents", "shape": [b, self.latent_channels, k, h, w], "dtype": "float32"}
        frames = {"name": "frames", "shape": [b, 3, f, scaled(h, s), scaled(w, s)], "dtype": "float32"}

        def state(io: str) -> list[dict[str, Any]]:
            return [{"name": getattr(t, io), "shape": t.shape(b, h, w), "dtype": self.state_dtype} for t in self.state]

        if graph == FLUSH:  # the clip's frames still held back, however many; no next state
            frames["shape"][2] = "flush_frames"
        inputs = [latents] if graph == "first" else [latents, *state("input")]
        if self.clocked and graph != "first":
            inputs.append({"name": "position", "shape": [], "dtype": "int64"})
        if graph in ("last", FLUSH):
            inputs.append({"name": "end", "shape": [], "dtype": "int64"})
        if "timestep" in self.step_inputs:
            inputs.append({"name": "timestep", "shape": [b], "dtype": "float32"})
        for i, scale in enumerate(self.noise_scales):
            inputs.append({"name": f"noise/{i}", "shape": [scaled(h, scale), scaled(w, scale)], "dtype": "float32"})
        return {"inputs": inputs, "outputs": [frames] if graph == FLUSH else [frames, *state("output")]}

    def io_problem(self, graph: str, inputs: dict[str, list], outputs: dict[str, list]) -> str | None:
        """How a loaded graph's inputs and outputs (name -> shape, sizes or symbols) contradict
        this contract, if they do: a manifest that lies about its graphs is refused at load."""
        want = self.io(graph)
        for kind, have in (("input", inputs), ("output", outputs)):
            specs = want[kind + "s"]
            extra = set(have) - {t["name"] for t in specs}
            if extra:
                return f"graph {graph} has {kind} {sorted(extra)[0]!r}, which the contract lacks"
            for spec in specs:
                shape = have.get(spec["name"])
                if shape is None:
                    return f"graph {graph} lacks the {kind} {spec['name']!r}"
                fixed = [
                    (a, b)
                    for a, b in zip(shape, spec["shape"], strict=False)
                    if isinstance(a, int) and isinstance(b, int)
                ]
                if len(shape) != len(spec["shape"]) or any(a != b for a, b in fixed):
                    return f"graph {graph} {kind} {spec['name']!r} is {list(shape)}, the contract says {spec['shape']}"
        return None

    # serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": CONTRACT_VERSION,
            "model": self.model,
            "precision": self.precision,
            "plugins": self.plugins,
            **({"plugin_convs": self.plugin_convs} if self.plugin_convs is not None else {}),
            "opset": self.opset,
            "chunk_rule": CHUNK_RULE
            + (" " + CLOCK_RULE if self.clocked else "")
            + (" " + FLUSH_RULE if self.flush else ""),
            **({"windows": self.windows} if self.windows is not None else {}),
            "shapes": {k: r.to_dict() for k, r in self.shapes.items()},
            "graphs": {g: {"file": self.files[g], **self._frames_of(g), **self.io(g)} for g in self.all_graphs},
            "state": [
                {
                    "name": t.name,
                    "input": t.input,
                    "output": t.output,
                    "channels": t.channels,
                    "frames": t.frames,
                    "scale": str(t.scale),
                    "history": t.history,
                }
                for t in self.state
            ],
            **({"tiling": self.tiling.to_dict()} if self.tiling is not None else {}),
            **({"backend": self.backend} if self.backend is not None else {}),
        }

    @staticmethod
    def _frames_of(graph: str) -> dict[str, Any]:
        kind, step, _ = graph_kind(graph)
        return {} if kind == "frame" else {"latent_frames": 1 if step == "first" else "chunk"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Contract:
        if d.get("format") not in (EXPORT_FORMAT, ENGINE_FORMAT):
            raise InputError(f"{where} is not a flashvaed export or engine manifest")
        try:
            version = whole(d.get("version", 0), "version")
            if version > CONTRACT_VERSION:
                raise InputError(f"{where} was written by a newer flashvaed (contract version {d['version']})")
            for name, kind in FIELD_TYPES.items():  # a list where a mapping belongs, a number for a name
                if not isinstance(d[name], kind):
                    raise ValueError(f"{name} must be a {kind.__name__}, got {d[name]!r}"[:200])
            shapes = d["shapes"]
            tiling = d.get("tiling")  # absent before exports were made for tiling, and in exports made without
            contract = cls(
                model=dict(d["model"]),
                precision=d["precision"],
                plugins=plugin_mode(d["plugins"]),
                opset=whole(d["opset"], "opset"),
                shapes={k: ShapeRange(*(whole(v[b], f"shapes.{k}.{b}") for b in BOUNDS)) for k, v in shapes.items()},
                state=[
                    StateTensor(
                        s["name"],
                        whole(s["channels"], "channels"),
                        whole(s["frames"], "frames"),
                        Fraction(s["scale"]),
                        s.get("history", "zeros"),  # absent before it was recorded: zeros then
                    )
                    for s in d["state"]
                ],
                files={
                    g: spec["file"]
                    for g, spec in d["graphs"].items()
                    if g in GRAPHS
                    or g == FLUSH
                    or (tiling is not None and isinstance(g, str) and g.split(".")[0] in TILED)
                },
                format=d["format"],
                backend=d.get("backend"),
                plugin_convs=d.get("plugin_convs"),
                tiling=None if tiling is None else Tiling.from_dict(tiling, d["graphs"]),
                windows=d.get("windows"),  # absent before it was recorded
            )
            if contract.windows is not None and not isinstance(contract.windows, bool):
                raise ValueError(f"windows must be true, false or absent, got {contract.windows!r}"[:200])
            for module in contract.tiling.modules if contract.tiling is not None else ():
                problem = module.problem()  # before the graphs it implies are counted
                if problem:
                    raise InputError(f"{where} is malformed: {problem}")
            if set(contract.files) != set(contract.all_graphs):
                raise KeyError(f"graphs (expected {', '.join(contract.all_graphs)})"[:300])
            problem = contract.problem()
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise InputError(f"{where} is malformed: missing or bad field {e}") from None
        if problem:
            raise InputError(f"{where} is malformed: {problem}")
        return contract

    def problem(self) -> str | None:
        """What makes this contract impossible to run, if anything: a tampered manifest is refused
        here, before a graph is loaded or a state buffer allocated."""
        problem = self.model_problem()
        if problem:
            return problem
        positive = {name: getattr(self, name) for name in ("latent_channels", "temporal_factor", "spatial_factor")}
        for name, value in positive.items():
            if not 1 <= value <= LIMITS["factor" if name != "latent_channels" else "channels"]:
                return f"model.{name} {value} is out of range"
        if not (0 <= self.latency <= LIMITS["frames"] and 0 <= self.output_offset <= LIMITS["frames"]):
            return "model.latency or model.output_offset is out of range"
        if any(not 0 < s <= LIMITS["factor"] for s in self.noise_scales):
            return "model.noise_scales must be positive fractions"
        unknown = set(self.step_inputs) - STEP_INPUTS
        if unknown:
            return f"it declares step inputs this version cannot drive ({', '.join(sorted(map(str, unknown)))})"
        if self.precision not in PRECISIONS:
            return f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}"
        if not isinstance(self.plugins, str) or not 1 <= self.opset <= 1000:
            return "plugins or opset is malformed"
        problem = plugin_convs_problem(self.plugin_convs)
        if problem:
            return problem
        if set(self.shapes) != set(SHAPES):
            return f"shapes must give {', '.join(SHAPES)}"
        for name, r in self.shapes.items():
            if not shape_in_limits(r):
                return f"shapes.{name} must satisfy 1 <= min <= opt <= max <= {LIMITS['shape']}, got {r.to_dict()}"
        for t in self.state:
            if not (
                isinstance(t.name, str)
                and STATE_NAME.fullmatch(t.name)
                and 1 <= t.channels <= LIMITS["channels"]
                and 0 <= t.frames <= LIMITS["frames"]
                and 0 < t.scale <= LIMITS["factor"]
            ):
                return f"state tensor {t.name!r} has an impossible name, channel count, frame count or scale"
            if t.history not in HISTORY_MODES:
                modes = ", ".join(HISTORY_MODES)
                return f"state tensor {t.name!r}: history must be one of {modes}, got {t.history!r}"[:200]
        for graph, name in self.files.items():
            if not isinstance(name, str):
                return f"graphs.{graph}.file is not a file name"
        problem = self.tiling_problem()
        if problem:
            return problem
        if self.backend is not None and not isinstance(self.backend, dict):
            return "backend is not a mapping"
        name = (self.backend or {}).get("name", "" if self.format == EXPORT_FORMAT else None)
        if not isinstance(name, str):  # an engine says which backend runs it
            return f"backend.name must name the backend that runs this engine, got {name!r}"[:200]
        return None

    def tiling_problem(self) -> str | None:
        """What in the tiling section cannot be: modules, frame ranges, capture graphs' inputs."""
        t = self.tiling
        if t is None:
            return None
        if not 1 <= len(t.modules) <= LIMITS["frames"]:
            return "tiling.modules must list the frame-wide modules (at least one)"
        for m in t.modules:
            problem = m.problem()
            if problem:
                return problem
        for name, r in t.frame.items():
            if not shape_in_limits(r):
                return (
                    f"tiling.frame.{name} must satisfy 1 <= min <= opt <= max <= {LIMITS['shape']}, got {r.to_dict()}"
                )
        for graph, takes in t.capture_inputs.items():
            kind, step, j = graph_kind(graph)
            if kind != "capture" or j >= len(t.modules):
                return f"graph {graph} is no capture graph of this export"[:200]
            may = [x["name"] for x in self._step_io(step, self.dims())["inputs"]]
            may += [c["name"] for i in range(j) for c in self._context_io(i, step, self.dims())]
            if any(not isinstance(n, str) for n in takes) or [n for n in may if n in takes] != takes:
                return f"graph {graph} must take a subset of its step's inputs, in their order"[:200]
        return None

    def model_problem(self) -> str | None:
        """What in ``model`` has the wrong type or cannot be: the facts that runtimes, ``info`` and
        the diffusers adapter read (family, latent statistics, ...) are judged here, where they are read."""
        m = self.model
        for name in ("latent_channels", "temporal_factor", "spatial_factor", "latency", "output_offset"):
            value = m.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int):
                return f"model.{name} must be an integer, got {value!r}"[:200]
        family = m.get("family")
        if not isinstance(family, str) or family not in families.names():
            known = ", ".join(families.names())
            return f"model.family {family!r} is not a model family this version knows ({known})"[:200]
        if m.get("kind") not in ("teacher", "student"):
            return f"model.kind must be teacher or student, got {m.get('kind')!r}"[:200]
        if not isinstance(m.get("fingerprint"), str):
            return f"model.fingerprint must be a string, got {m.get('fingerprint')!r}"[:200]
        if not isinstance(m.get("source", 0), (str, type(None))):
            return f"model.source must be the path it was exported from (or null), got {m.get('source', 0)!r}"[:200]
        sf = m.get("scaling_factor", 1.0)  # absent in exports before it was recorded: 1.0 then
        if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0 < sf < math.inf:
            return f"model.scaling_factor must be a finite number > 0, got {sf!r}"[:200]
        for name in ("default_timestep", "default_noise_scale"):
            value = m.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                return f"model.{name} must be a number or null, got {value!r}"[:200]
        if 1 <= m["latent_channels"] <= LIMITS["channels"]:  # else refused by ``problem``
            try:  # frames are de-normalised by them (the diffusers adapter encodes with them too)
                checked_statistics(m.get("latents_mean"), m.get("latents_std"), m["latent_channels"])
            except ValueError as e:
                return f"model.{e}"[:300]
        return None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def read_manifest(path: str | os.PathLike) -> Contract:
    """The contract of an export or engine directory; anything else is refused in one line.

    Graph files must lie inside the directory: no absolute paths, no ``..``, no symbolic links
    leading out of it.
    """
    path = Path(path)
    manifest = path / "manifest.json"
    if not path.is_dir():
        raise InputError(f"{path} is not a directory (expected an export or engine directory)")
    if not manifest.exists():
        raise InputError(f"{path} is not an export or engine directory (no manifest.json)")
    try:
        data = json.loads(read_text(manifest, InputError, "manifest"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{manifest} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{manifest} is not a flashvaed export or engine manifest")
    contract = Contract.from_dict(data, str(manifest))
    from ..engines import check_backend  # engines build on this module: imported when first needed

    check_backend(contract, str(manifest))
    for graph, name in contract.files.items():
        member_file(path, name, InputError, f"its {graph} graph")
    return contract


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse an ONNX graph whose external data lies outside its folder (``../``, absolute, links)."""
    path = Path(path)
    with open(path, "rb") as f, contextlib.suppress(ValueError):  # ValueError: an empty file
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b"location") < 0:  # every external tensor names its location: none here
                return
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's decode errors have no stable public type
        raise InputError(f"cannot read graph {path}: {str(e).splitlines()[0][:200] if str(e) else e}") from None
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            member_file(path.parent, location, InputError, f"the external data of {path.name}")


def is_manifest_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` claims to be an export or engine directory (``read_manifest`` judges it)."""
    return (Path(path) / "manifest.json").is_file()


OURS = "an export or engine directory"


def is_ours(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an export or engine directory we wrote, which a new one may replace."""
    return json_format(Path(path) / "manifest.json") in (EXPORT_FORMAT, ENGINE_FORMAT)
