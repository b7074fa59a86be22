"""Device and dtype names as users write them. A leaf module: it imports only ``errors``."""

from __future__ import annotations

import os

import torch

from .errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; naming an absent device is an input error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown {{device}} {device!r} (use auto, cpu, cuda or cuda:N)", "device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{{device}} {device!r} requested but CUDA is not available here", "device")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported {{device}} {device!r} (use auto, cpu, cuda or cuda:N)", "device")
    return dev


def rank_device(device: torch.device, env: dict[str, str] | None = None) -> torch.device:
    """Under ``torchrun`` (WORLD_SIZE > 1) each rank takes its own GPU, ``cuda:LOCAL_RANK``, and makes
    it current (NCCL needs one device per rank); CPU runs and single processes are unchanged."""
    env = dict(os.environ if env is None else env)
    if device.type != "cuda" or int(env.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.index is not None:
        raise InputError(
            f"under torchrun every rank takes cuda:LOCAL_RANK; give {{device}} cuda or auto, not {device}", "device"
        )
    local = int(env.get("LOCAL_RANK", "0"))
    if not 0 <= local < torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK {local} has no GPU here ({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise InputError(f"unknown {{dtype}} {dtype!r} (use {', '.join(DTYPES)})", "dtype")
    return DTYPES[dtype]
