"""How pruning reads the layers a channel group names: norms by what they declare, inputs by channel dim.

A norm over a group is a ``flashvaed.models.coupling.PrunableNorm``: its class says which of its
parameters are per channel (the first is the gain), how keeping fewer channels rescales its output
(``pruned_scale``), whether that also depends on the share of the input the kept channels carry
(``kept_norm_share``), and which parameters a student has where its teacher may not
(``student_params``). ``torch.nn.GroupNorm`` and ``torch.nn.LayerNorm`` are read without
declarations (affine parameters ``weight`` and ``bias``, scale 1). Nothing is guessed from names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

TORCH_NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class NormSpec:
    """What a norm declares (``PrunableNorm``), with the defaults filled in."""

    params: tuple[str, ...]  # per-channel parameters, indexed on dim 0; the first is the gain
    scale: Callable[[int, int], float]  # (kept, total) -> the factor pruning multiplies the gain by
    kept_norm_share: bool  # the gain is also multiplied by the measured mean ||x_kept|| / ||x||
    student_params: tuple[str, ...]  # parameters a teacher's norm may lack: they start at the identity
    channel_dim: int  # the input dim holding the channels

    def identity(self, name: str) -> float:
        """The value of parameter ``name`` that leaves the norm's output unchanged: 1 for the gain."""
        return 1.0 if self.params and name == self.params[0] else 0.0


def _unit(kept: int, total: int) -> float:
    return 1.0


def norm_spec(module: nn.Module, path: str) -> NormSpec:
    """The declaration of the norm at ``path``; a TypeError naming it when it has none."""
    declared = getattr(type(module), "channel_params", None)
    if declared is None:
        if isinstance(module, nn.GroupNorm):
            return NormSpec(("weight", "bias") if module.affine else (), _unit, False, (), 1)
        if isinstance(module, nn.LayerNorm):
            affine = module.elementwise_affine and len(module.normalized_shape) == 1
            params = ("weight", "bias") if affine and module.bias is not None else ("weight",) if affine else ()
            return NormSpec(params, _unit, False, (), -1)
        raise TypeError(
            f"{path}: {type(module).__name__} normalises a channel group but does not declare how it prunes "
            "(class attribute channel_params and method pruned_scale: see flashvaed.models.coupling.PrunableNorm)"
        )
    params = tuple(declared)
    student = tuple(getattr(module, "student_params", ()))
    if not set(student) <= set(params):
        raise TypeError(f"{path}: {type(module).__name__}.student_params must name entries of channel_params")
    return NormSpec(
        params,
        module.pruned_scale,
        bool(getattr(module, "kept_norm_share", False)),
        student,
        input_channel_dim(module),
    )


def input_channel_dim(module: nn.Module) -> int:
    """The dim of ``module``'s first input that holds its channels: declared (``input_channel_dim``),
    else the last for an ``nn.Linear`` or ``nn.LayerNorm`` that runs torch's own forward (they act on
    the last dim: channel-last tensors), else 1 (convs, and subclasses whose forward moves the
    channels of a (B, C, ...) input themselves)."""
    declared = getattr(module, "input_channel_dim", None)
    if declared is not None:
        return int(declared)
    for base in (nn.Linear, nn.LayerNorm):
        if isinstance(module, base) and type(module).forward is base.forward:
            return -1
    return 1


def is_norm(module: nn.Module) -> bool:
    """A norm pruning knows how to read (declared, or one of torch's)."""
    return hasattr(type(module), "channel_params") or isinstance(module, TORCH_NORMS)
