"""Errors a user causes and can fix, and how the command lines report them: one line, ``error: ...``, exit code 2.
Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path


class DataError(ValueError):
    """A dataset row that cannot be used; the message names the file, line, sample index and field."""


class ConfigError(ValueError):
    """An option's value is invalid; the message names the option (and the --config file, for a YAML value)."""


class NonFiniteError(RuntimeError):
    """Training diverged: several updates in a row had a non-finite loss or gradient, or the weights did."""


class Stopped(Exception):  # noqa: N818 (not an error: the run did what the user asked)
    """A stop signal ended the run: the step in progress finished and was saved, and nothing after it runs (no
    later stage, no final evaluation). Command lines exit with 128 + the signal's number, as a shell does, so that
    ``sft && train`` does not go on from a partial warm-up."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; saved {checkpoint}; resume with "
                         f"--resume_from_checkpoint latest")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    @property
    def exit_code(self) -> int:
        number = getattr(signal.Signals, self.signal_name, signal.SIGTERM)  # another rank's signal: SIGTERM
        return 128 + int(number)


def user_errors() -> tuple[type[BaseException], ...]:
    from r1vl_fast.checkpoint import CheckpointError, CheckpointWriteError, UnsafeCheckpointError

    return (ConfigError, DataError, CheckpointError, UnsafeCheckpointError, CheckpointWriteError, FileNotFoundError,
            NonFiniteError)


def reports_user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command line's ``main``: a user error prints ``error: <message>`` on stderr and returns 2; a run
    stopped by a signal (after saving) returns 128 + the signal's number, and Ctrl-C outside the training loop
    (loading, evaluating) returns 130, without a traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except Stopped as e:
            print(str(e), file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 128 + int(signal.SIGINT)

    return wrapped
