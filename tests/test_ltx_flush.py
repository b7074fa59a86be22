"""LTX-Video streams cost only what they compute: each layer of a step runs the positions that hold
frames of the clip (its window), in eager streams (int clocks) and in exported graphs (tensor
clocks), and the frames stay those of the one-shot decode."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from flashvaed import engines
from flashvaed.engines.build import build_engine
from flashvaed.errors import InputError
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.models import StudentSpec, families
from flashvaed.models.families.ltx.blocks import ReplicateConv3d, gather
from flashvaed.models.streaming import iter_decode
from flashvaed.models.student import build_student

FAMILY = families.get("ltx")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = FAMILY.teacher_type(FAMILY.tiny_config()).eval()
    with torch.no_grad():  # the injected noise matters: its scales are zero at init
        for name, p in model.named_parameters():
            if "noise" in name:
                p.normal_()
    return model


@pytest.fixture(scope="module")
def student(teacher):
    return build_student(StudentSpec.load("flash-ltx"), teacher.config)[0].eval()


def stream(model, latents, chunk, **options):
    return torch.cat(list(iter_decode(model, latents, chunk, clamp=False, **options)), dim=2)


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 6])
def test_streams_equal_the_one_shot_decode(teacher, student, frames):
    latents = torch.randn(1, teacher.latent_channels, frames, 2, 3)
    for model in (teacher, student):
        one_shot = model.decode_clip(latents, clamp=False, seed=1)
        for chunk in (1, 2, 3):
            torch.testing.assert_close(stream(model, latents, chunk, seed=1), one_shot, atol=1e-5, rtol=0)


def conv_positions(model, run) -> dict[str, int]:
    """Output positions each temporal conv computed during ``run()``, summed over its calls."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ReplicateConv3d) and module.history and name.startswith("decoder."):

            def hook(_m, _args, out, name=name):
                y = out[0] if isinstance(out, tuple) else out
                counts[name] = counts.get(name, 0) + int(y.shape[2])

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return counts


@pytest.mark.parametrize("history", [0, 2])
def test_gather_takes_the_frames_of_the_joined_tensor_without_joining(history):
    """An eager step's gathers (a conv's input, its new history, a delayed skip) are frames of
    cat(history, x): the same frames, whether the indices run across both, repeat (clamped to the
    clip's edges) or fall in one of them (then a view, no copy)."""
    torch.manual_seed(3)
    past = torch.randn(1, 4, history, 3, 2) if history else None
    x = torch.randn(1, 4, 6, 3, 2)
    joined = x if past is None else torch.cat([past, x], dim=2)
    cases = [
        (0, range(-history, 6), None),  # lo, wanted, clamp
        (1, range(3, 7), None),
        (0, range(-2, 3), (0, None)),
        (2, range(-history, 3), (1, 4)),
        (0, range(4, 6), None),
        (0, range(0, 0), None),
    ]
    for lo, wanted, clamp in cases:
        h = 0 if past is None else history
        idx = []
        for q in wanted:
            if clamp is not None:  # into the clip's frames first
                q = max(q, clamp[0]) if clamp[1] is None else min(max(q, clamp[0]), clamp[1])
            idx.append(min(max(q + h if q < 0 else h + q - lo, 0), joined.shape[2] - 1))
        got = gather(past, x, lo, wanted, clamp)
        assert torch.equal(got, joined[:, :, idx])
    assert gather(past, x, 0, range(2, 5)).data_ptr() == x[:, :, 2:].data_ptr()  # one run: a view


