"""The streaming contract every decoder in flashvaed follows, and the one loop that drives it.

A decoder is a pure step function, ``frames, state = model.decode_step(latents, state)``.
``state`` is an ordered tuple of tensors whose shapes are fixed for a given (batch, h, w) and are
described up front by ``StateSpec`` records, so that the same model can be exported with its state
as graph inputs and outputs, run for many streams at once, and tested chunk by chunk.

Chunk 0 is a single latent frame decoded with ``first=True`` (the causal teachers' first-chunk
rule: the temporal upsamplers pass it through, giving one output frame); every later chunk holds
any k >= 1 latent frames and gives ``temporal_factor * k`` frames. Concatenating the chunks'
outputs equals decoding the whole clip in one step.

A decoder with ``latency`` > 0 (a non-causal one, like LTX-Video's) runs on a clock instead: every
step maps k latent frames to ``temporal_factor * k`` output positions, and the step is told the
stream ``position`` (latent frames before this chunk) and, once known, its ``end`` (the clip's
length), from which each layer replaces frames before the clip's start and after its end by the
clip's first and last frame (upstream's replicate padding). Output positions before
``output_offset`` and past the clip are dropped here. ``push`` may therefore return no frames yet;
``close()`` pushes ``latency`` more latent frames (their values are never read) and returns the
rest.

``Stream`` is the loop every backend shares (torch models here, ONNX Runtime and TensorRT engines
in ``flashvaed.engines``): input checks, the first-chunk split, splitting pushes into the chunk
sizes a backend accepts, padding a clip's short last chunk, saved states. A backend implements
how a stream starts and one step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: the last ``frames`` input frames of the causal conv called ``name``.

    ``history`` says what stands before the clip's first frame: ``zeros`` (the zero state is that
    history) or ``replicate`` (the first frame repeated: the first chunk's step puts it there itself,
    so the zero state a stream starts from is only a placeholder of the right shape).
    """

    name: str
    channels: int
    frames: int
    scale: Fraction  # spatial size of the tensor relative to the model's input grid
    history: str = "zeros"

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        return (batch, self.channels, self.frames, int(height * self.scale), int(width * self.scale))


