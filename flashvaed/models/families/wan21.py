"""The Wan2.1 VAE family: encoder, streaming decoder, latent statistics, checkpoint layouts.

Compression 4x in time and 8x8 in space. N latent frames decode to 1 + 4(N-1) frames; 4n+1
video frames encode to n+1 latent frames. Latents in diffusion space are normalised per channel,
``(mu - mean) / std``; the decoder de-normalises them first. Facts: ../shared/docs/wan-vae.md in
the planning repo; diffusers' ``AutoencoderKLWan`` is the test oracle.

The Wan2.2 family builds on the pieces here (config, encoder/decoder stage structure, key rules).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import CheckpointError
from ..blocks import (
    AttentionBlock,
    CausalConv3d,
    Downsample,
    Head,
    ResidualBlock,
    Stage,
    Upsample,
    to_channels_last,
)
from ..layout import DecoderLayout, StageLayout, channel_spaces
from ..released import tensor_shape
from ..streaming import State, StateSpec, StreamingBlock, run_blocks, zero_state
from ..vae import TeacherVAE
from .base import (
    Family,
    Match,
    any_key,
    check_int,
    check_sequence,
    checked_statistics,
    config_int,
    config_list,
    conv_shape,
    our_metadata,
    register,
    tiny_statistics,
)

# fmt: off
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# fmt: on
MAX_BASE_DIM = 8192  # far past any released width (96, 160, 256): a bound for configs read from files
MAX_Z_DIM = 4096


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan2.1-style VAE; ``base_dim`` 96 and ``z_dim`` 16 is the released one."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = field(default=WAN21_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=WAN21_LATENTS_STD)

    def __post_init__(self) -> None:
        """Every field checked (ValueError naming it): configurations come from untrusted files."""
        check_int("base_dim", self.base_dim, 1, MAX_BASE_DIM)
        if self.decoder_base_dim is not None:
            check_int("decoder_base_dim", self.decoder_base_dim, 1, MAX_BASE_DIM)
        check_int("z_dim", self.z_dim, 1, MAX_Z_DIM)
        check_int("num_res_blocks", self.num_res_blocks, 1, 8)
        object.__setattr__(self, "dim_mult", check_sequence("dim_mult", self.dim_mult, 6))
        for m in self.dim_mult:
            check_int("dim_mult entries", m, 1, 16)
        temporal = check_sequence("temporal_downsample", self.temporal_downsample, 5)
        if not all(isinstance(t, bool) for t in temporal):
            raise ValueError(f"temporal_downsample must hold true or false, got {list(temporal)!r}"[:200])
        object.__setattr__(self, "temporal_downsample", temporal)
        mean, std = checked_statistics(self.latents_mean, self.latents_std, self.z_dim)
        object.__setattr__(self, "latents_mean", mean)
        object.__setattr__(self, "latents_std", std)
        if self.decoder_base_dim == self.base_dim:  # one spelling per architecture: configs compare equal
            object.__setattr__(self, "decoder_base_dim", None)
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one entry per resampling stage")

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def decoder_widths(self) -> list[int]:
        """Widths of the middle and of each up stage, e.g. 384, 384, 384, 192, 96."""
        return [self.decoder_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return self.temporal_downsample[::-1]

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def teacher_layout(config: WanConfig) -> DecoderLayout:
    """The decoder layout of a Wan2.1-style VAE: causal 3D convs at full width everywhere."""
    widths = config.decoder_widths
    nrb = config.num_res_blocks
    last = len(config.dim_mult) - 1
    up = []
    for i, (in_dim, out_dim) in enumerate(itertools.pairwise(widths)):
        up.append(
            StageLayout(
                op="causal3d",
                in_width=in_dim // 2 if i > 0 else in_dim,  # the upsample convs halve the width
                width=out_dim,
                hidden=(out_dim,) * (nrb + 1),
                resample_width=out_dim // 2 if i < last else None,
                temporal=2 if i < last and config.temporal_upsample[i] else 1,
            )
        )
    middle = StageLayout("causal3d", widths[0], widths[0], (widths[0], widths[0]))
    spaces = channel_spaces(up, [False] * len(up))
    return DecoderLayout(
        config.z_dim, middle, tuple(up), qk_dim=widths[0], v_dim=widths[0], family=WanFamily.name, spaces=spaces
    )


class WanDecoder(nn.Module):
    """conv_in, middle (res, attention, res), up stages with resampling, head; built from a layout."""

    channels_last = True  # every stage's input channels-last in eager CPU steps (``forward``)

    def __init__(self, layout: DecoderLayout) -> None:
        super().__init__()
        self.layout = layout
        m = layout.middle
        self.conv_in = CausalConv3d(layout.z_dim, m.width, 3)
        self.middle = Stage(
            [
                ResidualBlock(m.width, m.width, m.hidden[0], m.op, m.shortcut),
                AttentionBlock(m.width, layout.qk_dim, layout.v_dim),
                ResidualBlock(m.width, m.width, m.hidden[1], m.op, m.shortcut),
            ]
        )
        self.up = nn.ModuleList([self.up_stage(i, st) for i, st in enumerate(layout.up)])
        self.head = Head(layout.up[-1].width, layout.out_channels, layout.head_op)
        self.temporal_factor = math.prod(st.temporal for st in layout.up)
        self.spatial_factor = 2 ** sum(st.resample_width is not None for st in layout.up)

    def up_stage(self, index: int, st: StageLayout) -> StreamingBlock:
        blocks = [
            ResidualBlock(st.in_width if j == 0 else st.width, st.width, hidden, st.op, st.shortcut)
            for j, hidden in enumerate(st.hidden)
        ]
        resample = None
        if st.resample_width:
            resample = Upsample(st.width, st.resample_width, st.temporal, st.resample_conv, st.resample_rank)
        return Stage(blocks, resample)

    def stages(self) -> list[tuple[str, Fraction, StreamingBlock]]:
        """Blocks in the order they run, with their names and spatial scale (latent grid = 1)."""
        items: list[tuple[str, Fraction, StreamingBlock]] = [
            ("conv_in", Fraction(1), self.conv_in),
            ("middle", Fraction(1), self.middle),
        ]
        scale = Fraction(1)
        for i, stage in enumerate(self.up):
            items.append((f"up.{i}", scale, stage))
            scale *= 2 if stage.resample is not None else 1
        items.append(("head", scale, self.head))
        return items

    def stage_ops(self) -> dict[str, str]:
        """The operator kind of each stage, for cost reports."""
        return {
            "conv_in": "causal3d",
            **{n: st.op for n, st in self.layout.stages.items()},
            "head": self.layout.head_op,
        }

    def state_specs(self) -> list[StateSpec]:
        return [s for name, scale, block in self.stages() for s in block.state_specs(name, scale)]

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        # every stage's input channels-last (eager CPU, see ``to_channels_last``: a no-op where it
        # already is), and the usual layout out
        x, state = run_blocks([block for _, _, block in self.stages()], x, state, first, to_channels_last)
        return x.contiguous(), state


class WanEncoder(nn.Module):
    """conv_in, down stages with resampling, middle (res, attention, res), head to 2*z_dim.

    It runs over chunks of 1, 4, 4, ... frames as the reference does (``iter_encode``).
    """

    def __init__(self, config: WanConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.temporal_factor = config.temporal_factor
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        last = len(config.dim_mult) - 1
        self.conv_in = CausalConv3d(in_channels, dims[0], 3)
        self.down = nn.ModuleList(
            [
                self.down_stage(i, in_dim, out_dim, config, i < last)
                for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims))
            ]
        )
        self.middle = Stage(
            [ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1])]
        )
        self.head = Head(dims[-1], 2 * config.z_dim)

    def down_stage(self, index: int, in_dim: int, out_dim: int, config: WanConfig, resample: bool) -> StreamingBlock:
        blocks = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(config.num_res_blocks)]
        return Stage(blocks, Downsample(out_dim, config.temporal_downsample[index]) if resample else None)

    def stages(self) -> list[tuple[str, Fraction, StreamingBlock]]:
        """Blocks in the order they run, with their names and spatial scale (input grid = 1)."""
        items: list[tuple[str, Fraction, StreamingBlock]] = [("conv_in", Fraction(1), self.conv_in)]
        items += [(f"down.{i}", Fraction(1, 2**i), stage) for i, stage in enumerate(self.down)]
        bottom = Fraction(1, 2 ** (len(self.down) - 1))
        items += [("middle", bottom, self.middle), ("head", bottom, self.head)]
        return items

    def state_specs(self) -> list[StateSpec]:
        return [s for name, scale, block in self.stages() for s in block.state_specs(name, scale)]

    def forward(self, x: Tensor, state: State, first: bool = False) -> tuple[Tensor, State]:
        return run_blocks([block for _, _, block in self.stages()], x, state, first)

    def iter_encode(self, video: Tensor) -> Iterator[Tensor]:
        """The encoder's output (B, 2z, 1, h, w) for each chunk of 1, then 4, 4, ... frames."""
        b, _, t, h, w = video.shape
        p = next(self.parameters())
        state = zero_state(self.state_specs(), b, h, w, dtype=p.dtype, device=p.device)
        tf = self.temporal_factor
        for start, stop in [(0, 1)] + [(s, s + tf) for s in range(1, t, tf)]:
            out, state = self(video[:, :, start:stop], state, first=start == 0)
            yield out


