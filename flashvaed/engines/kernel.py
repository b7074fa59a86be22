"""The fused streaming causal conv: one Triton kernel for ``conv3d(cat(history, x))`` and the new history.

A streaming causal conv in plain torch concatenates the history in front of the chunk (a full copy
of its input), convolves, and slices the last ``P = kt - 1`` frames out as the next history (a
second copy): memory traffic of about twice the input on top of the conv's own. This kernel reads
the two tensors in place, choosing the source of every input frame by its time offset, and writes
the output and the new history in the same launch: the programs of the last output frame load
every frame of the new history anyway (as their temporal taps 1..P at the centre spatial tap), so
they store those tiles on the way.

Three entry points:

* ``streaming_causal_conv3d`` launches the kernel (CUDA tensors, or CPU tensors under Triton's
  interpreter, ``TRITON_INTERPRET=1``);
* ``torch.ops.flashvaed.streaming_causal_conv3d``, a custom op: the Triton kernel on CUDA, plain
  torch (cat + conv3d + slice) everywhere else, with a fake implementation for tracing;
* ``compile_for_tensorrt`` (used by ``tensorrt_plugin``) compiles the same kernel to PTX, for the
  packed weights of plugin nodes (output channels innermost, read coalesced).

Needs triton >= 3.4 (``TRITON_MIN_VERSION``); an older one is refused at import, in one line.

Dense (groups 1) and depthwise (groups = channels) convs; stride 1, "same" spatial padding with
zeros or the edge values replicated (``padding_mode``; replicate clamps the input indices), odd
spatial kernels; fp32 accumulation for fp32, fp16 and bf16 tensors. fp32 products are always
exact (IEEE), whatever ``torch.backends.cudnn.allow_tf32`` says: on an H200 (triton 3.6.0) the TF32
dot gave wrong frames at some sizes (relative error 2e-2 to 1e-1 against float64 at 60x104, 24x24
and 9x9, where IEEE fp32 gave 2e-6 and cuDNN's TF32 3e-4; benchmarks/RESULTS.md, issue 23's GPU
lease). The ahead-of-time TensorRT kernel uses IEEE fp32 too.
"""

from __future__ import annotations  # also keeps the kernel's tl.constexpr annotations lazy without triton

import functools
import os
import re
import weakref
from typing import Any

import torch
from torch import Tensor

from ..errors import FlashVAEDError
from ..models.blocks import check_padding_mode, streaming_conv3d

# The first Triton with both APIs this module uses: ``triton.knobs`` (``knobs.runtime.interpret``)
# appeared in 3.4.0; ``ASTSource(constexprs=...)`` in 3.3 (checked in the 3.3.1 and 3.4.0 wheels).
TRITON_MIN_VERSION = (3, 4)
TRITON_REQUIREMENT = "triton>=3.4"


def check_triton_version(version: str) -> None:
    """Refuse a Triton older than ``TRITON_MIN_VERSION`` in one line, instead of an AttributeError later."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or tuple(int(v) for v in match.groups()) < TRITON_MIN_VERSION:
        raise FlashVAEDError(
            f"the fused streaming conv kernel needs {TRITON_REQUIREMENT} (triton.knobs), "
            f"found triton {version}: pip install '{TRITON_REQUIREMENT}'"
        )


try:
    import triton
except ImportError:  # the CPU op and the fake op work without triton
    triton = None
    tl = None
else:
    check_triton_version(getattr(triton, "__version__", "unknown"))
    import triton.language as tl

__all__ = [
    "AOT_SCALARS",
    "TRITON_MIN_VERSION",
    "aot_scalar_args",
    "check_triton_version",
    "compile_for_tensorrt",
    "launch_config",
    "reference_streaming_conv3d",
    "require_triton",
    "streaming_causal_conv3d",
    "streaming_causal_conv3d_op",
    "triton_available",
]

_INT32_MAX = 2**31 - 1


def triton_available() -> bool:
    """True when the Triton kernel can run here: triton imports, and a CUDA device is visible or
    Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


