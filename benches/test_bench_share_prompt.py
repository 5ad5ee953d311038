"""Each prompt once per group against the prompt repeated G times (benches/share_prompt_probe.py, one process per
layout): FLOPs counted on the same code path, wall time of the update and of the reference pass, peak memory, at
Qwen2-VL-2B's widths with the depth cut (2 text layers of 1536, 2 vision blocks of 1280, V = 151,936), one
~400k-pixel image per prompt, G = 4. The two layouts' log-probs are checked equal first.

The same at Qwen3-VL-2B's widths (2 text layers of 2048 with deepstack, 2 vision blocks of 1024, V = 151,936) and
at a 2B-class Qwen3.5 (4 text layers: three Gated DeltaNet, one full attention; V = 248,320).

Shape: ``R1VL_SHARE_PROBE`` = ``COMPLETION_TOKENS,PIXELS`` (default ``256,400000``, the issue's CPU shape);
families: ``R1VL_SHARE_PROBE_ARCHS`` (default ``qwen2-vl,qwen3-vl,qwen3.5``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).parent / "share_prompt_probe.py"
if not Path("/proc/self/clear_refs").exists():
    pytest.skip("the memory probe reads Linux's /proc/self/status", allow_module_level=True)


ARCHS = os.environ.get("R1VL_SHARE_PROBE_ARCHS", "qwen2-vl,qwen3-vl,qwen3.5").split(",")


def _probe(layout: str, completion: int, pixels: int, arch: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(PROBE), layout, "--completion", str(completion), "--pixels",
                          str(pixels), "--arch", arch], capture_output=True, text=True, env=env, timeout=1800,
                         cwd=PROBE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_against_repeated_prompt(benchmark, arch: str) -> None:
    completion, pixels = (int(v) for v in os.environ.get("R1VL_SHARE_PROBE", "256,400000").split(","))
    shared, repeated = _probe("shared", completion, pixels, arch), _probe("repeated", completion, pixels, arch)
    assert shared["logp_sum"] == pytest.approx(repeated["logp_sum"], rel=1e-5)
    assert shared["ref_logp_sum"] == pytest.approx(repeated["ref_logp_sum"], rel=1e-5)
    print(f"\n{arch}: prompt {shared['prompt_tokens']} tokens ({shared['image_tokens']} image), G = 4 x "
          f"{completion} completion tokens, CPU:")
    for key in ("update_TFLOP", "backbone_TFLOP", "update_seconds", "reference_seconds", "update_peak_extra_MB"):
        print(f"  {key:22} repeated {repeated[key]:9.3f}  shared {shared[key]:9.3f}  "
              f"({repeated[key] / shared[key]:.2f}x)")
    assert shared["backbone_TFLOP"] < repeated["backbone_TFLOP"] / 2  # counted, not timed: deterministic
    benchmark.extra_info.update(shared=shared, repeated=repeated)
