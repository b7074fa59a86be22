"""Opening untrusted files: every size and count is checked before anything is allocated.

Checkpoints, latents, configs and manifests come from users and the internet. Here they are
refused in one line (a ``FlashVAEDError`` of the caller's choosing) when they are not regular
files (a FIFO would hang us, a device never ends), when they would cost more memory than they
hold (a zero-stride tensor, a compressed zip entry, a .npy header larger than its data), when a
config uses YAML aliases (the "billion laughs"), and when a pickle asks for code. A leaf module,
like ``errors``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .errors import FlashVAEDError, InputError

MAX_CONFIG_BYTES = 4 << 20  # configs, presets and manifests are a few KB; 4 MiB is plenty


def gib(n: float) -> str:
    """A byte count for messages: 512 bytes, 3.0 MiB, 23.8 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def memory_bytes() -> int:
    """The memory inputs may cost: this machine's (or container's) memory, or ``FLASHVAED_MEMORY_LIMIT``
    (bytes). No input may need more than all of it."""
    limits = []
    override = os.environ.get("FLASHVAED_MEMORY_LIMIT")
    if override:
        try:
            limits.append(int(float(override)))
        except ValueError:
            raise FlashVAEDError(f"FLASHVAED_MEMORY_LIMIT must be a number of bytes, got {override!r}") from None
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(cgroup).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            limits.append(int(value))
    return min(limits) if limits else 64 << 30


WORK_SHARE = 0.8  # of the memory available now: what the work may use by default


def _available_bytes() -> int | None:
    """Memory this process could still take: MemAvailable, within the cgroup's remaining room."""
    room = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            room.append(max(int(limit) - int(used), 0))
    except OSError:
        pass
    return min(room) if room else None


def work_budget(device: torch.device | str | None = None) -> int:
    """The memory one computation may use: ``FLASHVAED_MEMORY_LIMIT`` (bytes) where set, otherwise
    a share of what is free now on ``device`` (the GPU's free memory for CUDA)."""
    override = os.environ.get("FLASHVAED_MEMORY_LIMIT")
    if override:
        return memory_bytes()
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(WORK_SHARE * free)
    available = _available_bytes()
    return int(WORK_SHARE * (available if available is not None else memory_bytes()))


def check_work(nbytes: float, what: str, hint: str, *params: str, device: torch.device | str | None = None) -> None:
    """Refuse a computation whose peak memory, measured before it runs, exceeds ``work_budget``;
    ``hint`` says which option to change (``{param}`` placeholders, as in ``InputError``)."""
    budget = work_budget(device)
    if nbytes > budget:
        raise InputError(
            f"{what} would need {gib(nbytes)} of memory at its peak, more than the {gib(budget)} it may use "
            f"here (FLASHVAED_MEMORY_LIMIT sets that); {hint}",
            *params,
        )


def check_budget(
    nbytes: float, what: str, error: type[FlashVAEDError], hint: str = "", params: tuple[str, ...] = ()
) -> None:
    """Refuse work whose memory, computed from a file's declared sizes, exceeds half of the memory
    here: the model's own work needs the rest. ``hint``/``params`` as in ``check_work``."""
    limit = memory_bytes()
    if nbytes > limit // 2:
        tail = f"; {hint}" if hint else ""
        message = f"{what} would need {gib(nbytes)} of memory, more than half of the {gib(limit)} here{tail}"
        raise error(message, *params)


def check_file(path: str | os.PathLike, error: type[FlashVAEDError], what: str = "file") -> int:
    """The size of the regular file at ``path``; missing paths and special files are refused unopened."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path} is a directory, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is not a regular file (a pipe, socket or device); refusing to read it")
    return st.st_size


def member_file(folder: str | os.PathLike, name: Any, error: type[FlashVAEDError], what: str = "file") -> Path:
    """``folder/name`` for a file named by a manifest, refused unless it is a regular file inside
    ``folder``: no absolute paths, no ``..``, no symbolic links leading out."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise error(f"{folder}: {what} {name!r} must be a file name inside the directory")
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise error(f"{folder}: {what} {name!r} leads outside the directory")
    if not path.exists():
        raise error(f"{folder} lacks {what} {name}")
    check_file(path, error, what)
    return path


