"""Gradient checkpointing in distillation: on in every phase that runs the student, and exact.

Counted by wrapping ``torch.utils.checkpoint.checkpoint`` (the phases look it up when they call
it): each student stage call of a phase must go through it, once, and the gradients must equal
those of the run without checkpointing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils import checkpoint as activation_checkpoint

from flashvaed.distill.config import DistillConfig
from flashvaed.distill.data import ClipDataset, ClipSpec
from flashvaed.distill.phases import DistillObjective, captured_stages, teacher_pass
from flashvaed.distill.trainer import Distiller
from flashvaed.models import StudentSpec, families
from flashvaed.prune.calibration import calibration_latents
from flashvaed.prune.pipeline import prune_teacher

PHASES = ("align", "transfer", "refine")
QUICK = {"batch_size": 1, "clip_frames": 5, "clip_size": 32, "synthetic_clips": 2, "chunk": 1, "log_every": 1}


@pytest.fixture(scope="module")
def teacher():
    family = families.get("wan2.1")
    torch.manual_seed(0)
    return family.teacher_type(family.config_type(base_dim=8)).eval()


@pytest.fixture
def counted(monkeypatch):
    """The number of checkpointed calls, per tag set by the test."""
    calls: dict[str, int] = {}
    tag = {"now": None}
    original = activation_checkpoint.checkpoint

    def checkpoint(fn, *args, **kwargs):
        calls[tag["now"]] = calls.get(tag["now"], 0) + 1
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(activation_checkpoint, "checkpoint", checkpoint)
    return calls, tag


def _run(objective: DistillObjective, phase: str, latents, target, truth):
    objective.student.zero_grad(set_to_none=True)
    with captured_stages(objective.student) as record:
        loss, _ = objective(phase, latents, target, truth, 0.5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.student.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: len(v) for k, v in record.items()}


def test_every_phase_checkpoints_each_stage_call_and_stays_exact(teacher, counted):
    calls, tag = counted
    student = copy.deepcopy(teacher).train()  # same widths: no channel selection needed
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    config = DistillConfig.from_dict(QUICK)
    objective = DistillObjective(student, {}, config)
    torch.manual_seed(1)
    latents = torch.randn(1, 16, 3, 4, 4)  # the first chunk, then 2 chunks of 1 latent frame
    truth = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    target = teacher_pass(teacher, latents, config.chunk)
    stages = len(list(student.decoder.stages()))
    steps = len(target.stages["middle"])  # streaming steps (align runs each stage over as many chunks)
    for phase in PHASES:
        objective.checkpointing = False
        tag["now"] = f"{phase}-off"
        loss_off, grads_off, record_off = _run(objective, phase, latents, target, truth)
        objective.checkpointing = True
        tag["now"] = phase
        loss_on, grads_on, record_on = _run(objective, phase, latents, target, truth)
        assert calls.get(phase) == stages * steps, (phase, calls)
        assert f"{phase}-off" not in calls
        assert record_on == record_off  # hooks see each stage call once: recomputation records nothing
        torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)
        assert grads_on.keys() == grads_off.keys() and grads_on
        for name, g in grads_on.items():
            torch.testing.assert_close(g, grads_off[name], rtol=1e-5, atol=1e-7, msg=f"{phase}: {name}")
    assert all("forward" not in vars(block) for _, _, block in student.decoder.stages())  # unwrapped again


def test_the_trainer_checkpoints_every_phase_on_the_cpu_too(teacher, counted, tmp_path):
    """A one-step-per-phase run with ``gradient_checkpointing: true``: each phase checkpoints."""
    calls, tag = counted
    spec = StudentSpec.from_dict(
        {"name": "tiny", "stages": {k: {"op": "dwsep3d"} for k in ("middle", "up0", "up1", "up2", "up3")}}
    )
    calibration = calibration_latents("synthetic", teacher, clips=1, frames=5, size=32)
    student = prune_teacher(teacher, spec, calibration).student
    config = DistillConfig.from_dict(
        {**QUICK, "gradient_checkpointing": True, **{p: {"steps": 1} for p in PHASES}, "checkpoint_every": 10}
    )
    data = ClipDataset(["synthetic"], teacher, ClipSpec(5, 32, 1, 2), seed=0)
    distiller = Distiller(teacher, student, data, config, tmp_path / "run", device=torch.device("cpu"), eval_clips=1)
    assert distiller.objective.checkpointing
    original = distiller.train_step

    def train_step(step):
        tag["now"] = distiller.phase_at(step)[0]
        return original(step)

    distiller.train_step = train_step
    distiller.run()
    assert set(calls) == set(PHASES) and all(calls.values()), calls
