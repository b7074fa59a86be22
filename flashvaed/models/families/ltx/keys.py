"""LTX-Video checkpoint layouts: parameter names in the original and diffusers layouts, and the
configuration read from (and written to) each layout's config."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ....errors import CheckpointError
from ..base import config_int, config_scale
from .config import (
    DIFFUSERS_DOWNSAMPLE,
    DOWNSAMPLE_FROM_DIFFUSERS,
    MAX_BLOCKS,
    MAX_LAYERS,
    Block,
    LTXConfig,
    decoder_structure,
)

STATISTICS = "per_channel_statistics."


def _res_param(rest: str, layout: str) -> str:
    """A residual block's parameter in ``layout`` (ours: conv1.weight, norm3.weight, shortcut.bias, noise1)."""
    head, _, tail = rest.partition(".")
    if head in ("conv1", "conv2"):
        return f"{head}.conv.{tail}"
    if head == "norm3":
        return f"norm3.norm.{tail}" if layout == "original" else f"norm3.{tail}"
    if head == "shortcut":
        return f"conv_shortcut.{tail}" if layout == "original" else f"conv_shortcut.conv.{tail}"
    if head in ("noise1", "noise2"):
        return f"per_channel_scale{head[-1]}"
    if head == "scale_shift_table":
        return head
    raise KeyError(rest)


def _embedder_param(rest: str) -> str:
    return f"time_embedder.timestep_embedder.{rest}"


def decoder_names(config: LTXConfig, layout: str) -> dict[str, str]:
    """Our module prefix -> its prefix in ``layout``, for the decoder's blocks."""
    run = config.decoder_run
    diffusers: dict[int, str] = {}
    block, has_res = -1, True
    for index, b in enumerate(run):
        if index == 0:
            diffusers[index] = "mid_block"
            continue
        if has_res:
            block, has_res = block + 1, False
        if b.kind == "res_x_y":
            diffusers[index] = f"up_blocks.{block}.conv_in"
        elif b.kind == "compress_all":
            diffusers[index] = f"up_blocks.{block}.upsamplers.0"
        else:
            diffusers[index], has_res = f"up_blocks.{block}", True
    names: dict[str, str] = {}

    def theirs(index: int) -> str:
        return f"up_blocks.{index}" if layout == "original" else diffusers[index]

    structure = decoder_structure(config)
    for i, st in enumerate(structure):
        ours = "middle" if i == 0 else f"up.{i - 1}"
        j = 0
        for g, (index, count, _) in enumerate(st.groups):
            group = theirs(index)
            res = f"{group}.res_blocks" if layout == "original" else f"{group}.resnets"
            for k in range(count):
                names[f"{ours}.blocks.{j + k}"] = f"{res}.{k}"
            names[f"{ours}.embedders.{g}"] = group
            j += count
        if st.narrow:
            names[f"{ours}.resample.narrow"] = theirs(st.narrow[0])
        if st.upsample:
            names[f"{ours}.resample.conv"] = theirs(st.upsample[0])
    return names


def diffusers_encoder_groups(blocks: Sequence[Block]) -> tuple[list[list[int]], int | None]:
    """diffusers' encoder structure over our block list: down blocks (indices of a res_x and the
    transitions after it) and the mid block (the index of the final res_x; ``None`` when the list
    ends with a transition: then that last group is a down block too, and the mid block is empty)."""
    groups: list[list[int]] = []
    for k, b in enumerate(blocks):
        if b.kind == "res_x" or not groups:
            groups.append([k])
        else:
            groups[-1].append(k)
    if groups and len(groups[-1]) == 1 and blocks[groups[-1][0]].kind == "res_x":
        return groups[:-1], groups[-1][0]
    return groups, None


