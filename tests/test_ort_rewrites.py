"""ONNX Runtime CPU rewrites: each rewritten pattern computes what torch computes, patterns the
rewrites do not cover stay as they are, and a rewritten export decodes as the plain one does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from flashvaed import engines
from flashvaed.engines.ort_backend import OnnxRuntimeDecoder, check_backend, rewrites_on
from flashvaed.engines.ort_rewrites import (
    MIN_PHASE_OUTPUTS,
    band_kernel,
    banded_time_convs,
    channel_sums_as_convs,
    phase_convs,
    rewrite_for_cpu,
)
from flashvaed.errors import InputError
from flashvaed.export.contract import read_manifest
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.models import StudentSpec, WanConfig
from flashvaed.models.student import build_student


def model_of(nodes, inputs, output, tensors) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# (C_in, C_out, groups, kernel, window frames, pads (t, h, w), bias)
BANDED = [
    (8, 8, 8, (3, 3, 3), 6, (0, 1, 1), True),  # depthwise, as the students' temporal convs
    (8, 8, 8, (3, 3, 3), 3, (0, 1, 1), False),  # the first step: one output frame
    (6, 3, 1, (3, 3, 3), 10, (0, 1, 1), True),  # a dense conv to RGB (the head)
    (5, 2, 1, (2, 1, 3), 4, (0, 0, 1), True),  # kt = 2, unequal spatial kernel and pads
]


@pytest.mark.parametrize("c_in,c_out,groups,kernel,window,pads,bias", BANDED)
def test_banded_conv_is_the_3d_conv(c_in, c_out, groups, kernel, window, pads, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c_in, window, 7, 9)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in // groups, *kernel)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    tensors = {"w": w, **({"b": b} if bias else {})}
    conv = helper.make_node(
        "Conv", ["x", "w", *(["b"] if bias else [])], ["y"], group=groups, pads=[*pads, *pads], name="c"
    )
    model = model_of([conv], {"x": x.shape}, "y", tensors)
    assert banded_time_convs(model) == 1
    assert ops(model) == ["Reshape", "Conv", "Reshape"]
    expected = F.conv3d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b) if bias else None,
                        padding=pads, groups=groups)  # fmt: skip
    np.testing.assert_allclose(run(model, {"x": x}), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_band_kernel_layout():
    w = np.arange(2 * 1 * 3 * 1 * 1, dtype=np.float32).reshape(2, 1, 3, 1, 1) + 1  # depthwise, two channels
    band = band_kernel(w, groups=2, frames=2)[:, :, 0, 0]  # (C*T, T + 2)
    assert band.tolist() == [[1, 2, 3, 0], [0, 1, 2, 3], [4, 5, 6, 0], [0, 4, 5, 6]]


@pytest.mark.parametrize(
    "what,c_out,groups,window,attrs",
    [
        ("a band longer than the ratio allows", 4, 4, 11, {}),
        ("a dense conv with many outputs (GEMM-bound)", 16, 1, 6, {}),
        ("a strided conv", 4, 4, 6, {"strides": [1, 2, 2]}),
        ("temporal padding", 4, 4, 6, {"pads": [1, 1, 1, 1, 1, 1]}),
    ],
)
def test_convs_outside_the_rule_stay(what, c_out, groups, window, attrs):
    w = np.ones((c_out, 4 // groups, 3, 3, 3), np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=groups, **{"pads": [0, 1, 1, 0, 1, 1], **attrs})
    model = model_of([conv], {"x": (1, 4, window, 8, 8)}, "y", {"w": w})
    assert banded_time_convs(model) == 0, what
    assert ops(model) == ["Conv"]


def test_dynamic_sizes_stay():
    w = np.ones((4, 1, 3, 3, 3), np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[0, 1, 1, 0, 1, 1])
    model = model_of([conv], {"x": (1, 4, "frames", 8, 8)}, "y", {"w": w})
    assert banded_time_convs(model) == 0


SUMS = [
    ((2, 6, 3, 5, 4), None, 1),
    ((3, 7, 5, 4), None, 1),
    ((1, 3, 6, 5, 4), None, 2),  # the (B, T, C, H, W) layout of per-frame blocks
    ((2, 5, 6), None, -1),
    ((2, 6, 3, 5, 4), ("batch", 6, "frames", "h", "w"), 1),  # dynamic sizes, known channels
    ((1, 3, 6, 5, 4), (1, "frames", 6, "h", "w"), 2),
]


@pytest.mark.parametrize("shape,declared,axis", SUMS)
def test_sum_of_squares_as_conv(shape, declared, axis):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes"], ["y"], keepdims=1),
    ]
    model = model_of(nodes, {"x": declared or shape}, "y", {"axes": np.array([axis], np.int64)})
    assert channel_sums_as_convs(model) == 1
    assert "ReduceSum" not in ops(model)
    np.testing.assert_allclose(run(model, {"x": x}), (x * x).sum(axis, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "what,nodes,axes",
    [
        ("a product of two tensors", [helper.make_node("Mul", ["x", "z"], ["sq"])], [1]),
        ("two axes", [helper.make_node("Mul", ["x", "x"], ["sq"])], [1, 2]),
        ("keepdims=0", [helper.make_node("Mul", ["x", "x"], ["sq"])], [1]),
        ("an axis of unknown size", [helper.make_node("Mul", ["x", "x"], ["sq"])], [2]),
    ],
)
def test_other_sums_stay(what, nodes, axes):
    keep = 0 if what == "keepdims=0" else 1
    reduce = helper.make_node("ReduceSum", ["sq", "axes"], ["y"], keepdims=keep)
    shape = (1, 4, "h", 3)
    model = model_of([*nodes, reduce], {"x": shape, "z": shape}, "y", {"axes": np.array(axes, np.int64)})
    assert channel_sums_as_convs(model) == 0, what
    assert "ReduceSum" in ops(model)


@pytest.mark.parametrize("bias", [True, False])
def test_phase_convs_are_the_transposed_conv(bias):
    rng = np.random.default_rng(2)
    c_out = MIN_PHASE_OUTPUTS
    x = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    w = rng.standard_normal((5, c_out, 4, 4)).astype(np.float32)
    b = rng.standard_normal(c_out).astype(np.float32)
    inputs = ["x", "w", *(["b"] if bias else [])]
    up = helper.make_node("ConvTranspose", inputs, ["y"], strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[4, 4])
    model = model_of([up], {"x": ("n", 5, "h", "w")}, "y", {"w": w, **({"b": b} if bias else {})})
    assert phase_convs(model) == 1
    assert ops(model) == ["Conv"] * 4 + ["Concat", "DepthToSpace"]
    expected = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b) if bias else None,
                                  stride=2, padding=1)  # fmt: skip
    np.testing.assert_allclose(run(model, {"x": x}), expected.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "what,c_out,attrs",
    [
        ("too few outputs (four small GEMMs lose)", MIN_PHASE_OUTPUTS - 1, {}),
        ("another padding", MIN_PHASE_OUTPUTS, {"pads": [0, 0, 0, 0]}),
        ("an output padding", MIN_PHASE_OUTPUTS, {"output_padding": [1, 1]}),
        ("stride 3", MIN_PHASE_OUTPUTS, {"strides": [3, 3]}),
    ],
)
def test_other_transposed_convs_stay(what, c_out, attrs):
    w = np.ones((3, c_out, 4, 4), np.float32)
    up = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **{"strides": [2, 2], "pads": [1, 1, 1, 1], **attrs})
    model = model_of([up], {"x": (1, 3, 4, 4)}, "y", {"w": w})
    assert phase_convs(model) == 0, what
    assert ops(model) == ["ConvTranspose"]


# ---------------------------------------------------------------------------------------------
# a real export: the rewrites find their patterns behind plugin nodes and shape arithmetic
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def static_export(tmp_path_factory):
    torch.manual_seed(0)
    student = build_student(StudentSpec.load("flash-wan2.1"), WanConfig(base_dim=16))[0].eval()
    out = tmp_path_factory.mktemp("rewrites") / "export"
    export(student, out, ExportOptions(chunk="2", height="32", width="48", batch="1"))
    return student, out


def test_export_is_rewritten(static_export):
    _, out = static_export
    rewritten = onnx.load_from_string(rewrite_for_cpu(out / "steady.onnx"))
    names = [n.name for n in rewritten.graph.node]
    assert sum(n.endswith("/banded") for n in names) >= 8  # the students' depthwise convs and the head
    assert not [n for n in rewritten.graph.node if n.op_type == "ReduceSum"]  # every RMS norm's sum


def test_rewritten_export_decodes_as_torch(static_export):
    student, out = static_export
    latents = torch.randn(1, 16, 5, 4, 6)
    reference = engines.load(student).decode(latents)
    contract = read_manifest(out)
    rewritten = OnnxRuntimeDecoder(out, contract, ["CPUExecutionProvider"])
    plain = OnnxRuntimeDecoder(out, contract, ["CPUExecutionProvider"], {"rewrites": False})
    for decoder in (rewritten, plain):
        torch.testing.assert_close(decoder.decode(latents), reference, rtol=1e-4, atol=1e-5)
    assert set(rewritten.rewritten) == {"first", "steady"} and plain.rewritten == []
    assert rewritten.describe()["rewritten_graphs"] == rewritten.rewritten


def test_export_with_phase_convs_decodes_as_torch(static_export, monkeypatch, tmp_path):
    """The tiny student's upsamplers are far narrower than the released ones: exported as transposed
    convs and rewritten as phase convs from one output channel on, it decodes the same."""
    from flashvaed.engines import ort_rewrites
    from flashvaed.models import blocks

    student, _ = static_export
    monkeypatch.setattr(blocks, "EXPORT_TRANSPOSED_FROM", 1)
    monkeypatch.setattr(ort_rewrites, "MIN_PHASE_OUTPUTS", 1)
    out = tmp_path / "transposed"
    export(student, out, ExportOptions(chunk="2", height="32", width="48", batch="1"))
    assert "ConvTranspose" in ops(onnx.load(str(out / "steady.onnx")))
    rewritten = onnx.load_from_string(rewrite_for_cpu(out / "steady.onnx"))
    assert "ConvTranspose" not in ops(rewritten) and "DepthToSpace" in ops(rewritten)
    latents = torch.randn(1, 16, 5, 4, 6)
    decoded = OnnxRuntimeDecoder(out, read_manifest(out), ["CPUExecutionProvider"]).decode(latents)
    torch.testing.assert_close(decoded, engines.load(student).decode(latents), rtol=1e-4, atol=1e-5)


def test_dynamic_export_rewrites_its_norms(static_export, tmp_path):
    student, _ = static_export
    out = tmp_path / "dynamic"
    export(student, out, ExportOptions(chunk="1:2:3", height="16:32:48", width="16:48:64", batch="1:1:2"))
    rewritten = onnx.load_from_string(rewrite_for_cpu(out / "steady.onnx"))
    names = [n.name for n in rewritten.graph.node]
    assert not any(n.endswith("/banded") for n in names)  # the frame count is not known
    assert not [n for n in rewritten.graph.node if n.op_type == "ReduceSum"]  # the channel counts are
    latents = torch.randn(2, 16, 4, 2, 3)
    decoded = OnnxRuntimeDecoder(out, read_manifest(out), ["CPUExecutionProvider"]).decode(latents)
    torch.testing.assert_close(decoded, engines.load(student).decode(latents), rtol=1e-4, atol=1e-5)


def test_a_failed_basic_pass_loads_the_graph_as_it_is(static_export, monkeypatch, tmp_path):
    """No room for the basic-level pass's file: the engine loads unrewritten. A graph ORT refuses is
    still reported as the user's (one line, exit 2), not as a failed rewrite."""
    from flashvaed.engines import ort_rewrites

    _, out = static_export
    copies = {}
    for name in ("full", "broken"):  # files this process has not rewritten yet (no cached rewrite)
        copies[name] = tmp_path / name
        copies[name].mkdir()
        for f in out.iterdir():
            (copies[name] / f.name).write_bytes(f.read_bytes())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(ort_rewrites.tempfile, "TemporaryDirectory", full_disk)
        decoder = OnnxRuntimeDecoder(copies["full"], read_manifest(out), ["CPUExecutionProvider"])
    assert decoder.rewritten == []
    broken = copies["broken"]
    (broken / "steady.onnx").write_bytes(b"not a graph")
    assert rewrite_for_cpu(broken / "steady.onnx") is None
    with pytest.raises(InputError, match="cannot load graph .*steady.onnx"):
        OnnxRuntimeDecoder(broken, read_manifest(broken), ["CPUExecutionProvider"])


def test_rewrites_setting_is_checked():
    assert rewrites_on(None) and rewrites_on({}) and not rewrites_on({"rewrites": False})
    with pytest.raises(InputError, match="rewrites must be true or false"):
        rewrites_on({"rewrites": "no"})
    with pytest.raises(InputError, match="backend.session_options.*rewrites"):
        check_backend({"name": "onnxruntime", "session_options": {"rewrites": 1}}, "manifest.json")
