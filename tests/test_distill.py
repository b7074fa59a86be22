"""Distillation: data, each phase, exact resumption after SIGKILL, DDP, evaluation, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from test_prune import teacher_from_diffusers
from typer.testing import CliRunner

from flashvaed.cli import app
from flashvaed.distill.config import DistillConfig
from flashvaed.distill.data import ClipDataset, ClipSpec, batch_items
from flashvaed.distill.trainer import Distiller
from flashvaed.errors import InputError
from flashvaed.models import StudentSpec, load_model, save_student, save_teacher
from flashvaed.prune.calibration import calibration_latents
from flashvaed.prune.pipeline import prune_teacher

runner = CliRunner()
QUICK = {
    "batch_size": 1,
    "clip_frames": 5,
    "clip_size": 32,
    "synthetic_clips": 4,
    "chunk": 1,
    "log_every": 1,
    "checkpoint_every": 2,
    "optimizer": {"lr": 2e-3, "warmup_steps": 1},
}


def quick_config(**overrides) -> dict:
    cfg = json.loads(json.dumps(QUICK))
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny teacher (.pth) and a flash-wan2.1 student pruned from it (directory)."""
    d = tmp_path_factory.mktemp("distill")
    teacher = teacher_from_diffusers(8, seed=11)
    save_teacher(teacher, d / "teacher.pth", "original")
    calib = calibration_latents("synthetic", teacher, clips=2, frames=5, size=32)
    # flash-wan2.1's operators with up2/up3 at 1/2: at base 8, 1/8 would leave 1-channel stages whose
    # RMS norms are sign functions (zero gradients that Adam turns into noise-driven steps)
    spec = StudentSpec.from_dict(
        {
            "name": "flash-half",
            "stages": {
                **{k: {"op": "dwsep3d"} for k in ("middle", "up0", "up1")},
                **{k: {"op": "spatial2d", "width": 0.5} for k in ("up2", "up3")},
            },
        }
    )
    save_student(prune_teacher(teacher, spec, calib).student, d / "student")
    return d, teacher


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_library(pair, tmp_path, cfg: dict, data=("synthetic",)) -> tuple[Path, dict]:
    d, teacher = pair
    student = load_model(d / "student")
    config = DistillConfig.from_dict(cfg)
    spec = ClipSpec(config.clip_frames, config.clip_size, config.frame_stride, config.synthetic_clips)
    dataset = ClipDataset(list(data), teacher, spec, seed=config.seed)
    run = tmp_path / "run"
    report = Distiller(teacher, student, dataset, config, run, device=torch.device("cpu"), eval_clips=1).run()
    return run, report.to_dict()


def losses(run: Path, phase: str) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if e["phase"] == phase]


@pytest.mark.parametrize("phase", ["align", "transfer", "refine"])
def test_each_phase_lowers_its_own_loss(pair, tmp_path, phase):
    steps = {p: {"steps": 10 if p == phase else 0} for p in ("align", "transfer", "refine")}
    run, _ = run_library(pair, tmp_path, quick_config(synthetic_clips=1, **steps))
    values = losses(run, phase)
    assert len(values) == 10
    assert np.mean(values[-3:]) < 0.95 * np.mean(values[:3]), values


def distill_args(d: Path) -> list[str]:
    """`flashvaed distill` on the module's teacher and student with synthetic data, quietly, on CPU."""
    return [
        "distill",
        "-t",
        str(d / "teacher.pth"),
        "-s",
        str(d / "student"),
        "-d",
        "synthetic",
        "--device",
        "cpu",
        "-q",
    ]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flashvaed.cli", *args], capture_output=True, text=True, timeout=600, **kwargs
    )


