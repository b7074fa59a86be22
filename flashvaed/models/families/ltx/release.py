"""The Flash-VAED release's LTX-Video student (``Flash_VAED_LTX.pth``) read as an LTX student.

Facts (the release's ``models/ltx/ltx_prune_1_4.py``; docs/official.md): the file is the state dict
of a diffusers-style ``AutoencoderKLLTXVideo`` for an LTX-Video 0.9.0 teacher: the teacher's whole
encoder, a decoder whose up blocks 2 and 3 are 1/4 of the teacher's width, ``latents_mean`` /
``latents_std`` and two extra statistics (``mean_of_means``, ``std_of_means``) its loader drops.
In the decoder, the mid block and up blocks 0 and 1 are depthwise-separable 3D convs that are
**causal** (the first frame replicated twice in front) with a bias on the depthwise conv; up block
2's resnets are the teacher's non-causal 3D convs and up block 3's per-frame 2D convs, both with a
forced shortcut (LayerNorm + 1x1 conv at equal widths); conv_in, the narrowing conv_in blocks, the
depth-to-space upsamplers and conv_out are as the teacher's. Norms are parameter-free.

Everything here is read from shapes: the teacher's configuration (the encoder's widths and block
counts, which are the teacher's; the decoder's block counts and upsamplers), then per flashvaed stage
the operator, width and shortcut of the student.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ....errors import CheckpointError
from ...layout import DecoderLayout, StageLayout
from ...released import (
    Source,
    comparable_stages,
    convert,
    fold_depthwise_bias,
    fold_depthwise_scale,
    tensor_shape,
)
from .config import LTXConfig, decoder_structure
from .config import teacher_layout as ltx_teacher_layout
from .keys import config_from_diffusers, decoder_names, encoder_names, rename_key

MARKER = r"decoder\.(mid_block|up_blocks\.\d+)\.resnets\.\d+\.conv1\.depthwise\.weight"
EXTRA_STATISTICS = ("mean_of_means", "std_of_means")


def _count(keys: set[str], prefix: str) -> int:
    """How many consecutive numbered children ``prefix.N`` the keys name."""
    found = {int(m[1]) for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"the blocks under {prefix} are not numbered 0..{len(found) - 1}")
    return len(found)


def teacher_config(tensors: Mapping[str, Tensor], where: str) -> LTXConfig:
    """The 0.9.0-style teacher the release's student was made for, from the file's shapes."""
    keys = set(tensors)
    if any(".time_embedder." in k or "scale_shift_table" in k or "per_channel_scale" in k for k in keys):
        raise CheckpointError(f"{where}: only 0.9.0-style released LTX students (no timestep conditioning) are read")
    conv_in = tensor_shape(tensors, "encoder.conv_in.conv.weight", 5, where)
    patch = math.isqrt(conv_in[1] // 3)
    if 3 * patch * patch != conv_in[1]:
        raise CheckpointError(f"{where}: encoder.conv_in reads {conv_in[1]} channels, not 3 x patch^2")
    downs = _count(keys, "encoder.down_blocks")
    if not 1 <= downs <= 8:
        raise CheckpointError(f"{where}: the encoder has {downs} down blocks")
    widths, layers, spatio = [], [], []
    for i in range(downs):
        p = f"encoder.down_blocks.{i}"
        widths.append(tensor_shape(tensors, f"{p}.resnets.0.conv1.conv.weight", 5, where)[0])
        layers.append(_count(keys, f"{p}.resnets"))
        spatio.append(f"{p}.downsamplers.0.conv.weight" in keys)
    layers.append(_count(keys, "encoder.mid_block.resnets"))
    latent = tensor_shape(tensors, "encoder.conv_out.conv.weight", 5, where)[0] - 1
    ups = _count(keys, "decoder.up_blocks")
    if ups != downs:
        raise CheckpointError(f"{where}: the decoder has {ups} up blocks, the encoder {downs} down blocks")
    dec_layers = [_count(keys, f"decoder.up_blocks.{i}.resnets") for i in range(ups)][::-1]
    dec_layers.append(_count(keys, "decoder.mid_block.resnets"))
    dec_spatio = [f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.weight" in keys for i in range(ups)][::-1]
    config = {  # as diffusers' config.json writes it; the teacher's decoder widths are its encoder's
        "latent_channels": latent,
        "patch_size": patch,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "spatio_temporal_scaling": spatio,
        "decoder_block_out_channels": widths,
        "decoder_layers_per_block": dec_layers,
        "decoder_spatio_temporal_scaling": dec_spatio,
    }
    fields = config_from_diffusers(config)
    stats = {}
    for name in ("latents_mean", "latents_std"):
        t = tensors.get(name)
        if t is None or tuple(t.shape) != (latent,) or not t.is_floating_point() or not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: {name} must hold {latent} finite values")
        stats[name] = tuple(float(v) for v in t.float())
    if any(v <= 0 for v in stats["latents_std"]):
        raise CheckpointError(f"{where}: latents_std must be positive")
    try:
        return LTXConfig(**fields, **stats)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: its shapes describe no LTX-Video VAE ({e})") from None


def _block_op(tensors: Mapping[str, Tensor], prefix: str, where: str) -> str:
    if f"{prefix}.conv1.depthwise.weight" in tensors:
        if f"{prefix}.conv1.conv.weight" in tensors:
            raise CheckpointError(f"{where} mixes the official and diffusers layouts ({prefix}.conv1)")
        return "dwsep3d"
    if f"{prefix}.conv1.conv.weight" in tensors:
        return "conv3d"
    if f"{prefix}.conv1.weight" in tensors:
        return "spatial2d"
    raise CheckpointError(f"{where} lacks the decoder tensor {prefix}.conv1.conv.weight")


def _block_width(tensors: Mapping[str, Tensor], prefix: str, op: str, where: str) -> int:
    if op == "dwsep3d":
        return tensor_shape(tensors, f"{prefix}.conv2.pointwise.weight", 5, where)[0]
    if op == "spatial2d":
        return tensor_shape(tensors, f"{prefix}.conv2.weight", 4, where)[0]
    return tensor_shape(tensors, f"{prefix}.conv2.conv.weight", 5, where)[0]


def student_layout(config: LTXConfig, tensors: Mapping[str, Tensor], where: str) -> DecoderLayout:
    """Per flashvaed stage, the operator, width, causality and shortcut the file's decoder has."""
    names = decoder_names(config, "diffusers")
    teacher = ltx_teacher_layout(config)
    stages = []
    for i, (structure, reference) in enumerate(
        zip(decoder_structure(config), [teacher.middle, *teacher.up], strict=True)
    ):
        ours = "middle" if i == 0 else f"up.{i - 1}"
        blocks = [f"decoder.{names[f'{ours}.blocks.{j}']}" for j in range(structure.layers)]
        ops = {_block_op(tensors, b, where) for b in blocks}
        if len(ops) != 1:
            raise CheckpointError(f"{where}: the blocks of stage {ours} mix operators ({', '.join(sorted(ops))})")
        op = ops.pop()
        width = _block_width(tensors, blocks[0], op, where)
        forced = [f"{b}.norm3.weight" in tensors for b in blocks]
        if any(forced) != all(forced):
            raise CheckpointError(f"{where}: only some blocks of stage {ours} have a shortcut")
        out = None
        if structure.upsample is not None:
            conv = tensor_shape(tensors, f"decoder.{names[f'{ours}.resample.conv']}.conv.conv.weight", 5, where)
            out = conv[0] // 8
        in_width = stages[-1].out_width if stages else width
        stages.append(
            StageLayout(
                op, in_width, width, (width,) * len(blocks), out, reference.temporal, all(forced), op == "dwsep3d"
            )
        )
    head = tensor_shape(tensors, "decoder.conv_out.conv.weight", 5, where)[0]
    try:
        return DecoderLayout(
            config.latent_channels, stages[0], tuple(stages[1:]), 0, 0, "conv3d", head, family="ltx"
        )  # fmt: skip
    except ValueError as e:
        raise CheckpointError(f"{where}: its shapes contradict each other ({e})") from None


