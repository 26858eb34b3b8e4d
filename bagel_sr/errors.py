"""User errors: "you gave us something wrong", shown as one line with exit code 2; tracebacks only for our bugs.

Every command-line tool (the wrapper included) runs its ``main`` through :func:`cli_main`, which prints a
:class:`UserError` as ``error: <message>`` (one line naming the input and what is expected) and exits with the
error's code; their argparse parsers are :class:`ArgumentParser`, whose errors are :class:`UsageError` s.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Optional, Sequence


class UserError(Exception):
    """An input, flag, file or folder the user gave is wrong; the message names it and says what is expected."""

    exit_code = 2


class BadInput(UserError, ValueError):
    """A value, file content or setting the user gave is not what is expected."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named (or that their inputs imply) does not exist."""


class UsageError(BadInput):
    """A command-line flag is wrong, missing or lacks its value."""


class RunFailed(UserError):
    """The tool ran but its result must not be trusted as is (e.g. non-finite outputs); exit code 1."""

    exit_code = 1


class UserErrorsParser:
    """Mixin for an argparse parser (``argparse.ArgumentParser``, ``transformers.HfArgumentParser``): a parse error
    raises :class:`UsageError` (one line for :func:`cli_main`) instead of printing the usage and exiting."""

    prog: str

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


class ArgumentParser(UserErrorsParser, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose parse errors are :class:`UsageError` s."""


def one_line(message: str) -> str:
    """The message on one line (newlines folded), as the CLI prints it."""
    return " ".join(str(message).split())


def cli_main(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and its exit code.

    ``main`` may return an int exit code (anything else counts as 0).
    """
    try:
        rc = main(argv)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    return rc if isinstance(rc, int) else 0
