"""The one exception family users see.

A leaf module: every layer may raise these, and the CLI turns them into a one-line message and
exit code 2. Anything else escaping a command is a bug in flashvaed, not bad input.

Messages name the parameter at fault by placeholder: ``InputError("{chunk} must be at least 1",
"chunk")`` reads "chunk must be at least 1" from the library (``str(e)``) and "--chunk must be
at least 1" on the command line (``e.render(flag)``), so the library never speaks in CLI flags.
"""

from __future__ import annotations

from collections.abc import Callable


class FlashVAEDError(Exception):
    """Bad input a user can fix: the message names the problem in one line."""

    exit_code = 2

    def __init__(self, message: str, *params: str) -> None:
        super().__init__(message)
        self.template = message
        self.params = params

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every ``{param}`` placeholder written as ``name(param)``."""
        text = self.template
        for param in self.params:
            text = text.replace("{" + param + "}", name(param))
        return text

    def __str__(self) -> str:
        return self.render(lambda param: param)


class CheckpointError(FlashVAEDError):
    """A checkpoint that is missing, unreadable, foreign, or does not fit the architecture."""


class InputError(FlashVAEDError):
    """Latents, videos or options that do not fit the model or the command."""


class DiskFullError(FlashVAEDError):
    """The disk filled up while an output was written (its temporaries are already removed).
    Not bad input, and not our bug: the command line gives it its own exit code."""

    exit_code = 74  # EX_IOERR (sysexits.h)