def test_warm_up_and_flush_compute_only_the_clips_positions(teacher):
    """A stream of 5 latent frames (latency 7: most of its steps are warm-up or flush) runs each conv
    on exactly the positions the one-shot decode runs it on; without windows every step computes
    all of its positions."""
    latents = torch.randn(1, teacher.latent_channels, 5, 2, 3)
    one_shot = conv_positions(teacher, lambda: teacher.decode_clip(latents, seed=0))
    streamed = conv_positions(teacher, lambda: stream(teacher, latents, 2, seed=0))
    assert streamed == one_shot
    steps = 1 + 2 + -(-teacher.latency // 2)  # first, two chunks of 2, the flush in chunks of 2
    whole = {name: 0 for name in one_shot}
    for name, module in teacher.named_modules():
        if name in whole:
            whole[name] = module.timeline[0] * (1 + 2 * (steps - 1))  # rate x latent frames stepped
    assert sum(whole.values()) > 3 * sum(streamed.values())


def test_tensor_clocks_compute_the_same_frames(teacher):
    """Graph semantics in eager: tensor clocks take the data-dependent windows (at least one
    position each), and ``windows=False`` computes whole steps; the clip's frames are equal."""
    latents = torch.randn(1, teacher.latent_channels, 4, 2, 3)
    expected = teacher.decode_clip(latents, clamp=False, seed=2)
    inputs = teacher.stream_inputs(1, 2, 3, seed=2)
    for windows in (True, False):
        state = tuple(torch.zeros(s) for s in teacher.state_shapes(1, 2, 3))
        frames, position = [], 0
        extra = {} if windows else {"windows": False}
        while position < latents.shape[2] + teacher.latency:
            z = latents[:, :, position : position + 1]
            if z.shape[2] == 0:
                z = torch.zeros_like(latents[:, :, :1])
            clock = {"position": torch.tensor(position), "end": torch.tensor(latents.shape[2])}
            with torch.inference_mode():
                y, state = teacher.decode_step(z, state, clamp=False, **clock, **inputs, **extra)
            frames.append(y)
            position += 1
        got = torch.cat(frames, dim=2)[:, :, teacher.output_offset : teacher.output_offset + expected.shape[2]]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_engines_windowed_graphs_equal_torch(teacher, tmp_path, monkeypatch):
    """The engine's stream: first, steady chunks, then one ``flush`` run for the final chunk and the whole
    latency (idle layers' convs skipped inside the graphs); a stream closed without a final push flushes
    with ``last`` runs. The frames are torch's."""
    import onnxruntime as ort

    export(teacher, tmp_path / "e", ExportOptions(chunk="1:2:2", height="64", width="96", batch="1"))
    engine = engines.load(tmp_path / "e")
    assert "flush" in engine.contract.files and engine.contract.windows is True
    for frames in (1, 3, 5):
        latents = torch.randn(1, teacher.latent_channels, frames, 2, 3)
        expected = teacher.decode(latents, 2, seed=3)
        for chunk in (1, 2):
            torch.testing.assert_close(engine.decode(latents, chunk, seed=3), expected, atol=1e-4, rtol=0)
    runs = []
    run = ort.InferenceSession.run_with_iobinding
    monkeypatch.setattr(
        ort.InferenceSession, "run_with_iobinding", lambda s, *a, **k: runs.append(1) or run(s, *a, **k)
    )
    latents = torch.randn(1, teacher.latent_channels, 5, 2, 3)
    expected = teacher.decode(latents, 2, seed=3)
    torch.testing.assert_close(engine.decode(latents, 2, seed=3), expected, atol=1e-4, rtol=0)
    assert len(runs) == 3  # first, steady (2 latent frames), flush (2 and the latency of 7): not 1 + 2 + 4
    stream = engine.stream(seed=3)
    got = [stream.push(latents[:, :, :1]), stream.push(latents[:, :, 1:3]), stream.push(latents[:, :, 3:])]
    torch.testing.assert_close(torch.cat([*got, stream.close()], dim=2), expected, atol=1e-4, rtol=0)


def test_export_without_windows_from_the_command_line_equals_torch(tmp_path):
    """``export --no-windows`` (static shapes inside, for static-shape builders) decodes what torch does."""
    from typer.testing import CliRunner

    from flashvaed.cli import app
    from flashvaed.demo import embedded_teacher_path
    from flashvaed.models import load_model

    path = embedded_teacher_path("ltx")
    args = ["export", str(path), "-o", str(tmp_path / "e"), "--height", "64", "--width", "64"]
    r = CliRunner().invoke(app, [*args, "--chunk", "2", "--batch", "1", "--no-windows"])
    assert r.exit_code == 0, r.output
    windowed = [a.replace(str(tmp_path / "e"), str(tmp_path / "w")) for a in args]
    r = CliRunner().invoke(app, [*windowed, "--chunk", "2", "--batch", "1"])
    assert r.exit_code == 0, r.output
    import onnx

    nodes = {d: len(onnx.load(str(tmp_path / d / "steady.onnx"), load_external_data=False).graph.node) for d in "ew"}
    assert nodes["e"] < nodes["w"], nodes  # no window arithmetic in the static graph
    # ... and in the windowed one, little: every layer's windows and indices are computed at once per step
    # (blocks.StepPlan; computed layer by layer, the windowed graph had 1.7x the static one's nodes here)
    assert nodes["w"] < 1.25 * nodes["e"], nodes
    engine, teacher = engines.load(tmp_path / "e"), load_model(path).eval()
    latents = torch.randn(1, teacher.latent_channels, 3, 2, 2)
    expected = teacher.decode(latents, 2)
    torch.testing.assert_close(engine.decode(latents, 2), expected, atol=1e-4, rtol=0)
    # the manifests say which graphs compute windows; TensorRT cannot build those (data-dependent
    # sizes): refused in one line, before TensorRT is imported, with the way to export one it can
    manifests = {d: json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ew"}
    assert (manifests["e"]["windows"], manifests["w"]["windows"]) == (False, True)
    assert "flush" in manifests["w"]["graphs"] and "flush" not in manifests["e"]["graphs"]
    with pytest.raises(InputError, match="--no-windows") as refused:
        build_engine(tmp_path / "w", tmp_path / "trt", backend="tensorrt")
    assert "\n" not in str(refused.value) and not (tmp_path / "trt").exists()
    if importlib.util.find_spec("tensorrt") is None:  # a static export gets as far as asking for TensorRT
        with pytest.raises(InputError, match="needs TensorRT"):
            build_engine(tmp_path / "e", tmp_path / "trt", backend="tensorrt")
    # a manifest from before windows were recorded (and flush graphs written): its graphs tell
    del manifests["w"]["windows"]
    manifests["w"]["graphs"].pop("flush")
    (tmp_path / "w" / "manifest.json").write_text(json.dumps(manifests["w"]))
    with pytest.raises(InputError, match="--no-windows"):
        build_engine(tmp_path / "w", tmp_path / "trt", backend="tensorrt")
