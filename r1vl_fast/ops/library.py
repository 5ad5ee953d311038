"""The kernels as ``torch.library`` custom ops, so that ``torch.compile`` keeps a graph that calls them whole (no graph
break) and AOTAutograd differentiates through them.

The ops are functional: the forward keeps the logits, lse and the per-row coefficients, and the backward writes a
new gradient buffer (``r1vl_fast::log_probs_bwd``), scaled by its upstream before it is rounded. Selective
log-probs always run through them, and so does the GRPO loss without grad and under ``torch.compile``. A
differentiable GRPO loss in eager mode (``r1vl_fast.ops.fused``) writes its gradient during the forward instead,
over the logits when asked: the path with one logits-sized buffer.
"""

from __future__ import annotations

from typing import Any

import torch

from r1vl_fast.ops import launch as L
from r1vl_fast.ops.config import GRPOConfig

Tensor = torch.Tensor
# per row: loss, logp, kl, flags, entropy, lse2, coef; per sequence: the advantages
GRPORows = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("r1vl_fast::log_probs_fwd", mutates_args=())
def log_probs_fwd(logits: Tensor, ids: Tensor, temperature: float, entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, lse2, entropy or a 1-element dummy) of ``ids`` [B, T] under softmax(logits[:, :T] / temperature)."""
    launch, logp, lse, ent = L.log_probs_fwd(logits, ids, temperature, entropy)
    launch.run()
    return logp, lse, ent


@log_probs_fwd.register_fake
def _(logits: Tensor, ids: Tensor, temperature: float, entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    rows = logits.new_empty(ids.shape, dtype=torch.float32)
    return rows, torch.empty_like(rows), torch.empty_like(rows) if entropy else logits.new_zeros(1, dtype=torch.float32)


@torch.library.custom_op("r1vl_fast::log_probs_bwd", mutates_args=())
def log_probs_bwd(logits: Tensor, ids: Tensor, lse: Tensor, ent: Tensor, grad_logp: Tensor,
                  grad_entropy: Tensor | None, temperature: float) -> Tensor:
    """A new gradient buffer shaped like ``logits``: d/d logits of Σ grad_logp·logp (+ grad_entropy·H) over rows
    (b, t < T), zero at positions t ≥ T."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    L.log_probs_bwd(logits, ids, temperature, lse, ent, grad_logp.float().contiguous(),
                    None if grad_entropy is None else grad_entropy.float().contiguous(), grad).run()
    if logits.shape[1] > ids.shape[1]:
        grad[:, ids.shape[1]:].zero_()
    return grad


@log_probs_bwd.register_fake
def _(logits: Tensor, ids: Tensor, lse: Tensor, ent: Tensor, grad_logp: Tensor, grad_entropy: Tensor | None,
      temperature: float) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _log_probs_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
    logits, ids, temperature, entropy = inputs
    _, lse, ent = output
    ctx.save_for_backward(logits, ids, lse, ent)
    ctx.temperature, ctx.entropy = temperature, entropy


def no_double_backward(op: str) -> None:
    if torch.is_grad_enabled():  # backward(create_graph=True)
        raise RuntimeError(f"{op}'s gradient is computed by a kernel and cannot be differentiated again: "
                           f"call backward without create_graph=True")


def _log_probs_backward(ctx: Any, grad_logp: Tensor, grad_lse: Tensor, grad_ent: Tensor) -> tuple[Any, ...]:
    no_double_backward("selective_log_probs")
    logits, ids, lse, ent = ctx.saved_tensors
    grad = log_probs_bwd(logits, ids, lse, ent, grad_logp, grad_ent if ctx.entropy else None, ctx.temperature)
    return grad, None, None, None


torch.library.register_autograd("r1vl_fast::log_probs_fwd", _log_probs_backward, setup_context=_log_probs_setup)


@torch.library.custom_op("r1vl_fast::grpo_loss_fwd", mutates_args=())
def grpo_loss_fwd(logits: Tensor, ids: Tensor, weights: Tensor, advantages: Tensor | None, rewards: Tensor | None,
                  batch_std: Tensor | None, old_logp: Tensor | None, ref_logp: Tensor | None,
                  is_weights: Tensor | None, beta: float, kl: str, eps_low: float, eps_high: float,
                  delta: float | None, temperature: float, group_size: int | None, scale_rewards: str, adv_eps: float,
                  adv_unbiased: bool, loss_scale: float, entropy: bool) -> GRPORows:
    """Per-row (loss, logp, kl, flags, entropy, lse2, coef) and the advantages, as the fused kernel computes them,
    without writing any gradient (the backward writes it from lse and coef)."""
    config = GRPOConfig(beta=beta, kl=kl, eps_low=eps_low, eps_high=eps_high, delta=delta, temperature=temperature,
                        group_size=group_size, scale_rewards=scale_rewards, adv_eps=adv_eps, adv_unbiased=adv_unbiased)
    launch, out = L.grpo_fwd(logits, ids, weights, config, advantages=advantages, rewards=rewards,
                             batch_std=batch_std, old_logp=old_logp, ref_logp=ref_logp, is_weights=is_weights,
                             loss_scale=loss_scale, entropy=entropy, grad=None)
    launch.run()
    advantages_out = out.advantages if rewards is not None else advantages.float().clone()  # type: ignore[union-attr]
    return out.loss, out.logp, out.kl, out.flags, out.entropy, out.lse, out.coef, advantages_out


@grpo_loss_fwd.register_fake
def _(logits: Tensor, ids: Tensor, weights: Tensor, advantages: Tensor | None, rewards: Tensor | None,
      batch_std: Tensor | None, old_logp: Tensor | None, ref_logp: Tensor | None, is_weights: Tensor | None,
      beta: float, kl: str, eps_low: float, eps_high: float, delta: float | None, temperature: float,
      group_size: int | None, scale_rewards: str, adv_eps: float, adv_unbiased: bool, loss_scale: float,
      entropy: bool) -> GRPORows:
    rows = logits.new_empty(ids.shape, dtype=torch.float32)
    return (rows, torch.empty_like(rows), torch.empty_like(rows), logits.new_empty(ids.shape, dtype=torch.int8),
            torch.empty_like(rows) if entropy else logits.new_zeros(1, dtype=torch.float32), torch.empty_like(rows),
            torch.empty_like(rows), logits.new_empty(ids.shape[:1], dtype=torch.float32))


def _grpo_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    logits, ids = inputs[0], inputs[1]
    lse, coef = output[5], output[6]
    ctx.save_for_backward(logits, ids, lse, coef)
    ctx.temperature = inputs[14]


def _grpo_backward(ctx: Any, grad_loss: Tensor, *_: Tensor) -> tuple[Any, ...]:
    no_double_backward("grpo_loss")
    logits, ids, lse, coef = ctx.saved_tensors
    grad = log_probs_bwd(logits, ids, lse, lse, coef * grad_loss, None, ctx.temperature)
    return (grad,) + (None,) * 20


torch.library.register_autograd("r1vl_fast::grpo_loss_fwd", _grpo_backward, setup_context=_grpo_setup)
