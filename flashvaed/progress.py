"""Progress for long work, on stderr: a rich bar on a terminal, plain lines everywhere else.

A bar redrawn in place means nothing in a log file or a CI job (``2> log``), and a distillation
would be silent for minutes there. So when stderr is not a terminal, a line with the step, rate
and ETA is printed every few seconds (``FLASHVAED_PROGRESS_INTERVAL``, default 5) and one at the
end; work shorter than the interval prints nothing. Disabled (``-q``): nothing at all.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
INTERVAL_ENV = "FLASHVAED_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0


class Bar(Protocol):
    """What long work reports to: steps done, and optionally a new description or a short note."""

    def update(self, advance: int = 1, description: str | None = None, info: str | None = None) -> None: ...


class _Silent:
    def update(self, advance: int = 1, description: str | None = None, info: str | None = None) -> None:
        pass


class _RichBar:
    """A transient bar on a terminal: it disappears when the work ends, leaving the results."""

    def __init__(self, progress: Progress, task: int) -> None:
        self.progress, self.task = progress, task

    def update(self, advance: int = 1, description: str | None = None, info: str | None = None) -> None:
        fields = {} if info is None else {"info": info}
        self.progress.update(self.task, advance=advance, description=description, **fields)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LogLines:
    """Plain progress lines for a stream that is not a terminal: one every ``interval`` seconds
    and one at the end (if any was printed, or the work lasted an interval)."""

    def __init__(
        self,
        description: str,
        total: int,
        completed: int = 0,
        interval: float = DEFAULT_INTERVAL,
        stream: TextIO | None = None,
    ) -> None:
        self.description, self.total, self.info = description, total, ""
        self.completed = self.start_completed = completed
        self.interval, self.stream = interval, stream
        self.start = self.last = time.monotonic()
        self.printed = False

    def line(self, now: float, done: bool = False) -> str:
        elapsed = now - self.start
        steps = self.completed - self.start_completed
        rate = steps / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description.strip()}: {self.completed}/{self.total}"]
        if self.total:
            parts[0] += f" ({100 * self.completed / self.total:.0f}%)"
        if rate > 0:
            parts.append(f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.2f} s/step")
        parts.append(f"elapsed {_clock(elapsed)}")
        if done:
            parts.append("done")
        elif rate > 0 and self.total:
            parts.append(f"eta {_clock(max(self.total - self.completed, 0) / rate)}")
        if self.info:
            parts.append(self.info)
        return ", ".join(parts)

    def _print(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop the work
            pass
        self.printed = True

    def update(self, advance: int = 1, description: str | None = None, info: str | None = None) -> None:
        self.completed += advance
        if description is not None:
            self.description = description
        if info is not None:
            self.info = info
        now = time.monotonic()
        if now - self.last >= self.interval and self.completed < self.total:  # the end: close's line
            self.last = now
            self._print(self.line(now))

    def close(self) -> None:
        now = time.monotonic()
        if self.printed or now - self.start >= self.interval:
            self._print(self.line(now, done=True))


def interval_seconds(interval: float | None = None) -> float:
    """The seconds between plain progress lines: ``interval``, else the environment's, else 5."""
    if interval is not None:
        return interval
    try:
        return max(float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)), 0.0)
    except ValueError:
        return DEFAULT_INTERVAL


@contextmanager
def progress_bar(
    description: str,
    total: int,
    enabled: bool = True,
    completed: int = 0,
    interval: float | None = None,
    info: bool = False,
) -> Iterator[Bar]:
    """Report progress of ``total`` steps: a bar on a terminal, plain lines elsewhere, nothing
    when ``enabled`` is false. ``info`` adds a column for the note passed to ``update``."""
    if not enabled:
        yield _Silent()
        return
    console = Console(stderr=True)
    if not console.is_interactive:  # where a bar would not redraw (a file, a pipe, TERM=dumb)
        lines = LogLines(description, total, completed, interval_seconds(interval))
        yield lines
        lines.close()  # only work that ended well says "done"
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TextColumn("{task.fields[info]}")] if info else []),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")
        yield _RichBar(progress, task)


def track(
    items: Iterable[T], total: int, description: str, enabled: bool = True, interval: float | None = None
) -> Iterator[T]:
    """Iterate ``items`` reporting progress on stderr (see ``progress_bar``)."""
    with progress_bar(description, total, enabled, interval=interval) as bar:
        for item in items:
            yield item
            bar.update()
