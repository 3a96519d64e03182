"""The error type that command-line entry points turn into a message and a non-zero exit code,
and :func:`run_command`, the one place where the three commands do it (so that they answer bad
input and Ctrl-C in the same words and with the same exit codes)."""
from __future__ import annotations

import sys
from typing import Callable, Optional

EXIT_BAD_INPUT = 2  # argparse's own exit code for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
INTERRUPTED_MESSAGE = "interrupted; rerun the same command to resume"


class UserInputError(ValueError):
    """Bad input from the user (a path, a dataset id, an option): the message says what and how to fix it."""


def run_command(prog: str, command: Callable[[], Optional[int]]) -> int:
    """Run ``command()`` and return its exit code (``None`` is 0).

    A :class:`UserInputError` becomes one ``PROG: error: MESSAGE`` line on stderr and exit code 2;
    Ctrl-C (``KeyboardInterrupt``) becomes :data:`INTERRUPTED_MESSAGE` and exit code 130 instead
    of a traceback: every command writes its results so that the same command resumes.
    """
    try:
        return int(command() or 0)
    except UserInputError as e:
        sys.stdout.flush()  # the message comes after what the command printed so far
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return EXIT_INTERRUPTED
