"""Graph rewrites for ONNX Runtime's CPU kernels: the same function, written as ops that run fast.

ONNX Runtime's CPU provider has no fast kernel for three patterns our decoders are full of:

* **3D convs that mix few channels**: depthwise temporal convs (``kt x kh x kw``, one channel
  each) and dense ones with a handful of outputs (the RGB head). ORT lowers a 3D conv to
  im2col + GEMM, and for these the im2col copy costs more than the arithmetic. On a static
  ``(B, C, T + kt - 1, H, W)`` input the same conv is a *2D* conv over ``(B, C * (T + kt - 1), H, W)``
  (a free reshape) whose kernel holds the ``kt`` temporal taps on a band, ``T`` outputs per
  channel: more multiply-adds (``(T + kt - 1) / kt`` times) in ORT's blocked 2D kernels, 1.1-2x
  faster where the band is short (``banded_time_convs``).
* **Sums of squares over channels** (RMS norms: ``ReduceSum(x * x)`` over the channel axis): a
  strided reduction, 2-3 GB/s here. A 1x1 conv with a weight of ones sums the same terms in
  ORT's GEMM, about twice as fast (``channel_sums_as_convs``).
* **Wide 2x upsampling transposed convs** (stride 2, 4x4 kernel, padding 1: how exports write a
  nearest 2x upsampling and its 3x3 conv): ORT runs a GEMM into a column buffer 16 times the
  output's channels, then scatters it (col2im). Each of the four output phases is a 2x2 conv of
  the input; four convs, a concat and a ``DepthToSpace`` are the same sums without the buffer
  (``phase_convs``): 1.9x at 1024 -> 1024 channels (Wan2.2's up1), 1.1x at 384; below 256 output
  channels the four small GEMMs lose, and those stay.

Banded convs need static shapes, which exported graphs hide behind shape arithmetic and
plugin-node function bodies: the graph is first passed through ORT's basic level (functions
inlined, shape arithmetic folded to constants), then ONNX shape inference reads every size.
Graphs with dynamic sizes keep their 3D convs; their channel sums and transposed convs are
rewritten all the same (only channel counts must be known). Results agree with the original graph to float
rounding (the sums are the same terms in another order). CUDA sessions load graphs unchanged.

Measured at 256x256, chunk 2, 2 threads: flash-wan2.1's steady graph (17 banded convs, 30 norm
sums) 1.12x faster per step in a stream, flash-wan2.2's 1.48x. ``session_options``
``{"rewrites": false}`` turns it off.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# the longest band: (T + kt - 1) / kt, the multiply-adds a banded conv spends per useful one
MAX_BAND_RATIO = 10 / 3
# a dense 3D conv is banded only with this few outputs (im2col-bound); wider ones are GEMM-bound
MAX_DENSE_OUTPUTS = 8
# a transposed upsampling conv becomes phase convs from this many outputs on (fewer: 0.7-1.0x)
MIN_PHASE_OUTPUTS = 256
# graphs this large load as they are: the rewritten model is one protobuf (2 GiB at most)
MAX_GRAPH_BYTES = 1536 * 2**20


def graph_bytes(path: Path) -> int:
    """The graph file's size plus its external data files' (names already checked to stay beside it)."""
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    seen = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                total += (path.parent / entry.value).stat().st_size
    return total


def rewrite_for_cpu(path: Path, threads: int = 1) -> bytes | None:
    """The graph at ``path`` with its slow CPU patterns rewritten, serialized; None where nothing
    matched, the graph is too large to hold in one protobuf, or the basic-level pass could not run
    (a graph ORT refuses, a full temporary folder): the caller's plain load then says what, if
    anything, is wrong with the graph. Errors of the rewrites themselves are raised."""
    try:
        if graph_bytes(path) > MAX_GRAPH_BYTES:
            return None
        with tempfile.TemporaryDirectory(prefix="flashvaed-ort-") as tmp:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            model = onnx.load(options.optimized_model_filepath)
    except Exception:  # ORT's exception types are not importable by a stable name; OSError, DecodeError
        return None
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    changed = banded_time_convs(model) + channel_sums_as_convs(model) + phase_convs(model)
    return model.SerializeToString() if changed else None


# ---------------------------------------------------------------------------------------------
# what the rewrites read: static shapes, float32 types, constant tensors, attributes
# ---------------------------------------------------------------------------------------------
def known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Shapes of the float32 tensors of known rank, None for each size not known."""
    shapes = {}
    for value in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        t = value.type.tensor_type
        if t.elem_type == TensorProto.FLOAT and t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shapes of the float32 tensors whose every size is known."""
    return {k: v for k, v in known_shapes(model).items() if None not in v}  # type: ignore[misc]


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


Replacement = tuple[list[onnx.NodeProto], list[onnx.TensorProto]]


def rewrite_nodes(model: onnx.ModelProto, replace: Callable[[onnx.NodeProto], Replacement | None]) -> int:
    """Put the nodes (and new constants) ``replace`` returns for a node in its place, in order;
    ``replace`` returns None for nodes that stay. Returns how many were replaced."""
    nodes, tensors, count = [], [], 0
    for node in model.graph.node:
        replacement = replace(node)
        if replacement is None:
            nodes.append(node)
            continue
        nodes += replacement[0]
        tensors += replacement[1]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(tensors)
    return count


# ---------------------------------------------------------------------------------------------
# 3D convs over a short time window -> 2D convs with banded kernels
# ---------------------------------------------------------------------------------------------
def band_kernel(weight: np.ndarray, groups: int, frames: int) -> np.ndarray:
    """(C_out, C_in/g, kt, kh, kw) -> the 2D kernel (C_out * T, C_in/g * (T + kt - 1), kh, kw) whose
    output channel ``o * T + t`` reads input frames ``t .. t + kt - 1`` of its group's channels."""
    c_out, c_group, kt, kh, kw = weight.shape
    window = frames + kt - 1
    per_group = c_out // groups
    taps = weight.reshape(groups, per_group, c_group, kt, kh, kw)
    band = np.zeros((groups, per_group, frames, c_group, window, kh, kw), weight.dtype)
    for t in range(frames):
        band[:, :, t, :, t : t + kt] = taps
    return band.reshape(c_out * frames, c_group * window, kh, kw)


def bandable(node: onnx.NodeProto, shapes: dict, consts: dict) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    shape, weight = shapes.get(node.input[0]), consts.get(node.input[1])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if shape is None or len(shape) != 5 or weight is None or weight.ndim != 5 or weight.dtype != np.float32:
        return False
    if bias is not None and bias not in consts:
        return False
    a = attributes(node)
    pads = list(a.get("pads", [0] * 6))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[0] or pads[3]:
        return False
    if any(v != 1 for v in [*a.get("strides", []), *a.get("dilations", [])]):
        return False
    groups, (c_in, window), (c_out, kt) = a.get("group", 1), shape[1:3], (weight.shape[0], weight.shape[2])
    depthwise = groups == c_in == c_out
    if kt < 2 or window < kt or window > MAX_BAND_RATIO * kt:
        return False
    return depthwise or (groups == 1 and c_out <= MAX_DENSE_OUTPUTS)


def banded_time_convs(model: onnx.ModelProto) -> int:
    """Rewrite each bandable 3D conv as Reshape -> banded 2D Conv -> Reshape; returns how many."""
    shapes, consts = static_shapes(model), constants(model)

    def replace(node: onnx.NodeProto) -> Replacement | None:
        if not bandable(node, shapes, consts):
            return None
        b, c_in, window, h, w = shapes[node.input[0]]
        weight = consts[node.input[1]]
        c_out, kt = weight.shape[0], weight.shape[2]
        frames = window - kt + 1
        a = attributes(node)
        pads = list(a.get("pads", [0] * 6))
        name = f"{node.name or node.output[0]}/banded"
        tensors = [
            numpy_helper.from_array(np.array([b, c_in * window, h, w], np.int64), f"{name}/input_shape"),
            numpy_helper.from_array(band_kernel(weight, a.get("group", 1), frames), f"{name}/weight"),
            numpy_helper.from_array(np.array([b, c_out, frames, h, w], np.int64), f"{name}/output_shape"),
        ]
        conv_inputs = [f"{name}/input", f"{name}/weight"]
        pads_2d = [pads[1], pads[2], pads[4], pads[5]]
        if len(node.input) > 2 and node.input[2]:
            tensors.append(numpy_helper.from_array(np.repeat(consts[node.input[2]], frames), f"{name}/bias"))
            conv_inputs.append(f"{name}/bias")
        nodes = [
            helper.make_node("Reshape", [node.input[0], f"{name}/input_shape"], [f"{name}/input"]),
            helper.make_node("Conv", conv_inputs, [f"{name}/output"], name=name, group=a.get("group", 1), pads=pads_2d),
            helper.make_node("Reshape", [f"{name}/output", f"{name}/output_shape"], [node.output[0]]),
        ]
        return nodes, tensors

    return rewrite_nodes(model, replace)


