"""Engines: build, load, stream, validate; the same decoder API over torch and ONNX Runtime."""

from __future__ import annotations

import importlib.util
import json
import threading

import onnx
import pytest
import torch
from typer.testing import CliRunner

from flashvaed import engines
from flashvaed.cli import app
from flashvaed.engines.build import build_engine
from flashvaed.engines.validate import validate
from flashvaed.errors import InputError
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.models import WanConfig, WanVAE, save_teacher

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(teacher_8, tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    save_teacher(teacher_8, d / "teacher.safetensors")
    export(teacher_8, d / "export", ExportOptions(chunk="1:2:4", height="16:32:64", width="16:32:64", batch="1:1:2"))
    export(teacher_8, d / "static", ExportOptions(chunk="2", height="24", width="32", batch="1"))
    build_engine(d / "export", d / "engine", "onnxruntime")
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 6, 3, 4)
    torch.save({"latents": latents}, d / "z.pt")
    return d, latents


def test_every_source_decodes_the_same(teacher_8, built):
    d, latents = built
    expected = teacher_8.decode(latents)
    for source in (teacher_8, d / "teacher.safetensors", d / "export", d / "engine", d / "static"):
        decoder = engines.load(source)
        for chunk in [c for c in (1, 2, 3) if c in decoder.chunk_range]:
            torch.testing.assert_close(decoder.decode(latents, chunk=chunk), expected, atol=1e-4, rtol=0)


def test_engine_manifest_names_backend_and_optimised_files(built):
    d, _ = built
    manifest = json.loads((d / "engine" / "manifest.json").read_text())
    assert manifest["format"] == "flashvaed-engine"
    assert manifest["backend"]["name"] == "onnxruntime" and manifest["backend"]["providers"]
    assert manifest["graphs"]["steady"]["file"] == "steady.optimized.onnx"
    assert (d / "engine" / "steady.optimized.onnx").is_file()


def test_static_engine_pads_the_last_chunk_and_refuses_short_pushes(teacher_8, built):
    d, latents = built
    decoder = engines.load(d / "static")
    stream = decoder.stream()
    stream.push(latents[:, :, :3])  # first frame + one chunk of 2
    with pytest.raises(InputError, match="below this engine's minimum of 2"):
        stream.push(latents[:, :, 3:4])
    with pytest.raises(InputError, match=r"height 3 latent \(24..24 px\), got 4 latent"):
        decoder.decode(torch.randn(1, 16, 3, 4, 4))
    with pytest.raises(InputError, match="chunk range 2"):
        decoder.decode(latents, chunk=3)


def test_streams_are_independent_and_thread_safe(built):
    d, _ = built
    decoder = engines.load(d / "engine")
    torch.manual_seed(3)
    clips = [torch.randn(1, 16, 7, 3, 4) for _ in range(4)]
    alone = [decoder.decode(c, chunk=2) for c in clips]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        stream = decoder.stream()
        parts = [stream.push(clips[i][:, :, :1])]
        for s in range(1, 7, 2):
            parts.append(stream.push(clips[i][:, :, s : s + 2]))
        results[i] = torch.cat(parts, dim=2)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert torch.equal(results[i], alone[i])


@pytest.mark.parametrize("source", ["engine", "torch"])
def test_saved_state_resumes_and_refuses_other_models(built, teacher_8, source):
    d, latents = built
    decoder = engines.load(d / "engine" if source == "engine" else teacher_8)
    whole = decoder.decode(latents, chunk=2)
    a = decoder.stream()
    head = a.push(latents[:, :, :3])
    b = decoder.stream()
    b.load_state(a.save_state())
    tail = b.push(latents[:, :, 3:], final=True)
    torch.testing.assert_close(torch.cat([head, tail], dim=2), whole, atol=1e-5, rtol=0)

    torch.manual_seed(5)
    other = engines.load(WanVAE(WanConfig(base_dim=8)))
    with pytest.raises(InputError, match="state belongs to model"):
        other.stream().load_state(a.save_state())
    saved = a.save_state()
    saved.tensors[0] = saved.tensors[0][:, :, :1]
    with pytest.raises(InputError, match="has shape"):
        decoder.stream().load_state(saved)


