"""Check an engine against the PyTorch model it came from, chunk by chunk, with polygraphy.

Every chunk (first and steady) is fed to the engine and to the reference with the same inputs —
the reference's own state going in — so an error is pinned to the step that made it and does
not compound. Tolerances per output depend on the export precision. Then the whole clip is
decoded by the engine alone and compared with the reference and the teacher (PSNR, SSIM).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, CompareFunc
from polygraphy.logger import G_LOGGER

from ..errors import InputError
from ..metrics import psnr, ssim
from ..models.streaming import StreamingDecoder, chunk_bounds, clocked, model_fingerprint, zero_state
from ..models.vae import LatentDecoder
from .base import ContractDecoder
from .ort_backend import OnnxRuntimeDecoder

# (atol, rtol) for frames in [-1, 1]; state tensors get a 10x wider atol (features, not pixels)
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2), "bf16": (8e-2, 5e-2)}


class TorchStepRunner(BaseRunner):
    """The reference model's step as a polygraphy runner with the graph's input/output names."""

    def __init__(self, model: LatentDecoder, decoder: ContractDecoder, graph: str) -> None:
        super().__init__(name=f"torch-{graph}", prefix="flashvaed")
        self.model, self.contract, self.graph = model, decoder.contract, graph

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for t in self.contract.io(self.graph)["inputs"]:
            meta.add(t["name"], np.dtype(t["dtype"]), [d if isinstance(d, int) else None for d in t["shape"]])
        return meta

    @torch.inference_mode()
    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        start = time.perf_counter()
        p = next(self.model.parameters())
        latents = torch.from_numpy(feed_dict["latents"]).to(p.device, p.dtype)
        if self.graph == "first":
            b, _, _, h, w = latents.shape
            state = zero_state(self.model.decoder_state_specs(), b, h, w, dtype=p.dtype, device=p.device)
        else:
            state = tuple(torch.from_numpy(feed_dict[t.input]).to(p.device, p.dtype) for t in self.contract.state)
        inputs: dict[str, Any] = {}
        if clocked(self.model):  # tensors, as in the graph: every block runs (no eager idle skipping)
            inputs["position"] = torch.tensor(int(feed_dict.get("position", 0)))
            inputs["end"] = torch.tensor(int(feed_dict["end"])) if "end" in feed_dict else None
        if "timestep" in feed_dict:
            inputs["timestep"] = torch.from_numpy(feed_dict["timestep"]).to(p.device)
        noise = sorted((k for k in feed_dict if k.startswith("noise/")), key=lambda k: int(k.split("/")[1]))
        if noise:
            inputs["noise"] = tuple(torch.from_numpy(feed_dict[k]).to(p.device, p.dtype) for k in noise)
        frames, state = self.model.decode_step(latents, state, first=self.graph == "first", **inputs)
        out = OrderedDict(frames=frames.float().cpu().numpy())
        for t, s in zip(self.contract.state, state, strict=True):
            out[t.output] = s.cpu().numpy()
        self.inference_time = time.perf_counter() - start
        return out


@dataclass
class Validation:
    engine: str
    reference: str
    precision: str
    tolerances: dict[str, float]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    end_to_end: dict[str, float] = field(default_factory=dict)
    teacher: dict[str, float] | None = None
    tiled: dict[str, Any] | None = None  # the clip decoded in tiles by the engine vs the reference, or why not
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RecordingStream(StreamingDecoder):
    """The reference model's stream, chunked as the engine chunks (its facts are the engine's: a
    short last chunk padded, a decoder with latency drained), recording every step's graph inputs."""

    def __init__(self, model: LatentDecoder, engine: ContractDecoder) -> None:
        super().__init__(model, source=engine)
        self.feeds: dict[str, list] = {g: [] for g in engine.contract.graphs}

    def _step(self, latents: torch.Tensor, first: bool) -> torch.Tensor:
        engine: ContractDecoder = self.source  # type: ignore[assignment]
        graph = engine.step_graph(first, self.end)
        dtype = engine.contract.state_dtype
        feed: dict[str, np.ndarray] = {"latents": latents.float().cpu().numpy()}
        if not first:
            for t, v in zip(engine.contract.state, self.state or (), strict=True):
                feed[t.input] = v.cpu().numpy().astype(dtype)
        if clocked(engine) and not first:
            feed["position"] = np.array(self.position, np.int64)
            if graph == "last":
                feed["end"] = np.array(self.end, np.int64)
        b, _, _, h, w = latents.shape
        feed.update(engine.stream_inputs(b, h, w, self.options))
        self.feeds[graph].append(feed)
        return super()._step(latents, first)


def _feeds(
    model: LatentDecoder, decoder: ContractDecoder, latents: torch.Tensor, chunk: int
) -> tuple[dict[str, list], torch.Tensor]:
    """Inputs of every chunk, with the reference's state going in (teacher forcing), and the
    reference's frames of the whole clip, which that same stream decodes."""
    stream = RecordingStream(model, decoder)
    frames = []
    t = latents.shape[2]
    for start, stop in chunk_bounds(t, chunk):
        frames.append(stream.push(latents[:, :, start:stop], final=stop == t).float().cpu())
    if decoder.latency:
        frames.append(stream.close().float().cpu())
    return stream.feeds, torch.cat(frames, dim=2)


