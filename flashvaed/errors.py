"""The one exception family users see.

A leaf module: every layer may raise these, and the CLI turns them into a one-line message and
exit code 2. Anything else escaping a command is a bug in flashvaed, not bad input.
"""


class FlashVAEDError(Exception):
    """Bad input a user can fix: the message names the problem in one line."""


class CheckpointError(FlashVAEDError):
    """A checkpoint that is missing, unreadable, foreign, or does not fit the architecture."""


class InputError(FlashVAEDError):
    """Latents, videos or options that do not fit the model or the command."""