def zero_state(
    specs: Sequence[StateSpec],
    batch: int,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> State:
    """The state before any frame was seen: zeros, which is what causal zero padding means; in
    ``memory_format``, the layout the decoder's steps keep it in (a first step then converts none)."""
    return tuple(
        torch.empty(spec.shape(batch, height, width), dtype=dtype, device=device, memory_format=memory_format).zero_()
        for spec in specs
    )


def state_nbytes(specs: Sequence[StateSpec], batch: int, height: int, width: int, itemsize: int) -> int:
    total = 0
    for spec in specs:
        n = 1
        for d in spec.shape(batch, height, width):
            n *= d
        total += n * itemsize
    return total


class StreamingBlock(nn.Module):
    """A module that takes its slice of the state and returns its new slice.

    Subclasses set ``num_states`` (a structural constant) and implement ``state_specs`` and
    ``forward(x, state, first) -> (y, new_state)``.
    """

    num_states: int = 0

    def state_specs(self, name: str, scale: Fraction) -> list[StateSpec]:
        return []


def run_blocks(
    blocks: Sequence[StreamingBlock],
    x: Tensor,
    state: State,
    first: bool,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, State]:
    """Run blocks in order, handing each the next ``num_states`` tensors of ``state`` (and its
    input through ``prepare``: a decoder that runs channels-last converts there)."""
    new_state: list[Tensor] = []
    i = 0
    for block in blocks:
        x, s = block(x if prepare is None else prepare(x), state[i : i + block.num_states], first)
        new_state.extend(s)
        i += block.num_states
    return x, tuple(new_state)


def blocks_state_specs(blocks: Sequence[StreamingBlock], name: str, scale: Fraction) -> list[StateSpec]:
    specs: list[StateSpec] = []
    for i, block in enumerate(blocks):
        specs.extend(block.state_specs(f"{name}.{i}", scale))
    return specs


@dataclass(frozen=True)
class ShapeRange:
    """A dimension's range (chunk length, batch, latent size); min == max is static.

    Engines take min/opt/max (TensorRT profiles); ``opt`` is also the default chunk length.
    """

    min: int
    opt: int
    max: int

    @property
    def static(self) -> bool:
        return self.min == self.max

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max

    def describe(self, unit: str = "") -> str:
        return f"{self.min}{unit}" if self.static else f"{self.min}..{self.max}{unit}"

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> ShapeRange:
        """The range a manifest states: whole numbers only (16.5 or "7" are not truncated to one)."""
        values = [d["min"], d["opt"], d["max"]]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise ValueError(f"a shape range holds whole numbers, got {values!r:.80}")
        return cls(*values)

    @classmethod
    def parse(cls, text: str | int, what: str, multiple: int = 1) -> ShapeRange:
        """``N`` (static), ``MIN:MAX`` (opt = MIN) or ``MIN:OPT:MAX``; values >= 1, multiples of ``multiple``."""
        parts = str(text).split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"{what} must be N, MIN:MAX or MIN:OPT:MAX, got {text!r}") from None
        if len(values) == 1:
            values *= 3
        elif len(values) == 2:
            values = [values[0], values[0], values[1]]
        elif len(values) != 3:
            raise InputError(f"{what} must be N, MIN:MAX or MIN:OPT:MAX, got {text!r}")
        lo, opt, hi = values
        if lo < 1 or not lo <= opt <= hi:
            raise InputError(f"{what} range {text!r} must satisfy 1 <= MIN <= OPT <= MAX")
        bad = [v for v in values if v % multiple]
        if bad:
            raise InputError(f"{what} must be a multiple of {multiple}, got {bad[0]}")
        return cls(lo // multiple, opt // multiple, hi // multiple)


ANY_CHUNK = ShapeRange(1, 2, 1 << 30)  # torch models take any chunk; 2 latent frames by default


class StreamSource(Protocol):
    """What a stream needs to know of the decoder it runs: torch models and engines alike."""

    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    latency: int  # latent frames a step holds back (0: causal, frames come out at once)
    output_offset: int  # with latency: output positions before the clip's first frame
    chunk_range: ShapeRange

    @property
    def fingerprint(self) -> str: ...

    def check_geometry(self, batch: int, height: int, width: int) -> None: ...

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]: ...

    def stream(self, **options: Any) -> Stream: ...


def conditioning_inputs(
    step_inputs: Sequence[str],
    noise_scales: Sequence[Fraction],
    batch: int | None,
    height: int,
    width: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    default_timestep: float | None = None,
    timestep: float | Sequence[float] | Tensor | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    noise: Sequence[Tensor] | None = None,
    **unknown: Any,
) -> dict[str, Any]:
    """The per-stream inputs of a conditioned decoder (LTX-Video), for torch models and engines alike.

    ``timestep``: (B,) float32, one value for all samples or one each (``default_timestep`` if
    none). ``noise``: one (h*s, w*s) map per entry of ``noise_scales``, drawn once per stream from a
    CPU generator seeded with ``seed``, in order (upstream's draw order after ``torch.manual_seed``),
    or from ``generator`` (advancing it: the diffusers drop-in draws from the global generator), or
    given as ``noise`` (the maps themselves: a tile of a frame takes its part of the frame's maps).
    ``batch=None`` checks the options only.
    """
    if unknown:
        raise InputError(
            f"this decoder takes the options timestep, seed, generator and noise, not {', '.join(sorted(unknown))}"
        )
    if noise is not None and not noise_scales:
        raise InputError("this decoder injects no noise: {noise} does not apply", "noise")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"{{generator}} must be a torch.Generator, got {type(generator).__name__}", "generator")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InputError(f"{{seed}} must be a non-negative integer, got {seed!r}", "seed")
    inputs: dict[str, Any] = {}
    if "timestep" in step_inputs:
        t = torch.as_tensor(default_timestep if timestep is None else timestep, dtype=torch.float32).flatten()
        if t.numel() == 1 and batch is not None:
            t = t.expand(batch)
        if (batch is not None and t.numel() != batch) or not torch.isfinite(t).all():
            raise InputError(f"{{timestep}} must be one finite number or one per sample, got {timestep!r}", "timestep")
        inputs["timestep"] = t.to(device).clone()
    elif timestep is not None:
        raise InputError("this decoder is not timestep-conditioned: {timestep} does not apply", "timestep")
    if noise_scales and batch is not None:
        shapes = [(int(height * s), int(width * s)) for s in noise_scales]
        if noise is not None:
            maps = list(noise)
            if [tuple(m.shape) for m in maps] != shapes:
                got = [tuple(m.shape) for m in maps]
                raise InputError(f"{{noise}} must be maps of shapes {shapes}, got {got}"[:300], "noise")
        else:
            g = generator if generator is not None else torch.Generator().manual_seed(seed)
            maps = [torch.randn(*shape, generator=g, device=g.device) for shape in shapes]
        inputs["noise"] = tuple(m.to(device=device, dtype=dtype) for m in maps)
    return inputs


