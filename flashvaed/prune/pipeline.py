"""Teacher -> student initialisation: channel pruning with compensation, then operator substitution.

1. Resolve the student spec against the teacher: absolute widths per stage.
2. Derive the channel groups of the teacher decoder (``groups.py``).
3. Decode calibration latents with the teacher, collecting the Gram matrix of every consumer's
   input; select each group's channels (independence or L1) and, for independence, fit the
   least-squares compensation of every consumer and the rescaling of every norm over the group.
4. Build the pruned teacher (same operators, student widths) with compensation folded in.
5. Fit the student's cheaper operators to the pruned teacher's convs (``substitute.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..metrics import psnr
from ..models.layout import DecoderLayout
from ..models.student import FlashStudent, StudentConfig, StudentSpec
from ..models.summary import summarize
from ..models.wan import WanVAE, teacher_layout
from .calibration import input_grams, norm_ratios
from .groups import ROWS, TIME_ROWS, V_ROWS, ChannelGroup, channel_groups
from .select import Compensation, Selection, compensation, fold_into_consumer, independence_select, l1_select
from .substitute import Substitution, fit_substitutions

CRITERIA = ("independence", "l1")


@dataclass
class GroupDecision:
    group: ChannelGroup
    keep_count: int
    selection: Selection | None = None
    compensations: dict[str, Compensation] = field(default_factory=dict)
    norm_scales: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        comps = self.compensations
        return {
            "name": self.group.name,
            "kind": self.group.kind,
            "kept": self.keep_count,
            "total": self.group.size,
            "keep": self.selection.keep if self.selection else list(range(self.group.size)),
            "scores": [round(s, 6) for s in self.selection.scores] if self.selection else [],
            "error_before": _mean([c.error_before for c in comps.values()]),
            "error_after": _mean([c.error_after for c in comps.values()]),
            "consumers": {p: {"error_before": c.error_before, "error_after": c.error_after} for p, c in comps.items()},
            "norm_scales": self.norm_scales,
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class PruneResult:
    student: FlashStudent
    pruned: FlashStudent  # the teacher at student widths, before operator substitution
    decisions: list[GroupDecision]
    substitutions: list[Substitution]
    notes: list[str]
    report: dict[str, Any]


def pruned_layout(layout: DecoderLayout, teacher: DecoderLayout) -> DecoderLayout:
    """The student's widths with the teacher's operators: what channel pruning produces."""
    for name, st in layout.stages.items():
        t = teacher.stages[name]
        if (t.in_width != t.width) != (st.in_width != st.width):
            raise InputError(f"{name}: the input width must differ from the stream width, as in the teacher")
    return replace(
        layout,
        middle=replace(layout.middle, op="causal3d", shortcut=False),
        up=tuple(replace(st, op="causal3d", shortcut=False) for st in layout.up),
        head_op="causal3d",
    )


def _l1_magnitudes(state: dict[str, Tensor], group: ChannelGroup) -> Tensor:
    total = torch.zeros(group.size, dtype=torch.float64)
    for path, role in group.producers:
        w = state[f"{path}.weight"].double().flatten(1).abs().sum(1)
        if role == TIME_ROWS:
            w = w[: group.size] + w[group.size :]
        elif role == V_ROWS:
            w = w[-group.size :]
        total += w
    return total


def select_channels(
    teacher: WanVAE,
    groups: list[ChannelGroup],
    targets: list[int],
    latents: list[Tensor],
    criterion: str,
    *,
    chunk: int,
    progress: bool,
) -> list[GroupDecision]:
    decisions = [GroupDecision(g, k) for g, k in zip(groups, targets, strict=True)]
    if criterion == "l1":
        state = teacher.state_dict()
        for d in decisions:
            if d.keep_count < d.group.size:
                d.selection = l1_select(_l1_magnitudes(state, d.group), d.keep_count)
        return decisions
    pruned = [d for d in decisions if d.keep_count < d.group.size]
    if not pruned:
        return decisions
    consumers = [p for d in pruned for p in d.group.consumers]
    grams = input_grams(teacher, consumers, latents, chunk=chunk, progress=progress)
    for d in pruned:
        c = d.group.size
        combined = sum(grams[p] / torch.trace(grams[p][:c, :c]).clamp(min=1e-30) for p in d.group.consumers)
        d.selection = independence_select(combined, d.keep_count)
        d.compensations = {p: compensation(grams[p], d.selection.keep) for p in d.group.consumers}
    keeps = {n: d.selection.keep for d in pruned for n in d.group.norms}
    ratios = norm_ratios(teacher, keeps, latents, chunk=chunk, progress=progress) if keeps else {}
    for d in pruned:
        scale = math.sqrt(d.group.size / d.keep_count)
        d.norm_scales = {n: scale * ratios[n] for n in d.group.norms}
    return decisions


def pruned_state_dict(teacher: WanVAE, decisions: list[GroupDecision]) -> dict[str, Tensor]:
    """The teacher's decoder weights at the kept channels, with compensation folded in."""
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items() if k.startswith(("decoder.", "post_quant"))}
    for d in decisions:
        if d.selection is None:
            continue
        keep = torch.tensor(d.selection.keep)
        for path in d.group.consumers:  # input columns first, on the full weights
            w, b = state[f"{path}.weight"], state.get(f"{path}.bias")
            if path in d.compensations:
                w, b = fold_into_consumer(w, b, d.selection.keep, d.compensations[path])
            else:
                w = w.index_select(1, keep)
            state[f"{path}.weight"] = w
            if b is not None:
                state[f"{path}.bias"] = b
        for path in d.group.norms:
            g = state[f"{path}.gamma"].index_select(0, keep)
            state[f"{path}.gamma"] = g * d.norm_scales.get(path, 1.0)
    for d in decisions:  # then output rows
        if d.selection is None:
            continue
        keep = torch.tensor(d.selection.keep)
        c = d.group.size
        for path, role in d.group.producers:
            rows = {ROWS: keep, TIME_ROWS: torch.cat([keep, keep + c])}.get(role)
            if role == V_ROWS:
                total = state[f"{path}.weight"].shape[0]
                rows = torch.cat([torch.arange(total - c), keep + total - c])
            for name in ("weight", "bias"):
                if f"{path}.{name}" in state:
                    state[f"{path}.{name}"] = state[f"{path}.{name}"].index_select(0, rows)
    return state


