"""The one error style of every ``pumit-nnunet`` subcommand.

Expected failures (absent, unreadable, malformed or mismatching inputs; refused requests) are raised as
:class:`PumitError` anywhere in the library, with the file they concern. ``pumit_nnunet.cli.main`` turns them into
exactly one line on stderr::

    pumit-nnunet <cmd>: error: <file>: <problem>

and exits 2 for usage errors (:class:`UsageError`, and every command-line parsing error through
:class:`OneLineArgumentParser`) or 1 for data errors (:class:`DataError`, and the user's OS errors such as a missing
file, a folder given for a file or a permission problem). Anything else is a bug and keeps its traceback;
``--debug`` shows the traceback of expected errors too. This module is stdlib-only so that ``--help`` stays
torch-free.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["PumitError", "UsageError", "DataError", "format_error", "is_expected", "EXPECTED_OS_ERRORS",
           "OneLineArgumentParser", "INTERRUPTED_EXIT_CODE"]

#: exit code of a run stopped with Ctrl-C (the shell convention 128 + SIGINT)
INTERRUPTED_EXIT_CODE = 130


class PumitError(Exception):
    """An expected, user-facing failure: one line naming the file and the problem, exit code 1 (data)."""

    exit_code: int = 1

    def __init__(self, problem: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(problem)
        self.problem = str(problem)
        self.path = None if path is None else Path(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path is not None else self.problem

    def __reduce__(self) -> tuple:
        # keep the path when the error crosses a process boundary (evaluation workers, data loaders)
        return type(self), (self.problem, self.path)


class DataError(PumitError):
    """A file exists but holds something we refuse (truncated, non-finite, wrong geometry, wrong kind): exit 1."""


class UsageError(PumitError):
    """The command line asks for something impossible or contradictory: exit 2."""

    exit_code = 2


#: OS errors that are the user's situation, not our bug: reported in one line, exit 1
EXPECTED_OS_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, FileExistsError, PermissionError,
                                                 IsADirectoryError, NotADirectoryError)

_OS_REASONS: dict[type[OSError], str] = {
    PermissionError: "permission denied", FileNotFoundError: "does not exist",
    IsADirectoryError: "is a folder, expected a file", NotADirectoryError: "is not a folder",
    FileExistsError: "already exists",
}


def is_expected(error: BaseException) -> bool:
    """True for errors reported in one line: ours, the classic OS errors, and any OS error naming its file.

    An OS error with a file name (disk full, read-only file system, too many links...) is the user's situation; an
    OS error without one comes from deep inside a library and is reported as a bug, with its traceback.
    """
    if isinstance(error, (PumitError, *EXPECTED_OS_ERRORS)):
        return True
    return isinstance(error, OSError) and bool(getattr(error, "filename", None))


def _os_message(error: OSError) -> str:
    reason = _OS_REASONS.get(type(error))
    if reason is None:
        reason = error.strerror or type(error).__name__
        reason = reason[:1].lower() + reason[1:]  # "No space left on device" -> "no space left on device"
    target = f" -> {error.filename2}" if getattr(error, "filename2", None) else ""
    return f"{error.filename}{target}: {reason}"


def format_error(command: str, error: BaseException) -> str:
    """The single line for ``error`` raised by subcommand ``command`` (e.g. ``"corpus convert"``)."""
    if isinstance(error, OSError) and getattr(error, "filename", None):
        message = _os_message(error)
    else:
        message = str(error) or type(error).__name__
    message = " ".join(message.split())  # one line, whatever the message held
    return f"pumit-nnunet {command}: error: {message}" if command else f"pumit-nnunet: error: {message}"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: one line ``<prog>: error: <problem> (see <prog> --help)``, exit 2.

    Stock argparse prints the whole usage block before the message; in logs of long pipelines the actual problem then
    hides among option names. Nested sub-parsers inherit the class, so ``prog`` names the full command.
    """

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)
