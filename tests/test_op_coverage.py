"""Op-coverage check against TensorRT's ONNX parser support list, on small hand-built graphs."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import pytest
from onnx import TensorProto, helper

from flashvaed.export.op_coverage import graph_ops, tensorrt_supported_ops, unsupported_by_tensorrt

OPSET = 18
FLOAT = TensorProto.FLOAT
ANY_SHAPE = ["d0", "d1", "d2", "d3", "d4"]  # symbolic 5D (B, C, T, H, W); the checker wants a shape


def make_model(
    nodes: list[onnx.NodeProto],
    functions: Sequence[onnx.FunctionProto] = (),
    extra_domains: tuple[str, ...] = (),
    inputs: tuple[str, ...] = ("x",),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, FLOAT, ANY_SHAPE) for name in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], FLOAT, ANY_SHAPE)],
    )
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in extra_domains]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def streaming_conv_function(op_type: str, extra: tuple[onnx.NodeProto, ...] = ()) -> onnx.FunctionProto:
    """A flashvaed-style local function: Concat history, Conv, Slice off the new history."""
    nodes = [
        helper.make_node("Concat", ["history", "x"], ["joined"], axis=2),
        helper.make_node("Conv", ["joined", "weight", "bias"], ["y"]),
        helper.make_node("Shape", ["history"], ["frames"], start=2, end=3),
        helper.make_node("Neg", ["frames"], ["starts"]),
        helper.make_node("Constant", [], ["ends"], value_ints=[2**63 - 1]),
        helper.make_node("Constant", [], ["axes"], value_ints=[2]),
        helper.make_node("Slice", ["joined", "starts", "ends", "axes"], ["new_history"]),
        *extra,
    ]
    return helper.make_function(
        "flashvaed",
        op_type,
        inputs=["x", "history", "weight", "bias"],
        outputs=["y", "new_history"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
    )


def custom_node(domain: str, op_type: str) -> onnx.NodeProto:
    return helper.make_node(op_type, ["x", "h", "w", "b"], ["y", "h_out"], domain=domain)


CONV_INPUTS = ("x", "h", "w", "b")


def test_supported_list_loads_from_package_data() -> None:
    ops = tensorrt_supported_ops()
    assert len(ops) > 150
    assert {"Conv", "ConvTranspose", "Resize", "Pad", "Slice", "Shape", "Concat", "Clip", "Expand"} <= ops
    assert {"ConstantOfShape", "GroupNormalization", "InstanceNormalization", "Einsum", "If", "Loop"} <= ops
    # Marked N in onnx-tensorrt's docs/operators.md.
    assert not ops & {"ConvInteger", "Col2Im", "BitwiseAnd", "SequenceAt", "Unique", "AffineGrid"}
    assert not any(op.startswith("#") or " " in op for op in ops)
    # Every name is a real default-domain ONNX op, bar three experimental ops TensorRT still imports.
    schemas = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    assert ops - schemas <= {"ImageScaler", "ParametricSoftplus", "ScaledTanh"}


def test_supported_graph_passes() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Mul", ["c", "s"], ["silu"]),
        helper.make_node("Resize", ["silu", "", "scales"], ["r"], mode="nearest"),
        helper.make_node("Clip", ["r"], ["y"]),
    ]
    model = make_model(nodes, inputs=("x", "w", "scales"))
    assert unsupported_by_tensorrt(model) == []


def test_ai_onnx_domain_is_the_default_domain() -> None:
    model = make_model([helper.make_node("Relu", ["x"], ["y"], domain="ai.onnx")])
    assert graph_ops(model) == {("", "Relu")}
    assert unsupported_by_tensorrt(model) == []


@pytest.mark.parametrize("op_type", ["FooBar", "ConvInteger", "Col2Im"])
def test_op_not_on_list_is_reported(op_type: str) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op_type, ["r"], ["y"])]
    problems = unsupported_by_tensorrt(make_model(nodes))
    assert len(problems) == 1
    assert problems[0].startswith(f"{op_type}:")


def test_unknown_custom_op_is_reported() -> None:
    model = make_model([custom_node("acme", "Mystery")], extra_domains=("acme",), inputs=CONV_INPUTS)
    (problem,) = unsupported_by_tensorrt(model)
    assert problem.startswith("acme::Mystery:")
    assert "no known plugin and no local function" in problem


def test_plugin_ops_pass_without_local_functions() -> None:
    nodes = [
        custom_node("flashvaed", "StreamingCausalConv3d"),
        helper.make_node("StreamingDepthwiseConv3d", ["y", "h", "w", "b"], ["y2", "h2"], domain="flashvaed"),
    ]
    model = make_model(nodes, extra_domains=("flashvaed",), inputs=CONV_INPUTS)
    assert unsupported_by_tensorrt(model) == []
    # Not a plugin when the caller says so: then the node needs a local function.
    assert len(unsupported_by_tensorrt(model, plugin_ops=())) == 2


def test_plugin_ops_with_their_function_bodies_pass() -> None:
    model = make_model(
        [custom_node("flashvaed", "StreamingCausalConv3d")],
        functions=[streaming_conv_function("StreamingCausalConv3d")],
        extra_domains=("flashvaed",),
        inputs=CONV_INPUTS,
    )
    onnx.checker.check_model(model)
    assert unsupported_by_tensorrt(model) == []
    assert unsupported_by_tensorrt(model, plugin_ops=()) == []


def test_custom_node_backed_by_supported_local_function_passes() -> None:
    model = make_model(
        [custom_node("flashvaed", "MyConv")],
        functions=[streaming_conv_function("MyConv")],
        extra_domains=("flashvaed",),
        inputs=CONV_INPUTS,
    )
    onnx.checker.check_model(model)
    assert unsupported_by_tensorrt(model) == []


def test_local_function_with_unsupported_body_is_reported() -> None:
    bad = helper.make_node("FooBar", ["y"], ["z"])
    model = make_model(
        [custom_node("flashvaed", "MyConv")],
        functions=[streaming_conv_function("MyConv", extra=(bad,))],
        extra_domains=("flashvaed",),
        inputs=CONV_INPUTS,
    )
    (problem,) = unsupported_by_tensorrt(model)
    assert problem.startswith("flashvaed::MyConv:")
    assert "FooBar" in problem


def test_nested_local_functions_are_followed() -> None:
    inner_ok = helper.make_function(
        "acme", "Inner", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", OPSET)]
    )
    inner_bad = helper.make_function(
        "acme", "InnerBad", ["a"], ["b"], [helper.make_node("FooBar", ["a"], ["b"])], [helper.make_opsetid("", OPSET)]
    )

    def outer(name: str, inner: str) -> onnx.FunctionProto:
        return helper.make_function(
            "acme",
            name,
            ["a"],
            ["b"],
            [helper.make_node(inner, ["a"], ["b"], domain="acme")],
            [helper.make_opsetid("", OPSET), helper.make_opsetid("acme", 1)],
        )

    functions = [inner_ok, inner_bad, outer("Outer", "Inner"), outer("OuterBad", "InnerBad")]
    good = make_model([helper.make_node("Outer", ["x"], ["y"], domain="acme")], functions, ("acme",))
    assert unsupported_by_tensorrt(good) == []
    bad = make_model([helper.make_node("OuterBad", ["x"], ["y"], domain="acme")], functions, ("acme",))
    (problem,) = unsupported_by_tensorrt(bad)
    assert problem.startswith("acme::OuterBad:")
    assert "acme::InnerBad" in problem


def test_recursive_local_function_is_reported_not_looped() -> None:
    loop = helper.make_function(
        "acme",
        "Self",
        ["a"],
        ["b"],
        [helper.make_node("Self", ["a"], ["b"], domain="acme")],
        [helper.make_opsetid("acme", 1)],
    )
    model = make_model([helper.make_node("Self", ["x"], ["y"], domain="acme")], [loop], ("acme",))
    (problem,) = unsupported_by_tensorrt(model)
    assert problem.startswith("acme::Self:")


def test_ops_in_function_bodies_are_found() -> None:
    model = make_model(
        [custom_node("flashvaed", "StreamingCausalConv3d")],
        functions=[streaming_conv_function("StreamingCausalConv3d")],
        extra_domains=("flashvaed",),
        inputs=CONV_INPUTS,
    )
    assert graph_ops(model) == {
        ("flashvaed", "StreamingCausalConv3d"),
        ("", "Concat"),
        ("", "Conv"),
        ("", "Shape"),
        ("", "Neg"),
        ("", "Constant"),
        ("", "Slice"),
    }


def if_model(then_op: str, else_op: str) -> onnx.ModelProto:
    def branch(name: str, op_type: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op_type, ["x"], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", FLOAT, ANY_SHAPE)],
        )

    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    node = helper.make_node(
        "If", ["cond"], ["y"], then_branch=branch("then", then_op), else_branch=branch("else", else_op)
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", FLOAT, ANY_SHAPE), cond],
        [helper.make_tensor_value_info("y", FLOAT, ANY_SHAPE)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def test_ops_in_if_subgraphs_are_found_and_checked() -> None:
    model = if_model("Relu", "Tanh")
    onnx.checker.check_model(model)
    assert graph_ops(model) == {("", "If"), ("", "Relu"), ("", "Tanh")}
    assert unsupported_by_tensorrt(model) == []

    bad = if_model("Relu", "FooBar")
    assert ("", "FooBar") in graph_ops(bad)
    (problem,) = unsupported_by_tensorrt(bad)
    assert problem.startswith("FooBar:")


def test_loop_body_inside_function_is_found() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("BitwiseNot", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.INT32, ANY_SHAPE),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.INT32, ANY_SHAPE),
        ],
    )
    fn = helper.make_function(
        "acme",
        "Looper",
        ["n", "c", "v"],
        ["out"],
        [helper.make_node("Loop", ["n", "c", "v"], ["out"], body=body)],
        [helper.make_opsetid("", OPSET)],
    )
    model = make_model(
        [helper.make_node("Looper", ["n", "c", "x"], ["y"], domain="acme")], [fn], ("acme",), inputs=("n", "c", "x")
    )
    assert {("", "Loop"), ("", "BitwiseNot"), ("", "Identity")} <= graph_ops(model)
    (problem,) = unsupported_by_tensorrt(model)
    assert problem.startswith("acme::Looper:")
    assert "BitwiseNot" in problem
