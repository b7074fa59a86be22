"""The LTX-Video VAE family (0.9.0, 0.9.1, 0.9.5/0.9.7): 128 latent channels, 8x32x32 compression.

Facts (../shared/docs/ltx-vae.md in the planning repo; diffusers' ``AutoencoderKLLTXVideo`` is the
test oracle):

- frames are patchified 4x4 (channel ``c*16 + r*4 + q``, r the column offset) into 48 channels;
- the encoder is causal (replicate padding: two copies of the first frame in front);
- the decoder is **not** causal: its temporal convs pad by replicating the first frame in front
  and the last frame at the end, so every output frame depends on later latent frames;
- residual blocks use parameter-free pixel norms; a width-changing block has a LayerNorm + 1x1 shortcut;
- the decoder upsamples by depth-to-space (channel ``c*8 + t*4 + y*2 + x``) and drops the first
  output frame; from 0.9.1 on with a residual skip (depth-to-space of the input, tiled) and a
  channel reduction;
- 0.9.1+ decoders are conditioned on a timestep (sinusoidal embedding -> scale/shift of every
  residual block's norms and of the final norm); 0.9.1 adds per-channel scaled spatial noise after
  each conv of its noisy blocks;
- latents are normalised with per-channel statistics stored in the checkpoint.

Streaming the non-causal decoder exactly: every temporal layer runs on a clock (see
``flashvaed.models.streaming``). A step maps k latent frames to a fixed number of positions at
each layer; a conv that reads one future frame delays its output by one position (the residual
skip of its block by the same, a delay line), depth-to-space doubles positions without dropping
the first one, and each layer, knowing the stream position and (once known) the clip's end,
replaces the frames before the clip's start and past its end by copies of its first and last
frame, which is upstream's replicate padding. The decoder declares the resulting constant: the
output positions before the first frame, ``output_offset``, and the ``latency`` in latent frames.
Since the positions outside the clip are never read, each layer of a step computes only its
*window* (the positions holding frames of the clip, ``blocks.window``): a stream's warm-up and
flush cost what they compute, in eager streams and in exported graphs alike.
"""

from __future__ import annotations

from ..base import register
from .config import NAME, Block, LTXConfig, decoder_structure, teacher_layout
from .decoder import DEFAULT_NOISE_SCALE, DEFAULT_TIMESTEP, LTXDecoder
from .encoder import LTXEncoder
from .family import LTXVAE, LTXFamily
from .keys import config_from_diffusers, config_from_original, diffusers_config

LTX = register(LTXFamily())
LTXVAE.family_def = LTX

__all__ = [
    "DEFAULT_NOISE_SCALE",
    "DEFAULT_TIMESTEP",
    "LTX",
    "LTXVAE",
    "NAME",
    "Block",
    "LTXConfig",
    "LTXDecoder",
    "LTXEncoder",
    "LTXFamily",
    "config_from_diffusers",
    "config_from_original",
    "decoder_structure",
    "diffusers_config",
    "teacher_layout",
]
