"""Students as data: a spec (preset or file) resolved against a teacher into a decoder layout.

A spec names, per decoder stage (``middle``, ``up0``, ``up1``, ..., ``head``), the operator kind
and the width: a ratio of the teacher's (``0.125``, ``"1/8"``) or an absolute channel count
(``24``). Resolving it against a teacher gives a ``DecoderLayout`` with absolute widths, plus
notes on every rounding. Widths the teacher ties together (one channel space, see
``layout.channel_spaces``) must come out equal. The student model reads the teacher's latents
through the same streaming step, built by the teacher's family.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError
from ..safeload import load_config
from . import families
from .blocks import MAX_RESAMPLE_RANK, OPS, RESAMPLE_CONVS
from .layout import DecoderLayout, StageLayout, channel_spaces
from .vae import LatentDecoder

STUDENT_FORMAT = "flashvaed-student"
# 2: LTX stages honour `shortcut` and `causal`; 3: `temporal` is a factor (int); 4: `resample_conv`, `resample_rank`
STUDENT_VERSION = 4
SPEC_KEYS = {"name", "family", "description", "stages", "at_least_one_channel", "min_width", "multiple_of", "causal"}
MIN_WIDTH = 4  # below this a stage degenerates: an RMS norm over one channel is a sign function
MULTIPLE_OF = 4  # ratio-derived widths round to multiples of this (vector loads, tensor-core tiles)
LOWRANK_DEFAULT = "1/4"  # a lowrank upsample conv's channels, as a ratio of its output width
STAGE_SPEC_KEYS = {"op", "width", "hidden", "shortcut", "causal", "resample", "resample_rank"}
STAGE_NAME = re.compile(r"middle|head|up\d+")


def preset_names(family: str | None = None) -> list[str]:
    """Shipped presets, or those for one family's teachers."""
    names = []
    for p in resources.files("flashvaed").joinpath("presets").iterdir():
        if p.name.endswith(".yaml") and (family is None or yaml.safe_load(p.read_text()).get("family") == family):
            names.append(p.name.removesuffix(".yaml"))
    return sorted(names)


@dataclass(frozen=True)
class StageSpec:
    op: str = "causal3d"
    width: float | int | str = 1.0
    hidden: float | int | str | None = None
    shortcut: str | None = None  # "auto" | "always"; None: always for spatial2d, auto otherwise
    causal: bool | None = None  # the stage's convs read no future frame (dwsep3d in a non-causal decoder)
    resample: str | None = None  # the upsampler's spatial conv: "conv" (the teacher's, default), "dwsep", "lowrank"
    # a dwsep upsample conv's rank (1 to 9; default 1), or a lowrank one's channels (a ratio of its
    # width or a count; default 1/4)
    resample_rank: float | int | str | None = None