def test_resume_after_sigkill_is_exact(pair, tmp_path):
    d, _ = pair
    cfg = write_config(
        tmp_path / "cfg.yaml", quick_config(**{p: {"steps": 4} for p in ("align", "transfer", "refine")})
    )
    common = [*distill_args(d), "--config", str(cfg)]
    # the uninterrupted reference runs in-process (the same command, one torch import fewer); the
    # killed run and its resumption are real processes
    whole = runner.invoke(app, [*common, "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashvaed.cli", *common, "-o", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = run / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill in the middle of the second phase
        if log.exists() and any(json.loads(line)["step"] >= 5 for line in log.read_text().splitlines() if line):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists()  # it did not finish
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 4 <= state["step"] < 12

    resumed = cli(*common, "-o", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    report = json.loads((run / "distill_report.json").read_text())
    assert report["resumed_from_step"] == state["step"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_the_averaged_gradient_run(pair, tmp_path):
    """2 processes x batch 1 under torchrun (gloo) == 1 process x batch 2."""
    d, _ = pair
    steps = {p: {"steps": 3} for p in ("align", "transfer", "refine")}
    # Adam's eps well above float noise: steps on parameters whose gradient is ~0 (noise only) stay
    # small, so both runs must agree to float precision rather than to Adam-amplified noise
    steps["optimizer"] = {"eps": 1e-4}
    single_cfg = write_config(tmp_path / "single.yaml", quick_config(batch_size=2, **steps))
    ddp_cfg = write_config(tmp_path / "ddp.yaml", quick_config(batch_size=1, **steps))
    common = [*distill_args(d), "--eval-clips", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the one-process reference runs in-process (one torch import fewer); the DDP run is torchrun's
    single = runner.invoke(app, [*common, "--config", str(single_cfg), "-o", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    torchrun = Path(sys.executable).with_name("torchrun")
    ddp = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "flashvaed.cli",
            *common,
            "--config",
            str(ddp_cfg),
            "-o",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # the loss of every step (the global batch's, averaged over ranks under DDP) follows the same path
    single_log = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in single_log] == [e["step"] for e in ddp_log] == list(range(9))
    for a, b in zip(single_log, ddp_log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    start = load_file(d / "student" / "model.safetensors")
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_batches_split_across_ranks_like_one_big_batch():
    for step in range(5):
        whole = batch_items(step, 4, 10, seed=3)
        parts = batch_items(step, 2, 10, seed=3, rank=0, world=2) + batch_items(step, 2, 10, seed=3, rank=1, world=2)
        assert whole == parts
    seen = [i for step in range(5) for i, _ in batch_items(step, 2, 10, seed=3)]
    assert sorted(seen) == list(range(10))  # one epoch visits every item once


def _mp4(path: Path, frames: int, size=(40, 56)) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.height, s.width, s.pix_fmt = *size, "yuv420p"
        for _ in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_data_from_real_videos_and_latents(pair, tmp_path):
    _, teacher = pair
    videos = tmp_path / "videos"
    videos.mkdir()
    _mp4(videos / "a.mp4", 12)
    _mp4(videos / "short.mp4", 3)  # too short for a 9-frame clip: skipped
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 nothing")
    images = [Image.fromarray(np.full((36, 36, 3), 20 * i, dtype=np.uint8)) for i in range(9)]
    images[0].save(videos / "b.gif", save_all=True, append_images=images[1:], duration=100)
    with pytest.warns(UserWarning, match="skipping video"):
        data = ClipDataset([videos], teacher, ClipSpec(frames=9, size=32))
    assert len(data) == 2 and len(data.skipped) == 2
    clip = data.clip(0, epoch=0)
    assert clip.frames.shape == (1, 3, 9, 32, 32) and clip.latents.shape == (1, 16, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(clip.latents, teacher.encode(clip.frames), atol=1e-5, rtol=0)
    assert torch.equal(data.clip(0, epoch=0).frames, clip.frames)  # deterministic per (item, epoch)
    assert not torch.equal(data.clip(0, epoch=1).frames, clip.frames)  # another crop next epoch

    latents = tmp_path / "latents"
    latents.mkdir()
    torch.save({"latents": torch.randn(2, 16, 4, 6, 6)}, latents / "z.pt")
    mixed = ClipDataset([latents, "synthetic"], teacher, ClipSpec(frames=9, size=32, synthetic_clips=3))
    assert len(mixed) == 5
    assert mixed.clip(0, 0).frames is None and mixed.clip(0, 0).latents.shape == (1, 16, 3, 4, 4)
    assert mixed.clip(4, 0).frames.shape == (1, 3, 9, 32, 32)

    cache = tmp_path / "cache"
    cached = ClipDataset([videos], teacher, ClipSpec(frames=9, size=32), cache_dir=cache)
    first = cached.clip(1, epoch=0)
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert torch.equal(cached.clip(1, epoch=5).latents, first.latents)  # cached clips are fixed

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.mp4").write_bytes(b"junk")
    with pytest.raises(InputError, match="none of the 1 videos"), pytest.warns(UserWarning):
        ClipDataset([tmp_path / "bad"], teacher, ClipSpec())


@pytest.fixture(scope="module")
def bad_inputs(pair, tmp_path_factory):
    d, _ = pair
    b = tmp_path_factory.mktemp("bad")
    (b / "empty").mkdir()
    write_config(b / "short.yaml", {"clip_frames": 3})
    write_config(b / "odd.yaml", {"clip_size": 30})
    write_config(b / "typo.yaml", {"optimiser": {"lr": 1}})
    other = teacher_from_diffusers(16, seed=0)
    save_teacher(other, b / "other.pth", "original")
    return d, b


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["-d", "{b}/empty"], "no training data"),
        (["-d", "synthetic", "--config", "{b}/short.yaml"], "4n+1 >= 5 frames"),
        (["-d", "synthetic", "--config", "{b}/odd.yaml"], "multiple of 8"),
        (["-d", "synthetic", "--config", "{b}/typo.yaml"], "unknown keys"),
        (["-d", "{b}/missing"], "data not found"),
        (["-d", "synthetic", "--resume"], "no checkpoint"),
    ],
)
def test_bad_distill_input(bad_inputs, extra, needle):
    d, b = bad_inputs
    extra = [e.format(b=b) for e in extra]
    r = runner.invoke(
        app, ["distill", "-t", str(d / "teacher.pth"), "-s", str(d / "student"), "-o", str(b / "run"), "-q", *extra]
    )
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and needle in r.output and len(r.output.strip().splitlines()) == 1


def test_student_of_another_teacher_and_changed_config(bad_inputs, tmp_path):
    d, b = bad_inputs
    r = runner.invoke(
        app,
        ["distill", "-t", str(b / "other.pth"), "-s", str(d / "student"), "-d", "synthetic", "-o", str(tmp_path / "r")],
    )
    assert r.exit_code == 2 and "pruned from a teacher with base_dim 8" in r.output
    cfg = write_config(tmp_path / "c.yaml", quick_config(**{p: {"steps": 1} for p in ("align", "transfer", "refine")}))
    args = [
        "distill",
        "-t",
        str(d / "teacher.pth"),
        "-s",
        str(d / "student"),
        "-d",
        "synthetic",
        "-o",
        str(tmp_path / "run"),
        "-q",
        "--eval-clips",
        "1",
    ]
    assert runner.invoke(app, [*args, "--config", str(cfg)]).exit_code == 0
    r = runner.invoke(app, [*args, "--config", str(cfg)])
    assert r.exit_code == 2 and "--resume" in r.output  # a run is there already
    changed = write_config(tmp_path / "c2.yaml", quick_config(seed=5))
    r = runner.invoke(app, [*args, "--config", str(changed), "--resume"])
    assert r.exit_code == 2 and "different config" in r.output


def test_evaluate_planted_identity_student(pair, tmp_path):
    """A 'student' that is the teacher at full width retains everything: PSNR inf, retention 1."""
    d, teacher = pair
    same = StudentSpec.from_dict({"name": "same", "stages": {"up3": {"op": "causal3d"}}})
    calib = calibration_latents("synthetic", teacher, clips=1, frames=5, size=32)
    save_student(prune_teacher(teacher, same, calib).student, tmp_path / "same")
    r = runner.invoke(
        app,
        [
            "evaluate",
            "-m",
            str(tmp_path / "same"),
            "-t",
            str(d / "teacher.pth"),
            "-d",
            "synthetic",
            "--clips",
            "2",
            "--frames",
            "5",
            "--size",
            "32",
            "--json",
            str(tmp_path / "m.json"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m["psnr_student_teacher"] == float("inf") and m["ssim_student_teacher"] == pytest.approx(1.0)
    assert m["retention_psnr"] == pytest.approx(1.0) and m["flicker_student_teacher"] == 0.0
    assert m["psnr_teacher_gt"] == pytest.approx(m["psnr_student_gt"])
    assert "| PSNR (dB) |" in r.output and "frames/s" in r.output


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    """NCCL needs one device per rank: cuda -> cuda:LOCAL_RANK, made current (CUDA faked here)."""
    from flashvaed import devices

    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    cuda = torch.device("cuda")
    for rank in (0, 1):
        env = {"WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        assert devices.rank_device(cuda, env) == torch.device("cuda", rank)
    assert current == [0, 1]
    assert devices.rank_device(cuda, {}) == cuda  # one process: unchanged
    assert devices.rank_device(torch.device("cpu"), {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}).type == "cpu"
    with pytest.raises(InputError, match="LOCAL_RANK 2 has no GPU here"):
        devices.rank_device(cuda, {"WORLD_SIZE": "3", "LOCAL_RANK": "2"})
    with pytest.raises(InputError, match="every rank takes cuda:LOCAL_RANK"):
        devices.rank_device(torch.device("cuda", 0), {"WORLD_SIZE": "2", "LOCAL_RANK": "1"})


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2", "ltx"])
def test_flash_preset_on_a_small_random_teacher_is_not_degenerate_and_distils(family, tmp_path):
    """The embedded teachers' architectures (8 channels wide at full resolution) with random
    weights: the family's flash preset keeps every stage at 4+ channels (a floor, noted), and a
    short distillation (tens of steps per phase) lifts held-out PSNR against the teacher over
    the pruned start, measured here on clips no phase drew."""
    from flashvaed.demo import embedded_teacher_path
    from flashvaed.metrics import psnr
    from flashvaed.models import families, load_teacher
    from flashvaed.synthetic import synthetic_clip

    config = load_teacher(embedded_teacher_path(family)).config
    torch.manual_seed(3)
    teacher = families.get(family).teacher_type(config).eval()
    tf, sf = teacher.temporal_factor, teacher.spatial_factor
    frames, size = 1 + tf, max(32, 2 * sf)
    spec = StudentSpec.load(f"flash-{family}")
    calib = calibration_latents("synthetic", teacher, clips=2, frames=frames, size=size)
    result = prune_teacher(teacher, spec, calib)
    t_layout = families.get(family).teacher_layout(config)
    for ours, theirs in zip((result.student.config.layout.middle, *result.student.config.layout.up),
                            (t_layout.middle, *t_layout.up), strict=True):  # fmt: skip
        assert ours.width >= min(4, theirs.width), (ours, theirs)
        assert all(h >= min(4, t) for h, t in zip(ours.hidden, theirs.hidden, strict=True))
    # the embedded LTX teacher (decoder base 16 since issue 24) is wide enough for flash-ltx without a floor
    assert family == "ltx" or any("raised to the floor of 4" in note for note in result.notes), result.notes
    cfg = quick_config(
        batch_size=2, clip_frames=frames, clip_size=size, synthetic_clips=16, log_every=10, checkpoint_every=100,
        **{p: {"steps": 8} for p in ("align", "transfer", "refine")},
    )  # fmt: skip
    config_ = DistillConfig.from_dict(cfg)
    spec_ = ClipSpec(config_.clip_frames, config_.clip_size, config_.frame_stride, config_.synthetic_clips)
    dataset = ClipDataset(["synthetic"], teacher, spec_, seed=config_.seed)
    student = result.student
    pruned = {k: v.clone() for k, v in student.state_dict().items()}
    Distiller(teacher, student, dataset, config_, tmp_path / "run", device=torch.device("cpu"), eval_clips=1).run()
    trained = load_model(tmp_path / "run")  # the run directory is a student directory (EMA weights)
    assert trained.kind == "student"
    held_out = torch.cat([synthetic_clip(frames, size, size, seed=777_000 + i) for i in range(2)])
    with torch.no_grad():
        z = teacher.encode(held_out)
        reference = teacher.decode(z)
        student.load_state_dict(pruned)
        before = psnr(student.decode(z), reference)
        after = psnr(trained.decode(z), reference)
    assert after > before + 1.0, (before, after)
