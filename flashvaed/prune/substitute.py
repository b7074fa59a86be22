"""Operator substitution: initialise a student's cheaper convs from the (pruned) teacher's.

For every dense 3x3x3 conv that the student replaces (a ``SubstitutableConv``: causal or not,
whatever its class), the teacher conv's inputs and outputs on calibration data give the fit,
teacher-forced layer by layer, padded as the conv pads (spatially ``padding_mode``; in time its
``kernel_input`` holds what precedes the frames):

- ``spatial2d`` (a per-frame 3x3 conv): candidates are the kernel's current-frame tap, the sum
  over its temporal taps, and the least-squares 2D kernel; the one with the smallest error on
  calibration features is kept.
- ``dwsep3d`` (depthwise 3x3x3 then pointwise): a rank-1 SVD of each input channel's
  (out x 27) kernel slice gives the depthwise filter and a pointwise column; the pointwise
  conv is then refitted by least squares on the depthwise outputs; the better one is kept.
- ``dwsep2x`` (an upsampler's nearest 2x + dense 3x3 conv made pointwise at the low resolution,
  then depthwise 3x3 after the upsampling, ``blocks.SeparableUpsampleConv`` of rank r): a rank-r
  SVD of each output channel's (in x 9) kernel slice gives its r pointwise rows and depthwise
  filters; the depthwise taps and bias are then refitted by least squares, channel by channel
  (9r + 1 unknowns each); the better one is kept.
- ``lowrank2x`` (an upsampler's 3x3 conv confined to r output directions, then a 1x1 conv back to
  its width, ``blocks.LowRankUpsampleConv``): the top r principal directions of the conv's
  outputs on calibration features (their mean goes to the 1x1 conv's bias), which is the best
  rank-r fit when the 3x3 part is free.

Errors are relative: ||y - y_student||^2 / ||y||^2 over calibration features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibration import run

MAX_ROWS = 32768
UPSAMPLE_ROWS = 4096  # pixels per call an upsample conv's fit samples (each of its channels solves 9r + 1 unknowns)
PAD_MODES = {"zeros": "constant", "replicate": "replicate", "reflect": "reflect", "circular": "circular"}


@runtime_checkable
class SubstitutableConv(Protocol):
    """A conv pruning may replace by a cheaper operator kind, as the fits read it.

    - ``weight``: (out, in, 3, 3, 3), a dense kernel (``groups`` 1, if it has the attribute), and
      ``bias`` (out,) or None; spatial padding 1 on each side;
    - ``current_tap``: the temporal tap that reads the frame being produced (2 for a causal conv);
    - ``kernel_input(args)``: the frames the kernel ran on in a forward call with ``args`` (what
      precedes the new frames, from its state or its padding rule, then the new frames);
    - optional ``padding_mode`` (spatial: "zeros", "replicate", ...; default "zeros") and
      ``history_init`` (what precedes a clip's first frame: "zeros" or "replicate"; default "zeros").

    The student's module at the same path declares ``substitutes_as`` (the operator kind a fit
    makes of it, "dwsep3d" or "spatial2d") and is built with the conv's padding.
    """

    weight: Tensor
    bias: Tensor | None
    current_tap: int

    def kernel_input(self, args: tuple) -> Tensor: ...


def substitutable(module: nn.Module) -> bool:
    """Whether ``module`` is a ``SubstitutableConv``."""
    if not isinstance(module, SubstitutableConv) or not isinstance(module.weight, Tensor):
        return False
    dense = getattr(module, "groups", 1) == 1
    return dense and module.weight.dim() == 5 and tuple(module.weight.shape[2:]) == (3, 3, 3)


def upsample_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a dense 3x3 2D conv padded by one zero pixel: an upsampler's conv, which
    runs on the nearest-upsampled frames (``blocks.Upsample``) and a ``dwsep2x`` fit can replace."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and tuple(module.kernel_size) == (3, 3)
        and tuple(module.padding) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and module.padding_mode == "zeros"
    )


def padding_of(module: nn.Module) -> tuple[str | None, str | None]:
    """``(padding_mode, history_init)`` a conv (or the first of its submodules that says) declares;
    None where nothing does. A substitutable conv that declares nothing pads with zeros."""
    mode = history = None
    for m in module.modules():
        if mode is None and isinstance(getattr(m, "padding_mode", None), str):
            mode = m.padding_mode
        if history is None and isinstance(getattr(m, "history_init", None), str):
            history = m.history_init
    if substitutable(module):
        return mode or "zeros", history or "zeros"
    return mode, history


def _pad(x: Tensor, mode: str) -> Tensor:
    """One pixel of spatial padding on each side of (N, C, H, W) or (N, C, T, H, W) in ``mode``."""
    return F.pad(x, (1, 1, 1, 1) + (0, 0) * (x.dim() - 4), mode=PAD_MODES[mode])


@dataclass
class Substitution:
    conv: str  # module path in the teacher
    op: str
    choice: str
    errors: dict[str, float]
    params: dict[str, Tensor] = field(repr=False, default_factory=dict)  # names under the student conv
    padding_mode: str = "zeros"  # the spatial padding the fit used: the conv's
    history: str = "zeros"  # what preceded the first frame in the conv's kernel input


def _rows(x: Tensor) -> Tensor:
    return x.movedim(1, -1).reshape(-1, x.shape[1])


class _SpatialFit:
    """Statistics for replacing a causal conv by a per-frame 2D conv."""

    def __init__(self, conv: SubstitutableConv, generator: torch.Generator) -> None:
        w = conv.weight.detach().double()
        self.candidates = {"current_tap": w[:, :, conv.current_tap], "tap_sum": w.sum(2)}
        self.cout, self.cin = w.shape[:2]
        self.bias = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(self.cout)
        self.padding_mode, self.history = padding_of(conv)
        n = self.cin * 9 + 1
        self.ptp = torch.zeros(n, n, dtype=torch.float64)
        self.pty = torch.zeros(n, self.cout, dtype=torch.float64)
        self.yty = 0.0
        self.sq = dict.fromkeys(self.candidates, 0.0)
        self.ref = 0.0
        self.generator = generator

    def observe(self, x: Tensor, y: Tensor) -> None:
        """x: the conv's new frames (B, Cin, T, H, W); y: its output (B, Cout, T, H, W)."""
        frames = _pad(x.double().transpose(1, 2).flatten(0, 1), self.padding_mode)  # (BT, Cin, H+2, W+2)
        target = y.double().transpose(1, 2).flatten(0, 1)
        self.ref += float((target**2).sum())
        for name, k in self.candidates.items():
            self.sq[name] += float(((F.conv2d(frames, k, self.bias) - target) ** 2).sum())
        patches = F.unfold(frames, 3).transpose(1, 2).reshape(-1, self.cin * 9)
        ys = _rows(target)
        if patches.shape[0] > MAX_ROWS:
            idx = torch.randperm(patches.shape[0], generator=self.generator)[:MAX_ROWS]
            patches, ys = patches[idx], ys[idx]
        patches = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=torch.float64)], dim=1)
        self.ptp += patches.T @ patches
        self.pty += patches.T @ ys
        self.yty += float((ys**2).sum())

    def result(self, path: str) -> Substitution:
        errors = {name: sq / max(self.ref, 1e-30) for name, sq in self.sq.items()}
        lam = 1e-6 * torch.diagonal(self.ptp).mean().clamp(min=1e-30)
        sol = torch.linalg.solve(self.ptp + lam * torch.eye(self.ptp.shape[0], dtype=torch.float64), self.pty)
        resid = self.yty - 2 * float((sol * self.pty).sum()) + float(((self.ptp @ sol) * sol).sum())
        errors["least_squares"] = max(resid, 0.0) / max(self.yty, 1e-30)
        kernels = dict(self.candidates)
        kernels["least_squares"] = sol[:-1].T.reshape(self.cout, self.cin, 3, 3)
        biases = dict.fromkeys(self.candidates, self.bias)
        biases["least_squares"] = sol[-1]
        choice = min(errors, key=errors.__getitem__)
        params = {"weight": kernels[choice].float(), "bias": biases[choice].float()}
        return Substitution(path, "spatial2d", choice, errors, params, self.padding_mode, self.history)


