"""Streaming causal convs as plugin nodes that carry their own fallback body.

TensorRT (>= 10.7) replaces a node whose op type and ``plugin_namespace`` attribute match a
registered plugin with that plugin (our fused Triton kernel). Every other runtime sees an ONNX
local function of the same domain and name and runs its body: concatenate the history in front
of the chunk, Conv, slice off the new history. Node and function share one signature:

    inputs  x (B, C, T, H, W), history (B, C, P, H, W), weight (kt, kh, kw, C/group, C_out),
            bias (C_out,) (always present)
    outputs y (B, C_out, T, H, W), new_history (B, C, P, H, W)
    attributes pads (Conv layout [0, ph, pw, 0, ph, pw]), group, padding_mode ("zeros" or
               "replicate"; absent: "zeros"), plugin_namespace, plugin_version

The weight is packed, output channels innermost (``WEIGHT_PERM`` of the Conv weight, folded into
the initializer at export), so the TensorRT plugin's ahead-of-time kernel reads each tap's weight
tile coalesced without repacking per call; the function body transposes it back for Conv (a
transpose of a constant, which ONNX Runtime and TensorRT fold). Nodes of this layout are domain
version 2 (version 1 carried the Conv layout).

Dense convs (group 1) are ``StreamingCausalConv3d``; depthwise ones (group = channels) are
``StreamingDepthwiseConv3d``, so a runtime can pick a kernel from the op type alone.
``plugin_nodes(model, kinds)`` picks which convs become nodes (``--plugins``): ``all``, only
``depthwise`` ones (dense ones stay plain Concat/Conv/Slice), or none.

A graph's function body of an op type pads as its nodes do: zero padding in the Conv, or an
edge Pad (replicate) in front of a Conv without padding. One body serves every node of its op
type, so one graph holds nodes of one padding mode per op type: where a model mixes both for one
op type, its replicate convs stay plain ops (``plugin_plan`` says so, and the manifest records
it, with every other conv that could not become a node).
"""

from __future__ import annotations

from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import onnx
import torch
from onnx import AttributeProto, helper
from torch import Tensor, nn

from ..models.blocks import (
    CausalConv3d,
    check_padding_mode,
    fused_steps,
    other_temporal_convs,
    streaming_conv3d,
    streaming_convs,
)

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
    def forward(ctx, x, history, weight, bias, padding, groups, padding_mode):  # type: ignore[override]
        return streaming_conv3d(x, history, weight, bias, padding, groups, padding_mode)

    @staticmethod
    def symbolic(g, x, history, weight, bias, padding, groups, padding_mode):  # type: ignore[no-untyped-def]
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
            padding_mode_s=padding_mode,
            plugin_namespace_s=PLUGIN_NAMESPACE,
            plugin_version_s=PLUGIN_VERSION,
        )
        # declared types let the exporter's shape inference carry on past our node (and stay quiet)
        y.setType(x.type().with_sizes([None] * 5))
        new_history.setType(history.type())
        return y, new_history


