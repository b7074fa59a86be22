"""The two model classes every family shares: a latent decoder (teachers and students) and a
teacher VAE (the decoder plus the family's encoder).

A family (``flashvaed.models.families``) supplies the configuration, the decoder and encoder
modules and the latent statistics; these classes hold the streaming step and the facts every
later stage asks for (latent channels, factors, state specs, stages, an encoder or not), so
nothing downstream needs to know which family it is looking at.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .contract import DECODER_DEFAULTS
from .layout import DecoderLayout
from .streaming import ANY_CHUNK, State, StateSpec, StreamingDecoder, clocked, model_fingerprint
from .streaming import decode as streaming_decode


class LatentDecoder(nn.Module):
    """Diffusion-space latents -> frames: de-normalisation, ``post_quant_conv`` and the family's
    decoder built from a layout. The part teachers and students share, and the streaming contract
    they both follow.

    Diffusion-space latents are the VAE's own latents normalised per channel and scaled by the
    family's ``scaling_factor`` (diffusers' pipelines: ``latents * std / scaling_factor + mean``
    de-normalises): ``decode_step`` de-normalises, ``iter_encode`` normalises.
    """

    kind = "teacher"
    has_encoder = False
    chunk_range = ANY_CHUNK

    def __init__(self, family: Any, config: Any, layout: DecoderLayout, encoder: bool = False) -> None:
        super().__init__()
        self.family = family.name
        self.family_config = config  # the teacher's configuration (students too): what the family reads
        z = layout.z_dim
        self.post_quant_conv = family.build_post_quant_conv(config)
        self.decoder = family.build_decoder(config, layout, student=self.kind == "student")
        self.latent_channels = z
        self.temporal_factor = self.decoder.temporal_factor
        self.spatial_factor = self.decoder.spatial_factor
        # latent frames a step holds back (0: causal) and, if so, the output positions before the
        # clip's first frame; extra inputs of decode_step beyond latents and state (see ``streaming``)
        # (optional decoder members: their defaults are the contract's, ``contract.DECODER_DEFAULTS``)
        self.latency: int = self._optional("latency")
        self.output_offset: int = self._optional("output_offset")
        self.step_inputs: tuple[str, ...] = tuple(self._optional("step_inputs"))
        self.noise_scales: tuple[Fraction, ...] = tuple(self._optional("noise_scales"))  # noise map grids
        # conditioned decoders: the decode timestep and decode-time latent noise of their pipeline
        self.default_timestep: float | None = self._optional("default_timestep")
        self.default_noise_scale: float | None = self._optional("default_noise_scale")
        self.channels_last: bool = self._optional("channels_last")  # its eager steps' layout (blocks.state_format)
        stats = torch.tensor([config.latents_mean, config.latents_std], dtype=torch.float32)
        if stats.shape != (2, z):  # a student whose layout and teacher disagree (readers name the file)
            raise ValueError(f"latents_mean and latents_std have {stats.shape[1]} entries; layout z_dim is {z}")
        self.register_buffer("latents_mean", stats[0].view(1, z, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", stats[1].view(1, z, 1, 1, 1), persistent=False)
        self.scaling_factor = float(family.scaling_factor(config))
        if not math.isfinite(self.scaling_factor) or self.scaling_factor <= 0:
            raise ValueError(f"the scaling factor must be a finite number > 0, got {self.scaling_factor}")
        if encoder:  # teachers, and released students that ship their teacher's encoder (LTX)
            self.has_encoder = True
            self.encoder = family.build_encoder(config)
            self.quant_conv = family.build_quant_conv(config)

    def _optional(self, name: str) -> Any:
        return getattr(self.decoder, name, DECODER_DEFAULTS[name])

    def decoder_state_specs(self) -> list[StateSpec]:
        return self.decoder.state_specs()

    def decode_step(
        self, latents: Tensor, state: State, first: bool = False, clamp: bool = True, **inputs: Any
    ) -> tuple[Tensor, State]:
        """Decode one chunk of diffusion-space latents; the first chunk is one frame.

        ``inputs`` are the decoder's ``step_inputs`` (and, with latency, its clock: ``position``, ``end``).
        """
        if first and latents.shape[2] != 1:
            raise InputError(f"the first chunk must be one latent frame, got {latents.shape[2]}")
        z = latents * self.latents_std
        if self.scaling_factor != 1.0:  # exported graphs of the usual factor stay as they were
            z = z / self.scaling_factor
        z = z + self.latents_mean
        frames, state = self.decoder(self.post_quant_conv(z), state, first, **inputs)
        return (frames.clamp(-1.0, 1.0) if clamp else frames), state

    def decode(self, latents: Tensor, chunk: int | None = None, **options: Any) -> Tensor:
        """Frames in [-1, 1], (B, 3, 1 + t(T-1), s*h, s*w), from latents (B, z, T, h, w).

        ``options`` are the model's stream options (``stream_inputs``), e.g. an LTX timestep and seed.
        """
        return streaming_decode(self, latents, chunk, **options)

    def decode_clip(self, latents: Tensor, *, clamp: bool = True, **options: Any) -> Tensor:
        """A whole clip in one pass, with autograd as the caller set it (distillation, calibration).

        A decoder with latency runs its one-shot form (every position a frame of the clip, which
        streaming equals); a causal one runs the streaming loop with the whole clip as one chunk.
        """
        if not clocked(self):
            stream = self.stream(inference=False, clamp=clamp, **options)
            pieces = [stream.push(latents[:, :, :1])]
            if latents.shape[2] > 1:
                pieces.append(stream.push(latents[:, :, 1:], final=True))
            return torch.cat(pieces, dim=2)
        b, _, _, h, w = latents.shape
        inputs = self.stream_inputs(b, h, w, **options)
        frames, _ = self.decode_step(latents, (), clamp=clamp, full=True, **inputs)
        return frames

    def stream_inputs(self, batch: int | None, height: int, width: int, **options: Any) -> dict[str, Any]:
        """The extra step inputs of one stream from its options (refused if the model takes none)."""
        make = self._optional("stream_inputs")
        if make is None:
            if options:
                raise InputError(f"this {self.family} model takes no decode options, got {', '.join(sorted(options))}")
            return {}
        p = next(self.parameters())
        return make(batch, height, width, dtype=p.dtype, device=p.device, **options)

    def iter_encode(self, video: Tensor) -> Iterator[Tensor]:
        """Normalised latents (the posterior mean) of a video (B, 3, 4n+1, H, W) in [-1, 1]
        (models with an encoder: ``has_encoder``).

        Frames go through the encoder in the chunks the family's reference uses (1, 4, 4, ...
        for causal ones); each chunk's latent frames are yielded as soon as they are ready.
        """
        check_video(video, self.spatial_factor, self.temporal_factor)
        p = next(self.parameters())
        video = video.to(device=p.device, dtype=p.dtype)
        for out in self.encoder.iter_encode(video):
            mu = self.quant_conv(out)[:, : self.latent_channels]
            latents = mu - self.latents_mean
            if self.scaling_factor != 1.0:
                latents = latents * self.scaling_factor
            yield latents / self.latents_std

    def posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's (mean, log-variance) in the VAE's own latent space (not normalised), as
        diffusers' encoders give it; a shared log-variance channel is expanded to every channel."""
        check_video(video, self.spatial_factor, self.temporal_factor)
        p = next(self.parameters())
        video = video.to(device=p.device, dtype=p.dtype)
        h = torch.cat([self.quant_conv(out) for out in self.encoder.iter_encode(video)], dim=2)
        z = self.latent_channels
        mean, logvar = h[:, :z], h[:, z:]
        return mean, logvar.expand_as(mean) if logvar.shape[1] == 1 else logvar

    def encode(self, video: Tensor) -> Tensor:
        """Normalised latents (B, z, n+1, H/s, W/s) of a video (B, 3, tn+1, H, W) in [-1, 1]."""
        return torch.cat(list(self.iter_encode(video)), dim=2)

    # what a stream asks of its source (``flashvaed.models.streaming.StreamSource``) -------------
    def stream(
        self, *, inference: bool = True, clamp: bool = True, source: Any = None, **options: Any
    ) -> StreamingDecoder:
        """A new stream over this model; ``options`` are its stream options (``stream_inputs``)."""
        return StreamingDecoder(self, inference=inference, clamp=clamp, source=source, options=options)

    def check_geometry(self, batch: int, height: int, width: int) -> None:
        """Torch models take any batch and latent size."""

    def state_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        return [s.shape(batch, height, width) for s in self.decoder_state_specs()]

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self)