class _DepthwiseFit:
    """Statistics for replacing a causal conv by depthwise (3x3x3) + pointwise (1x1x1) convs."""

    def __init__(self, conv: SubstitutableConv, generator: torch.Generator) -> None:
        w = conv.weight.detach().double()  # (out, in, 3, 3, 3)
        cout, cin = w.shape[:2]
        u, s, vh = torch.linalg.svd(w.flatten(2).transpose(0, 1), full_matrices=False)  # per input channel
        self.depthwise = (vh[:, 0, :] * s[:, :1].sqrt()).reshape(cin, 1, 3, 3, 3)
        self.pointwise_svd = (u[:, :, 0] * s[:, :1].sqrt()).T  # (out, in)
        self.bias = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(cout)
        self.padding_mode, self.history = padding_of(conv)
        n = cin + 1
        self.ztz = torch.zeros(n, n, dtype=torch.float64)
        self.zty = torch.zeros(n, cout, dtype=torch.float64)
        self.yty = 0.0
        self.generator = generator

    def observe(self, xh: Tensor, y: Tensor) -> None:
        """xh: history + new frames (B, Cin, T+2, H, W); y: the conv's output (B, Cout, T, H, W)."""
        z = F.conv3d(_pad(xh.double(), self.padding_mode), self.depthwise, groups=xh.shape[1])
        zs, ys = _rows(z), _rows(y.double())
        if zs.shape[0] > MAX_ROWS:
            idx = torch.randperm(zs.shape[0], generator=self.generator)[:MAX_ROWS]
            zs, ys = zs[idx], ys[idx]
        zs = torch.cat([zs, torch.ones(zs.shape[0], 1, dtype=torch.float64)], dim=1)
        self.ztz += zs.T @ zs
        self.zty += zs.T @ ys
        self.yty += float((ys**2).sum())

    def _error(self, p: Tensor) -> float:
        resid = self.yty - 2 * float((p * self.zty).sum()) + float(((self.ztz @ p) * p).sum())
        return max(resid, 0.0) / max(self.yty, 1e-30)

    def result(self, path: str) -> Substitution:
        svd = torch.cat([self.pointwise_svd.T, self.bias[None]], dim=0)  # (in + 1, out)
        lam = 1e-6 * torch.diagonal(self.ztz).mean().clamp(min=1e-30)
        ls = torch.linalg.solve(self.ztz + lam * torch.eye(self.ztz.shape[0], dtype=torch.float64), self.zty)
        errors = {"svd": self._error(svd), "svd+least_squares": self._error(ls)}
        choice = min(errors, key=errors.__getitem__)
        p = svd if choice == "svd" else ls
        params = {
            "depthwise.weight": self.depthwise.float(),
            "pointwise.weight": p[:-1].T[..., None, None, None].float(),
            "pointwise.bias": p[-1].float(),
        }
        return Substitution(path, "dwsep3d", choice, errors, params, self.padding_mode, self.history)


