"""The three distillation phases as one objective module (so DistributedDataParallel can wrap it).

Stage boundaries are compared at the teacher channels the student kept when it was pruned
(``StudentConfig.teacher_channels``): pruning keeps a subset of channels, so no projection heads
are needed. All losses are per-sample means (see ``losses``).

1. ``align``: teacher-forced, stages independent. Each student stage runs, chunk by chunk with
   its own state, on the teacher's input of that stage and is pulled towards the teacher's output.
2. ``transfer``: the student runs end to end through the streaming step; per-stage feature losses
   and output losses (L1 + SSIM), their weights moving linearly from features to outputs.
3. ``refine``: output losses against the teacher and, per sample, against the real frames (trusted
   as much as the teacher itself reconstructs them), plus temporal consistency.

Gradient checkpointing (``DistillObjective.checkpointing``) covers every phase: each run of a
student decoder stage, whether stage by stage (align) or in the streaming decode (transfer,
refine), keeps only its inputs and recomputes its activations in the backward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import checkpoint as activation_checkpoint

from ..models.blocks import plain_ops
from ..models.streaming import StreamingDecoder, chunk_bounds, clocked, zero_state
from ..models.vae import LatentDecoder
from .config import DistillConfig
from .losses import feature_loss, ground_truth_trust, output_loss, temporal_loss


@contextmanager
def captured_stages(model: LatentDecoder) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
    """Record (input, output) of every decoder stage on every call, in order."""
    record: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, _, _ in model.decoder.stages()}
    handles = []
    for name, _, block in model.decoder.stages():
        handles.append(block.register_forward_hook(lambda _m, args, out, n=name: record[n].append((args[0], out[0]))))
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


@contextmanager
def checkpointed_stages(model: LatentDecoder, enabled: bool = True) -> Iterator[None]:
    """Within the block, every decoder stage of ``model`` runs under activation checkpointing.

    The stage's ``forward`` is wrapped (not ``__call__``), so forward hooks (``captured_stages``)
    see each call once, and the recomputation in backward records nothing.
    """
    if not enabled:
        yield
        return
    blocks = [block for _, _, block in model.decoder.stages()]
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward again


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        return activation_checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def streaming_decode(model: LatentDecoder, latents: Tensor, chunk: int, clamp: bool) -> Tensor:
    """Differentiable decode through the streaming loop: the first frame, then ``chunk`` at a time.

    A decoder with latency runs its one-shot form instead (which its stream equals): its stream's
    warm-up positions are not frames, and stage features must be frames to be compared.
    """
    if clocked(model):
        return model.decode_clip(latents, clamp=clamp)
    stream = StreamingDecoder(model, inference=False, clamp=clamp)
    return torch.cat([stream.push(latents[:, :, a:b]) for a, b in chunk_bounds(latents.shape[2], chunk)], dim=2)


@dataclass
class TeacherPass:
    frames: Tensor  # clamped, as the teacher serves them
    stages: dict[str, list[tuple[Tensor, Tensor]]]  # per stage, per chunk: (input, output)


@torch.no_grad()
def teacher_pass(teacher: LatentDecoder, latents: Tensor, chunk: int) -> TeacherPass:
    # plain ops: the targets must not depend on how a batch is split across ranks (the fast eager
    # paths' oneDNN kernels round differently for batch 1 and 2, and training amplifies it)
    with plain_ops(), captured_stages(teacher) as record:
        frames = streaming_decode(teacher, latents, chunk, clamp=True)
    return TeacherPass(frames, record)


def _lerp(pair: tuple[float, float], progress: float) -> float:
    return pair[0] + (pair[1] - pair[0]) * progress


class DistillObjective(nn.Module):
    """``forward(phase, ...)`` returns the batch loss and its parts (floats) for logging."""

    def __init__(self, student: LatentDecoder, teacher_channels: dict[str, list[int]], config: DistillConfig) -> None:
        super().__init__()
        self.student = student
        self.config = config
        names = [name for name, _, _ in student.decoder.stages()]
        self.keep_out = {n: torch.tensor(teacher_channels[n]) if n in teacher_channels else None for n in names}
        self.keep_in = {n: self.keep_out[prev] for prev, n in itertools.pairwise(names)}
        self.keep_in[names[0]] = None
        # stages whose channels match no known teacher channels (a released student's narrowed ones):
        # their outputs are not compared, and the stage after them cannot be teacher-forced
        unknown = {n for n in names if n in teacher_channels and not teacher_channels[n]}
        self.compared = [n for n in names if n not in unknown]
        self.forced = [
            n for prev, n in zip([None, *names[:-1]], names, strict=True) if n not in unknown and prev not in unknown
        ]
        self.checkpointing = False

    def forward(
        self, phase: str, latents: Tensor, teacher: TeacherPass, truth: Tensor | None, progress: float
    ) -> tuple[Tensor, dict[str, float]]:
        with checkpointed_stages(self.student, self.checkpointing and torch.is_grad_enabled()):
            if phase == "align":
                return self.align(teacher)
            if phase == "transfer":
                return self.transfer(latents, teacher, progress)
            return self.refine(latents, teacher, truth)

    @staticmethod
    def _select(x: Tensor, keep: Tensor | None) -> Tensor:
        return x if keep is None else x.index_select(1, keep.to(x.device))

    def align(self, teacher: TeacherPass) -> tuple[Tensor, dict[str, float]]:
        total = None
        parts = {}
        one_shot = getattr(self.student.decoder, "one_shot_context", None)  # decoders with latency
        for name, scale, block in self.student.decoder.stages():
            if name not in self.forced:
                continue
            chunks = teacher.stages[name]
            b, _, _, h, w = chunks[0][0].shape
            h, w = int(h / scale), int(w / scale)  # back to the latent grid
            p = next(self.student.parameters())
            state = zero_state(block.state_specs(name, scale), b, h, w, dtype=p.dtype, device=p.device)
            extra = () if one_shot is None else (one_shot(b, h, w),)
            loss = None
            for i, (t_in, t_out) in enumerate(chunks):
                y, state = block(self._select(t_in, self.keep_in[name]), state, i == 0, *extra)
                term = feature_loss(y, self._select(t_out, self.keep_out[name]))
                loss = term if loss is None else loss + term
            loss = loss / len(chunks)
            parts[f"align/{name}"] = float(loss.detach().mean())
            total = loss if total is None else total + loss
        return total.mean(), parts

    def transfer(self, latents: Tensor, teacher: TeacherPass, progress: float) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config.transfer
        with captured_stages(self.student) as record:
            frames = streaming_decode(self.student, latents, self.config.chunk, clamp=False)
        features = None
        for name, calls in record.items():
            if name not in self.compared:
                continue
            s_out = torch.cat([out for _, out in calls], dim=2)
            t_out = torch.cat([out for _, out in teacher.stages[name]], dim=2)
            term = feature_loss(s_out, self._select(t_out, self.keep_out[name]))
            features = term if features is None else features + term
        features = features / len(self.compared)
        outputs = output_loss(frames, teacher.frames, cfg.ssim_weight)
        wf, wo = _lerp(cfg.feature_weight, progress), _lerp(cfg.output_weight, progress)
        loss = wf * features + wo * outputs
        return loss.mean(), {
            "transfer/features": float(features.detach().mean()),
            "transfer/outputs": float(outputs.detach().mean()),
            "transfer/feature_weight": wf,
        }

    def refine(self, latents: Tensor, teacher: TeacherPass, truth: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config.refine
        frames = streaming_decode(self.student, latents, self.config.chunk, clamp=False)
        to_teacher = output_loss(frames, teacher.frames, cfg.ssim_weight)
        temporal = temporal_loss(frames, teacher.frames)
        loss = cfg.teacher_weight * to_teacher + cfg.temporal_weight * temporal
        parts = {
            "refine/teacher": float(to_teacher.detach().mean()),
            "refine/temporal": float(temporal.detach().mean()),
        }
        if truth is not None and cfg.gt_weight:
            trust = ground_truth_trust(teacher.frames, truth, cfg.gt_psnr_range)
            to_truth = output_loss(frames, truth, cfg.ssim_weight)
            loss = loss + cfg.gt_weight * trust * to_truth
            parts.update(
                {"refine/ground_truth": float(to_truth.detach().mean()), "refine/trust": float(trust.detach().mean())}
            )
        return loss.mean(), parts
