"""GRPO loss, forward + backward, at Qwen2-VL's vocabulary (V = 151,936, bf16 logits), each implementation in its
real layout, against one shared reference.

Every implementation starts from the same buffer: the logits [B, T + 1, V] as the model's LM head returns them
(``logits_to_keep = T + 1``), a non-leaf tensor whose gradient flows back into the head:
- ``eager``: TRL-style PyTorch (the baseline): slice ``[:, :-1]``, log-softmax per sequence in the logits' dtype,
  gather, clipped ratio, k3 KL, sequence means. No entropy graph.
- ``torch_compile``: the same maths over the whole batch under ``torch.compile``.
- ``liger``: Liger-Kernel's ``triton_grpo_loss``, which reads exactly this [B, T + 1, V] layout and writes its
  gradient in place (when ``liger-kernel`` is installed: ``pip install '.[bench]'``).
- ``r1vl_fast``: ``grpo_loss(..., last_position_unused=True, grad_inplace=True, validate=False)``, as the trainer
  calls it.

Before timing, each implementation's loss and logits gradient are checked against a reference computed once per
shape, sequence by sequence in fp32 (so it fits at 16 x 2048). ``extra_info`` records the peak memory beyond the
inputs and the achieved bandwidth against the two-pass floor (read every logit once, write every gradient once).

GPU: ``pytest benches/test_bench_grpo_loss.py --benchmark-only`` (``benches/gpu_check.sh`` runs it). On a machine
without one, the same checks run at a small vocabulary through the Triton interpreter (no timing).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from r1vl_fast.ops import GRPOConfig, grpo_loss

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU these checks run the kernels through TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if GPU else "cpu"
VOCAB = 151_936 if GPU else 1001
SIZES = [(8, 1024), (16, 2048)] if GPU else [(3, 7)]
BETA, EPS = 0.04, 0.2
ROUNDS = 5


class _LMHead(torch.autograd.Function):
    """Stands for the model's LM head: hands out a filled logits buffer as a non-leaf output; its backward takes
    the logits gradient as the head's GEMMs would (and keeps it only when asked, for the correctness check)."""

    captured: torch.Tensor | None = None
    capture = False
    buffer: torch.Tensor | None = None

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor) -> torch.Tensor:
        assert _LMHead.buffer is not None
        return _LMHead.buffer.detach()  # the buffer itself (no view of an input), as a new output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        if _LMHead.capture:
            _LMHead.captured = grad
        return torch.zeros(1, device=grad.device)


