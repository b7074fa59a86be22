"""What the work itself will cost in memory, known before it runs.

Inputs and outputs are budgeted from their declared sizes (``safeload``); the computation in
between is measured here by running it on the ``meta`` device, where tensors have shapes but no
storage: a dispatch mode adds up the bytes of every tensor the step creates and subtracts them
when it is freed, so the peak of live tensors is known for any model, family and size in well
under a second. Attention is the one op whose working memory is not its output: the score and
probability matrices (batch x queries x keys, twice) are added while it runs, as the math
kernel torch uses for these shapes allocates them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..safeload import check_work, work_budget
from .streaming import clocked, zero_state

ATTENTION_COPIES = 2.5  # scores, probabilities and the softmax's temporaries, measured on CPU
LONG = 8  # latent frames: longer clips are measured at LONG/2 and LONG and extrapolated (chunked encoders loop)


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensors alive at once while ops run under this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        transient = 0
        if "scaled_dot_product" in str(func.name()):
            q, k = args[0], args[1]
            transient = int(ATTENTION_COPIES * q.shape[:-1].numel() * k.shape[-2] * max(q.element_size(), 4))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t._is_view():
                continue
            key = id(t)
            ref = self._counted.get(key)
            if ref is not None and ref() is t:  # an in-place op hands its input back
                continue
            nbytes = t.numel() * t.element_size()
            self.live += nbytes
            self._counted[key] = weakref.ref(t)
            weakref.finalize(t, self._free, key, nbytes)
        self.peak = max(self.peak, self.live + transient)
        return out


def peak_bytes(work: Callable[[], Any]) -> int:
    """Peak live bytes of ``work()`` run on meta tensors (its inputs counted by the caller)."""
    mode = LiveBytes()
    with mode, torch.inference_mode():
        result = work()
        del result
    return mode.peak


@contextmanager
def meta_shadow(model: Any) -> Iterator[Any]:
    """The same architecture on the meta device, built from the model's config (no weights)."""
    with torch.device("meta"):
        yield type(model)(model.config)