class TeacherVAE(LatentDecoder):
    """A family's whole VAE: ``encode`` videos to diffusion-space latents, ``decode_step`` them back."""

    has_encoder = True
    family_def: Any  # set by each family's teacher class

    def __init__(self, config: Any) -> None:
        family = self.family_def
        super().__init__(family, config, family.teacher_layout(config), encoder=True)
        self.config = config


def check_video(video: Tensor, spatial_factor: int = 8, temporal_factor: int = 4) -> None:
    """Refuse videos the encoder cannot take, naming the problem in one line."""
    if video.dim() != 5 or video.shape[1] != 3:
        raise InputError(f"video must be (batch, 3, frames, height, width), got {tuple(video.shape)}")
    _, _, t, h, w = video.shape
    if t == 0 or (t - 1) % temporal_factor:
        raise InputError(f"video must have {temporal_factor}n+1 frames, got {t}")
    if h == 0 or w == 0 or h % spatial_factor or w % spatial_factor:
        raise InputError(f"video height and width must be multiples of {spatial_factor}, got {h}x{w}")
    if not torch.isfinite(video).all():
        raise InputError("video contains NaN or Inf values")


def latent_frames(num_frames: int, temporal_factor: int = 4) -> int:
    return 1 + (num_frames - 1) // temporal_factor


def video_frames(num_latent_frames: int, temporal_factor: int = 4) -> int:
    return 1 + temporal_factor * (num_latent_frames - 1)
