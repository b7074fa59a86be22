"""Which channels to keep, and how to fold the dropped ones into what remains.

Everything works on augmented Gram matrices of feature maps: for features X (N samples x C
channels) the (C+1) x (C+1) matrix of [X, 1]^T [X, 1], so that means (intercepts) come for free.

- ``independence_select``: greedy pivoted Cholesky. With the constant already chosen, keep the
  channel whose residual energy (after projecting out the channels already kept) is largest;
  that residual energy is the channel's independence score. Exact linear combinations of kept
  channels score zero and are never kept while an independent channel remains.
- ``compensation``: ridge least squares ``F_drop ~ W F_keep + b``; folded into a consumer's
  input columns, the consumer sees (nearly) what it saw before pruning.
- ``l1_select``: the magnitude baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Selection:
    keep: list[int]  # kept channel indices, ascending
    scores: list[float]  # per channel: residual energy (independence) or L1 magnitude

    @property
    def drop(self) -> list[int]:
        kept = set(self.keep)
        return [i for i in range(len(self.scores)) if i not in kept]


def augmented_gram(x: Tensor, max_rows: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """[X, 1]^T [X, 1] in float64 for features x with channels on dim 1 (any other dims)."""
    c = x.shape[1]
    rows = x.detach().movedim(1, -1).reshape(-1, c)
    if max_rows is not None and rows.shape[0] > max_rows:
        idx = torch.randperm(rows.shape[0], generator=generator)[:max_rows]
        rows = rows[idx]
    rows = torch.cat([rows.double(), torch.ones(rows.shape[0], 1, dtype=torch.float64)], dim=1)
    return rows.T @ rows


def independence_select(gram: Tensor, k: int, forced: Sequence[int] = ()) -> Selection:
    """Keep ``k`` of the C channels of an augmented (C+1)x(C+1) Gram matrix, most independent first.

    ``forced`` channels are kept whatever their scores (another layer reads them); the rest are
    chosen greedily after projecting them out.
    """
    g = gram.double()
    c = g.shape[0] - 1
    if not 1 <= k <= c or len(forced) > k:
        raise ValueError(f"cannot keep {k} of {c} channels ({len(forced)} of them required)")
    forced = list(forced)
    residual = torch.diagonal(g).clone()
    basis = torch.zeros(c + 1, k + 1, dtype=torch.float64)
    scores = torch.zeros(c, dtype=torch.float64)
    chosen: list[int] = []
    tiny = 1e-12 * float(torch.diagonal(g).abs().max())
    for m in range(k + 1):
        if m == 0:
            i = c  # the constant: means are never a reason to keep a channel
        elif m <= len(forced):
            i = forced[m - 1]
            scores[i] = residual[i].clamp(min=0)
            chosen.append(i)
        else:
            masked = residual[:c].clone()
            masked[chosen] = -torch.inf
            i = int(torch.argmax(masked))
            scores[i] = residual[i].clamp(min=0)
            chosen.append(i)
        if residual[i] <= tiny:  # nothing left of it to project out (a dependent forced channel)
            continue
        pivot = residual[i].sqrt()
        column = (g[:, i] - basis[:, :m] @ basis[i, :m]) / pivot
        basis[:, m] = column
        residual = residual - column**2
    left = [j for j in range(c) if j not in chosen]
    scores[left] = residual[left].clamp(min=0)
    scale = torch.diagonal(g)[:c].mean().clamp(min=1e-30)
    return Selection(sorted(chosen), (scores / scale).tolist())


def l1_select(magnitudes: Tensor, k: int, forced: Sequence[int] = ()) -> Selection:
    """Keep the ``k`` channels of largest magnitude (L1 norm of the weights producing them),
    ``forced`` ones first."""
    ranked = magnitudes.double().clone()
    ranked[list(forced)] = torch.inf
    keep = torch.topk(ranked, k).indices.sort().values.tolist()
    return Selection(keep, magnitudes.double().tolist())


@dataclass
class Compensation:
    weight: Tensor  # (dropped, kept): F_drop ~ weight @ F_keep + bias
    bias: Tensor  # (dropped,)
    error_before: float  # energy of the dropped features / energy of all features
    error_after: float  # residual energy after compensation / energy of all features


def compensation(gram: Tensor, keep: list[int], ridge: float = 1e-6) -> Compensation:
    """Ridge least squares of the dropped channels on the kept ones (and a constant)."""
    g = gram.double()
    c = g.shape[0] - 1
    drop = [i for i in range(c) if i not in set(keep)]
    kept = [*keep, c]
    g_kk = g[kept][:, kept]
    g_dk = g[drop][:, kept]
    g_dd = g[drop][:, drop]
    lam = ridge * torch.diagonal(g_kk).mean().clamp(min=1e-30)
    solution = torch.linalg.solve(g_kk + lam * torch.eye(len(kept), dtype=torch.float64), g_dk.T).T
    total = torch.trace(g[:c, :c]).clamp(min=1e-30)
    residual = torch.trace(g_dd) - 2 * torch.sum(solution * g_dk) + torch.sum((solution @ g_kk) * solution)
    return Compensation(
        weight=solution[:, :-1],
        bias=solution[:, -1],
        error_before=float(torch.trace(g_dd) / total) if drop else 0.0,
        error_after=float(residual.clamp(min=0) / total) if drop else 0.0,
    )


def fold_into_consumer(
    weight: Tensor, bias: Tensor | None, keep: list[int], comp: Compensation
) -> tuple[Tensor, Tensor | None]:
    """A consumer's weight (out, C, *kernel) over the kept input channels, compensated.

    Column ``k`` gains ``sum_d weight[:, d] * W[d, k]``; the intercept ``b`` becomes a bias
    (a constant input map through the kernel: the sum of its taps).
    """
    drop = [i for i in range(weight.shape[1]) if i not in set(keep)]
    w = weight.double()
    folded = w[:, keep] + torch.einsum("od...,dk->ok...", w[:, drop], comp.weight)
    new_bias = bias
    if bias is not None:
        taps = w[:, drop].flatten(2).sum(-1) if w.dim() > 2 else w[:, drop]
        new_bias = (bias.double() + taps @ comp.bias).to(bias.dtype)
    return folded.to(weight.dtype), new_bias
