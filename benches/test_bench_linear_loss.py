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


@pytest.mark.skipif(not __import__("torch").cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("width, tokens", [(1536, 8 * 1024), (3584, 8 * 1024), (1536, 16 * 2048)])
def test_fused_lm_head_loss_on_gpu(benchmark, width: int, tokens: int) -> None:
    """On a GPU, bf16, Qwen2-VL-2B / 7B widths: peak memory beyond the inputs and gradients, and median time of a
    loss forward + backward, for ours, the materialised logits with our fused Triton loss, and Liger's
    LigerFusedLinearGRPOLoss when it is installed. Gradients checked against ours first."""
    import time

    import torch

    from r1vl_fast.ops import GRPOConfig, grpo_loss, linear_grpo_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    group, length = 4, tokens // 4
    hidden0 = torch.randn(group, length, width, device="cuda", generator=g).bfloat16()
    weight0 = (torch.randn(151_936, width, device="cuda", generator=g) * 0.02).bfloat16()
    ids = torch.randint(0, 151_936, (group, length), device="cuda", generator=g)
    mask = torch.ones(group, length, dtype=torch.bool, device="cuda")
    rewards = torch.rand(group, device="cuda", generator=g)
    config = GRPOConfig(beta=0.0, group_size=group)

    def fused(h, w):
        return linear_grpo_loss(h, w, ids, mask, config=config, rewards=rewards)[0]

    def materialised(h, w):
        return grpo_loss(h @ w.T, ids, mask, config=config, rewards=rewards, validate=False)[0]

    paths = {"fused": fused, "materialised": materialised}
    if importlib.util.find_spec("liger_kernel"):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo")
        r = rewards.view(-1, group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
        paths["liger"] = lambda h, w: liger(h, w, ids, mask.long(), adv)[0]
    results = {}
    grads = {}
    for name, fn in paths.items():
        h, w = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        fn(h, w).backward()  # warm-up (compiles, autotunes)
        times = []
        for _ in range(3):
            h.grad = w.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            fn(h, w).backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        grad_bytes = h.numel() * 2 + w.numel() * 2
        results[name] = {"ms": 1e3 * sorted(times)[1],
                         "peak_extra_GB": (torch.cuda.max_memory_allocated() - base - grad_bytes) / 2**30}
        grads[name] = (h.grad.float(), w.grad.float())
    for name in paths:
        torch.testing.assert_close(grads[name][0], grads["fused"][0], rtol=2e-2, atol=2e-3)
    print(f"\nbf16, H {width}, {tokens} tokens:", json.dumps(results))
    benchmark.extra_info.update(results)
    benchmark.pedantic(lambda: None, rounds=1)
