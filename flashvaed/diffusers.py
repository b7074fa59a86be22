"""``FlashVAE``: any flashvaed model or engine as the ``vae`` of a diffusers pipeline.

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    pipe.vae = FlashVAE.from_pretrained("flash-wan21-engine/", teacher="Wan2.1_VAE.pth")

The pipelines of a family's VAE (``Family.pipelines``: ``WanPipeline``, ``LTXPipeline``, ...) read a
handful of facts from their VAE — config fields, compression ratios, latent statistics,
``device``/``dtype`` — and call ``decode(latents[, timestep])`` with *de-normalised* latents, and
``encode(image)`` for image-to-video. ``FlashVAE`` answers exactly those, as the family says
(``Family.pipeline_reads``/``pipeline_fields``), and refuses a pipeline of another family in one line.

Decoding streams chunk by chunk underneath (``Decoder.iter_decode``): memory stays flat in the
clip length, so ``enable_tiling``/``enable_slicing`` are accepted and change nothing. LTX-Video
0.9.1's noise injection is drawn from the global torch generator of the decoding device in the
order diffusers' ``AutoencoderKLLTXVideo`` draws it, so with the same ``torch.manual_seed`` the
drop-in over the teacher reproduces diffusers' frames.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import engines
from .devices import resolve_device, resolve_dtype
from .errors import CheckpointError, FlashVAEDError, InputError
from .models import families
from .models.checkpoint import load_teacher
from .models.streaming import check_latents
from .models.vae import LatentDecoder
from .safeload import check_stored

__all__ = ["EncoderMissingError", "FamilyMismatchError", "FlashVAE"]


class FamilyMismatchError(FlashVAEDError):
    """A pipeline of one family given a FlashVAE over a model of another."""


class EncoderMissingError(FlashVAEDError):
    """``encode`` on a FlashVAE whose model has no encoder and no teacher was given."""


def _check_read(family: str, name: str) -> None:
    """Refuse ``name`` ("config.FIELD" or an attribute) if only other families' pipelines read it."""
    ours = families.get(family)
    if name in ours.pipeline_reads:
        return
    theirs = [f.pipelines or f"{f.title} pipelines" for f in families.FAMILIES.values() if name in f.pipeline_reads]
    if theirs:
        raise FamilyMismatchError(
            f"this FlashVAE holds a {ours.title}; {' or '.join(dict.fromkeys(theirs))} need a VAE of their "
            f"family (they asked for {name})"
        )
    raise AttributeError(f"FlashVAE has no {name!r}")


class FlashVAEConfig(dict):
    """The config fields a family's pipelines read, with attribute access like diffusers' FrozenDict;
    a field only another family's pipelines read raises ``FamilyMismatchError``."""

    def __init__(self, family: str, fields: dict[str, Any]) -> None:
        super().__init__(fields)
        self._family = family

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        if name.startswith("_"):
            raise AttributeError(name)
        _check_read(self._family, f"config.{name}")
        raise AttributeError(f"FlashVAE config has no field {name!r}")