def sources(model: Any, config: LTXConfig, layout: DecoderLayout) -> dict[str, Source]:
    """For every parameter of the student (built on the meta device), the file tensors it is made from."""
    tables = {"decoder": decoder_names(config, "diffusers"), "encoder": encoder_names(config, "diffusers")}
    ops = {"middle": layout.middle.op, **{f"up.{i}": st.op for i, st in enumerate(layout.up)}}
    state = model.state_dict()
    out: dict[str, Source] = {}
    for key, value in state.items():
        shape = tuple(value.shape)
        if key.endswith(".gamma"):  # our students' norm gains; the release's norms have none
            out[key] = Source.fill(1.0)
            continue
        m = re.fullmatch(r"decoder\.((?:middle|up\.\d+)\.blocks\.\d+)\.(conv[12]|shortcut)\.(.*)", key)
        if not m:  # conv_in, upsamplers, narrowing blocks, head, encoder: the diffusers names, unchanged
            out[key] = Source.same(rename_key(key, config, "diffusers", tables), shape)
            continue
        block, part, param = m[1], m[2], m[3]
        theirs = "decoder." + tables["decoder"][block]
        op = ops[block.split(".blocks.")[0]]
        name = "conv_shortcut" if part == "shortcut" else part
        if op == "conv3d":
            out[key] = Source.same(f"{theirs}.{name}.conv.{param}", shape)
        elif op == "spatial2d":
            out[key] = Source.same(
                f"{theirs}.{name}.{param}", shape[:-1] if part == "shortcut" and param == "weight" else shape
            )
        elif part != "shortcut" and param != "pointwise.bias":
            out[key] = Source.same(f"{theirs}.{name}.{param}", shape)
        elif part != "shortcut":  # the depthwise conv's bias, moved past the pointwise conv
            pw = tuple(state[key.removesuffix("bias") + "weight"].shape)
            keys = (
                f"{theirs}.{name}.pointwise.bias",
                f"{theirs}.{name}.pointwise.weight",
                f"{theirs}.{name}.depthwise.bias",
            )
            out[key] = Source(keys, (shape, pw, (pw[1],)), fold_depthwise_bias)
        else:  # a forced shortcut in a depthwise stage: 1x1x1 depthwise + pointwise, folded
            o, c = state[f"decoder.{block}.shortcut.weight"].shape[:2]
            dw, pw = f"{theirs}.{name}.depthwise", f"{theirs}.{name}.pointwise"
            if param == "weight":
                out[key] = Source(
                    (f"{pw}.weight", f"{dw}.weight"), ((o, c, 1, 1, 1), (c, 1, 1, 1, 1)), fold_depthwise_scale
                )
            else:
                keys = (f"{pw}.bias", f"{pw}.weight", f"{dw}.bias")
                out[key] = Source(keys, ((o,), (o, c, 1, 1, 1), (c,)), fold_depthwise_bias)
    return out


def read_student(family: Any, tensors: Mapping[str, Tensor], where: str) -> tuple[Any, dict[str, Tensor]]:
    from ...student import FlashStudent, StudentConfig

    config = teacher_config(tensors, where)
    layout = student_layout(config, tensors, where)
    spec = {"name": "official-ltx", "family": family.name, "source": "Flash-VAED release (official layout)"}
    student = StudentConfig(
        "official-ltx", layout, config, family=family.name, spec=spec,
        teacher_channels=comparable_stages(family, config, layout), encoder=True,
    )  # fmt: skip
    with torch.device("meta"):
        shadow = FlashStudent(student)
    targets = {k: tuple(v.shape) for k, v in shadow.state_dict().items()}
    z = config.latent_channels
    optional = {name: (z,) for name in EXTRA_STATISTICS}
    ours = convert(tensors, sources(shadow, config, layout), targets, where, optional, ("latents_mean", "latents_std"))
    return student, ours
