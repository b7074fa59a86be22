"""The fused streaming causal conv as TensorRT plugins (TensorRT's "quickly deployable plugins").

Two plugins, one per ONNX op type the exporter writes (``flashvaed.export.plugin_nodes``):
``flashvaed::StreamingCausalConv3d`` (group 1) and ``flashvaed::StreamingDepthwiseConv3d`` (group
= channels). Inputs (x, history, weight, bias), outputs (y, new_history), attributes ``pads``
(ONNX Conv layout [0, ph, pw, 0, ph, pw]), ``group`` and ``padding_mode`` ("zeros" or
"replicate", passed to the kernel; graphs exported before it existed get "zeros" from
``tensorrt_backend`` before parsing). TensorRT's ONNX parser prefers a
registered plugin over the node's local-function body when the node carries ``plugin_namespace``.

Each plugin has two implementations:

* ahead of time (``@trtp.aot_impl``, TensorRT >= 10.9): the Triton kernel compiled to PTX at
  engine build and stored in the engine, so a saved engine runs without Python (trtexec, C++);
* just in time (``@trtp.impl``): a Python callback launching the kernel on TensorRT's stream;
  the fallback where AOT plugins do not exist, and it needs ``register_plugins()`` again in the
  process that deserializes the engine.

Registering imports neither triton nor the kernel module: only compiling (``aot_impl``, at
engine build) and running a JIT plugin need them, so loading an AOT engine needs no triton.

With both defined, TensorRT asks the network for a preference: create it with
``tensorrt_backend.network_creation_flags(trt)`` (``PREFER_AOT_PYTHON_PLUGINS``), or the parser
refuses the node.

The weight input is packed, (kt, kh, kw, C_in/groups, C_out) (``plugin_nodes.WEIGHT_PERM``),
which the AOT kernel reads coalesced; the JIT callback views it back as (C_out, C_in/groups, kt,
kh, kw) without a copy.

No ``from __future__ import annotations`` here: TensorRT validates the decorated functions'
annotations as live types.
"""

from types import SimpleNamespace

import numpy as np
import numpy.typing as npt

from ..errors import InputError
from ..export.plugin_nodes import CONV_WEIGHT_PERM
from ..models.blocks import check_padding_mode

__all__ = [
    "DENSE_PLUGIN",
    "DEPTHWISE_PLUGIN",
    "aot_supported",
    "register_plugins",
    "tensorrt_available",
]

NAMESPACE = "flashvaed"
DENSE_PLUGIN = f"{NAMESPACE}::StreamingCausalConv3d"
DEPTHWISE_PLUGIN = f"{NAMESPACE}::StreamingDepthwiseConv3d"

_registered = False


def tensorrt_available() -> bool:
    """True when TensorRT's Python plugin API (``tensorrt.plugin``) imports."""
    try:
        import tensorrt.plugin  # noqa: F401
    except ImportError:
        return False
    return True


def aot_supported() -> bool:
    """True when the installed TensorRT has ahead-of-time Python plugins (``trtp.aot_impl``)."""
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        return False
    return hasattr(trtp, "aot_impl") and hasattr(trtp, "KernelLaunchParams")


def register_plugins() -> None:
    """Register both plugins with TensorRT's plugin registry; a no-op once done.

    Raises ``InputError`` when TensorRT is missing. Imports no triton (see the module's docstring):
    building an engine checks for it (``tensorrt_backend.build``), a JIT plugin needs it to run.
    """
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise InputError(
            "the TensorRT plugins need TensorRT >= 10.7 with its Python plugin API (pip install flashvaed[tensorrt])"
        ) from exc

    with_aot = aot_supported()
    for plugin_id, depthwise in ((DENSE_PLUGIN, False), (DEPTHWISE_PLUGIN, True)):
        namespace, name = plugin_id.split("::")
        if hasattr(trtp.op, namespace) and hasattr(getattr(trtp.op, namespace), name):
            continue  # registered earlier in this process (e.g. by a reloaded copy of this module)
        _define_plugin(trt, trtp, plugin_id, depthwise, with_aot)
    _registered = True


def _spatial_padding(pads: np.ndarray, plugin_id: str) -> tuple[int, int]:
    """(ph, pw) from ONNX Conv pads [0, ph, pw, 0, ph, pw]; only that layout is accepted."""
    p = [int(v) for v in np.asarray(pads).reshape(-1)]
    if len(p) != 6 or p[0] != 0 or p[3] != 0 or p[1:3] != p[4:6]:
        raise ValueError(f"{plugin_id}: pads must be [0, ph, pw, 0, ph, pw], got {p}")
    return p[1], p[2]


def _attribute_values(*values) -> tuple:
    """(pads, group, padding_mode) from the attribute values in any order: TensorRT passes an AOT
    plugin its attributes positionally in the order the node gave them, which need not be ours."""
    pads = next(v for v in values if isinstance(v, np.ndarray))
    group = next(v for v in values if isinstance(v, (int, np.integer)) and not isinstance(v, bool))
    padding_mode = next(v for v in values if isinstance(v, str))
    return pads, group, padding_mode