def _interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------------------------
# The kernel. Written undecorated and jitted on first use (see ``_kernel``): Triton decides at
# decoration time whether a kernel is compiled or interpreted, so decorating at import would tie
# the module to the TRITON_INTERPRET value of whoever imported it first. For the same reason it
# calls only builtins (tl.full, not tl.zeros): triton.language's own @jit helpers are fixed as
# compiled or interpreted when triton is imported.
#
# Grid: (spatial tiles, output-channel tiles, batch * T). A program computes the output tile
# y[b, co_tile, t, hw_tile] as a sum over temporal taps dt, input-channel blocks and spatial taps
# (dh, dw) of weight[co_tile, ci_block, dt, dh, dw] @ input[ci_block, frame t + dt, shifted hw_tile],
# where frame s of cat(history, x) is history[s] for s < P and x[s - P] otherwise. The argument
# order (inputs, scalars, outputs) is the one TensorRT's AOT plugins launch with.
# ---------------------------------------------------------------------------------------------


def _streaming_conv3d_kernel(
    x_ptr,  # (B, C_IN, T, H, W)
    hist_ptr,  # (B, C_IN, P, H, W)
    w_ptr,  # (C_OUT, C_IN / groups, KT, KH, KW), any strides with the taps uniformly strided
    bias_ptr,  # (C_OUT,); not read when HAS_BIAS is false
    T,
    H,
    W,
    C_IN,
    C_OUT,
    SW_O,  # weight strides (elements) along output channels, input channels, flattened taps
    SW_I,
    SW_T,
    y_ptr,  # (B, C_OUT, T, H, W)
    new_hist_ptr,  # (B, C_IN, P, H, W)
    KT: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    DEPTHWISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    REPLICATE: tl.constexpr = False,  # spatial padding: the nearest edge value (clamped indices), not zeros
):
    P: tl.constexpr = KT - 1
    CENTRE: tl.constexpr = (KH // 2) * KW + KW // 2  # the spatial tap without shift
    pid_hw = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_bt = tl.program_id(2)
    b = (pid_bt // T).to(tl.int64)  # int64 batch offsets: a batch of video activations may pass 2**31
    t = pid_bt % T
    HW = H * W

    hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_ok = hw < HW
    oh = hw // W
    ow = hw % W
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_OUT
    co64 = co.to(tl.int64)  # channel offsets in int64: C x T x H x W passes 2**31 at 720p (96 ch, chunk 8)
    # The new history is frames T..T+P-1 of cat(history, x): exactly what the programs of the last
    # output frame read as temporal taps 1..P. One channel tile of them writes it (dense: the
    # first output-channel tile, which loops over all input channels; depthwise: every tile).
    if DEPTHWISE:
        writer = t == T - 1
    else:
        writer = (t == T - 1) & (pid_co == 0)
    hist_base = new_hist_ptr + b * C_IN * P * HW
    acc = tl.full([BLOCK_CO, BLOCK_HW], 0.0, tl.float32)

    for dt in tl.static_range(KT):
        # pick the tensor that holds frame t + dt of cat(history, x), and its channel stride
        s = t + dt
        if s < P:
            frame = hist_ptr + (b * C_IN * P + s) * HW
            c_stride = P * HW
        else:
            frame = x_ptr + (b * C_IN * T + (s - P)) * HW
            c_stride = T * HW
        # input channel blocks: depthwise convs read the output channels' own inputs
        for ci0 in range(0, 1 if DEPTHWISE else C_IN, BLOCK_CI):
            ci = co if DEPTHWISE else ci0 + tl.arange(0, BLOCK_CI)
            ci_ok = ci < C_IN
            ci64 = ci.to(tl.int64)
            rows = frame + ci64[:, None] * c_stride
            # spatial taps as a loop, not unrolled: one input tile live at a time
            for k in range(KH * KW):
                ih = oh + (k // KW - KH // 2)
                iw = ow + (k % KW - KW // 2)
                if REPLICATE:  # the centre tap stays unshifted: the new history below is unchanged
                    ih = tl.minimum(tl.maximum(ih, 0), H - 1)
                    iw = tl.minimum(tl.maximum(iw, 0), W - 1)
                    ok = hw_ok
                else:
                    ok = hw_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xt = tl.load(rows + (ih * W + iw)[None, :], mask=ci_ok[:, None] & ok[None, :], other=0.0)
                tap = dt * KH * KW + k
                if DEPTHWISE:
                    wv = tl.load(w_ptr + co * SW_O + tap * SW_T, mask=co_ok, other=0.0)
                    acc += wv.to(tl.float32)[:, None] * xt.to(tl.float32)
                else:
                    w_ok = co_ok[:, None] & ci_ok[None, :]
                    wt = tl.load(w_ptr + co[:, None] * SW_O + ci[None, :] * SW_I + tap * SW_T, mask=w_ok, other=0.0)
                    acc = tl.dot(wt.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)
                if dt >= 1:
                    if writer & (k == CENTRE):  # the unshifted tile of frame T + dt - 1: new history
                        dst = hist_base + (dt - 1) * HW + ci64[:, None] * (P * HW) + hw[None, :]
                        tl.store(dst, xt, mask=ci_ok[:, None] & hw_ok[None, :])

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None]
    y_base = y_ptr + (b * C_OUT * T + t) * HW
    dst = y_base + co64[:, None] * (T * HW) + hw[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=co_ok[:, None] & hw_ok[None, :])


@functools.cache
def _jit(interpret: bool) -> Any:
    if interpret:
        return triton.jit(_streaming_conv3d_kernel)  # the knob is on: an interpreted function
    return triton.JITFunction(_streaming_conv3d_kernel)


def require_triton() -> None:
    """Refuse in one line where triton is missing (an old one is refused at import)."""
    if triton is None:
        raise FlashVAEDError(f"the fused streaming conv kernel needs triton: pip install '{TRITON_REQUIREMENT}'")


def _kernel() -> Any:
    require_triton()
    return _jit(_interpreting())


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launch_config(c_in: int, c_out: int, hw: int, depthwise: bool) -> dict[str, int]:
    """Block sizes and warps for one conv: a BLOCK_CO x BLOCK_HW fp32 accumulator per program.

    Dense tiles are at least 16 wide on every side (``tl.dot`` needs it on GPUs); depthwise ones
    have no dot, so their channel block only rounds the channel count up to a power of two.
    """
    block_hw = min(128, max(16, _next_pow2(hw)))
    if depthwise:
        block_co = min(32, _next_pow2(c_out))
        return {"BLOCK_CO": block_co, "BLOCK_CI": block_co, "BLOCK_HW": block_hw, "num_warps": 4}
    block_co = min(64, max(16, _next_pow2(c_out)))
    block_ci = min(32, max(16, _next_pow2(c_in)))
    return {"BLOCK_CO": block_co, "BLOCK_CI": block_ci, "BLOCK_HW": block_hw, "num_warps": 4}


def _check(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: tuple[int, int] | list[int],
    groups: int,
    padding_mode: str = "zeros",
) -> bool:
    """Validate the arguments; True for a depthwise conv."""
    check_padding_mode(padding_mode)
    if x.dim() != 5 or history.dim() != 5 or weight.dim() != 5:
        raise ValueError("x, history and weight must be 5-D (B, C, T, H, W) / (C_out, C_in/groups, kt, kh, kw)")
    b, c_in, _, h, w = x.shape
    c_out, c_per_group, kt, kh, kw = weight.shape
    if tuple(history.shape) != (b, c_in, kt - 1, h, w) or kt < 2:
        raise ValueError(
            f"history must be (B, C, kt-1 >= 1, H, W) = {(b, c_in, kt - 1, h, w)}, got {tuple(history.shape)}"
        )
    if kh % 2 == 0 or kw % 2 == 0 or tuple(padding) != (kh // 2, kw // 2):
        raise ValueError(f"only odd spatial kernels with 'same' padding ({kh // 2}, {kw // 2}), got {tuple(padding)}")
    depthwise = groups != 1
    if depthwise and not (groups == c_in == c_out and c_per_group == 1):
        raise ValueError(f"groups must be 1 or the channel count ({c_in}) with as many outputs, got {groups}")
    if not depthwise and c_per_group != c_in:
        raise ValueError(f"weight expects {c_per_group} input channels, x has {c_in}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must be ({c_out},), got {tuple(bias.shape)}")
    if history.dtype != x.dtype or weight.dtype != x.dtype:
        raise ValueError(f"x, history and weight must share a dtype, got {x.dtype}, {history.dtype}, {weight.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {x.dtype}")
    if h * w > _INT32_MAX:  # batch and channel offsets are int64 in the kernel; in-frame ones int32
        raise ValueError("one frame of one channel must hold fewer than 2**31 elements")
    return depthwise


def _weight_strides(weight: Tensor) -> tuple[int, int, int]:
    """Element strides of ``weight`` along output channels, input channels and flattened taps."""
    _, _, _, kh, kw = weight.shape
    so, si, st, sh, sw = weight.stride()
    if (kh > 1 and sh != sw * kw) or (weight.shape[2] > 1 and st != sh * kh):
        raise ValueError(f"the taps of the weight must be uniformly strided, got strides {weight.stride()}")
    return so, si, sw


def _launch(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    y: Tensor,
    new_history: Tensor,
    depthwise: bool,
    padding_mode: str = "zeros",
) -> None:
    """Run the kernel, writing into ``y`` and ``new_history``; ``padding_mode`` zeros or replicate.

    Activations contiguous; the weight in any layout whose taps are uniformly strided (the
    standard one, as in TensorRT, or ``_packed`` with channels innermost).
    """
    b, c_in, t, h, w = x.shape
    c_out, _, kt, kh, kw = weight.shape
    cfg = launch_config(c_in, c_out, h * w, depthwise)
    grid = (triton.cdiv(h * w, cfg["BLOCK_HW"]), triton.cdiv(c_out, cfg["BLOCK_CO"]), b * t)
    _kernel()[grid](
        x,
        history,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        t,
        h,
        w,
        c_in,
        c_out,
        *_weight_strides(weight),
        y,
        new_history,
        KT=kt,
        KH=kh,
        KW=kw,
        DEPTHWISE=depthwise,
        HAS_BIAS=bias is not None,
        REPLICATE=padding_mode == "replicate",  # checked by ``_check``, as every caller does first
        DOT_PRECISION=_dot_precision(x),
        **cfg,
    )


def _dot_precision(x: Tensor) -> str:
    """IEEE for fp32 (TF32 miscompiled at some sizes: see the module's docstring); half operands
    ignore it."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


# Weights repacked with output channels innermost, so a program's weight tile for one tap is one
# coalesced block instead of a gather with a stride of kt*kh*kw. Packed once per parameter, and
# again when it changes (in place, or moved by ``module.to``); entries go with their weights.
_PACKED: dict[int, tuple[tuple, Tensor]] = {}


def _packed(weight: Tensor) -> Tensor:
    """``weight`` as a (C_out, C_in, kt, kh, kw) view of (kt, kh, kw, C_in, C_out) memory."""
    if weight.stride(0) == 1:
        return weight
    try:
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, weight.shape)
    except RuntimeError:  # inference tensors carry no version counter: pack without caching
        key = None
    hit = _PACKED.get(id(weight)) if key is not None else None
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        packed = weight.detach().permute(2, 3, 4, 1, 0).contiguous().permute(4, 3, 0, 1, 2)
    if key is not None:
        if hit is None:
            weakref.finalize(weight, _PACKED.pop, id(weight), None)
        _PACKED[id(weight)] = (key, packed)
    return packed


def streaming_causal_conv3d(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: tuple[int, int] | list[int],
    groups: int,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    """``(conv3d(cat(history, x)), cat(history, x)[:, :, -P:])`` in one Triton launch.

    ``x`` (B, C, T, H, W), ``history`` (B, C, P = kt - 1, H, W), ``weight`` (C_out, C/groups, kt,
    kh, kw), ``bias`` (C_out,) or None; ``padding`` = (kh // 2, kw // 2), zeros or the edge values
    replicated (``padding_mode``, as ``blocks.streaming_conv3d``); ``groups`` 1 or C.
    Tensors on one CUDA device, or on the CPU under ``TRITON_INTERPRET=1``. Inference only: no
    autograd.
    """
    depthwise = _check(x, history, weight, bias, padding, groups, padding_mode)
    devices = {t.device for t in (x, history, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    x, history = x.contiguous(), history.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]))
    new_history = torch.empty_like(history, memory_format=torch.contiguous_format)
    _launch(x, history, _packed(weight), bias, y, new_history, depthwise, padding_mode)
    return y, new_history


reference_streaming_conv3d = streaming_conv3d  # the plain torch result: concatenate, conv3d, slice


# ---------------------------------------------------------------------------------------------
# The custom op: traceable, and the Triton kernel wherever the tensors live on CUDA.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("flashvaed::streaming_causal_conv3d", mutates_args=())
def streaming_causal_conv3d_op(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: list[int],
    groups: int,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    """``torch.ops.flashvaed.streaming_causal_conv3d``; this body is the CPU (any non-CUDA) path."""
    return reference_streaming_conv3d(x, history, weight, bias, padding, groups, padding_mode)


@streaming_causal_conv3d_op.register_kernel("cuda")
def _op_cuda(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: list[int],
    groups: int,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    if triton is None:
        return reference_streaming_conv3d(x, history, weight, bias, padding, groups, padding_mode)
    return streaming_causal_conv3d(x, history, weight, bias, padding, groups, padding_mode)


@streaming_causal_conv3d_op.register_fake
def _op_fake(
    x: Tensor,
    history: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    padding: list[int],
    groups: int,
    padding_mode: str = "zeros",
) -> tuple[Tensor, Tensor]:
    b, _, t, h, w = x.shape
    _, _, _, kh, kw = weight.shape
    ph, pw = padding
    y = x.new_empty((b, weight.shape[0], t, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1))
    return y, torch.empty_like(history, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for TensorRT.
# ---------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The scalar arguments of the ahead-of-time kernel, in PTX order (between the input and output
# pointers). SW_O is not among them: the AOT weight is packed, output channels innermost, and
# SW_O = 1 is compiled in, which lets Triton lay each tap's weight tile out with a warp's threads
# along output channels (coalesced); with SW_O a runtime value it puts them along input channels.
AOT_SCALARS = ("T", "H", "W", "C_IN", "C_OUT", "SW_I", "SW_T")


def aot_scalar_args(t: Any, h: Any, w: Any, c_in: int, c_out: int, depthwise: bool) -> tuple[Any, ...]:
    """Values of ``AOT_SCALARS`` for a packed weight: (kt, kh, kw, C_in/groups, C_out) memory.

    T, H and W may be symbolic (TensorRT shape expressions); the weight strides are numbers.
    """
    c_in_per_group = 1 if depthwise else c_in
    return (t, h, w, c_in, c_out, c_out, c_in_per_group * c_out)


def compile_for_tensorrt(
    dtype: torch.dtype,
    c_in: int,
    c_out: int,
    kernel_size: tuple[int, int, int],
    depthwise: bool,
    hw_hint: int,
    bias_dtype: torch.dtype | None = None,
    padding_mode: str = "zeros",
) -> tuple[str, str, dict[str, int]]:
    """Compile the kernel for the current CUDA device: ``(kernel name, PTX, launch config)``;
    ``padding_mode`` (zeros or replicate) is compiled in.

    The PTX takes (x, history, weight, bias, *AOT_SCALARS, y, new_history) (values from
    ``aot_scalar_args``), the weight packed as (kt, kh, kw, C_in/groups, C_out), the layout of
    plugin nodes' weights (``flashvaed.export.plugin_nodes``); ``hw_hint`` (H * W, or an upper
    bound) only picks the spatial block. The config holds the block sizes, ``num_warps`` and
    ``shared`` (dynamic shared memory bytes). Nothing is assumed about pointer alignment: TensorRT
    documents none for plugin tensors, so loads stay scalar (but coalesced).
    """
    require_triton()
    kt, kh, kw = kernel_size
    cfg = launch_config(c_in, c_out, hw_hint, depthwise)
    ty = _TRITON_TYPES[dtype]
    signature = {
        "x_ptr": f"*{ty}",
        "hist_ptr": f"*{ty}",
        "w_ptr": f"*{ty}",
        "bias_ptr": f"*{_TRITON_TYPES[bias_dtype or dtype]}",
        **dict.fromkeys(AOT_SCALARS, "i32"),
        "y_ptr": f"*{ty}",
        "new_hist_ptr": f"*{ty}",
    }
    constexprs = {
        "SW_O": 1,
        "KT": kt,
        "KH": kh,
        "KW": kw,
        "DEPTHWISE": depthwise,
        "HAS_BIAS": True,
        "REPLICATE": check_padding_mode(padding_mode) == "replicate",
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "BLOCK_CO": cfg["BLOCK_CO"],
        "BLOCK_CI": cfg["BLOCK_CI"],
        "BLOCK_HW": cfg["BLOCK_HW"],
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    fn = _jit(False)
    signature = {name: signature[name] for name in fn.arg_names}  # in the kernel's argument order
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=_target(), options={"num_warps": cfg["num_warps"]})
    if getattr(compiled.metadata, "global_scratch_size", 0):
        raise RuntimeError("the compiled kernel asks for global scratch memory, which TensorRT does not provide")
    return compiled.metadata.name, compiled.asm["ptx"], {**cfg, "shared": compiled.metadata.shared}


def _target() -> Any:
    """The CUDA device to compile for: the active one, or ``FLASHVAED_TRITON_TARGET`` (e.g. ``cuda:90``)."""
    spec = os.environ.get("FLASHVAED_TRITON_TARGET")
    if spec:
        from triton.backends.compiler import GPUTarget

        backend, arch = spec.split(":")
        return GPUTarget(backend, int(arch), 32)
    return triton.runtime.driver.active.get_current_target()