class WanVAE(TeacherVAE):
    """The Wan2.1 VAE: ``encode`` videos to diffusion-space latents, ``decode_step`` them back."""

    def __init__(self, config: WanConfig | None = None) -> None:
        super().__init__(config or WanConfig())


# ---------------------------------------------------------------------------------------------
# checkpoint layouts
# ---------------------------------------------------------------------------------------------
# Residual block parameter names: ours -> (original, diffusers)
_RESIDUAL = {
    "norm1": ("residual.0", "norm1"),
    "conv1": ("residual.2", "conv1"),
    "norm2": ("residual.3", "norm2"),
    "conv2": ("residual.6", "conv2"),
    "shortcut": ("shortcut", "conv_shortcut"),
}

Rule = tuple[str, Callable[[re.Match[str]], str]]


def residual_name(rest: str, layout: str) -> str:
    """A residual block's parameter ``rest`` (e.g. ``conv1.weight``) in ``layout``."""
    head, _, tail = rest.partition(".")
    return f"{_RESIDUAL[head][0 if layout == 'original' else 1]}.{tail}"


def resample_name(part: str) -> str:
    return "resample.1" if part == "conv" else "time_conv"


def common_rules(layout: str) -> list[Rule]:
    """Renaming rules shared by the Wan families: quant convs, conv_in, middle, head."""
    orig = layout == "original"
    return [
        (r"quant_conv\.(.*)", lambda m: f"conv1.{m[1]}" if orig else m[0]),
        (r"post_quant_conv\.(.*)", lambda m: f"conv2.{m[1]}" if orig else m[0]),
        (r"(encoder|decoder)\.conv_in\.(.*)", lambda m: f"{m[1]}.conv1.{m[2]}" if orig else m[0]),
        (
            r"(encoder|decoder)\.middle\.blocks\.([02])\.(.*)",
            lambda m: (
                f"{m[1]}.middle.{m[2]}.{residual_name(m[3], layout)}"
                if orig
                else f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.{residual_name(m[3], layout)}"
            ),
        ),
        (
            r"(encoder|decoder)\.middle\.blocks\.1\.(.*)",
            lambda m: f"{m[1]}.middle.1.{m[2]}" if orig else f"{m[1]}.mid_block.attentions.0.{m[2]}",
        ),
        (
            r"(encoder|decoder)\.head\.norm\.(.*)",
            lambda m: f"{m[1]}.head.0.{m[2]}" if orig else f"{m[1]}.norm_out.{m[2]}",
        ),
        (
            r"(encoder|decoder)\.head\.conv\.(.*)",
            lambda m: f"{m[1]}.head.2.{m[2]}" if orig else f"{m[1]}.conv_out.{m[2]}",
        ),
    ]


def rename(key: str, rules: list[Rule]) -> str:
    for pattern, to in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return to(m)
    raise KeyError(f"no name for parameter {key}")


def stage_rules(layout: str, nrb: int) -> list[Rule]:
    """Wan2.1's stages: flat lists in the original layout, nested decoder stages in diffusers."""
    orig = layout == "original"
    enc = "downsamples" if orig else "down_blocks"
    return [
        (
            r"encoder\.down\.(\d+)\.blocks\.(\d+)\.(.*)",
            lambda m: f"encoder.{enc}.{int(m[1]) * (nrb + 1) + int(m[2])}.{residual_name(m[3], layout)}",
        ),
        (
            r"encoder\.down\.(\d+)\.resample\.(conv|time_conv)\.(.*)",
            lambda m: f"encoder.{enc}.{int(m[1]) * (nrb + 1) + nrb}.{resample_name(m[2])}.{m[3]}",
        ),
        (
            r"decoder\.up\.(\d+)\.blocks\.(\d+)\.(.*)",
            lambda m: (
                f"decoder.upsamples.{int(m[1]) * (nrb + 2) + int(m[2])}.{residual_name(m[3], layout)}"
                if orig
                else f"decoder.up_blocks.{m[1]}.resnets.{m[2]}.{residual_name(m[3], layout)}"
            ),
        ),
        (
            r"decoder\.up\.(\d+)\.resample\.(conv|time_conv)\.(.*)",
            lambda m: (
                (
                    f"decoder.upsamples.{int(m[1]) * (nrb + 2) + nrb + 1}."
                    if orig
                    else f"decoder.up_blocks.{m[1]}.upsamplers.0."
                )
                + f"{resample_name(m[2])}.{m[3]}"
            ),
        ),
    ]