@dataclass(frozen=True)
class StudentSpec:
    """A student family member, as users write it (see docs/student.md)."""

    name: str
    family: str | None = None  # the teacher family it fits; None: any
    description: str = ""
    stages: dict[str, StageSpec] = field(default_factory=dict)
    at_least_one_channel: bool = False  # superseded by min_width; kept for configs that set it
    min_width: int = MIN_WIDTH  # floor of ratio-derived widths (never above the teacher's own width)
    multiple_of: int = MULTIPLE_OF  # ratio-derived widths above the floor round to multiples of this
    causal: bool = False  # no temporal conv reads a future frame (zero latency, for non-causal teachers)

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> StudentSpec:
        if not isinstance(d, dict):
            raise InputError(f"{source}: a student config is a mapping with 'stages', got {type(d).__name__}")
        unknown = set(d) - SPEC_KEYS
        if unknown:
            raise InputError(f"{source}: unknown keys {sorted(map(str, unknown))} (allowed: {sorted(SPEC_KEYS)})")
        stages_in = d.get("stages")
        if not isinstance(stages_in, dict) or not stages_in:
            raise InputError(f"{source}: 'stages' must map stage names (middle, up0, up1, ..., head) to settings")
        stages = {}
        for key, value in stages_in.items():
            name = str(key).replace(".", "")
            if not STAGE_NAME.fullmatch(name):
                raise InputError(f"{source}: unknown stage {key!r} (stages: middle, up0, up1, ..., head)")
            if not isinstance(value, dict):
                raise InputError(f"{source}: stage {key!r} must be a mapping like {{op: dwsep3d, width: 0.5}}")
            bad = set(value) - STAGE_SPEC_KEYS
            if bad:
                raise InputError(f"{source}: stage {key!r} has unknown keys {sorted(map(str, bad))}")
            spec = StageSpec(**value)
            if spec.op not in OPS:
                raise InputError(f"{source}: stage {key!r} has unknown op {spec.op!r} (one of {', '.join(OPS)})")
            if spec.shortcut not in (None, "auto", "always"):
                raise InputError(f"{source}: stage {key!r}: shortcut must be 'auto' or 'always'")
            if spec.causal not in (None, True, False):
                raise InputError(f"{source}: stage {key!r}: causal must be true or false")
            if spec.resample not in (None, *RESAMPLE_CONVS):
                raise InputError(f"{source}: stage {key!r}: resample must be one of {', '.join(RESAMPLE_CONVS)}")
            rank = spec.resample_rank
            if rank is not None and spec.resample == "lowrank":
                if isinstance(rank, bool) or not isinstance(rank, (int, float, str)):
                    raise InputError(
                        f"{source}: stage {key!r}: a lowrank upsample conv's resample_rank is a ratio of its "
                        f"width ('1/4') or a channel count, got {rank!r}"[:300]
                    )
            elif rank is not None and (
                isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RESAMPLE_RANK
            ):
                raise InputError(f"{source}: stage {key!r}: resample_rank must be an integer from 1 to 9, got {rank!r}")
            if rank is not None and spec.resample not in ("dwsep", "lowrank"):
                raise InputError(f"{source}: stage {key!r}: resample_rank needs resample: dwsep or lowrank")
            if spec.causal and spec.op == "conv3d":
                raise InputError(f"{source}: stage {key!r} is causal but asks for conv3d, which reads a future frame")
            if name == "head" and spec.causal is not None:
                raise InputError(f"{source}: the head only takes 'op' (causal3d for a causal head)")
            if name == "head" and (value.keys() - {"op"}):
                raise InputError(f"{source}: the head only takes 'op' (its width follows the last up stage)")
            stages[name] = spec
        family = d.get("family")
        bounds = {}
        for key, default in (("min_width", MIN_WIDTH), ("multiple_of", MULTIPLE_OF)):
            value = d.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096:
                raise InputError(f"{source}: {key} must be a channel count between 0 and 4096, got {value!r}")
            bounds[key] = max(value, 1) if key == "multiple_of" else value
        return cls(
            name=str(d.get("name", source)),
            family=None if family is None else str(family),
            description=str(d.get("description", "")),
            stages=stages,
            at_least_one_channel=bool(d.get("at_least_one_channel", False)),
            **bounds,
            causal=bool(d.get("causal", False)),
        )

    @classmethod
    def load(cls, preset_or_path: str | os.PathLike) -> StudentSpec:
        """A preset by name (``flash-wan2.1``) or a .yaml/.json config file."""
        text = str(preset_or_path)
        if text in preset_names():
            path = Path(str(resources.files("flashvaed").joinpath("presets", f"{text}.yaml")))
        else:
            path = Path(text)
            if not path.exists():
                raise InputError(
                    f"unknown preset or missing config file {text!r} (presets: {', '.join(preset_names())})"
                )
        data = load_config(path, InputError, "student config")
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
            "min_width": self.min_width,
            "multiple_of": self.multiple_of,
            **({"causal": True} if self.causal else {}),
        }

    def resolve(self, teacher: DecoderLayout, family: str | None = None) -> tuple[DecoderLayout, list[str]]:
        """Absolute widths and operators for ``teacher``; notes say where widths were rounded."""
        family = family or teacher.family
        if self.family is not None and family is not None and self.family != family:
            raise InputError(f"student '{self.name}' is for {self.family} teachers, not {family}")
        if family is not None and family in families.FAMILIES:
            ops = families.get(family).ops
            for name, st in self.stages.items():
                if st.op not in ops:
                    raise InputError(
                        f"student '{self.name}': stage {name} asks for operator {st.op}, which {family} decoders "
                        f"do not build (they build {', '.join(ops)})"
                    )
                if st.resample not in (None, "conv") and st.resample not in families.get(family).resample_convs:
                    raise InputError(
                        f"student '{self.name}': stage {name} asks for a {st.resample} upsample conv, which "
                        f"{family} decoders do not build (they build {', '.join(families.get(family).resample_convs)})"
                    )
                if self.causal and st.op == "conv3d":
                    raise InputError(
                        f"student '{self.name}' is causal: stage {name} asks for conv3d, which reads a future "
                        "frame (use causal3d)"
                    )
        keys = {"middle": "middle", **{f"up{i}": f"up.{i}" for i in range(len(teacher.up))}}
        for name in self.stages:
            if name != "head" and name not in keys:
                raise InputError(
                    f"student '{self.name}' names an unknown stage {name}: the teacher has {len(teacher.up)} up "
                    f"stages (stages: {', '.join(keys)}, head)"
                )
        notes: list[str] = []

        # the floor scales with the teacher's width: min_width at its narrowest stage, twice that where
        # the teacher is twice as wide, so floors never merge widths the teacher keeps apart (a
        # width-changing block stays one)
        narrowest = min(w for st in teacher.stages.values() for w in (st.in_width, st.width, *st.hidden) if w > 0)

        def width(key: str, what: str, value: float | int | str, full: int, floored: bool = True) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise InputError(f"{key}: {what} must be a ratio (0.25, '1/4') or a channel count, got {value!r}")
            if isinstance(value, int):
                if not 1 <= value <= full:
                    raise InputError(f"{key}: {what} {value} must be between 1 and the teacher's {full}")
                return value
            try:
                ratio = Fraction(value) if isinstance(value, str) else Fraction(value).limit_denominator(1000)
            except (ValueError, ZeroDivisionError, OverflowError):
                raise InputError(f"{key}: {what} {value!r} is not a ratio like 0.25 or '1/4'") from None
            if not 0 < ratio <= 1:
                raise InputError(f"{key}: {what} ratio {value} must be in (0, 1]")
            exact = ratio * full
            n = round(exact)
            floor = min(-(-self.min_width * full // narrowest), full) if floored else 1
            if n < max(floor, 1):
                if floor < 1 and not self.at_least_one_channel:
                    raise InputError(f"{key}: {what} {full} x {value} = {float(exact):.3g} rounds to 0 channels")
                floor = max(floor, 1)
                notes.append(f"{key}: {what} {full} x {value} = {float(exact):.3g}, raised to the floor of {floor}")
                return floor
            m = self.multiple_of
            if n % m and full >= m:
                candidates = [w for w in (n // m * m, -(-n // m) * m) if max(floor, 1) <= w <= full]
                if candidates:
                    n = min(candidates, key=lambda w: (abs(w - exact), -w))
            if n != exact:
                notes.append(f"{key}: {what} {full} x {value} = {float(exact):.3g}, rounded to {n}")
            return n

        specs = {k: self.stages.get(k, StageSpec()) for k in keys}
        spaces = teacher.spaces or channel_spaces(teacher.up, [False] * len(teacher.up))
        # a channel space takes the width of the stages whose residual stream it is (they must agree) ...
        claims: dict[str, dict[str, int]] = {}
        for key, stage in keys.items():
            w = width(key, "width", specs[key].width, teacher.stages[stage].width)
            claims.setdefault(spaces[f"{stage}.width"], {})[key] = w
        size: dict[str, int] = {}
        for label, claimed in claims.items():
            if len(set(claimed.values())) > 1:
                names = " and ".join(claimed)
                got = " and ".join(str(v) for v in claimed.values())
                raise InputError(
                    f"{names} share one residual stream (identity shortcuts); their widths must match, got {got}"
                )
            size[label] = next(iter(claimed.values()))
        # ... and a space no stage streams (an input feeding a width-changing block) its reader's ratio
        if teacher.middle.resample_width is not None and spaces["middle.resample_width"] not in size:
            size[spaces["middle.resample_width"]] = width(
                "up0", "input width", specs["up0"].width, teacher.middle.resample_width
            )
        for i, st in enumerate(teacher.up):
            label = spaces[f"up.{i}.in_width"]
            if label not in size:
                size[label] = width(f"up{i}", "input width", specs[f"up{i}"].width, st.in_width)

        def stage(key: str, t: StageLayout, name: str) -> StageLayout:
            s = specs[key]
            hidden = tuple(width(key, "hidden", s.hidden if s.hidden is not None else s.width, h) for h in t.hidden)
            shortcut = s.shortcut == "always" or (s.shortcut is None and s.op == "spatial2d")
            in_width = size[spaces[f"{name}.in_width"]] if name != "middle" else size[spaces["middle.width"]]
            resample = size[spaces[f"{name}.resample_width"]] if t.resample_width is not None else None
            stream = size[spaces[f"{name}.width"]]
            causal = bool(s.causal) and s.op != "spatial2d"  # a per-frame conv reads no other frame anyway
            if s.resample not in (None, "conv") and resample is None:
                raise InputError(f"student '{self.name}': stage {key} does not upsample, so it takes no 'resample'")
            conv, rank = s.resample or "conv", s.resample_rank or 1
            if conv == "lowrank":
                given = s.resample_rank if s.resample_rank is not None else LOWRANK_DEFAULT
                rank = width(key, "resample_rank", given, resample, floored=False)  # no norm over these channels
            return StageLayout(s.op, in_width, stream, hidden, resample, t.temporal, shortcut, causal, conv, rank)

        middle = stage("middle", teacher.middle, "middle")
        ups = tuple(stage(f"up{i}", t, f"up.{i}") for i, t in enumerate(teacher.up))
        v_dim = width("middle", "attention v width", specs["middle"].width, teacher.v_dim) if teacher.v_dim else 0
        head = self.stages.get("head", StageSpec(op=teacher.head_op))  # unnamed: the teacher's head kind
        layout = DecoderLayout(
            teacher.z_dim,
            middle,
            ups,
            qk_dim=teacher.qk_dim,
            v_dim=v_dim,
            head_op=head.op,
            out_channels=teacher.out_channels,
            causal=self.causal or teacher.causal,
        )
        return layout, notes


@dataclass(frozen=True)
class StudentConfig:
    """What a student directory's config.json holds."""

    name: str
    layout: DecoderLayout
    teacher: Any  # the teacher's configuration, of its family's config type
    family: str  # the teacher's family: ``teacher`` is read through it
    spec: dict[str, Any] = field(default_factory=dict)
    # per decoder stage, the teacher channels of its output that the student kept (from pruning);
    # distillation compares stage outputs at these channels. A stage left out keeps every channel;
    # an empty list: no correspondence is known (a released student's narrowed stages), not compared
    teacher_channels: dict[str, list[int]] = field(default_factory=dict, compare=False)
    encoder: bool = False  # it carries its teacher's encoder (the released LTX student does)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STUDENT_FORMAT,
            "version": STUDENT_VERSION,
            "name": self.name,
            "family": self.family,
            "layout": self.layout.to_dict(),
            "teacher": self.teacher.to_dict(),
            "spec": self.spec,
            "teacher_channels": self.teacher_channels,
            **({"encoder": True} if self.encoder else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudentConfig:
        """A student's config.json, its fields type-checked (ValueError naming the field): later
        stages (distillation, ``info``) use them as they are."""
        family, name, spec = d["family"], d["name"], d.get("spec", {})
        channels, encoder = d.get("teacher_channels", {}), d.get("encoder", False)
        for field_name, value, kind in (
            ("family", family, str),
            ("name", name, str),
            ("layout", d["layout"], dict),
            ("spec", spec, dict),
            ("teacher_channels", channels, dict),
            ("encoder", encoder, bool),
        ):
            if not isinstance(value, kind):
                raise ValueError(f"{field_name} must be a {kind.__name__}, got {value!r}"[:200])
        for stage, kept in channels.items():
            if not isinstance(kept, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1 << 16 for c in kept
            ):
                raise ValueError(f"teacher_channels[{stage!r}] must be a list of channel indices"[:200])
        layout = families.get(family).upgrade_student_layout(d["layout"], d.get("version", 1))
        config = cls(
            name=name,
            layout=DecoderLayout.from_dict(layout),
            teacher=families.get(family).config_from_dict(d["teacher"]),
            family=family,
            spec=spec,
            teacher_channels=channels,
            encoder=encoder,
        )
        config.check_teacher_channels()
        return config

    def check_teacher_channels(self) -> None:
        """Each stage's map names distinct channels of the teacher's stage output, one per student
        channel (or none: a stage with no known map). Distillation indexes the teacher's features
        with them, so an index past the teacher's width would crash training hours in."""
        teacher = families.get(self.family).teacher_layout(self.teacher).stages
        student = self.layout.stages
        for stage, kept in self.teacher_channels.items():
            if stage not in student or stage not in teacher:  # maps of other layers (conv_in) go unused
                continue
            ours, theirs = (st.resample_width or st.width for st in (student[stage], teacher[stage]))
            if kept and (len(kept) != ours or len(set(kept)) != ours or max(kept) >= theirs):
                raise ValueError(
                    f"teacher_channels[{stage!r}] must name {ours} distinct channels of the teacher's {theirs}"
                )


class FlashStudent(LatentDecoder):
    """A student decoder: the teacher's latents in, frames out, through the same streaming step."""

    kind = "student"

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(families.get(config.family), config.teacher, config.layout, encoder=config.encoder)
        self.config = config


def family_of(config: Any) -> families.Family:
    """The family whose configuration type ``config`` is."""
    for family in families.FAMILIES.values():
        if type(config) is family.config_type:
            return family
    raise TypeError(f"no model family has configurations of type {type(config).__name__}")


def build_student(spec: StudentSpec, teacher: Any) -> tuple[FlashStudent, list[str]]:
    """A freshly initialised student of ``spec`` for a teacher with configuration ``teacher``."""
    family = family_of(teacher)
    layout, notes = spec.resolve(family.teacher_layout(teacher), family.name)
    config = StudentConfig(spec.name, layout, teacher, family=family.name, spec=spec.to_dict())
    return FlashStudent(config), notes
