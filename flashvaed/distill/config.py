"""Distillation settings: one YAML/JSON file, every field with a documented default.

See docs/distill.md for what each phase does. ``flashvaed distill --config FILE`` overrides any
subset; ``--steps-per-phase N`` sets the three phase lengths at once for quick runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..safeload import load_config

OPTIONAL_INTS = {"clip_frames"}  # integer fields whose default (None) the run picks: the teacher family's


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 1e-3  # peak learning rate of every phase
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8  # Adam's denominator floor; larger values damp steps on parameters with ~0 gradient
    warmup_steps: int = 20  # linear warm-up at the start of each phase
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio by the end of each phase
    grad_clip: float = 1.0  # max gradient norm (0: off)


@dataclass(frozen=True)
class AlignConfig:
    """Phase 1, stage-wise alignment: every student stage maps the teacher's input of that stage
    (at the kept channels) to the teacher's output of that stage, teacher-forced."""

    steps: int = 200


@dataclass(frozen=True)
class TransferConfig:
    """Phase 2, end-to-end transfer: per-stage feature losses plus output losses, the weight moving
    linearly from the features to the outputs over the phase."""

    steps: int = 200
    feature_weight: tuple[float, float] = (1.0, 0.1)  # at the start, at the end of the phase
    output_weight: tuple[float, float] = (0.1, 1.0)
    ssim_weight: float = 0.2  # output loss = L1 + ssim_weight * (1 - SSIM)


@dataclass(frozen=True)
class RefineConfig:
    """Phase 3, fidelity refinement: outputs against the teacher and, where the clip has ground
    truth, against the real frames, weighted per sample by how well the teacher reconstructs it;
    plus temporal consistency; through the streaming step on multi-chunk clips."""

    steps: int = 200
    teacher_weight: float = 1.0
    gt_weight: float = 0.5
    gt_psnr_range: tuple[float, float] = (20.0, 35.0)  # teacher PSNR vs GT mapped to GT trust 0..1
    temporal_weight: float = 0.5
    ssim_weight: float = 0.2


@dataclass(frozen=True)
class DistillConfig:
    seed: int = 0
    batch_size: int = 2  # clips per step and process
    clip_frames: int | None = None  # tn+1 frames per clip (video and synthetic data); None: the family's
    clip_size: int = 64  # clips are cropped to clip_size x clip_size pixels
    frame_stride: int = 1  # keep every n-th video frame
    synthetic_clips: int = 64  # distinct synthetic clips when --data synthetic
    chunk: int = 1  # latent frames per streaming step after the first
    ema_decay: float = 0.999  # the saved student is the EMA of the trained weights
    checkpoint_every: int = 50  # steps between checkpoints (written atomically)
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast on GPU (CPU runs stay fp32)
    gradient_checkpointing: bool = False  # recompute stage activations in backward (GPU)
    tensorboard: bool = False  # write TensorBoard event files to RUN/tensorboard if available
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.batch_size < 1 or self.chunk < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise InputError("batch_size, chunk, checkpoint_every and log_every must be at least 1")
        if not 0 <= self.ema_decay < 1:
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for phase in (self.align, self.transfer, self.refine):
            if phase.steps < 0:
                raise InputError("phase steps must be >= 0")

    @property
    def phases(self) -> list[tuple[str, int]]:
        return [("align", self.align.steps), ("transfer", self.transfer.steps), ("refine", self.refine.steps)]

    @property
    def total_steps(self) -> int:
        return sum(n for _, n in self.phases)

    def for_family(self, family: Any) -> DistillConfig:
        """This config with the fields left to the teacher's family filled in: ``clip_frames`` None
        becomes the family's ``Family.clip_frames``."""
        return self if self.clip_frames is not None else replace(self, clip_frames=family.clip_frames)

    def with_steps_per_phase(self, steps: int) -> DistillConfig:
        return replace(
            self,
            align=replace(self.align, steps=steps),
            transfer=replace(self.transfer, steps=steps),
            refine=replace(self.refine, steps=steps),
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def fingerprint(self) -> str:
        """What must not change between a run and its resumption."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> DistillConfig:
        return _build(cls, data, source)

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> DistillConfig:
        if path is None:
            return cls()
        path = Path(path)
        if not path.exists():
            raise InputError(f"distillation config not found: {path}")
        data = load_config(path, InputError, "distillation config")
        return cls.from_dict(data or {}, path.name)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise InputError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    defaults = cls()
    values = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            values[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(default):
                raise InputError(f"{where}.{name}: expected a list of {len(default)} numbers, got {value!r}")
            values[name] = tuple(float(v) for v in value)
        elif name in OPTIONAL_INTS and default is None:  # an integer, or null: the default its reader picks
            bad = isinstance(value, bool) or not isinstance(value, (int, float, type(None)))
            if bad or (isinstance(value, float) and not value.is_integer()):
                raise InputError(f"{where}.{name}: expected an integer, got {value!r}")
            values[name] = None if value is None else int(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise InputError(f"{where}.{name}: expected true or false, got {value!r}")
            values[name] = value
        elif isinstance(default, (int, float)) and not isinstance(value, bool) and isinstance(value, (int, float)):
            if isinstance(default, int) and not isinstance(default, bool) and value != int(value):
                raise InputError(f"{where}.{name}: expected an integer, got {value!r}")
            values[name] = type(default)(value)
        elif isinstance(default, str) and isinstance(value, str):
            values[name] = value
        else:
            raise InputError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
    return cls(**values)
