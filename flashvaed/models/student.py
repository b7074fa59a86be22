"""Students as data: a spec (preset or file) resolved against a teacher into a decoder layout.

A spec names, per decoder stage (``middle``, ``up0``..``up3``, ``head``), the operator kind and
the width: a ratio of the teacher's (``0.125``, ``"1/8"``) or an absolute channel count (``24``).
Resolving it against a teacher gives a ``DecoderLayout`` with absolute widths, plus notes on
every rounding. The student model reads the teacher's latents through the same streaming step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from .blocks import OPS
from .layout import DecoderLayout, StageLayout
from .wan import LatentDecoder, WanConfig, teacher_layout

STUDENT_FORMAT = "flashvaed-student"
STAGE_KEYS = ("middle", "up0", "up1", "up2", "up3")
SPEC_KEYS = {"name", "family", "description", "stages", "at_least_one_channel"}
STAGE_SPEC_KEYS = {"op", "width", "hidden", "shortcut"}


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("flashvaed").joinpath("presets").iterdir()
        if p.name.endswith(".yaml")
    )


@dataclass(frozen=True)
class StageSpec:
    op: str = "causal3d"
    width: float | int | str = 1.0
    hidden: float | int | str | None = None
    shortcut: str | None = None  # "auto" | "always"; None: always for spatial2d, auto otherwise


@dataclass(frozen=True)
class StudentSpec:
    """A student family member, as users write it (see docs/student.md)."""

    name: str
    family: str = "wan2.1"
    description: str = ""
    stages: dict[str, StageSpec] = field(default_factory=dict)
    at_least_one_channel: bool = False

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> StudentSpec:
        if not isinstance(d, dict):
            raise InputError(f"{source}: a student config is a mapping with 'stages', got {type(d).__name__}")
        unknown = set(d) - SPEC_KEYS
        if unknown:
            raise InputError(f"{source}: unknown keys {sorted(unknown)} (allowed: {sorted(SPEC_KEYS)})")
        stages_in = d.get("stages")
        if not isinstance(stages_in, dict) or not stages_in:
            raise InputError(f"{source}: 'stages' must map stage names ({', '.join(STAGE_KEYS)}, head) to settings")
        stages = {}
        for key, value in stages_in.items():
            name = str(key).replace(".", "")
            if name not in (*STAGE_KEYS, "head"):
                raise InputError(f"{source}: unknown stage {key!r} (stages: {', '.join(STAGE_KEYS)}, head)")
            if not isinstance(value, dict):
                raise InputError(f"{source}: stage {key!r} must be a mapping like {{op: dwsep3d, width: 0.5}}")
            bad = set(value) - STAGE_SPEC_KEYS
            if bad:
                raise InputError(f"{source}: stage {key!r} has unknown keys {sorted(bad)}")
            spec = StageSpec(**value)
            if spec.op not in OPS:
                raise InputError(f"{source}: stage {key!r} has unknown op {spec.op!r} (one of {', '.join(OPS)})")
            if spec.shortcut not in (None, "auto", "always"):
                raise InputError(f"{source}: stage {key!r}: shortcut must be 'auto' or 'always'")
            if name == "head" and (value.keys() - {"op"}):
                raise InputError(f"{source}: the head only takes 'op' (its width follows up3)")
            stages[name] = spec
        return cls(
            name=str(d.get("name", source)),
            family=str(d.get("family", "wan2.1")),
            description=str(d.get("description", "")),
            stages=stages,
            at_least_one_channel=bool(d.get("at_least_one_channel", False)),
        )

    @classmethod
    def load(cls, preset_or_path: str | os.PathLike) -> StudentSpec:
        """A preset by name (``flash-wan2.1``) or a .yaml/.json config file."""
        text = str(preset_or_path)
        if text in preset_names():
            path = Path(str(resources.files("flashvaed").joinpath("presets", f"{text}.yaml")))
        else:
            path = Path(text)
            if not path.is_file():
                raise InputError(
                    f"unknown preset or missing config file {text!r} (presets: {', '.join(preset_names())})"
                )
        try:
            data = (
                yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
            )
        except (yaml.YAMLError, json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"malformed student config {path}: {first}") from None
        return cls.from_dict(data, source=path.name)

    def to_dict(self) -> dict[str, Any]:
        stages = {k: {f: v for f, v in vars(s).items() if v is not None} for k, s in self.stages.items()}
        if "head" in stages:
            stages["head"] = {"op": stages["head"]["op"]}
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "stages": stages,
            "at_least_one_channel": self.at_least_one_channel,
        }

    def resolve(self, teacher: DecoderLayout, family: str = "wan2.1") -> tuple[DecoderLayout, list[str]]:
        """Absolute widths and operators for ``teacher``; notes say where widths were rounded."""
        if self.family != family:
            raise InputError(f"student '{self.name}' is for {self.family} teachers, not {family}")
        if len(teacher.up) != len(STAGE_KEYS) - 1:
            raise InputError(
                f"student '{self.name}' names stages up0..up3 but the teacher has {len(teacher.up)} up stages"
            )
        notes: list[str] = []

        def width(key: str, what: str, value: float | int | str, full: int) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise InputError(f"{key}: {what} must be a ratio (0.25, '1/4') or a channel count, got {value!r}")
            if isinstance(value, int):
                if not 1 <= value <= full:
                    raise InputError(f"{key}: {what} {value} must be between 1 and the teacher's {full}")
                return value
            try:
                ratio = Fraction(value) if isinstance(value, str) else Fraction(value).limit_denominator(1000)
            except (ValueError, ZeroDivisionError):
                raise InputError(f"{key}: {what} {value!r} is not a ratio like 0.25 or '1/4'") from None
            if not 0 < ratio <= 1:
                raise InputError(f"{key}: {what} ratio {value} must be in (0, 1]")
            exact = ratio * full
            n = round(exact)
            if n < 1:
                if not self.at_least_one_channel:
                    raise InputError(f"{key}: {what} {full} x {value} = {float(exact):.3g} rounds to 0 channels")
                notes.append(f"{key}: {what} {full} x {value} = {float(exact):.3g}, raised to 1 channel")
                return 1
            if n != exact:
                notes.append(f"{key}: {what} {full} x {value} = {float(exact):.3g}, rounded to {n}")
            return n

        specs = {k: self.stages.get(k, StageSpec()) for k in STAGE_KEYS}
        names = dict(zip(STAGE_KEYS, ["middle", *(f"up.{i}" for i in range(4))], strict=True))
        resolved: dict[str, StageLayout] = {}
        for key in STAGE_KEYS:
            t = teacher.stages[names[key]]
            s = specs[key]
            w = width(key, "width", s.width, t.width)
            hidden = tuple(width(key, "hidden", s.hidden if s.hidden is not None else s.width, h) for h in t.hidden)
            # an input tied to the stream (identity first block) follows it; otherwise the stage's ratio
            in_w = w if t.in_width == t.width else width(key, "input width", s.width, t.in_width)
            shortcut = s.shortcut == "always" or (s.shortcut is None and s.op == "spatial2d")
            resolved[key] = StageLayout(s.op, in_w, w, hidden, t.resample_width, t.temporal, shortcut)
        # the upsample conv of each stage writes the next stage's input
        ups = [resolved[k] for k in STAGE_KEYS[1:]]
        for i in range(len(ups) - 1):
            ups[i] = replace(ups[i], resample_width=ups[i + 1].in_width)
        middle = resolved["middle"]
        if ups[0].in_width != middle.width:
            raise InputError(
                f"middle and up0 share one residual stream (identity shortcuts); their widths must match, "
                f"got {middle.width} and {ups[0].in_width}"
            )
        head = self.stages.get("head", StageSpec())
        v_dim = width("middle", "attention v width", specs["middle"].width, teacher.v_dim)
        layout = DecoderLayout(
            teacher.z_dim,
            middle,
            tuple(ups),
            qk_dim=teacher.qk_dim,
            v_dim=v_dim,
            head_op=head.op,
            out_channels=teacher.out_channels,
        )
        return layout, notes


@dataclass(frozen=True)
class StudentConfig:
    """What a student directory's config.json holds."""

    name: str
    layout: DecoderLayout
    teacher: WanConfig
    family: str = "wan2.1"
    spec: dict[str, Any] = field(default_factory=dict)
    # per decoder stage, the teacher channels of its output that the student kept (from pruning);
    # distillation compares stage outputs at these channels
    teacher_channels: dict[str, list[int]] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STUDENT_FORMAT,
            "version": 1,
            "name": self.name,
            "family": self.family,
            "layout": self.layout.to_dict(),
            "teacher": self.teacher.to_dict(),
            "spec": self.spec,
            "teacher_channels": self.teacher_channels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        return cls(
            name=d["name"],
            layout=DecoderLayout.from_dict(d["layout"]),
            teacher=WanConfig.from_dict(d["teacher"]),
            family=d.get("family", "wan2.1"),
            spec=d.get("spec", {}),
            teacher_channels=d.get("teacher_channels", {}),
        )


class FlashStudent(LatentDecoder):
    """A student decoder: the teacher's latents in, frames out, through the same streaming step."""

    kind = "student"

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config.layout, config.teacher.latents_mean, config.teacher.latents_std)
        self.config = config
        self.family = config.family


def build_student(spec: StudentSpec, teacher: WanConfig) -> tuple[FlashStudent, list[str]]:
    layout, notes = spec.resolve(teacher_layout(teacher))
    return FlashStudent(StudentConfig(spec.name, layout, teacher, spec=spec.to_dict())), notes
