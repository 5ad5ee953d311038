"""The Triton policy-update kernels (run by the interpreter on CPU) against the fp64 PyTorch reference."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these tests run the kernels on CPU tensors through TRITON_INTERPRET=1", allow_module_level=True)

from r1vl_fast.ops import GRPOConfig, group_advantages, grpo_loss, selective_log_probs
from r1vl_fast.ops import reference as ref


def _logits(b: int, t: int, v: int, seed: int, *, extreme: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, v, generator=g) * 3
    if extreme:  # huge logits and masked-out (−inf) vocabulary entries
        x.view(-1)[torch.randint(0, x.numel(), (x.numel() // 50,), generator=g)] = 1e4
        x.view(-1)[torch.randint(0, x.numel(), (x.numel() // 10,), generator=g)] = float("-inf")
    return x


def _ids(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """Sampled-like ids: never a −inf entry."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(logits.double().nan_to_num(neginf=-1e30), -1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=g).reshape(logits.shape[:2])


FP32_EPS = torch.finfo(torch.float32).eps


def _conditioning(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """Relative error fp32 arithmetic allows at these logits: log p = z − lse loses ~eps·|z| absolutely."""
    z_scale = logits[torch.isfinite(logits)].abs().max().item() / temperature
    return max(1e-5, 8 * FP32_EPS * z_scale)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, scale: float | None = None) -> None:
    """max |got − want| ≤ rel · scale, scale = max |want| unless given (log-probs of logits near ±1e4 are
    differences of ~1e4-sized fp32 numbers: their error scales with the logits, in any fp32 implementation)."""
    scale = want.abs().max().clamp(min=1e-30) if scale is None else torch.tensor(scale)
    err = (got.double() - want.double()).abs().max()
    assert err <= rel * scale, f"max error {err.item():.3g} vs scale {scale.item():.3g}"


# ---------------------------------------------------------------------------------------- selective log-probs


@pytest.mark.parametrize(("shape", "temperature", "extreme"),
                         [((2, 3, 1000), 1.0, False), ((3, 1, 1537), 0.7, True), ((1, 4, 3001), 1.3, True)])
def test_selective_log_probs_and_gradients_match_fp64(shape, temperature, extreme):
    logits = _logits(*shape, seed=1, extreme=extreme)
    ids = _ids(logits, 2)
    x = logits.clone().requires_grad_()
    logp, ent = selective_log_probs(x, ids, temperature=temperature, return_entropy=True, impl="triton")
    x64 = logits.double().requires_grad_()
    logp64, ent64 = ref.selective_log_probs(x64, ids, temperature=temperature, return_entropy=True)
    assert logp.dtype == torch.float32
    z_scale = max(1.0, logits[torch.isfinite(logits)].abs().max().item() / temperature)
    _close(logp, logp64, 1e-6, z_scale)
    _close(ent, ent64, 1e-5, z_scale)
    g = torch.Generator().manual_seed(3)
    up_logp, up_ent = torch.randn(shape[:2], generator=g), torch.randn(shape[:2], generator=g)
    up_logp[0, 0] = 0  # a row with zero upstream gradient for log p
    ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()
    ((logp64 * up_logp).sum() + (ent64 * up_ent).sum()).backward()
    _close(x.grad, x64.grad, _conditioning(logits, temperature))


def test_no_grad_log_probs_equal_the_differentiable_ones():
    logits = _logits(2, 3, 777, seed=4)
    ids = _ids(logits, 5)
    with torch.no_grad():
        a = selective_log_probs(logits, ids, impl="triton")
    b = selective_log_probs(logits.clone().requires_grad_(), ids, impl="triton")
    assert torch.equal(a, b.detach())


def test_bf16_and_strided_logits():
    big = _logits(3, 6, 1001, seed=6).to(torch.bfloat16)
    logits = big[:, 1:5, :].transpose(0, 1)  # [4, 3, V]: strided in B and T, contiguous in V
    ids = _ids(logits.float(), 7)
    got = selective_log_probs(logits, ids, impl="triton")
    want = ref.selective_log_probs(logits.double(), ids)
    _close(got, want, 1e-6)


