"""Padding modes of the streaming convs, honoured by every path: torch, the Triton kernel, plugin
nodes (their ONNX function bodies under ONNX Runtime) and the TensorRT plugin's attributes.

``padding_mode`` is the spatial padding (zeros or the edge values replicated); ``history`` what
precedes a clip's first frame (zeros, or the first frame repeated). The oracle is diffusers'
CogVideoX causal conv: ``pad_mode="replicate"`` pads time (front) and space by replication,
``pad_mode="constant"`` repeats the first frame in front and pads space with zeros.
"""

from __future__ import annotations

import importlib.util
import json
from fractions import Fraction

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashvaed.export.contract import Contract
from flashvaed.export.plugin_nodes import (
    DENSE,
    DEPTHWISE,
    DOMAIN,
    attach_function_bodies,
    node_padding_mode,
    plugin_nodes,
    plugin_plan,
)
from flashvaed.models.blocks import (
    CausalConv3d,
    DepthwiseSeparableConv3d,
    FrameConv2d,
    fused_steps,
    streaming_conv3d,
    streaming_convs,
)

MODES = [("replicate", "replicate"), ("zeros", "replicate"), ("replicate", "zeros"), ("zeros", "zeros")]


def seeded_(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def clip(c: int = 3, t: int = 7, h: int = 5, w: int = 6, seed: int = 1) -> Tensor:
    return torch.randn(2, c, t, h, w, generator=torch.Generator().manual_seed(seed))


def reference(conv: CausalConv3d, x: Tensor) -> Tensor:
    """One-shot, by hand: the history in front (first frame repeated, or zeros), then the spatial padding."""
    p = conv.kernel_size[0] - 1
    front = (
        x[:, :, :1].expand(-1, -1, p, -1, -1) if conv.history_init == "replicate" else x.new_zeros(x[:, :, :p].shape)
    )
    joined = torch.cat([front, x], dim=2)
    ph, pw = conv.padding[1:]
    mode = "replicate" if conv.padding_mode == "replicate" else "constant"
    return F.conv3d(F.pad(joined, (pw, pw, ph, ph, 0, 0), mode=mode), conv.weight, conv.bias, groups=conv.groups)


def stream(block: nn.Module, x: Tensor, sizes: list[int], state: tuple) -> Tensor:
    ys, t = [], 0
    for i, n in enumerate(sizes):
        y, state = block(x[:, :, t : t + n], state, i == 0)
        ys.append(y)
        t += n
    return torch.cat(ys, dim=2)


# --- torch: the oracle, one-shot and streaming --------------------------------------------------


@pytest.mark.parametrize("pad_mode", ["replicate", "constant"])
def test_causal_conv_matches_diffusers_cogvideox(pad_mode):
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    oracle = seeded_(CogVideoXCausalConv3d(3, 4, 3, pad_mode=pad_mode))
    spatial = "replicate" if pad_mode == "replicate" else "zeros"
    ours = CausalConv3d(3, 4, 3, padding_mode=spatial, history="replicate").eval()
    ours.load_state_dict(oracle.conv.state_dict())
    x = clip()
    with torch.no_grad():
        want = oracle(x)[0]
        state = (torch.full((2, 3, 2, 5, 6), 7.0),)  # ignored on the first chunk
        got, _ = ours(x, state, first=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, reference(ours, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("padding_mode", "history"), MODES)
@pytest.mark.parametrize("sizes", [[1, 2, 4], [3, 1, 1, 2], [1, 1, 1, 1, 1, 1, 1]])
def test_streaming_equals_one_shot(padding_mode, history, sizes):
    x = clip()
    dense = seeded_(CausalConv3d(3, 4, 3, padding_mode=padding_mode, history=history))
    dwsep = seeded_(DepthwiseSeparableConv3d(3, 5, padding_mode=padding_mode, history=history))
    temporal = seeded_(CausalConv3d(3, 6, (3, 1, 1), padding_mode=padding_mode, history=history))
    zeros = (torch.zeros(2, 3, 2, 5, 6),)
    with torch.no_grad():
        for block in (dense, dwsep, temporal):
            one_shot, last = block(x, zeros, True)
            chunked = stream(block, x, sizes, zeros)
            torch.testing.assert_close(chunked, one_shot, rtol=0, atol=1e-5)
            torch.testing.assert_close(last[0], x[:, :, -2:], rtol=0, atol=0)  # the new history: the last frames
        torch.testing.assert_close(dense(x, zeros, True)[0], reference(dense, x), rtol=0, atol=1e-5)
        conv = dwsep.depthwise
        torch.testing.assert_close(dwsep(x, zeros, True)[0], dwsep.pointwise(reference(conv, x)), rtol=0, atol=1e-5)


def test_zero_history_uses_the_given_state_on_the_first_chunk():
    """Wan's rule stays: the state in front of the first chunk is whatever the caller gives (zeros)."""
    conv = seeded_(CausalConv3d(3, 4, 3))
    x, state = clip(), (torch.randn(2, 3, 2, 5, 6),)
    with torch.no_grad():
        got, _ = conv(x, state, True)
        want = F.conv3d(torch.cat([state[0], x], 2), conv.weight, conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_kernel_input_shows_the_replicated_history():
    conv = seeded_(CausalConv3d(3, 4, 3, history="replicate"))
    x, state = clip(), (torch.randn(2, 3, 2, 5, 6),)
    torch.testing.assert_close(conv.kernel_input((x, state, True))[:, :, :3], x[:, :, :1].expand(-1, -1, 3, -1, -1))
    torch.testing.assert_close(conv.kernel_input((x, state))[:, :, :2], state[0])


def test_frame_conv_replicates_per_frame():
    conv = seeded_(FrameConv2d(3, 4, padding_mode="replicate"))
    x = clip()
    with torch.no_grad():
        got, _ = conv(x)
        frames = x.transpose(1, 2).reshape(-1, 3, 5, 6)
        want = F.conv2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), conv.weight, conv.bias)
    torch.testing.assert_close(got, want.reshape(2, 7, 4, 5, 6).transpose(1, 2), rtol=0, atol=1e-6)


def test_unknown_modes_are_refused_by_name():
    for make in (
        lambda: CausalConv3d(3, 4, 3, padding_mode="reflect"),
        lambda: DepthwiseSeparableConv3d(3, 4, padding_mode="reflect"),
        lambda: FrameConv2d(3, 4, padding_mode="reflect"),
    ):
        with pytest.raises(ValueError, match="padding_mode 'reflect'"):
            make()
    with pytest.raises(ValueError, match="history 'circular'"):
        CausalConv3d(3, 4, 3, history="circular")
    x, h, w = clip(), torch.zeros(2, 3, 2, 5, 6), torch.zeros(4, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="padding_mode 'edge'"):
        streaming_conv3d(x, h, w, None, (1, 1), 1, "edge")


def test_fused_steps_receive_the_padding_mode():
    seen = []

    def step(x, history, weight, bias, padding, groups, padding_mode="zeros"):
        seen.append(padding_mode)
        return streaming_conv3d(x, history, weight, bias, padding, groups, padding_mode)

    model = nn.ModuleList([CausalConv3d(3, 3, 3, padding_mode="replicate"), CausalConv3d(3, 3, 3)])
    with fused_steps(model, step):
        for conv in model:
            conv(clip(), (torch.zeros(2, 3, 2, 5, 6),))
    assert seen == ["replicate", "zeros"]


# --- the Triton kernel (CPU interpreter) ----------------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@needs_triton
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel", "groups", "h", "w"),
    [(5, 7, (3, 3, 3), 1, 5, 7), (6, 6, (3, 3, 3), 6, 4, 9), (4, 6, (5, 3, 3), 1, 3, 5), (3, 5, (3, 1, 1), 1, 4, 4)],
    ids=["dense", "depthwise", "p4", "temporal"],
)
def test_triton_kernel_matches_torch(monkeypatch, padding_mode, c_in, c_out, kernel, groups, h, w):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is first jitted in this mode
    from flashvaed.engines import kernel as K

    g = torch.Generator().manual_seed(0)
    x, history = torch.randn(2, c_in, 3, h, w, generator=g), torch.randn(2, c_in, kernel[0] - 1, h, w, generator=g)
    weight = torch.randn(c_out, c_in // groups, *kernel, generator=g) * 0.2
    bias, padding = torch.randn(c_out, generator=g), (kernel[1] // 2, kernel[2] // 2)
    y, new_history = K.streaming_causal_conv3d(x, history, weight, bias, padding, groups, padding_mode)
    want, want_history = streaming_conv3d(x, history, weight, bias, padding, groups, padding_mode)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(new_history, want_history, rtol=0, atol=0)
    # the custom op takes the mode too (its CPU body is the torch reference)
    y_op, _ = torch.ops.flashvaed.streaming_causal_conv3d(x, history, weight, bias, list(padding), groups, padding_mode)
    torch.testing.assert_close(y_op, want, rtol=0, atol=0)


@needs_triton
def test_triton_kernel_streams_a_replicate_conv(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from flashvaed.engines import kernel as K

    conv = seeded_(CausalConv3d(3, 4, 3, padding_mode="replicate", history="replicate"))
    x, zeros = clip(t=4), (torch.zeros(2, 3, 2, 5, 6),)
    with torch.no_grad():
        want = conv(x, zeros, True)[0]
        with fused_steps(conv, K.streaming_causal_conv3d):
            got = stream(conv, x, [1, 3], zeros)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        K.streaming_causal_conv3d(x, zeros[0], conv.weight, conv.bias, (1, 1), 1, "reflect")


# --- plugin nodes under ONNX Runtime ------------------------------------------------------------


class Tiny(nn.Module):
    """Two streaming convs as an export traces them: a dense one and a depthwise-separable one."""

    def __init__(self, dense: tuple[str, str], depthwise: tuple[str, str], first: bool) -> None:
        super().__init__()
        self.conv = CausalConv3d(3, 4, 3, padding_mode=dense[0], history=dense[1])
        self.dw = DepthwiseSeparableConv3d(4, 3, padding_mode=depthwise[0], history=depthwise[1])
        self.first = first

    def forward(self, x: Tensor, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y, (n1,) = self.conv(x, (s1,), self.first)
        y, (n2,) = self.dw(y, (s2,), self.first)
        return y, n1, n2


def export_tiny(module: Tiny, path, kinds: str = "all") -> onnx.ModelProto:
    x, s1, s2 = clip(t=2), torch.zeros(2, 3, 2, 5, 6), torch.zeros(2, 4, 2, 5, 6)
    axes = {n: {0: "b", 2: "t", 3: "h", 4: "w"} for n in ("x", "s1", "s2", "y", "n1", "n2")}
    for n in ("s1", "s2", "n1", "n2"):
        del axes[n][2]
    with plugin_nodes(module, kinds), torch.no_grad():
        torch.onnx.export(
            module,
            (x, s1, s2),
            str(path),
            dynamo=False,
            opset_version=18,
            input_names=["x", "s1", "s2"],
            output_names=["y", "n1", "n2"],
            dynamic_axes=axes,
        )
    model = onnx.load(str(path))
    attach_function_bodies(model, 18)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


@pytest.mark.parametrize("first", [True, False], ids=["first", "steady"])
@pytest.mark.parametrize("modes", [("replicate", "replicate"), ("replicate", "zeros")], ids=["rr", "rz"])
def test_plugin_nodes_run_replicate_padding_in_onnxruntime(tmp_path, first, modes):
    ort = pytest.importorskip("onnxruntime")
    module = seeded_(Tiny(modes, modes, first))
    model = export_tiny(module, tmp_path / "tiny.onnx")
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert sorted(n.op_type for n in nodes) == [DENSE, DEPTHWISE]
    assert {node_padding_mode(n) for n in nodes} == {modes[0]}
    bodies = {f.name: [n.op_type for n in f.node] for f in model.functions}
    assert all(("Pad" in ops) == (modes[0] == "replicate") for ops in bodies.values()), bodies
    pads = [a.s for f in model.functions for n in f.node if n.op_type == "Pad" for a in n.attribute if a.name == "mode"]
    assert set(pads) <= {b"edge"}

    session = ort.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    x, s1 = torch.randn(1, 3, 3, 6, 7, generator=g), torch.randn(1, 3, 2, 6, 7, generator=g)
    s2 = torch.randn(1, 4, 2, 6, 7, generator=g)  # sizes the graph was not traced at
    with torch.no_grad():
        want = module(x, s1, s2)
    feed = {"x": x.numpy(), "s1": s1.numpy(), "s2": s2.numpy()}
    got = session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})  # a replicated history: no state
    assert len(session.get_inputs()) == (1 if first and modes[1] == "replicate" else 3)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)


def test_mixed_padding_modes_fall_back_and_say_so(tmp_path):
    """One function body per op type and graph: replicate convs of an op type that also has zero
    padded ones stay plain ops, and the plan (the manifest's plugin_convs) says so."""
    ort = pytest.importorskip("onnxruntime")
    module = seeded_(Tiny(("zeros", "zeros"), ("replicate", "replicate"), True))
    module.extra = CausalConv3d(3, 3, 3, padding_mode="replicate")  # a second dense conv, replicate
    plan = plugin_plan(module, "all")
    assert [type(c).__name__ for c in plan.nodes] == ["CausalConv3d", "CausalConv3d"]
    assert plan.to_dict()["nodes"] == 2 and plan.to_dict()["plain"] == 1
    assert "1 replicate-padded StreamingCausalConv3d convs stay plain ops" in plan.to_dict()["fallback"]
    assert plugin_plan(module, "depthwise").to_dict() == {"nodes": 1, "plain": 2, "fallback": None}
    assert plugin_plan(module, "none").to_dict() == {"nodes": 0, "plain": 3, "fallback": None}

    model = export_tiny(module, tmp_path / "mixed.onnx")  # extra is not called: two nodes, both modes
    assert {(n.op_type, node_padding_mode(n)) for n in model.graph.node if n.domain == DOMAIN} == {
        (DENSE, "zeros"),
        (DEPTHWISE, "replicate"),
    }
    session = ort.InferenceSession(str(tmp_path / "mixed.onnx"), providers=["CPUExecutionProvider"])
    x, s1, s2 = clip(t=2), torch.randn(2, 3, 2, 5, 6), torch.randn(2, 4, 2, 5, 6)
    with torch.no_grad():
        want = module(x, s1, s2)
    got = session.run(None, {"x": x.numpy(), "s1": s1.numpy()})  # s2 is not read: a replicated history
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=0, atol=1e-5)

    # a graph whose nodes of one op type disagree cannot get one body
    for node in model.graph.node:
        if node.op_type == DEPTHWISE:
            node.op_type = DENSE
    del model.functions[:]
    with pytest.raises(ValueError, match="padding modes"):
        attach_function_bodies(model, 18)


