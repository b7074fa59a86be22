"""LTX-Video VAE configuration: the block lists as upstream configs write them, the released
architectures, and the decoder's stage structure and teacher layout derived from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ....errors import CheckpointError
from ...layout import DecoderLayout, StageLayout
from ..base import (
    check_int,
    checked_statistics,
    config_int,
)

NAME = "ltx"  # the family's name (``LTXFamily.name``)
MAX_WIDTH = 16384  # no released VAE comes near; an untrusted config asking for more is refused
MAX_LAYERS = 64  # res blocks per block, in either layout's config
MAX_BLOCKS = 64  # entries of an encoder or decoder block list

DECODER_KINDS = ("res_x", "res_x_y", "compress_all")
ENCODER_KINDS = ("res_x", "res_x_y", "compress_all", "compress_all_res", "compress_space_res", "compress_time_res")
# (time, space) stride of each encoder downsampler
ENCODER_STRIDES = {
    "compress_all": (2, 2),
    "compress_all_res": (2, 2),
    "compress_space_res": (1, 2),
    "compress_time_res": (2, 1),
}
# diffusers' downsample_type of each 0.9.5 encoder downsampler
DIFFUSERS_DOWNSAMPLE = {
    "compress_space_res": "spatial",
    "compress_time_res": "temporal",
    "compress_all_res": "spatiotemporal",
}
DOWNSAMPLE_FROM_DIFFUSERS = {v: k for k, v in DIFFUSERS_DOWNSAMPLE.items()}


@dataclass(frozen=True)
class Block:
    """One entry of an LTX block list, as upstream configs write it (``["res_x", {"num_layers": 4}]``)."""

    kind: str
    layers: int = 1  # res_x: residual blocks
    multiplier: int = 1  # res_x_y and compress_*: the width factor
    residual: bool = False  # decoder compress_all: the depth-to-space skip
    inject_noise: bool = False  # decoder res_x

    def to_item(self) -> list[Any]:
        if self.kind == "res_x":
            params: dict[str, Any] = {"num_layers": self.layers}
            if self.inject_noise:
                params["inject_noise"] = True
            return [self.kind, params]
        params = {"multiplier": self.multiplier}
        if self.residual:
            params["residual"] = True
        return [self.kind, params]

    @classmethod
    def from_item(cls, item: Any, side: str) -> Block:
        """A block list entry of an untrusted config, validated."""
        kinds = DECODER_KINDS if side == "decoder" else ENCODER_KINDS
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
            raise CheckpointError(f"{side} block {item!r} is not a [name, parameters] pair"[:200])
        kind, params = item
        if kind not in kinds:
            raise CheckpointError(f"{side} block {kind!r} is not supported (supported: {', '.join(kinds)})"[:200])
        if isinstance(params, bool) or not isinstance(params, (int, dict)):
            raise CheckpointError(
                f"{side} block {kind} has parameters {params!r}, expected a number or a mapping"[:200]
            )
        if isinstance(params, int):
            params = {"num_layers": params}
        known = {"num_layers", "multiplier", "residual", "inject_noise"}
        if set(params) - known:
            raise CheckpointError(f"{side} block {kind} has unsupported parameters {sorted(set(params) - known)}"[:200])
        default_multiplier = 1 if (kind == "compress_all") else 2
        layers = config_int(params, "num_layers", 1, 1, MAX_LAYERS)
        multiplier = config_int(params, "multiplier", default_multiplier, 1, 8)
        residual, noise = params.get("residual", False), params.get("inject_noise", False)
        if not isinstance(residual, bool) or not isinstance(noise, bool):
            raise CheckpointError(f"{side} block {kind}: residual and inject_noise must be true or false")
        if noise and (kind != "res_x" or side != "decoder"):
            raise CheckpointError(f"{side} block {kind}: noise injection is supported in decoder res_x blocks only")
        if residual and (kind != "compress_all" or side != "decoder"):
            raise CheckpointError(f"{side} block {kind}: 'residual' applies to decoder compress_all blocks only")
        if kind == "compress_all" and side == "encoder" and multiplier != 1:
            raise CheckpointError("encoder compress_all blocks keep their width (use compress_all_res)")
        return cls(kind, layers if kind == "res_x" else 1, multiplier if kind != "res_x" else 1, residual, noise)


V090_BLOCKS = (
    Block("res_x", 4), Block("compress_all"), Block("res_x_y", multiplier=2), Block("res_x", 3),
    Block("compress_all"), Block("res_x_y", multiplier=2), Block("res_x", 3), Block("compress_all"),
    Block("res_x", 3), Block("res_x", 4),
)  # fmt: skip
V091_DECODER = (
    Block("res_x", 5, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
    Block("res_x", 6, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
    Block("res_x", 7, inject_noise=True), Block("compress_all", residual=True, multiplier=2),
    Block("res_x", 8),
)  # fmt: skip
V095_ENCODER = (
    Block("res_x", 4), Block("compress_space_res", multiplier=2), Block("res_x", 6),
    Block("compress_time_res", multiplier=2), Block("res_x", 6), Block("compress_all_res", multiplier=2),
    Block("res_x", 2), Block("compress_all_res", multiplier=2), Block("res_x", 2),
)  # fmt: skip
V095_DECODER = (
    Block("res_x", 5), Block("compress_all", residual=True, multiplier=2), Block("res_x", 5),
    Block("compress_all", residual=True, multiplier=2), Block("res_x", 5),
    Block("compress_all", residual=True, multiplier=2), Block("res_x", 5),
)  # fmt: skip


@dataclass(frozen=True)
class LTXConfig:
    """Architecture of an LTX-Video VAE; the defaults are the released 0.9.0 one.

    Block lists are in upstream order (the decoder's runs reversed); ``released(generation)``
    gives the 0.9.1 and 0.9.5 ones. Statistics default to zero mean / unit std: real checkpoints
    carry their own (``per_channel_statistics``), read when they are loaded.
    """

    latent_channels: int = 128
    patch_size: int = 4
    encoder_base: int = 128
    decoder_base: int = 128
    encoder_blocks: tuple[Block, ...] = V090_BLOCKS
    decoder_blocks: tuple[Block, ...] = V090_BLOCKS
    timestep_conditioning: bool = False
    causal_decoder: bool = False
    spatial_padding_mode: str = "zeros"
    latents_mean: tuple[float, ...] = field(default=(0.0,) * 128)
    latents_std: tuple[float, ...] = field(default=(1.0,) * 128)
    scaling_factor: float = 1.0  # diffusion space: (mu - mean) * scaling_factor / std (1.0 in every release)

    def __post_init__(self) -> None:
        """Every field checked (ValueError naming it): configurations come from untrusted files."""
        check_int("latent_channels", self.latent_channels, 1, 4096)
        check_int("patch_size", self.patch_size, 1, 16)
        check_int("encoder_base", self.encoder_base, 1, MAX_WIDTH)
        check_int("decoder_base", self.decoder_base, 1, MAX_WIDTH)
        for name in ("encoder_blocks", "decoder_blocks"):
            blocks = getattr(self, name)
            if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, Block) for b in blocks):
                raise ValueError(f"{name} must be a list of blocks, got {blocks!r}"[:200])
            object.__setattr__(self, name, tuple(blocks))
        for name in ("timestep_conditioning", "causal_decoder"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}"[:200])
        sf = self.scaling_factor
        if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not 0 < sf < float("inf"):
            raise ValueError(f"scaling_factor must be a finite number > 0, got {sf!r}"[:200])
        object.__setattr__(self, "scaling_factor", float(sf))
        mean, std = checked_statistics(self.latents_mean, self.latents_std, self.latent_channels)
        object.__setattr__(self, "latents_mean", mean)
        object.__setattr__(self, "latents_std", std)
        if self.spatial_padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown spatial_padding_mode {self.spatial_padding_mode!r}"[:200])
        width = self.encoder_base
        for b in self.encoder_blocks:
            width *= b.multiplier if b.kind != "res_x" else 1
        if max(width, self.decoder_top_width) > MAX_WIDTH:
            raise ValueError(f"the block lists widen the network past {MAX_WIDTH} channels")
        run = self.decoder_run
        if not run or run[0].kind != "res_x" or run[-1].kind != "res_x":
            raise ValueError("the decoder must start and end with res_x blocks (in running order)")
        if any(b.kind == "res_x_y" and b.multiplier < 2 for b in run):
            raise ValueError("decoder res_x_y blocks must narrow the width (multiplier >= 2)")
        for b in run:
            if b.kind == "compress_all" and b.residual and (8 % b.multiplier):
                raise ValueError("a residual compress_all's multiplier must divide 8")
        t_enc = s_enc = 0
        for b in self.encoder_blocks:
            if b.kind in ENCODER_STRIDES:
                t, s = ENCODER_STRIDES[b.kind]
                t_enc, s_enc = t_enc + (t == 2), s_enc + (s == 2)
        ups = sum(b.kind == "compress_all" for b in run)
        if self.encoder_blocks and (t_enc, s_enc) != (ups, ups):
            raise ValueError(
                f"the encoder compresses 2^{t_enc} in time and 2^{s_enc} in space, the decoder expands 2^{ups}"
            )

    @classmethod
    def released(cls, generation: str, **overrides: Any) -> LTXConfig:
        """The released architecture of ``generation`` (0.9.0, 0.9.1, 0.9.5; 0.9.7 is 0.9.5's)."""
        generation = "0.9.5" if generation == "0.9.7" else generation
        if generation == "0.9.0":
            base: dict[str, Any] = {}
        elif generation == "0.9.1":
            base = {"decoder_blocks": V091_DECODER, "timestep_conditioning": True}
        elif generation == "0.9.5":
            base = {"encoder_blocks": V095_ENCODER, "decoder_blocks": V095_DECODER, "timestep_conditioning": True}
        else:
            raise ValueError(f"unknown LTX-Video generation {generation!r} (0.9.0, 0.9.1, 0.9.5, 0.9.7)")
        return cls(**{**base, **overrides})

    @property
    def decoder_run(self) -> tuple[Block, ...]:
        """The decoder's blocks in the order they run."""
        return self.decoder_blocks[::-1]

    @property
    def generation(self) -> str:
        if not self.timestep_conditioning:
            return "0.9.0"
        if any(b.inject_noise for b in self.decoder_blocks):
            return "0.9.1"
        return "0.9.5"

    @property
    def noise_injection(self) -> bool:
        return any(b.inject_noise for b in self.decoder_blocks)

    @property
    def decoder_top_width(self) -> int:
        width = self.decoder_base
        for b in self.decoder_blocks:
            if b.kind in ("res_x_y", "compress_all"):
                width *= b.multiplier
        return width

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(b.kind == "compress_all" for b in self.decoder_blocks)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * self.temporal_factor

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent_channels": self.latent_channels,
            "patch_size": self.patch_size,
            "encoder_base": self.encoder_base,
            "decoder_base": self.decoder_base,
            "encoder_blocks": [b.to_item() for b in self.encoder_blocks],
            "decoder_blocks": [b.to_item() for b in self.decoder_blocks],
            "timestep_conditioning": self.timestep_conditioning,
            "causal_decoder": self.causal_decoder,
            "spatial_padding_mode": self.spatial_padding_mode,
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
            **({"scaling_factor": self.scaling_factor} if self.scaling_factor != 1.0 else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LTXConfig:
        d = dict(d)
        for side in ("encoder", "decoder"):
            items = d.get(f"{side}_blocks", ())
            if not isinstance(items, (list, tuple)) or len(items) > MAX_BLOCKS:
                raise ValueError(f"{side}_blocks must be a list of up to {MAX_BLOCKS} [name, parameters] blocks")
            d[f"{side}_blocks"] = tuple(Block.from_item(b, side) for b in items)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class StageStructure:
    """What a decoder stage is made of beyond its widths (the teacher's, shared by its students).

    ``groups``: (original block index, residual blocks, noise) of each res_x block; ``narrow``:
    (index, multiplier) of a res_x_y that narrows the width before the upsampler; ``upsample``:
    (index, residual, multiplier) of the depth-to-space upsampler.
    """

    groups: tuple[tuple[int, int, bool], ...]
    narrow: tuple[int, int] | None = None
    upsample: tuple[int, bool, int] | None = None

    @property
    def layers(self) -> int:
        return sum(n for _, n, _ in self.groups)


def decoder_structure(config: LTXConfig) -> list[StageStructure]:
    """Stages in running order: consecutive res_x blocks, then the transitions that follow them."""
    stages: list[dict[str, Any]] = []
    for index, block in enumerate(config.decoder_run):
        if block.kind == "res_x":
            if not stages or stages[-1]["narrow"] or stages[-1]["upsample"]:
                stages.append({"groups": [], "narrow": None, "upsample": None})
            stages[-1]["groups"].append((index, block.layers, block.inject_noise))
        elif block.kind == "res_x_y":
            if stages[-1]["narrow"] or stages[-1]["upsample"]:
                raise CheckpointError("unsupported LTX decoder: a res_x_y must directly follow res_x blocks")
            stages[-1]["narrow"] = (index, block.multiplier)
        else:
            if stages[-1]["upsample"]:
                raise CheckpointError("unsupported LTX decoder: two upsamplers without res_x blocks between them")
            stages[-1]["upsample"] = (index, block.residual, block.multiplier)
    if any(s["narrow"] and not s["upsample"] for s in stages):
        raise CheckpointError("unsupported LTX decoder: a res_x_y must be followed by a compress_all")
    return [StageStructure(tuple(s["groups"]), s["narrow"], s["upsample"]) for s in stages]


def teacher_layout(config: LTXConfig) -> DecoderLayout:
    """The teacher's stages: full widths; a stage's resample is its (narrow +) depth-to-space."""
    width = config.decoder_top_width
    op = "causal3d" if config.causal_decoder else "conv3d"
    stages = []
    for st in decoder_structure(config):
        out = None
        if st.narrow or st.upsample:
            out = width // (st.narrow[1] if st.narrow else 1) // (st.upsample[2] if st.upsample else 1)
        stages.append(StageLayout(op, width, width, (width,) * st.layers, out, temporal=st.upsample is not None))
        width = out or width
    spaces: dict[str, str] = {}
    for i, (name, st) in enumerate(zip(["middle"] + [f"up.{j}" for j in range(len(stages) - 1)], stages, strict=True)):
        spaces[f"{name}.in_width"] = spaces[f"{name}.width"] = f"s{i}"  # identity shortcuts throughout a stage
        if st.resample_width is not None:
            spaces[f"{name}.resample_width"] = f"s{i + 1}"
    out_channels = 3 * config.patch_size**2
    return DecoderLayout(
        config.latent_channels, stages[0], tuple(stages[1:]), 0, 0, op, out_channels, causal=config.causal_decoder,
        family=NAME, spaces=spaces,
    )  # fmt: skip
