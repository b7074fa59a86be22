"""The fast eager paths of the blocks (channels-last layout, one-pass norm, in-place SiLU and
residual add) give the plain ops' numbers, chunked and one-shot, and keep the layout they are given."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashvaed.models import StudentSpec, families
from flashvaed.models.blocks import (
    CausalConv3d,
    DepthwiseSeparableConv3d,
    GroupNorm,
    ResidualBlock,
    RMSNorm,
    Upsample,
    channels_to_frames,
    fold_time,
    is_channels_last,
    module_conv3d,
    plain_ops,
    settled,
    to_channels_last,
    upsample2x_conv3x3,
)
from flashvaed.models.streaming import StreamingDecoder
from flashvaed.models.student import build_student

CL3 = torch.channels_last_3d


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 4e-6) -> None:
    """Equal to float rounding: within ``tol`` of the reference's scale (two fp32 convs in another
    summation order differ by ~1e-6 of it)."""
    scale = want.abs().max().clamp_min(1e-30)
    assert (got - want).abs().max() <= tol * scale, float((got - want).abs().max() / scale)


class FloatOutputs(TorchDispatchMode):
    """Records the ops that make a float32 tensor of at least ``size`` elements (a copy of the input)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.ops = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.numel() >= self.size:
            self.ops.append(str(func))
        return out


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 24, 5, 12, 10)


def test_channels_last_is_a_view_of_frames(x):
    y = to_channels_last(x)
    assert is_channels_last(y) and torch.equal(y, x)
    frames = y.transpose(1, 2).reshape(-1, *y.shape[1:2], *y.shape[3:])  # fold_time
    assert frames.is_contiguous(memory_format=torch.channels_last)
    with plain_ops():
        assert to_channels_last(x) is x


@torch.inference_mode()
def test_rms_norm_one_pass_equals_plain(x):
    norm = RMSNorm(24)
    norm.gamma.data.uniform_(0.5, 1.5)
    with plain_ops():
        want = norm(x)
    close(norm(x), want, 1e-6)
    close(norm(to_channels_last(x)), want, 1e-6)
    assert is_channels_last(norm(to_channels_last(x)))
    zeros = torch.zeros(1, 24, 1, 2, 2)
    assert torch.equal(norm(zeros), zeros)  # a zero vector stays zero, as the clamp says


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_in_half_precision_takes_no_float32_copy(x, dtype):
    """Half types: the norm accumulates in float32 reading x once and writes x's dtype; against the
    plain ops (x upcast, squared, summed) every value is the same or a rounding step of the product
    away, which the gain scales (the two reciprocal square roots differ in float32's last bits), and
    nothing of x's size is float32."""
    norm = RMSNorm(24).to(dtype)
    norm.gamma.data.uniform_(0.5, 1.5)
    h = (x * 3).to(dtype)
    with plain_ops():
        want = norm(h).float()
    with FloatOutputs(h.numel()) as record:
        got = norm(h)
    assert got.dtype == dtype and record.ops == []
    step = 2 * torch.finfo(dtype).eps * want.abs()
    assert ((got.float() - want).abs() <= step).all()
    assert (got.float() == want).float().mean() > 0.99
    got = norm(to_channels_last(h))
    assert is_channels_last(got) and ((got.float() - want).abs() <= step).all()
    zeros = torch.zeros(1, 24, 1, 2, 2, dtype=dtype)
    assert torch.equal(norm(zeros), zeros)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_in_half_precision_takes_no_float32_copy(x, dtype):
    """Mochi's per-frame group norm: torch's kernel normalises half types itself (float32 statistics),
    the same values as the plain ops' float32 copy or a rounding step away."""
    norm = GroupNorm(4, 24).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.uniform_(-0.5, 0.5)
    h = (x * 3 + 1).to(dtype)
    with plain_ops():
        want = norm(h).float()
    with FloatOutputs(h.numel()) as record:
        got = norm(h)
    assert got.dtype == dtype and record.ops == []
    assert ((got.float() - want).abs() <= torch.finfo(dtype).eps * want.abs()).all()
    assert (got.float() == want).float().mean() > 0.99


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ltx_pixel_norm_in_half_precision_equals_plain(x, dtype):
    from flashvaed.models.families.ltx.blocks import pixel_norm

    h = (x * 3).to(dtype)
    with plain_ops():
        want = pixel_norm(h).float()
    got = pixel_norm(h)
    assert got.dtype == dtype and ((got.float() - want).abs() <= torch.finfo(dtype).eps * want.abs()).all()
    assert (got.float() == want).float().mean() > 0.99