def encoder_names(config: LTXConfig, layout: str) -> dict[str, str]:
    """Our encoder block prefix -> its prefix in ``layout``."""
    if layout == "original":
        names = {}
        for k, b in enumerate(config.encoder_blocks):
            names[f"blocks.{k}"] = f"down_blocks.{k}.res_blocks" if b.kind == "res_x" else f"down_blocks.{k}"
        return names
    blocks = config.encoder_blocks
    downs, mid = diffusers_encoder_groups(blocks)
    names = {} if mid is None else {f"blocks.{mid}": "mid_block.resnets"}
    for down, group in enumerate(downs):
        for k in group:
            kind = blocks[k].kind
            part = {"res_x": "resnets", "res_x_y": "conv_out"}.get(kind, "downsamplers.0")
            names[f"blocks.{k}"] = f"down_blocks.{down}.{part}"
    return names


def rename_key(key: str, config: LTXConfig, layout: str, tables: dict[str, dict[str, str]]) -> str:
    """Our parameter name -> its name in ``layout`` (without the original layout's ``vae.`` prefix)."""
    side, _, rest = key.partition(".")
    if side == "decoder":
        if rest.startswith("conv_in."):
            return f"decoder.conv_in.conv.{rest[8:]}"
        if rest == "timestep_scale_multiplier":
            return "decoder.timestep_scale_multiplier"
        if rest.startswith("head."):
            part = rest[5:]
            if part.startswith("conv."):
                return f"decoder.conv_out.conv.{part[5:]}"
            if part.startswith("embedder."):
                prefix = "last_time_embedder" if layout == "original" else "time_embedder"
                return f"decoder.{prefix}.timestep_embedder.{part[9:]}"
            if part == "scale_shift_table":
                return "decoder.last_scale_shift_table" if layout == "original" else "decoder.scale_shift_table"
        m = re.fullmatch(
            r"((?:middle|up\.\d+)\.(?:blocks\.\d+|embedders\.\d+|resample\.narrow|resample\.conv))\.(.*)", rest
        )
        if m:
            prefix, param = m[1], m[2]
            theirs = tables["decoder"][prefix]
            if ".embedders." in prefix:
                return f"decoder.{theirs}.{_embedder_param(param)}"
            if prefix.endswith("resample.conv"):
                return f"decoder.{theirs}.conv.conv.{param}"
            return f"decoder.{theirs}.{_res_param(param, layout)}"
    if side == "encoder":
        if rest.startswith("conv_in.") or rest.startswith("conv_out."):
            name, _, param = rest.partition(".")
            return f"encoder.{name}.conv.{param}"
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", rest)
        if m:
            k, param = int(m[1]), m[2]
            theirs = tables["encoder"][f"blocks.{k}"]
            kind = config.encoder_blocks[k].kind
            if kind == "res_x":
                j, _, p = param.removeprefix("blocks.").partition(".")
                return f"encoder.{theirs}.{j}.{_res_param(p, layout)}"
            if kind == "res_x_y":
                return f"encoder.{theirs}.{_res_param(param, layout)}"
            if kind == "compress_all":  # a plain causal conv: one .conv level
                return f"encoder.{theirs}.{param}"
            return f"encoder.{theirs}.conv.{param}"
    raise KeyError(f"no name for parameter {key}")


def statistics_keys(layout: str) -> dict[str, str]:
    """Statistic -> its tensor name: the latent mean and std a checkpoint carries beside its weights."""
    if layout == "original":
        return {"mean": f"vae.{STATISTICS}mean-of-means", "std": f"vae.{STATISTICS}std-of-means"}
    if layout == "diffusers":
        return {"mean": "latents_mean", "std": "latents_std"}
    return {}


def original_config(metadata: Mapping) -> dict:
    """The VAE config from an original single file's safetensors metadata (``config`` -> ``vae``)."""
    raw = metadata.get("config")
    if raw is None:
        return {}
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except (json.JSONDecodeError, RecursionError):  # RecursionError: arrays nested past Python's stack
        raise CheckpointError("the checkpoint's 'config' metadata is not valid JSON") from None
    vae = data.get("vae", data) if isinstance(data, dict) else None
    if not isinstance(vae, dict):
        raise CheckpointError("the checkpoint's 'config' metadata holds no VAE configuration")
    return vae


def _bool(config: Mapping, key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"config field {key}={value!r} must be true or false"[:200])
    return value


