"""The Flash-VAED authors' released students, loaded as they are (docs/official.md).

Checkpoints are built in exactly the release's key names, shapes and dtypes with random weights
(tests/release_reference.py: our own plain-torch re-implementation of the release's forward passes,
which is the oracle): the Wan2.1 student at full size, the LTX student from a small 0.9.0-style
teacher configuration (the release derives its widths from the teacher's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from release_reference import WanStudentRef, ltx_decode, ltx_student_ref, randomize
from safetensors.torch import load_file
from typer.testing import CliRunner

from flashvaed import api, engines
from flashvaed.cli import app
from flashvaed.errors import CheckpointError
from flashvaed.models import StudentSpec, families, load_model, save_teacher
from flashvaed.models.checkpoint import is_student_dir

runner = CliRunner()
LTX_CONFIG = {
    "latent_channels": 8,
    "block_out_channels": (16, 32, 64, 64),
    "layers_per_block": (1, 1, 2, 1, 2),
    "spatio_temporal_scaling": (True, True, True, False),
    "decoder_block_out_channels": (16, 32, 64, 64),
    "decoder_layers_per_block": (1, 1, 2, 1, 2),
    "patch_size": 4,
}


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """The released Wan2.1 student at full size (5.86 M decoder parameters), float32."""
    d = tmp_path_factory.mktemp("official-wan")
    ref = randomize(WanStudentRef(96), seed=0)
    ref.decoder.head[2].weight.data.mul_(0.5)
    torch.save(ref.state_dict(), d / "Flash_VAED_Wan.pth")
    return d, ref, load_model(d / "Flash_VAED_Wan.pth")


@pytest.fixture(scope="module")
def ltx(tmp_path_factory):
    d = tmp_path_factory.mktemp("official-ltx")
    ref = ltx_student_ref(LTX_CONFIG, seed=1)
    ref.decoder.conv_out.conv.weight.data.mul_(0.25)
    torch.save(ref.state_dict(), d / "Flash_VAED_LTX.pth")
    return d, ref, load_model(d / "Flash_VAED_LTX.pth")


# --------------------------------------------------------------------------------------------- Wan
def test_wan_release_is_the_official_preset_at_full_size(wan):
    _, ref, model = wan
    assert model.kind == "student" and model.family == "wan2.1" and not model.has_encoder
    decoder_params = sum(v.numel() for k, v in ref.state_dict().items() if k.startswith("decoder."))
    assert 5.8e6 < decoder_params < 5.9e6  # the release's ~5.86 M
    family = families.get("wan2.1")
    teacher = family.teacher_layout(model.config.teacher)
    for preset in ("official-wan2.1", "flash-wan2.1"):
        layout, notes = StudentSpec.load(preset).resolve(teacher)
        assert layout == model.config.layout and not notes, preset
    assert [st.width for st in model.config.layout.up] == [384, 384, 24, 12]


def test_wan_release_decodes_as_the_release_and_streams_exactly(wan):
    _, ref, model = wan
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 4, 4, 6)
    expected = ref.decode(latents)
    one_shot = model.decode(latents, chunk=3)
    assert one_shot.shape == expected.shape == (1, 3, 13, 32, 48)
    assert (one_shot - expected).abs().max() <= 5e-5
    assert expected.abs().mean() > 0.05  # real values, not a saturated clamp
    for chunk in (1, 2):
        assert (model.decode(latents, chunk=chunk) - one_shot).abs().max() <= 1e-5, chunk


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wan_release_in_half_precision_files(wan, tmp_path, dtype):
    _, ref, _ = wan
    half = {k: v.to(dtype) for k, v in ref.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")
    rounded = WanStudentRef(96)
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    model = load_model(tmp_path / "half.pth")
    assert next(model.parameters()).dtype == torch.float32
    latents = torch.randn(1, 16, 3, 4, 4)
    assert (model.decode(latents, chunk=2) - rounded.eval().decode(latents)).abs().max() <= 5e-5


def test_wan_release_through_an_onnx_runtime_engine(wan, tmp_path):
    d, ref, _ = wan
    latents = torch.randn(1, 16, 3, 4, 4)
    api.export(d / "Flash_VAED_Wan.pth", tmp_path / "x", chunk="1:2:2", height="32", width="32", plugins="none")
    api.build_engine(tmp_path / "x", tmp_path / "e")
    decoder = engines.load(tmp_path / "e")
    assert (decoder.decode(latents, chunk=2) - ref.decode(latents)).abs().max() <= 1e-4


def test_wan_release_has_no_encoder_and_says_to_use_the_teacher(wan, tmp_path):
    d, _, _ = wan
    frames = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    torch.save({"frames": frames}, tmp_path / "clip.pt")
    r = runner.invoke(
        app, ["encode", str(tmp_path / "clip.pt"), "-m", str(d / "Flash_VAED_Wan.pth"), "-o", str(tmp_path / "z.pt")]
    )
    one_line_error(r, "teacher")
    assert not (tmp_path / "z.pt").exists()


def test_info_and_convert_take_the_release(wan, tmp_path):
    d, _, model = wan
    summary = api.info(d / "Flash_VAED_Wan.pth")
    assert summary.teacher is not None and summary.teacher.macs_steady > 20 * summary.macs_steady
    r = runner.invoke(app, ["convert", str(d / "Flash_VAED_Wan.pth"), "-o", str(tmp_path / "student")])
    assert r.exit_code == 0, r.output
    assert is_student_dir(tmp_path / "student")
    again = load_model(tmp_path / "student")
    latents = torch.randn(1, 16, 3, 4, 4)
    assert torch.equal(again.decode(latents, chunk=2), model.decode(latents, chunk=2))
    r = runner.invoke(app, ["convert", str(d / "Flash_VAED_Wan.pth"), "-o", str(tmp_path / "student")])
    assert r.exit_code == 0, r.output  # ours: replaced


# --------------------------------------------------------------------------------------------- LTX
def test_ltx_release_layout_follows_the_file_and_the_official_preset(ltx):
    _, _, model = ltx
    layout = model.config.layout
    assert model.family == "ltx" and model.kind == "student" and model.has_encoder
    assert [(st.op, st.width, st.causal, st.shortcut) for st in layout.stages.values()] == [
        ("dwsep3d", 64, True, False),
        ("dwsep3d", 64, True, False),
        ("conv3d", 8, False, True),
        ("spatial2d", 4, False, True),
    ]
    teacher = families.get("ltx").teacher_layout(model.config.teacher)
    resolved, notes = StudentSpec.load("official-ltx").resolve(teacher)
    assert resolved == layout and not notes
    released = families.get("ltx").config_type()  # the 0.9.0 VAE: 512/512/64/32 from the middle out
    resolved, _ = StudentSpec.load("official-ltx").resolve(families.get("ltx").teacher_layout(released))
    assert [st.width for st in resolved.stages.values()] == [512, 512, 64, 32]


def test_ltx_release_decodes_as_the_release_and_streams_exactly(ltx):
    _, ref, model = ltx
    assert model.latency > 0  # non-causal convs remain: frames come with latency
    torch.manual_seed(0)
    latents = torch.randn(1, 8, 4, 2, 3)
    expected = ltx_decode(ref, latents)
    one_shot = model.decode(latents, chunk=4)
    assert one_shot.shape == expected.shape == (1, 3, 25, 64, 96)
    assert (one_shot - expected).abs().max() <= 5e-5
    for chunk in (1, 2, 3):
        assert (model.decode(latents, chunk=chunk) - one_shot).abs().max() <= 1e-5, chunk


def test_ltx_release_encoder_encodes_as_its_teacher(ltx):
    _, ref, model = ltx
    video = torch.rand(1, 3, 9, 64, 96) * 2 - 1
    with torch.no_grad():
        mean = ref.encoder(video)[:, : LTX_CONFIG["latent_channels"]]
        expected = (mean - ref.latents_mean.view(1, -1, 1, 1, 1)) / ref.latents_std.view(1, -1, 1, 1, 1)
        got = model.encode(video)
    assert (got - expected).abs().max() <= 1e-4


def test_ltx_release_half_precision_and_onnx_runtime(ltx, tmp_path):
    d, ref, _ = ltx
    half = {k: v.half() for k, v in ref.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")
    rounded = ltx_student_ref(LTX_CONFIG, seed=1)
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    latents = torch.randn(1, 8, 3, 2, 2)
    got = load_model(tmp_path / "half.pth").decode(latents, chunk=2)
    assert (got - ltx_decode(rounded, latents)).abs().max() <= 5e-5
    api.export(d / "Flash_VAED_LTX.pth", tmp_path / "x", chunk="1:2:2", height="64", width="64", plugins="none")
    api.build_engine(tmp_path / "x", tmp_path / "e")
    engine = engines.load(tmp_path / "e").decode(latents, chunk=2)
    assert (engine - ltx_decode(ref, latents)).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------ bad files
MID, UP1 = "decoder.mid_block.resnets.0", "decoder.up_blocks.1.resnets.0"


def _broken(path, tmp_path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    out = tmp_path / "broken.pth"
    torch.save(state, out)
    return out


@pytest.mark.parametrize(
    ("which", "change", "needle"),
    [
        ("wan", lambda s: s.pop("decoder.upsamples.5.residual.6.pointwise_conv.weight"), "residual.6.pointwise_conv"),
        ("wan", lambda s: s.pop("decoder.middle.0.residual.2.depthwise_conv.bias"), "depthwise_conv.bias"),
        ("wan", lambda s: s.update({"decoder.head.2.weight": torch.zeros(3, 10, 3, 3, 3)}), "decoder.head.2.weight"),
        ("wan", lambda s: s.update({"decoder.norm_out.gamma": torch.ones(12, 1, 1, 1)}), "mixes"),
        ("wan", lambda s: s.update({"encoder.extra.weight": torch.ones(1)}), "not explain"),
        ("ltx", lambda s: s.pop("decoder.up_blocks.3.resnets.0.conv_shortcut.weight"), "conv_shortcut"),
        ("ltx", lambda s: s.update({f"{MID}.conv1.conv.weight": torch.zeros(64, 64, 3, 3, 3)}), "mixes"),
        ("ltx", lambda s: s.update({"latents_std": torch.ones(3)}), "latents_std"),
        ("ltx", lambda s: s.update({f"{UP1}.conv2.pointwise.weight": torch.zeros(64, 60, 1, 1, 1)}), "shape"),
    ],
)  # fmt: skip
def test_a_file_that_does_not_fit_is_refused_in_one_line(wan, ltx, tmp_path, which, change, needle):
    d = (wan if which == "wan" else ltx)[0]
    name = "Flash_VAED_Wan.pth" if which == "wan" else "Flash_VAED_LTX.pth"
    path = _broken(d / name, tmp_path, change)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        load_model(path)
    r = runner.invoke(app, ["info", str(path)])
    one_line_error(r, needle)
    r = runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "out")])
    one_line_error(r, needle)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- distil the release
def test_distill_fine_tunes_the_released_student_and_resumes_exactly(tmp_path):
    """`distill -s Flash_VAED_Wan.pth -t Wan2.1_VAE.pth`, at base width 16 (64/32/4/2 channels)."""
    from test_prune import teacher_from_diffusers

    teacher = teacher_from_diffusers(16, seed=3)
    save_teacher(teacher, tmp_path / "Wan2.1_VAE.pth", "original")
    ref = randomize(WanStudentRef(16), seed=4)
    torch.save(ref.state_dict(), tmp_path / "Flash_VAED_Wan.pth")
    cfg = {
        "batch_size": 1, "clip_frames": 5, "clip_size": 32, "synthetic_clips": 2, "chunk": 1, "log_every": 1,
        "checkpoint_every": 1, "align": {"steps": 2}, "transfer": {"steps": 2}, "refine": {"steps": 2},
    }  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    common = ["-m", "flashvaed.cli", "distill", "-t", str(tmp_path / "Wan2.1_VAE.pth"), "-s"]
    common += [str(tmp_path / "Flash_VAED_Wan.pth"), "-d", "synthetic", "--config", str(tmp_path / "cfg.json")]
    # the uninterrupted reference in-process (one torch import fewer); the killed run and its resumption
    # are real processes
    whole = runner.invoke(app, [*common[2:], "-o", str(tmp_path / "whole"), "-q"])
    assert whole.exit_code == 0, whole.output
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *common, "-o", str(run), "-q"], stderr=subprocess.DEVNULL)
    log, deadline = run / "log.jsonl", time.time() + 300
    while time.time() < deadline:
        if log.exists() and any(json.loads(line)["step"] >= 3 for line in log.read_text().splitlines() if line):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(
        [sys.executable, *common, "-o", str(run), "--resume", "-q"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = load_model(tmp_path / "Flash_VAED_Wan.pth").state_dict()
    assert any(not torch.equal(a[k], before[k]) for k in a)  # it trained