def test_other_temporal_convs_are_reported_as_plain():
    """A family's own temporal conv (not a CausalConv3d) never becomes a node: the plan says so."""

    class Own(nn.Conv3d):
        pass

    model = nn.ModuleList([CausalConv3d(3, 3, 3, padding_mode="replicate"), Own(3, 3, 3), nn.Conv3d(3, 3, 1)])
    plan = plugin_plan(model, "all").to_dict()
    assert plan["nodes"] == 1 and plan["plain"] == 1
    assert "1 temporal convs of class Own are not streaming causal convs" in plan["fallback"]
    assert plugin_plan(model, "none").to_dict()["fallback"] is None
    assert streaming_convs(model) == [model[0]]


# --- the manifest and the TensorRT side -----------------------------------------------------------


def manifest_dict(**extra) -> dict:
    from flashvaed.export.contract import ShapeRange, StateTensor

    contract = Contract(
        model={
            "family": "wan2.1",
            "kind": "teacher",
            "fingerprint": "0" * 16,
            "source": None,
            "latents_mean": [0.0] * 4,
            "latents_std": [1.0] * 4,
            "latent_channels": 4,
            "temporal_factor": 4,
            "spatial_factor": 8,
        },
        precision="fp32",
        plugins="all",
        opset=18,
        shapes={k: ShapeRange(1, 1, 2) for k in ("batch", "chunk", "height", "width")},
        state=[StateTensor("conv_in", 4, 2, 1)],
        files={"first": "first.onnx", "steady": "steady.onnx"},
        **extra,
    )
    return json.loads(contract.to_json())


