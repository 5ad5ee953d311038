"""One run per output directory, enforced while it runs: an exclusive OS file lock (``flock``) on
``<output_dir>/.r1vl_fast.lock``, held from before the run's first write to its exit.

The kernel releases the lock when the process ends, however it ends, so a killed run never leaves a stale lock
behind. The file stays (it is not a run artifact); what it holds, the holder's pid, host, start time and command
line, is only read while its lock is held, to name the holder in the refusal.

Within one process the lock is re-entrant (the demo holds its directory while its StepGRPO stage claims it again)
and counted: it is released when the last holder lets go.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from r1vl_fast.errors import ConfigError

LOCK_FILE = ".r1vl_fast.lock"


class OutputDirBusy(ConfigError):
    """Another live run holds the output directory."""


# realpath of the directory -> [open file descriptor, holders in this process]
_held: dict[str, list[int]] = {}


def holder(output_dir: Path) -> str:
    """Who holds ``output_dir``'s lock, in words (from what the holder wrote into the lock file)."""
    try:
        info = json.loads((output_dir / LOCK_FILE).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']}, since {since}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said which"


def acquire(output_dir: Path) -> None:
    """Take ``output_dir``'s lock (the directory exists), or raise :class:`OutputDirBusy` naming the holder without
    writing anything. An unwritable directory is a :class:`ConfigError` saying so."""
    key = os.path.realpath(output_dir)
    if key in _held:
        _held[key][1] += 1
        return
    path = output_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"--output_dir {output_dir}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirBusy(f"--output_dir {output_dir} is in use by another run ({holder(output_dir)}); wait "
                                f"for it to end or stop it, or pass another --output_dir") from None
        except OSError as e:  # ENOLCK: a file system without locks
            os.close(fd)
            raise ConfigError(f"--output_dir {output_dir}: cannot lock {LOCK_FILE} there ({e.strerror or e}), so "
                              f"a second run into it could not be refused; use a directory on a file system with "
                              f"locks") from None
        # the file may have been replaced between open and flock (someone removed it): lock the one that is there
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])  # as typed: "python -m r1vl_fast.train ..."
    command = " ".join([os.path.basename(argv[0]), *argv[1:]])[:300]
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command})
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _held[key] = [fd, 1]


def release(output_dir: Path) -> None:
    key = os.path.realpath(output_dir)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # releases the flock; the file stays, so no later run races a new inode


@contextlib.contextmanager
def holding(output_dir: Path) -> Iterator[None]:
    acquire(output_dir)
    try:
        yield
    finally:
        release(output_dir)