# ---------------------------------------------------------------------------------------------
# ReduceSum(x * x) over one axis -> a 1x1 conv with a weight of ones
# ---------------------------------------------------------------------------------------------
def summed_axis(node: onnx.NodeProto, producers: dict, shapes: dict, consts: dict) -> int | None:
    """The axis ``node`` sums ``x * x`` over, if it is ``ReduceSum(Mul(x, x), axes=[a], keepdims=1)``
    with that axis's size known; else None."""
    if node.op_type != "ReduceSum" or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    squares, shape = producers.get(node.input[0]), shapes.get(node.input[0])
    axes = consts.get(node.input[1]) if len(node.input) > 1 else attributes(node).get("axes")  # opset < 13
    if squares is None or squares.op_type != "Mul" or squares.input[0] != squares.input[1] or not shape:
        return None
    if axes is None or np.size(axes) != 1 or attributes(node).get("keepdims", 1) != 1:
        return None
    axis = int(np.asarray(axes).reshape(-1)[0]) % len(shape)
    return axis if shape[axis] is not None else None


def channel_sums_as_convs(model: onnx.ModelProto) -> int:
    """Rewrite ``ReduceSum(Mul(x, x), axes=[a], keepdims=1)`` over an axis of known size as a conv
    summing it (axis 1 of a 3-5D tensor directly; another axis as the channels of (P, C, Q) rows and
    back); returns how many. Only the reduced axis needs a static size, so dynamic exports gain too."""
    shapes, consts = known_shapes(model), constants(model)
    producers = {out: node for node in model.graph.node for out in node.output}

    def replace(node: onnx.NodeProto) -> Replacement | None:
        axis = summed_axis(node, producers, shapes, consts)
        if axis is None:
            return None
        source = node.input[0]
        shape = shapes[source]
        channels, name = shape[axis], f"{node.name or node.output[0]}/as_conv"
        if axis == 1 and 3 <= len(shape) <= 5:
            ones = numpy_helper.from_array(np.ones((1, channels, *[1] * (len(shape) - 2)), np.float32), name)
            return [helper.make_node("Conv", [source, name], list(node.output), name=name)], [ones]
        # (P, C, Q) rows: Flatten at the axis, then split its channels off; a 1D conv sums them
        tensors = [
            numpy_helper.from_array(np.ones((1, channels, 1), np.float32), f"{name}/ones"),
            numpy_helper.from_array(np.array([0, channels, -1], np.int64), f"{name}/rows"),
        ]
        nodes = [
            helper.make_node("Flatten", [source], [f"{name}/flat"], axis=axis),
            helper.make_node("Reshape", [f"{name}/flat", f"{name}/rows"], [f"{name}/input"]),
            helper.make_node("Conv", [f"{name}/input", f"{name}/ones"], [f"{name}/output"], name=name),
        ]
        if None not in shape:  # back to the kept shape: a constant, or the input's shape with the axis at 1
            kept = np.array([*shape[:axis], 1, *shape[axis + 1 :]], np.int64)
            tensors.append(numpy_helper.from_array(kept, f"{name}/kept"))
        else:
            tensors += [
                numpy_helper.from_array(np.array([1], np.int64), f"{name}/one"),
                numpy_helper.from_array(np.array([axis], np.int64), f"{name}/axis"),
            ]
            nodes += [
                helper.make_node("Shape", [source], [f"{name}/shape"]),
                helper.make_node(
                    "ScatterElements", [f"{name}/shape", f"{name}/axis", f"{name}/one"], [f"{name}/kept"], axis=0
                ),
            ]
        nodes.append(helper.make_node("Reshape", [f"{name}/output", f"{name}/kept"], list(node.output)))
        return nodes, tensors

    return rewrite_nodes(model, replace)


