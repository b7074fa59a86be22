"""Loading torch files without running pickled code. A leaf module, like ``errors``."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from .errors import FlashVAEDError


def load_weights_only(path: Path, error: type[FlashVAEDError]) -> object:
    """``torch.load(weights_only=True)``; failures become one-line ``error``s.

    A file that needs a class or function beyond plain containers and tensors is refused,
    naming what it asked for; a file that is not a torch file at all is called unreadable.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if wanted:
            raise error(
                f"refusing {path}: it needs pickled code to load ({wanted[1]}); only plain tensors are accepted"
            ) from None
        raise error(f"cannot read {path}: corrupt or not a torch file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"cannot read {path}: corrupt or not a torch file ({first_line})") from None
