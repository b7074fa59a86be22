"""Students released by others, read as ordinary flashvaed students.

A released student (the Flash-VAED authors' ``Flash_VAED_Wan.pth``, ``Flash_VAED_LTX.pth``) is a
checkpoint in its authors' own module names, often with operators split differently from ours (a
depthwise conv with a bias before a pointwise conv, where ours folds that bias into the pointwise
one). A family that reads such a layout (``Family.read_student``) derives the student's layout from
the file's shapes, then says, for every parameter of the student it builds, which tensors of the
file it is made from and how (``Source``). ``convert`` checks the whole file against that table —
every tensor present, none left over, every shape as expected — before any arithmetic, and only
then computes our parameters, in float32 whatever the file's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .layout import DecoderLayout


@dataclass(frozen=True)
class Source:
    """One parameter of ours: the file tensors it is made from, their shapes, and how."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    make: Callable[..., Tensor] | None = None  # None: the one tensor, reshaped to ours

    @classmethod
    def same(cls, key: str, shape: tuple[int, ...]) -> Source:
        return cls((key,), (tuple(shape),))

    @classmethod
    def fill(cls, value: float) -> Source:
        """A parameter the release does not have, whose value makes ours compute what theirs does
        (a norm gain of 1)."""
        return cls((), (), lambda: torch.tensor(value))


def tensor_shape(tensors: Mapping[str, Tensor], key: str, dims: int, where: str) -> tuple[int, ...]:
    """The shape of a tensor the layout needs, refused in one line if absent or of another rank."""
    if key not in tensors:
        raise CheckpointError(f"{where} lacks the tensor {key}")
    shape = tuple(tensors[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"{where}: {key} has shape {shape}, expected {dims} dimensions")
    return shape


def fold_depthwise_bias(pointwise_bias: Tensor, pointwise_weight: Tensor, depthwise_bias: Tensor) -> Tensor:
    """A depthwise conv's bias, moved past the pointwise conv that follows it: exact, since
    nothing non-linear stands between them and the bias reaches every position of its channel."""
    return pointwise_bias + pointwise_weight.flatten(1) @ depthwise_bias


def fold_depthwise_scale(pointwise_weight: Tensor, depthwise_weight: Tensor) -> Tensor:
    """A 1x1x1 depthwise conv (a per-channel scale) folded into the pointwise conv after it."""
    return pointwise_weight * depthwise_weight.reshape(1, -1, *(1,) * (pointwise_weight.dim() - 2))


def convert(
    tensors: Mapping[str, Tensor],
    sources: Mapping[str, Source],
    targets: Mapping[str, tuple[int, ...]],
    where: str,
    optional: Mapping[str, tuple[int, ...]] | None = None,
    ignored: Collection[str] = (),
) -> dict[str, Tensor]:
    """Our parameters (float32) from a released file, refused in one line unless it fits exactly.

    ``targets``: our parameter shapes; ``optional``: file tensors that may be present (then with
    that shape) and are not used; ``ignored``: tensors already read as configuration.
    """
    needed: dict[str, tuple[int, ...]] = {}
    for source in sources.values():
        needed.update(zip(source.keys, source.shapes, strict=True))
    missing = [k for k in needed if k not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{where} lacks the decoder tensor {missing[0]}{more}")
    optional = optional or {}
    extra = sorted(k for k in tensors if k not in needed and k not in optional and k not in ignored)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{where} has a tensor its layout does not explain: {extra[0]}{more}")
    for key, shape in [*needed.items(), *((k, s) for k, s in optional.items() if k in tensors)]:
        got = tuple(tensors[key].shape)
        if got != tuple(shape):
            raise CheckpointError(f"{where}: {key} has shape {got}, but the rest of the file makes it {tuple(shape)}")
        if not tensors[key].is_floating_point():
            raise CheckpointError(f"{where}: {key} is not a floating-point tensor ({tensors[key].dtype})")
    out: dict[str, Tensor] = {}
    for name, source in sources.items():
        inputs = [tensors[k].float() for k in source.keys]
        value = source.make(*inputs) if source.make is not None else inputs[0]
        target = tuple(targets[name])
        if value.numel() == 1 and math.prod(target) != 1:
            value = value.expand(target)
        out[name] = value.reshape(target).contiguous()
    return out


def comparable_stages(family: Any, teacher: Any, layout: DecoderLayout) -> dict[str, list[int]]:
    """``StudentConfig.teacher_channels`` of a student whose pruning is unknown: stages as wide as the
    teacher's compare every channel (left out); narrower ones have no known map (an empty list), so
    distillation compares them only through the frames."""
    reference = family.teacher_layout(teacher)
    return {name: [] for name, st in layout.stages.items() if st.out_width != reference.stages[name].out_width}
