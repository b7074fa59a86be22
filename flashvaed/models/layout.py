"""A decoder's layout as data: per stage the operator kind and the widths.

Teacher and student decoders of a family are the same class built from different layouts: the
teacher's layout follows from its configuration (all ``causal3d``, full widths); a student's comes
from a preset or config file resolved against its teacher (``flashvaed.models.student``).

A teacher layout also says which widths are one channel space (``spaces``): a residual stream runs
through identity shortcuts and, in Wan2.2, through the DupUp shortcuts of its up stages, so those
widths must stay equal in every student. Resolving a spec reads this; nothing else does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .blocks import MAX_RESAMPLE_RANK, OPS, RESAMPLE_CONVS, time_factor

MAX_WIDTH = 1 << 16  # far past any released VAE: an untrusted config asking for more is refused


@dataclass(frozen=True)
class StageLayout:
    """One decoder stage: residual blocks of one operator kind, then an optional upsampler.

    ``in_width`` enters the stage, ``width`` is its residual stream, ``hidden`` the width
    between the two convs of each residual block; ``resample_width`` is the upsample conv's
    output (the next stage's ``in_width``), ``None`` when the stage does not upsample;
    ``temporal`` is the upsampler's time factor (1: none, 2: doubles, 3: triples; a boolean, as
    student format 2 and earlier wrote it, reads as 2 or 1); ``shortcut`` gives
    every block a 1x1x1 shortcut (otherwise only blocks whose widths change have one); ``causal``
    makes the stage's own convs read no future frame in a decoder that otherwise does (a family
    whose convs are all causal ignores it); ``resample_conv`` is the upsampler's spatial conv
    (``blocks.RESAMPLE_CONVS``: the teacher's dense "conv"; "dwsep", depthwise-separable of rank
    ``resample_rank`` (1-9); or "lowrank", a 3x3 conv to ``resample_rank`` channels and a 1x1 conv
    back to ``resample_width``).
    """

    op: str
    in_width: int
    width: int
    hidden: tuple[int, ...]
    resample_width: int | None = None
    temporal: int = 1
    shortcut: bool = False
    causal: bool = False
    resample_conv: str = "conv"
    resample_rank: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.resample_conv not in RESAMPLE_CONVS:
            raise ValueError(f"unknown upsample conv {self.resample_conv!r} (one of {', '.join(RESAMPLE_CONVS)})")
        if self.resample_conv != "conv" and self.resample_width is None:
            raise ValueError(f"a stage that does not upsample has no upsample conv to make {self.resample_conv}")
        object.__setattr__(self, "temporal", time_factor(self.temporal))
        if self.op not in OPS:  # any registered operator kind (``blocks.register_op``)
            raise ValueError(f"unknown operator {self.op!r} (expected one of {', '.join(OPS)})")
        widths = [self.in_width, self.width, *self.hidden] + ([self.resample_width] if self.resample_width else [])
        if any(isinstance(w, bool) or int(w) != w or not 1 <= w <= MAX_WIDTH for w in widths):
            raise ValueError(f"every width must be an integer in [1, {MAX_WIDTH}], got {widths}")
        rank = self.resample_rank
        top = (self.resample_width or 1) if self.resample_conv == "lowrank" else MAX_RESAMPLE_RANK
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
            raise ValueError(f"resample_rank must be an integer in [1, {top}], got {rank!r}"[:200])
        if rank != 1 and self.resample_conv == "conv":
            raise ValueError("resample_rank is a dwsep or lowrank upsample conv's; this stage's is dense")

    @property
    def out_width(self) -> int:
        return self.resample_width if self.resample_width is not None else self.width


@dataclass(frozen=True)
class DecoderLayout:
    """A decoder's stages: ``middle`` (at the latent grid; it may end in an upsampler, as LTX's does)
    and ``up``; ``qk_dim``/``v_dim`` are the middle's attention widths (0: no attention)."""

    z_dim: int
    middle: StageLayout
    up: tuple[StageLayout, ...]
    qk_dim: int
    v_dim: int
    head_op: str = "causal3d"  # the head conv's operator kind (any registered kind)
    out_channels: int = 3
    causal: bool = False  # every temporal conv causal (the Wan families always are; an LTX student may be)
    # teacher layouts: their family, and "stage.field" -> channel space label (see the module docstring)
    family: str | None = field(default=None, compare=False)
    spaces: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "up", tuple(self.up))
        if self.middle.in_width != self.middle.width or not self.middle.hidden:
            raise ValueError("the middle stage keeps its width and has at least one residual block")
        if not self.up:
            raise ValueError("a decoder has at least one up stage")
        if self.qk_dim < 0 or self.v_dim < 0 or (self.qk_dim == 0) != (self.v_dim == 0):
            raise ValueError("attention widths are both positive, or both 0 (no attention)")
        chain = [self.middle.out_width] + [st.resample_width for st in self.up[:-1]]
        for i, (st, incoming) in enumerate(zip(self.up, chain, strict=True)):
            if st.in_width != incoming:
                raise ValueError(f"up.{i} takes {st.in_width} channels but receives {incoming}")
        if self.up[-1].resample_width is not None:
            raise ValueError("the last up stage does not upsample")
        if self.head_op not in OPS:
            raise ValueError(f"unknown head operator {self.head_op!r} (expected one of {', '.join(OPS)})")

    @property
    def stages(self) -> dict[str, StageLayout]:
        return {"middle": self.middle, **{f"up.{i}": st for i, st in enumerate(self.up)}}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["spaces"], d["family"]
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
            causal=bool(d.get("causal", False)),
        )


def channel_spaces(up: Sequence[StageLayout], resample_joins_input: Sequence[bool]) -> dict[str, str]:
    """Label the widths of a teacher's stages by channel space.

    A stage whose input and stream widths agree runs its input stream on (identity shortcut);
    an upsample conv starts a new space unless ``resample_joins_input[i]`` (its output is added
    to the stage's input by an identity index map, as Wan2.2's DupUp does).
    """
    labels = {"middle.width": "s0"}
    current, count = "s0", 1

    def new() -> str:
        nonlocal count
        count += 1
        return f"s{count - 1}"

    for i, st in enumerate(up):
        labels[f"up.{i}.in_width"] = current
        stream = current if st.in_width == st.width else new()
        labels[f"up.{i}.width"] = stream
        if st.resample_width is not None:
            current = current if resample_joins_input[i] else new()
            labels[f"up.{i}.resample_width"] = current
    return labels
