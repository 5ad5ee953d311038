"""Final answers: correctness as text, and with math-verify.

math-verify runs in worker processes (:class:`MathVerifier`): its own timeouts rely on ``signal`` and so only
work on a main thread, and a pathological expression can hang sympy regardless. A call that outlives
``timeout`` seconds has its worker killed and replaced, and counts as wrong.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import selectors
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from r1vl_fast.rewards._verify_worker import read_message, write_message
from r1vl_fast.rewards.key_steps import normalize

log = logging.getLogger("r1vl_fast")


def same_answer(pred: str, gold: str) -> bool:
    """The same final answer as text: equal after normalisation, ignoring a trailing full stop."""
    return normalize(pred).rstrip(". ") == normalize(gold).rstrip(". ")


# The worker runs from its file, not as ``-m r1vl_fast...``: it needs math-verify and the standard library only, and
# must not import this package (from a source checkout that would find the checkout, without its compiled module).
_WORKER = ("import runpy; runpy.run_path(" + repr(str(Path(__file__).with_name("_verify_worker.py")))
           + ", run_name='__main__')")


class _Worker:
    def __init__(self, stderr: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.ready = False
        self.job: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


class MathVerifier:
    """``verify(parse(a), parse(b))`` for many pairs in parallel worker processes, with a hard timeout per call, a
    time budget per batch (one :meth:`check`), and a cache of recent results (the G completions of a prompt often
    share an answer).

    An answer that makes sympy grind (``9^9^9^9^9^9``) costs at most ``timeout`` seconds of one worker, and a batch
    full of them at most ``budget`` seconds in all: what is still unjudged then counts as wrong, is counted in
    ``budget_cuts`` and logged, and is not cached (a later batch judges it again)."""

    def __init__(self, timeout: float = 5.0, workers: int | None = None, cache_size: int = 65536,
                 budget: float = 5.0) -> None:
        if timeout <= 0 or budget <= 0:
            raise ValueError(f"timeout and budget must be positive, got {timeout} and {budget}")
        self.timeout, self.budget = float(timeout), float(budget)
        self.num_workers = workers if workers is not None else max(2, min(8, (os.cpu_count() or 2) - 1))
        self.cache_size = cache_size
        self.timeouts = 0  # calls cut off so far
        self.budget_cuts = 0  # calls left unjudged when a batch's budget ran out
        self.crashes = 0  # workers that died on a call
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())

    def check(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """For each (a, b): is ``float(verify(parse(a), parse(b))) > 0``? Exceptions and time-outs are False."""
        with self._lock:
            results: list[bool | None] = [self._cache.get(p) for p in pairs]
            todo: dict[tuple[str, str], list[int]] = {}
            for i, (pair, res) in enumerate(zip(pairs, results)):
                if res is None:
                    todo.setdefault(pair, []).append(i)
            if todo:
                verdicts, unjudged = self._run(list(todo))
                for j, (pair, ok) in enumerate(zip(todo, verdicts)):
                    for i in todo[pair]:
                        results[i] = ok
                    if j not in unjudged:
                        self._remember(pair, ok)
                if unjudged:
                    self.budget_cuts += len(unjudged)
                    log.warning("math-verify: %d of %d answer checks were still unjudged after this batch's budget "
                                "of %gs and count as wrong", len(unjudged), len(todo), self.budget)
            return [bool(r) for r in results]

    def _remember(self, pair: tuple[str, str], ok: bool) -> None:
        self._cache[pair] = ok
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _start(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._stderr.fileno()))

    def _worker_error(self) -> RuntimeError:
        self._stderr.seek(0)
        tail = self._stderr.read()[-2000:].decode(errors="replace")
        return RuntimeError(f"the math-verify worker process exited before it was ready:\n{tail}")

    def _run(self, jobs: list[tuple[str, str]]) -> tuple[list[bool], set[int]]:
        """The verdicts of ``jobs``, and the indices left unjudged when the budget ran out."""
        self._start()
        results = [False] * len(jobs)
        judged: set[int] = set()
        next_job = 0
        done = 0
        batch_deadline = float("inf")  # set when the first job goes out: worker start-up is not charged
        selector = selectors.DefaultSelector()
        try:
            for w in self._workers:
                selector.register(w.proc.stdout, selectors.EVENT_READ, w)  # type: ignore[arg-type]
            while done < len(jobs):
                for w in self._workers:
                    if w.ready and w.job is None and next_job < len(jobs):
                        now = time.monotonic()
                        batch_deadline = min(batch_deadline, now + self.budget)
                        w.job, w.deadline = next_job, min(now + self.timeout, batch_deadline)
                        next_job += 1
                        # on a broken pipe the read side sees the exit and retires the job
                        with contextlib.suppress(BrokenPipeError, OSError):
                            write_message(w.proc.stdin, jobs[w.job])  # type: ignore[arg-type]
                if time.monotonic() >= batch_deadline:  # out of budget: stop the busy workers, judge no more
                    for w in list(self._workers):
                        if w.job is not None:
                            self._retire(w, selector)
                    break
                busy = [w.deadline for w in self._workers if w.job is not None]
                wait = max(0.0, min(busy) - time.monotonic()) if busy else None
                for key, _ in selector.select(wait):
                    w = key.data
                    try:
                        reply = read_message(w.proc.stdout)  # type: ignore[arg-type]
                    except (EOFError, OSError, struct.error, ValueError):
                        reply = None
                    if reply is None:  # the worker died
                        if not w.ready:
                            raise self._worker_error()
                        self.crashes += 1
                        if w.job is not None:
                            judged.add(w.job)  # wrong: the worker died on it
                        done += self._retire(w, selector)
                    elif reply == "ready":
                        w.ready = True
                    else:
                        assert w.job is not None
                        results[w.job] = bool(reply)
                        judged.add(w.job)
                        w.job = None
                        done += 1
                now = time.monotonic()
                for w in list(self._workers):
                    if w.job is not None and now >= w.deadline and now < batch_deadline:
                        self.timeouts += 1
                        judged.add(w.job)  # a time-out is a verdict: wrong, and cached as such
                        done += self._retire(w, selector)
        finally:
            selector.close()
        return results, set(range(len(jobs))) - judged

    def _retire(self, worker: _Worker, selector: selectors.BaseSelector) -> int:
        """Kill a stuck or dead worker (its job stays False) and start a fresh one in its place."""
        selector.unregister(worker.proc.stdout)  # type: ignore[arg-type]
        had_job = worker.job is not None
        worker.kill()
        fresh = _Worker(self._stderr.fileno())
        self._workers[self._workers.index(worker)] = fresh
        selector.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)  # type: ignore[arg-type]
        return int(had_job)

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.kill()
            self._workers.clear()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """A process-wide verifier, started on first use and stopped at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
            atexit.register(_default.close)
        return _default
