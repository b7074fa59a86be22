"""The console script tunes glibc's malloc for streaming decode; the library never does on its own."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from flashvaed import allocator, cli

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "mallopt")


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt is not here")
def test_tuning_takes_on_glibc_unless_the_user_decides():
    assert allocator.tune_allocator({}) is True
    assert allocator.tune_allocator({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}) is False
    assert allocator.tune_allocator({allocator.OPT_OUT: "0"}) is False


def test_the_console_script_tunes_and_importing_the_library_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["flashvaed", "--version"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0 and calls == [1]
    probe = "import sys, flashvaed.api, flashvaed.engines; sys.exit('flashvaed.allocator' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
