"""The distillation trainer: three phases, one optimizer, exact resumption, optional DDP.

- AdamW; per phase a linear warm-up and a cosine decay; gradient clipping; an EMA of the student
  weights (with the usual warm-up of its decay) is what gets saved.
- Deterministic on CPU: the data of a step is a function of (seed, step, rank, world size), the
  only other randomness is torch's generator (saved), and deterministic algorithms are on.
- Checkpoints (``RUN/checkpoint.pt``: step, weights, EMA, optimizer, RNG) are written atomically
  every ``checkpoint_every`` steps and at each phase's end; ``resume`` continues from the last one
  and ends with the weights an uninterrupted run ends with.
- Under ``torchrun --nproc_per_node N`` it trains with DistributedDataParallel (gloo on CPU, NCCL
  on GPU): rank r takes its share of every global batch; only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_output
from ..errors import InputError
from ..metrics import psnr
from ..models.student import FlashStudent
from ..models.vae import TeacherVAE
from ..progress import progress_bar
from ..safeload import load_weights_only
from .config import DistillConfig
from .data import ClipDataset, batch_items, collate
from .phases import DistillObjective, streaming_decode, teacher_pass

CHECKPOINT = "checkpoint.pt"


@dataclass
class Topology:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Topology:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())


def lr_factor(step_in_phase: int, phase_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine down to ``min_ratio``, within one phase."""
    if warmup and step_in_phase < warmup:
        return (step_in_phase + 1) / warmup
    span = max(phase_steps - warmup, 1)
    t = min(max(step_in_phase - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class PhaseRecord:
    name: str
    steps: int
    first_loss: float | None = None
    last_loss: float | None = None
    psnr_vs_teacher_db: float | None = None  # held-out, EMA weights, at the end of the phase
    seconds: float = 0.0


@dataclass
class DistillReport:
    psnr_before_db: float
    phases: list[PhaseRecord] = field(default_factory=list)
    steps_per_second: float = 0.0
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "psnr_vs_teacher_before_db": self.psnr_before_db,
            "steps_per_second": self.steps_per_second,
            "resumed_from_step": self.resumed_from,
            "phases": [vars(p) for p in self.phases],
        }


class Distiller:
    def __init__(
        self,
        teacher: TeacherVAE,
        student: FlashStudent,
        data: ClipDataset,
        config: DistillConfig,
        run_dir: str | os.PathLike,
        *,
        device: torch.device,
        resume: bool = False,
        eval_clips: int = 2,
        progress: bool = False,
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = student.to(device).train()
        self.data, self.config, self.device = data, config, device
        self.run_dir = Path(run_dir)
        self.resume, self.eval_clips, self.show_progress = resume, eval_clips, progress
        self.topology = Topology.from_env(device)
        if not student.config.teacher_channels:
            raise InputError("this student has no teacher channel map (make it with `flashvaed prune`)")
        self.objective = DistillObjective(student, student.config.teacher_channels, config)
        self.objective.checkpointing = config.gradient_checkpointing  # every phase, any device (it saves memory)
        self.model: torch.nn.Module = self.objective
        if self.topology.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.objective, find_unused_parameters=True, broadcast_buffers=False
            )
        o = config.optimizer
        self.optimizer = torch.optim.AdamW(
            student.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
        self.ema = {k: v.detach().clone() for k, v in student.state_dict().items()}
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16" and device.type == "cuda")
        self.fingerprint = json.dumps(
            {"config": config.fingerprint(), "world": self.topology.world, **(identity or {})}, sort_keys=True
        )
        self.step = 0

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not self.topology.main:
            return
        state = {
            "step": self.step,
            "fingerprint": self.fingerprint,
            "student": self.student.state_dict(),
            "ema": self.ema,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        with atomic_output(self.run_dir / CHECKPOINT) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self) -> int | None:
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            if self.resume:
                raise InputError(f"{{resume}}: no checkpoint in {self.run_dir}", "resume")
            return None
        if not self.resume:
            raise InputError(
                f"{self.run_dir} holds a run already: pass {{resume}} to continue it, or a new {{out}}", "resume", "out"
            )
        state = load_weights_only(path, InputError)
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            raise InputError(
                f"{{resume}}: {path} was made with a different config, data, student, teacher or process count",
                "resume",
            )
        self.student.load_state_dict(state["student"])
        self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        return self.step

    # --- one step -----------------------------------------------------------------------------
    def phase_at(self, step: int) -> tuple[str, int, int]:
        """(phase name, step within it, its length) of a global step."""
        start = 0
        for name, n in self.config.phases:
            if step < start + n:
                return name, step - start, n
            start += n
        raise IndexError(step)

    def train_step(self, step: int) -> tuple[str, float, dict[str, float], float]:
        cfg = self.config
        name, in_phase, length = self.phase_at(step)
        o = cfg.optimizer
        lr = o.lr * lr_factor(in_phase, length, min(o.warmup_steps, length // 5), o.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        items = batch_items(step, cfg.batch_size, len(self.data), cfg.seed, self.topology.rank, self.topology.world)
        batch = collate([self.data.clip(index, epoch) for index, epoch in items])
        latents = batch.latents.to(self.device)
        truth = batch.frames.to(self.device) if batch.frames is not None else None
        target = teacher_pass(self.teacher, latents, cfg.chunk)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
            if cfg.precision != "fp32" and self.device.type == "cuda"
            else nullcontext()
        )
        with autocast:
            loss, parts = self.model(name, latents, target, truth, in_phase / max(length, 1))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if o.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), o.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_ema(step)
        return name, *self.mean_over_ranks(float(loss.detach()), parts), lr

    def mean_over_ranks(self, loss: float, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The logged loss of a step is that of the global batch, whatever the process count."""
        if self.topology.world == 1:
            return loss, parts
        values = torch.tensor([loss, *parts.values()], dtype=torch.float64)
        dist.all_reduce(values)
        values /= self.topology.world
        return float(values[0]), dict(zip(parts, values[1:].tolist(), strict=True))

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.config.ema_decay, (1 + step) / (10 + step))
        for key, value in self.student.state_dict().items():
            if value.dtype.is_floating_point:
                self.ema[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                self.ema[key].copy_(value)

    # --- evaluation and outputs -----------------------------------------------------------------
    @torch.no_grad()
    def held_out_psnr(self, weights: dict[str, Tensor] | None = None) -> float:
        """PSNR of the student (or ``weights`` loaded into it) vs the teacher on held-out clips."""
        saved = None
        if weights is not None:
            saved = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
            self.student.load_state_dict(weights)
        self.student.eval()
        ours, theirs = [], []
        for i in range(self.eval_clips):
            clip = self.data.clip(i % len(self.data), epoch=1_000_000 + i)  # crops never drawn in training
            z = clip.latents.to(self.device)
            theirs.append(streaming_decode(self.teacher, z, self.config.chunk, clamp=True).float().cpu())
            ours.append(streaming_decode(self.student, z, self.config.chunk, clamp=True).float().cpu())
        self.student.train()
        if saved is not None:
            self.student.load_state_dict(saved)
        return psnr(torch.cat(ours), torch.cat(theirs))

    def write_student(self, report: DistillReport) -> None:
        """The EMA weights as a student directory: RUN itself (config.json + model.safetensors)."""
        if not self.topology.main:
            return
        with atomic_output(self.run_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(self.student.config.to_dict(), indent=2))
        with atomic_output(self.run_dir / "model.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.items()}, str(tmp))
        with atomic_output(self.run_dir / "distill_report.json") as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2))

    # --- the run --------------------------------------------------------------------------------
    def run(self) -> DistillReport:
        cfg = self.config
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            resumed = self.load_checkpoint()
            report = DistillReport(
                psnr_before_db=self.held_out_psnr() if self.topology.main else 0.0, resumed_from=resumed
            )
            if self.topology.main:
                with atomic_output(self.run_dir / "distill_config.json") as tmp:
                    tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
            self._loop(report)
            self.write_student(report)
            return report
        finally:
            torch.use_deterministic_algorithms(deterministic)
            if self.topology.world > 1:
                dist.barrier()

    def _loop(self, report: DistillReport) -> None:
        cfg = self.config
        total = cfg.total_steps
        records = {name: PhaseRecord(name, n) for name, n in cfg.phases}
        report.phases = list(records.values())
        log = open(self.run_dir / "log.jsonl", "a") if self.topology.main else None
        writer = self._tensorboard() if self.topology.main else None
        shown = self.show_progress and self.topology.main
        start_step, start_time = self.step, time.perf_counter()
        phase_start = time.perf_counter()
        try:
            with progress_bar("distill", total, shown, completed=self.step, info=True) as bar:
                while self.step < total:
                    step = self.step
                    name, loss, parts, lr = self.train_step(step)
                    record = records[name]
                    record.first_loss = loss if record.first_loss is None else record.first_loss
                    record.last_loss = loss
                    self.step = step + 1
                    bar.update(description=f"distill {name:8s}", info=f"loss {loss:.4f} lr {lr:.2e}")
                    if log is not None and (step % cfg.log_every == 0 or self.step == total):
                        entry = {"step": step, "phase": name, "loss": loss, "lr": lr, **parts}
                        log.write(json.dumps(entry) + "\n")
                        log.flush()
                        if writer is not None:
                            for key, value in {"loss": loss, "lr": lr, **parts}.items():
                                writer.add_scalar(key, value, step)
                    phase_end = self.phase_at(step)[1] == self.phase_at(step)[2] - 1
                    if phase_end and self.topology.main:
                        record.psnr_vs_teacher_db = self.held_out_psnr(self.ema)
                        record.seconds = time.perf_counter() - phase_start
                        phase_start = time.perf_counter()
                    if self.step % cfg.checkpoint_every == 0 or phase_end or self.step == total:
                        self.save_checkpoint()
        finally:
            if log is not None:
                log.close()
            if writer is not None:
                writer.close()
        done = self.step - start_step
        report.steps_per_second = done / max(time.perf_counter() - start_time, 1e-9) if done else 0.0

    def _tensorboard(self) -> Any:
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed: no event files (pip install tensorboard)", stacklevel=2)
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))
