"""Teacher families, shared blocks, the streaming contract and checkpoint readers."""

from .checkpoint import load_model, load_wan, save_wan
from .streaming import StateSpec, StreamingDecoder, decode, iter_decode, zero_state
from .summary import DecoderSummary, summarize
from .wan import WanConfig, WanVAE

__all__ = [
    "DecoderSummary",
    "StateSpec",
    "StreamingDecoder",
    "WanConfig",
    "WanVAE",
    "decode",
    "iter_decode",
    "load_model",
    "load_wan",
    "save_wan",
    "summarize",
    "zero_state",
]
