"""TensorRT plugins of the fused streaming causal conv: optional import, and a tiny engine on a GPU."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashvaed.engines import tensorrt_plugin
from flashvaed.errors import InputError


def has_tensorrt() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except ValueError:
        return False


def test_module_imports_without_tensorrt():
    assert tensorrt_plugin.DENSE_PLUGIN == "flashvaed::StreamingCausalConv3d"
    assert tensorrt_plugin.DEPTHWISE_PLUGIN == "flashvaed::StreamingDepthwiseConv3d"
    assert isinstance(tensorrt_plugin.tensorrt_available(), bool)


@pytest.mark.skipif(has_tensorrt(), reason="TensorRT is installed")
def test_register_plugins_names_the_extra():
    with pytest.raises(InputError, match=r"pip install flashvaed\[tensorrt\]") as info:
        tensorrt_plugin.register_plugins()
    assert "\n" not in str(info.value)
    assert not tensorrt_plugin.aot_supported()


@pytest.fixture
def no_tf32():
    """The dense reference conv (cuDNN) and the JIT kernel use TF32 on Ampere+ when torch allows it,
    which a 1e-4 comparison cannot absorb: run both in IEEE fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _gpu_plugin_stack() -> str | None:
    """Why the engine test cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "needs triton"
    if not tensorrt_plugin.tensorrt_available():
        return "needs TensorRT >= 10.7 (tensorrt.plugin)"
    return None


@pytest.mark.skipif(_gpu_plugin_stack() is not None, reason=str(_gpu_plugin_stack()))
@pytest.mark.parametrize("aot", [True, False], ids=["aot", "jit"])
@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_plugin_engine_matches_reference(depthwise, aot, no_tf32):
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if aot and not tensorrt_plugin.aot_supported():
        pytest.skip("this TensorRT has no AOT Python plugins")
    tensorrt_plugin.register_plugins()
    tensorrt_plugin.register_plugins()  # idempotent

    torch.manual_seed(0)
    c, t, h, w = 8, 2, 5, 7
    c_out, groups = (c, c) if depthwise else (12, 1)
    x = torch.randn(1, c, t, h, w, device="cuda")
    history = torch.randn(1, c, 2, h, w, device="cuda")
    weight = torch.randn(c_out, c // groups, 3, 3, 3) * 0.2
    bias = torch.randn(c_out)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strongly_typed | tensorrt_plugin.network_creation_flags(prefer_aot=aot))
    x_in = network.add_input("x", trt.float32, tuple(x.shape))
    h_in = network.add_input("history", trt.float32, tuple(history.shape))
    w_np, b_np = weight.numpy(), bias.numpy()  # alive until the engine is built
    w_in = network.add_constant(w_np.shape, trt.Weights(w_np)).get_output(0)
    b_in = network.add_constant(b_np.shape, trt.Weights(b_np)).get_output(0)
    op = getattr(trtp.op.flashvaed, "StreamingDepthwiseConv3d" if depthwise else "StreamingCausalConv3d")
    plugin = op(x_in, h_in, w_in, b_in, pads=np.array([0, 1, 1, 0, 1, 1], dtype=np.int32), group=groups)
    layer = network.add_plugin(plugin, aot=aot) if tensorrt_plugin.aot_supported() else network.add_plugin(plugin)
    layer.get_output(0).name, layer.get_output(1).name = "y", "new_history"
    network.mark_output(layer.get_output(0))
    network.mark_output(layer.get_output(1))
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    assert serialized is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()

    y = torch.empty(1, c_out, t, h, w, device="cuda")
    new_history = torch.empty_like(history)
    for name, tensor in (("x", x), ("history", history), ("y", y), ("new_history", new_history)):
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()

    joined = torch.cat([history, x], dim=2)
    y_ref = F.conv3d(joined, weight.cuda(), bias.cuda(), padding=(0, 1, 1), groups=groups)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(new_history, joined[:, :, -2:], rtol=0, atol=0)
