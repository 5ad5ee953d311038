"""Benchmark helpers: after a run, print each group's medians as ratios against its named baseline."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# Without a GPU the loss checks run the Triton kernels through the interpreter, chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    terminalreporter.section("speed-up against the baseline of each group (median; > 1 is faster)")
    for group, benches in groups.items():
        base = [b for b in benches if b.extra_info.get("baseline")]
        if not base:
            continue
        ref = base[0].stats.median
        terminalreporter.write_line(f"[{group}] baseline: {base[0].name} = {ref * 1e3:.2f} ms")
        for b in sorted(benches, key=lambda b: b.stats.median):
            terminalreporter.write_line(f"  {ref / b.stats.median:8.1f}x  {b.stats.median * 1e3:9.2f} ms  {b.name}")
