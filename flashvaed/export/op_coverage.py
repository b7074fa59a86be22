"""Which ops of an exported ONNX graph TensorRT's ONNX parser cannot import.

An exported decoder must parse in TensorRT (>= 10.7) without surprises at engine-build time. This
module checks op coverage statically, without TensorRT installed: every default-domain op must be on
the parser's support list (``tensorrt_onnx_ops.txt``, taken from onnx/onnx-tensorrt's
``docs/operators.md``), and every custom-domain op must either be a plugin we ship or have a model
local function whose body (recursively) uses only supported ops, since that is what TensorRT inlines
when no plugin matches. Passing the check does not guarantee a parse: the list carries per-op
restrictions (attribute values, constant inputs) that are noted in the list's header, not checked here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from functools import cache
from importlib import resources

import onnx

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
OPS_FILE = "tensorrt_onnx_ops.txt"
DEFAULT_PLUGIN_OPS: tuple[tuple[str, str], ...] = (
    ("flashvaed", "StreamingCausalConv3d"),
    ("flashvaed", "StreamingDepthwiseConv3d"),
)

FunctionKey = tuple[str, str, str]  # (domain, name, overload), as a node refers to a local function


@cache
def tensorrt_supported_ops() -> frozenset[str]:
    """Default-domain op types TensorRT's ONNX parser supports (the packaged ``tensorrt_onnx_ops.txt``)."""
    text = resources.files("flashvaed.export").joinpath(OPS_FILE).read_text(encoding="utf-8")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(line for line in lines if line)


def _domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Every node in ``nodes`` and in their subgraphs (If branches, Loop and Scan bodies), depth first."""
    for node in nodes:
        yield node
        for graph in _subgraphs(node):
            yield from _walk(graph.node)


def _key(node: onnx.NodeProto) -> FunctionKey:
    return _domain(node.domain), node.op_type, node.overload


def _functions(model: onnx.ModelProto) -> dict[FunctionKey, onnx.FunctionProto]:
    return {(_domain(f.domain), f.name, f.overload): f for f in model.functions}


def graph_ops(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """``(domain, op_type)`` of every node: main graph, nested subgraphs and the bodies of ``model.functions``.

    The default domain is spelled ``""`` whether the model says ``""`` or ``"ai.onnx"``.
    """
    nodes = list(_walk(model.graph.node))
    for function in model.functions:
        nodes.extend(_walk(function.node))
    return {(_domain(n.domain), n.op_type) for n in nodes}


def _name(domain: str, op_type: str) -> str:
    return op_type if not domain else f"{domain}::{op_type}"


def unsupported_by_tensorrt(
    model: onnx.ModelProto,
    plugin_ops: Collection[tuple[str, str]] = DEFAULT_PLUGIN_OPS,
) -> list[str]:
    """Ops of ``model`` that TensorRT's ONNX parser cannot take, as sorted readable strings; empty if none.

    Follows what the parser sees: the main graph with its subgraphs, and the body of every local function a
    node calls that is not one of ``plugin_ops`` (TensorRT >= 10.7 prefers a registered plugin over a local
    function of the same name, so a plugin node's body is not looked at). Reported are default-domain ops not
    on :func:`tensorrt_supported_ops` and custom-domain ops that are neither a plugin nor a local function
    whose body, recursively, uses only supported ops.
    """
    supported = tensorrt_supported_ops()
    plugins = {(_domain(d), op) for d, op in plugin_ops}
    functions = _functions(model)
    # Per function: the unsupported ops reachable from its body; None while it is being resolved (a cycle).
    resolved: dict[FunctionKey, set[str] | None] = {}

    def check(nodes: Iterable[onnx.NodeProto], problems: dict[str, str]) -> None:
        for node in _walk(nodes):
            domain, op_type, _ = key = _key(node)
            name = _name(domain, op_type)
            if (domain, op_type) in plugins or (not domain and op_type in supported):
                continue
            if key in functions:
                bad = resolve(key)
                if bad:
                    problems.setdefault(
                        name, f"{name}: local function body uses unsupported ops: {', '.join(sorted(bad))}"
                    )
            elif not domain:
                problems.setdefault(name, f"{name}: not in TensorRT's ONNX operator support list")
            else:
                problems.setdefault(name, f"{name}: custom op with no known plugin and no local function")

    def resolve(key: FunctionKey) -> set[str]:
        if key not in resolved:
            resolved[key] = None
            inner: dict[str, str] = {}
            check(functions[key].node, inner)
            resolved[key] = set(inner)
        bad = resolved[key]
        return {f"{_name(key[0], key[1])} (recursive local function)"} if bad is None else bad

    problems: dict[str, str] = {}
    check(model.graph.node, problems)
    return sorted(problems.values())