def test_reference_gradcheck_fp64():
    logits = torch.randn(2, 2, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3], [6, 1]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([0.5, -1.0], dtype=torch.float64)
    old = torch.randn(2, 2, dtype=torch.float64) * 0.1 - 2
    refl = torch.randn(2, 2, dtype=torch.float64) * 0.1 - 2
    cfg = ref.GRPOConfig(beta=0.1, eps_low=0.5, eps_high=0.5)

    def f(x):
        return ref.grpo_loss(x, ids, mask, adv, cfg, old_logp=old, ref_logp=refl)[0]

    assert torch.autograd.gradcheck(f, (logits,))
    assert torch.autograd.gradcheck(lambda x: ref.selective_log_probs(x, ids, return_entropy=True), (logits,))


# ---------------------------------------------------------------------------------------- advantages


def test_group_advantages_formula():
    r = torch.tensor([1.0, 0.0, 1.1, 0.1, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    first = r[:4]
    torch.testing.assert_close(a[:4], (first - first.mean()) / (first.std() + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards: A = 0
    torch.testing.assert_close(group_advantages(r, 4, scale="none")[:4], first - first.mean())
    torch.testing.assert_close(group_advantages(r, 4, scale="batch"), (r - r.view(2, 4).mean(1).repeat_interleave(4))
                               / (r.std() + 1e-4))
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match=r"rewards\[2\]"):
        group_advantages(torch.tensor([0.0, 1.0, float("nan"), 1.0]), 2)


# ---------------------------------------------------------------------------------------- the GRPO loss

B, T, V = 4, 5, 1000


def _case(seed: int, *, extreme: bool = False, dtype: torch.dtype = torch.float32):
    logits = _logits(B, T, V, seed, extreme=extreme).to(dtype)
    ids = _ids(logits.float(), seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False  # a fully masked sequence
    logp = ref.selective_log_probs(logits.double(), ids)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios outside the clip range
    refl = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    isw = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[2] = 0.0  # an A = 0 sequence
    return logits, ids, mask, old, refl, isw, adv


def _compare(kwargs: dict, *, seed: int = 10, extreme: bool = False, dtype=torch.float32, rel: float = 1e-5,
             old=True, refp=True, isw=False, rewards=False):
    logits, ids, mask, old_logp, ref_logp, is_w, adv = _case(seed, extreme=extreme, dtype=dtype)
    rel = max(rel, _conditioning(logits.float(), kwargs.get("temperature", 1.0)))
    extra64 = dict(old_logp=old_logp if old else None, ref_logp=ref_logp if refp else None,
                   is_weights=is_w if isw else None)
    extra32 = {k: (None if v is None else v.float()) for k, v in extra64.items()}
    kwargs = dict(kwargs)
    call = {"num_items": kwargs.pop("num_items")} if "num_items" in kwargs else {}
    if rewards:
        r = torch.tensor([1.0, 0.0, 1.1, 0.1, 0.5, 0.5, 0.5, 0.5])[:B]
        a32, a64 = dict(rewards=r), dict(rewards=r.double())
        kwargs["group_size"] = 2
    else:
        a32, a64 = dict(advantages=adv.float()), dict(advantages=adv)
    cfg = GRPOConfig(**kwargs)
    x = logits.clone().requires_grad_()
    loss, metrics = grpo_loss(x, ids, mask, config=cfg, **a32, **extra32, **call, return_entropy=True, impl="triton")
    loss.backward()
    x64 = logits.double().requires_grad_()
    loss64, metrics64 = grpo_loss(x64, ids, mask, config=cfg, **a64, **extra64, **call, return_entropy=True,
                                  impl="torch")
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= rel * max(1e-6, abs(loss64.item())), (loss.item(), loss64.item())
    grad_rel = rel if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to bf16
    _close(x.grad, x64.grad, grad_rel)
    for name in ("kl", "clip_low", "clip_high", "clip_region", "entropy"):
        assert abs(metrics[name].item() - metrics64[name].item()) <= 1e-4 * max(1.0, abs(metrics64[name].item())), name
    _close(metrics["advantages"], metrics64["advantages"], 1e-5)
    return x, x64, mask


@pytest.mark.parametrize(("loss_type", "kl"), list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"],
                                                                      ["k1", "k2", "k3"])))
def test_loss_types_and_kl_estimators(loss_type, kl):
    _compare(dict(loss_type=loss_type, kl=kl, beta=0.04, max_completion_length=8, num_items=11))


@pytest.mark.parametrize("clip", [dict(eps_low=0.2), dict(eps_low=0.1, eps_high=0.28), dict(eps_low=0.2, delta=1.5)])
@pytest.mark.parametrize("isw", [False, True])
def test_clipping_and_importance_weights(clip, isw):
    _compare(dict(beta=0.04, **clip), isw=isw, seed=20)


def test_on_policy_r1vl_default():
    """μ = 1 (old_logp=None): ratio = exp(logp − sg(logp)) = 1, the gradient is −A·∇logp plus β·∇KL."""
    x, x64, mask = _compare(dict(beta=0.04), old=False)
    rows_without_grad = ~mask  # masked tokens get no gradient
    assert torch.all(x.grad[rows_without_grad] == 0)


def test_zero_advantage_without_kl_skips_rows_but_agrees():
    x, _, mask = _compare(dict(beta=0.0), old=False, refp=False)
    assert torch.all(x.grad[2] == 0) and torch.all(x.grad[1] == 0)  # A = 0 row, fully masked row


def test_extreme_logits_and_temperature():
    _compare(dict(beta=0.04, temperature=0.7), extreme=True, seed=30)


def test_single_token_completions():
    logits = _logits(4, 1, 513, seed=40)
    ids = _ids(logits, 41)
    mask = torch.ones(4, 1, dtype=torch.long)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    x = logits.clone().requires_grad_()
    grpo_loss(x, ids, mask, adv, impl="triton")[0].backward()
    x64 = logits.double().requires_grad_()
    grpo_loss(x64, ids, mask, adv.double(), impl="torch")[0].backward()
    _close(x.grad, x64.grad, 1e-5)


def test_bf16_inputs():
    _compare(dict(beta=0.04), dtype=torch.bfloat16, rel=1e-4, seed=50)


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_advantages_from_rewards_inside_the_kernel(scale):
    _compare(dict(beta=0.04, scale_rewards=scale), rewards=True, seed=60)


def test_gradient_scaling_and_single_backward():
    logits, ids, mask, old, refl, _, adv = _case(70)
    x = logits.clone().requires_grad_()
    loss, _ = grpo_loss(x, ids, mask, adv.float(), ref_logp=refl.float(), impl="triton")
    (loss / 4).backward(retain_graph=True)
    x64 = logits.double().requires_grad_()
    (grpo_loss(x64, ids, mask, adv, ref_logp=refl, impl="torch")[0] / 4).backward()
    _close(x.grad, x64.grad, 1e-5)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_grad_inplace_overwrites_logits_and_autograd_knows():
    logits, ids, mask, _, refl, _, adv = _case(80)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0  # a non-leaf buffer, as a model's lm_head output would be
    loss, _ = grpo_loss(x, ids, mask, adv.float(), ref_logp=refl.float(), grad_inplace=True, impl="triton")
    loss.backward()
    x64 = logits.double().requires_grad_()
    grpo_loss(x64, ids, mask, adv, ref_logp=refl, impl="torch")[0].backward()
    _close(leaf.grad, x64.grad, 1e-5)
    _close(x.detach(), x64.grad, 1e-5)  # the buffer now holds the gradient
    # Something else that saved these logits for its own backward must fail, not read the gradient.
    y = logits.clone().requires_grad_()
    z = y * 1.0
    saved = (z**2).sum()  # pow saves z
    grpo_loss(z, ids, mask, adv.float(), grad_inplace=True, impl="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_no_grad_loss_reads_once_and_agrees():
    logits, ids, mask, old, refl, _, adv = _case(90)
    with torch.no_grad():
        loss, m = grpo_loss(logits, ids, mask, adv.float(), old_logp=old.float(), ref_logp=refl.float(),
                            impl="triton")
    loss64, m64 = grpo_loss(logits.double(), ids, mask, adv, old_logp=old, ref_logp=refl, impl="torch")
    assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item())


def test_bad_inputs_are_named():
    logits, ids, mask, _, _, _, adv = _case(100)
    with pytest.raises(ValueError, match=r"ids\[0, 0\] = 1000 is outside"):
        bad = ids.clone()
        bad[0, 0] = V
        mask2 = mask.clone()
        mask2[0, 0] = True
        grpo_loss(logits, bad, mask2, adv.float(), impl="triton")
    padded = ids.clone()
    padded[~mask] = -100  # padding ids under the mask are fine
    grpo_loss(logits, padded, mask, adv.float(), impl="triton")
    with pytest.raises(ValueError, match="mask must have shape"):
        grpo_loss(logits, ids, mask[:, :2], adv.float())
    with pytest.raises(ValueError, match="contiguous in the vocabulary"):
        grpo_loss(logits.transpose(1, 2), ids, mask, adv.float())
    with pytest.raises(ValueError, match="exactly one of"):
        grpo_loss(logits, ids, mask)
    with pytest.raises(ValueError, match="kl must be one of"):
        grpo_loss(logits, ids, mask, adv.float(), GRPOConfig(kl="k4"))
    with pytest.raises(ValueError, match="only 0 and 1"):
        grpo_loss(logits, ids, mask.long() * 2, adv.float())
    with pytest.raises(ValueError, match="delta must exceed"):
        grpo_loss(logits, ids, mask, adv.float(), GRPOConfig(delta=1.1))


# ---------------------------------------------------------------------------------------- several blocks per row


def _blocky_logits(seed: int) -> torch.Tensor:
    """V = 1001 over blocks of 128 (a ragged last block of 105 columns), with −inf runs that straddle block edges and
    a row whose first two blocks are all −inf (the running max starts at −inf and stays there for two blocks)."""
    x = _logits(3, 5, 1001, seed=seed)
    x[:, :, 120:140] = float("-inf")  # across the edge at 128
    x[0, 1, :256] = float("-inf")  # two whole blocks
    x[1, 2, 990:] = float("-inf")  # the tail of the ragged block
    x[2, 3, 5] = 40.0  # a large maximum in the first block, then smaller ones
    return x


@pytest.mark.parametrize("programs", [1, 4, None])  # one program for all rows, a few, one per row
def test_several_vocabulary_blocks_per_row_and_the_persistent_row_loop(programs):
    from r1vl_fast.ops.launch import tuning

    logits = _blocky_logits(110)
    ids = _ids(logits, 111)
    with tuning(block_v=128, programs=programs):
        x = logits.clone().requires_grad_()
        logp, ent = selective_log_probs(x, ids, temperature=0.9, return_entropy=True, impl="triton")
        (logp.sum() + 0.5 * ent.sum()).backward()
    x64 = logits.double().requires_grad_()
    logp64, ent64 = ref.selective_log_probs(x64, ids, temperature=0.9, return_entropy=True)
    (logp64.sum() + 0.5 * ent64.sum()).backward()
    _close(logp, logp64, 1e-6, 50.0)
    _close(ent, ent64, 1e-5, 50.0)
    _close(x.grad, x64.grad, 1e-5)

    g = torch.Generator().manual_seed(112)
    mask = torch.rand(3, 5, generator=g) > 0.2
    old = logp64.detach() + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    refl = logp64.detach() + 0.2 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.2, 0.7])
    cfg = GRPOConfig(beta=0.04, group_size=3, temperature=0.9, delta=1.6)
    with tuning(block_v=128, programs=programs):
        x = logits.clone().requires_grad_()
        loss, m = grpo_loss(x, ids, mask, config=cfg, rewards=rewards, old_logp=old.float(), ref_logp=refl.float(),
                            return_entropy=True, impl="triton")
        loss.backward()
    x64 = logits.double().requires_grad_()
    loss64, m64 = grpo_loss(x64, ids, mask, config=cfg, rewards=rewards.double(), old_logp=old, ref_logp=refl,
                            return_entropy=True, impl="torch")
    loss64.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1e-6, abs(loss64.item()))
    _close(x.grad, x64.grad, 1e-5)
    for name in ("kl", "clip_region", "entropy"):
        assert m[name].item() == pytest.approx(m64[name].item(), rel=1e-4, abs=1e-6), name


