"""The compiled Triton kernels on a GPU against the fp64 reference, at Qwen2-VL's vocabulary.

Run on a CUDA machine with: TRITON_INTERPRET=0 pytest tests/test_grpo_ops_cuda.py
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU and TRITON_INTERPRET=0", allow_module_level=True)

from r1vl_fast.ops import GRPOConfig, grpo_loss, selective_log_probs  # noqa: E402
from r1vl_fast.ops import reference as ref  # noqa: E402

V = 151_936


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_fused_loss_matches_fp64_on_gpu(dtype, loss_type):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(3, 17, V, device="cuda", generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (3, 17), device="cuda", generator=g)
    mask = torch.rand(3, 17, device="cuda", generator=g) > 0.2
    mask[1] = False
    adv = torch.randn(3, device="cuda", generator=g)
    ref_logp = ref.selective_log_probs(logits.double(), ids) + 0.1
    old = ref_logp - 0.2
    x = logits.clone().requires_grad_()
    config = GRPOConfig(loss_type=loss_type)
    loss, _ = grpo_loss(x, ids, mask, adv, config, old_logp=old.float(), ref_logp=ref_logp.float(), impl="triton")
    loss.backward()
    x64 = logits.double().requires_grad_()
    loss64, _ = grpo_loss(x64, ids, mask, adv.double(), config, old_logp=old, ref_logp=ref_logp, impl="torch")
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1e-3, abs(loss64.item()))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (x.grad.double() - x64.grad).abs().max() <= tol * x64.grad.abs().max()


def test_log_probs_no_grad_on_gpu():
    logits = torch.randn(2, 5, V, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, V, (2, 5), device="cuda")
    with torch.no_grad():
        got = selective_log_probs(logits, ids)
    want = ref.selective_log_probs(logits.double(), ids)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
