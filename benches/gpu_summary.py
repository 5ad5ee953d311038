"""Gather what benches/gpu_check.sh wrote into one JSON object: the device, each stage's exit code and time, the
parity tests' outcome, the loss benchmark's table (median time, peak extra memory, TB/s per implementation and
shape), the fused LM-head benchmark, and the StepGRPO run's summary.

    python benches/gpu_summary.py runs/gpu_check > runs/gpu_check/summary.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any


def summarize(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").is_file() else None}
    steps = out / "steps.jsonl"
    summary["stages"] = [json.loads(line) for line in steps.read_text().splitlines()] if steps.is_file() else []
    parity = out / "parity.log"
    if parity.is_file():
        tail = parity.read_text().strip().splitlines()[-1:] or [""]
        summary["parity"] = tail[0]
        summary["parity_failures"] = re.findall(r"^FAILED (.*)$", parity.read_text(), re.MULTILINE)
    bench = out / "loss_bench.json"
    if bench.is_file():
        rows = []
        for b in json.loads(bench.read_text())["benchmarks"]:
            info = b.get("extra_info", {})
            rows.append({"name": b["name"], "group": b.get("group"), "median_ms": round(b["stats"]["median"] * 1e3, 2),
                         **{k: info[k] for k in ("peak_extra_GB", "peak_extra_in_logits", "logits_GB",
                                                 "achieved_TBps_vs_two_pass_floor", "grad_max_rel_err") if k in info}})
        summary["loss_bench"] = rows
    linear = out / "linear_bench.json"
    if linear.is_file():  # the LM head fused in: each path's median time and peak memory, per shape
        summary["linear_bench"] = {b["name"]: b.get("extra_info", {})
                                   for b in json.loads(linear.read_text())["benchmarks"]}
    for key, folder in (("train_step", "step"), ("train_step_qwen3_vl", "step-qwen3-vl"),
                        ("train_step_qwen3_5", "step-qwen3.5")):
        step = out / folder / "summary.json"
        if step.is_file():
            summary[key] = json.loads(step.read_text())
    return summary


if __name__ == "__main__":
    print(json.dumps(summarize(Path(sys.argv[1])), indent=1))