class _UpsampleFit:
    """Statistics for replacing an upsampler's dense 3x3 conv (on nearest-2x frames) by a pointwise
    conv at the low resolution and a depthwise 3x3 conv after the upsampling."""

    def __init__(self, conv: nn.Conv2d, generator: torch.Generator, rank: int = 1) -> None:
        w = conv.weight.detach().double()  # (out, in, 3, 3)
        cout, r = w.shape[0], rank
        # (an SVD weighted by the inputs' second moments fits the calibration features better, layer
        # by layer, but gave a worse student, before and after distillation: benchmarks/RESULTS.md)
        u, s, vh = torch.linalg.svd(w.flatten(2), full_matrices=False)  # per output channel: (in, 9)
        root = s[:, :r].sqrt()  # the rank-r split: pointwise rows o*r + k, depthwise filters (o, k)
        rows = u[:, :, :r] * root[:, None]
        self.pointwise = rows.transpose(1, 2).reshape(cout * r, -1)[..., None, None]
        self.depthwise_svd = (vh[:, :r, :] * root[..., None]).reshape(cout, r, 3, 3)
        self.bias = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(cout)
        self.rank, n = r, 9 * r + 1  # per output channel: 9 taps of each of its r channels, and the bias
        self.ztz = torch.zeros(cout, n, n, dtype=torch.float64)
        self.zty = torch.zeros(cout, n, dtype=torch.float64)
        self.yty = torch.zeros(cout, dtype=torch.float64)
        self.generator = generator

    def observe(self, x: Tensor, y: Tensor) -> None:
        """x: the conv's input, nearest-upsampled frames (N, Cin, H, W); y: its output (N, Cout, H, W).

        Each output channel has only 9r + 1 unknowns, so a few thousand sampled pixels per call do:
        their 3x3 neighbourhoods are gathered (never an unfolded copy of a wide activation)."""
        n, _, h, w = x.shape
        rows = n * h * w
        idx = torch.randperm(rows, generator=self.generator)[:UPSAMPLE_ROWS] if rows > UPSAMPLE_ROWS else None
        idx = torch.arange(rows) if idx is None else idx
        b, yy, xx = idx // (h * w), idx % (h * w) // w, idx % w
        padded = F.pad(x, (1, 1, 1, 1))
        neighbourhoods = torch.stack(
            [padded[b, :, yy + dy, xx + dx] for dy in range(3) for dx in range(3)], dim=-1
        ).double()  # (rows, Cin, 9)
        c = self.bias.shape[0]
        pointwise = self.pointwise.flatten(1)  # (Cout * r, Cin): a 1x1 conv commutes with the upsampling
        taps = torch.einsum("ki,nit->knt", pointwise, neighbourhoods)  # (Cout * r, rows, 9)
        taps = taps.reshape(c, self.rank, -1, 9).transpose(1, 2).reshape(c, -1, 9 * self.rank)
        ys = y[b, :, yy, xx].double().T  # (Cout, rows)
        taps = torch.cat([taps, torch.ones(*taps.shape[:2], 1, dtype=torch.float64)], dim=2)
        self.ztz += taps.transpose(1, 2) @ taps
        self.zty += (taps.transpose(1, 2) @ ys[..., None])[..., 0]
        self.yty += (ys**2).sum(1)

    def _error(self, p: Tensor) -> float:
        quad = (p[:, None, :] @ self.ztz @ p[:, :, None]).flatten()
        resid = self.yty - 2 * (p * self.zty).sum(1) + quad
        return float(resid.clamp(min=0).sum()) / max(float(self.yty.sum()), 1e-30)

    def result(self, path: str) -> Substitution:
        svd = torch.cat([self.depthwise_svd.flatten(1), self.bias[:, None]], dim=1)  # (out, 9r + 1)
        lam = 1e-6 * torch.diagonal(self.ztz, dim1=1, dim2=2).mean(1).clamp(min=1e-30)
        eye = torch.eye(self.ztz.shape[1], dtype=torch.float64)
        ls = torch.linalg.solve(self.ztz + lam[:, None, None] * eye, self.zty[..., None])[..., 0]
        errors = {"svd": self._error(svd), "svd+least_squares": self._error(ls)}
        choice = min(errors, key=errors.__getitem__)
        p = svd if choice == "svd" else ls
        params = {
            "pointwise.weight": self.pointwise.float(),
            "depthwise.weight": p[:, :-1].reshape(-1, self.rank, 3, 3).float(),
            "depthwise.bias": p[:, -1].float(),
        }
        return Substitution(path, "dwsep2x", choice, errors, params)


