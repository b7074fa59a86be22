"""An LTX-Video teacher through every command: prune (flash-ltx), distill, evaluate, info, export
(first/steady/last graphs driven by a metadata-only reader), ONNX Runtime engines (dynamic and
static shapes), validate, decode with upstream's decode-time options; and the one-line errors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import LTX_LATENT, perturbed_ltx_vae
from typer.testing import CliRunner

from flashvaed import api, engines
from flashvaed.cli import app
from flashvaed.errors import InputError
from flashvaed.models import StudentSpec, load_model, save_teacher
from flashvaed.models.families.ltx import LTXVAE, Block, LTXConfig
from flashvaed.models.streaming import iter_decode
from flashvaed.models.student import build_student

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ltx_teacher(seed: int = 0) -> LTXVAE:
    """A 0.9.1-style teacher (timestep conditioning, noise injection) wide enough for flash-ltx's
    quarter widths: decoder 128/64/32/16."""
    torch.manual_seed(seed)
    decoder = (
        Block("res_x", 1, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
        Block("res_x", 1, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
        Block("res_x", 1, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
        Block("res_x", 2),
    )  # fmt: skip
    config = LTXConfig.released(
        "0.9.1", latent_channels=LTX_LATENT, encoder_base=8, decoder_base=16, decoder_blocks=decoder,
        latents_mean=tuple((0.1 * torch.randn(LTX_LATENT)).tolist()),
        latents_std=tuple((1 + 0.2 * torch.rand(LTX_LATENT)).tolist()),
    )  # fmt: skip
    vae = LTXVAE(config).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "noise" in name:
                p.copy_(0.1 * torch.randn_like(p))
        vae.decoder.head.conv.weight.mul_(0.3)
    return vae


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ltx-flow")
    save_teacher(ltx_teacher(), d / "ltx.safetensors", "original")
    perturbed_ltx_vae("0.9.0", seed=3).save_pretrained(d / "ltx090")
    torch.save({"latents": torch.randn(1, LTX_LATENT, 4, 2, 3)}, d / "z.pt")
    torch.save({"latents": torch.randn(1, 16, 2, 2, 3)}, d / "z16.pt")
    r = invoke("prune", "-t", d / "ltx.safetensors", "--preset", "flash-ltx", "-o", d / "student", "-q")
    assert r.exit_code == 0, r.output
    return d


def test_flash_ltx_is_the_release_recipe_on_the_teacher(work):
    student = load_model(work / "student")
    layout = student.config.layout
    assert [st.width for st in (layout.middle, *layout.up)] == [64, 64, 8, 4]  # 1/2, 1, 1/4, 1/4
    assert [st.op for st in (layout.middle, *layout.up)] == ["dwsep3d", "dwsep3d", "dwsep3d", "spatial2d"]
    assert student.latency > 0 and student.step_inputs == ("timestep", "noise")
    report = json.loads((work / "student" / "prune_report.json").read_text())
    assert report["family"] == "ltx" and report["totals"]["macs_ratio"] > 3
    teacher = load_model(work / "ltx.safetensors")
    with torch.device("meta"):  # the release's widths on a released teacher
        for generation, widths in (("0.9.1", [512, 512, 64, 32]), ("0.9.5", [512, 512, 64, 32])):
            s, _ = build_student(StudentSpec.load("flash-ltx"), LTXConfig.released(generation))
            assert [st.width for st in (s.config.layout.middle, *s.config.layout.up)] == widths
    del teacher


def test_distillation_improves_the_pruned_student(work):
    r = invoke(
        "distill", "-s", work / "student", "-t", work / "ltx.safetensors", "-d", "synthetic", "-o", work / "distilled",
        "--steps-per-phase", 8, "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads((work / "distilled" / "distill_report.json").read_text())
    before, after = report["psnr_vs_teacher_before_db"], report["phases"][-1]["psnr_vs_teacher_db"]
    assert after > before + 0.5, (before, after)
    r = invoke("evaluate", "-m", work / "distilled", "-t", work / "ltx.safetensors", "-d", "synthetic", "-q")
    assert r.exit_code == 0, r.output


def test_info_reports_the_latency(work):
    r = invoke("info", work / "ltx.safetensors")
    assert r.exit_code == 0 and "latency" in r.output and "latent frames" in r.output


def reader_decode(
    export_dir, latents: np.ndarray, chunk: int, timestep: float, seed: int, flush: bool = False
) -> np.ndarray:
    """Decode with onnxruntime alone, following the contract in the graphs' metadata (clock rule;
    ``flush``: the chunk holding the clip's last latent frame runs 'flush', FLUSH_RULE)."""
    first = onnx.load(str(export_dir / "first.onnx"), load_external_data=False)
    contract = json.loads({p.key: p.value for p in first.metadata_props}["flashvaed.contract"])
    model = contract["model"]
    sessions = {
        g: ort.InferenceSession(str(export_dir / spec["file"]), providers=["CPUExecutionProvider"])
        for g, spec in contract["graphs"].items()
    }
    assert set(sessions) == {"first", "steady", "last", "flush"}  # an export with windows (the default)
    state_in = [s["input"] for s in contract["state"]]
    b, _, t, h, w = latents.shape
    extra = {"timestep": np.full((b,), timestep, np.float32)}
    g = torch.Generator().manual_seed(seed)  # the documented draw order of the noise maps
    for i, scale in enumerate(model["noise_scales"]):
        s = float(eval(scale))  # "1", "2", "1/2": a fraction
        extra[f"noise/{i}"] = torch.randn(int(h * s), int(w * s), generator=g).numpy()
    outs = sessions["first"].run(None, {"latents": latents[:, :, :1], **extra})
    frames, state, position = [outs[0]], outs[1:], 1
    pieces = [latents[:, :, i : i + chunk] for i in range(1, t, chunk)]
    pieces += [np.zeros((b, latents.shape[1], chunk, h, w), np.float32)] * -(-model["latency"] // chunk)
    for piece in pieces:
        feed = {"latents": piece, **dict(zip(state_in, state, strict=True)), "position": np.array(position), **extra}
        graph = "steady" if position + piece.shape[2] < t else "last"  # the last real chunk knows the end
        if graph == "last":
            feed["end"] = np.array(t)
        if graph == "last" and flush:  # the clip's frames still held back, from this position on; no state
            (held,) = sessions["flush"].run(None, feed)
            start = max(0, model["temporal_factor"] * position - model["output_offset"])
            done = np.concatenate(frames, axis=2)[:, :, model["output_offset"] :]
            assert done.shape[2] == start and start + held.shape[2] == model["temporal_factor"] * (t - 1) + 1
            return np.concatenate([done, held], axis=2)
        outs = sessions[graph].run(None, feed)
        frames.append(outs[0])
        state, position = outs[1:], position + piece.shape[2]
    positions = np.concatenate(frames, axis=2)
    offset = model["output_offset"]
    return positions[:, :, offset : offset + model["temporal_factor"] * (t - 1) + 1]


@pytest.fixture(scope="module")
def exports(work):
    for name in ("ltx.safetensors", "student"):
        r = invoke(
            "export", work / name, "-o", work / f"export-{name}", "--chunk", "1:2:3", "--height", "64:64:96",
            "--width", "64:96:96",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
    return work


@pytest.mark.parametrize("name", ["ltx.safetensors", "student"])
def test_onnx_runtime_equals_pytorch_over_chunkings(exports, name):
    model = load_model(exports / name)
    engine = engines.load(exports / f"export-{name}")
    assert (engine.latency, engine.output_offset, engine.step_inputs) == (
        model.latency,
        model.output_offset,
        model.step_inputs,
    )
    latents = torch.randn(1, LTX_LATENT, 5, 2, 3)
    for chunk in (1, 2, 3):
        expected = torch.cat(list(iter_decode(model, latents, chunk, timestep=0.1, seed=4)), dim=2)
        got = engine.decode(latents, chunk, timestep=0.1, seed=4)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="takes the options timestep, seed, generator"):
        engine.decode(latents, 2, temperature=1)


@pytest.mark.parametrize("flush", [False, True], ids=["last-chunk-by-chunk", "flush"])
def test_metadata_only_reader_drives_the_ltx_graphs(exports, flush):
    model = load_model(exports / "student")
    latents = torch.randn(1, LTX_LATENT, 4, 2, 3)
    expected = torch.cat(list(iter_decode(model, latents, 2, timestep=0.05, seed=7)), dim=2)
    got = reader_decode(exports / "export-student", latents.numpy(), 2, timestep=0.05, seed=7, flush=flush)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)