# ---------------------------------------------------------------------------------------- the trainer's loss path


def test_the_models_logits_buffer_takes_its_own_gradient_in_place():
    """logits [B, T + 1, V] as the model returns them: the gradient lands in that buffer (the last position zero),
    scaled by loss_scale inside the kernel, and equals the reference's on the [B, T, V] slice."""
    logits, ids, mask, old, refl, _, adv = _case(120)
    full = torch.cat([logits, torch.randn(B, 1, V)], dim=1)  # the extra position past the completion
    leaf = full.clone().requires_grad_()
    x = leaf * 1.0  # the lm_head output: a non-leaf buffer
    cfg = GRPOConfig(beta=0.04)
    loss, _ = grpo_loss(x, ids, mask, adv.float(), cfg, old_logp=old.float(), ref_logp=refl.float(), loss_scale=0.25,
                        last_position_unused=True, grad_inplace=True, validate=False, impl="triton")
    loss.backward()
    x64 = logits.double().requires_grad_()
    loss64, _ = grpo_loss(x64, ids, mask, adv, cfg, old_logp=old, ref_logp=refl, impl="torch")
    (loss64 * 0.25).backward()
    assert loss.item() == pytest.approx(0.25 * loss64.item(), rel=1e-5)
    _close(leaf.grad[:, :T], x64.grad, 1e-5)
    assert torch.all(leaf.grad[:, T] == 0)
    _close(x.detach()[:, :T], x64.grad, 1e-5)  # the buffer itself now holds the gradient
    with pytest.raises(ValueError, match="last_position_unused"):
        grpo_loss(full, ids[:, :-1], mask[:, :-1], adv.float(), cfg, last_position_unused=True, impl="triton")


