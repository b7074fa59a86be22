"""Export: the two ONNX graphs equal the PyTorch step, driven only by their metadata contract.

The reader below uses nothing of flashvaed: it opens the graphs with onnx and onnxruntime, reads
the contract from the graph metadata, and runs the chunk rule it describes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from flashvaed.errors import InputError
from flashvaed.export.contract import ShapeRange
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.export.op_coverage import unsupported_by_tensorrt
from flashvaed.export.plugin_nodes import DENSE, DEPTHWISE, DOMAIN
from flashvaed.models import StudentSpec, WanConfig
from flashvaed.models.student import build_student, preset_names

SMALL = ExportOptions(chunk="1:2:4", height="16:32:64", width="16:32:64", batch="1:1:2")


def contract_decode(export_dir, latents: np.ndarray, chunk: int | tuple[int, ...]) -> np.ndarray:
    """Decode with onnxruntime alone, following the contract in the graphs' metadata (a tuple of
    chunks: one decode per chunk, from the same sessions)."""
    first = onnx.load(str(export_dir / "first.onnx"), load_external_data=False)
    contract = json.loads({p.key: p.value for p in first.metadata_props}["flashvaed.contract"])
    sessions = {
        g: ort.InferenceSession(str(export_dir / contract["graphs"][g]["file"]), providers=["CPUExecutionProvider"])
        for g in ("first", "steady")
    }
    steady_io = contract["graphs"]["steady"]
    state_in = [t["name"] for t in steady_io["inputs"][1:]]
    state_out = [t["name"] for t in steady_io["outputs"][1:]]
    assert [s["output"] for s in contract["state"]] == state_out
    if isinstance(chunk, tuple):
        return [_run_contract(sessions, state_in, latents, c) for c in chunk]
    return _run_contract(sessions, state_in, latents, chunk)


def _run_contract(sessions: dict, state_in: list[str], latents: np.ndarray, chunk: int) -> np.ndarray:
    outs = sessions["first"].run(None, {"latents": latents[:, :, :1]})
    frames, state = [outs[0]], outs[1:]
    for start in range(1, latents.shape[2], chunk):
        feed = {"latents": latents[:, :, start : start + chunk], **dict(zip(state_in, state, strict=True))}
        outs = sessions["steady"].run(None, feed)
        frames.append(outs[0])
        state = outs[1:]
    return np.concatenate(frames, axis=2)


def perturbed(model, scale: float = 0.02):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def operators(preset: str) -> tuple:
    """A preset less its widths: presets that differ only in widths export the same graphs."""
    stages = StudentSpec.load(preset).stages
    return tuple((k, v.op, v.shortcut, v.causal) for k, v in sorted(stages.items()))


# one preset per set of operators (flash-wan2.1-quarter is flash-wan2.1 at other widths)
PRESETS = list({operators(p): p for p in reversed(preset_names("wan2.1"))}.values())[::-1]


@pytest.fixture(scope="module")
def models(teacher_8):
    students = {p: perturbed(build_student(StudentSpec.load(p), WanConfig(base_dim=16))[0]) for p in PRESETS}
    return {"teacher": teacher_8, **students}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Each model exported once per plugins choice for the module, at SMALL's shapes, on demand:
    (model, plugins) -> (folder, ExportResult)."""
    root = tmp_path_factory.mktemp("exports")
    done = {}

    def get(name: str, plugins: str = SMALL.plugins):
        if (name, plugins) not in done:
            out, options = root / f"{name}-{plugins}", ExportOptions(**{**SMALL.__dict__, "plugins": plugins})
            done[name, plugins] = out, export(models[name], out, options)
        return done[name, plugins]

    return get


def test_presets_exported_cover_every_operator():
    assert "flash-wan2.1" in PRESETS
    assert {operators(p) for p in PRESETS} == {operators(p) for p in preset_names("wan2.1")}