def plugin_step(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: tuple[int, int],
    groups: int,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return _PluginNode.apply(x, history, weight, bias, tuple(padding), groups, check_padding_mode(padding_mode))


def depthwise_plugin_step(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: tuple[int, int],
    groups: int,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    """A plugin node for a depthwise conv; a dense one stays the plain ops."""
    if groups == 1:
        return streaming_conv3d(x, history, weight, bias, padding, groups, padding_mode)
    return plugin_step(x, history, weight, bias, padding, groups, padding_mode)


def plugin_op_type(conv: nn.Conv3d) -> str:
    """The plugin op type of a streaming causal conv: dense or depthwise."""
    return DENSE if conv.groups == 1 else DEPTHWISE


@dataclass
class PluginPlan:
    """Which temporal convs of a model become plugin nodes (``nodes``) and how many stay plain ops
    (``plain``), with a reason for every conv that ``kinds`` asked for and did not get
    (``fallback``; empty when every one became a node)."""

    kinds: str
    nodes: list[CausalConv3d] = field(default_factory=list)
    plain: int = 0
    fallback: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The manifest's ``plugin_convs``: counts, and the fallback reasons joined (or None)."""
        return {"nodes": len(self.nodes), "plain": self.plain, "fallback": "; ".join(self.fallback) or None}


def _asked(conv: nn.Conv3d, kinds: str) -> bool:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    return kinds == "all" or (kinds == "depthwise" and depthwise)


def plugin_plan(model: nn.Module, kinds: str = "all") -> PluginPlan:
    """The plugin nodes an export of ``model`` with ``--plugins kinds`` writes, and what stays plain.

    Every streaming causal conv (``blocks.CausalConv3d`` with history) of ``kinds`` becomes a node,
    except replicate-padded ones of an op type that also has zero-padded ones (one function body
    per op type and graph). Other temporal convs (a ``Conv3d`` with more than one frame in its
    kernel that is not a ``CausalConv3d``: a family's own streaming conv) always stay plain ops;
    where ``kinds`` would have taken them, that is a fallback too.
    """
    if kinds not in (*PLUGIN_KINDS, "none"):
        raise ValueError(f"plugin node kinds must be one of {', '.join(PLUGIN_KINDS)} or none, got {kinds!r}")
    plan = PluginPlan(kinds)
    model = decoding_part(model)
    convs = streaming_convs(model)
    asked = [c for c in convs if kinds != "none" and _asked(c, kinds)]
    plan.plain = len(convs) - len(asked)
    modes: dict[str, set[str]] = {}
    for conv in asked:
        modes.setdefault(plugin_op_type(conv), set()).add(conv.padding_mode)
    mixed = Counter()
    for conv in asked:
        if conv.padding_mode == "replicate" and len(modes[plugin_op_type(conv)]) > 1:
            mixed[plugin_op_type(conv)] += 1
        else:
            plan.nodes.append(conv)
    for op, n in sorted(mixed.items()):
        plan.plain += n
        plan.fallback.append(
            f"{n} replicate-padded {op} convs stay plain ops (the graph has zero-padded ones of that op type)"
        )
    others = other_temporal_convs(model)
    plan.plain += len(others)
    missed = Counter(type(m).__name__ for m in others if kinds != "none" and _asked(m, kinds))
    for name, n in sorted(missed.items()):
        plan.fallback.append(f"{n} temporal convs of class {name} are not streaming causal convs: plain ops")
    return plan


def decoding_part(model: nn.Module) -> nn.Module:
    """What an export traces of ``model``: its decoder (a teacher's encoder is never exported)."""
    decoder = getattr(model, "decoder", None)
    return decoder if isinstance(decoder, nn.Module) else model


def plugin_nodes(model: nn.Module, kinds: str = "all", plan: PluginPlan | None = None) -> AbstractContextManager[None]:
    """While exporting, the streaming causal convs of ``model`` of ``kinds`` (``all`` or
    ``depthwise``) become one plugin node each (as ``plugin_plan`` decides, or ``plan``); the
    others export as plain ops."""
    if kinds not in PLUGIN_KINDS:
        raise ValueError(f"plugin node kinds must be one of {', '.join(PLUGIN_KINDS)}, got {kinds!r}")
    plan = plan or plugin_plan(model, kinds)
    return fused_steps(model, plugin_step, convs=plan.nodes)


def node_padding_mode(node: onnx.NodeProto) -> str:
    """A plugin node's ``padding_mode`` (``zeros`` where the attribute is absent: older graphs)."""
    for a in node.attribute:
        if a.name == "padding_mode":
            return a.s.decode()
    return "zeros"


def function_body(op_type: str, opset: int, padding_mode: str = "zeros") -> onnx.FunctionProto:
    """The standard-op body of a plugin node: Concat, Conv (of the unpacked weight), and a Slice of
    the last P frames. With ``padding_mode`` replicate, an edge Pad of the spatial axes (by the
    node's ``pads``) comes before a Conv without padding."""
    check_padding_mode(padding_mode)
    conv_input = "joined" if padding_mode == "zeros" else "padded"
    conv = helper.make_node("Conv", [conv_input, "conv_weight", "bias"], ["y"])
    conv.attribute.append(helper.make_attribute_ref("group", AttributeProto.INT))
    pad: list[onnx.NodeProto] = []
    if padding_mode == "zeros":
        conv.attribute.append(helper.make_attribute_ref("pads", AttributeProto.INTS))
    else:  # Pad takes the Conv layout [0, ph, pw, 0, ph, pw] over axes T, H, W
        pads = helper.make_node("Constant", [], ["pad_amounts"])
        pads.attribute.append(AttributeProto(name="value_ints", ref_attr_name="pads", type=AttributeProto.INTS))
        pad = [
            pads,
            helper.make_node("Constant", [], ["pad_axes"], value_ints=[2, 3, 4]),
            helper.make_node("Pad", ["joined", "pad_amounts", "", "pad_axes"], ["padded"], mode="edge"),
        ]
    nodes = [
        helper.make_node("Transpose", ["weight"], ["conv_weight"], perm=list(CONV_WEIGHT_PERM)),
        helper.make_node("Concat", ["history", "x"], ["joined"], axis=2),
        *pad,
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
        attributes=["pads", "group", "padding_mode", "plugin_namespace", "plugin_version"],
        doc_string=(
            f"Fallback body of the {PLUGIN_NAMESPACE}::{op_type} TensorRT plugin (version {PLUGIN_VERSION}), "
            f"for nodes with padding_mode {padding_mode}."
        ),
    )


def attach_function_bodies(model: onnx.ModelProto, opset: int) -> None:
    """Give every plugin op used in ``model`` its local function (padding as its nodes do: one
    mode per op type, else ValueError) and declare our domain at ``DOMAIN_VERSION`` (the tracer
    declares version 1), which says the weights are packed."""
    modes: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            modes.setdefault(node.op_type, set()).add(node_padding_mode(node))
    used = set(modes)
    have = {(f.domain, f.name) for f in model.functions}
    for op in sorted(used):
        if len(modes[op]) > 1:
            raise ValueError(f"{op} nodes with padding modes {sorted(modes[op])} cannot share one function body")
        if (DOMAIN, op) not in have:
            model.functions.append(function_body(op, opset, *modes[op]))
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
