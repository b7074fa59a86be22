"""Teacher -> student initialisation: channel pruning with compensation, then operator substitution.

1. Resolve the student spec against the teacher: absolute widths per stage.
2. Derive the channel groups of the teacher decoder (``groups.py``).
3. Decode calibration latents with the teacher, collecting the Gram matrix of every consumer's
   input; select each group's channels (independence or L1) and, for independence, fit the
   least-squares compensation of every consumer and the rescaling of every norm over the group
   (as each norm declares it: ``norms.py``).
4. Build the pruned teacher (same operators, student widths) with compensation folded in.
5. Fit the student's cheaper operators to the pruned teacher's convs (``substitute.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..metrics import psnr
from ..models import families
from ..models.layout import DecoderLayout
from ..models.student import FlashStudent, StudentConfig, StudentSpec
from ..models.summary import summarize
from ..models.vae import LatentDecoder, TeacherVAE
from .calibration import input_grams, norm_ratios
from .groups import D2S_ROWS, ROWS, TIME_ROWS, V_ROWS, ChannelGraph, ChannelGroup, channel_graph, channel_groups
from .norms import NormSpec, is_norm, norm_spec
from .select import Compensation, Selection, compensation, fold_into_consumer, independence_select, l1_select
from .substitute import UPSAMPLE_FITS, Substitution, fit_substitutions, padding_of, replaceable

CRITERIA = ("independence", "l1")
IDENTICAL_PSNR = 100.0  # dB, reported for frames equal to the teacher's


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
        middle=replace(layout.middle, op=teacher.middle.op, shortcut=False),
        up=tuple(
            replace(st, op=t.op, shortcut=False, resample_conv=t.resample_conv, resample_rank=t.resample_rank)
            for st, t in zip(layout.up, teacher.up, strict=True)
        ),
        head_op=teacher.head_op,
        causal=teacher.causal,
    )


def _l1_magnitudes(state: dict[str, Tensor], group: ChannelGroup) -> Tensor:
    total = torch.zeros(group.size, dtype=torch.float64)
    for path, role in group.producers:
        w = state[f"{path}.weight"].double().flatten(1).abs().sum(1)
        if role == TIME_ROWS:  # rows c, C + c, ...: one block of C rows per output frame
            w = w.view(-1, group.size).sum(0)
        elif role == D2S_ROWS:  # rows rc .. rc + r - 1
            w = w.view(group.size, -1).sum(1)
        elif role == V_ROWS:
            w = w[-group.size :]
        total += w
    return total


def norm_specs(model: nn.Module, graph: ChannelGraph) -> dict[str, NormSpec]:
    """What each norm over a channel group of ``model`` declares (``norms.norm_spec``)."""
    return {path: norm_spec(model.get_submodule(path), path) for g in graph.groups for path in g.norms}


def select_channels(
    teacher: TeacherVAE,
    graph: ChannelGraph,
    targets: list[int],
    latents: list[Tensor],
    criterion: str,
    *,
    chunk: int,
    progress: bool,
) -> list[GroupDecision]:
    """Which channels of each group to keep (and, for independence, how to compensate the rest
    and rescale the norms over it: ``pruned_scale``, times the measured kept share of the input
    for norms that declare ``kept_norm_share``).

    Groups are decided against the data flow, so that a group read through a link (a
    parameter-free shortcut) keeps the channels its target's kept channels read.
    """
    specs = norm_specs(teacher, graph)
    decisions = {id(g): GroupDecision(g, k) for g, k in zip(graph.groups, targets, strict=True)}
    pruned = [d for d in decisions.values() if d.keep_count < d.group.size]
    grams = {}
    if criterion == "independence" and pruned:
        consumers = [p for d in pruned for p in d.group.consumers]
        grams = input_grams(teacher, consumers, latents, chunk=chunk, progress=progress)
    state = teacher.state_dict()
    for group in reversed(graph.groups):
        d = decisions[id(group)]
        forced = sorted(
            {c for link in graph.links if link.source is group for c in link.required(kept(decisions, link.target))}
        )
        if d.keep_count == group.size:
            continue
        if len(forced) > d.keep_count:
            link = next(link for link in graph.links if link.source is group)
            raise InputError(
                f"{link.path} (a parameter-free shortcut) reads {len(forced)} channels of {group.name}, "
                f"but the student keeps only {d.keep_count} of them; widen the stages that stream it"
            )
        if criterion == "l1":
            d.selection = l1_select(_l1_magnitudes(state, group), d.keep_count, forced)
            continue
        c = group.size
        combined = sum(grams[p] / torch.trace(grams[p][:c, :c]).clamp(min=1e-30) for p in group.consumers)
        d.selection = independence_select(combined, d.keep_count, forced)
        d.compensations = {p: compensation(grams[p], d.selection.keep) for p in group.consumers}
    if criterion == "independence":
        keeps = {n: d.selection.keep for d in pruned for n in d.group.norms if d.selection and specs[n].kept_norm_share}
        ratios = norm_ratios(teacher, keeps, latents, chunk=chunk, progress=progress) if keeps else {}
        for d in pruned:
            d.norm_scales = {
                n: float(specs[n].scale(d.keep_count, d.group.size)) * ratios.get(n, 1.0) for n in d.group.norms
            }
    return [decisions[id(g)] for g in graph.groups]


def kept(decisions: dict[int, GroupDecision], group: ChannelGroup) -> list[int]:
    d = decisions[id(group)]
    return d.selection.keep if d.selection else list(range(group.size))


def pruned_state_dict(
    teacher: TeacherVAE, graph: ChannelGraph, decisions: list[GroupDecision], pruned: nn.Module
) -> dict[str, Tensor]:
    """The teacher's decoder weights at the kept channels, with compensation folded in, and the
    channels each parameter-free link of ``pruned`` reads."""
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items() if k.startswith(("decoder.", "post_quant"))}
    expected = pruned.state_dict()
    specs = norm_specs(teacher, graph)
    for d in decisions:
        for path in d.group.norms:  # a parameter-free norm (LTX's) gains a gain in the pruned model
            spec = specs[path]
            for name in spec.student_params:
                if f"{path}.{name}" in expected:
                    state.setdefault(f"{path}.{name}", torch.full((d.group.size,), spec.identity(name)))
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
            spec = specs[path]
            for i, name in enumerate(spec.params):
                key = f"{path}.{name}"
                if key in state:
                    kept_values = state[key].index_select(0, keep)
                    state[key] = kept_values * d.norm_scales.get(path, 1.0) if i == 0 else kept_values
    for d in decisions:  # then output rows
        if d.selection is None:
            continue
        keep = torch.tensor(d.selection.keep)
        c = d.group.size
        for path, role in d.group.producers:
            total = state[f"{path}.weight"].shape[0]
            per = total // c  # rows per channel, from the weight's shape
            if role in (TIME_ROWS, D2S_ROWS, ROWS) and total != per * c:
                raise AssertionError(f"{path} has {total} rows, not a multiple of its group's {c} channels")
            if role == ROWS:
                rows = keep
            elif role == TIME_ROWS:  # rows c + kC for each of the per output frames
                rows = torch.cat([keep + k * c for k in range(per)])
            elif role == D2S_ROWS:  # rows per*c .. per*c + per - 1
                rows = (keep[:, None] * per + torch.arange(per)).flatten()
            elif role == V_ROWS:
                rows = torch.cat([torch.arange(total - c), keep + total - c])
            else:
                raise AssertionError(f"{path}: unknown producer role {role!r}")
            for name in ("weight", "bias"):
                if f"{path}.{name}" in state:
                    state[f"{path}.{name}"] = state[f"{path}.{name}"].index_select(0, rows)
    by_group = {id(d.group): d for d in decisions}
    _prune_slices(state, decisions, by_group, expected)
    for link in graph.links:
        gather = link.gather(kept(by_group, link.target), kept(by_group, link.source))
        if f"{link.path}.sources" in expected:
            state[f"{link.path}.sources"] = torch.tensor(gather, dtype=torch.long)
        elif gather != list(range(len(gather))):
            raise AssertionError(f"{link.path} would need a channel gather its pruned layer does not have")
    return state


def _prune_slices(
    state: dict[str, Tensor], decisions: list[GroupDecision], by_group: dict[int, GroupDecision], expected: dict
) -> None:
    """Per-channel parameter entries (``ChannelGroup.slices``) at the kept channels, and the index
    buffers (``gathers``) that read an unpruned tensor at them."""
    claims: dict[str, list[tuple[int, ChannelGroup]]] = {}
    reads: dict[str, list[tuple[int, ChannelGroup]]] = {}
    for d in decisions:
        for key, start in d.group.slices:
            claims.setdefault(key, []).append((start, d.group))
        for key, start in d.group.gathers:
            reads.setdefault(key, []).append((start, d.group))
    for key, parts in claims.items():
        flat = state[key].reshape(-1)
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        for start, group in parts:
            keep[start : start + group.size] = False
            keep[torch.tensor(kept(by_group, group)) + start] = True
        state[key] = flat[keep].reshape(expected[key].shape)
    for key, parts in reads.items():
        index = [start + c for start, group in sorted(parts, key=lambda p: p[0]) for c in kept(by_group, group)]
        state[key] = torch.tensor(index, dtype=torch.long)


def stage_channels(graph: ChannelGraph, decisions: list[GroupDecision]) -> dict[str, list[int]]:
    """Per decoder stage (but the head), the teacher channels of its output the student keeps."""
    by_group = {id(d.group): d for d in decisions}
    return {name: kept(by_group, group) for name, group in graph.stage_outputs.items()}


def substitution_targets(pruned: nn.Module, student: nn.Module, notes: list[str] | None = None) -> dict[str, str]:
    """Conv path -> operator, wherever the student has a cheaper operator (its class declares
    ``substitutes_as``, the kind a fit makes of it) than the pruned teacher's dense 3x3x3 conv
    (``substitute.SubstitutableConv``) or upsampler's 3x3 conv (``substitute.upsample_conv``).

    The fit pads as the teacher conv does, so the student's operator should too (the family builds
    it with the conv's ``padding_mode`` and ``history``); where it declares another padding, a line
    goes to ``notes``.
    """
    targets = {}
    for path, module in student.named_modules():
        op = getattr(type(module), "substitutes_as", None)
        conv = pruned.get_submodule(path) if op is not None else None
        if conv is None or not replaceable(conv, op):
            continue
        targets[path] = op
        theirs, ours = padding_of(conv), padding_of(module)
        for what, want, got in zip(("padding_mode", "history"), theirs, ours, strict=True):
            if got is not None and got != want:
                line = f"{path}: the {op} pads with {what} {got!r}, the conv it replaces with {want!r}"
                if notes is not None:
                    notes.append(line)
    return targets


def student_state_dict(student: FlashStudent, pruned: FlashStudent, subs: list[Substitution]) -> dict[str, Tensor]:
    state = dict(pruned.state_dict())
    for sub in subs:
        state.pop(f"{sub.conv}.weight")
        state.pop(f"{sub.conv}.bias", None)
        state.update({f"{sub.conv}.{k}": v for k, v in sub.params.items()})
    for key, value in student.state_dict().items():
        if key in state:
            continue
        if ".shortcut." in key:  # a new 1x1 shortcut stands for an identity
            if key.endswith("weight"):
                state[key] = torch.eye(value.shape[0], value.shape[1])[..., None, None, None]
            else:
                state[key] = torch.zeros_like(value)
        elif is_norm(student.get_submodule(key.rpartition(".")[0])):
            # a norm only the student has (LTX's LayerNorm in front of a forced shortcut): the
            # pruned teacher has none to take it from, so it starts as built (unit gain, zero bias)
            state[key] = value.detach().clone()
    return state


def realign_taps(student: nn.Module, pruned: nn.Module, state: dict[str, Tensor]) -> None:
    """Where a student conv reads time with another current tap than the pruned conv it was made
    from (a causal student of a non-causal teacher), shift its kernel so the taps line up, folding
    taps that would read future frames into the current one (the next frame taken as this one)."""
    for path, module in student.named_modules():
        tap, key = getattr(module, "current_tap", None), f"{path}.weight"
        if tap is None or key not in state:
            continue
        try:
            reference = pruned.get_submodule(path)
        except AttributeError:  # a substituted op's depthwise conv: made from the conv it replaces
            reference = pruned.get_submodule(path.rpartition(".")[0])
        ref_tap = getattr(reference, "current_tap", None)
        if ref_tap is None or ref_tap == tap:
            continue
        w = state[key]
        out = torch.zeros_like(w)
        for j in range(w.shape[2]):
            out[:, :, min(max(j - ref_tap + tap, 0), w.shape[2] - 1)] += w[:, :, j]
        state[key] = out


@torch.inference_mode()
def fidelity(
    teacher: LatentDecoder, models: dict[str, FlashStudent], latents: list[Tensor], chunk: int
) -> dict[str, float]:
    """PSNR (dB) of each model's frames against the teacher's on the given latents."""
    reference = [teacher.decode(z, chunk) for z in latents]
    return {
        name: psnr(torch.cat([m.decode(z, chunk) for z in latents]), torch.cat(reference)) for name, m in models.items()
    }


def prune_teacher(
    teacher: TeacherVAE,
    spec: StudentSpec,
    latents: list[Tensor],
    *,
    criterion: str = "independence",
    chunk: int = 2,
    report_size: tuple[int, int] | None = None,
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
    family = families.get(teacher.family)
    teacher = teacher.eval()
    t_layout = family.teacher_layout(teacher.config)
    layout, notes = spec.resolve(t_layout, family=teacher.family)

    def student_of(name: str, layout: DecoderLayout, channels: dict | None = None) -> FlashStudent:
        config = StudentConfig(
            name, layout, teacher.config, family=teacher.family, spec=spec.to_dict(), teacher_channels=channels or {}
        )
        return FlashStudent(config).to(next(teacher.parameters()).device)

    pruned = student_of(f"{spec.name}-pruned", pruned_layout(layout, t_layout))
    graph = channel_graph(teacher.decoder)
    pruned_groups = channel_groups(pruned.decoder)
    if [g.kind for g in pruned_groups] != [g.kind for g in graph.groups]:
        raise AssertionError("the pruned decoder's channel groups do not mirror the teacher's")
    targets = [g.size for g in pruned_groups]
    decisions = select_channels(teacher, graph, targets, latents, criterion, chunk=chunk, progress=progress)
    pruned.load_state_dict(pruned_state_dict(teacher, graph, decisions, pruned), strict=True)
    pruned.eval()
    student = student_of(spec.name, layout, stage_channels(graph, decisions))
    targets = substitution_targets(pruned, student, notes)
    options = {p: {"rank": student.get_submodule(p).rank} for p, op in targets.items() if op in UPSAMPLE_FITS}
    subs = fit_substitutions(pruned, targets, latents, options=options, chunk=chunk, progress=progress)
    state = student_state_dict(student, pruned, subs)
    realign_taps(student, pruned, state)
    student.load_state_dict(state, strict=True)
    student.eval()
    scores = fidelity(teacher, {"pruned": pruned, "student": student}, latents, chunk)
    size = report_size or family.default_resolution
    report = build_report(teacher, student, spec, criterion, decisions, subs, notes, scores, size, latents)
    return PruneResult(student, pruned, decisions, subs, notes, report)


def build_report(
    teacher: TeacherVAE,
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
    ops = student.decoder.stage_ops()
    stages = [
        {
            "name": t.name,
            "teacher_params": t.params,
            "student_params": s.params,
            "teacher_macs": t.macs,
            "student_macs": s.macs,
            "op": ops[t.name],
        }
        for t, s in zip(t_sum.stages, s_sum.stages, strict=True)
    ]
    return {
        "student": spec.name,
        "family": teacher.family,
        "criterion": criterion,
        "teacher": teacher.config.to_dict(),
        "layout": student.config.layout.to_dict(),
        "notes": sorted(set(notes)),
        "calibration": {"clips": len(latents), "latent_shapes": [list(z.shape) for z in latents]},
        # identical frames (a student at its teacher's widths) score inf, which JSON cannot hold: 100 dB,
        # the cap metrics.psnr_per_sample puts on identical samples
        "fidelity_vs_teacher_psnr_db": {k: min(scores[k], IDENTICAL_PSNR) for k in ("pruned", "student")},
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
        "substitutions": [
            {"conv": s.conv, "op": s.op, "choice": s.choice, "errors": s.errors, "padding_mode": s.padding_mode}
            for s in subs
        ],
    }