def nbytes(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def decode_step_bytes(
    model: Any, batch: int, chunk: int, height: int, width: int, dtype: torch.dtype = torch.float32
) -> int:
    """Peak memory of decoding one steady chunk of ``chunk`` latent frames (h x w latents) with
    ``model``: the step's live tensors, its input and the stream state it carries."""
    specs = model.decoder_state_specs()
    z = model.latent_channels
    with meta_shadow(model) as shadow:
        shadow.to(dtype)
        state = zero_state(specs, batch, height, width, dtype=dtype, device="meta")
        inputs = meta_step_inputs(shadow, batch, height, width)
        clock = {"position": 1 << 20} if clocked(shadow) else {}
        latents = torch.zeros(batch, z, chunk, height, width, dtype=dtype)
        step = peak_bytes(lambda: shadow.decode_step(latents, state, first=False, **inputs, **clock))
    carried = sum(nbytes(s.shape(batch, height, width), dtype) for s in specs)
    return step + carried + nbytes(latents.shape, dtype)


def _linear_in_length(once: Callable[[int], int], units: int) -> int:
    """``once(units)`` for a clip ``units`` steps long; past ``LONG`` steps measured at LONG/2 and
    LONG and extended linearly (memory grows linearly in length; a chunked encoder's loop would
    make a meta run of a long clip slow)."""
    if units <= LONG:
        return once(units)
    a, b = once(LONG // 2), once(LONG)
    return b + (b - a) * (units - LONG) // (LONG // 2)


def decode_clip_bytes(
    model: Any, batch: int, frames: int, height: int, width: int, dtype: torch.dtype = torch.float32
) -> int:
    """Peak memory of ``decode_clip`` over a whole clip of ``frames`` latent frames (calibration
    and evaluation decode so; a decoder with latency runs its one-shot form over all of them)."""
    if not clocked(model):
        return decode_step_bytes(model, batch, max(frames - 1, 1), height, width, dtype)

    def once(n: int) -> int:
        with meta_shadow(model) as shadow:
            shadow.to(dtype)
            inputs = meta_step_inputs(shadow, batch, height, width)
            latents = torch.zeros(batch, model.latent_channels, n, height, width, dtype=dtype)
            step = peak_bytes(lambda: shadow.decode_step(latents, (), full=True, **inputs))
        return step + nbytes(latents.shape, dtype)

    return _linear_in_length(once, frames)


def encode_bytes(
    model: Any, batch: int, frames: int, height: int, width: int, dtype: torch.dtype = torch.float32
) -> int:
    """Peak memory of encoding a video (batch, 3, frames, height, width) with ``model``'s encoder,
    with the latents it yields kept (as ``encode`` keeps them)."""
    tf = model.temporal_factor

    def once(steps: int) -> int:
        n = frames if steps == (frames - 1) // tf else 1 + tf * steps
        with meta_shadow(model) as shadow:
            shadow.to(dtype)
            video = torch.zeros(batch, 3, n, height, width, dtype=dtype)
            step = peak_bytes(lambda: [shadow.quant_conv(out) for out in shadow.encoder.iter_encode(video)])
        return step + nbytes(video.shape, dtype)

    return _linear_in_length(once, (frames - 1) // tf)


def clip_bytes(
    models: list[Any], frames: int, height: int, width: int, chunk: int | None, dtype: torch.dtype = torch.float32
) -> int:
    """Peak memory of the work on one clip of ``frames`` x ``height`` x ``width`` pixels: the
    first model encodes it (if it has an encoder), each model decodes its latents in chunks of
    ``chunk`` latent frames (None: the clip in one pass, as ``decode_clip`` runs)."""
    first = models[0]
    tf, sf = first.temporal_factor, first.spatial_factor
    t, h, w = 1 + (frames - 1) // tf, height // sf, width // sf
    peaks = [encode_bytes(first, 1, frames, height, width, dtype)] if first.has_encoder else []
    for model in models:
        if chunk is None:
            peaks.append(decode_clip_bytes(model, 1, t, h, w, dtype))
        else:
            peaks.append(decode_step_bytes(model, 1, max(1, min(chunk, t - 1)), h, w, dtype))
    return max(peaks)


def meta_step_inputs(shadow: Any, batch: int, height: int, width: int) -> dict[str, Any]:
    """Meta tensors of the shapes a conditioned decoder's extra step inputs have (timestep, noise)."""
    make = getattr(shadow.decoder, "stream_inputs", None)
    if make is None:
        return {}
    with torch.device("cpu"):  # callers run under the meta device; these are real, at 1x1: cheap
        real = make(batch, 1, 1, dtype=torch.float32, device="cpu")
    inputs = {k: torch.zeros_like(v, device="meta") if isinstance(v, Tensor) else v for k, v in real.items()}
    if "noise" in real:  # one map per scale of the latent grid
        inputs["noise"] = [torch.zeros(int(height * s), int(width * s), device="meta") for s in shadow.noise_scales]
    return inputs


def check_decode(
    model: Any, shape: tuple[int, ...], chunk: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> None:
    """Refuse, before any output, decoding latents of ``shape`` in chunks of ``chunk`` that would
    not fit in memory; name the chunk when a smaller one would."""
    b, _, t, h, w = shape
    steady = max(1, min(chunk, t - 1))
    need, budget = decode_step_bytes(model, b, steady, h, w, dtype), work_budget(device)
    if need <= budget:
        return
    smaller = steady // 2
    while smaller >= 1 and decode_step_bytes(model, b, smaller, h, w, dtype) > budget:
        smaller //= 2
    if smaller >= 1:
        hint = f"lower {{chunk}} to {smaller}"
    else:
        hint = f"a batch of {b} at {h}x{w} latents is too large here even one latent frame at a time"
    check_work(need, f"decoding latents of shape {tuple(shape)} in chunks of {steady}", hint, "chunk", device=device)
