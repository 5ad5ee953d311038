"""The compiled Triton kernels on a GPU against the fp64 reference, at Qwen2-VL's vocabulary.

Run on a CUDA machine with: TRITON_INTERPRET=0 pytest tests/test_grpo_ops_cuda.py   (benches/gpu_check.sh does)
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA GPU and TRITON_INTERPRET=0", allow_module_level=True)

from r1vl_fast.ops import GRPOConfig, grpo_loss, selective_log_probs  # noqa: E402
from r1vl_fast.ops import reference as ref  # noqa: E402

V = 151_936


def _case(batch: int, length: int, dtype: torch.dtype, seed: int = 0):
    """The trainer's layout: logits [B, T + 1, V] as the model returns them, the completion ids [B, T]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(batch, length + 1, V, device="cuda", generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (batch, length), device="cuda", generator=g)
    mask = torch.rand(batch, length, device="cuda", generator=g) > 0.2
    mask[1] = False  # a fully masked sequence
    logp = ref.selective_log_probs(logits[:, :-1].double(), ids)
    old = logp + 0.3 * torch.randn(batch, length, device="cuda", generator=g, dtype=torch.float64)
    ref_logp = logp + 0.2 * torch.randn(batch, length, device="cuda", generator=g, dtype=torch.float64)
    is_w = 0.5 + torch.rand(batch, length, device="cuda", generator=g, dtype=torch.float64)
    rewards = torch.rand(batch, device="cuda", generator=g)
    return logits, ids, mask, old, ref_logp, is_w, rewards


@pytest.mark.parametrize(("dtype", "loss_type", "kl", "clip"), [
    (torch.float32, "grpo", "k3", {}),
    (torch.bfloat16, "grpo", "k3", {}),
    (torch.bfloat16, "dapo", "k1", {"eps_high": 0.28, "delta": 1.6}),
    (torch.float32, "bnpo", "k2", {"delta": 1.5}),
    (torch.float16, "dr_grpo", "k3", {"eps_high": 0.28}),
])
def test_fused_loss_in_the_trainers_layout_matches_fp64(dtype, loss_type, kl, clip):
    """Every loss feature (old policy, KL, importance weights, clip variants, rewards normalised in the kernel,
    entropy), the model's [B, T + 1, V] buffer with its gradient written in place and a loss scale."""
    logits, ids, mask, old, ref_logp, is_w, rewards = _case(4, 37, dtype)
    config = GRPOConfig(beta=0.04, kl=kl, loss_type=loss_type, group_size=2, max_completion_length=40, **clip)
    x = logits.clone().requires_grad_()
    buffer = x * 1  # a non-leaf buffer, as the LM head's output
    loss, m = grpo_loss(buffer, ids, mask, config=config, rewards=rewards, old_logp=old.float(),
                        ref_logp=ref_logp.float(), is_weights=is_w.float(), loss_scale=0.5, last_position_unused=True,
                        grad_inplace=True, validate=False, return_entropy=True, impl="triton")
    loss.backward()
    x64 = logits[:, :-1].double().requires_grad_()
    loss64, m64 = grpo_loss(x64, ids, mask, config=config, rewards=rewards.double(), old_logp=old,
                            ref_logp=ref_logp, is_weights=is_w, return_entropy=True, impl="torch")
    (loss64 * 0.5).backward()
    assert abs(loss.item() - 0.5 * loss64.item()) <= 1e-5 * max(1e-3, abs(loss64.item()))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert (x.grad[:, :-1].double() - x64.grad).abs().max() <= tol * x64.grad.abs().max()
    assert torch.all(x.grad[:, -1] == 0)
    for name in ("kl", "clip_region", "entropy"):
        assert m[name].item() == pytest.approx(m64[name].item(), rel=1e-3, abs=1e-5), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_and_their_gradient_on_gpu(dtype):
    logits, ids, *_ = _case(2, 9, dtype, seed=1)
    view = logits[:, :-1]  # the no-grad old / reference pass reads the model's buffer through a view
    with torch.no_grad():
        got = selective_log_probs(view, ids, validate=False)
    want = ref.selective_log_probs(view.double(), ids)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    x = view.clone().requires_grad_()
    logp, ent = selective_log_probs(x, ids, return_entropy=True, impl="triton")
    (logp.sum() + ent.sum()).backward()
    x64 = view.double().requires_grad_()
    logp64, ent64 = ref.selective_log_probs(x64, ids, return_entropy=True)
    (logp64.sum() + ent64.sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (x.grad.double() - x64.grad).abs().max() <= tol * x64.grad.abs().max()


def test_more_than_2_31_logits_reach_the_last_rows():
    """[2, 7200, 151936] bf16 holds 2.19e9 > 2^31 logits: 64-bit offsets must reach the last rows."""
    batch, length = 2, 7200
    logits = torch.empty(batch, length + 1, V, device="cuda", dtype=torch.bfloat16).normal_(0, 2)
    assert logits.numel() > 2**31
    ids = torch.randint(0, V, (batch, length), device="cuda")
    mask = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    mask[:, -3:] = True  # only the last rows count
    mask[0, :2] = True
    rows = [(0, 0), (0, 1), (0, length - 1), (1, length - 3), (1, length - 1)]
    want = {(b, t): ref.selective_log_probs(logits[b:b + 1, t:t + 1].double(), ids[b:b + 1, t:t + 1]).reshape(())
            for b, t in rows}
    x = logits.requires_grad_()
    buffer = x * 1  # the gradient is written over this buffer
    loss, m = grpo_loss(buffer, ids, mask, torch.tensor([1.0, -1.0], device="cuda"), GRPOConfig(beta=0.0),
                        last_position_unused=True, grad_inplace=True, validate=False, impl="triton")
    for (b, t), logp in want.items():
        assert (m["logp"][b, t].double() - logp).abs() <= 1e-4 * logp.abs()
    loss.backward()
    for b, t in rows[2:]:
        row = x.grad[b, t].float()
        assert row.abs().sum() > 0 and torch.isfinite(row).all()
        assert abs(row.sum().item()) <= 1e-2  # Σ_j (onehot − p) = 0
    assert torch.all(x.grad[:, -1] == 0)


def test_no_host_sync_on_the_trainers_loss_path():
    logits, ids, mask, old, ref_logp, is_w, rewards = _case(4, 33, torch.bfloat16, seed=2)
    config = GRPOConfig(beta=0.04, group_size=2)
    def run(x: torch.Tensor):
        loss, _ = grpo_loss(x * 1, ids, mask, config=config, rewards=rewards, ref_logp=ref_logp.float(),
                            loss_scale=0.25, last_position_unused=True, grad_inplace=True, validate=False,
                            impl="triton")
        loss.backward()

    run(logits.clone().requires_grad_())  # compile the kernels first
    x = logits.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("entropy", "write"), list(itertools.product([False, True], [False, True])))
