"""Streaming causal convs as plugin nodes that carry their own fallback body.

TensorRT (>= 10.7) replaces a node whose op type and ``plugin_namespace`` attribute match a
registered plugin with that plugin (our fused Triton kernel). Every other runtime sees an ONNX
local function of the same domain and name and runs its body: concatenate the history in front
of the chunk, Conv, slice off the new history. Node and function share one signature:

    inputs  x (B, C, T, H, W), history (B, C, P, H, W), weight (kt, kh, kw, C/group, C_out),
            bias (C_out,) (always present)
    outputs y (B, C_out, T, H, W), new_history (B, C, P, H, W)
    attributes pads (Conv layout [0, ph, pw, 0, ph, pw]), group, plugin_namespace, plugin_version

The weight is packed, output channels innermost (``WEIGHT_PERM`` of the Conv weight, folded into
the initializer at export), so the TensorRT plugin's ahead-of-time kernel reads each tap's weight
tile coalesced without repacking per call; the function body transposes it back for Conv (a
transpose of a constant, which ONNX Runtime and TensorRT fold). Nodes of this layout are domain
version 2 (version 1 carried the Conv layout).

Dense convs (group 1) are ``StreamingCausalConv3d``; depthwise ones (group = channels) are
``StreamingDepthwiseConv3d``, so a runtime can pick a kernel from the op type alone.
``plugin_nodes(model, kinds)`` picks which convs become nodes (``--plugins``): ``all``, only
``depthwise`` ones (dense ones stay plain Concat/Conv/Slice), or none.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import onnx
import torch
from onnx import AttributeProto, helper
from torch import Tensor, nn

from ..models.blocks import fused_steps, streaming_conv3d

DOMAIN = "flashvaed"
DOMAIN_VERSION = 2  # 2: packed weights (WEIGHT_PERM); 1: Conv-layout weights
PLUGIN_NAMESPACE = "flashvaed"
PLUGIN_VERSION = "1"
DENSE = "StreamingCausalConv3d"
DEPTHWISE = "StreamingDepthwiseConv3d"
PLUGIN_OPS = ((DOMAIN, DENSE), (DOMAIN, DEPTHWISE))
INT64_MAX = 2**63 - 1
WEIGHT_PERM = (2, 3, 4, 1, 0)  # Conv weight (C_out, C/group, kt, kh, kw) -> plugin weight (kt, kh, kw, C/group, C_out)
CONV_WEIGHT_PERM = (4, 3, 0, 1, 2)  # and back
PLUGIN_KINDS = ("all", "depthwise")  # --plugins values that write plugin nodes (see export.contract)


class _PluginNode(torch.autograd.Function):
    """Runs the reference ops in torch; the ONNX exporter writes one plugin node instead."""

    @staticmethod
    def forward(ctx, x, history, weight, bias, padding, groups):  # type: ignore[override]
        return streaming_conv3d(x, history, weight, bias, padding, groups)

    @staticmethod
    def symbolic(g, x, history, weight, bias, padding, groups):  # type: ignore[no-untyped-def]
        op = DENSE if groups == 1 else DEPTHWISE
        packed = g.op("Transpose", weight, perm_i=list(WEIGHT_PERM))  # constant-folded into the initializer
        y, new_history = g.op(
            f"{DOMAIN}::{op}",
            x,
            history,
            packed,
            bias,
            outputs=2,
            pads_i=[0, *padding, 0, *padding],
            group_i=groups,
            plugin_namespace_s=PLUGIN_NAMESPACE,
            plugin_version_s=PLUGIN_VERSION,
        )
        # declared types let the exporter's shape inference carry on past our node (and stay quiet)
        y.setType(x.type().with_sizes([None] * 5))
        new_history.setType(history.type())
        return y, new_history


def plugin_step(
    x: Tensor, history: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], groups: int
) -> tuple[Tensor, Tensor]:
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return _PluginNode.apply(x, history, weight, bias, tuple(padding), groups)


def depthwise_plugin_step(
    x: Tensor, history: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int], groups: int
) -> tuple[Tensor, Tensor]:
    """A plugin node for a depthwise conv; a dense one stays the plain ops."""
    if groups == 1:
        return streaming_conv3d(x, history, weight, bias, padding, groups)
    return plugin_step(x, history, weight, bias, padding, groups)


def plugin_nodes(model: nn.Module, kinds: str = "all") -> AbstractContextManager[None]:
    """While exporting, the streaming causal convs of ``model`` of ``kinds`` (``all`` or
    ``depthwise``) become one plugin node each; the others export as plain ops."""
    if kinds not in PLUGIN_KINDS:
        raise ValueError(f"plugin node kinds must be one of {', '.join(PLUGIN_KINDS)}, got {kinds!r}")
    return fused_steps(model, plugin_step if kinds == "all" else depthwise_plugin_step)


def function_body(op_type: str, opset: int) -> onnx.FunctionProto:
    """The standard-op body of a plugin node: Concat, Conv (of the unpacked weight), and a Slice of
    the last P frames."""
    conv = helper.make_node("Conv", ["joined", "conv_weight", "bias"], ["y"])
    conv.attribute.extend(
        [
            helper.make_attribute_ref("pads", AttributeProto.INTS),
            helper.make_attribute_ref("group", AttributeProto.INT),
        ]
    )
    nodes = [
        helper.make_node("Transpose", ["weight"], ["conv_weight"], perm=list(CONV_WEIGHT_PERM)),
        helper.make_node("Concat", ["history", "x"], ["joined"], axis=2),
        conv,
        helper.make_node("Shape", ["history"], ["history_frames"], start=2, end=3),
        helper.make_node("Neg", ["history_frames"], ["starts"]),
        helper.make_node("Constant", [], ["ends"], value_ints=[INT64_MAX]),
        helper.make_node("Constant", [], ["axes"], value_ints=[2]),
        helper.make_node("Slice", ["joined", "starts", "ends", "axes"], ["new_history"]),
    ]
    return helper.make_function(
        DOMAIN,
        op_type,
        inputs=["x", "history", "weight", "bias"],
        outputs=["y", "new_history"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["pads", "group", "plugin_namespace", "plugin_version"],
        doc_string=f"Fallback body of the {PLUGIN_NAMESPACE}::{op_type} TensorRT plugin (version {PLUGIN_VERSION}).",
    )


def attach_function_bodies(model: onnx.ModelProto, opset: int) -> None:
    """Give every plugin op used in ``model`` its local function and declare our domain at
    ``DOMAIN_VERSION`` (the tracer declares version 1), which says the weights are packed."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {(f.domain, f.name) for f in model.functions}
    for op_type in sorted(used):
        if (DOMAIN, op_type) not in have:
            model.functions.append(function_body(op_type, opset))
    if not used:
        return
    for entry in model.opset_import:
        if entry.domain == DOMAIN:
            entry.version = DOMAIN_VERSION
            return
    model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))


def plugin_domain_version(model: onnx.ModelProto) -> int | None:
    """The version of our domain ``model`` declares (None: no plugin nodes). Version 1 graphs
    carry Conv-layout weights, which today's TensorRT plugins would misread."""
    return next((o.version for o in model.opset_import if o.domain == DOMAIN), None)
