"""Outputs appear whole or not at all, and replace only what is ours.

Every output is written under a temporary name beside its target, then swapped in: a file by
``os.replace``, a directory by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``) or, where
the filesystem has none, rename-aside-then-swap with signals held off. So no signal, not even
SIGKILL, leaves both the old and the new output broken. Temporary names carry the writer's pid:
the leftovers of a killed run are removed by the next run that writes the same target.

``check_output`` refuses, before any work, what the swap would refuse after it: a target that
is not ours to replace, the input itself, an unwritable or impossible path. A leaf module like
``errors``: every layer may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import signal
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError, InputError

TEMP = "tmp"  # .NAME.PID-TOKEN.tmp[SUFFIX]: a write in progress
ASIDE = "old"  # .NAME.PID-TOKEN.old: the previous output, moved aside during a swap
PARTIAL = ".flashvaed-partial"  # inside a temporary directory until it is swapped in


def temp_sibling(final: Path, kind: str) -> Path:
    """A fresh hidden name beside ``final`` that names this process (for stale-leftover cleanup)."""
    tail = final.suffix if kind == TEMP else ""
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}{tail}")


_TEMP_NAME = re.compile(rf"^\.(.+)\.\d+-[0-9a-f]{{8}}\.{TEMP}")


def final_path(path: str | os.PathLike) -> str:
    """``path`` as it will be once every output being written around it is swapped in: a
    temporary name (``.NAME.PID-TOKEN.tmp``) anywhere in it becomes NAME. What records where
    something came from (a manifest's source) records this, never a name that is about to vanish."""
    parts = Path(path).parts
    return str(Path(*(m[1] if (m := _TEMP_NAME.match(part)) else part for part in parts))) if parts else str(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _ours_to_remove(entry: Path, kind: str, replaceable: Callable[[Path], bool] | None) -> bool:
    """Whether a stale directory named like ours really is: a write in progress carries
    ``PARTIAL``; an old output moved aside passes the same test as the output it was."""
    try:
        if not any(entry.iterdir()):
            return True
        if kind == TEMP:
            return (entry / PARTIAL).is_file()
        return replaceable is not None and replaceable(entry)
    except OSError:
        return False


def clean_stale(final: Path, replaceable: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove leftovers of killed runs that wrote ``final``: our naming, a pid no longer alive, and
    for directories our marker. A folder someone planted under such a name is left alone."""
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(\d+)-[0-9a-f]{{8}}\.({TEMP}|{ASIDE})")
    removed = []
    with contextlib.suppress(OSError):
        for entry in final.parent.iterdir():
            m = pattern.match(entry.name)
            if not m or int(m[1]) == os.getpid() or _pid_alive(int(m[1])):
                continue
            if entry.is_dir() and not entry.is_symlink():
                if not _ours_to_remove(entry, m[2], replaceable):
                    continue
                if m[2] == ASIDE and not final.exists() and not final.is_symlink():
                    os.rename(entry, final)  # a swap interrupted halfway: the old output comes back
                else:
                    shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------
# checks before any work
# ---------------------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _same_or_inside(inner: Path, outer: Path) -> bool:
    try:
        inner, outer = inner.resolve(), outer.resolve()
    except (OSError, RuntimeError):
        return False
    return inner == outer or outer in inner.parents


def check_output(
    final: str | os.PathLike,
    *,
    directory: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
    what: str = "output",
    inputs: Sequence[str | os.PathLike | None] = (),
) -> Path:
    """Refuse, before any work, an output that could not be written or must not be replaced.

    ``replaceable(path)`` says whether an existing non-empty directory is one of ours (a file
    output replaces a regular file only). ``inputs`` may neither be the output nor lie inside it.
    """
    final = Path(final)
    for source in inputs:
        if source is not None and Path(source).exists() and _same_or_inside(Path(source), final):
            raise InputError(f"the output {final} would overwrite the input {source}; choose another output")
    if final.is_symlink() and directory:
        raise InputError(f"{final} is a symbolic link; choose a new output directory")
    if final.exists():
        mode = os.stat(final).st_mode
        if directory:
            if not stat.S_ISDIR(mode):
                raise InputError(f"{final} exists and is not a directory; choose a new output")
            if any(final.iterdir()) and not (replaceable and replaceable(final)):
                raise InputError(f"{final} exists and is not {what}; choose a new output")
        elif stat.S_ISDIR(mode):
            raise InputError(f"{final} is a directory; give a file name")
        elif not stat.S_ISREG(mode):
            raise InputError(f"{final} exists and is not a regular file; choose another output")
    parent = _nearest_existing(final.absolute().parent)
    if not parent.is_dir():
        raise InputError(f"cannot write {final}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {final}: no write permission in {parent}")
    return final


# ---------------------------------------------------------------------------------------------
# the swap
# ---------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM off for a few system calls (main thread only)."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def swap_in(tmp: Path, final: Path) -> None:
    """Put the finished ``tmp`` at ``final``; an old directory there ends up removed, never half."""
    if not (final.is_dir() and not final.is_symlink()):
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):  # tmp now holds the old output
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = temp_sibling(final, ASIDE)
    with _signals_held():
        os.rename(final, aside)
        os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


_FULL = ("No space left on device", "StorageFull", "Disk quota exceeded", "file write failed")
# errors of a place no one may write (None: the system's own words, e.g. ENOENT under /proc)
_REFUSED = {
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: None,
}


def _mount_point(path: Path) -> Path:
    path = _nearest_existing(path.absolute())
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(_nearest_existing(path.absolute()))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _write_error(e: BaseException, final: Path, tmp: Path | None = None) -> InputError | DiskFullError | None:
    """What a failure while writing ``final`` tells the user, when the system (not flashvaed) is
    at fault: a full disk (libraries word it in their own ways: torch says "file write failed"),
    or a place no one may write. None for anything else (a bug, or an error already ours)."""
    code = getattr(e, "errno", None)
    text = str(e)
    full = code in (errno.ENOSPC, errno.EDQUOT) or any(s in text for s in _FULL[:3])
    if not full and _FULL[3] in text and tmp is not None:
        free = _free_bytes(tmp)
        full = free is not None and free < 1 << 20
    if full:
        return DiskFullError(f"no space left on {_mount_point(final)} while writing {final}")
    if isinstance(e, OSError) and code in _REFUSED:
        reason = _REFUSED[code] or e.strerror or "cannot create files there"
        return InputError(f"cannot write {final}: {reason}")
    return None


@contextmanager
def atomic_output(
    final: str | os.PathLike,
    directory: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
    what: str = "output",
) -> Iterator[Path]:
    """Yield a temporary path (a file, or an empty directory) that becomes ``final`` on success.

    On any exception (Ctrl-C and SIGTERM included) the temporary is removed and ``final`` is
    left as it was. An existing ``final`` directory is replaced only if empty or ``replaceable``.
    """
    final = Path(final)
    clean_stale(final, replaceable)
    check_output(final, directory=directory, replaceable=replaceable, what=what)
    tmp = temp_sibling(final, TEMP)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp.mkdir()
            (tmp / PARTIAL).touch()
        else:
            tmp.touch(exist_ok=False)
    except OSError as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, final) from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod((0o777 if directory else 0o666) & ~umask)
        check_output(final, directory=directory, replaceable=replaceable, what=what)  # it may have changed
        if directory:
            (tmp / PARTIAL).unlink()
        swap_in(tmp, final)
    except Exception as e:
        failure = _write_error(e, final, tmp)
        if failure is None:
            raise
        raise failure from None  # the temporary is removed below, before the message is shown
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
