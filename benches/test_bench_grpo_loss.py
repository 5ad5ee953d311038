"""GRPO loss, forward + backward, at Qwen2-VL's vocabulary (V = 151,936, bf16 logits), GPU only.

Eager TRL-style PyTorch (baseline) vs the same under torch.compile vs Liger-Kernel's ``triton_grpo_loss`` (when
installed) vs r1vl_fast's fused kernel. Each implementation's loss is checked against the baseline's first.
``extra_info`` records the peak extra memory beyond the inputs and the achieved bandwidth against the two-pass
floor (read every logit once, write every gradient once).

Run: pytest benches/test_bench_grpo_loss.py --benchmark-only   (needs a CUDA device)
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GRPO-loss benchmarks need a CUDA GPU; this machine has none", allow_module_level=True)

from r1vl_fast.ops import GRPOConfig, grpo_loss  # noqa: E402
from r1vl_fast.ops import reference as ref  # noqa: E402

VOCAB = 151_936
SIZES = [(1, 1024), (8, 1024), (16, 2048)]  # (B, T); 8 x 1024 is the headline
ROUNDS = 10


def _inputs(batch: int, length: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, length, VOCAB, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.randint(0, VOCAB, (batch, length), device="cuda", generator=g)
    mask = torch.ones(batch, length, device="cuda", dtype=torch.bool)
    adv = torch.randn(batch, device="cuda", generator=g)
    ref_logp = -12 + torch.randn(batch, length, device="cuda", generator=g) * 0.1
    return logits, ids, mask, adv, ref_logp


def _eager(logits, ids, mask, adv, ref_logp):
    return ref.grpo_loss(logits, ids, mask, adv, ref.GRPOConfig(beta=0.04), ref_logp=ref_logp)[0]


_compiled = torch.compile(_eager)


def _ours(logits, ids, mask, adv, ref_logp):
    return grpo_loss(logits, ids, mask, adv, GRPOConfig(beta=0.04), ref_logp=ref_logp, impl="triton")[0]


def _liger(logits, ids, mask, adv, ref_logp):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    # Liger reads [B, T + 1, V] logits (the position after the last completion token is skipped).
    padded = torch.nn.functional.pad(logits, (0, 0, 0, 1))
    per_token, *_ = triton_grpo_loss(padded, None, ref_logp, ids, adv, mask.int(), temperature=1.0, beta=0.04,
                                     eps_low=0.2, eps_high=0.2, inplace=True)
    m = mask.float()
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


IMPLS = {"eager": _eager, "torch_compile": _compiled, "liger": _liger, "r1vl_fast": _ours}


@pytest.mark.parametrize("size", SIZES, ids=[f"{b}x{t}" for b, t in SIZES])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_grpo_loss_forward_backward(benchmark, impl, size):
    if impl == "liger":
        pytest.importorskip("liger_kernel", reason="pip install liger-kernel to compare against it")
    batch, length = size
    logits, ids, mask, adv, ref_logp = _inputs(batch, length)
    fn = IMPLS[impl]
    want = _eager(logits.float(), ids, mask, adv, ref_logp).item()
    got = fn(logits.detach().clone().requires_grad_(), ids, mask, adv, ref_logp).item()
    assert abs(got - want) <= 1e-3 * max(1.0, abs(want)), (impl, got, want)

    def step():
        x = logits.detach().requires_grad_()
        fn(x, ids, mask, adv, ref_logp).backward()
        torch.cuda.synchronize()

    step()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    extra = torch.cuda.max_memory_allocated() - base
    benchmark.group = f"grpo_loss {batch}x{length}"
    benchmark.extra_info["baseline"] = impl == "eager"
    benchmark.extra_info["peak_extra_GB"] = round(extra / 1e9, 3)
    benchmark.extra_info["logits_GB"] = round(logits.numel() * 2 / 1e9, 3)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    floor_bytes = 2 * logits.numel() * logits.element_size()
    benchmark.extra_info["achieved_TBps_vs_two_pass_floor"] = round(floor_bytes / benchmark.stats["median"] / 1e12, 3)