@torch.inference_mode()
@pytest.mark.parametrize("op", ["causal3d", "dwsep3d", "spatial2d"])
def test_residual_block_channels_last_streaming_equals_plain(x, op):
    torch.manual_seed(1)
    block = ResidualBlock(24, 16, op=op).eval()
    n = block.num_states
    zero = tuple(torch.zeros(2, c, 2, 12, 10) for c in (24, 16)[:n])
    with plain_ops():
        want, want_state = block(x, zero)
        want_a, state_a = block(x[:, :, :2], zero)
        want_b, _ = block(x[:, :, 2:], state_a)
    got, got_state = block(to_channels_last(x), zero)
    assert is_channels_last(got)
    close(got, want)
    for g, w in zip(got_state, want_state, strict=True):
        assert is_channels_last(g) and w.is_contiguous()  # a state keeps its chunk's layout
        close(g, w)
    a, s = block(to_channels_last(x[:, :, :2]), zero)
    b, _ = block(to_channels_last(x[:, :, 2:]), s)
    close(torch.cat([a, b], dim=2), torch.cat([want_a, want_b], dim=2))
    close(torch.cat([a, b], dim=2), want)


@torch.inference_mode()
def test_small_convs_keep_the_layout():
    """torch runs tiny convs with a kernel whose output is contiguous: the blocks turn it back."""
    torch.manual_seed(2)
    conv, sep = CausalConv3d(4, 8, 3), DepthwiseSeparableConv3d(4, 8)
    x = to_channels_last(torch.randn(1, 4, 2, 3, 3))
    for block in (conv, sep):
        y, _ = block(x, (torch.zeros(1, 4, 2, 3, 3),))
        assert is_channels_last(y)
        with plain_ops():
            want, _ = block(x.contiguous(), (torch.zeros(1, 4, 2, 3, 3),))
        close(y, want)


@torch.inference_mode()
def test_temporal_upsample_channels_last_is_exact(x):
    y = to_channels_last(x[:, :, :, :6])
    want = channels_to_frames(x[:, :, :, :6].contiguous(), 3)
    got = channels_to_frames(y, 3)
    assert torch.equal(got, want) and is_channels_last(got)
    torch.manual_seed(3)
    up = Upsample(8, 4, temporal=3).eval()
    state = (torch.randn(2, 8, 2, 12, 10),)
    with plain_ops():
        want, want_state = up(x[:, :8], state)
    got, got_state = up(to_channels_last(x[:, :8]), state)
    close(got, want)
    close(got_state[0], want_state[0])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_conv_by_phases_equals_upsample_then_conv(layout):
    torch.manual_seed(5)
    x = torch.randn(3, 8, 5, 7).contiguous(memory_format=layout)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    want = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.inference_mode():
        got = upsample2x_conv3x3(x, conv.weight, conv.bias)
    assert got.is_contiguous(memory_format=layout)
    close(got, want.detach())


@pytest.fixture(scope="module")
def wan_models():
    torch.manual_seed(0)
    family = families.get("wan2.1")
    config = family.tiny_config()
    teacher = family.teacher_type(config).eval()
    student = build_student(StudentSpec.load("flash-wan2.1"), config)[0].eval()
    return {"teacher": teacher, "flash-wan2.1": student}


@pytest.mark.parametrize("name", ["teacher", "flash-wan2.1"])
def test_wan_decode_fast_equals_plain_chunked_and_one_shot(wan_models, name):
    model = wan_models[name]
    torch.manual_seed(4)
    latents = torch.randn(1, model.latent_channels, 4, 6, 5)
    with plain_ops():
        want = model.decode(latents)
    one_shot, chunked = model.decode(latents), model.decode(latents, chunk=1)
    assert one_shot.is_contiguous()  # the usual layout out
    close(one_shot, want, 1e-5)
    close(chunked, want, 1e-5)