class _LowRankUpsampleFit:
    """Statistics for confining an upsampler's dense 3x3 conv to ``rank`` output directions: the
    principal directions of its outputs. With the 3x3 part free, the best rank-r map from the
    conv's input neighbourhoods to its outputs (least squares) projects the outputs themselves
    onto their top r principal directions, so the fit needs only their mean and covariance."""

    def __init__(self, conv: nn.Conv2d, generator: torch.Generator, rank: int = 1) -> None:
        self.weight = conv.weight.detach().double()  # (out, in, 3, 3)
        cout = self.weight.shape[0]
        self.bias = conv.bias.detach().double() if conv.bias is not None else self.weight.new_zeros(cout)
        self.rank = rank
        self.count = 0
        self.total = torch.zeros(cout, dtype=torch.float64)
        self.yty = torch.zeros(cout, cout, dtype=torch.float64)

    def observe(self, x: Tensor, y: Tensor) -> None:
        """y: the conv's output (N, Cout, H, W) on nearest-upsampled frames; its input is not needed."""
        rows = y.transpose(0, 1).reshape(y.shape[1], -1).double()  # (Cout, pixels)
        self.count += rows.shape[1]
        self.total += rows.sum(1)
        self.yty += rows @ rows.T

    def result(self, path: str) -> Substitution:
        mean = self.total / max(self.count, 1)
        covariance = self.yty / max(self.count, 1) - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(covariance)  # ascending
        u = vectors[:, -self.rank :].flip(1)  # (Cout, r): the top directions, largest first
        energy = float(torch.diagonal(self.yty).sum()) / max(self.count, 1)
        dropped = float(values[: -self.rank].clamp(min=0).sum()) if self.rank < len(values) else 0.0
        errors = {"principal_directions": dropped / max(energy, 1e-30)}
        params = {
            "conv.weight": torch.einsum("or,oikl->rikl", u, self.weight).float(),
            "conv.bias": (u.T @ (self.bias - mean)).float(),
            "expand.weight": u[..., None, None].float(),
            "expand.bias": mean.float(),
        }
        return Substitution(path, "lowrank2x", "principal_directions", errors, params)


