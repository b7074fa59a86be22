"""The shared-code seams a new family plugs into without edits: operator kinds, pluggable norms and
convs, norms that declare how they prune, depth-to-space rows read from shapes, consumers on any
channel dim, the substitution protocol and its padding, integer temporal factors, and clip frame
defaults from the family.

A family defined only here (group norms, a linear depth-to-space upsampler tripling time) goes
through the real prune pipeline."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashvaed import api
from flashvaed.distill.config import DistillConfig
from flashvaed.distill.data import ClipDataset, ClipSpec
from flashvaed.errors import InputError
from flashvaed.models import StudentSpec, WanConfig, WanVAE, blocks, families
from flashvaed.models.blocks import (
    CausalConv3d,
    GroupNorm,
    Head,
    ResidualBlock,
    RMSNorm,
    Stage,
    Upsample,
    make_conv,
    register_op,
    unregister_op,
)
from flashvaed.models.checkpoint import load_student, save_student
from flashvaed.models.coupling import D2S_ROWS, ChannelFlow, Group, PrunableNorm
from flashvaed.models.families.wan21 import WanDecoder, WanFamily
from flashvaed.models.layout import DecoderLayout, StageLayout
from flashvaed.models.streaming import State, StreamingBlock
from flashvaed.models.student import STUDENT_VERSION, build_student
from flashvaed.models.vae import TeacherVAE
from flashvaed.prune.calibration import calibration_latents
from flashvaed.prune.groups import channel_graph
from flashvaed.prune.norms import input_channel_dim, norm_spec
from flashvaed.prune.pipeline import prune_teacher
from flashvaed.prune.substitute import _SpatialFit, padding_of, substitutable


# ---------------------------------------------------------------------------------------------
# 1. operator kinds are a registry
# ---------------------------------------------------------------------------------------------
class Recorded(StreamingBlock):
    """A test operator kind: a per-frame 1x1 conv that remembers the options it was built with."""

    def __init__(self, in_channels: int, out_channels: int, **options: object) -> None:
        super().__init__()
        self.options = options
        self.proj = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:
        return self.proj(x), ()


@pytest.fixture
def test_op():
    register_op("test_op", Recorded)
    yield "test_op"
    unregister_op("test_op")


def test_registered_operator_kind_builds_and_validates(test_op):
    assert test_op in blocks.OPS and {"causal3d", "dwsep3d", "spatial2d", "conv3d"} <= set(blocks.OPS)
    conv = make_conv(test_op, 4, 6, padding_mode="replicate", history="replicate")
    assert isinstance(conv, Recorded) and conv.options == {"padding_mode": "replicate", "history": "replicate"}
    # layouts accept it for a stage and for the head; a student spec names it
    st = StageLayout(test_op, 8, 8, (8,))
    layout = DecoderLayout(4, st, (StageLayout(test_op, 8, 8, (8,)),), 0, 0, head_op=test_op)
    assert DecoderLayout.from_dict(layout.to_dict()) == layout
    spec = StudentSpec.from_dict({"name": "s", "stages": {"up0": {"op": test_op}, "head": {"op": test_op}}})
    assert spec.stages["head"].op == test_op
    # residual blocks and heads build it through make_conv
    block = ResidualBlock(8, 8, op=test_op)
    y, state = block(torch.randn(1, 8, 2, 4, 4), ())
    assert y.shape == (1, 8, 2, 4, 4) and state == ()
    head = Head(8, 3, test_op, norm=None)
    assert head.norm is None and head(torch.randn(1, 8, 2, 4, 4), ())[0].shape == (1, 3, 2, 4, 4)


def test_registry_refuses_unknown_and_conflicting_kinds(test_op):
    with pytest.raises(ValueError, match="unknown operator 'nope'"):
        make_conv("nope", 4, 4)
    with pytest.raises(ValueError, match="unknown operator"):
        StageLayout("nope", 8, 8, (8,))
    with pytest.raises(ValueError, match="unknown head operator"):
        DecoderLayout(4, StageLayout("causal3d", 8, 8, (8,)), (StageLayout("causal3d", 8, 8, (8,)),), 0, 0, "nope")
    with pytest.raises(ValueError, match="already registered"):
        register_op(test_op, lambda i, o, **k: Recorded(i, o))
    register_op(test_op, Recorded)  # the same factory again: a no-op
    with pytest.raises(ValueError, match="lower-case identifier"):
        register_op("Bad Name", Recorded)
    with pytest.raises(ValueError, match="does not fit a causal decoder"):
        make_conv("conv3d", 4, 4)


def test_per_frame_conv_takes_a_history_option_it_has_no_use_for():
    conv = make_conv("spatial2d", 4, 4, history="zeros")
    assert conv(torch.randn(1, 4, 3, 5, 5))[0].shape == (1, 4, 3, 5, 5)


# ---------------------------------------------------------------------------------------------
# 2./3. pluggable norms and convs; norms declare how they prune
# ---------------------------------------------------------------------------------------------
def test_residual_block_takes_norm_and_conv_factories():
    built = []

    def conv(op: str, cin: int, cout: int) -> StreamingBlock:
        built.append((op, cin, cout))
        return make_conv(op, cin, cout)

    block = ResidualBlock(8, 12, hidden=4, norm=lambda c: GroupNorm(2, c), conv=conv)
    assert isinstance(block.norm1, GroupNorm) and block.norm2.num_channels == 4
    assert built == [("causal3d", 8, 4), ("causal3d", 4, 12)]
    # its channel flow reads the hidden width it was built with (a group norm has no gamma)
    graph = channel_graph(_Only(block))
    assert [(g.kind, g.size) for g in graph.groups] == [("input", 8), ("hidden", 4), ("stream", 12)]


class _Only(nn.Module):
    """A decoder of one block, for channel_graph."""

    def __init__(self, block: StreamingBlock) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(4, 8, 3)
        self.block = block

    def stages(self):
        return [("conv_in", 1, self.conv_in), ("block", 1, self.block)]


def test_group_norm_is_per_frame_and_declares_pruning():
    norm = GroupNorm(2, 8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 3, 5, 5)
    per_frame = torch.stack([F.group_norm(x[:, :, t], 2, norm.weight, norm.bias, norm.eps) for t in range(3)], 2)
    torch.testing.assert_close(norm(x), per_frame)
    assert isinstance(norm, PrunableNorm) and isinstance(RMSNorm(4), PrunableNorm)
    assert norm_spec(norm, "n").params == ("weight", "bias") and norm.pruned_scale(4, 8) == 1.0
    rms = norm_spec(RMSNorm(8), "r")
    assert rms.params == ("gamma",) and rms.kept_norm_share and math.isclose(rms.scale(2, 8), 2.0)
    assert norm_spec(nn.LayerNorm(8), "l").channel_dim == -1
    with pytest.raises(TypeError, match="x: Identity .* channel_params"):
        norm_spec(nn.Identity(), "x")


# ---------------------------------------------------------------------------------------------
# a family defined here: group norms, a linear depth-to-space upsampler (time x3, x2, x1)
# ---------------------------------------------------------------------------------------------
def group_norm(channels: int) -> nn.Module:
    return GroupNorm(2, channels)


class LinearDepthToSpace(StreamingBlock):
    """A plain ``nn.Linear`` over channel-last features to out * t * 2 * 2 channels, then depth to
    space: channel c fills rows 4t*c .. 4t*c + 4t - 1 (12 of them when t = 3)."""

    def __init__(self, dim: int, out_dim: int, temporal: int) -> None:
        super().__init__()
        self.t = temporal
        self.proj = nn.Linear(dim, out_dim * temporal * 4)

    def forward(self, x: Tensor, state: State = (), first: bool = False) -> tuple[Tensor, State]:
        y = self.proj(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        b, _, t, h, w = y.shape
        y = y.reshape(b, -1, self.t, 2, 2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, -1, t * self.t, 2 * h, 2 * w), ()

    def channel_flow(self, flow: ChannelFlow, path: str, stage: str, stream: Group) -> Group:
        flow.consume(stream, f"{path}.proj", stage)
        return flow.start("stream", self.proj.out_features // (4 * self.t), f"{path}.proj", D2S_ROWS)


class SeamDecoder(WanDecoder):
    def __init__(self, layout: DecoderLayout) -> None:
        nn.Module.__init__(self)
        self.layout = layout
        m = layout.middle
        self.conv_in = CausalConv3d(layout.z_dim, m.width, 3)
        blocks_ = [ResidualBlock(m.width, m.width, h, m.op, m.shortcut, norm=group_norm) for h in m.hidden]
        self.middle = Stage(blocks_)
        self.up = nn.ModuleList([self.up_stage(i, st) for i, st in enumerate(layout.up)])
        self.head = Head(layout.up[-1].width, layout.out_channels, layout.head_op, norm=group_norm)
        self.temporal_factor = math.prod(st.temporal for st in layout.up)
        self.spatial_factor = 2 ** sum(st.resample_width is not None for st in layout.up)

    def up_stage(self, index: int, st: StageLayout) -> StreamingBlock:
        blocks_ = [
            ResidualBlock(st.in_width if j == 0 else st.width, st.width, h, st.op, st.shortcut, norm=group_norm)
            for j, h in enumerate(st.hidden)
        ]
        resample = LinearDepthToSpace(st.width, st.resample_width, st.temporal) if st.resample_width else None
        return Stage(blocks_, resample)

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        y, state = super().forward(x, state, first)
        return (y[:, :, self.temporal_factor - 1 :] if first else y), state


class SeamConfig(WanConfig):
    pass


class SeamVAE(TeacherVAE):
    pass


class SeamFamily(WanFamily):
    name = "test-seams"
    title = "seam test VAE"
    config_type = SeamConfig
    teacher_type = SeamVAE
    clip_frames = 13
    official_layout = False

    def teacher_layout(self, config: WanConfig) -> DecoderLayout:
        t = super().teacher_layout(config)
        up = tuple(replace(st, temporal=f) for st, f in zip(t.up, (3, 2, 1, 1), strict=True))
        return replace(t, up=up, qk_dim=0, v_dim=0, family=self.name)

    def build_decoder(self, config: WanConfig, layout: DecoderLayout, student: bool = False) -> nn.Module:
        return SeamDecoder(layout)

    def detect(self, keys, tensors, config):  # never claims a checkpoint
        return []

    def layouts_present(self, keys):
        return {}


@pytest.fixture
def seam_teacher():
    family = families.register(SeamFamily())
    SeamVAE.family_def = family
    try:
        torch.manual_seed(0)
        config = SeamConfig(base_dim=8, z_dim=4, num_res_blocks=1, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
        teacher = SeamVAE(config).eval()
        with torch.no_grad():
            for m in teacher.decoder.modules():
                if isinstance(m, GroupNorm):
                    m.weight.normal_(1.0, 0.3)
                    m.bias.normal_(0.0, 0.3)
        yield teacher
    finally:
        families.FAMILIES.pop(SeamFamily.name, None)


def _spec(ops: dict[str, str] | None = None) -> StudentSpec:
    names = ("middle", "up0", "up1", "up2", "up3")
    return StudentSpec.from_dict(
        {"name": "half", "stages": {k: {"op": (ops or {}).get(k, "causal3d"), "width": 0.5} for k in names}}
    )


def test_teacher_layout_triples_time(seam_teacher):
    assert [st.temporal for st in seam_teacher.decoder.layout.up] == [3, 2, 1, 1]
    assert seam_teacher.temporal_factor == 6
    frames = seam_teacher.decode(torch.randn(1, 4, 3, 2, 2), chunk=1)
    assert frames.shape == (1, 3, 13, 16, 16)


def test_group_norm_family_prunes_with_twelve_rows_per_channel(seam_teacher):
    torch.manual_seed(1)
    latents = [torch.randn(1, 4, 3, 2, 2) for _ in range(2)]
    result = prune_teacher(seam_teacher, _spec(), latents, criterion="l1", chunk=1)
    teacher, pruned = seam_teacher.state_dict(), result.pruned.state_dict()
    d2s = next(d for d in result.decisions if ("decoder.up.0.resample.proj", D2S_ROWS) in d.group.producers)
    assert d2s.group.size == 16 and d2s.keep_count == 8
    keep = torch.tensor(d2s.selection.keep)
    rows = (keep[:, None] * 12 + torch.arange(12)).flatten()
    stream = next(d for d in result.decisions if "decoder.up.0.resample.proj" in d.group.consumers)
    cols = torch.tensor(stream.selection.keep)
    key = "decoder.up.0.resample.proj"
    assert pruned[f"{key}.weight"].shape == (8 * 12, len(cols))
    torch.testing.assert_close(pruned[f"{key}.weight"], teacher[f"{key}.weight"][rows][:, cols])
    torch.testing.assert_close(pruned[f"{key}.bias"], teacher[f"{key}.bias"][rows])
    # the group norms over the stream keep their weight and bias at the kept channels, unscaled
    for norm in stream.group.norms:
        for name in ("weight", "bias"):
            torch.testing.assert_close(pruned[f"{norm}.{name}"], teacher[f"{norm}.{name}"][cols])
    assert result.student.decode(latents[0], chunk=1).shape == (1, 3, 13, 16, 16)


def test_group_norm_family_prunes_by_independence_and_substitutes(seam_teacher):
    torch.manual_seed(2)
    latents = [torch.randn(1, 4, 3, 2, 2) for _ in range(2)]
    spec = _spec({"up1": "dwsep3d", "up3": "spatial2d"})
    result = prune_teacher(seam_teacher, spec, latents, chunk=1)
    for d in result.decisions:  # group norms keep their scale (no norm-share statistics for them)
        assert all(s == 1.0 for s in d.norm_scales.values())
    ops = {s.conv.split(".")[2]: s.op for s in result.substitutions}
    assert ops == {"1": "dwsep3d", "3": "spatial2d"}
    assert all(s.padding_mode == "zeros" for s in result.substitutions)
    assert math.isfinite(result.report["fidelity_vs_teacher_psnr_db"]["pruned"])
    # the linear layers' Gram matrices were taken over their (last) channel dim
    proj = seam_teacher.decoder.up[0].resample.proj
    assert input_channel_dim(proj) == -1


# ---------------------------------------------------------------------------------------------
# 5. consumers on any channel dim; the substitution protocol and its padding
# ---------------------------------------------------------------------------------------------
def test_input_channel_dim_rules():
    class ChannelFirstLinear(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return F.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)

    class Declared(nn.Module):
        input_channel_dim = 2

    assert input_channel_dim(nn.Linear(4, 4)) == -1
    assert input_channel_dim(ChannelFirstLinear(4, 4)) == 1
    assert input_channel_dim(nn.Conv3d(4, 4, 1)) == 1
    assert input_channel_dim(Declared()) == 2


class NotAConv3d(nn.Module):
    """A substitutable conv by protocol, not by class."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3, 3))
        self.bias = None
        self.current_tap = 1

    def kernel_input(self, args: tuple) -> Tensor:
        return args[0]


def test_substitutable_is_a_protocol():
    assert substitutable(CausalConv3d(4, 4, 3))
    assert substitutable(NotAConv3d())
    assert not substitutable(nn.Conv3d(4, 4, 3))  # no current tap, no kernel input
    assert not substitutable(CausalConv3d(4, 4, (3, 1, 1)))
    assert not substitutable(CausalConv3d(4, 4, 3, groups=4))
    assert padding_of(NotAConv3d()) == ("zeros", "zeros")
    assert padding_of(nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")) == ("replicate", None)


@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_spatial_fit_pads_as_the_conv_does(mode):
    torch.manual_seed(3)
    conv = CausalConv3d(3, 5, 3)
    conv.history_init = "replicate"
    with torch.no_grad():
        conv.weight[:, :, :2] = 0  # only the current tap: a per-frame conv exactly
    conv.padding_mode = mode
    x = torch.randn(2, 3, 4, 6, 6)
    frames = x.transpose(1, 2).flatten(0, 1)
    pad = (1, 1, 1, 1)
    padded = F.pad(frames, pad) if mode == "zeros" else F.pad(frames, pad, mode="replicate")
    y = F.conv2d(padded, conv.weight[:, :, 2].detach(), conv.bias.detach()).unflatten(0, (2, 4)).transpose(1, 2)
    fit = _SpatialFit(conv, torch.Generator().manual_seed(0))
    fit.observe(x, y)
    result = fit.result("conv")
    assert result.errors["current_tap"] < 1e-10
    assert (result.padding_mode, result.history) == (mode, "replicate")
    conv.padding_mode = "replicate" if mode == "zeros" else "zeros"  # the fit pads otherwise: it misses
    other = _SpatialFit(conv, torch.Generator().manual_seed(0))
    other.observe(x, y)
    assert other.result("conv").errors["current_tap"] > 1e-3


# ---------------------------------------------------------------------------------------------
# 6. temporal factors are integers; older booleans still load
# ---------------------------------------------------------------------------------------------
def test_stage_temporal_is_an_integer_factor():
    assert StageLayout("causal3d", 4, 4, (4,), 4, True).temporal == 2
    assert StageLayout("causal3d", 4, 4, (4,), 4, False).temporal == 1
    assert StageLayout("causal3d", 4, 4, (4,), 4, 3).temporal == 3
    for bad in (0, "2", 2.0):
        with pytest.raises(ValueError, match="temporal factor"):
            StageLayout("causal3d", 4, 4, (4,), 4, bad)
    st = StageLayout("causal3d", 8, 8, (8,), 8, 3)
    layout = DecoderLayout(4, StageLayout("causal3d", 8, 8, (8,)), (st, StageLayout("causal3d", 8, 8, (8,))), 0, 0)
    d = json.loads(json.dumps(layout.to_dict()))
    assert d["up"][0]["temporal"] == 3 and DecoderLayout.from_dict(d) == layout
    d["up"][0]["temporal"] = True  # as student format 2 wrote it
    assert DecoderLayout.from_dict(d).up[0].temporal == 2


def test_upsample_triples_time():
    up = Upsample(4, 4, 3)
    x = torch.randn(1, 4, 2, 3, 3)
    y, (history,) = up(x, (torch.zeros(1, 4, 2, 3, 3),))
    assert y.shape == (1, 4, 6, 6, 6) and up.time_conv.out_channels == 12 and history.shape[2] == 2
    assert Upsample(4, 4, True).factor == 2 and Upsample(4, 4, False).time_conv is None


def test_old_student_directory_with_boolean_temporal_loads(tmp_path):
    config = WanConfig(base_dim=4, z_dim=4, num_res_blocks=1, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    student, _ = build_student(StudentSpec.load("flash-wan2.1"), config)
    save_student(student, tmp_path / "s")
    path = tmp_path / "s" / "config.json"
    data = json.loads(path.read_text())
    assert data["version"] == STUDENT_VERSION == 4
    assert [st["temporal"] for st in data["layout"]["up"]] == [2, 2, 1, 1]
    data["version"] = 2
    for st in data["layout"]["up"]:
        st["temporal"] = st["temporal"] == 2
        assert (st.pop("resample_conv"), st.pop("resample_rank")) == ("conv", 1)  # version 4: older lack them
    path.write_text(json.dumps(data))
    loaded = load_student(tmp_path / "s")
    assert loaded.config.layout == student.config.layout
    assert loaded.temporal_factor == 4


# ---------------------------------------------------------------------------------------------
# 7. clip frame defaults come from the family
# ---------------------------------------------------------------------------------------------
def test_clip_frames_default_to_the_family(seam_teacher):
    assert families.get("wan2.1").clip_frames == 9 and SeamFamily.clip_frames == 13
    latents = calibration_latents("synthetic", seam_teacher, clips=1, size=16)
    assert latents[0].shape[2] == 4  # 13 frames (6n+1), through the test family's borrowed 4x Wan encoder
    assert DistillConfig().clip_frames is None
    assert DistillConfig().for_family(SeamFamily).clip_frames == 13
    assert DistillConfig.from_dict({"clip_frames": 7}).for_family(SeamFamily).clip_frames == 7
    assert DistillConfig.from_dict({"clip_frames": None}).clip_frames is None
    for bad in ("9", 9.5, True):
        with pytest.raises(InputError, match="clip_frames"):
            DistillConfig.from_dict({"clip_frames": bad})
    data = ClipDataset(["synthetic"], seam_teacher, ClipSpec(size=16, synthetic_clips=1))
    assert data.spec.frames == 13
    wan = WanVAE(WanConfig(base_dim=4, z_dim=4, num_res_blocks=1, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4))
    assert ClipDataset(["synthetic"], wan, ClipSpec(size=16, synthetic_clips=1)).spec.frames == 9
    with pytest.raises(InputError, match="6n\\+1"):
        ClipDataset(["synthetic"], seam_teacher, ClipSpec(frames=9, size=16, synthetic_clips=1))


def test_library_and_cli_defaults_are_the_familys():
    import inspect
    import typing

    from flashvaed import cli

    assert inspect.signature(api.prune).parameters["calib_frames"].default is None
    assert inspect.signature(cli.prune).parameters["calib_frames"].default is None
    option = typing.get_type_hints(cli.prune, include_extras=True)["calib_frames"].__metadata__[0]
    assert "the family's" in option.help