def engine_runner(decoder: ContractDecoder, graph: str) -> BaseRunner:
    if isinstance(decoder, OnnxRuntimeDecoder):
        return OnnxrtRunner(decoder.sessions[graph], name=f"{decoder.backend}-{graph}")
    from polygraphy.backend.trt import TrtRunner

    return TrtRunner(decoder.engines[graph], name=f"{decoder.backend}-{graph}")


def validate(
    engine: ContractDecoder,
    reference: LatentDecoder,
    latents: torch.Tensor,
    chunk: int | None = None,
    teacher: LatentDecoder | None = None,
    engine_name: str = "engine",
    reference_name: str = "reference",
) -> Validation:
    """Compare ``engine`` with ``reference`` over every chunk of ``latents``; see module docstring."""
    if not isinstance(engine, ContractDecoder):
        raise InputError(f"{engine_name} is not an export or engine directory; validate takes one of those")
    reference_fingerprint = model_fingerprint(reference)
    if reference_fingerprint != engine.fingerprint:
        raise InputError(
            f"{engine_name} was exported from model {engine.fingerprint}, "
            f"but {reference_name} is model {reference_fingerprint}"
        )
    chunk = engine.default_chunk() if chunk is None else chunk
    if chunk not in engine.chunk_range:
        raise InputError(f"chunk {chunk} is outside this engine's chunk range {engine.chunk_range.describe()}")
    latents = latents.float().cpu()
    engine.check_geometry(latents.shape[0], latents.shape[3], latents.shape[4])
    atol, rtol = TOLERANCES[engine.contract.precision]
    atols = {"frames": atol, **{t.output: 10 * atol for t in engine.contract.state}}
    report = Validation(engine_name, reference_name, engine.contract.precision, {"atol": atol, "rtol": rtol})
    passed = True
    all_feeds, expected = _feeds(reference, engine, latents, chunk)
    for graph, feeds in all_feeds.items():
        if not feeds:
            continue
        runners = [engine_runner(engine, graph), TorchStepRunner(reference, engine, graph)]
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # our report says what matters, in one place
            results = Comparator.run(runners, data_loader=feeds)
            compare = CompareFunc.simple(atol=atols, rtol=rtol)
            accuracy = Comparator.compare_accuracy(results, compare_func=compare)
        passed &= bool(accuracy)
        # polygraphy >= 0.50 returns one AccuracyResult per compare function; older ones the result itself
        result = accuracy if hasattr(accuracy, "values") else accuracy[0]
        for per_pair in result.values():
            for i, outputs in enumerate(per_pair):
                report.chunks.append(
                    {
                        "graph": graph,
                        "index": i,
                        "passed": all(bool(o) for o in outputs.values()),
                        "outputs": {
                            name: {"max_abs": o.max_absdiff, "mean_abs": o.mean_absdiff, "passed": bool(o)}
                            for name, o in outputs.items()
                        },
                    }
                )
    frames = engine.decode(latents, chunk)
    report.end_to_end = {
        "max_abs": float((frames - expected).abs().max()),
        "mean_abs": float((frames - expected).abs().mean()),
        "psnr": psnr(frames, expected),
    }
    report.tiled = tiled_check(engine, latents, chunk, expected, 10 * atol)
    passed &= report.tiled.get("passed", True)
    if teacher is not None:
        if teacher is not reference:
            with torch.inference_mode():
                q = next(teacher.parameters())
                expected = teacher.decode(latents.to(q.device, q.dtype), chunk).float().cpu()
        report.teacher = {"psnr": psnr(frames, expected), "ssim": ssim(frames, expected)}
    report.passed = passed
    return report


def tiled_check(
    engine: ContractDecoder, latents: torch.Tensor, chunk: int, expected: torch.Tensor, atol: float
) -> dict[str, Any]:
    """The clip decoded by the engine in tiles as small as its shapes and halo allow, against the
    reference's untiled frames; or why it was not (no halo recorded, no smaller tile possible)."""
    from .tiled import TiledDecoder, engine_halo

    try:
        halo = engine_halo(engine)
    except InputError as e:
        return {"skipped": str(e)}
    h, w = latents.shape[3], latents.shape[4]
    shapes = engine.contract.shapes
    region = tuple(
        min(length, max(r.min, 2 * margin + 1))
        for length, r, margin in ((h, shapes["height"], halo[0]), (w, shapes["width"], halo[1]))
    )
    if region == (h, w):
        return {
            "skipped": f"a {h}x{w} latent frame cannot be split into tiles this engine takes (at least "
            f"{2 * halo[0] + 1}x{2 * halo[1] + 1} for its halo, within {shapes['height'].describe()} x "
            f"{shapes['width'].describe()}): validate with larger latents to check tiled decoding"
        }
    decoder = TiledDecoder(engine, region)  # type: ignore[arg-type]
    frames = decoder.decode(latents, chunk)
    diff = (frames - expected).abs()
    return {
        "tiles": len(decoder.grid(h, w)),
        "region": list(region),
        "max_abs": float(diff.max()),
        "psnr": psnr(frames, expected),
        "passed": bool(diff.max() <= atol),
    }
