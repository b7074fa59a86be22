"""Multi-process spatially sharded decoding on ``torch.distributed``: every frame split across ranks.

Under ``torchrun --nproc-per-node N`` each rank holds the same torch model and the same latents
and decodes one horizontal *band* of every latent frame: its *core* (the rows it delivers; the
cores partition the frame's rows as evenly as they can) plus the decoder's halo
(``plan_tiling(model).halo``) above and below, clamped to the frame. The halo rows are decoded
twice (overlap recompute): no activations travel between neighbours, so a rank runs the model's
own stream step on a smaller frame and memory per rank falls with N. What is exchanged:

* at every frame-wide module (``TilePlan.mixing``), once per step: group-norm statistics
  (``frame_context == "sum"``: each rank's float64 sums over its core are all-reduced) and Wan's
  middle attention input (``"place"``: the ranks' cores are all-gathered into the whole latent
  frame, on which every rank runs the attention and keeps its region's rows);
* the decoded frames, once per step: the cores are gathered on every rank (``gather="all"``,
  what a diffusers pipeline under torchrun expects) or on rank 0 only (``gather="rank0"``: the
  other ranks get an empty tensor, (B, 3, n, 0, W), that still counts the n frames).

The frames equal single-process decoding to float rounding (only the sums' order differs).
Noise-injecting decoders (LTX 0.9.1) draw the whole frame's noise maps on every rank from the same
seed and take their band of them, as untiled decoding draws them.

Every call (``sharded``, ``stream``, ``push``, ``close``, ``decode``, ``iter_decode``) is
collective: all ranks make it, in the same order. Each first exchanges a short description of its
input (the model's fingerprint, the latents' shape and a digest of their values, the chunk, the
options, the number of ranks) and any bad input a rank found, so that a mistake is refused on
every rank with the same one-line ``InputError`` before any work, instead of a hang.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import InputError
from ..models.streaming import (
    StreamingDecoder,
    as_tensor,
    check_latents,
    conditioning_inputs,
    iter_decode,
)
from ..models.tiling import Captured, Tile, TilePlan, TilingError, plan_tiling, redundancy
from .base import Decoder, Stream
from .torch_backend import TorchDecoder

__all__ = ["GATHER", "ShardedDecoder", "ShardedStream", "bands", "init_distributed", "rank_device", "sharded"]

GATHER = ("all", "rank0")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------------------------
# the process group
# ---------------------------------------------------------------------------------------------
def _torchrun_env() -> dict[str, str] | None:
    """torchrun's rendezvous variables, or None when the process was not started by a launcher."""
    env = {k: os.environ.get(k) for k in TORCHRUN_ENV}
    return None if any(v is None for v in env.values()) else env  # type: ignore[return-value]


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"the environment variable {name} must be a whole number, got {text!r}") from None


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (if not done yet) and return
    (rank, world size): NCCL when CUDA is available, gloo otherwise (or ``backend``). With CUDA each
    rank is pinned to the GPU ``LOCAL_RANK`` names, so ``device="cuda"`` means the rank's own GPU:
    call this before loading the model (or load it on ``rank_device()``)."""
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed: sharded decoding needs it")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if _torchrun_env() is None:
        missing = ", ".join(k for k in TORCHRUN_ENV if k not in os.environ)
        raise InputError(
            f"sharded decoding runs under torchrun (torchrun --nproc-per-node N ...): no process group is "
            f"initialised and the launcher's environment is missing ({missing})"
        )
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"torchrun's environment is inconsistent: RANK {rank} of WORLD_SIZE {world}")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        if not cuda:
            raise InputError("the nccl backend needs CUDA; on CPUs sharded decoding uses gloo")
        if not 0 <= local < torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local} has no GPU of its own ({torch.cuda.device_count()} CUDA devices): "
                f"run at most {torch.cuda.device_count()} processes per node"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    atexit.register(_destroy)
    return dist.get_rank(), dist.get_world_size()


def _destroy() -> None:
    """Tear the group this module set up down before the interpreter does (NCCL asks for it; a rank
    leaving on an error then exits with its own code instead of an abort in the backend's threads)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device() -> torch.device:
    """The device this rank's model belongs on: its own GPU (``LOCAL_RANK``) under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# bands
# ---------------------------------------------------------------------------------------------
def bands(height: int, width: int, ranks: int, halo: int) -> list[Tile]:
    """One band per rank of a ``height`` x ``width`` latent frame: the cores split the rows as evenly
    as they can (the first ``height % ranks`` one row taller), each region reaches ``halo`` rows
    beyond its core, clamped to the frame, and spans the whole width."""
    if height < ranks:
        raise InputError(
            f"a latent frame {height} row{'s' * (height != 1)} tall cannot be split across {ranks} ranks (each "
            f"decodes at least one row of its own): give frames at least {ranks} latent rows tall, or run fewer ranks"
        )
    base, extra = divmod(height, ranks)
    tiles, at = [], 0
    for k in range(ranks):
        rows = base + (k < extra)
        core = (at, at + rows, 0, width)
        tiles.append(Tile(core, (max(0, at - halo), min(height, at + rows + halo), 0, width)))
        at += rows
    return tiles


# ---------------------------------------------------------------------------------------------
# agreeing on the input before any work
# ---------------------------------------------------------------------------------------------
WHAT = {
    "call": "which call they make",
    "world": "the number of ranks",
    "gather": "where frames are gathered",
    "model": "the model's weights",
    "shape": "the latents' shape",
    "latents": "the latents' values",
    "chunk": "the chunk",
    "options": "the stream options",
    "final": "whether the push is final",
}


def digest(value: Any) -> str:
    """A short, exact description of an input, equal on two ranks only if the inputs are."""
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h = hashlib.blake2b(t.view(torch.uint8).numpy().tobytes(), digest_size=8).hexdigest()
        return f"{str(value.dtype).removeprefix('torch.')}{tuple(value.shape)}:{h}"
    if isinstance(value, np.ndarray):
        return digest(torch.from_numpy(np.ascontiguousarray(value)))
    if isinstance(value, torch.Generator):
        return "generator:" + digest(value.get_state())
    if isinstance(value, list | tuple):
        return "[" + ",".join(digest(v) for v in value) + "]"
    return repr(value)[:80]


def _describe_values(values: dict[int, str]) -> str:
    groups: dict[str, list[int]] = {}
    for rank, value in values.items():
        groups.setdefault(value, []).append(rank)
    parts = []
    for value, ranks in groups.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks))
        parts.append(f"{who} {value[:60]}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# the decoder
# ---------------------------------------------------------------------------------------------
class ShardedDecoder(Decoder):
    """``inner`` (a torch model) decoding every frame across the ranks of ``group``, one band each."""

    def __init__(self, inner: Decoder, *, group: Any = None, gather: str = "all") -> None:
        if not isinstance(inner, TorchDecoder):
            kind = getattr(inner, "backend", type(inner).__name__)
            raise InputError(
                f"sharded decoding runs torch models (a checkpoint or student directory), not a {kind} "
                f"{type(inner).__name__}: load the model itself to shard it"
            )
        if gather not in GATHER:
            raise InputError(f"{{gather}} must be one of {', '.join(GATHER)}, got {gather!r}", "gather")
        if group is None:
            init_distributed()
        elif not dist.is_initialized():
            raise InputError("a process group was given, but torch.distributed is not initialised")
        self.inner, self.group, self.gather = inner, group, gather
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if self.rank < 0:
            raise InputError("this process is not a member of the process group it was given")
        nccl = dist.get_backend(group) == "nccl"  # NCCL moves CUDA tensors; gloo here moves CPU tensors
        self.comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.adopt_facts(inner)
        error = None
        try:
            self.plan: TilePlan = plan_tiling(inner.model)
            self.halo = self.plan.halo
        except TilingError as e:
            error = f"this model cannot be split exactly: {e}"
        device = inner.device
        if error is None and nccl and device.type == "cuda" and device != self.comm:
            error = (
                f"rank {self.rank}'s model is on {device}, but the rank runs on {self.comm} (LOCAL_RANK): "
                "call init_distributed() before loading the model, or load it on rank_device()"
            )
        self.agree("sharded", {"gather": gather, "model": inner.fingerprint}, error)

    # facts ----------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint}/band{self.rank}of{self.world}"

    @property
    def gets_frames(self) -> bool:
        """Whether this rank's calls return the frames (every rank, or rank 0 only)."""
        return self.gather == "all" or self.rank == 0

    def bands(self, height: int, width: int) -> list[Tile]:
        """Every rank's band of a latent frame of ``height`` x ``width`` (index: group rank)."""
        return bands(height, width, self.world, self.halo[0])

    def band(self, height: int, width: int) -> Tile:
        """This rank's band."""
        return self.bands(height, width)[self.rank]

    def check_geometry(self, batch: int, height: int, width: int) -> None:
        self.bands(height, width)
        self.inner.check_geometry(batch, *self.band(height, width).size)

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        """This rank's stream state: its band's (a saved state belongs to its rank, see ``fingerprint``)."""
        return self.inner.state_shapes(batch, *self.band(height, width).size)

    def check_memory(self, shape: tuple[int, ...], chunk: int | None = None) -> None:
        b, c, t, h, w = shape
        self.inner.check_memory((b, c, t, *self.band(h, w).size), chunk)

    def describe(self) -> dict[str, Any]:
        return {
            **self.inner.describe(),
            "sharding": {"ranks": self.world, "rank": self.rank, "halo": list(self.halo), "gather": self.gather},
        }

    def sharding_report(self, height: int, width: int) -> dict[str, Any]:
        """The bands of a latent frame and the compute the halos cost (positions decoded over the frame's)."""
        tiles = self.bands(height, width)
        return {
            "ranks": self.world,
            "halo": self.halo[0],
            "cores": [list(t.core[:2]) for t in tiles],
            "regions": [list(t.region[:2]) for t in tiles],
            "redundancy": redundancy(height, width, tiles),
            "largest_share": max(t.size[0] for t in tiles) / height,  # of the frame one rank decodes
            "frame_wide": [name for name, _ in self.plan.mixing],
        }

    # collectives ----------------------------------------------------------------------------
    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        device = self.comm
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        n = max(int(s) for s in sizes)
        buf = torch.zeros(n, dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(device)
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(bufs, buf, group=self.group)
        return [bytes(b[: int(s)].cpu().numpy()) for b, s in zip(bufs, sizes, strict=True)]

    def agree(self, call: str, facts: dict[str, Any], error: str | None = None) -> None:
        """Refuse, on every rank alike, a call some rank found bad input in or whose input differs
        between ranks (one line, before any work)."""
        mine = {"call": call, "world": self.world, **{k: str(v) for k, v in facts.items()}}
        texts = self._all_gather_bytes(json.dumps({"facts": mine, "error": error}).encode())
        seen = [json.loads(t) for t in texts]
        errors = {r: s["error"] for r, s in enumerate(seen) if s["error"]}
        if errors:
            messages = set(errors.values())
            if len(messages) == 1 and len(errors) == self.world:
                raise InputError(next(iter(messages)))
            r, message = next(iter(errors.items()))
            raise InputError(f"on rank {r} of {self.world}: {message}")
        for key in mine:
            values = {r: s["facts"].get(key, "?") for r, s in enumerate(seen)}
            if len(set(values.values())) > 1:
                raise InputError(
                    f"the ranks disagree on {WHAT.get(key, key)} ({_describe_values(values)}): every rank must "
                    "make the same call with the same model, latents and options"
                )

    def _gather_rows(self, x: Tensor, rows: list[int], to_all: bool) -> Tensor | None:
        """Every rank's ``x`` (rank k's has ``rows[k]`` rows on axis -2) stacked along the rows, on
        every rank (``to_all``) or on group rank 0 (None elsewhere)."""
        device = self.comm
        n = max(rows)
        sent = x.to(device).contiguous()
        if sent.shape[-2] < n:
            pad = sent.new_zeros((*sent.shape[:-2], n - sent.shape[-2], sent.shape[-1]))
            sent = torch.cat([sent, pad], dim=-2)
        if to_all:
            parts = [torch.empty_like(sent) for _ in range(self.world)]
            dist.all_gather(parts, sent, group=self.group)
        else:
            root = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            parts = [torch.empty_like(sent) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(sent, parts, dst=root, group=self.group)
            if parts is None:
                return None
        return torch.cat([p[..., :r, :] for p, r in zip(parts, rows, strict=True)], dim=-2).to(x.device)

    def exchange(self, height: int, width: int) -> Any:
        """The ``exchange`` of ``TilePlan.hooks`` for a frame of ``height`` x ``width``: every frame-wide
        module's context from every rank's core, resolved."""
        tiles = self.bands(height, width)

        def resolve(index: int, module: nn.Module, captured: Captured) -> Any:
            partial = captured.partial
            if module.frame_context == "sum":
                total = partial.to(self.comm, copy=True)
                dist.all_reduce(total, group=self.group)
                return module.frame_resolve(total.to(partial.device))
            sy = Fraction(captured.frame[0], height)  # the module's scale: its rows per latent row
            rows = [int(t.core[1] * sy) - int(t.core[0] * sy) for t in tiles]
            assert rows[self.rank] == partial.shape[-2], (rows, tuple(partial.shape))
            frame = self._gather_rows(partial, rows, to_all=True)
            assert frame is not None
            return module.frame_resolve(frame)

        return resolve

    # decoding -------------------------------------------------------------------------------
    def band_options(self, options: dict[str, Any], batch: int, height: int, width: int) -> dict[str, Any]:
        """This rank's stream options: a noise-injecting decoder's maps drawn for the whole frame (as
        single-process decoding draws them, from the same seed on every rank), cropped to the band."""
        if not self.noise_scales:
            return dict(options)
        drawn = conditioning_inputs(
            self.step_inputs, self.noise_scales, batch, height, width,
            default_timestep=self.default_timestep, **options,
        )["noise"]  # fmt: skip
        rest = {k: v for k, v in options.items() if k not in ("seed", "generator", "noise")}
        y0, y1, _, _ = self.band(height, width).region
        crops = []
        for s, m in zip(self.noise_scales, drawn, strict=True):
            lo, hi = y0 * s, y1 * s
            if lo.denominator != 1 or hi.denominator != 1:
                raise InputError(f"band rows {y0}..{y1} do not fall on the grid of a noise map (scale {s})")
            crops.append(m[int(lo) : int(hi)].cpu())
        return {**rest, "noise": tuple(crops)}

    def _options_facts(self, options: dict[str, Any]) -> str:
        return ";".join(f"{k}={digest(v)}" for k, v in sorted(options.items()))

    def stream(self, **options: Any) -> ShardedStream:
        """A new stream over the ranks (collective: every rank opens it with the same options)."""
        error = None
        facts = {"model": self.inner.fingerprint, "gather": self.gather, "options": self._options_facts(options)}
        try:
            self.inner.stream(**options)  # refuses options the decoder does not take, before any step
        except InputError as e:
            error = str(e)
        self.agree("stream", facts, error)
        return ShardedStream(self, options)

    def iter_decode(self, latents: Tensor | np.ndarray, chunk: int | None = None, **options: Any) -> Iterator[Tensor]:
        """Frames of the whole clip chunk by chunk (on every rank or on rank 0, see ``gather``); the
        input is checked, and compared between the ranks, before any work."""
        facts: dict[str, Any] = {"model": self.inner.fingerprint, "gather": self.gather, "chunk": chunk}
        error = None
        try:
            latents = as_tensor(latents)
            facts["shape"] = f"{tuple(latents.shape)} {str(latents.dtype).removeprefix('torch.')}"
            check_latents(self, latents)
            b, _, _, h, w = latents.shape
            self.check_geometry(b, h, w)
            facts["latents"] = digest(latents)
            facts["options"] = self._options_facts(options)
            self.inner.stream(**options)
        except InputError as e:
            error = str(e)
        self.agree("decode", facts, error)
        return iter_decode(self, latents, chunk, **options)


class _BandStream(StreamingDecoder):
    """One rank's band of a sharded stream: the model's own stream, whose frame-wide modules
    resolve their context from every rank's core (``ShardedDecoder.exchange``)."""

    def __init__(self, decoder: ShardedDecoder, options: dict[str, Any], tile: Tile, frame: tuple[int, int]) -> None:
        inner = decoder.inner
        assert isinstance(inner, TorchDecoder)
        super().__init__(inner.model, source=inner, options=options)
        self.plan, self.tile, self.frame = decoder.plan, tile, frame
        self.resolve = decoder.exchange(*frame)

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        with self.plan.hooks(self.tile, self.frame, {}, exchange=self.resolve):
            return super()._step(latents, first)


class ShardedStream(Stream):
    """A stream whose every step decodes this rank's band and gathers the frames' rows."""

    source: ShardedDecoder

    def __init__(self, source: ShardedDecoder, options: dict[str, Any]) -> None:
        super().__init__(source)
        self.options = options
        self.band: _BandStream | None = None
        self.tiles: list[Tile] = []

    def reset(self) -> None:
        super().reset()
        self.band, self.tiles = None, []

    def push(self, latents: Tensor | np.ndarray, final: bool = False) -> Tensor:
        """As ``Stream.push``, collective: every rank pushes the same chunk (compared before any work)."""
        src = self.source
        facts: dict[str, Any] = {"final": bool(final)}
        error = None
        try:
            latents = as_tensor(latents)
            facts["shape"] = f"{tuple(latents.shape)} {str(latents.dtype).removeprefix('torch.')}"
            latents = self.check_push(latents)
            facts["latents"] = digest(latents)
        except InputError as e:
            error = str(e)
        src.agree("push", facts, error)
        return super().push(latents, final)

    def close(self) -> Tensor:
        error = None if self.started else "this stream has not started: there is nothing to close"
        self.source.agree("close", {}, error)
        return super().close()

    def _start(self, batch: int, height: int, width: int) -> None:
        d = self.source
        self.tiles = d.bands(height, width)
        tile = self.tiles[d.rank]
        self.band = _BandStream(d, d.band_options(self.options, batch, height, width), tile, (height, width))
        self.band._start(batch, *tile.size)
        self.band.geometry = (batch, *tile.size)

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        d, band = self.source, self.band
        assert band is not None
        tile = self.tiles[d.rank]
        band.position, band.end = self.position, self.end  # the clock of a decoder with latency
        y0, y1, _, _ = tile.region
        frames = band._step(latents[..., y0:y1, :], first).float()
        s = d.spatial_factor
        cy0, cy1, _, _ = tile.core_in_region()
        core = frames[..., cy0 * s : cy1 * s, :]
        rows = [(t.core[1] - t.core[0]) * s for t in self.tiles]
        whole = d._gather_rows(core, rows, to_all=d.gather == "all")
        if whole is None:  # gather="rank0", on another rank: no rows, the frames still counted
            return frames.new_empty((*frames.shape[:3], 0, frames.shape[-1]), device="cpu")
        return whole.cpu()

    def _flush(self) -> Tensor:
        b, h, w = self.geometry  # type: ignore[misc]
        s = self.source.spatial_factor
        return torch.zeros(b, 3, 0, h * s if self.source.gets_frames else 0, w * s)

    def _state(self) -> tuple[list[str], list[Tensor]]:
        assert self.band is not None
        names, tensors = self.band._state()
        return [f"band{self.source.rank}/{n}" for n in names], tensors

    def _set_state(self, tensors: list[Tensor]) -> None:
        assert self.band is not None
        self.band._set_state(tensors)


def sharded(decoder: Decoder, *, group: Any = None, gather: str = "all") -> ShardedDecoder:
    """``decoder`` (a torch model) decoding every frame across the ranks of ``group`` (default: the
    default process group, initialised from torchrun's environment if it is not yet); frames come
    back on every rank (``gather="all"``) or on rank 0 (``"rank0"``). Collective: every rank calls it."""
    if isinstance(decoder, ShardedDecoder):
        decoder = decoder.inner
    return ShardedDecoder(decoder, group=group, gather=gather)