def test_static_engine_handles_warm_up_and_the_short_last_chunk(work, tmp_path):
    r = invoke("export", work / "student", "-o", tmp_path / "e", "--chunk", 2, "--height", 64, "--width", 96)
    assert r.exit_code == 0, r.output
    r = invoke("build-engine", tmp_path / "e", "-o", tmp_path / "g")
    assert r.exit_code == 0, r.output
    model, engine = load_model(work / "student"), engines.load(tmp_path / "g")
    for frames in (1, 2, 3, 4, 5):  # shorter than, equal to and longer than the latency warm-up; odd tails
        latents = torch.randn(1, LTX_LATENT, frames, 2, 3)
        expected = torch.cat(list(iter_decode(model, latents, 2, seed=1)), dim=2)
        torch.testing.assert_close(engine.decode(latents, 2, seed=1), expected, atol=1e-4, rtol=0)
    report = api.validate(tmp_path / "g", work / "student", work / "z.pt", teacher=work / "ltx.safetensors")
    assert report.passed and {c["graph"] for c in report.chunks} == {"first", "steady", "last"}


def test_decode_takes_upstreams_decode_options(work, tmp_path):
    out = tmp_path / "a.pt"
    r = invoke("decode", work / "z.pt", "-m", work / "ltx.safetensors", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    a = torch.load(out, weights_only=True)["frames"]
    assert a.shape == (1, 3, 25, 64, 96)
    r = invoke("decode", work / "z.pt", "-m", work / "ltx.safetensors", "-o", out, "-q", "--seed", 0, "--chunk", 1)
    torch.testing.assert_close(torch.load(out, weights_only=True)["frames"], a, atol=1e-5, rtol=0)  # deterministic
    r = invoke("decode", work / "z.pt", "-m", work / "ltx.safetensors", "-o", out, "-q", "--decode-noise-scale", 0)
    b = torch.load(out, weights_only=True)["frames"]
    assert (a - b).abs().max() > 1e-4  # the default mixes noise in (0.025)
    vae = load_model(work / "ltx.safetensors")
    z = torch.load(work / "z.pt", weights_only=True)["latents"]
    torch.testing.assert_close(b, vae.decode(z, timestep=0.05, seed=0), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "ltx090", "--decode-timestep", 0.1], "this model is not timestep-conditioned: --decode-timestep"),
        (["-m", "ltx090", "--decode-noise-scale", 0.1], "this model is not timestep-conditioned: --decode-noise-scale"),
        (["-m", "ltx.safetensors", "--decode-noise-scale", -0.5], "--decode-noise-scale must be a number in [0, "),
        (["-m", "ltx.safetensors", "--decode-timestep", 1e308], "--decode-timestep must be a number in [0, 1000]"),
        (["-m", "ltx.safetensors", "--decode-noise-scale", 2], "--decode-noise-scale must be in [0, 1]"),
        (["-m", "ltx.safetensors", "--seed", -1], "--seed must be a non-negative integer"),
    ],
)
def test_bad_decode_options_are_one_line_errors(work, args, message, tmp_path):
    args = [work / a if a in ("ltx090", "ltx.safetensors") else a for a in args]
    r = invoke("decode", work / "z.pt", *args, "-o", tmp_path / "o.mp4", "-q")
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: {message}") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.mp4").exists()