def _int_list(
    config: Mapping, key: str, default: Sequence[Any], kind: type = int, max_len: int = 8, hi: int = 1 << 16
) -> list[Any]:
    """A list field of an untrusted config; integers in [0, ``hi``] (block counts share the
    original layout's cap of 64 per block, so both layouts accept the same models)."""
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= max_len:
        raise CheckpointError(f"config field {key} must be a list of 1 to {max_len} entries, got {value!r}"[:200])
    for v in value:
        ok = isinstance(v, bool) if kind is bool else (isinstance(v, kind) and not isinstance(v, bool))
        if not ok:
            raise CheckpointError(f"config field {key} must hold {kind.__name__} values, got {value!r}"[:200])
        if kind is int and not 0 <= v <= hi:
            raise CheckpointError(f"config field {key} must hold integers in [0, {hi}], got {value!r}"[:200])
    return list(value)


def config_from_original(vae: Mapping) -> dict[str, Any]:
    """Our configuration fields from an upstream (``CausalVideoAutoencoder``) config."""
    cls = vae.get("_class_name", "CausalVideoAutoencoder")
    if cls != "CausalVideoAutoencoder":
        raise CheckpointError(f"the checkpoint's VAE is a {cls!r}, not an LTX-Video CausalVideoAutoencoder"[:200])
    if vae.get("dims", 3) not in (3, [2, 1], (2, 1)) or vae.get("dims", 3) != 3:
        raise CheckpointError(f"only 3D LTX-Video VAEs are supported (dims {vae.get('dims')!r})"[:200])
    if vae.get("norm_layer", "pixel_norm") != "pixel_norm":
        raise CheckpointError(
            f"only pixel_norm LTX-Video VAEs are supported (norm_layer {vae.get('norm_layer')!r})"[:200]
        )
    if vae.get("latent_log_var", "uniform") != "uniform" or vae.get("use_quant_conv", False):
        raise CheckpointError("only LTX-Video VAEs with latent_log_var 'uniform' and no quant conv are supported")
    if any(vae.get(k, 3) != 3 for k in ("in_channels", "out_channels")):
        raise CheckpointError("only RGB LTX-Video VAEs (in/out_channels 3) are supported")
    both = vae.get("blocks")
    enc, dec = vae.get("encoder_blocks", both), vae.get("decoder_blocks", both)
    for name, items in (("encoder_blocks", enc), ("decoder_blocks", dec)):
        if not isinstance(items, list) or not 0 < len(items) <= MAX_BLOCKS:
            raise CheckpointError(f"the VAE config's {name} must be a list of 1 to {MAX_BLOCKS} blocks")
    padding = vae.get("spatial_padding_mode", "zeros")
    if padding not in ("zeros", "reflect", "replicate", "circular"):
        raise CheckpointError(f"unknown spatial_padding_mode {padding!r}"[:200])
    return {
        "latent_channels": config_int(vae, "latent_channels", 128, 1, 4096),
        "patch_size": config_int(vae, "patch_size", 4, 1, 16),
        "encoder_base": config_int(vae, "encoder_base_channels", 128, 1, 8192),
        "decoder_base": config_int(vae, "decoder_base_channels", 128, 1, 8192),
        "encoder_blocks": tuple(Block.from_item(b, "encoder") for b in enc),
        "decoder_blocks": tuple(Block.from_item(b, "decoder") for b in dec),
        "timestep_conditioning": _bool(vae, "timestep_conditioning", False),
        "causal_decoder": _bool(vae, "causal_decoder", False),
        "spatial_padding_mode": padding,
        "scaling_factor": config_scale(vae),
    }