# ---------------------------------------------------------------------------------------------
# ConvTranspose(stride 2, 4x4, padding 1) -> four 2x2 phase convs, Concat, DepthToSpace
# ---------------------------------------------------------------------------------------------
# output row 2m + a reads input rows m - 1, m (a = 0) or m, m + 1 (a = 1) through these kernel rows
PHASE_TAPS = {0: [3, 1], 1: [2, 0]}
PHASE_PADS = {0: (1, 0), 1: (0, 1)}  # (before, after): the conv's padding for those offsets


def phase_kernel(weight: np.ndarray, a: int, b: int) -> np.ndarray:
    """The (C_out, C_in, 2, 2) conv kernel of output phase (row a, column b) of a transposed
    conv's (C_in, C_out, 4, 4) kernel (stride 2, padding 1)."""
    return np.ascontiguousarray(weight[:, :, PHASE_TAPS[a]][:, :, :, PHASE_TAPS[b]].transpose(1, 0, 2, 3))


def phaseable(node: onnx.NodeProto, shapes: dict, consts: dict) -> bool:
    if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    weight, shape = consts.get(node.input[1]), shapes.get(node.input[0])
    if weight is None or weight.ndim != 4 or weight.shape[2:] != (4, 4) or weight.dtype != np.float32:
        return False
    if shape is None or len(shape) != 4 or (len(node.input) > 2 and node.input[2] and node.input[2] not in consts):
        return False
    a = attributes(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in a or a.get("group", 1) != 1:
        return False
    if list(a.get("output_padding", [0, 0])) != [0, 0] or list(a.get("dilations", [1, 1])) != [1, 1]:
        return False
    if list(a.get("strides", [1, 1])) != [2, 2] or list(a.get("pads", [0] * 4)) != [1, 1, 1, 1]:
        return False
    return weight.shape[1] >= MIN_PHASE_OUTPUTS


def phase_convs(model: onnx.ModelProto) -> int:
    """Rewrite each wide 2x upsampling ConvTranspose as its four phase convs; returns how many."""
    shapes, consts = known_shapes(model), constants(model)

    def replace(node: onnx.NodeProto) -> Replacement | None:
        if not phaseable(node, shapes, consts):
            return None
        weight = consts[node.input[1]]
        bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        name = f"{node.name or node.output[0]}/phases"
        nodes, tensors, phases = [], [], []
        for a in (0, 1):
            for b in (0, 1):  # DepthToSpace (DCR) reads channel (2a + b) * C_out + o as output (o, 2m + a, 2n + b)
                kernel = f"{name}/kernel{a}{b}"
                tensors.append(numpy_helper.from_array(phase_kernel(weight, a, b), kernel))
                pads = [PHASE_PADS[a][0], PHASE_PADS[b][0], PHASE_PADS[a][1], PHASE_PADS[b][1]]
                phases.append(f"{name}/{a}{b}")
                nodes.append(
                    helper.make_node("Conv", [node.input[0], kernel, *bias], [phases[-1]], name=phases[-1], pads=pads)
                )
        nodes += [
            helper.make_node("Concat", phases, [f"{name}/all"], axis=1),
            helper.make_node("DepthToSpace", [f"{name}/all"], list(node.output), blocksize=2, mode="DCR"),
        ]
        return nodes, tensors

    return rewrite_nodes(model, replace)