def clocked(source: Any) -> bool:
    """Whether a decoder runs on a clock (position-indexed output, see the module docstring): one with
    latency, or a causal one whose first output positions are not frames (an LTX-style causal student)."""
    return bool(getattr(source, "latency", 0) or getattr(source, "output_offset", 0))


def mix_decode_noise(latents: Tensor, scale: float, seed: int) -> Tensor:
    """Decode-time noise on normalised latents, ``latents * (1 - s) + noise * s`` (LTX-Video's pipeline).

    The noise is drawn frame by frame (so a stream can draw it chunk by chunk) from its own CPU
    generator, seeded ``seed + 1`` so that it never repeats the decoder's noise maps (seeded ``seed``).
    """
    if not 0.0 <= scale <= 1.0:
        raise InputError(f"{{decode_noise_scale}} must be in [0, 1], got {scale}", "decode_noise_scale")
    if scale == 0.0:
        return latents
    g = torch.Generator().manual_seed(seed + 1)
    b, c, t, h, w = latents.shape
    noise = torch.stack([torch.randn(b, c, h, w, generator=g) for _ in range(t)], dim=2)
    return latents * (1 - scale) + noise.to(latents.dtype) * scale


def check_latents(model: Any, latents: Tensor) -> None:
    """Refuse latents the model cannot decode, naming the problem in one line."""
    if latents.dim() != 5:
        raise InputError(
            f"latents must have 5 dimensions (batch, {model.latent_channels}, frames, height, width), "
            f"got shape {tuple(latents.shape)}"
        )
    b, c, t, h, w = latents.shape
    if c != model.latent_channels:
        raise InputError(
            f"latents have {c} channels but the model reads {model.latent_channels} "
            f"(shape {tuple(latents.shape)}; expected (batch, {model.latent_channels}, frames, h, w))"
        )
    if b == 0:
        raise InputError("latents hold an empty batch (batch size 0)")
    if t == 0:
        raise InputError("latents hold zero frames")
    if h == 0 or w == 0:
        raise InputError(f"latents have an empty spatial size {h}x{w}")
    if not latents.is_floating_point():
        raise InputError(f"latents must be floating point, got {latents.dtype}")
    if not torch.isfinite(latents).all():
        raise InputError("latents contain NaN or Inf values")


def as_tensor(latents: Tensor | np.ndarray) -> Tensor:
    if isinstance(latents, np.ndarray):
        return torch.from_numpy(latents)
    if not isinstance(latents, Tensor):
        raise InputError(f"latents must be a torch tensor or numpy array, got {type(latents).__name__}")
    return latents


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the weights (names, shapes, fp32 values): states and engines name their model by it."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class StreamState:
    """A stream's state lifted out of its session: resume it later, in another stream of the same model."""

    fingerprint: str  # the model it belongs to
    geometry: tuple[int, int, int]  # batch, latent height, latent width
    names: list[str]
    tensors: list[Tensor]
    position: int = 0  # latent frames the stream had taken (decoders with latency)