def test_fp16_gradients_are_scaled_before_rounding():
    """fp16 logits: the gradient is written in backward with the upstream scale (a loss scaler's 2^16) applied
    first, so entries of size w·p ≈ 1e-10, below fp16's smallest subnormal (6e-8), survive the scaling."""
    g = torch.Generator().manual_seed(130)
    logits = (torch.randn(2, 3, 513, generator=g) * 6).to(torch.float16)
    ids = _ids(logits.float(), 131)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5])
    scale = 2.0**16
    x = logits.clone().requires_grad_()
    loss, _ = grpo_loss(x, ids, mask, adv, GRPOConfig(beta=0.0), impl="triton")
    (loss * scale).backward()
    x64 = logits.double().requires_grad_()
    (grpo_loss(x64, ids, mask, adv.double(), GRPOConfig(beta=0.0), impl="torch")[0] * scale).backward()
    tiny = (x64.grad.abs() > 1e-3) & (x64.grad.abs() / scale < 6e-8)  # would have underflowed unscaled
    assert tiny.sum() > 50
    assert torch.all(x.grad[tiny] != 0)
    _close(x.grad, x64.grad, 2e-3)  # fp16 rounding


def test_create_graph_is_refused_with_a_clear_error():
    logits, ids, mask, _, _, _, adv = _case(140)
    x = logits.clone().requires_grad_()
    loss, _ = grpo_loss(x, ids, mask, adv.float(), impl="triton")
    with pytest.raises(RuntimeError, match="create_graph"):
        loss.backward(create_graph=True)
    logp = selective_log_probs(logits.clone().requires_grad_(), ids, impl="triton")
    with pytest.raises(RuntimeError, match="create_graph"):
        logp.sum().backward(create_graph=True)