def config_from_diffusers(c: Mapping) -> dict[str, Any]:
    """Our configuration fields from an ``AutoencoderKLLTXVideo`` config.json."""
    boc = _int_list(c, "block_out_channels", (128, 256, 512, 512))
    layers = _int_list(c, "layers_per_block", (4, 3, 3, 3, 4), max_len=9, hi=MAX_LAYERS)
    spatio = _int_list(c, "spatio_temporal_scaling", (True, True, True, False), bool)
    types = c.get("down_block_types", ["LTXVideoDownBlock3D"] * len(boc))
    down_type = _int_list(c, "downsample_type", ("conv",) * len(boc), str)
    v095 = isinstance(types, list) and bool(types) and types[-1] == "LTXVideo095DownBlock3D"
    n = len(boc) - (1 if v095 else 0)
    if len(layers) != n + 1 or len(spatio) < n:
        raise CheckpointError("config.json: layers_per_block must have one entry per down block plus the mid block")
    enc: list[Block] = []
    width = boc[0]
    for i in range(n):
        out = boc[i + 1] if v095 else (boc[i + 1] if i + 1 < n else boc[i])
        enc.append(Block("res_x", layers[i]))
        if v095:
            if spatio[i]:
                kind = DOWNSAMPLE_FROM_DIFFUSERS.get(down_type[i])
                if kind is None or out % width:
                    raise CheckpointError(f"config.json: unsupported encoder downsampler {down_type[i]!r}"[:200])
                enc.append(Block(kind, multiplier=out // width))
                width = out
        else:
            if spatio[i]:
                enc.append(Block("compress_all"))
            if out != width:
                if out % width:
                    raise CheckpointError("config.json: encoder widths must grow by integer factors")
                enc.append(Block("res_x_y", multiplier=out // width))
                width = out
    if layers[-1]:  # an empty mid block: the encoder ends with its last down block's transitions
        enc.append(Block("res_x", layers[-1]))
    dboc = _int_list(c, "decoder_block_out_channels", (128, 256, 512, 512))[::-1]
    dlayers = _int_list(c, "decoder_layers_per_block", (4, 3, 3, 3, 4), max_len=9, hi=MAX_LAYERS)[::-1]
    dspatio = _int_list(c, "decoder_spatio_temporal_scaling", (True, True, True, False), bool)[::-1]
    noise = _int_list(c, "decoder_inject_noise", (False,) * (len(dboc) + 1), bool, max_len=9)[::-1]
    residual = _int_list(c, "upsample_residual", (False,) * len(dboc), bool)[::-1]
    factor = _int_list(c, "upsample_factor", (1,) * len(dboc), hi=8)[::-1]
    m = len(dboc)
    if len(dlayers) != m + 1 or len(noise) != m + 1 or len(dspatio) != m or len(residual) != m or len(factor) != m:
        raise CheckpointError("config.json: the decoder lists must have one entry per up block (layers: plus one)")
    run: list[Block] = [Block("res_x", dlayers[0], inject_noise=noise[0])]
    output = dboc[0]
    for i in range(m):
        if factor[i] < 1:
            raise CheckpointError("config.json: upsample_factor entries must be positive")
        inp, out = output // factor[i], dboc[i] // factor[i]
        if inp != out:
            if factor[i] != 1 or inp % out:
                raise CheckpointError("config.json: unsupported decoder up block (width change with channel reduction)")
            run.append(Block("res_x_y", multiplier=inp // out))
        if dspatio[i]:
            run.append(Block("compress_all", residual=residual[i], multiplier=factor[i]))
        run.append(Block("res_x", dlayers[i + 1], inject_noise=noise[i + 1]))
        output = out
    top = dboc[0]
    mult = 1
    for b in run:
        if b.kind in ("res_x_y", "compress_all"):
            mult *= b.multiplier
    if top % mult:
        raise CheckpointError("config.json: decoder widths do not follow from one base width")
    if c.get("patch_size_t", 1) != 1:
        raise CheckpointError("only LTX-Video VAEs with patch_size_t 1 are supported")
    if c.get("encoder_causal", True) is not True:
        raise CheckpointError("only LTX-Video VAEs with a causal encoder are supported")
    return {
        "latent_channels": config_int(c, "latent_channels", 128, 1, 4096),
        "patch_size": config_int(c, "patch_size", 4, 1, 16),
        "encoder_base": boc[0],
        "decoder_base": top // mult,
        "encoder_blocks": tuple(enc),
        "decoder_blocks": tuple(run[::-1]),
        "timestep_conditioning": _bool(c, "timestep_conditioning", False),
        "causal_decoder": _bool(c, "decoder_causal", False),
        "scaling_factor": config_scale(c),
    }


def diffusers_config(config: LTXConfig) -> dict[str, Any]:
    """config.json of the ``AutoencoderKLLTXVideo`` that holds ``config`` (refused if none can)."""
    unfit = CheckpointError(f"this LTX-Video architecture ({config.generation}) has no diffusers equivalent")
    if config.spatial_padding_mode != "zeros":  # diffusers' LTX convs pad with zeros, and its config has no key
        raise unfit
    blocks = config.encoder_blocks
    downs, mid = diffusers_encoder_groups(blocks)
    groups = [[blocks[k] for k in g] for g in downs]
    if any(g[0].kind != "res_x" for g in groups):
        raise unfit
    v095 = any(b.kind.endswith("_res") for b in blocks)
    width, inputs, outputs = config.encoder_base, [], []
    layers, spatio, down = [], [], []
    for g in groups:
        inputs.append(width)
        layers.append(g[0].layers)
        kinds = [b.kind for b in g[1:]]
        spatio.append(any(k.startswith("compress") for k in kinds))
        if v095:  # a 0.9.5 down block: resnets, then at most one space-to-depth downsampler
            if len(kinds) > 1 or any(k not in DIFFUSERS_DOWNSAMPLE for k in kinds):
                raise unfit
        elif kinds not in ([], ["compress_all"], ["res_x_y"], ["compress_all", "res_x_y"]):
            raise unfit
        for b in g[1:]:
            if b.kind == "res_x_y" or b.kind.endswith("_res"):
                width *= b.multiplier
        down.append(DIFFUSERS_DOWNSAMPLE[kinds[0]] if v095 and kinds else "conv")  # read where spatio is true
        outputs.append(width)
    layers.append(blocks[mid].layers if mid is not None else 0)  # the mid block (empty after a transition)
    if v095:
        boc = [config.encoder_base, *outputs]
    else:
        boc = inputs
        if outputs[-1] != inputs[-1] or any(o != i for o, i in zip(outputs[:-1], inputs[1:], strict=True)):
            raise unfit
    run = config.decoder_run
    dboc, dlayers, dspatio, residual, factor = [], [run[0].layers], [], [], []
    noise = [run[0].inject_noise]
    output, i = config.decoder_top_width, 1
    while i < len(run):
        narrow = run[i] if run[i].kind == "res_x_y" else None
        i += narrow is not None
        up = run[i] if run[i].kind == "compress_all" else None
        i += up is not None
        f = up.multiplier if up else 1
        if narrow is not None and (f != 1 or config.timestep_conditioning):
            # diffusers sizes an up block's timestep embedder by the block's input width, which its
            # resnets (at the narrowed width) cannot take: no released decoder narrows in a conditioned block
            raise unfit
        out = output // (narrow.multiplier if narrow else 1) // f
        dboc.append(out * f)
        dspatio.append(up is not None)
        residual.append(bool(up and up.residual))
        factor.append(f)
        dlayers.append(run[i].layers)
        noise.append(run[i].inject_noise)
        output, i = out, i + 1
    if dboc[0] != config.decoder_top_width:
        raise unfit
    return {
        "_class_name": "AutoencoderKLLTXVideo",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": config.latent_channels,
        "block_out_channels": boc,
        "down_block_types": ["LTXVideo095DownBlock3D" if v095 else "LTXVideoDownBlock3D"] * len(spatio),
        "layers_per_block": layers,
        "spatio_temporal_scaling": spatio,
        "downsample_type": down,
        "decoder_block_out_channels": dboc[::-1],
        "decoder_layers_per_block": dlayers[::-1],
        "decoder_spatio_temporal_scaling": dspatio[::-1],
        "decoder_inject_noise": noise[::-1],
        "upsample_residual": residual[::-1],
        "upsample_factor": factor[::-1],
        "timestep_conditioning": config.timestep_conditioning,
        "patch_size": config.patch_size,
        "patch_size_t": 1,
        "resnet_norm_eps": 1e-6,
        "scaling_factor": config.scaling_factor,
        "encoder_causal": True,
        "decoder_causal": config.causal_decoder,
    }