def test_every_kernel_variant_runs(entropy, write):
    logits, ids, mask, old, ref_logp, is_w, rewards = _case(2, 5, torch.bfloat16, seed=3)
    x = logits[:, :-1].clone().requires_grad_(write)
    loss, _ = grpo_loss(x, ids, mask, config=GRPOConfig(group_size=2), rewards=rewards, return_entropy=entropy,
                        impl="triton")
    want, _ = grpo_loss(x.detach().double(), ids, mask, config=GRPOConfig(group_size=2), rewards=rewards.double(),
                        impl="torch")
    assert loss.item() == pytest.approx(want.item(), rel=1e-3, abs=1e-6)


def test_torch_compile_with_inductor_keeps_one_graph():
    logits, ids, mask, old, ref_logp, is_w, rewards = _case(4, 33, torch.bfloat16, seed=4)
    config = GRPOConfig(beta=0.04, group_size=2)

    def step(x):
        loss, m = grpo_loss(x, ids, mask, config=config, rewards=rewards, ref_logp=ref_logp.float(),
                            last_position_unused=True, validate=False, impl="triton")
        return loss, m["kl"]

    compiled = torch.compile(step, fullgraph=True)
    x = logits.clone().requires_grad_()
    loss, kl = compiled(x)
    loss.backward()
    x_eager = logits.clone().requires_grad_()
    loss_eager, kl_eager = step(x_eager)
    loss_eager.backward()
    assert loss.item() == pytest.approx(loss_eager.item(), rel=1e-4, abs=1e-6)
    assert kl.item() == pytest.approx(kl_eager.item(), rel=1e-4, abs=1e-6)
    assert (x.grad.float() - x_eager.grad.float()).abs().max() <= 1e-2 * x_eager.grad.float().abs().max()


def test_an_unmasked_nan_logit_reaches_the_loss_on_gpu():
    """PTX min/max drop a NaN operand (the interpreter's numpy does not): the kernel must still return NaN."""
    logits, ids, mask, old, ref_logp, is_w, rewards = _case(2, 5, torch.bfloat16, seed=5)
    mask[0, 1] = True
    logits[0, 1, 7] = float("nan")
    for config in (GRPOConfig(group_size=2), GRPOConfig(group_size=2, beta=0.04, delta=1.5)):
        x = logits[:, :-1].clone().requires_grad_()
        loss, m = grpo_loss(x, ids, mask, config=config, rewards=rewards, old_logp=old.float(),
                            ref_logp=ref_logp.float(), impl="triton")
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(m["logp"][0, 1]) and torch.isnan(x.grad[0, 1].float()).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lm_head_log_probs_and_loss_on_gpu(dtype):
    """The LM head fused in (linear_log_probs: the tl.dot kernel; linear_grpo_loss: cuBLAS blocks) at Qwen2-VL-2B's
    widths, against the fp64 reference of the same (rounded) inputs."""
    from r1vl_fast.ops import linear_grpo_loss, linear_log_probs

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 300, 1536, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, 1536, device="cuda", generator=g) * 0.02).to(dtype)
    ids = torch.randint(0, V, (2, 300), device="cuda", generator=g)
    logits64 = hidden.double() @ weight.double().T
    want = ref.selective_log_probs(logits64, ids, temperature=0.9)
    got = linear_log_probs(hidden, weight, ids, temperature=0.9)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 2e-3)
    mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    config = GRPOConfig(beta=0.0, group_size=2, temperature=0.9)
    loss, m = linear_grpo_loss(hidden, weight, ids, mask, torch.tensor([1.0, -1.0], device="cuda"), config)
    torch.testing.assert_close(m["logp"].double(), want, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 2e-3)