def _define_plugin(trt, trtp, plugin_id: str, depthwise: bool, with_aot: bool) -> None:
    """Define register / impl (/ aot_impl) for one plugin id; trt, trtp are the imported modules.

    The kernel module (and with it triton) is imported inside the implementations, when they run.
    """
    import torch

    torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}

    def check_attrs(pads: np.ndarray, group: int, padding_mode: str) -> tuple[int, int]:
        if depthwise == (group == 1):
            kind = "a depthwise conv (group = channels)" if depthwise else "a dense conv (group 1)"
            raise ValueError(f"{plugin_id} is {kind}, got group {group}")
        check_padding_mode(padding_mode, f"{plugin_id} padding_mode")
        return _spatial_padding(pads, plugin_id)

    @trtp.register(plugin_id)
    def describe(
        x: trtp.TensorDesc,
        history: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        pads: npt.NDArray[np.int32],
        group: int,
        padding_mode: str,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        check_attrs(pads, group, padding_mode)
        s = x.shape_expr
        c_out = weight.shape_expr[4]  # packed weight: (kt, kh, kw, C_in/groups, C_out)
        y = trtp.from_shape_expr((s[0], c_out, s[2], s[3], s[4]), dtype=x.dtype)
        return y, history.like()

    @trtp.impl(plugin_id)
    def run(
        x: trtp.Tensor,
        history: trtp.Tensor,
        weight: trtp.Tensor,
        bias: trtp.Tensor,
        pads: npt.NDArray[np.int32],
        group: int,
        padding_mode: str,
        outputs: tuple[trtp.Tensor, trtp.Tensor],
        stream: int,
    ) -> None:
        from .kernel import _check, _launch

        padding = check_attrs(pads, group, padding_mode)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt, ht, wt, bt, yt, nt = (_as_torch(t, torch_dtypes) for t in (x, history, weight, bias, *outputs))
            wt = wt.permute(*CONV_WEIGHT_PERM)  # a (C_out, C_in/groups, kt, kh, kw) view, output channels innermost
            _check(xt, ht, wt, bt, padding, group, padding_mode)
            _launch(xt, ht, wt, bt, yt, nt, depthwise, padding_mode)

    if not with_aot:
        return

    @trtp.aot_impl(plugin_id)
    def compile_aot(
        x: trtp.TensorDesc,
        history: trtp.TensorDesc,
        weight: trtp.TensorDesc,
        bias: trtp.TensorDesc,
        pads: npt.NDArray[np.int32],
        group: int,
        padding_mode: str,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        # TensorRT passes every attribute positionally in the order they were given to the plugin
        # (the node's order when parsing ONNX, the keyword order otherwise): sort them by type.
        pads, group, padding_mode = _attribute_values(pads, group, padding_mode)
        from .kernel import aot_scalar_args, compile_for_tensorrt  # imports triton: building needs it

        check_attrs(pads, group, padding_mode)
        ws = weight.shape_expr
        if not all(not d.is_fake and d.is_constant for d in ws):
            raise ValueError(f"{plugin_id}: the weight must be a constant (an initializer) of static shape")
        kt, kh, kw, c_in_per_group, c_out = (d.constant_value() for d in ws)  # packed layout
        c_in = c_out if depthwise else c_in_per_group
        xs = x.shape_expr
        h, w = xs[3], xs[4]
        hw_hint = h.constant_value() * w.constant_value() if h.is_constant and w.is_constant else 1 << 20
        name, ptx, cfg = compile_for_tensorrt(
            torch_dtypes[x.dtype], c_in, c_out, (kt, kh, kw), depthwise, hw_hint, torch_dtypes[bias.dtype], padding_mode
        )
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(h * w, cfg["BLOCK_HW"])
        launch.grid_y = -(-c_out // cfg["BLOCK_CO"])
        launch.grid_z = xs[0] * xs[2]
        launch.block_x = cfg["num_warps"] * 32
        launch.shared_mem = cfg["shared"]
        scalars = aot_scalar_args(xs[2], h, w, c_in, c_out, depthwise)  # between the input and output pointers
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return name, ptx, launch, extra_args


def _as_torch(t, torch_dtypes: dict):
    """A zero-copy torch view of a TensorRT plugin tensor (linear layout); bf16 goes through int16."""
    import torch

    dtype = torch_dtypes[t.dtype]
    typestr = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2"}[dtype]

    array = SimpleNamespace(
        __cuda_array_interface__={
            "shape": tuple(int(d) for d in t.shape),
            "typestr": typestr,
            "data": (int(t.data_ptr), False),
            "version": 3,
            "strides": None,  # C-contiguous
        }
    )
    view = torch.as_tensor(array, device="cuda")
    return view.view(torch.bfloat16) if dtype == torch.bfloat16 else view