def test_manifests_record_plugin_convs_and_old_ones_still_load():
    d = manifest_dict(plugin_convs={"nodes": 3, "plain": 2, "fallback": "2 temporal convs of class X ..."})
    assert Contract.from_dict(d).plugin_convs == d["plugin_convs"]
    old = manifest_dict()
    assert "plugin_convs" not in old and Contract.from_dict(old).plugin_convs is None
    from flashvaed.errors import InputError

    for bad in ({"nodes": "3", "plain": 0, "fallback": None}, {"nodes": 1, "plain": 0, "fallback": 3}, [1, 2]):
        with pytest.raises(InputError, match="plugin_convs"):
            Contract.from_dict({**old, "plugin_convs": bad})


def test_tensorrt_plugin_attributes_in_any_order():
    from flashvaed.engines.tensorrt_plugin import _attribute_values

    pads = np.array([0, 1, 1, 0, 1, 1], np.int32)
    for order in ((pads, 1, "replicate"), ("replicate", 1, pads), (1, pads, "replicate")):
        got = _attribute_values(*order)
        assert got[0] is pads and got[1:] == (1, "replicate")


def test_tensorrt_backend_gives_old_plugin_nodes_zero_padding(tmp_path):
    """Graphs exported before nodes carried padding_mode parse with "zeros" (what they computed)."""
    from flashvaed.engines.tensorrt_backend import with_padding_modes

    module = seeded_(Tiny(("zeros", "zeros"), ("zeros", "zeros"), False))
    model = export_tiny(module, tmp_path / "new.onnx")
    assert with_padding_modes(tmp_path / "new.onnx") is None  # every node has it
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name != "padding_mode"]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    patched = onnx.load_from_string(with_padding_modes(tmp_path / "old.onnx"))
    nodes = [n for n in patched.graph.node if n.domain == DOMAIN]
    assert len(nodes) == 2 and all(a.s == b"zeros" for n in nodes for a in n.attribute if a.name == "padding_mode")
    assert all(any(a.name == "padding_mode" for a in n.attribute) for n in nodes)


@pytest.mark.parametrize("history", ["zeros", "replicate"])
def test_state_specs_say_what_stands_before_the_first_frame(history):
    conv = CausalConv3d(4, 4, 3, history=history)
    (spec,) = conv.state_specs("c", Fraction(1))
    assert spec.history == history and spec.frames == 2


def test_manifests_record_each_states_history_and_old_ones_read_zeros():
    from flashvaed.errors import InputError
    from flashvaed.export.contract import StateTensor

    d = manifest_dict()
    assert d["state"][0]["history"] == "zeros"
    d["state"][0]["history"] = "replicate"
    assert Contract.from_dict(d).state[0].history == "replicate"
    del d["state"][0]["history"]
    assert Contract.from_dict(d).state[0].history == "zeros"
    d["state"][0]["history"] = "mirror"
    with pytest.raises(InputError, match="history must be one of zeros, replicate"):
        Contract.from_dict(d)
    spec = CausalConv3d(4, 4, 3, history="replicate").state_specs("c", Fraction(1))[0]
    assert StateTensor.from_spec(spec).history == "replicate"