def test_channels_last_is_a_per_device_switch():
    """Eager decoders run channels-last on the CPU only, unless a measurement turns it on for a
    device type (gpu_suite's "channels-last" mode); leaving the block restores the default."""
    from flashvaed.models.blocks import CHANNELS_LAST_DEVICES, channels_last_on, is_channels_last, to_channels_last

    x = torch.empty(1, 4, 2, 3, 5, device="meta")
    with torch.no_grad():
        assert not is_channels_last(to_channels_last(x))
        with channels_last_on("meta"):
            assert is_channels_last(to_channels_last(x))
        assert not is_channels_last(to_channels_last(x)) and CHANNELS_LAST_DEVICES == {"cpu"}
        with channels_last_on("cpu"):  # already on: stays on afterwards
            pass
        assert is_channels_last(to_channels_last(torch.zeros(1, 4, 2, 3, 5)))


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2", "ltx", "mochi"])
def test_half_precision_steps_move_less_than_the_plain_ops(family):
    """benchmarks/step_traffic.py on each family's tiny teacher in bf16 (meta device): a steady step's
    fast paths read and write less than its plain ops, the float32 copies of the norms being gone."""
    import importlib.util
    from pathlib import Path

    from flashvaed.models import families

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_traffic.py"
    spec = importlib.util.spec_from_file_location("step_traffic", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fam = families.get(family)
    with torch.device("meta"):
        model = fam.teacher_type(fam.tiny_config()).eval().to(torch.bfloat16)
    size = 4 * model.spatial_factor
    fast = script.step_traffic(model, size, size, 2, torch.bfloat16)
    with plain_ops():
        plain = script.step_traffic(model, size, size, 2, torch.bfloat16)
    assert 0 < sum(fast.bytes.values()) < 0.9 * sum(plain.bytes.values())
    assert fast.bytes["aten._to_copy.default"] < 0.5 * plain.bytes["aten._to_copy.default"]


def first_step_layouts(model) -> list[tuple[str, tuple[int, ...]]]:
    """The 5D outputs of the decoder's layers (modules with weights: not the parameter-free DupUp
    shortcuts, whose output is added at once) in a stream's first step, one latent frame, that are
    not channels-last (a tensor of one channel or no frames has no layout to keep)."""
    found, handles = [], []
    for name, module in model.decoder.named_modules():
        if name and next(module.parameters(), None) is not None:

            def record(mod, args, out, name=name):
                for t in out if isinstance(out, tuple) else (out,):
                    if isinstance(t, torch.Tensor) and t.dim() == 5 and t.shape[1] > 1 and t.numel():
                        if not is_channels_last(t):
                            found.append((name, tuple(t.shape)))

            handles.append(module.register_forward_hook(record))
    try:
        StreamingDecoder(model).push(torch.randn(1, model.latent_channels, 1, 4, 4))
    finally:
        for h in handles:
            h.remove()
    return found


@pytest.mark.parametrize("family", ["wan2.1", "wan2.2", "ltx", "mochi"])
def test_a_first_step_keeps_the_decoders_layout(family):
    """One latent frame makes size-1 dims (a frame, a batch of one) whose strides torch's convs and
    ``cat`` misread as contiguous: every layer after one of them ran channels-first (flash-wan2.1's
    first chunk at 256x256 took 1.5x as long). Decoders that run channels-last (Wan's, Mochi's) keep every
    layer's output and the state so from the first step on; the others keep theirs contiguous. The
    frames are the plain ops' either way."""
    torch.manual_seed(6)
    fam = families.get(family)
    teacher = fam.teacher_type(fam.tiny_config()).eval()
    student = build_student(StudentSpec.load(f"flash-{family}"), teacher.config)[0].eval()
    for model in (teacher, student):
        assert model.channels_last == (family != "ltx")
        if model.channels_last:
            assert first_step_layouts(model) == []
        stream = StreamingDecoder(model)
        latents = torch.randn(1, model.latent_channels, 3, 4, 4)
        got = [stream.push(latents[:, :, :1])]
        states = [s for s in stream.state if s.dim() == 5 and s.shape[1] > 1]
        assert states and all(is_channels_last(s) == model.channels_last for s in states)
        got = torch.cat([*got, stream.push(latents[:, :, 1:]), stream.close()], dim=2)
        with plain_ops():
            plain = StreamingDecoder(model)
            want = torch.cat([plain.push(latents[:, :, :1]), plain.push(latents[:, :, 1:]), plain.close()], dim=2)
        close(got, want, 1e-5)


@torch.inference_mode()
def test_settled_gives_size_one_dims_torchs_strides_without_a_copy():
    x = torch.randn(1, 12, 1, 6, 5).contiguous(memory_format=CL3)
    odd = x.as_strided(x.shape, (12, 1, 12, 60, 12))  # what a fold, a reshape or oneDNN can leave
    assert odd.is_contiguous(memory_format=CL3) and odd.stride() != x.stride()
    for y, want in ((settled(odd), x.stride()), (settled(fold_time(x)), (360, 1, 60, 12))):
        assert y.stride() == want and y.data_ptr() == x.data_ptr()
    plain = torch.randn(1, 12, 1, 6, 5)
    assert settled(plain) is plain and settled(odd.transpose(3, 4)).stride() == odd.transpose(3, 4).stride()
    with plain_ops():  # the reference path keeps what it was given
        assert settled(odd) is odd


@pytest.mark.parametrize("history", ["zeros", "replicate"])
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("groups", [1, 8])
def test_a_first_frame_convolves_one_tap(history, padding_mode, groups):
    """A clip's first frame: after a zero history only the kernel's current tap reads anything,
    after a replicated one every tap reads the frame itself. Either way the fast path runs a third
    of the conv and gives the plain step's frame and new history (in the frame's layout)."""
    from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

    def onednn_flops(x_shape, w_shape, *_args, out_shape, **_kwargs) -> int:
        return conv_flop_count(x_shape, w_shape, out_shape)

    counts_onednn = {torch.ops.aten.mkldnn_convolution: onednn_flops}  # fast eager CPU convs go there
    torch.manual_seed(7)
    conv = CausalConv3d(8, 8, 3, groups=groups, padding_mode=padding_mode, history=history).eval()
    x, zeros = torch.randn(1, 8, 1, 9, 7), (torch.zeros(1, 8, 2, 9, 7),)
    with torch.inference_mode():
        counted = {}
        for mode in ("fast", "plain"):
            with (
                plain_ops() if mode == "plain" else contextlib.nullcontext(),
                FlopCounterMode(display=False, custom_mapping=counts_onednn) as c,
            ):
                counted[mode] = (conv(x, zeros, first=True), c.get_total_flops())
        (y, (h,)), fast = counted["fast"]
        (want, (want_h,)), plain = counted["plain"]
        assert 3 * fast == plain
        close(y, want, 1e-6)
        assert torch.equal(h, want_h)
        y_cl, (h_cl,) = conv(to_channels_last(x), zeros, first=True)  # a channels-last frame stays so
        assert is_channels_last(y_cl) and is_channels_last(h_cl)
        close(y_cl, want, 1e-6)
        assert torch.equal(h_cl, want_h)


class Ops(TorchDispatchMode):
    """Records the aten ops run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("stride", [1, 2])
def test_contiguous_convs_go_to_onednn_where_torchs_kernel_is_slow(padding_mode, stride):
    """torch sends a contiguous fp32 conv3d below ~20k rows of N*C*T*H to its own kernel (1.3-15x
    slower than oneDNN there: most of LTX's convs at 256x256). Such convs go to oneDNN and give
    torch's numbers; 1x1x1 convs and weights far larger than their input stay with torch, as does
    the reference path."""
    torch.manual_seed(8)
    conv = torch.nn.Conv3d(16, 24, 3, stride=stride, padding=(0, 1, 1), padding_mode=padding_mode).eval()
    heavy = torch.nn.Conv3d(256, 1024, 3, padding=(0, 1, 1)).eval()  # 7.1M weights for 3 x 2 x 2 positions
    pointwise = torch.nn.Conv3d(16, 24, 1).eval()
    x = torch.randn(1, 16, 6, 10, 12)
    assert 16 * 6 * 10 <= 20480  # below torch's threshold
    with torch.inference_mode():
        for module, arg, onednn in (
            (conv, x, True),
            (pointwise, x, False),
            (heavy, torch.randn(1, 256, 3, 2, 2), False),
        ):
            with Ops() as ops:
                y = module_conv3d(module, arg)
            assert ("aten.mkldnn_convolution.default" in ops.ops) == onednn, ops.ops
            assert y.is_contiguous()
            close(y, module(arg))
            with plain_ops(), Ops() as ops:
                close(module_conv3d(module, arg), module(arg))
            assert "aten.mkldnn_convolution.default" not in ops.ops
