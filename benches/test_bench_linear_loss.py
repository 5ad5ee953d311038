"""The LM head fused into the GRPO loss (``linear_grpo_loss``, the trainer's default) against the materialised-logits
paths, on CPU at Qwen2-VL-2B's widths (H = 1536, V = 151,936): peak memory beyond the inputs and the two gradients,
and time, one process per path (benches/linear_loss_probe.py), each path's gradients checked against the others
first. Liger-Kernel's ``LigerFusedLinearGRPOLoss`` joins when it is installed.

Tokens: ``R1VL_LINEAR_PROBE_TOKENS`` (default 1024, the shape of the issue's memory target).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).parent / "linear_loss_probe.py"
if not Path("/proc/self/clear_refs").exists():
    pytest.skip("the memory probe reads Linux's /proc/self/status", allow_module_level=True)


def _probe(path: str, tokens: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(PROBE), path, str(tokens)], capture_output=True, text=True, env=env,
                         timeout=1800, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_lm_head_loss_memory_and_time_against_materialised_logits(benchmark) -> None:
    tokens = int(os.environ.get("R1VL_LINEAR_PROBE_TOKENS", "1024"))
    paths = ["fused", "materialised", "trl"] + (["liger"] if importlib.util.find_spec("liger_kernel") else [])
    runs = {p: _probe(p, tokens) for p in paths}
    fused = runs["fused"]
    print(f"\nGRPO loss + LM head, forward + backward, {tokens} tokens, H 1536, V 151,936, fp32, CPU "
          f"(logits {fused['logits_MB']:.0f} MB):")
    for name, r in runs.items():
        print(f"  {name:13} peak extra {r['peak_extra_MB']:7.0f} MB ({r['peak_extra_in_logits']:.2f} x logits), "
              f"{r['seconds']:6.2f} s ({r['seconds'] / fused['seconds']:.2f} x fused)")
    for name, r in runs.items():  # the same gradients, whatever the path
        assert r["grad_hidden_sum"] == pytest.approx(fused["grad_hidden_sum"], rel=1e-4), name
        assert r["grad_weight_sum"] == pytest.approx(fused["grad_weight_sum"], rel=1e-4), name
    if tokens >= 1024:  # blocks of 82 tokens: the bound holds from 1024 tokens on
        assert fused["peak_extra_in_logits"] <= 0.25
    assert runs["trl"]["peak_extra_in_logits"] > 1.5  # logits and log-softmax at least
    benchmark.extra_info.update(runs)