def read_text(path: str | os.PathLike, error: type[FlashVAEDError], what: str = "file") -> str:
    """A small UTF-8 text file (configs, manifests), refused past ``MAX_CONFIG_BYTES``."""
    size = check_file(path, error, what)
    if size > MAX_CONFIG_BYTES:
        raise error(f"{path} is {size} bytes; a {what} is at most {MAX_CONFIG_BYTES} bytes")
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"cannot read {path}: not UTF-8 text") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None


def json_format(path: str | os.PathLike) -> str | None:
    """The ``format`` field of a small JSON file (our manifests, configs, reports), or None if it is
    missing, unreadable or not ours to read: which outputs a new one may replace is decided on it."""
    try:
        data = json.loads(read_text(path, FlashVAEDError))
    except (FlashVAEDError, json.JSONDecodeError, RecursionError):
        return None
    return data.get("format") if isinstance(data, dict) else None


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: no config needs them, and they can expand exponentially."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases are not accepted", event.start_mark)
        return super().compose_node(parent, index)


def load_config(path: str | os.PathLike, error: type[FlashVAEDError], what: str = "config") -> Any:
    """A .yaml/.yml or .json file's data (YAML without aliases); malformed files in one line."""
    path = Path(path)
    text = read_text(path, error, what)
    try:
        if path.suffix in (".yaml", ".yml"):
            return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader without aliases
        return json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"malformed {what} {path}: {first}") from None


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------
def _check_zip(path: Path, size: int, error: type[FlashVAEDError]) -> None:
    """torch.save writes stored (uncompressed) zip entries; compressed ones could expand ~1000:1."""
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise error(f"cannot read {path}: corrupt or not a torch file ({e})") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise error(f"refusing {path}: it holds compressed entries ({packed[0]}), which torch.save never writes")
    total = sum(e.file_size for e in entries)
    if total > size:
        raise error(f"refusing {path}: its entries declare {total} bytes in a {size}-byte file")


def tensors_in(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors inside plain containers (a loaded state dict or a tensor)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 8:
        return []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v, depth + 1)]
    return []


def check_stored(tensors: list[torch.Tensor], path: Path, error: type[FlashVAEDError]) -> None:
    """Refuse views that would materialise far more than they store (zero strides, as_strided)."""
    for t in tensors:
        if t.layout != torch.strided:
            raise error(f"refusing {path}: it holds a {t.layout} tensor; only dense tensors are accepted")
        need = t.numel() * t.element_size()
        have = t.untyped_storage().nbytes()
        if need > max(have, 1) and need > 1 << 20:
            raise error(
                f"refusing {path}: a tensor of shape {tuple(t.shape)} would expand {gib(have)} of stored data "
                f"to {gib(need)}"
            )


def load_weights_only(path: Path, error: type[FlashVAEDError]) -> object:
    """``torch.load(weights_only=True)`` after checking the file; failures become one-line ``error``s.

    A file that needs a class or function beyond plain containers and tensors is refused,
    naming what it asked for; a file that is not a torch file at all is called unreadable.
    """
    size = check_file(path, error)
    if zipfile.is_zipfile(path):
        _check_zip(path, size, error)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the unpickler raises, the file is not one we read
        # Which exception a malformed file provokes depends on the torch version (IndexError,
        # UnpicklingError, RuntimeError, EOFError, ...): only a request for code is told apart.
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))  # "GLOBAL posix.system whose module ... is blocked"
        if isinstance(e, pickle.UnpicklingError) and wanted:
            raise error(
                f"refusing {path}: it needs pickled code to load ({wanted[1]}); only plain tensors are accepted"
            ) from None
        detail = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        raise error(f"cannot read {path}: not a checkpoint or tensor file saved by torch ({detail})") from None
    check_stored(tensors_in(obj), path, error)
    return obj


def load_npy(path: Path, error: type[FlashVAEDError]) -> np.ndarray:
    """A .npy array whose header is checked against the file's size before its data is read."""
    size = check_file(path, error)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, EOFError) as e:
        raise error(f"cannot read {path}: not a .npy file ({str(e).splitlines()[0][:200]})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise error(f"refusing {path}: dtype {dtype} is not a plain numeric type")
    need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if need > size - offset:
        raise error(f"refusing {path}: its header declares {tuple(shape)} ({need} bytes) but it holds {size - offset}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise error(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