def stage_channels(teacher: WanVAE, decisions: list[GroupDecision]) -> dict[str, list[int]]:
    """Per decoder stage (but the head), the teacher channels of its output the student keeps."""
    kept = {}
    for d in decisions:
        keep = d.selection.keep if d.selection else list(range(d.group.size))
        for path, role in d.group.producers:
            if role == ROWS:
                kept[path] = keep
    channels = {}
    for name, _, block in teacher.decoder.stages():
        if name == "head":
            continue
        if name == "conv_in":
            last = "decoder.conv_in"
        elif block.resample is not None:
            last = f"decoder.{name}.resample.conv"
        else:
            last = f"decoder.{name}.blocks.{len(block.blocks) - 1}.conv2"
        channels[name] = kept[last]
    return channels


def substitution_targets(layout: DecoderLayout) -> dict[str, str]:
    """Conv path (in the pruned model) -> the operator the student uses there."""
    targets = {}
    for name, st in layout.stages.items():
        if st.op != "causal3d":
            for j in range(len(st.hidden) + (1 if name == "middle" else 0)):
                if name == "middle" and j == 1:
                    continue  # the attention block
                for conv in ("conv1", "conv2"):
                    targets[f"decoder.{name}.blocks.{j}.{conv}"] = st.op
    if layout.head_op != "causal3d":
        targets["decoder.head.conv"] = layout.head_op
    return targets


def student_state_dict(student: FlashStudent, pruned: FlashStudent, subs: list[Substitution]) -> dict[str, Tensor]:
    state = dict(pruned.state_dict())
    for sub in subs:
        del state[f"{sub.conv}.weight"], state[f"{sub.conv}.bias"]
        state.update({f"{sub.conv}.{k}": v for k, v in sub.params.items()})
    for key, value in student.state_dict().items():
        if key not in state and ".shortcut." in key:  # a new 1x1 shortcut stands for an identity
            if key.endswith("weight"):
                state[key] = torch.eye(value.shape[0], value.shape[1])[..., None, None, None]
            else:
                state[key] = torch.zeros_like(value)
    return state


