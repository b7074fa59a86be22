"""The fused streaming causal conv (``flashvaed.engines.kernel``) against conv3d on the concatenation.

The Triton kernel runs on the CPU under Triton's interpreter. Triton reads TRITON_INTERPRET when
a kernel is decorated, and the module decorates its kernel on first use for the mode then in
force, so each test sets the variable for itself (``interpret`` fixture) instead of for the
whole test process.
"""

import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from flashvaed.engines import kernel as K
from flashvaed.errors import FlashVAEDError
from flashvaed.export.plugin_nodes import WEIGHT_PERM
from flashvaed.models.blocks import CausalConv3d

OP = torch.ops.flashvaed.streaming_causal_conv3d


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(b, c_in, c_out, t, h, w, kernel, groups=1, bias=True, dtype=torch.float32, seed=0):
    kt, kh, kw = kernel
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, t, h, w, generator=g)
    history = torch.randn(b, c_in, kt - 1, h, w, generator=g)
    weight = torch.randn(c_out, c_in // groups, kt, kh, kw, generator=g) / (c_in // groups * kt * kh * kw) ** 0.5
    bias_ = torch.randn(c_out, generator=g) if bias else None
    cast = (lambda v: v.to(dtype)) if dtype != torch.float32 else (lambda v: v)
    return cast(x), cast(history), cast(weight), None if bias_ is None else cast(bias_), (kh // 2, kw // 2)


def expected(x, history, weight, bias, padding, groups):
    """conv3d over cat(history, x) and its last P frames, in fp32."""
    joined = torch.cat([history, x], dim=2).float()
    y = F.conv3d(joined, weight.float(), None if bias is None else bias.float(), padding=(0, *padding), groups=groups)
    return y, joined[:, :, -history.shape[2] :]


# (batch, c_in, c_out, T, H, W, kernel, groups, bias): odd H/W, T < P, T = 1 and 3, batch 2,
# channel counts that are not multiples of the blocks (dense blocks: 16..64 out, 16..32 in;
# depthwise: 32), more than one spatial tile (H*W > 128) and a P = 4 history.
CASES = {
    "dense-b2-t3": (2, 5, 7, 3, 5, 7, (3, 3, 3), 1, True),
    "dense-t1-multiblock": (1, 40, 72, 1, 5, 7, (3, 3, 3), 1, True),
    "dense-t2-two-hw-tiles-nobias": (1, 3, 4, 2, 9, 17, (3, 3, 3), 1, False),
    "dense-p4-t2": (1, 4, 6, 2, 5, 7, (5, 3, 3), 1, True),
    "depthwise-b2-t3": (2, 6, 6, 3, 5, 7, (3, 3, 3), 6, False),
    "depthwise-t1-two-blocks": (1, 40, 40, 1, 3, 5, (3, 3, 3), 40, True),
    "temporal-3x1x1-t3": (1, 5, 10, 3, 5, 7, (3, 1, 1), 1, True),
    "temporal-3x1x1-b2-t1": (2, 5, 10, 1, 4, 6, (3, 1, 1), 1, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_conv3d(interpret, case):
    b, c_in, c_out, t, h, w, kernel, groups, bias = case
    x, history, weight, bias_, padding = make_inputs(b, c_in, c_out, t, h, w, kernel, groups, bias)
    y, new_history = K.streaming_causal_conv3d(x, history, weight, bias_, padding, groups)
    y_ref, history_ref = expected(x, history, weight, bias_, padding, groups)
    assert y.shape == y_ref.shape and new_history.shape == history.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(new_history, history_ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 6])
def test_kernel_standard_weight_layout(interpret, groups):
    """TensorRT hands the plugin the weight as stored (C_out, C_in, kt, kh, kw): read it with strides."""
    x, history, weight, bias, padding = make_inputs(2, 6, 6, 2, 5, 7, (3, 3, 3), groups)
    y, new_history = torch.empty(2, 6, 2, 5, 7), torch.empty_like(history)
    K._launch(x, history, weight, bias, y, new_history, depthwise=groups > 1)
    y_ref, history_ref = expected(x, history, weight, bias, padding, groups)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(new_history, history_ref, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 6])
def test_kernel_half_precision(interpret, groups):
    """fp16 in and out, fp32 accumulation; the history is copied bit for bit.

    (bf16 is not checked here: Triton 3.9's interpreter computes tl.dot on bf16 operands wrongly.)
    """
    x, history, weight, bias, padding = make_inputs(1, 6, 6, 3, 5, 7, (3, 3, 3), groups, dtype=torch.float16)
    y, new_history = K.streaming_causal_conv3d(x, history, weight, bias, padding, groups)
    y_ref, history_ref = expected(x, history, weight, bias, padding, groups)
    assert y.dtype == new_history.dtype == torch.float16
    torch.testing.assert_close(y.float(), y_ref, rtol=0, atol=5e-3)
    assert torch.equal(new_history, history_ref.half())


def test_kernel_strided_inputs(interpret):
    x, history, weight, bias, padding = make_inputs(1, 4, 5, 3, 5, 7, (3, 3, 3))
    x_t = x.transpose(3, 4).contiguous().transpose(3, 4)  # same values, other strides
    y, new_history = K.streaming_causal_conv3d(x_t, history, weight, bias, padding, 1)
    y_ref, history_ref = expected(x, history, weight, bias, padding, 1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(new_history, history_ref, rtol=0, atol=0)


def test_kernel_rejects_what_it_does_not_compute(interpret):
    x, history, weight, bias, padding = make_inputs(1, 4, 4, 2, 5, 7, (3, 3, 3))
    with pytest.raises(ValueError, match="padding"):
        K.streaming_causal_conv3d(x, history, weight, bias, (0, 0), 1)
    with pytest.raises(ValueError, match="history"):
        K.streaming_causal_conv3d(x, history[:, :, :1], weight, bias, padding, 1)
    with pytest.raises(ValueError, match="groups"):
        K.streaming_causal_conv3d(x, history, weight[:, :2], bias, padding, 2)
    with pytest.raises(ValueError, match="dtype"):
        K.streaming_causal_conv3d(x, history, weight.double(), bias, padding, 1)


def test_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, history, weight, bias, padding = make_inputs(1, 4, 4, 2, 5, 7, (3, 3, 3))
    with pytest.raises(ValueError, match="CUDA"):
        K.streaming_causal_conv3d(x, history, weight, bias, padding, 1)


def test_triton_available(interpret):
    assert K.triton_available()


def test_packed_weight_is_cached_and_refreshed():
    conv = CausalConv3d(4, 6, 3)
    packed = K._packed(conv.weight)
    assert packed.stride(0) == 1 and torch.equal(packed, conv.weight)
    assert K._packed(conv.weight) is packed
    with torch.no_grad():
        conv.weight.mul_(2)
    repacked = K._packed(conv.weight)
    assert repacked is not packed and torch.equal(repacked, conv.weight)


@pytest.mark.parametrize(
    ("kernel", "groups", "bias"), [((3, 3, 3), 1, True), ((3, 3, 3), 6, False), ((3, 1, 1), 1, True)]
)
@pytest.mark.parametrize("t", [1, 3])
def test_op_cpu_matches_causal_conv(kernel, groups, bias, t):
    """The custom op's CPU path is the streaming step of ``CausalConv3d``."""
    torch.manual_seed(0)
    conv = CausalConv3d(6, 6 if groups > 1 else 8, kernel, groups=groups, bias=bias)
    x, history = torch.randn(2, 6, t, 5, 7), torch.randn(2, 6, 2, 5, 7)
    y, new_history = OP(x, history, conv.weight, conv.bias, list(conv.padding[1:]), groups)
    y_ref, history_ref = conv.step(x, history)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(new_history, history_ref, rtol=0, atol=0)
    assert new_history.is_contiguous()


def test_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, history = torch.empty(2, 8, 3, 5, 7, dtype=torch.float16), torch.empty(2, 8, 2, 5, 7, dtype=torch.float16)
        weight = torch.empty(16, 8, 3, 3, 3, dtype=torch.float16)
        y, new_history = OP(x, history, weight, None, [1, 1], 1)
        assert y.shape == (2, 16, 3, 5, 7) and y.dtype == torch.float16
        assert new_history.shape == history.shape and new_history.dtype == torch.float16
        y, _ = OP(x, history, torch.empty(16, 8, 3, 1, 1, dtype=torch.float16), None, [0, 0], 1)
        assert y.shape == (2, 16, 3, 5, 7)


def test_op_traces_as_one_node():
    from torch.fx.experimental.proxy_tensor import make_fx

    x, history, weight, bias, _ = make_inputs(1, 4, 6, 2, 5, 7, (3, 3, 3))
    gm = make_fx(lambda *a: OP(*a, [1, 1], 1), tracing_mode="fake")(x, history, weight, bias)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(OP.default) == 1
    torch.library.opcheck(OP, (x, history, weight, bias, [1, 1], 1), test_utils=("test_schema", "test_faketensor"))


def test_compiles_to_ptx_for_tensorrt(monkeypatch):
    """The ahead-of-time path (TensorRT plugins) compiles the same kernel to PTX; no GPU needed."""
    monkeypatch.setenv("FLASHVAED_TRITON_TARGET", "cuda:90")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        name, ptx, cfg = K.compile_for_tensorrt(torch.float16, 8, 16, (3, 1, 1), False, 60 * 104)
    except Exception as exc:  # a triton build without the NVIDIA backend
        pytest.skip(f"triton cannot compile for CUDA here: {exc}")
    assert f".entry {name}(" in ptx
    assert {"BLOCK_CO", "BLOCK_CI", "BLOCK_HW", "num_warps", "shared"} <= cfg.keys()
    # the plugin passes exactly AOT_SCALARS between the pointers (SW_O = 1 is compiled in)
    params = ptx[ptx.index(f".entry {name}(") :].split(")", 1)[0]
    assert len(re.findall(r"\.param \.u32", params)) == len(K.AOT_SCALARS) == 7


@pytest.mark.parametrize("groups", [1, 6])
def test_aot_arguments_read_the_packed_weight(interpret, groups):
    """The ahead-of-time launch: a plugin node's packed weight (kt, kh, kw, C_in/groups, C_out), the
    scalars of ``aot_scalar_args`` and SW_O = 1, run here by the interpreter."""
    b, c, t, h, w = 2, 6, 3, 5, 7
    x, history, weight, bias, padding = make_inputs(b, c, c, t, h, w, (3, 3, 3), groups)
    packed = weight.permute(*WEIGHT_PERM).contiguous()
    depthwise = groups > 1
    y, new_history = torch.empty(b, c, t, h, w), torch.empty_like(history)
    cfg = K.launch_config(c, c, h * w, depthwise)
    grid = (-(-h * w // cfg["BLOCK_HW"]), -(-c // cfg["BLOCK_CO"]), b * t)
    scalars = dict(zip(K.AOT_SCALARS, K.aot_scalar_args(t, h, w, c, c, depthwise), strict=True))
    K._kernel()[grid](
        x, history, packed, bias, **scalars, SW_O=1, y_ptr=y, new_hist_ptr=new_history,
        KT=3, KH=3, KW=3, DEPTHWISE=depthwise, HAS_BIAS=True, DOT_PRECISION="ieee",
        BLOCK_CO=cfg["BLOCK_CO"], BLOCK_CI=cfg["BLOCK_CI"], BLOCK_HW=cfg["BLOCK_HW"],
    )  # fmt: skip
    y_ref, history_ref = expected(x, history, weight, bias, padding, groups)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(new_history, history_ref, rtol=0, atol=0)


def test_old_triton_is_refused_in_one_line():
    for version in ("3.4.0", "3.9.0", "3.5.0+git0123abc", "4.0"):
        K.check_triton_version(version)
    for version in ("3.3.1", "3.0.0", "2.3.1", "unknown"):
        with pytest.raises(FlashVAEDError, match=r"needs triton>=3\.4 .*found triton") as info:
            K.check_triton_version(version)
        assert "\n" not in str(info.value) and version in str(info.value)


def test_importing_the_kernel_with_an_old_triton_says_which_is_needed():
    script = (
        "import sys, types\n"
        "sys.modules['triton'] = types.SimpleNamespace(__version__='3.3.1')\n"
        "from flashvaed.errors import FlashVAEDError\n"
        "try:\n"
        "    import flashvaed.engines.kernel\n"
        "except FlashVAEDError as e:\n"
        "    print('REFUSED:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED: the fused streaming conv kernel needs triton>=3.4" in result.stdout, result.stdout
    assert "found triton 3.3.1" in result.stdout


def test_offsets_past_int32_are_allowed_and_a_giant_frame_is_refused():
    """720p, chunk 8, 96 channels: one batch element's activations pass 2**31 elements, which the
    kernel's int64 channel offsets address (the AOT plugin has no other guard); only a single frame
    plane of 2**31 elements is refused. Checked on meta tensors: no memory is touched."""
    from flashvaed.engines.kernel import _check

    x = torch.empty(1, 96 * 64, 8, 720, 1280, device="meta")  # 96*64 channels: > 2**31 per sample
    hist = torch.empty(1, 96 * 64, 2, 720, 1280, device="meta")
    w = torch.empty(96, 96 * 64, 3, 3, 3, device="meta")
    assert x[0].numel() > 2**31 and _check(x, hist, w, None, (1, 1), 1) is False
    big = torch.empty(1, 1, 1, 2**16, 2**15, device="meta")
    with pytest.raises(ValueError, match="one frame of one channel"):
        _check(
            big,
            torch.empty(1, 1, 2, 2**16, 2**15, device="meta"),
            torch.empty(1, 1, 3, 3, 3, device="meta"),
            None,
            (1, 1),
            1,
        )


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_fp32_products_are_ieee_whatever_torch_allows(monkeypatch, allow_tf32):
    """On an H200 (triton 3.6.0) the kernel's TF32 dot gave frames 2e-2..1e-1 off (relative, vs
    float64) at 60x104, 24x24 and 9x9 where IEEE fp32 gave 2e-6: fp32 runs IEEE even where torch
    allows its own convs TF32; half types keep their native products."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    assert K._dot_precision(torch.empty(1, dtype=torch.float32)) == "ieee"
    assert K._dot_precision(torch.empty(1, dtype=torch.bfloat16)) == "tf32"  # ignored for half operands
