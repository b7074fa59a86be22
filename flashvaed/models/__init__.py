"""Model families, shared blocks, the streaming contract and checkpoint readers."""

from . import families
from .checkpoint import load_model, load_student, load_teacher, load_vae, save_student, save_teacher
from .families.wan21 import WanConfig, WanVAE
from .families.wan22 import Wan22Config, Wan22VAE
from .streaming import StateSpec, Stream, StreamingDecoder, decode, iter_decode, zero_state
from .student import FlashStudent, StudentConfig, StudentSpec
from .summary import DecoderSummary, summarize
from .vae import LatentDecoder, TeacherVAE

__all__ = [
    "DecoderSummary",
    "FlashStudent",
    "LatentDecoder",
    "StateSpec",
    "Stream",
    "StreamingDecoder",
    "StudentConfig",
    "StudentSpec",
    "TeacherVAE",
    "Wan22Config",
    "Wan22VAE",
    "WanConfig",
    "WanVAE",
    "decode",
    "families",
    "iter_decode",
    "load_model",
    "load_student",
    "load_teacher",
    "load_vae",
    "save_student",
    "save_teacher",
    "summarize",
    "zero_state",
]