def test_latents_and_students_of_other_families_are_refused(work, teacher_8, tmp_path):
    r = invoke("decode", work / "z16.pt", "-m", work / "ltx.safetensors", "-o", tmp_path / "o.pt", "-q")
    assert r.exit_code == 2 and r.output.startswith("error: latents have 16 channels but the model reads 8")
    save_teacher(teacher_8, tmp_path / "wan.pth", "original")
    r = invoke("evaluate", "-m", work / "student", "-t", tmp_path / "wan.pth", "-d", "synthetic", "-q")
    assert r.exit_code == 2 and r.output.strip() == "error: the student is for ltx teachers, the teacher is wan2.1"
    r = invoke("prune", "-t", tmp_path / "wan.pth", "--preset", "flash-ltx", "-o", tmp_path / "x", "-q")
    assert r.exit_code == 2 and r.output.strip() == "error: student 'flash-ltx' is for ltx teachers, not wan2.1"
    r = invoke("decode", work / "z.pt", "-m", work / "ltx.safetensors", "-o", tmp_path / "o.pt", "--chunk", 0, "-q")
    assert r.exit_code == 2 and r.output.strip() == "error: --chunk must be at least 1, got 0"


def test_tensorrt_profiles_cover_the_clock_and_the_conditioning(exports):
    from flashvaed.engines.tensorrt_backend import _profile_shapes
    from flashvaed.export.contract import read_manifest

    contract = read_manifest(exports / "export-student")
    assert contract.graphs == ("first", "steady", "last")
    last = _profile_shapes(contract, "last")
    assert last["position"] == last["end"] == ((), (), ())
    assert last["timestep"] == ((1,), (1,), (4,))  # one per sample: the batch range 1:1:4
    assert last["latents"] == ((1, LTX_LATENT, 1, 2, 2), (1, LTX_LATENT, 2, 2, 3), (4, LTX_LATENT, 3, 3, 3))
    scales = contract.noise_scales
    assert [k for k in last if k.startswith("noise/")] == [f"noise/{i}" for i in range(len(scales))]
    for i, r in enumerate(scales):  # the maps follow the latent grid's range at their scale
        assert last[f"noise/{i}"] == ((2 * r, 2 * r), (2 * r, 3 * r), (3 * r, 3 * r))
    assert "position" not in _profile_shapes(contract, "first") and "end" not in _profile_shapes(contract, "steady")


