"""What a decoder costs: parameters, MACs per latent chunk and streaming state, per stage.

MACs are counted by running the step function on the ``meta`` device under PyTorch's flop
counter, so full-size models at full resolution are measured in a second without memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import InputError
from .streaming import clocked, state_nbytes, zero_state
from .tiling import plan_tiling

MAX_FRAME_PIXELS = 1 << 30  # 32768 x 32768: far past any video; MACs beyond overflow int64 counters
MAX_CHUNK = 1 << 10  # latent frames per chunk, as exports allow


@dataclass
class StageCost:
    name: str
    op: str
    params: int
    macs: int  # per steady chunk
    state_bytes: int
    resample: str = "conv"  # the stage's upsample conv: "conv", or "dwsep" (rank r: "dwsep rank r")


@dataclass
class DecoderSummary:
    family: str
    kind: str
    config: dict[str, Any]
    height: int
    width: int
    chunk: int
    dtype: str
    params_total: int
    params_decoder: int
    macs_first: int  # the first chunk: one latent frame -> one frame
    macs_steady: int  # a steady chunk: ``chunk`` latent frames -> temporal_factor * chunk frames
    frames_per_chunk: int
    state_bytes: int
    state_tensors: int
    latency: int = 0  # latent frames a stream holds back (0: causal)
    halo: tuple[int, int] | None = None  # tiling: latent px a tile reads past its core (None: meta)
    frame_wide: list[str] = field(default_factory=list)  # modules that mix a whole frame (tiles share their context)
    stages: list[StageCost] = field(default_factory=list)
    teacher: DecoderSummary | None = None  # for students: the same figures for their teacher

    @property
    def macs_per_frame(self) -> float:
        return self.macs_steady / self.frames_per_chunk

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["macs_per_frame"] = self.macs_per_frame
        if self.teacher is not None:
            d["teacher"] = self.teacher.to_dict()
        return d


def _count_macs(model: torch.nn.Module, latents: torch.Tensor, state: tuple, first: bool) -> dict[str, int]:
    # a clocked decoder's steady step is counted deep inside a clip (every block busy)
    clock = {"position": 0 if first else 1 << 20} if clocked(model) else {}
    with FlopCounterMode(display=False) as counter:
        model.decode_step(latents, state, first=first, **clock)
    # a step can compute nothing (an LTX stream's first step: every position still in its warm-up)
    counts = {"total": sum(counter.get_flop_counts().get("Global", {}).values()) // 2}
    for name, ops in counter.get_flop_counts().items():
        # names are "<TopClass>.<path>"; keep the path under the decoder
        counts[name.partition(".")[2]] = sum(ops.values()) // 2
    return counts


def summarize(
    model: Any, height: int, width: int, chunk: int = 1, dtype: torch.dtype = torch.float32
) -> DecoderSummary:
    """Cost of decoding (height x width pixels) with ``model``, in chunks of ``chunk`` latents."""
    sf = model.spatial_factor
    if height <= 0 or width <= 0 or height % sf or width % sf:
        raise InputError(
            f"{{height}} and {{width}} must be positive multiples of {sf}, got {height}x{width}", "height", "width"
        )
    if height * width > MAX_FRAME_PIXELS:
        raise InputError(
            f"{{height}} x {{width}} {height}x{width} is {height * width / 1e9:.1f} gigapixels a frame; sizes up to "
            f"{MAX_FRAME_PIXELS / 1e9:.1f} gigapixels (32768x32768) are reported",
            "height",
            "width",
        )
    if not 1 <= chunk <= MAX_CHUNK:
        raise InputError(f"{{chunk}} must be between 1 and {MAX_CHUNK} latent frames, got {chunk}", "chunk")
    h, w = height // sf, width // sf
    specs = model.decoder_state_specs()
    with torch.device("meta"):
        shadow = type(model)(model.config)
        state = zero_state(specs, 1, h, w, device="meta")
        first = _count_macs(shadow, torch.zeros(1, model.latent_channels, 1, h, w), state, True)
        steady = _count_macs(shadow, torch.zeros(1, model.latent_channels, chunk, h, w), state, False)
    plan = None if next(model.parameters()).is_meta else plan_tiling(model)  # the probe decode needs weights
    itemsize = torch.empty((), dtype=dtype).element_size()
    ops = model.decoder.stage_ops()
    layouts = getattr(getattr(model.config, "layout", None), "stages", {})  # a student's (a teacher's convs are dense)
    stages = []
    for name, _, block in model.decoder.stages():
        owned = [s for s in specs if s.name == name or s.name.startswith(name + ".")]
        st = layouts.get(name)
        resample = "conv" if st is None else st.resample_conv
        if st is not None and st.resample_rank > 1:
            resample += f" rank {st.resample_rank}"
        stages.append(
            StageCost(
                name=name,
                op=ops[name],
                params=sum(p.numel() for p in block.parameters()),
                macs=steady.get(name, 0),
                state_bytes=state_nbytes(owned, 1, h, w, itemsize),
                resample=resample,
            )
        )
    return DecoderSummary(
        family=model.family,
        kind=model.kind,
        config=model.config.to_dict(),
        height=height,
        width=width,
        chunk=chunk,
        dtype=str(dtype).removeprefix("torch."),
        params_total=sum(p.numel() for p in model.parameters()),
        params_decoder=sum(p.numel() for p in model.decoder.parameters())
        + sum(p.numel() for p in model.post_quant_conv.parameters()),
        macs_first=first["total"],
        macs_steady=steady["total"],
        frames_per_chunk=model.temporal_factor * chunk,
        state_bytes=state_nbytes(specs, 1, h, w, itemsize),
        state_tensors=len(specs),
        latency=model.latency,
        halo=plan.halo if plan else None,
        frame_wide=[name for name, _ in plan.mixing] if plan else [],
        stages=stages,
    )
