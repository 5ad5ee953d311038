"""Worker process for math-verify: answers ``float(verify(parse(a), parse(b))) > 0`` one request at a time.

It runs in its own process so that math-verify's signal-based timeouts work (they need a main thread) and so
that a call that hangs anyway can be killed. Protocol on stdin/stdout: 8-byte little-endian length + pickle.
"""

from __future__ import annotations

import pickle
import struct
import sys
from typing import BinaryIO


def read_message(stream: BinaryIO) -> object | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def write_message(stream: BinaryIO, message: object) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def main() -> None:
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the reply stream
    from math_verify import parse, verify

    write_message(replies, "ready")
    while (request := read_message(requests)) is not None:
        a, b = request  # type: ignore[misc]
        try:
            ok = float(verify(parse(a), parse(b))) > 0  # type: ignore[has-type]
        except Exception:
            ok = False
        write_message(replies, ok)


if __name__ == "__main__":
    main()
