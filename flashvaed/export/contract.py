"""The I/O contract of an exported decoder: what a runtime needs to drive its two graphs.

The same JSON is written to ``manifest.json`` beside the graphs and into each graph's metadata
(key ``flashvaed.contract``), so a runtime without flashvaed can decode: run ``first`` on latent
frame 0, then ``steady`` on chunks of k latent frames, feeding every ``next_state/...`` output
back as the ``state/...`` input of the same name. docs/onnx-contract.md describes every field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..models.streaming import ShapeRange, StateSpec

__all__ = [
    "ENGINE_FORMAT",
    "EXPORT_FORMAT",
    "Contract",
    "ShapeRange",
    "StateTensor",
    "is_manifest_dir",
    "read_manifest",
]

EXPORT_FORMAT = "flashvaed-export"
ENGINE_FORMAT = "flashvaed-engine"
CONTRACT_VERSION = 1
METADATA_KEY = "flashvaed.contract"
GRAPHS = ("first", "steady", "last")
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
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
        return cls(spec.name, spec.channels, spec.frames, spec.scale)


@dataclass
class Contract:
    """Everything in ``manifest.json`` of an export (engines add a ``backend`` section)."""

    model: dict[str, Any]
    precision: str
    plugins: str
    opset: int
    shapes: dict[str, ShapeRange]
    state: list[StateTensor]
    files: dict[str, str]
    format: str = EXPORT_FORMAT
    backend: dict[str, Any] | None = None

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
    def state_dtype(self) -> str:
        return PRECISIONS[self.precision]

    def dims(self) -> dict[str, str | int]:
        """Symbolic (dynamic) or fixed (static) sizes of batch, chunk and the latent grid."""
        names = {"batch": "batch", "chunk": "chunk", "height": "h", "width": "w"}
        return {k: (r.min if r.static else names[k]) for k, r in self.shapes.items()}

    def io(self, graph: str, sizes: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
        """Names, shapes and dtypes of one graph's inputs and outputs, in order: symbolic, or concrete
        for ``sizes`` (batch, chunk, height, width in latent units)."""
        d = sizes or self.dims()
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

        inputs = [latents] if graph == "first" else [latents, *state("input")]
        if self.clocked and graph != "first":
            inputs.append({"name": "position", "shape": [], "dtype": "int64"})
        if graph == "last":
            inputs.append({"name": "end", "shape": [], "dtype": "int64"})
        if "timestep" in self.step_inputs:
            inputs.append({"name": "timestep", "shape": [b], "dtype": "float32"})
        for i, scale in enumerate(self.noise_scales):
            inputs.append({"name": f"noise/{i}", "shape": [scaled(h, scale), scaled(w, scale)], "dtype": "float32"})
        return {"inputs": inputs, "outputs": [frames, *state("output")]}

    # serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": CONTRACT_VERSION,
            "model": self.model,
            "precision": self.precision,
            "plugins": self.plugins,
            "opset": self.opset,
            "chunk_rule": CHUNK_RULE + (" " + CLOCK_RULE if self.clocked else ""),
            "shapes": {k: r.to_dict() for k, r in self.shapes.items()},
            "graphs": {
                g: {"file": self.files[g], "latent_frames": 1 if g == "first" else "chunk", **self.io(g)}
                for g in self.graphs
            },
            "state": [
                {
                    "name": t.name,
                    "input": t.input,
                    "output": t.output,
                    "channels": t.channels,
                    "frames": t.frames,
                    "scale": str(t.scale),
                }
                for t in self.state
            ],
            **({"backend": self.backend} if self.backend is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Contract:
        if d.get("format") not in (EXPORT_FORMAT, ENGINE_FORMAT):
            raise InputError(f"{where} is not a flashvaed export or engine manifest")
        if int(d.get("version", 0)) > CONTRACT_VERSION:
            raise InputError(f"{where} was written by a newer flashvaed (contract version {d['version']})")
        try:
            contract = cls(
                model=d["model"],
                precision=d["precision"],
                plugins=d["plugins"],
                opset=int(d["opset"]),
                shapes={k: ShapeRange.from_dict(v) for k, v in d["shapes"].items()},
                state=[
                    StateTensor(s["name"], int(s["channels"]), int(s["frames"]), Fraction(s["scale"]))
                    for s in d["state"]
                ],
                files={g: spec["file"] for g, spec in d["graphs"].items() if g in GRAPHS},
                format=d["format"],
                backend=d.get("backend"),
            )
            if set(contract.files) != set(contract.graphs):
                raise KeyError(f"graphs (expected {', '.join(contract.graphs)})")
            return contract
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{where} is malformed: missing or bad field {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def read_manifest(path: str | os.PathLike) -> Contract:
    """The contract of an export or engine directory; anything else is refused in one line."""
    path = Path(path)
    manifest = path / "manifest.json"
    if not path.is_dir():
        raise InputError(f"{path} is not a directory (expected an export or engine directory)")
    if not manifest.is_file():
        raise InputError(f"{path} is not an export or engine directory (no manifest.json)")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{manifest} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{manifest} is not a flashvaed export or engine manifest")
    contract = Contract.from_dict(data, str(manifest))
    for graph, name in contract.files.items():
        if not (path / name).is_file():
            raise InputError(f"{path} lacks its {graph} graph {name}")
    return contract


def is_manifest_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "manifest.json").is_file()