def test_validate_passes_a_good_engine_and_fails_a_corrupted_one(teacher_8, built, tmp_path):
    d, latents = built
    report = validate(engines.load(d / "engine"), teacher_8, latents, chunk=2, teacher=teacher_8)
    assert report.passed and len(report.chunks) == 1 + 3
    assert report.teacher["psnr"] > 80 and report.end_to_end["max_abs"] < 1e-4

    bad = tmp_path / "bad"
    build_engine(d / "export", bad, "onnxruntime")
    graph = onnx.load(str(bad / "steady.optimized.onnx"))
    biggest = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    array = onnx.numpy_helper.to_array(biggest).copy()
    array.flat[: max(1, array.size // 50)] *= 1.5
    biggest.CopyFrom(onnx.numpy_helper.from_array(array, biggest.name))
    onnx.save(graph, str(bad / "steady.optimized.onnx"))
    report = validate(engines.load(bad), teacher_8, latents, chunk=2)
    assert not report.passed and report.chunks[0]["passed"] and not report.chunks[1]["passed"]
    r = invoke("validate", bad, "-r", d / "teacher.safetensors", "-l", d / "z.pt", "--json", tmp_path / "v.json")
    assert r.exit_code == 1 and "FAILED" in r.output
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is False


def test_cli_round_trip(built, tmp_path):
    d, _ = built
    t = d / "teacher.safetensors"
    r = invoke("export", t, "-o", tmp_path / "e", "--chunk", "1:2:4", "--height", "16:64", "--width", "16:64")
    assert r.exit_code == 0, r.output
    r = invoke("build-engine", tmp_path / "e", "-o", tmp_path / "g", "--backend", "onnxruntime")
    assert r.exit_code == 0, r.output
    r = invoke("decode", d / "z.pt", "-m", tmp_path / "g", "-o", tmp_path / "f.pt", "-q")
    assert r.exit_code == 0, r.output
    ref = invoke("decode", d / "z.pt", "-m", t, "-o", tmp_path / "r.pt", "-q", "--device", "cpu")
    assert ref.exit_code == 0
    got, want = (torch.load(tmp_path / n, weights_only=True)["frames"] for n in ("f.pt", "r.pt"))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    r = invoke("info", tmp_path / "g")
    assert r.exit_code == 0 and "onnxruntime" in r.output and "state per stream" in r.output
    r = invoke("validate", tmp_path / "g", "-r", t, "-l", d / "z.pt")
    assert r.exit_code == 0 and "PASSED" in r.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["decode", "{big}", "-m", "{static}", "-o", "{out}/x.pt"], "built for height 3 latent (24..24 px)"),
        (["decode", "{zero}", "-m", "{engine}", "-o", "{out}/x.pt"], "zero frames"),
        (["decode", "{z}", "-m", "{out}", "-o", "{out}/x.pt"], "not a flashvaed"),
        (["build-engine", "{root}", "-o", "{out}/e"], "no manifest.json"),
        (["build-engine", "{export}", "-o", "{out}/e", "--backend", "tensorrt"], "pip install flashvaed[tensorrt]"),
        (["build-engine", "{engine}", "-o", "{out}/e"], "already an engine"),
        (["validate", "{export}", "-r", "{other}", "-l", "{z}"], "exported from model"),
        (["export", "{engine}", "-o", "{out}/e"], "already an export or engine"),
    ],
)
def test_bad_input_is_one_line_exit_2(built, tmp_path, args, needle):
    d, latents = built
    torch.save({"latents": latents[:, :, :0]}, tmp_path / "zero.pt")
    torch.save({"latents": torch.randn(1, 16, 3, 4, 4)}, tmp_path / "big.pt")
    save_teacher(WanVAE(WanConfig(base_dim=8)), tmp_path / "other.safetensors")
    (tmp_path / "manifest.json").write_text("{}")
    paths = {
        "z": d / "z.pt",
        "zero": tmp_path / "zero.pt",
        "big": tmp_path / "big.pt",
        "static": d / "static",
        "engine": d / "engine",
        "export": d / "export",
        "other": tmp_path / "other.safetensors",
        "out": tmp_path,
        "root": d,
    }
    if "tensorrt" in args and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    r = invoke(*[a.format(**paths) for a in args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output
    assert not (tmp_path / "e").exists() and not (tmp_path / "x.pt").exists()


def test_a_contract_inconsistent_with_its_graphs_is_refused(built, tmp_path):
    """A decoder with latency needs its 'last' graph; step inputs must be ones this version drives."""
    import shutil

    d, _ = built
    for field, value, needle in (
        ("latency", 1, "graphs \\(expected first, steady, last\\)"),
        ("step_inputs", ["temperature"], "declares step inputs this version cannot drive \\(temperature\\)"),
    ):
        shutil.copytree(d / "export", tmp_path / field)
        manifest = json.loads((tmp_path / field / "manifest.json").read_text())
        manifest["model"][field] = value
        (tmp_path / field / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(InputError, match=needle):
            engines.load(tmp_path / field)


def test_a_tensorrt_engine_directory_lists_its_plans(built, tmp_path, monkeypatch):
    """The TensorRT branch of build_engine (the TensorRT calls faked: none can run here) writes a
    manifest naming its plan files, which read_manifest accepts."""
    from flashvaed.engines import tensorrt_backend
    from flashvaed.export.contract import read_manifest

    def fake_build(export_dir, contract, out_dir, timing_cache, workspace_gib, bar):
        plans = {g: f"{g}.plan" for g in contract.files}
        for name in plans.values():
            (out_dir / name).write_bytes(b"plan")
        return {"name": "tensorrt", "tensorrt_version": "10.7.0", "plan_files": plans}

    monkeypatch.setattr(tensorrt_backend, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt_backend, "build", fake_build)
    d, _ = built
    build_engine(d / "export", tmp_path / "trt", "tensorrt")
    contract = read_manifest(tmp_path / "trt")
    assert contract.files == {"first": "first.plan", "steady": "steady.plan"}
    assert contract.backend["plan_files"] == contract.files
    assert not list((tmp_path / "trt").glob("*.onnx"))


def test_tensorrt_plans_are_checked_against_their_manifest(built):
    """A TensorRT engine's named tensors (faked: TensorRT cannot run here) must be the ones its
    contract describes; a manifest that lies about a state's channels is caught at load."""
    from types import SimpleNamespace

    from flashvaed.engines.tensorrt_backend import engine_io
    from flashvaed.export.contract import read_manifest

    d, _ = built
    contract = read_manifest(d / "export")
    trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"))

    def fake_engine(graph, channels_of_first_state=None):
        io = contract.io(graph)
        tensors = [(t, "in") for t in io["inputs"]] + [(t, "out") for t in io["outputs"]]
        shapes = {t["name"]: [v if isinstance(v, int) else -1 for v in t["shape"]] for t, _ in tensors}
        if channels_of_first_state is not None:
            shapes[contract.state[0].input][1] = channels_of_first_state
        modes = {t["name"]: mode for t, mode in tensors}
        return SimpleNamespace(
            num_io_tensors=len(tensors),
            get_tensor_name=lambda i: tensors[i][0]["name"],
            get_tensor_shape=shapes.__getitem__,
            get_tensor_mode=modes.__getitem__,
        )

    assert contract.io_problem("steady", *engine_io(trt, fake_engine("steady"))) is None
    problem = contract.io_problem("steady", *engine_io(trt, fake_engine("steady", 7)))
    assert problem is not None and contract.state[0].input in problem


def test_closed_streams_lend_their_buffers_to_a_few_recent_sizes(built):
    """A closed stream's state buffers go to the next stream of its size; a decoder that sees many
    sizes keeps them for the most recent few only (a long-lived server must not hoard them)."""
    from flashvaed.engines.ort_backend import MAX_SPARE_SIZES, MAX_SPARES_PER_SIZE

    d, _ = built
    decoder = engines.load(d / "engine")
    torch.manual_seed(5)
    for size in ((2, 2), (3, 4), (4, 4), (3, 4), (2, 3)):
        latents = torch.randn(1, 16, 3, *size)
        streams = [decoder.stream() for _ in range(3)]  # three open at once, then all closed
        outs = [torch.cat([s.push(latents[:, :, :1]), s.push(latents[:, :, 1:])], dim=2) for s in streams]
        for s in streams:
            s.close()
        assert all(torch.equal(o, outs[0]) for o in outs)  # reused buffers never leak one stream's state
        assert len(decoder.spares) <= MAX_SPARE_SIZES
        assert all(len(kept) <= MAX_SPARES_PER_SIZE for kept in decoder.spares.values())
    assert [key[2:4] for key in decoder.spares] == [(3, 4), (2, 3)]