Fit = _SpatialFit | _DepthwiseFit | _UpsampleFit | _LowRankUpsampleFit
FITS: dict[str, Callable[..., Fit]] = {
    "spatial2d": _SpatialFit,
    "dwsep3d": _DepthwiseFit,
    "dwsep2x": _UpsampleFit,
    "lowrank2x": _LowRankUpsampleFit,
}
UPSAMPLE_FITS = ("dwsep2x", "lowrank2x")  # fits of an upsampler's 3x3 conv (``upsample_conv``), each of a rank


def replaceable(module: nn.Module, op: str) -> bool:
    """Whether a fit can make operator kind ``op`` of ``module`` (a dense 3x3x3 conv for the 3D
    kinds, an upsampler's 3x3 conv for ``dwsep2x`` and ``lowrank2x``)."""
    return upsample_conv(module) if op in UPSAMPLE_FITS else substitutable(module)


@torch.inference_mode()
def fit_substitutions(
    model: nn.Module,
    targets: dict[str, str],
    latents: list[Tensor],
    *,
    options: dict[str, dict[str, Any]] | None = None,
    chunk: int = 2,
    progress: bool = False,
) -> list[Substitution]:
    """Fit each conv in ``targets`` (path -> op) on calibration data decoded by ``model``;
    ``options`` (path -> keywords) shape a fit (a separable upsample conv's ``rank``)."""
    generator = torch.Generator().manual_seed(0)
    fits: dict[str, Fit] = {}
    handles = []
    for path, op in targets.items():
        conv = model.get_submodule(path)
        if op not in FITS:
            raise ValueError(f"{path}: no fit makes operator kind {op!r} (fits: {', '.join(FITS)})")
        if not replaceable(conv, op):
            raise TypeError(f"{path}: {type(conv).__name__} is not a conv pruning can make {op} of")
        fit = FITS[op](conv, generator, **(options or {}).get(path, {}))
        fits[path] = fit
        handles.append(conv.register_forward_hook(_observer(conv, fit)))
    try:
        run(model, latents, chunk, "calibrating: operator substitution", progress)
    finally:
        for h in handles:
            h.remove()
    return [fit.result(path) for path, fit in fits.items()]


def _observer(conv: nn.Module, fit: Fit) -> Callable:
    def hook(_module: nn.Module, args: tuple, output: tuple | Tensor) -> None:
        if isinstance(fit, (_UpsampleFit, _LowRankUpsampleFit)):  # a plain conv: its output is the tensor
            fit.observe(args[0], output)
            return
        y = output[0]
        if isinstance(fit, _SpatialFit):
            fit.observe(args[0], y)
        else:  # the frames the kernel ran on: history (or padding), then the new ones
            fit.observe(conv.kernel_input(args), y)

    return hook