# ---------------------------------------------------------------------------------------------
# the Flash-VAED release's student (``Flash_VAED_Wan.pth``, its ``models/wan/model_hybrid_aggressive.py``)
# ---------------------------------------------------------------------------------------------
# Its blocks are named as in the original Wan2.1 file (``decoder.upsamples.N.residual.2``), but its
# depthwise-separable convs are ``depthwise_conv`` (with a bias) + ``pointwise_conv``, its
# width-changing 3D block's shortcut is a 1x1x1 depthwise + pointwise pair, and its per-frame 2D
# stages hold Conv2d kernels and (C, 1, 1) gains. The encoder is absent; ``conv1`` (the encoder's
# quant conv) may be present and is unused.
OFFICIAL_MARKER = r"decoder\.(middle|upsamples)\.\d+\.residual\.[26]\.depthwise_conv\.weight"


def _official_op(tensors: Mapping[str, Tensor], block: str, where: str) -> str:
    """The operator kind of a residual block of the release, from its first conv's tensors."""
    if f"{block}.residual.2.depthwise_conv.weight" in tensors:
        return "dwsep3d"
    key = f"{block}.residual.2.weight"
    if key not in tensors:
        raise CheckpointError(f"{where} lacks the decoder tensor {key}")
    dims = tensors[key].dim()
    if dims not in (4, 5):
        raise CheckpointError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, not a conv kernel")
    return "spatial2d" if dims == 4 else "causal3d"


def _official_widths(tensors: Mapping[str, Tensor], block: str, op: str, where: str) -> tuple[int, int, int]:
    """(input, hidden, output) widths of a residual block of the release."""

    def conv(i: int) -> tuple[int, int]:  # (out, in) of residual.i
        if op == "dwsep3d":
            dw = tensor_shape(tensors, f"{block}.residual.{i}.depthwise_conv.weight", 5, where)
            pw = tensor_shape(tensors, f"{block}.residual.{i}.pointwise_conv.weight", 5, where)
            return pw[0], dw[0]
        w = tensor_shape(tensors, f"{block}.residual.{i}.weight", 4 if op == "spatial2d" else 5, where)
        return w[0], w[1]

    hidden, inp = conv(2)
    out, _ = conv(6)
    return inp, hidden, out


