"""The LM head fused into the log-prob and GRPO-loss ops (r1vl_fast.ops.linear) against an fp64 reference that
materialises the logits: log-probs, loss, metrics and the gradients of hidden, weight and bias, across several
blocks with a ragged last one, tied weights, temperature != 1, masked rows holding NaN, and every loss type and KL
estimator."""

from __future__ import annotations

import itertools

import pytest
import torch

from r1vl_fast.ops import KL_ESTIMATORS, LOSS_TYPES, GRPOConfig, linear, reference
from r1vl_fast.ops.linear import linear_grpo_loss, linear_log_probs

B, T, H, V = 4, 5, 24, 97


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 3 rows (a [3, V] fp32 block): several per call, the last one ragged."""
    monkeypatch.setattr(linear, "BLOCK_BYTES", 3 * 4 * V)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """Within ``rtol`` of the fp64 value, relative to the tensor's scale (an entry near zero next to entries of
    size 100 carries the fp32 rounding of those), and the norm of the error within ``rtol`` of the norm."""
    got, want = got.double(), want.double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-3))
    assert float((got - want).norm()) <= rtol * max(float(want.norm()), 1e-3)


def _inputs(seed: int, bias: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"hidden": torch.randn(B, T, H, generator=g), "weight": torch.randn(V, H, generator=g) * 0.5,
           "ids": torch.randint(0, V, (B, T), generator=g)}
    if bias:
        out["bias"] = torch.randn(V, generator=g)
    return out


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("temperature, with_bias", [(1.0, False), (0.7, True)])
def test_linear_log_probs_match_the_materialised_logits(temperature: float, with_bias: bool) -> None:
    x = _inputs(0, with_bias)
    h, w = x["hidden"].requires_grad_(), x["weight"].requires_grad_()
    b = x["bias"].requires_grad_() if with_bias else None
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    logits = h64 @ w64.T + (b64 if b64 is not None else 0)
    want, want_ent = reference.selective_log_probs(logits, x["ids"], temperature=temperature, return_entropy=True)
    got, got_ent = linear_log_probs(h, w, x["ids"], temperature=temperature, bias=b, return_entropy=True)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    _close(got, want)
    _close(got_ent, want_ent)
    probe = torch.randn(B, T, dtype=torch.float64)  # an arbitrary upstream gradient
    wanted = _grads((want * probe).sum(), h64, w64, *([b64] if b64 is not None else []))
    gotten = _grads((got * probe.float()).sum(), h, w, *([b] if b is not None else []))
    for g_, w_ in zip(gotten, wanted):
        _close(g_, w_)


def test_linear_log_probs_without_grad_and_on_flat_rows() -> None:
    x = _inputs(1)
    with torch.no_grad():
        got = linear_log_probs(x["hidden"].reshape(-1, H), x["weight"], x["ids"].reshape(-1))
    want = reference.selective_log_probs(x["hidden"].double() @ x["weight"].double().T, x["ids"])
    _close(got, want.reshape(-1))


def test_tied_weights_collect_both_gradients() -> None:
    """The LM head shares the embedding: its gradient is the embedding's part plus the head's."""
    x = _inputs(2)
    emb = x["weight"].clone().requires_grad_()
    tokens = torch.randint(0, V, (B, T))
    hidden = torch.tanh(torch.nn.functional.embedding(tokens, emb))
    got = _grads((linear_log_probs(hidden, emb, x["ids"]) ** 2).sum(), emb)[0]
    emb64 = emb.detach().double().requires_grad_()
    hidden64 = torch.tanh(torch.nn.functional.embedding(tokens, emb64))
    want = _grads((reference.selective_log_probs(hidden64 @ emb64.T, x["ids"]) ** 2).sum(), emb64)[0]
    _close(got, want)


CASES = list(itertools.product(LOSS_TYPES, KL_ESTIMATORS))


@pytest.mark.parametrize("loss_type, kl", CASES)
def test_linear_grpo_loss_matches_the_materialised_reference(loss_type: str, kl: str) -> None:
    x = _inputs(3, bias=True)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # a fully masked row
    mask[1, 0] = True
    hidden = x["hidden"].clone()
    hidden[~mask] = float("nan")  # masked positions are never read
    ids = x["ids"].masked_fill(~mask, -100)
    config = GRPOConfig(beta=0.04, kl=kl, loss_type=loss_type, temperature=0.9, eps_low=0.2, eps_high=0.28,
                        delta=1.6, max_completion_length=T + 2, group_size=2)
    rewards = torch.tensor([1.0, 0.2, 0.5, 0.5])
    old_logp = -torch.rand(B, T, generator=g) * 3
    ref_logp = -torch.rand(B, T, generator=g) * 3
    is_weights = torch.rand(B, T, generator=g) + 0.5

    h = hidden.requires_grad_()
    w, b = x["weight"].requires_grad_(), x["bias"].requires_grad_()
    loss, m = linear_grpo_loss(h, w, ids, mask, config=config, rewards=rewards, old_logp=old_logp,
                               ref_logp=ref_logp, is_weights=is_weights, bias=b, num_items=11.0, loss_scale=0.5,
                               return_entropy=True)
    gh, gw, gb = _grads(loss, h, w, b)

    h64 = torch.where(mask[..., None], hidden.detach(), 0.0).double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    adv = reference.group_advantages(rewards.double(), 2)
    want, wm = reference.grpo_loss(h64 @ w64.T + b64, ids, mask, adv, config, old_logp=old_logp.double(),
                                   ref_logp=ref_logp.double(), is_weights=is_weights.double(), num_items=11.0)
    want = want * 0.5
    wh, ww, wb = _grads(want, h64, w64, b64)
    _close(loss, want)
    for key in ("kl", "clip_low", "clip_high", "clip_region", "entropy"):
        _close(m[key], wm[key])
    _close(torch.where(mask, m["logp"], 0.0), torch.where(mask, wm["logp"], 0.0))
    _close(m["advantages"], adv)
    _close(gh[mask], wh[mask])
    assert bool((gh[~mask] == 0).all())
    _close(gw, ww)
    _close(gb, wb)


def test_linear_grpo_loss_on_policy_without_ref_and_without_grad() -> None:
    x = _inputs(5)
    mask = torch.ones(B, T, dtype=torch.bool)
    config = GRPOConfig(beta=0.0, group_size=2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with torch.no_grad():
        loss, m = linear_grpo_loss(x["hidden"], x["weight"], x["ids"], mask, adv, config)
    want, wm = reference.grpo_loss(x["hidden"].double() @ x["weight"].double().T, x["ids"], mask, adv.double(),
                                   config)
    _close(loss, want)
    _close(m["logp"], wm["logp"])
    h = x["hidden"].requires_grad_()
    loss, _ = linear_grpo_loss(h, x["weight"], x["ids"], mask, adv, config)
    loss.backward()
    with pytest.raises(RuntimeError):
        loss.backward()  # the gradient was handed over (and the graph freed)


def test_bad_shapes_name_the_argument() -> None:
    x = _inputs(6)
    with pytest.raises(ValueError, match="weight must be"):
        linear_log_probs(x["hidden"], x["weight"][:, :3], x["ids"])
    with pytest.raises(ValueError, match="ids must have shape"):
        linear_log_probs(x["hidden"], x["weight"], x["ids"][:, :2])
    with pytest.raises(ValueError, match="mask must have shape"):
        linear_grpo_loss(x["hidden"], x["weight"], x["ids"], torch.ones(B, 2), torch.zeros(B), GRPOConfig())


@pytest.mark.parametrize("temperature, with_bias, entropy", [(1.0, False, False), (0.7, True, True)])
def test_the_triton_kernel_matches_the_reference(temperature: float, with_bias: bool, entropy: bool) -> None:
    """linear_lse_fwd_kernel in the interpreter (TRITON_INTERPRET=1, set by conftest): ragged token, vocabulary and
    hidden tiles (20 tokens in tiles of 16, 97 columns in two slices of 64, 24 hidden in tiles of 32); its backward
    is the blocked PyTorch one."""
    x = _inputs(7, with_bias)
    h = x["hidden"].reshape(-1, H)[:20].clone().requires_grad_()
    ids = x["ids"].reshape(-1)[:20]
    b = x["bias"] if with_bias else None
    out = linear_log_probs(h, x["weight"], ids, temperature=temperature, bias=b, return_entropy=entropy,
                           impl="triton")
    got = out[0] if entropy else out
    logits = h.detach().double() @ x["weight"].double().T + (b.double() if b is not None else 0)
    want, want_ent = reference.selective_log_probs(logits, ids, temperature=temperature, return_entropy=True)
    _close(got, want)
    if entropy:
        _close(out[1], want_ent)
    h64 = h.detach().double().requires_grad_()
    logits64 = h64 @ x["weight"].double().T + (b.double() if b is not None else 0)
    wanted = _grads(reference.selective_log_probs(logits64, ids, temperature=temperature).sum(), h64)[0]
    _close(_grads(got.sum(), h)[0], wanted)


def test_the_triton_kernel_with_16_bit_inputs() -> None:
    """fp16 hidden and weight, fp32 accumulation: only the summation order differs from the fp64 reference. (bf16
    takes the same code path; Triton's interpreter multiplies bf16 tiles wrongly, so bf16 is checked on a GPU, in
    tests/test_grpo_ops_cuda.py.)"""
    x = _inputs(8)
    h, w = x["hidden"].reshape(-1, H).half(), x["weight"].half()
    ids = x["ids"].reshape(-1)
    got = linear_log_probs(h, w, ids, impl="triton")
    want = reference.selective_log_probs(h.double() @ w.double().T, ids)
    _close(got, want, rtol=1e-4)
