"""The LTX-Video family: recognising its checkpoints, and building its teacher."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ....errors import CheckpointError
from ...layout import DecoderLayout
from ...vae import TeacherVAE
from ..base import (
    Family,
    Match,
    any_key,
    our_metadata,
    tiny_statistics,
)
from .config import NAME, LTXConfig, teacher_layout
from .decoder import LTXDecoder
from .encoder import LTXEncoder
from .keys import (
    STATISTICS,
    config_from_diffusers,
    config_from_original,
    decoder_names,
    diffusers_config,
    encoder_names,
    original_config,
    rename_key,
    statistics_keys,
)


class LTXVAE(TeacherVAE):
    """The LTX-Video VAE: ``encode`` videos to 128-channel latents, ``decode_step`` them back."""

    def __init__(self, config: LTXConfig | None = None) -> None:
        super().__init__(config or LTXConfig())


class LTXFamily(Family):
    name: ClassVar[str] = NAME
    title: ClassVar[str] = "LTX-Video VAE"
    diffusers_vae: ClassVar[str] = "AutoencoderKLLTXVideo"
    pipelines: ClassVar[str] = "LTX-Video pipelines (LTXPipeline, LTXImageToVideoPipeline)"
    pipeline_reads: ClassVar[tuple[str, ...]] = (
        "config.scaling_factor",
        "config.timestep_conditioning",
        "config.latent_channels",
        "temporal_compression_ratio",
    )
    embedded_teacher: ClassVar[str | None] = "ltx-tiny.safetensors"
    order: ClassVar[int] = 30
    config_type: ClassVar[type] = LTXConfig
    teacher_type: ClassVar[type] = LTXVAE
    default_resolution: ClassVar[tuple[int, int]] = (512, 768)
    ops: ClassVar[tuple[str, ...]] = ("conv3d", "causal3d", "dwsep3d", "spatial2d")

    markers: ClassVar[dict[str, str]] = {
        "original": "vae.decoder.conv_in.conv.weight",
        "diffusers": "decoder.conv_in.conv.weight",
        "flashvaed": "decoder.head.conv.weight",
    }

    def layouts_present(self, keys: Collection[str]) -> dict[str, str]:
        # our own layout is recognised by its metadata (``detect``), its names overlap the Wan families'
        return {layout: key for layout, key in self.markers.items() if key in keys and layout != "flashvaed"}

    def detect(self, keys: Collection[str], tensors: Mapping[str, Tensor], config: Mapping) -> list[Match]:
        matches = []
        if self.markers["original"] in keys:
            matches.append(Match(self, "original", self.markers["original"]))
        if self.markers["diffusers"] in keys:
            evidence = "decoder.mid_block.resnets.0.conv1.conv.weight"
            if evidence in keys:
                matches.append(Match(self, "diffusers", evidence))
        if "decoder.head.conv.weight" in keys and our_metadata(config)[0] == self.name:
            matches.append(Match(self, "flashvaed", "flashvaed.family metadata: ltx"))
        from .release import MARKER

        official = any_key(keys, MARKER)
        if official and "decoder.conv_in.conv.weight" in keys:  # the Flash-VAED release's student
            matches.append(Match(self, "official", official, student=True))
        return matches

    def read_student(
        self, tensors: Mapping[str, Tensor], layout: str, config: Mapping, where: str
    ) -> tuple[Any, dict[str, Tensor]]:
        from .release import read_student  # the one student layout: "official" (see ``detect``)

        return read_student(self, tensors, where)

    def config_tensor_keys(self, layout: str, keys: Collection[str]) -> set[str]:
        """Checkpoint tensors that hold configuration (statistics), read by ``infer_config``."""
        if layout == "original":
            return {k for k in keys if k.startswith(f"vae.{STATISTICS}") or not k.startswith("vae.")}
        return set(statistics_keys(layout).values()) & set(keys)

    def infer_config(self, tensors: Mapping[str, Tensor], layout: str, config: Mapping) -> LTXConfig:
        if layout == "flashvaed":
            _, ours = our_metadata(config)
            if not ours:
                raise CheckpointError(
                    "an LTX-Video checkpoint in flashvaed's layout needs its flashvaed.config metadata"
                )
            try:
                return LTXConfig.from_dict(ours)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"its flashvaed.config metadata is inconsistent: {e}") from None
        if layout == "original":
            vae = original_config(config)
            if not vae:
                raise CheckpointError(
                    "an LTX-Video single-file checkpoint needs its VAE configuration in the safetensors metadata "
                    "('config' -> 'vae')"
                )
            fields = config_from_original(vae)
        else:
            fields = config_from_diffusers(config)
        z = fields["latent_channels"]
        mean, std = [], []
        for name, key in statistics_keys(layout).items():
            t = tensors.get(key)
            if t is None:
                raise CheckpointError(f"the checkpoint lacks the latent statistics tensor {key}")
            if tuple(t.shape) != (z,) or not t.is_floating_point() or not torch.isfinite(t).all():
                raise CheckpointError(f"{key} must hold {z} finite values, got shape {tuple(t.shape)}")
            if name == "std" and (t <= 0).any():  # latents are divided by it
                raise CheckpointError(f"{key} must be positive, it holds {float(t.min())}")
            (mean if name == "mean" else std).extend(float(v) for v in t)
        try:
            return LTXConfig(**fields, latents_mean=tuple(mean), latents_std=tuple(std))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"inconsistent VAE configuration: {e}") from None

    def key_names(self, model: nn.Module, layout: str) -> dict[str, str]:
        keys = model.state_dict()
        if layout == "flashvaed":
            return {k: k for k in keys}
        config = model.config  # type: ignore[attr-defined]
        tables = {"decoder": decoder_names(config, layout), "encoder": encoder_names(config, layout)}
        prefix = "vae." if layout == "original" else ""
        return {k: prefix + rename_key(k, config, layout, tables) for k in keys}

    def config_tensors(self, config: LTXConfig, layout: str) -> dict[str, Tensor]:
        """The statistics tensors a checkpoint in ``layout`` carries."""
        keys = statistics_keys(layout)
        if not keys:
            return {}
        return {
            keys["mean"]: torch.tensor(config.latents_mean, dtype=torch.float32),
            keys["std"]: torch.tensor(config.latents_std, dtype=torch.float32),
        }

    def file_metadata(self, config: LTXConfig, layout: str) -> dict[str, str] | None:
        if layout != "original":
            return None
        vae = {
            "_class_name": "CausalVideoAutoencoder",
            "dims": 3,
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": config.latent_channels,
            "encoder_blocks": [b.to_item() for b in config.encoder_blocks],
            "decoder_blocks": [b.to_item() for b in config.decoder_blocks],
            "encoder_base_channels": config.encoder_base,
            "decoder_base_channels": config.decoder_base,
            "scaling_factor": config.scaling_factor,
            "norm_layer": "pixel_norm",
            "patch_size": config.patch_size,
            "latent_log_var": "uniform",
            "use_quant_conv": False,
            "causal_decoder": config.causal_decoder,
            "timestep_conditioning": config.timestep_conditioning,
            "spatial_padding_mode": config.spatial_padding_mode,
        }
        return {"config": json.dumps({"vae": vae})}

    def diffusers_config(self, config: LTXConfig) -> dict[str, Any]:
        return diffusers_config(config)

    def describe(self, config: LTXConfig) -> str:
        return (
            f"generation {config.generation}, decoder width {config.decoder_top_width}, "
            f"latent_channels {config.latent_channels}"
        )

    def tiny_config(self) -> LTXConfig:
        """0.9.1's decoder (timestep conditioning, noise injection, residual depth-to-space
        upsamplers) at widths 32/16/8/4 over an encoder of width 4 to 16, 8 latent channels."""
        fields = config_from_diffusers(
            {
                "latent_channels": 8,
                "block_out_channels": [4, 8, 16, 16],
                "layers_per_block": [1, 1, 1, 1, 1],
                "decoder_block_out_channels": [8, 16, 32],
                "decoder_layers_per_block": [1, 1, 1, 1],
                "decoder_spatio_temporal_scaling": [True, True, True],
                "decoder_inject_noise": [True, True, True, False],
                "upsample_residual": [True, True, True],
                "upsample_factor": [2, 2, 2],
                "timestep_conditioning": True,
            }
        )
        return LTXConfig(**fields, **tiny_statistics(8))

    def scaling_factor(self, config: LTXConfig) -> float:
        """``LTXPipeline`` de-normalises ``latents * latents_std / scaling_factor + latents_mean``."""
        return config.scaling_factor

    def pipeline_fields(self, config: LTXConfig, model: Any) -> dict[str, Any]:
        """The pipelines read the statistics as tensors (``FlashVAE.latents_mean``), not from config."""
        return {
            "scaling_factor": config.scaling_factor,
            "timestep_conditioning": "timestep" in model.step_inputs,
            "latent_channels": config.latent_channels,
        }

    def teacher_layout(self, config: LTXConfig) -> DecoderLayout:
        return teacher_layout(config)

    def upgrade_student_layout(self, layout: dict[str, Any], version: int) -> dict[str, Any]:
        """Before format 2 LTX decoders ignored ``shortcut`` (a spatial2d stage had it set but built none)."""
        if version >= 2:
            return layout
        stages = {k: {**layout[k], "shortcut": False} for k in ("middle",) if isinstance(layout.get(k), dict)}
        up = [{**st, "shortcut": False} if isinstance(st, dict) else st for st in layout.get("up", [])]
        return {**layout, **stages, "up": up}

    def build_decoder(self, config: LTXConfig, layout: DecoderLayout, student: bool = False) -> nn.Module:
        return LTXDecoder(config, layout, student)

    def build_encoder(self, config: LTXConfig) -> nn.Module:
        return LTXEncoder(config)
