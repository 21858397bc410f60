"""Error types and the exit codes the CLI maps them to."""

from __future__ import annotations

#: Exit codes shared by every command.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_VERDICT = 3


class NemoError(Exception):
    """A failure the user can act on; its message is printed as one line."""

    exit_code = EXIT_FAILURE


class InputError(NemoError):
    """Bad input (files, options, incompatible artifacts): exit code 2."""

    exit_code = EXIT_USAGE