class Stream:
    """One stream's session: push latent chunks in order, get their frames back.

    Subclasses implement ``_start`` (allocate the state for a batch and latent size) and
    ``_step`` (one chunk through the decoder), and ``_state``/``_set_state`` for saved states.
    """

    def __init__(self, source: StreamSource) -> None:
        self.source = source
        self.geometry: tuple[int, int, int] | None = None
        self.position = 0  # latent frames taken so far
        self.end: int | None = None  # the clip's length in latent frames, once known
        self.chunk = 0  # the largest chunk stepped so far: the flush steps in chunks of its size

    @property
    def started(self) -> bool:
        return self.geometry is not None

    def reset(self) -> None:
        self.geometry = None
        self.position, self.end, self.chunk = 0, None, 0

    def push(self, latents: Tensor | np.ndarray, final: bool = False) -> Tensor:
        """Decode the next latent frames of this stream (the first push may hold several).

        Pushes are split into chunks the backend accepts. A remainder shorter than its minimum
        chunk is refused unless ``final`` (the stream ends there): it is then padded by repeating
        its last latent frame and the extra frames are dropped, which is exact for causal decoders.
        """
        latents = self.check_push(latents)
        src = self.source
        b, _, _, h, w = latents.shape
        outputs: list[Tensor] = []
        if self.geometry is None:
            self._start(b, h, w)
            self.geometry = (b, h, w)
            if final and clocked(src):
                self.end = latents.shape[2]
            outputs.append(self._advance(latents[:, :, :1], first=True))
            latents = latents[:, :, 1:]
        elif final and clocked(src):
            self.end = self.position + latents.shape[2]
        rng = src.chunk_range
        while latents.shape[2]:
            n = min(latents.shape[2], rng.max)
            piece, latents = latents[:, :, :n], latents[:, :, n:]
            if n >= rng.min:
                outputs.append(self._advance(piece, first=False))
                continue
            if not final:
                raise InputError(
                    f"a chunk of {n} latent frames is below this engine's minimum of {rng.min} "
                    f"(built for chunks {rng.describe()}); push more frames or pass final=True"
                )
            # pad by repeating the last latent frame: exact for causal decoders, and a clocked decoder
            # never reads frames past the end it was told
            pad = piece[:, :, -1:].expand(-1, -1, rng.min - n, -1, -1)
            frames = self._advance(torch.cat([piece, pad], dim=2), first=False)
            outputs.append(frames if clocked(src) else frames[:, :, : n * src.temporal_factor])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

    def check_push(self, latents: Tensor | np.ndarray) -> Tensor:
        """The latents of a push as a tensor, refused if this stream cannot take them."""
        latents = as_tensor(latents)
        check_latents(self.source, latents)
        b, _, _, h, w = latents.shape
        if self.geometry is None:
            self.source.check_geometry(b, h, w)
        elif self.geometry != (b, h, w):
            raise InputError(f"chunk has batch/size {(b, h, w)} but this stream started with {self.geometry}")
        if self.end is not None:
            raise InputError("this stream was pushed its final chunk; close() it and start a new one")
        return latents

    def clip_positions(self, positions: int) -> tuple[int, int]:
        """The output positions [lo, hi) of the next step (``positions`` of them) that are frames of the
        clip: all of them for a decoder without a clock; a clocked one drops its warm-up and flush."""
        src = self.source
        if not clocked(src):
            return 0, positions
        tf = src.temporal_factor
        start = tf * self.position - src.output_offset  # the clip's frame index of this step's first position
        lo = min(max(0, -start), positions)
        hi = positions if self.end is None else max(lo, min(positions, 1 + tf * (self.end - 1) - start))
        return lo, hi

    def _advance(self, latents: Tensor, first: bool) -> Tensor:
        """One step; for a clocked decoder, the output positions of the clip only."""
        src = self.source
        n = latents.shape[2]
        self.chunk = max(self.chunk, n)
        frames = self._step(latents, first)
        if clocked(src):
            lo, hi = self.clip_positions(src.temporal_factor * n)
            frames = frames[:, :, lo:hi]
        self.position += n
        return frames

    def close(self) -> Tensor:
        """End the stream and return the frames it still holds back (none for causal decoders)."""
        if self.geometry is None:
            raise InputError("this stream has not started: there is nothing to close")
        src = self.source
        if not src.latency:
            frames = self._flush()
        else:
            if self.end is None:
                self.end = self.position
            b, h, w = self.geometry
            rng = src.chunk_range
            remaining = src.latency - (self.position - self.end)
            outputs = [self._flush()]
            size = min(max(self.chunk, rng.opt, rng.min), rng.max)  # as large as the stream's steps, no larger
            while remaining > 0:
                n = min(max(remaining, rng.min), size)
                outputs.append(self._advance(torch.zeros(b, src.latent_channels, n, h, w), first=False))
                remaining -= n
            frames = torch.cat(outputs, dim=2)
        self.reset()
        return frames

    def save_state(self) -> StreamState:
        if self.geometry is None:
            raise InputError("this stream has not started: there is no state to save")
        if self.end is not None:
            raise InputError("this stream was pushed its final chunk: close() it instead of saving its state")
        names, tensors = self._state()
        return StreamState(
            self.source.fingerprint, self.geometry, names, [t.clone() for t in tensors], position=self.position
        )

    def load_state(self, state: StreamState) -> None:
        """Continue from a saved state; refused if it belongs to another model or has other shapes."""
        src = self.source
        if state.fingerprint != src.fingerprint:
            raise InputError(
                f"state belongs to model {state.fingerprint}, but this decoder runs model {src.fingerprint}"
            )
        src.check_geometry(*state.geometry)
        expected = src.state_shapes(*state.geometry)
        if len(state.tensors) != len(expected):
            raise InputError(f"state has {len(state.tensors)} tensors, this model needs {len(expected)}")
        for name, t, shape in zip(state.names, state.tensors, expected, strict=True):
            if tuple(t.shape) != tuple(shape):
                raise InputError(f"state tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self._start(*state.geometry)
        self.geometry = state.geometry
        self.position, self.end = state.position, None
        self._set_state(state.tensors)

    # backends -----------------------------------------------------------------------------------
    def _start(self, batch: int, height: int, width: int) -> None:
        raise NotImplementedError

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        raise NotImplementedError

    def _flush(self) -> Tensor:
        b, h, w = self.geometry  # type: ignore[misc]
        s = self.source.spatial_factor
        return torch.zeros(b, 3, 0, h * s, w * s)

    def _state(self) -> tuple[list[str], list[Tensor]]:
        raise NotImplementedError

    def _set_state(self, tensors: list[Tensor]) -> None:
        raise NotImplementedError


class StreamingDecoder(Stream):
    """A torch model's stream. The model stays pure; this object holds its stream's state, so any
    number of streams can share one model.

    Steps run in ``torch.inference_mode`` unless ``inference=False``, which leaves autograd as the
    caller set it (distillation trains through this loop); ``clamp`` is the step's output clamp;
    ``options`` are the model's per-stream options (``model.stream_inputs``: a timestep, a seed),
    turned into its extra step inputs when the stream starts; ``source`` is what the stream
    reports its facts from (default: the model itself; an engine wrapping it).
    """

    def __init__(
        self,
        model: Any,
        *,
        inference: bool = True,
        clamp: bool = True,
        options: dict | None = None,
        source: StreamSource | None = None,
    ) -> None:
        super().__init__(source or model)
        self.model = model
        self.inference, self.clamp, self.options = inference, clamp, dict(options or {})
        model.stream_inputs(None, 1, 1, **self.options)  # refuse bad options before any step (batch unknown)
        self.inputs: dict[str, Any] = {}
        self.state: State | None = None

    def reset(self) -> None:
        super().reset()
        self.state = None

    def _start(self, batch: int, height: int, width: int) -> None:
        from .blocks import state_format

        p = next(self.model.parameters())
        specs = self.model.decoder_state_specs()
        self.state = zero_state(
            specs, batch, height, width, dtype=p.dtype, device=p.device, memory_format=state_format(self.model)
        )
        self.inputs = self.model.stream_inputs(batch, height, width, **self.options)

    def _step(self, latents: Tensor, first: bool) -> Tensor:
        p = next(self.model.parameters())
        clock = {"position": self.position, "end": self.end} if clocked(self.model) else {}
        with torch.inference_mode() if self.inference else nullcontext():
            frames, self.state = self.model.decode_step(
                latents.to(p.device, p.dtype), self.state, first=first, clamp=self.clamp, **self.inputs, **clock
            )
        return frames

    def _state(self) -> tuple[list[str], list[Tensor]]:
        assert self.state is not None
        return [s.name for s in self.model.decoder_state_specs()], [t.cpu() for t in self.state]

    def _set_state(self, tensors: list[Tensor]) -> None:
        p = next(self.model.parameters())
        self.state = tuple(t.to(p.device, p.dtype) for t in tensors)


def chunk_bounds(num_frames: int, chunk: int) -> list[tuple[int, int]]:
    """Latent frame ranges of a clip: [0, 1) first, then ranges of ``chunk`` frames."""
    if chunk < 1:
        raise InputError(f"{{chunk}} must be at least 1 latent frame, got {chunk}", "chunk")
    bounds = [(0, min(1, num_frames))]
    bounds += [(s, min(s + chunk, num_frames)) for s in range(1, num_frames, chunk)]
    return bounds


def check_chunk(source: StreamSource, chunk: int | None) -> int:
    """The chunk a decode steps in (``None``: the source's optimum), refused outside its range."""
    chunk = source.chunk_range.opt if chunk is None else chunk
    if chunk < 1:
        raise InputError(f"{{chunk}} must be at least 1 latent frame, got {chunk}", "chunk")
    if chunk not in source.chunk_range:
        raise InputError(
            f"{{chunk}} {chunk} is outside this engine's chunk range {source.chunk_range.describe()}", "chunk"
        )
    return chunk


def push_clip(stream: Stream, latents: Tensor, chunk: int) -> Iterator[Tensor]:
    """A whole clip through ``stream`` in chunks of ``chunk``, each chunk's frames as it is pushed
    (the first latent frame alone; a decoder with latency flushed at the end)."""
    t = latents.shape[2]
    for start, stop in chunk_bounds(t, chunk):
        yield stream.push(latents[:, :, start:stop], final=stop == t)
    if stream.source.latency:
        yield stream.close()


def iter_decode(
    source: StreamSource, latents: Tensor | np.ndarray, chunk: int | None = None, **options: Any
) -> Iterator[Tensor]:
    """Decode a clip chunk by chunk in a new stream, yielding each chunk's frames (memory stays flat).

    The latents, the chunk (default: the source's optimum), the size and the stream ``options``
    are checked before the first frame is decoded, so a caller can refuse bad input before it
    creates any output.
    """
    latents = as_tensor(latents)
    check_latents(source, latents)
    chunk = check_chunk(source, chunk)
    source.check_geometry(latents.shape[0], latents.shape[3], latents.shape[4])
    stream = source.stream(**options)

    return push_clip(stream, latents, chunk)


def decode(source: StreamSource, latents: Tensor | np.ndarray, chunk: int | None = None, **options: Any) -> Tensor:
    """Decode a whole clip; ``chunk=None`` steps once over everything after the first frame."""
    latents = as_tensor(latents)
    if chunk is None:  # iter_decode checks the latents; here only their length is read
        chunk = max(1, latents.shape[2] - 1) if latents.dim() == 5 else 1
    return torch.cat(list(iter_decode(source, latents, chunk, **options)), dim=2)
