"""Teacher families, shared blocks, the streaming contract and checkpoint readers."""

from .checkpoint import load_model, load_student, load_wan, save_student, save_wan
from .streaming import StateSpec, StreamingDecoder, decode, iter_decode, zero_state
from .student import FlashStudent, StudentConfig, StudentSpec
from .summary import DecoderSummary, summarize
from .wan import LatentDecoder, WanConfig, WanVAE

__all__ = [
    "DecoderSummary",
    "FlashStudent",
    "LatentDecoder",
    "StateSpec",
    "StreamingDecoder",
    "StudentConfig",
    "StudentSpec",
    "WanConfig",
    "WanVAE",
    "decode",
    "iter_decode",
    "load_model",
    "load_student",
    "load_wan",
    "save_student",
    "save_wan",
    "summarize",
    "zero_state",
]
