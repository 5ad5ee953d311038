"""The trainer's loss path holds nothing logits-sized beyond the logits themselves, on CPU at Qwen2-VL's vocabulary
(benches/loss_memory_probe.py). The earlier path (a sliced view, a separate gradient buffer, the accumulation scale
applied in backward) is measured beside it.

Shape: ``R1VL_MEMORY_PROBE_SHAPE`` (default ``2x128``; ``docs/PERFORMANCE.md`` records ``2x512``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).parent / "loss_memory_probe.py"
if not Path("/proc/self/clear_refs").exists():
    pytest.skip("the memory probe reads Linux's /proc/self/status", allow_module_level=True)


def _probe(path: str) -> dict:
    batch, length = (int(v) for v in os.environ.get("R1VL_MEMORY_PROBE_SHAPE", "2x128").split("x"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(PROBE), path, str(batch), str(length)], capture_output=True, text=True,
                         env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loss_path_peak_memory_beyond_the_logits(benchmark) -> None:
    trainer, sliced = _probe("trainer"), _probe("sliced")
    print(f"\nloss forward + backward, logits {trainer['logits_MB']:.0f} MB: peak extra "
          f"{trainer['peak_extra_MB']:.0f} MB ({trainer['peak_extra_in_logits']:.2f} x logits) on the trainer's path, "
          f"{sliced['peak_extra_MB']:.0f} MB ({sliced['peak_extra_in_logits']:.2f} x) sliced")
    assert trainer["grad_hidden_sum"] == pytest.approx(sliced["grad_hidden_sum"], rel=1e-4, abs=1e-3)
    assert trainer["peak_extra_in_logits"] < 0.15  # O(B·T) buffers and the head's input gradient only
    assert sliced["peak_extra_in_logits"] > 1.5  # a gradient buffer and the slice's zeroed full-size copy
    benchmark.extra_info.update(trainer=trainer, sliced=sliced)
