"""TensorRT plugins of the fused streaming causal conv, and the TensorRT backend's decisions.

Without TensorRT (this machine): optional import, registration against a fake ``tensorrt.plugin``
with triton unimportable (AOT engines must load without it), and the backend's pure parts
(network flags, parsing, shared context memory, stream order) against fake TensorRT objects.
With TensorRT and a GPU: a tiny engine per plugin and implementation.
"""

import importlib.util
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper

from flashvaed.engines import tensorrt_backend, tensorrt_plugin
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
    network = builder.create_network(tensorrt_backend.network_creation_flags(trt, prefer_aot=aot))
    x_in = network.add_input("x", trt.float32, tuple(x.shape))
    h_in = network.add_input("history", trt.float32, tuple(history.shape))
    # the plugin nodes' packed weight layout; alive until the engine is built
    w_np, b_np = weight.permute(2, 3, 4, 1, 0).contiguous().numpy(), bias.numpy()
    w_in = network.add_constant(w_np.shape, trt.Weights(w_np)).get_output(0)
    b_in = network.add_constant(b_np.shape, trt.Weights(b_np)).get_output(0)
    op = getattr(trtp.op.flashvaed, "StreamingDepthwiseConv3d" if depthwise else "StreamingCausalConv3d")
    pads = np.array([0, 1, 1, 0, 1, 1], dtype=np.int32)
    plugin = op(x_in, h_in, w_in, b_in, pads=pads, group=groups, padding_mode="zeros")
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
    # after torch's work on x and history (random fills on torch's stream), before reading y
    assert tensorrt_backend.enqueue(context, torch.cuda.Stream(), torch.cuda.current_stream())

    joined = torch.cat([history, x], dim=2)
    y_ref = F.conv3d(joined, weight.cuda(), bias.cuda(), padding=(0, 1, 1), groups=groups)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(new_history, joined[:, :, -2:], rtol=0, atol=0)


@pytest.mark.skipif(_gpu_plugin_stack() is not None, reason=str(_gpu_plugin_stack()))
@pytest.mark.parametrize("plugins", ["all", "depthwise", "none"])
def test_engine_from_an_export_decodes_like_torch(plugins, tmp_path, no_tf32):
    """export --plugins X -> build-engine --backend tensorrt (our network flags, shared context
    memory, torch's stream order) -> the same frames as the torch model, streamed in chunks of 1-3."""
    from flashvaed import engines
    from flashvaed.engines.build import build_engine
    from flashvaed.export.onnx_export import ExportOptions, export
    from flashvaed.models import StudentSpec, WanConfig
    from flashvaed.models.student import build_student

    torch.manual_seed(0)
    model = build_student(StudentSpec.load("flash-wan2.1"), WanConfig(base_dim=16))[0].eval()
    options = ExportOptions(chunk="1:2:3", height="16:32:64", width="16:32:64", batch="1:1:2", plugins=plugins)
    export(model, tmp_path / "export", options)
    build_engine(tmp_path / "export", tmp_path / "engine", "tensorrt")
    decoder = engines.load(tmp_path / "engine")
    latents = torch.randn(2, 16, 6, 3, 5)
    expected = model.decode(latents)
    for chunk in (1, 2, 3):  # TensorRT may run fp32 convs in TF32 (BuilderFlag.TF32 is on by default)
        torch.testing.assert_close(decoder.decode(latents, chunk), expected, rtol=0, atol=2e-2)


# --- registration without triton ---------------------------------------------------------------

FAKE_TENSORRT = """
import sys, types
import numpy as np

sys.modules["triton"] = None  # poisoned: any import of triton fails
trt = types.ModuleType("tensorrt")
trt.float32, trt.float16, trt.bfloat16 = "f32", "f16", "bf16"
trtp = types.ModuleType("tensorrt.plugin")
defined = {}


def recorder(kind):
    def by_id(plugin_id):
        def record(fn):
            defined.setdefault(plugin_id, {})[kind] = fn
            return fn
        return record
    return by_id


trtp.register, trtp.impl, trtp.aot_impl = recorder("register"), recorder("impl"), recorder("aot_impl")
trtp.TensorDesc = trtp.Tensor = trtp.SymIntExprs = object
trtp.KernelLaunchParams = type("KernelLaunchParams", (), {})
trtp.op = types.SimpleNamespace()
trtp.from_shape_expr = lambda shape, dtype: (tuple(shape), dtype)
trt.plugin = trtp
sys.modules["tensorrt"], sys.modules["tensorrt.plugin"] = trt, trtp


class Dim:
    def __init__(self, value):
        self.value, self.is_fake, self.is_constant = value, False, True

    def constant_value(self):
        return self.value


class Desc:
    def __init__(self, *shape, dtype="f32"):
        self.shape_expr, self.dtype = [Dim(v) for v in shape], dtype

    def like(self):
        return "like", tuple(d.value for d in self.shape_expr)
"""