@torch.inference_mode()
def fidelity(teacher: WanVAE, models: dict[str, FlashStudent], latents: list[Tensor], chunk: int) -> dict[str, float]:
    """PSNR (dB) of each model's frames against the teacher's on the given latents."""
    reference = [teacher.decode(z, chunk) for z in latents]
    return {
        name: psnr(torch.cat([m.decode(z, chunk) for z in latents]), torch.cat(reference)) for name, m in models.items()
    }


def prune_teacher(
    teacher: WanVAE,
    spec: StudentSpec,
    latents: list[Tensor],
    *,
    criterion: str = "independence",
    chunk: int = 2,
    report_size: tuple[int, int] = (480, 832),
    progress: bool = False,
) -> PruneResult:
    """Initialise the student ``spec`` from ``teacher`` on calibration ``latents``."""
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r} (use {' or '.join(CRITERIA)})")
    if not latents:
        raise InputError("calibration data is empty")
    for z in latents:
        if z.shape[1] != teacher.latent_channels:
            raise InputError(
                f"calibration latents have {z.shape[1]} channels but the teacher reads {teacher.latent_channels}"
            )
    teacher = teacher.eval()
    t_layout = teacher_layout(teacher.config)
    layout, notes = spec.resolve(t_layout, family=teacher.family)
    p_layout = pruned_layout(layout, t_layout)
    pruned = FlashStudent(StudentConfig(f"{spec.name}-pruned", p_layout, teacher.config, spec=spec.to_dict()))
    groups = channel_groups(teacher.decoder)
    targets = [g.size for g in channel_groups(pruned.decoder)]
    decisions = select_channels(teacher, groups, targets, latents, criterion, chunk=chunk, progress=progress)
    pruned.load_state_dict(pruned_state_dict(teacher, decisions), strict=True)
    pruned.eval()
    subs = fit_substitutions(pruned, substitution_targets(layout), latents, chunk=chunk, progress=progress)
    channels = stage_channels(teacher, decisions)
    student = FlashStudent(
        StudentConfig(spec.name, layout, teacher.config, spec=spec.to_dict(), teacher_channels=channels)
    )
    student.load_state_dict(student_state_dict(student, pruned, subs), strict=True)
    student.eval()
    scores = fidelity(teacher, {"pruned": pruned, "student": student}, latents, chunk)
    report = build_report(teacher, student, spec, criterion, decisions, subs, notes, scores, report_size, latents)
    return PruneResult(student, pruned, decisions, subs, notes, report)


def build_report(
    teacher: WanVAE,
    student: FlashStudent,
    spec: StudentSpec,
    criterion: str,
    decisions: list[GroupDecision],
    subs: list[Substitution],
    notes: list[str],
    scores: dict[str, float],
    size: tuple[int, int],
    latents: list[Tensor],
) -> dict[str, Any]:
    t_sum, s_sum = summarize(teacher, *size, chunk=1), summarize(student, *size, chunk=1)
    stages = [
        {
            "name": t.name,
            "teacher_params": t.params,
            "student_params": s.params,
            "teacher_macs": t.macs,
            "student_macs": s.macs,
            "op": _stage_op(student, t.name),
        }
        for t, s in zip(t_sum.stages, s_sum.stages, strict=True)
    ]
    return {
        "student": spec.name,
        "criterion": criterion,
        "teacher": teacher.config.to_dict(),
        "layout": student.config.layout.to_dict(),
        "notes": sorted(set(notes)),
        "calibration": {"clips": len(latents), "latent_shapes": [list(z.shape) for z in latents]},
        "fidelity_vs_teacher_psnr_db": {"pruned": scores["pruned"], "student": scores["student"]},
        "totals": {
            "resolution": list(size),
            "teacher_params": t_sum.params_decoder,
            "student_params": s_sum.params_decoder,
            "teacher_macs_per_frame": t_sum.macs_per_frame,
            "student_macs_per_frame": s_sum.macs_per_frame,
            "macs_ratio": t_sum.macs_steady / max(s_sum.macs_steady, 1),
            "teacher_state_bytes": t_sum.state_bytes,
            "student_state_bytes": s_sum.state_bytes,
        },
        "stages": stages,
        "groups": [d.to_dict() for d in decisions],
        "substitutions": [{"conv": s.conv, "op": s.op, "choice": s.choice, "errors": s.errors} for s in subs],
    }


def _stage_op(student: FlashStudent, name: str) -> str:
    layout = student.config.layout
    if name == "head":
        return layout.head_op
    if name == "conv_in":
        return "causal3d"
    return layout.stages[name].op