class FlashVAE(nn.Module):
    """A diffusers-compatible VAE over a flashvaed teacher, student, export or engine.

    ``enable_tiling()``/``enable_slicing()`` are accepted for compatibility and do nothing:
    decoding already streams chunk by chunk, so memory does not grow with the clip.
    """

    def __init__(
        self,
        decoder: engines.Decoder,
        family: str,
        latents_mean: Tensor,
        latents_std: Tensor,
        teacher: LatentDecoder | None = None,
        chunk: int | None = None,
        *,
        config: Any,
        scaling_factor: float = 1.0,
    ) -> None:
        """``config``: the teacher's configuration (the family's ``config_type``); ``scaling_factor``:
        the one ``decoder`` de-normalises with (``LatentDecoder.scaling_factor``)."""
        super().__init__()
        fam = families.get(family)
        if not fam.pipelines:
            raise FamilyMismatchError(f"no diffusers pipeline FlashVAE knows takes a {fam.title}")
        self.decoder = decoder
        self.family = family
        self.kind = fam.diffusers_vae  # the diffusers VAE it stands in for
        self.teacher = teacher  # a registered submodule: moved by .to(), found by offload hooks
        self.chunk = chunk
        self.scaling_factor = float(scaling_factor)
        z = decoder.latent_channels
        self.register_buffer("_mean", latents_mean.float().reshape(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("_std", latents_std.float().reshape(1, z, 1, 1, 1), persistent=False)
        self.config = FlashVAEConfig(family, fam.pipeline_fields(config, decoder))
        self.spatial_compression_ratio = decoder.spatial_factor

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        teacher: str | os.PathLike | LatentDecoder | None = None,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "float32",
        providers: list[str] | None = None,
        chunk: int | None = None,
    ) -> FlashVAE:
        """MODEL: a teacher checkpoint (any layout), a student, export or engine directory.

        ``teacher`` supplies ``encode`` (image-to-video pipelines) where MODEL has no encoder.
        ``device``/``dtype`` apply to torch models; engines take ``providers`` and run float32 I/O.
        """
        dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
        decoder = engines.load(model, device=dev, dtype=dt, providers=providers)
        if isinstance(decoder, engines.TorchDecoder):
            family, config = decoder.model.family, decoder.model.family_config
            mean, std = decoder.model.latents_mean, decoder.model.latents_std
            sf = decoder.model.scaling_factor
            if teacher is None and decoder.model.has_encoder:  # a teacher, or a student carrying its encoder
                teacher = decoder.model
        else:
            contract = decoder.contract  # type: ignore[attr-defined]
            family = contract.model["family"]
            config = _manifest_config(family, contract.model.get("config"), str(model))
            mean = torch.tensor(contract.model["latents_mean"])
            std = torch.tensor(contract.model["latents_std"])
            sf = contract.model.get("scaling_factor", 1.0)
        if teacher is not None and not isinstance(teacher, nn.Module):  # a path
            teacher = load_teacher(teacher).to(dev, dt)
        if teacher is not None and teacher.family != family:
            raise FamilyMismatchError(f"the teacher is a {teacher.family} VAE, the model is {family}")
        vae = cls(decoder, family, mean, std, teacher, chunk, config=config, scaling_factor=sf)
        if isinstance(decoder, engines.TorchDecoder):
            vae._device, vae._dtype = dev, dt
        return vae

    # --- what pipelines read -----------------------------------------------------------------
    _device: torch.device = torch.device("cpu")
    _dtype: torch.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def temporal_compression_ratio(self) -> int:
        """For families whose pipelines read it (``Family.pipeline_reads``); refused for the others."""
        _check_read(self.family, "temporal_compression_ratio")
        return self.decoder.temporal_factor

    @property
    def latents_mean(self) -> Tensor:
        """LTX pipelines read the statistics as (C,) tensors (Wan pipelines read ``config``)."""
        return self._mean.flatten()

    @property
    def latents_std(self) -> Tensor:
        return self._std.flatten()

    def to(self, *args: Any, **kwargs: Any) -> FlashVAE:
        """Moves a torch model and the teacher; engines keep running where they were built to."""
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
        super().to(*args, **kwargs)
        if isinstance(self.decoder, engines.TorchDecoder):
            self.decoder.model.to(device=device, dtype=dtype)
            if device is not None:
                self._device = torch.device(device)
            if dtype is not None:
                self._dtype = dtype
        return self

    # accepted for compatibility: streaming already bounds the memory of a decode
    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        """A no-op: FlashVAE streams chunk by chunk, so memory is flat without tiling."""

    def disable_tiling(self) -> None:
        """A no-op (see ``enable_tiling``)."""

    def enable_slicing(self) -> None:
        """A no-op: batch elements already share one streaming pass of bounded memory."""

    def disable_slicing(self) -> None:
        """A no-op (see ``enable_slicing``)."""

    def _offload_hook(self) -> None:
        """What diffusers' ``apply_forward_hook`` does: let model CPU offload move us first."""
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)

    # --- decode / encode ---------------------------------------------------------------------
    def decode(self, z: Tensor, temb: Tensor | None = None, return_dict: bool = True) -> Any:
        """Frames (B, 3, F, H, W) in [-1, 1] from de-normalised latents (what pipelines pass)."""
        self._offload_hook()
        latents = self._checked(z).float().to(self._mean.device) - self._mean  # pipelines de-normalised them
        if self.scaling_factor != 1.0:
            latents = latents * self.scaling_factor
        latents = latents / self._std
        options: dict[str, Any] = {}
        if temb is not None:
            if "timestep" not in self.decoder.step_inputs:
                raise FamilyMismatchError("a timestep was given, but this FlashVAE's model is not timestep-conditioned")
            options["timestep"] = torch.as_tensor(temb, dtype=torch.float32).flatten().cpu()
        generator = None
        if _noise_scales(self.decoder):  # draw the injected noise where diffusers' VAE would: the global generator
            generator = torch.Generator(device=self._device)
            generator.set_state(_global_rng_state(self._device))
            options["generator"] = generator
        frames = self.decoder.decode(latents.cpu() if not self._on_torch else latents, self.chunk, **options)
        if generator is not None:
            _set_global_rng_state(self._device, generator.get_state())
        frames = frames.to(self._device, self._dtype)
        if not return_dict:
            return (frames,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=frames)

    def _checked(self, z: Any) -> Tensor:
        """The latents a pipeline passed, refused as the CLI refuses them (same words), but as the
        ``TypeError``/``ValueError`` Python callers expect, before any cast could hide a problem."""
        if not isinstance(z, Tensor):
            raise TypeError(f"latents must be a torch tensor, got {type(z).__name__}")
        try:
            if z.device.type == "meta":
                raise InputError("latents are on the meta device: they hold no values to decode")
            if not z.is_floating_point():
                raise InputError(f"latents must be floating point, got {z.dtype}")
            check_stored([z], Path("latents"), InputError)
            check_latents(self.decoder, z)
            self.decoder.check_memory(tuple(z.shape), self.chunk)
        except InputError as e:
            raise ValueError(str(e)) from None
        return z

    @property
    def _on_torch(self) -> bool:
        return isinstance(self.decoder, engines.TorchDecoder)

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:
        """The teacher's posterior of frames in [-1, 1] (mean and log-variance, in the VAE's own latent
        space), as diffusers' VAE returns it: ``sample(generator)`` draws as diffusers' does."""
        self._offload_hook()
        if self.teacher is None:
            raise EncoderMissingError(
                "this FlashVAE's model has no encoder; pass teacher=<the teacher checkpoint> to "
                "FlashVAE.from_pretrained for image-to-video pipelines"
            )
        with torch.no_grad():
            mean, logvar = self.teacher.posterior(x)
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1).to(self._dtype))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def forward(self, z: Tensor, temb: Tensor | None = None) -> Tensor:
        return self.decode(z, temb, return_dict=False)[0]


def _manifest_config(family: str, recorded: Any, where: str) -> Any:
    """The teacher configuration an export's manifest records (``model.config``: the teacher's, or
    a student's config holding it as ``teacher``)."""
    if isinstance(recorded, dict) and isinstance(recorded.get("teacher"), dict):
        recorded = recorded["teacher"]
    try:
        return families.get(family).config_from_dict(recorded)
    except (ValueError, TypeError, CheckpointError) as e:
        raise InputError(f"{where}: its manifest's model.config is not a {family} configuration ({e})"[:300]) from None


def _noise_scales(decoder: engines.Decoder) -> tuple:
    """The noise maps a decoder injects (LTX-Video 0.9.1), for torch models and engines alike."""
    holder = decoder.model if isinstance(decoder, engines.TorchDecoder) else decoder.contract  # type: ignore[attr-defined]
    return tuple(holder.noise_scales)


def _global_rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_global_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