# ---------------------------------------------------------------------------------------- torch.compile


def test_torch_compile_keeps_one_graph_through_the_kernels():
    """Under torch.compile (fullgraph: a graph break is an error) the kernels run as torch.library custom ops, with
    the same loss, metrics and gradients as eager, in the trainer's layout too."""
    torch._dynamo.reset()
    logits, ids, mask, old, refl, _, _ = _case(150)
    full = torch.cat([logits, torch.randn(B, 1, V)], dim=1)
    rewards = torch.tensor([1.0, 0.0, 0.4, 0.4])
    cfg = GRPOConfig(beta=0.04, group_size=2)

    def step(x):
        loss, m = grpo_loss(x, ids, mask, config=cfg, rewards=rewards, old_logp=old.float(), ref_logp=refl.float(),
                            loss_scale=0.5, last_position_unused=True, return_entropy=True, validate=False,
                            impl="triton")
        logp, ent = selective_log_probs(x[:, :-1], ids, return_entropy=True, impl="triton")
        return loss + 0.1 * (logp * mask).sum() + 0.01 * ent.sum(), m["kl"], m["entropy"], m["advantages"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = full.clone().requires_grad_()
    got = compiled(x)
    got[0].backward()
    x_eager = full.clone().requires_grad_()
    want = step(x_eager)
    want[0].backward()
    for a, b in zip(got, want):
        assert a.detach().double().sub(b.detach().double()).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    _close(x.grad, x_eager.grad, 1e-5)
    assert torch.all(x.grad[:, -1] == 0)


def test_custom_op_registrations_pass_torch_library_opcheck():
    from r1vl_fast.ops import library

    logits, ids, mask, old, refl, isw, adv = _case(160)
    x = logits.clone().requires_grad_()
    weights = mask.float() / mask.float().sum()
    lse = torch.randn(B, T)
    torch.library.opcheck(library.log_probs_fwd, (x, ids, 0.9, True))
    torch.library.opcheck(library.log_probs_bwd, (logits, ids, lse, lse, torch.randn(B, T), None, 0.9))
    torch.library.opcheck(library.grpo_loss_fwd, (
        x, ids, weights, None, torch.tensor([1.0, 0.0, 0.5, 0.5]), None, old.float(), refl.float(), isw.float(),
        0.04, "k3", 0.2, 0.2, None, 1.0, 2, "group", 1e-4, True, 1.0, True))


# ---------------------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_an_unmasked_nan_or_inf_logit_reaches_the_loss(impl):
    """Both implementations propagate a NaN / +inf logit at a scored position into the loss, its log-prob and its
    row's gradient (tl.minimum / tl.maximum would otherwise drop the NaN and return a finite loss)."""
    for bad in (float("nan"), float("inf")):
        logits, ids, mask, old, refl, _, adv = _case(170)
        mask[0, 1] = True
        logits[0, 1, 7] = bad
        for cfg in (GRPOConfig(beta=0.0), GRPOConfig(beta=0.04, delta=1.5)):
            x = logits.clone().requires_grad_()
            loss, m = grpo_loss(x, ids, mask, adv.float(), cfg, old_logp=old.float(), ref_logp=refl.float(),
                                impl=impl)
            loss.backward()
            assert torch.isnan(loss), (bad, cfg)
            assert torch.isnan(m["logp"][0, 1])
            assert torch.isnan(x.grad[0, 1]).any()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_masked_positions_are_never_read(impl):
    """NaN logits and -100 ids where the mask is off change nothing: same loss and gradient as clean inputs, zero
    gradient there, in both implementations."""
    logits, ids, mask, old, refl, isw, adv = _case(180)
    clean = grpo_loss(logits.double(), ids, mask, adv, GRPOConfig(beta=0.04), old_logp=old, ref_logp=refl,
                      is_weights=isw, impl="torch")[0]
    dirty, dirty_ids = logits.clone(), ids.clone()
    dirty[~mask] = float("nan")
    dirty_ids[~mask] = -100
    dirty_old, dirty_ref = old.clone(), refl.clone()
    dirty_old[~mask] = float("nan")
    dirty_ref[~mask] = float("nan")
    x = dirty.clone().requires_grad_()
    loss, m = grpo_loss(x, dirty_ids, mask, adv.float(), GRPOConfig(beta=0.04), old_logp=dirty_old.float(),
                        ref_logp=dirty_ref.float(), is_weights=isw.float(), return_entropy=True, impl=impl)
    loss.backward()
    assert loss.item() == pytest.approx(clean.item(), rel=1e-5)
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[~mask] == 0)
    assert all(torch.isfinite(m[k]) for k in ("kl", "entropy", "clip_region"))


def test_no_completion_tokens_still_gives_the_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    logits = torch.randn(4, 0, 11)
    ids = torch.zeros(4, 0, dtype=torch.long)
    mask = torch.zeros(4, 0, dtype=torch.bool)
    want = group_advantages(rewards, 2)
    for impl in ("triton", "torch"):
        loss, m = grpo_loss(logits, ids, mask, config=GRPOConfig(group_size=2), rewards=rewards, impl=impl)
        assert loss.item() == 0.0
        torch.testing.assert_close(m["advantages"], want)