def run_with_fake_tensorrt(body: str) -> subprocess.CompletedProcess:
    script = FAKE_TENSORRT + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_aot_registration_imports_no_triton():
    """Registering (what loading an engine directory does) needs no triton: only compiling does."""
    result = run_with_fake_tensorrt(
        """
        from flashvaed.engines import tensorrt_plugin as tp
        from flashvaed.errors import FlashVAEDError

        tp.register_plugins()
        assert tp.aot_supported()
        assert set(defined) == {tp.DENSE_PLUGIN, tp.DEPTHWISE_PLUGIN}, defined
        assert all(set(v) == {"register", "impl", "aot_impl"} for v in defined.values())
        assert sys.modules["triton"] is None and "flashvaed.engines.kernel" not in sys.modules

        # shapes from the packed weight (kt, kh, kw, C_in, C_out): y has C_out channels
        pads = np.array([0, 1, 1, 0, 1, 1], np.int32)
        x, history, weight, bias = Desc(2, 5, 3, 7, 9), Desc(2, 5, 2, 7, 9), Desc(3, 3, 3, 5, 12), Desc(12)
        y, new_history = defined[tp.DENSE_PLUGIN]["register"](x, history, weight, bias, pads, 1, "zeros")
        assert [d.value for d in y[0]] == [2, 12, 3, 7, 9], y
        assert new_history == ("like", (2, 5, 2, 7, 9))

        # compiling at engine build is where triton is needed, and its absence is one clear line
        try:
            defined[tp.DENSE_PLUGIN]["aot_impl"](x, history, weight, bias, pads, 1, "replicate", (None, None), 0)
        except FlashVAEDError as e:
            print("REFUSED:", e)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    refusal = [line for line in result.stdout.splitlines() if line.startswith("REFUSED:")]
    assert len(refusal) == 1 and "triton>=3.4" in refusal[0], result.stdout


# --- the backend's decisions, against fake TensorRT objects --------------------------------------


def fake_trt(version: str, *flags: str) -> SimpleNamespace:
    return SimpleNamespace(
        __version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(**{f: i for i, f in enumerate(flags)})
    )


FLAGS_10_9 = ("EXPLICIT_BATCH", "STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS")


def test_network_creation_flags_prefer_aot_plugins_from_tensorrt_10_9():
    strongly_typed, aot, jit = 1 << 1, 1 << 2, 1 << 3
    assert tensorrt_backend.network_creation_flags(fake_trt("10.8.0.43", "EXPLICIT_BATCH", "STRONGLY_TYPED")) == (
        strongly_typed
    )
    # a 10.8 that somehow knew the flag still gets none: the plugins have no AOT implementation there
    assert tensorrt_backend.network_creation_flags(fake_trt("10.8.0.43", *FLAGS_10_9)) == strongly_typed
    assert tensorrt_backend.network_creation_flags(fake_trt("10.9.0.34", *FLAGS_10_9)) == strongly_typed | aot
    assert tensorrt_backend.network_creation_flags(fake_trt("10.13.2", *FLAGS_10_9), prefer_aot=False) == (
        strongly_typed | jit
    )
    assert tensorrt_backend.network_creation_flags(fake_trt("11.1.0", *FLAGS_10_9)) == strongly_typed | aot
    assert tensorrt_backend.network_creation_flags(fake_trt("12.0.0", "PREFER_AOT_PYTHON_PLUGINS")) == 1


class FakeParser:
    def __init__(self, network, logger, errors=()):
        self.network, self.errors = network, list(errors)

    def parse_from_file(self, path):
        self.path = path
        return not self.errors

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


def fake_builder_trt(errors=()):
    trt = fake_trt("10.9.0", *FLAGS_10_9)
    created = {}

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            created["flags"] = flags
            return "network"

    trt.Builder, trt.init_libnvinfer_plugins = Builder, lambda logger, namespace: None
    trt.OnnxParser = lambda network, logger: FakeParser(network, logger, errors)
    return trt, created


def test_parse_network_creates_the_network_with_the_plugin_preference(tmp_path):
    trt, created = fake_builder_trt()
    _, network, parser = tensorrt_backend.parse_network(trt, tmp_path / "steady.onnx", "logger")
    assert created["flags"] == tensorrt_backend.network_creation_flags(trt) == (1 << 1) | (1 << 2)
    assert network == "network" and parser.path == str(tmp_path / "steady.onnx")
    trt, _ = fake_builder_trt(["In node 3 (importFallbackPluginImporter): no plugin\nmore detail", "second"])
    with pytest.raises(InputError, match=r"cannot parse .*steady.onnx: In node 3 .*no plugin \(and 1 more errors\)$"):
        tensorrt_backend.parse_network(trt, tmp_path / "steady.onnx", "logger")


def test_engines_are_built_to_size_activations_for_the_shapes_they_run():
    class Config:
        def __init__(self):
            self.features = {}

        def set_preview_feature(self, feature, on):
            self.features[feature] = on

    created = []

    def create_config(builder, network):
        created.append((builder, network))
        return Config()

    trt = SimpleNamespace(PreviewFeature=SimpleNamespace(RUNTIME_ACTIVATION_RESIZE_10_10="resize"))
    config = tensorrt_backend.with_activation_resize(trt, create_config)("builder", "network")
    assert created == [("builder", "network")] and config.features == {"resize": True}
    older = tensorrt_backend.with_activation_resize(SimpleNamespace(PreviewFeature=SimpleNamespace()), create_config)
    assert older("builder", "network").features == {}  # before TensorRT 10.10: the config as polygraphy made it


def test_contexts_share_one_device_allocation_sized_for_their_shapes():
    allocated = []

    def allocate(size):
        allocated.append(size)
        return torch.empty(size, dtype=torch.uint8)

    class Context:
        def __init__(self, sizes):
            self.sizes, self.bound = list(sizes), []

        def update_device_memory_size_for_shapes(self):
            return self.sizes.pop(0)

        def set_device_memory(self, pointer, size):
            self.bound.append((pointer, size))

    memory = tensorrt_backend.DeviceMemory(allocate)
    first, steady = Context([100]), Context([60, 300, 300])
    assert memory.bind(first) == 100 and memory.bind(steady) == 60
    assert first.bound[0][0] == steady.bound[0][0] and allocated == [100]  # one buffer for both contexts
    memory.bind(steady)  # a longer chunk needs more: the buffer grows once
    memory.bind(steady)
    assert allocated == [100, 300] and steady.bound[1] == steady.bound[2] == (memory.buffer.data_ptr(), 300)


def test_tensorrt_runs_between_torch_work_before_and_after():
    events = []

    class FakeStream:
        def __init__(self, name):
            self.name, self.cuda_stream = name, 1234 if name == "tensorrt" else 0

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    class Context:
        def execute_async_v3(self, handle):
            events.append(f"run on {handle}")
            return True

    assert tensorrt_backend.enqueue(Context(), FakeStream("tensorrt"), FakeStream("torch"))
    assert events == ["tensorrt waits for torch", "run on 1234", "torch waits for tensorrt"]


def test_graphs_with_conv_layout_plugin_weights_are_refused(tmp_path):
    def graph(version):
        node = helper.make_node("Identity", ["x"], ["y"])
        io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
        opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("flashvaed", version)] if version else [])
        path = tmp_path / f"v{version}.onnx"
        onnx.save(helper.make_model(helper.make_graph([node], "g", io[:1], io[1:]), opset_imports=opsets), path)
        return path

    tensorrt_backend.check_plugin_layout(graph(2))
    tensorrt_backend.check_plugin_layout(graph(None))
    with pytest.raises(InputError, match="layout version 1 .*export the model again"):
        tensorrt_backend.check_plugin_layout(graph(1))