def _inputs(batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return dict(
        logits=(torch.randn(batch, length + 1, VOCAB, device=DEVICE, generator=g) * 2).to(torch.bfloat16),
        ids=torch.randint(0, VOCAB, (batch, length), device=DEVICE, generator=g),
        mask=torch.rand(batch, length, device=DEVICE, generator=g) > 0.1,
        adv=torch.randn(batch, device=DEVICE, generator=g),
        ref_logp=-12 + torch.randn(batch, length, device=DEVICE, generator=g) * 0.1,
    )


def _token_loss(logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """On-policy clipped ratio (= 1, gradient ∇logp) and β·k3, per token."""
    ratio = torch.exp(logp - logp.detach())
    a = adv.unsqueeze(1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - EPS, 1 + EPS) * a)
    log_r = ref_logp - logp
    return per_token + BETA * (torch.exp(log_r) - log_r - 1)


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def _eager(logits, ids, mask, adv, ref_logp):
    logits = logits[:, :-1]
    # TRL's memory-saving form for bf16: the log-softmax one sequence at a time, in the logits' dtype
    logp = torch.stack([torch.log_softmax(row, dim=-1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
                        for row, i in zip(logits, ids)]).float()
    return _sequence_mean(_token_loss(logp, ref_logp, adv), mask)


def _whole_batch(logits, ids, mask, adv, ref_logp):
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return _sequence_mean(_token_loss(logp, ref_logp, adv), mask)


def _liger(logits, ids, mask, adv, ref_logp):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    per_token, *_ = triton_grpo_loss(logits, None, ref_logp, ids, adv, mask.int(), temperature=1.0, beta=BETA,
                                     eps_low=EPS, eps_high=EPS, inplace=True)
    return _sequence_mean(per_token, mask)


def _ours(logits, ids, mask, adv, ref_logp):
    loss, _ = grpo_loss(logits, ids, mask, adv, GRPOConfig(beta=BETA, eps_low=EPS, eps_high=EPS), ref_logp=ref_logp,
                        last_position_unused=True, grad_inplace=True, validate=False,
                        impl="triton")
    return loss


IMPLS: dict[str, Callable[..., torch.Tensor]] = {"eager": _eager, "liger": _liger, "r1vl_fast": _ours}
if GPU:  # compiling on CPU takes minutes and says nothing about the GPU
    IMPLS["torch_compile"] = torch.compile(_whole_batch)

_REFERENCE: dict[tuple[int, int], tuple[float, torch.Tensor]] = {}


def _reference(inputs: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """The loss and the gradient of the [B, T] logits, in fp32, one sequence at a time (each sequence's gradient
    depends on its own logits only), the gradient kept in bf16."""
    logits, ids, mask, adv, ref_logp = (inputs[k] for k in ("logits", "ids", "mask", "adv", "ref_logp"))
    key = (logits.shape[0], ids.shape[1])
    if key not in _REFERENCE:
        batch = logits.shape[0]
        grad = torch.empty_like(logits[:, :-1])
        total = 0.0
        for b in range(batch):
            x = logits[b:b + 1, :-1].float().requires_grad_()
            logp = torch.log_softmax(x, dim=-1).gather(-1, ids[b:b + 1].unsqueeze(-1)).squeeze(-1)
            loss = _sequence_mean(_token_loss(logp, ref_logp[b:b + 1], adv[b:b + 1]), mask[b:b + 1]) / batch
            loss.backward()
            total += loss.item()
            grad[b] = x.grad[0].to(grad.dtype)
            del x, logp, loss
        _REFERENCE[key] = (total, grad)
    return _REFERENCE[key]


def _run(fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], buffer: torch.Tensor) -> torch.Tensor:
    anchor = torch.zeros(1, device=buffer.device, requires_grad=True)
    _LMHead.buffer = buffer
    try:
        loss = fn(_LMHead.apply(anchor), inputs["ids"], inputs["mask"], inputs["adv"], inputs["ref_logp"])
    finally:
        _LMHead.buffer = None
    loss.backward()
    return loss


@pytest.mark.parametrize("size", SIZES, ids=[f"{b}x{t}" for b, t in SIZES])
@pytest.mark.parametrize("impl", ["eager", "torch_compile", "liger", "r1vl_fast"])
def test_grpo_loss_forward_backward(benchmark, impl, size):
    if impl == "liger":
        pytest.importorskip("liger_kernel", reason="pip install liger-kernel to compare against it")
    if impl not in IMPLS:
        pytest.skip(f"{impl} is measured on a GPU only")
    batch, length = size
    inputs = _inputs(batch, length)
    fn = IMPLS[impl]
    want_loss, want_grad = _reference(inputs)
    buffer = inputs["logits"].clone()

    _LMHead.capture = True
    try:
        got = _run(fn, inputs, buffer).item()
        grad = _LMHead.captured
    finally:
        _LMHead.capture, _LMHead.captured = False, None
    assert grad is not None
    assert abs(got - want_loss) <= 2e-3 * max(1e-2, abs(want_loss)), (impl, got, want_loss)
    err = (grad[:, :length].float() - want_grad.float()).abs().max().item()
    assert err <= 2e-2 * want_grad.float().abs().max().item(), (impl, err)
    if grad.shape[1] > length:
        assert torch.all(grad[:, length:] == 0)
    del grad
    if not GPU:
        return

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        buffer.copy_(inputs["logits"])  # in-place implementations overwrote it with the gradient
        torch.cuda.synchronize()
        return (fn, inputs, buffer), {}

    def step(fn, inputs, buffer) -> None:
        _run(fn, inputs, buffer)
        torch.cuda.synchronize()

    step(*setup()[0])
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(*setup()[0])
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = batch * length * VOCAB * 2
    benchmark.group = f"grpo_loss {batch}x{length}"
    benchmark.extra_info["baseline"] = impl == "eager"
    benchmark.extra_info["peak_extra_GB"] = round(extra / 1e9, 3)
    benchmark.extra_info["peak_extra_in_logits"] = round(extra / logits_bytes, 2)
    benchmark.extra_info["logits_GB"] = round(logits_bytes / 1e9, 3)
    benchmark.extra_info["grad_max_rel_err"] = round(err / want_grad.float().abs().max().item(), 5)
    benchmark.pedantic(step, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    floor_bytes = 2 * logits_bytes  # read the logits once, write the gradient once
    benchmark.extra_info["achieved_TBps_vs_two_pass_floor"] = round(floor_bytes / benchmark.stats["median"] / 1e12, 3)
