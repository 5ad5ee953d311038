"""Errors a user causes and can fix, and how the command lines report them: one line, ``error: ...``, exit code 2.
Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class DataError(ValueError):
    """A dataset row that cannot be used; the message names the file, line, sample index and field."""


class ConfigError(ValueError):
    """An option's value is invalid; the message names the option (and the --config file, for a YAML value)."""


class NonFiniteError(RuntimeError):
    """Training diverged: several updates in a row had a non-finite loss or gradient, or the weights did."""


def user_errors() -> tuple[type[BaseException], ...]:
    from r1vl_fast.checkpoint import UnsafeCheckpointError

    return ConfigError, DataError, UnsafeCheckpointError, FileNotFoundError, NonFiniteError


def reports_user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command line's ``main``: a user error prints ``error: <message>`` on stderr and returns 2."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped
