"""Exceptions that map onto the CLI's exit codes (docs/design.md, "Layers").

`BadInputError` is exit code 2 (usage error or bad input), `CheckFailedError` is exit code 1
(verification or a budget failed). Anything else escaping the CLI is a bug.
"""


class HwnasError(Exception):
    """Base class for errors hwnas reports to the user as one line."""

    exit_code = 2


class BadInputError(HwnasError):
    """The user gave something hwnas cannot work with (a file, an option, a shape)."""

    exit_code = 2


class CheckFailedError(HwnasError):
    """A verification or a budget check failed; nothing was written."""

    exit_code = 1
