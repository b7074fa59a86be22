"""A decoder's layout as data: per stage the operator kind and the widths.

Teacher and student decoders are the same class built from different layouts: the teacher's
layout follows from its configuration (all ``causal3d``, full widths); a student's comes from a
preset or config file resolved against its teacher (``flashvaed.models.student``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .blocks import OPS


@dataclass(frozen=True)
class StageLayout:
    """One decoder stage: residual blocks of one operator kind, then an optional upsampler.

    ``in_width`` enters the stage, ``width`` is its residual stream, ``hidden`` the width
    between the two convs of each residual block; ``resample_width`` is the upsample conv's
    output (the next stage's ``in_width``), ``None`` when the stage does not upsample;
    ``temporal`` says whether the upsampler doubles time (``time_conv``); ``shortcut`` gives
    every block a 1x1x1 shortcut (otherwise only blocks whose widths change have one).
    """

    op: str
    in_width: int
    width: int
    hidden: tuple[int, ...]
    resample_width: int | None = None
    temporal: bool = False
    shortcut: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.op not in OPS:
            raise ValueError(f"unknown operator {self.op!r} (expected one of {', '.join(OPS)})")
        widths = [self.in_width, self.width, *self.hidden] + ([self.resample_width] if self.resample_width else [])
        if any(int(w) != w or w < 1 for w in widths):
            raise ValueError(f"every width must be a positive integer, got {widths}")


@dataclass(frozen=True)
class DecoderLayout:
    z_dim: int
    middle: StageLayout
    up: tuple[StageLayout, ...]
    qk_dim: int
    v_dim: int
    head_op: str = "causal3d"
    out_channels: int = 3
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "up", tuple(self.up))
        if self.middle.in_width != self.middle.width or len(self.middle.hidden) != 2:
            raise ValueError("the middle stage keeps its width and has two residual blocks")
        chain = [self.middle.width] + [st.resample_width for st in self.up[:-1]]
        for i, (st, incoming) in enumerate(zip(self.up, chain, strict=True)):
            if st.in_width != incoming:
                raise ValueError(f"up.{i} takes {st.in_width} channels but receives {incoming}")
        if self.up[-1].resample_width is not None:
            raise ValueError("the last up stage does not upsample")
        if self.head_op not in OPS:
            raise ValueError(f"unknown head operator {self.head_op!r}")

    @property
    def stages(self) -> dict[str, StageLayout]:
        return {"middle": self.middle, **{f"up.{i}": st for i, st in enumerate(self.up)}}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderLayout:
        return cls(
            z_dim=d["z_dim"],
            middle=StageLayout(**d["middle"]),
            up=tuple(StageLayout(**st) for st in d["up"]),
            qk_dim=d["qk_dim"],
            v_dim=d["v_dim"],
            head_op=d.get("head_op", "causal3d"),
            out_channels=d.get("out_channels", 3),
        )