@pytest.mark.parametrize("name", ["teacher", *PRESETS])
def test_onnx_equals_pytorch_for_every_chunking(models, exported, name):
    model = models[name]
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 6, 3, 5)  # a latent size the graphs were not traced at
    expected = model.decode(latents).numpy()
    results = {}
    for plugins in ("all", "none"):
        out, result = exported(name, plugins)
        assert result.tensorrt_unsupported == []
        for chunk, got in zip((1, 2, 3), contract_decode(out, latents.numpy(), (1, 2, 3)), strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=f"{plugins}, chunk {chunk}")
            results[plugins, chunk] = got
    np.testing.assert_allclose(results["all", 2], results["none", 2], atol=1e-5, rtol=0)


def test_plugin_nodes_carry_attributes_and_function_bodies(exported):
    steady = onnx.load(str(exported("flash-wan2.1")[0] / "steady.onnx"))
    onnx.checker.check_model(steady, full_check=True)
    nodes = [n for n in steady.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in nodes} == {DENSE, DEPTHWISE}  # conv_in/time_conv/head dense, stages depthwise
    assert {(f.domain, f.name) for f in steady.functions} == {(DOMAIN, DENSE), (DOMAIN, DEPTHWISE)}
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"flashvaed" and attrs["plugin_version"] == b"1"
        assert len(attrs["pads"]) == 6 and attrs["group"] >= 1
        assert len(n.input) == 4 and len(n.output) == 2
    # every streaming conv became a node: the Convs left in the main graph mix no frames
    weights = {i.name: i for i in steady.graph.initializer}
    conv3d = [weights[n.input[1]] for n in steady.graph.node if n.op_type == "Conv" and n.input[1] in weights]
    assert conv3d and all(w.dims[2] == 1 for w in conv3d if len(w.dims) == 5)
    plain_dir, plain = exported("flash-wan2.1", "none")
    plain_graph = onnx.load(str(plain_dir / "steady.onnx"))
    assert not plain_graph.functions and all(n.domain == "" for n in plain_graph.graph.node)
    assert unsupported_by_tensorrt(plain_graph) == [] and plain.contract.plugins == "none"


def test_contract_in_manifest_and_metadata_agree(models, exported):
    out, r = exported("teacher")
    manifest = json.loads((out / "manifest.json").read_text())
    for g in ("first", "steady"):
        m = onnx.load(str(out / f"{g}.onnx"))
        props = {p.key: p.value for p in m.metadata_props}
        assert json.loads(props["flashvaed.contract"]) == manifest and props["flashvaed.graph"] == g
        names_in = [i.name for i in m.graph.input]
        names_out = [o.name for o in m.graph.output]
        assert names_in == [t["name"] for t in manifest["graphs"][g]["inputs"]]
        assert names_out == [t["name"] for t in manifest["graphs"][g]["outputs"]]
    assert manifest["model"]["fingerprint"] == r.contract.model["fingerprint"]
    assert len(manifest["state"]) == len(models["teacher"].decoder_state_specs())
    assert manifest["shapes"]["height"] == {"min": 2, "opt": 4, "max": 8}  # latent rows of 16:32:64 px