def test_causal_student_has_no_latency_and_streams_exactly(work, tmp_path):
    r = invoke("prune", "-t", work / "ltx.safetensors", "--preset", "flash-ltx-causal", "-o", tmp_path / "c", "-q")
    assert r.exit_code == 0, r.output
    student = load_model(tmp_path / "c")
    assert student.latency == 0 and student.output_offset == 7  # depth-to-space drops a first frame, 3 times
    assert all(not m.delay for m in student.modules() if hasattr(m, "delay"))
    latents = torch.randn(1, LTX_LATENT, 5, 2, 3)
    stream = student.stream(clamp=False)
    first = stream.push(latents[:, :, :1])
    assert first.shape[2] == 1  # a frame per latent frame as it arrives: nothing held back
    pieces = [first] + [stream.push(latents[:, :, i : i + 1]) for i in range(1, 5)] + [stream.close()]
    with torch.no_grad():
        one_shot = student.decode_clip(latents, clamp=False)
    torch.testing.assert_close(torch.cat(pieces, dim=2), one_shot, atol=1e-5, rtol=0)
    r = invoke("export", tmp_path / "c", "-o", tmp_path / "e", "--chunk", 2, "--height", 64, "--width", 96)
    assert r.exit_code == 0, r.output
    engine = engines.load(tmp_path / "e")
    assert engine.contract.graphs == ("first", "steady")
    for frames in (1, 2, 5):  # the short last chunk is padded without an end: causal convs never read it
        z = latents[:, :, :frames]
        torch.testing.assert_close(engine.decode(z, 2), student.decode(z, 2), atol=1e-4, rtol=0)
    r = invoke(
        "distill", "-s", tmp_path / "c", "-t", work / "ltx.safetensors", "-d", "synthetic", "-o", tmp_path / "d",
        "--steps-per-phase", 8, "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d" / "distill_report.json").read_text())
    assert report["phases"][-1]["psnr_vs_teacher_db"] > report["psnr_vs_teacher_before_db"] + 0.5


def test_a_causal_spec_refuses_future_reading_convs(work):
    spec = StudentSpec.from_dict({"name": "x", "causal": True, "stages": {"middle": {"op": "conv3d"}}})
    with pytest.raises(InputError, match="is causal: stage middle asks for conv3d"):
        build_student(spec, load_model(work / "ltx.safetensors").config)


@pytest.mark.parametrize("generation", ["0.9.0", "0.9.5"])
def test_other_generations_prune_and_export(generation, tmp_path):
    """0.9.0 (narrowing res_x_y, plain depth-to-space, no conditioning) and 0.9.5 (space-to-depth
    encoder) from diffusers directories through prune, export and ONNX Runtime."""
    torch.manual_seed(1)
    released = LTXConfig.released(generation)
    # one residual block per res_x (as ltx_teacher): every block kind of the generation, a fifth of the nodes
    encoder, decoder = ([replace(b, layers=1) if b.kind == "res_x" else b for b in blocks] for blocks in (
        released.encoder_blocks, released.decoder_blocks))  # fmt: skip
    config = LTXConfig.released(
        generation, latent_channels=LTX_LATENT, encoder_base=8, decoder_base=16, encoder_blocks=tuple(encoder),
        decoder_blocks=tuple(decoder), latents_mean=(0.0,) * LTX_LATENT, latents_std=(1.0,) * LTX_LATENT,
    )  # fmt: skip
    save_teacher(LTXVAE(config).eval(), tmp_path / "teacher", "diffusers")
    assert load_model(tmp_path / "teacher").config.generation == generation
    # one calibration clip: the channels it picks do not matter here, only that this topology prunes
    prune = ["prune", "-t", tmp_path / "teacher", "--preset", "flash-ltx", "-o", tmp_path / "s", "-q"]
    r = invoke(*prune, "--calib-clips", 1)
    assert r.exit_code == 0, r.output
    r = invoke("export", tmp_path / "s", "-o", tmp_path / "e", "--chunk", "1:2:2", "--height", 64, "--width", 96)
    assert r.exit_code == 0, r.output
    student, engine = load_model(tmp_path / "s"), engines.load(tmp_path / "e")
    latents = torch.randn(1, LTX_LATENT, 3, 2, 3)
    torch.testing.assert_close(engine.decode(latents, 2), student.decode(latents, 2), atol=1e-4, rtol=0)
    video = torch.rand(1, 3, 9, 64, 96) * 2 - 1
    assert load_model(tmp_path / "teacher").encode(video).shape == (1, LTX_LATENT, 2, 2, 3)