def official_layout(family: WanFamily, tensors: Mapping[str, Tensor], where: str) -> tuple[WanConfig, DecoderLayout]:
    """The teacher configuration and the student layout a release-layout file describes."""
    conv_in = tensor_shape(tensors, "decoder.conv1.weight", 5, where)
    z_dim, top = conv_in[1], conv_in[0]
    mult = WanConfig().dim_mult
    if top % mult[-1]:
        raise CheckpointError(f"{where}: decoder.conv1 has {top} output channels, not a multiple of {mult[-1]}")
    indices = {int(k.split(".")[2]) for k in tensors if re.match(r"decoder\.upsamples\.\d+\.", k)}
    count = max(indices) + 1 if indices else 0
    nrb = (count + 1) // len(mult) - 2  # per stage nrb + 1 blocks and an upsampler, none after the last
    if count != len(mult) * (nrb + 2) - 1 or not 1 <= nrb <= 8 or indices != set(range(count)):
        raise CheckpointError(f"{where}: decoder.upsamples holds {count} blocks, not the Wan2.1 decoder's pattern")
    try:
        teacher = WanConfig(base_dim=top // mult[-1], z_dim=z_dim, num_res_blocks=nrb)
    except ValueError as e:
        if z_dim == WanConfig().z_dim:
            raise CheckpointError(f"{where}: its shapes describe no Wan2.1 decoder ({e})") from None
        raise CheckpointError(
            f"{where}: a Wan2.1 student with {z_dim} latent channels (the release's statistics are for 16)"
        ) from None
    t = teacher_layout(teacher)

    def stage(blocks: list[str], reference: StageLayout, resample: str | None) -> StageLayout:
        ops = {_official_op(tensors, b, where) for b in blocks}
        if len(ops) != 1:
            raise CheckpointError(f"{where}: the blocks of {blocks[0]}.. mix operators ({', '.join(sorted(ops))})")
        op = ops.pop()
        widths = [_official_widths(tensors, b, op, where) for b in blocks]
        shortcuts = [any(k.startswith(f"{b}.shortcut.") for k in tensors) for b in blocks]
        equal = [s for s, (i, _, o) in zip(shortcuts, widths, strict=True) if i == o]
        if op == "spatial2d" or (equal and all(equal)):
            forced = True
        elif any(equal):
            raise CheckpointError(f"{where}: some of the blocks of {blocks[0]}.. have a shortcut at equal widths")
        else:
            forced = False
        out = None
        if resample is not None:
            out = tensor_shape(tensors, f"{resample}.resample.1.weight", 4, where)[0]
        stage_width = widths[-1][2]
        return StageLayout(
            op, widths[0][0], stage_width, tuple(h for _, h, _ in widths), out, reference.temporal, forced
        )

    try:
        middle = stage(["decoder.middle.0", "decoder.middle.2"], t.middle, None)
        ups = []
        for i, ref in enumerate(t.up):
            first = i * (nrb + 2)
            blocks = [f"decoder.upsamples.{first + j}" for j in range(nrb + 1)]
            resample = f"decoder.upsamples.{first + nrb + 1}" if ref.resample_width is not None else None
            ups.append(stage(blocks, ref, resample))
        qkv = tensor_shape(tensors, "decoder.middle.1.to_qkv.weight", 4, where)[0]
        head_op = "dwsep3d" if "decoder.head.2.depthwise_conv.weight" in tensors else "causal3d"
        layout = DecoderLayout(z_dim, middle, tuple(ups), t.qk_dim, qkv - 2 * t.qk_dim, head_op, family=family.name)
    except ValueError as e:
        raise CheckpointError(f"{where}: its shapes contradict each other ({e})") from None
    return teacher, layout


def official_sources(model: nn.Module, layout: DecoderLayout, nrb: int, tensors: Mapping[str, Tensor]) -> dict:
    """For every parameter of the student ``model`` (built on the meta device), the file tensors it
    is made from (``released.Source``)."""
    from ..released import Source, fold_depthwise_bias, fold_depthwise_scale

    rules = common_rules("original") + stage_rules("original", nrb)
    ops = {"middle": layout.middle.op, **{f"up.{i}": st.op for i, st in enumerate(layout.up)}}
    sources = {}
    state = model.state_dict()
    for key, value in state.items():
        shape = tuple(value.shape)
        theirs = rename(key, rules).replace(".depthwise.", ".depthwise_conv.")
        theirs = theirs.replace(".pointwise.", ".pointwise_conv.")
        stage = re.match(r"decoder\.(middle|up\.\d+)\.", key)
        op = ops[stage[1]] if stage else None
        if key.endswith(".pointwise.bias"):  # the release's depthwise bias, moved past the pointwise conv
            weight = theirs.removesuffix("bias") + "weight"
            dw_bias = theirs.replace("pointwise_conv.bias", "depthwise_conv.bias")
            channels = state[key.removesuffix("pointwise.bias") + "depthwise.weight"].shape[0]
            pw_shape = tuple(state[key.removesuffix("bias") + "weight"].shape)
            sources[key] = Source((theirs, weight, dw_bias), (shape, pw_shape, (channels,)), fold_depthwise_bias)
        elif ".shortcut." in key and op == "dwsep3d":  # 1x1x1 depthwise + pointwise, folded into one conv
            base = theirs.rsplit(".", 1)[0]
            out_c, in_c = state[f"{key.rsplit('.', 1)[0]}.weight"].shape[:2]
            dw = (f"{base}.depthwise_conv.weight", (in_c, 1, 1, 1, 1))
            pw = (f"{base}.pointwise_conv.weight", (out_c, in_c, 1, 1, 1))
            if key.endswith("weight"):
                sources[key] = Source((pw[0], dw[0]), (pw[1], dw[1]), fold_depthwise_scale)
            else:
                keys = (f"{base}.pointwise_conv.bias", pw[0], f"{base}.depthwise_conv.bias")
                sources[key] = Source(keys, ((out_c,), pw[1], (in_c,)), fold_depthwise_bias)
        elif op == "spatial2d" and (key.endswith(".gamma") or ".shortcut.weight" in key):
            sources[key] = Source.same(theirs, shape[:-1] if key.endswith(".gamma") or shape[-3] == 1 else shape)
        else:
            sources[key] = Source.same(theirs, shape)
    return sources


def read_official_student(family: WanFamily, tensors: Mapping[str, Tensor], where: str) -> tuple[Any, dict]:
    from ..released import comparable_stages, convert
    from ..student import FlashStudent, StudentConfig

    teacher, layout = official_layout(family, tensors, where)
    spec = {"name": "official-wan2.1", "family": family.name, "source": "Flash-VAED release (official layout)"}
    channels = comparable_stages(family, teacher, layout)
    config = StudentConfig("official-wan2.1", layout, teacher, family=family.name, spec=spec, teacher_channels=channels)
    with torch.device("meta"):
        shadow = FlashStudent(config)
    targets = {k: tuple(v.shape) for k, v in shadow.state_dict().items()}
    sources = official_sources(shadow, layout, teacher.num_res_blocks, tensors)
    z2 = 2 * teacher.z_dim
    optional = {"conv1.weight": (z2, z2, 1, 1, 1), "conv1.bias": (z2,)}
    return config, convert(tensors, sources, targets, where, optional=optional)


LAYOUT_KEYS = {  # our name of a parameter every Wan checkpoint has -> its name per layout
    "original": ("decoder.conv1.weight", "encoder.conv1.weight", "decoder.head.2.weight"),
    "diffusers": ("decoder.conv_in.weight", "encoder.conv_in.weight", "decoder.conv_out.weight"),
    "flashvaed": ("decoder.conv_in.weight", "encoder.conv_in.weight", "decoder.head.conv.weight"),
}


class WanFamily(Family):
    name: ClassVar[str] = "wan2.1"
    title: ClassVar[str] = "Wan2.1 VAE"
    diffusers_vae: ClassVar[str] = "AutoencoderKLWan"
    pipelines: ClassVar[str] = "Wan pipelines (WanPipeline, WanImageToVideoPipeline)"
    pipeline_reads: ClassVar[tuple[str, ...]] = tuple(
        f"config.{k}" for k in ("scale_factor_temporal", "scale_factor_spatial", "latents_mean", "latents_std", "z_dim")
    )
    embedded_teacher: ClassVar[str | None] = "wan21-tiny.safetensors"
    order: ClassVar[int] = 10
    resample_convs: ClassVar[tuple[str, ...]] = ("conv", "dwsep", "lowrank")
    config_type: ClassVar[type] = WanConfig
    teacher_type: ClassVar[type] = WanVAE
    residual: ClassVar[bool] = False  # Wan2.2: residual up/down stages, patchified
    official_layout: ClassVar[bool] = True  # the Flash-VAED release has a student of this family
    # keys that tell this family's layouts apart from the other Wan family's
    original_marker: ClassVar[str] = r"decoder\.upsamples\.\d+\.(residual|resample|time_conv|shortcut)\..*"
    diffusers_marker: ClassVar[str] = r"decoder\.up_blocks\.\d+\.upsamplers\..*"

    def layouts_present(self, keys: Collection[str]) -> dict[str, str]:
        markers = {"original": "decoder.conv1.weight", "diffusers": "decoder.norm_out.gamma"}
        markers["flashvaed"] = "decoder.head.conv.weight"
        present = {layout: key for layout, key in markers.items() if key in keys}
        official = any_key(keys, OFFICIAL_MARKER) if self.official_layout else None
        if official and "original" in present:  # the release's student names its blocks as the original does
            del present["original"]
            present["official"] = official
        return present

    def detect(self, keys: Collection[str], tensors: Mapping[str, Tensor], config: Mapping) -> list[Match]:
        matches = []
        official = any_key(keys, OFFICIAL_MARKER) if self.official_layout else None
        if "decoder.conv1.weight" in keys and official:
            matches.append(Match(self, "official", official, student=True))
        elif "decoder.conv1.weight" in keys:
            evidence = any_key(keys, self.original_marker)
            if evidence:
                matches.append(Match(self, "original", evidence))
        if "decoder.conv_in.weight" in keys and "decoder.norm_out.gamma" in keys:
            evidence = any_key(keys, self.diffusers_marker)
            if evidence is None and config.get("is_residual") is self.residual:
                evidence = f"config.json: is_residual {str(self.residual).lower()}"
            if evidence:
                matches.append(Match(self, "diffusers", evidence))
        if "decoder.conv_in.weight" in keys and "decoder.head.conv.weight" in keys:
            family, _ = our_metadata(config)
            if family == self.name or (family is None and self.owns_head(tensors["decoder.head.conv.weight"])):
                matches.append(Match(self, "flashvaed", "decoder.head.conv.weight"))
        return matches

    def owns_head(self, head: Tensor) -> bool:
        """Our own layout without metadata: the head's output channels tell the patch size."""
        return head.dim() == 5 and head.shape[0] == 3

    def infer_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> WanConfig:
        if layout == "flashvaed":
            config = {**config, **our_metadata(config)[1]}
        dec_key, enc_key, _ = LAYOUT_KEYS[layout]
        dim_mult = config_list(config, "dim_mult", (1, 2, 4, 4), int, max_len=6)
        if any(not 1 <= m <= 16 for m in dim_mult):
            raise CheckpointError(f"config field dim_mult={list(dim_mult)} must hold integers in [1, 16]")
        dec = conv_shape(tensors, dec_key)
        z_dim, decoder_dim = dec[1], dec[0] // dim_mult[-1]
        base_dim = conv_shape(tensors, enc_key)[0] if enc_key in tensors else decoder_dim
        for key, value in (("z_dim", z_dim), ("base_dim", base_dim), ("decoder_base_dim", decoder_dim)):
            given = config.get(key)  # read from the shapes; a config that says otherwise lies
            if given is not None and (isinstance(given, bool) or given != value):
                shown = repr(given)[:60]
                raise CheckpointError(f"config field {key}={shown} contradicts the checkpoint's shapes ({value})")
        nrb = config_int(config, "num_res_blocks", 2, 1, 8)
        temporal = config_list(
            config, "temperal_downsample", config_list(config, "temporal_downsample", (False, True, True), bool), bool
        )
        mean, std = self.latent_statistics(config, z_dim)
        try:
            return self.config_type(
                base_dim=base_dim,
                decoder_base_dim=decoder_dim if decoder_dim != base_dim else None,
                z_dim=z_dim,
                dim_mult=dim_mult,
                num_res_blocks=nrb,
                temporal_downsample=temporal,
                latents_mean=mean,
                latents_std=std,
                **self.extra_config(tensors, layout, config),
            )
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"inconsistent VAE configuration: {e}") from None

    def extra_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> dict[str, Any]:
        """Configuration fields a derived family adds, read from shapes or config."""
        return {}

    def latent_statistics(self, config: Mapping, z_dim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The config's statistics (both or neither: one alone would pair with the release's other),
        else the release's for its latent channels."""
        given = [k for k in ("latents_mean", "latents_std") if config.get(k) is not None]
        if len(given) == 1:
            other = "latents_std" if given[0] == "latents_mean" else "latents_mean"
            raise CheckpointError(f"config field {given[0]} is given without {other}")
        if given:
            try:
                return checked_statistics(config["latents_mean"], config["latents_std"], z_dim)
            except ValueError as e:
                raise CheckpointError(f"config field {e}") from None
        released = self.config_type()
        if z_dim == released.z_dim:
            return released.latents_mean, released.latents_std
        raise CheckpointError(
            f"latent statistics for z_dim={z_dim} are unknown ({self.title} has {released.z_dim} latent channels)"
        )

    def read_student(
        self, tensors: Mapping[str, Tensor], layout: str, config: Mapping, where: str
    ) -> tuple[Any, dict[str, Tensor]]:
        return read_official_student(self, tensors, where)  # the one student layout (see ``detect``)

    def key_names(self, model: nn.Module, layout: str) -> dict[str, str]:
        keys = model.state_dict()
        if layout == "flashvaed":
            return {k: k for k in keys}
        rules = common_rules(layout) + self.stage_rules(layout, model.config.num_res_blocks)
        return {k: rename(k, rules) for k in keys}

    def stage_rules(self, layout: str, nrb: int) -> list[Rule]:
        return stage_rules(layout, nrb)

    def diffusers_config(self, config: WanConfig) -> dict[str, Any]:
        return {
            "_class_name": self.diffusers_vae,
            "base_dim": config.base_dim,
            "decoder_base_dim": config.decoder_base_dim,
            "z_dim": config.z_dim,
            "dim_mult": list(config.dim_mult),
            "num_res_blocks": config.num_res_blocks,
            "attn_scales": [],
            "temperal_downsample": list(config.temporal_downsample),
            "dropout": 0.0,
            "latents_mean": list(config.latents_mean),
            "latents_std": list(config.latents_std),
        }

    def pipeline_fields(self, config: WanConfig, model: Any) -> dict[str, Any]:
        return {
            "scale_factor_temporal": config.temporal_factor,
            "scale_factor_spatial": config.spatial_factor,
            "latents_mean": list(config.latents_mean),
            "latents_std": list(config.latents_std),
            "z_dim": config.z_dim,
        }

    def describe(self, config: WanConfig) -> str:
        extra = f", decoder_base_dim {config.decoder_base_dim}" if config.decoder_base_dim else ""
        return f"base_dim {config.base_dim}{extra}, z_dim {config.z_dim}"

    def tiny_config(self) -> WanConfig:
        """Four stages at the width floor, one residual block each, attention in the middle."""
        return WanConfig(base_dim=4, z_dim=4, num_res_blocks=1, **tiny_statistics(4))

    def teacher_layout(self, config: WanConfig) -> DecoderLayout:
        return teacher_layout(config)

    def build_decoder(self, config: WanConfig, layout: DecoderLayout, student: bool = False) -> nn.Module:
        return WanDecoder(layout)

    def build_encoder(self, config: WanConfig) -> nn.Module:
        return WanEncoder(config)

    def build_post_quant_conv(self, config: WanConfig) -> nn.Module:
        return nn.Conv3d(config.z_dim, config.z_dim, 1)

    def build_quant_conv(self, config: WanConfig) -> nn.Module:
        return nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)


WAN21 = register(WanFamily())
WanVAE.family_def = WAN21