def test_fp16_export_runs_in_onnxruntime(models, tmp_path):
    export(models["teacher"], tmp_path / "h", ExportOptions(**{**SMALL.__dict__, "precision": "fp16"}))
    steady = onnx.load(str(tmp_path / "h" / "steady.onnx"))
    state_types = {i.type.tensor_type.elem_type for i in steady.graph.input[1:]}
    assert state_types == {onnx.TensorProto.FLOAT16}
    assert steady.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 4, 3, 4)
    try:
        got = contract_decode(tmp_path / "h", latents.numpy(), 2)
    except Exception as e:  # some CPU builds of onnxruntime lack fp16 kernels for 3D convs
        pytest.skip(f"onnxruntime cannot run fp16 here: {str(e)[:80]}")
    expected = models["teacher"].decode(latents).numpy()
    assert np.abs(got - expected).max() < 5e-2


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"height": "20"}, "multiple of 8"),
        ({"chunk": "4:2"}, "MIN <= OPT <= MAX"),
        ({"chunk": "two"}, "MIN:MAX"),
        ({"precision": "int8"}, "unknown precision"),
        ({"plugins": "trt"}, "plugins"),
        ({"opset": 17}, "opset"),
    ],
)
def test_bad_export_options(models, tmp_path, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        export(models["teacher"], tmp_path / "x", ExportOptions(**{**SMALL.__dict__, **kwargs}))
    assert not (tmp_path / "x").exists()


def test_shape_range_parsing():
    assert ShapeRange.parse("256", "h", 8) == ShapeRange(32, 32, 32)
    assert ShapeRange.parse("64:1280", "h", 8) == ShapeRange(8, 8, 160)
    assert ShapeRange.parse("1:2:8", "chunk") == ShapeRange(1, 2, 8)
    assert 3 in ShapeRange(1, 2, 8) and 9 not in ShapeRange(1, 2, 8)


def test_stream_state_stays_on_the_device_the_session_runs_on():
    from flashvaed.engines.ort_backend import state_device

    cuda_first = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert state_device(cuda_first, {"CUDAExecutionProvider": {"device_id": "1"}}) == ("cuda", 1)
    assert state_device(cuda_first, {}) == ("cuda", 0)
    assert state_device(["CPUExecutionProvider"], {"CPUExecutionProvider": {}}) == ("cpu", 0)
    assert state_device(["CPUExecutionProvider", "CUDAExecutionProvider"], {}) == ("cpu", 0)  # CPU runs first
    assert state_device([], {}) == ("cpu", 0)


def test_device_state_decodes_and_saves_like_host_state(exported, monkeypatch):
    """The device-state path (OrtValues rebound step to step, update_inplace, numpy()) run on the
    CPU device: the same frames and saved states as the CPU path's numpy buffers."""
    from flashvaed.engines import load, ort_backend

    out, _ = exported("teacher")
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 6, 3, 4)
    host = load(out)
    stream = host.stream()
    stream.push(latents[:, :, :3])
    assert isinstance(stream.state, ort_backend.TensorState)  # a CPU session keeps torch buffers (DLPack)
    expected = host.decode(latents, chunk=2)

    monkeypatch.setattr(
        ort_backend, "make_state", lambda shapes, dtype, device: ort_backend.DeviceState(shapes, dtype, "cpu", 0)
    )
    device = load(out)
    torch.testing.assert_close(device.decode(latents, chunk=2), expected, rtol=0, atol=0)
    stream = device.stream()
    head = stream.push(latents[:, :, :3])
    assert isinstance(stream.state, ort_backend.DeviceState)
    saved = stream.save_state()
    tail = stream.push(latents[:, :, 3:])
    resumed = device.stream()
    resumed.load_state(saved)
    torch.testing.assert_close(resumed.push(latents[:, :, 3:]), tail, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([head, tail], dim=2), expected, rtol=0, atol=1e-5)


def test_upsampling_convs_export_as_transposed_convs(models, monkeypatch, tmp_path):
    """From ``EXPORT_TRANSPOSED_FROM`` input channels on, nearest 2x + 3x3 conv is exported as one
    ConvTranspose (no Resize): the same frames as the plain ops, at sizes it was not traced at."""
    from flashvaed.models import blocks

    monkeypatch.setattr(blocks, "EXPORT_TRANSPOSED_FROM", 1)
    export(models["teacher"], tmp_path / "t", SMALL)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "t" / "steady.onnx"), load_external_data=False).graph.node}
    assert "ConvTranspose" in ops and "Resize" not in ops
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 4, 3, 5)
    with blocks.plain_ops(), torch.no_grad():
        expected = models["teacher"].decode(latents).numpy()
    np.testing.assert_allclose(contract_decode(tmp_path / "t", latents.numpy(), 2), expected, atol=1e-4, rtol=0)
