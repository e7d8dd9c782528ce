"""How an error reaches a user: its first line (a leaf module; every command prints errors so),
and the entry wrapper of the sub-commands that print it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its type when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


USER_ERROR = 2  # the exit status of a user mistake, in every command
# what a user's input can raise: ValueError (``finegrain.config.ConfigError`` is one) and a
# missing file; anything else is our bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError)


def run_subcommand(
    prog: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` with ``parser`` and call ``run(args)``; its return value (None: 0) is the
    exit status. A user mistake (``USER_ERRORS``) prints one line, ``PROG: error: MESSAGE``, on
    stderr and returns ``USER_ERROR`` (2, as argparse's own usage errors)."""
    args = parser.parse_args(argv)
    try:
        status = run(args)
    except USER_ERRORS as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR
    return 0 if status is None else int(status)
