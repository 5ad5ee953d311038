"""The policy-update ops: selective log-probs, group advantages and the fused GRPO loss.

Each op checks its inputs (errors name the argument), then runs the Triton kernels of ``r1vl_fast.kernels``
(``impl="triton"``) or the plain-PyTorch twin of ``r1vl_fast.ops.reference`` (``impl="torch"``); ``"auto"`` is
resolved by :func:`r1vl_fast.ops.config.resolve_impl` (Triton on CUDA tensors, PyTorch otherwise).
"""

from __future__ import annotations

from typing import Any

import torch

from r1vl_fast.ops import reference
from r1vl_fast.ops.config import ADV_SCALES, KL_ESTIMATORS, GRPOConfig, resolve_impl, token_weights


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_v(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): wide blocks on a GPU; the interpreter is fastest with the widest it can take."""
    if device.type == "cuda":
        return min(_next_pow2(vocab), 4096), 8
    return min(_next_pow2(vocab), 8192), 1


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a [B, T, V] tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.shape[-1] > 0 and logits.stride(-1) != 1:
        raise ValueError(f"logits must be contiguous in the vocabulary dimension, got strides {logits.stride()}")


def _check_bt(name: str, x: torch.Tensor | None, batch: int, length: int, device: torch.device) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [B, T] = [{batch}, {length}], got {getattr(x, 'shape', type(x))}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits are on {device}")


def _check_ids(ids: torch.Tensor, vocab: int, where: torch.Tensor | None = None) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"ids[{b}, {t}] = {int(ids[b, t])} is outside the vocabulary [0, {vocab})")


# ---------------------------------------------------------------------------------------- selective log-probs


class _SelectiveLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor, temperature: float, entropy: bool) -> Any:
        logp, lse, ent = _log_probs_forward(logits, ids, temperature, entropy)
        ctx.save_for_backward(logits, ids, lse, ent)
        ctx.temperature = temperature
        ctx.entropy = entropy
        return logp, ent

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None) -> Any:
        from r1vl_fast.kernels.grpo_loss import selective_log_probs_bwd_kernel  # triton only when the kernels run

        logits, ids, lse, ent = ctx.saved_tensors
        batch, length, vocab = logits.shape
        grad = torch.empty((batch, length, vocab), dtype=logits.dtype, device=logits.device)
        entropy_grad = ctx.entropy and grad_entropy is not None
        g_h = grad_entropy.float().contiguous() if entropy_grad and grad_entropy is not None else lse
        block, warps = _block_v(vocab, logits.device)
        selective_log_probs_bwd_kernel[(batch * length,)](
            logits, logits.stride(0), logits.stride(1), length, vocab, ids, 1.0 / ctx.temperature, lse, ent,
            grad_logp.float().contiguous(), g_h, grad,
            BLOCK_V=block, ENTROPY_GRAD=entropy_grad, num_warps=warps,
        )
        return grad, None, None, None


def _log_probs_forward(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from r1vl_fast.kernels.grpo_loss import selective_log_probs_fwd_kernel

    batch, length, vocab = logits.shape
    rows = batch * length
    logp = torch.empty((batch, length), dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else torch.zeros(1, dtype=torch.float32, device=logits.device)
    if rows:
        block, warps = _block_v(vocab, logits.device)
        selective_log_probs_fwd_kernel[(rows,)](
            logits, logits.stride(0), logits.stride(1), length, vocab, ids, 1.0 / temperature, logp, lse, ent,
            BLOCK_V=block, ENTROPY=entropy, num_warps=warps,
        )
    return logp, lse, ent


def selective_log_probs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-probabilities of ``ids`` [B, T] under softmax(logits / temperature), logits [B, T, V] in any
    float dtype (last dimension contiguous); optionally also the entropy per token. Differentiable; without
    grad (old or reference policy) it reads the logits once and keeps nothing."""
    _check_logits(logits)
    batch, length, vocab = logits.shape
    _check_bt("ids", ids, batch, length, logits.device)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_ids(ids, vocab)
    if resolve_impl(impl, logits.device.type) == "torch":
        return reference.selective_log_probs(logits, ids, temperature=temperature, return_entropy=return_entropy)
    ids = ids.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        logp, ent = _SelectiveLogProbs.apply(logits, ids, float(temperature), return_entropy)
    else:
        logp, _, ent = _log_probs_forward(logits, ids, float(temperature), return_entropy)
    return (logp, ent) if return_entropy else logp


# ---------------------------------------------------------------------------------------- group advantages


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4, unbiased: bool = True, scale: str = "group"
) -> torch.Tensor:
    """(r − mean_G(r)) / (std + eps) over each prompt's ``group_size`` consecutive completions (fp32, [B]).

    scale ``"group"``: the group's std (GRPO, R1-VL); ``"batch"``: the batch's std; ``"none"``: no division
    (Dr. GRPO). ``unbiased`` divides the variance by G − 1, as torch.std and the R1-VL code do.
    """
    _check_group(rewards, group_size, unbiased, scale)
    return _advantages(rewards, group_size, eps, unbiased, scale)


def _advantages(rewards: torch.Tensor, group_size: int, eps: float, unbiased: bool, scale: str) -> torch.Tensor:
    """group_advantages on checked inputs, in fp32 (fp64 stays fp64)."""
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return reference.group_advantages(rewards.to(dtype), group_size, eps=eps, unbiased=unbiased, scale=scale)


def _check_group(rewards: torch.Tensor, group_size: int, unbiased: bool, scale: str) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    if scale not in ADV_SCALES:
        raise ValueError(f"scale must be one of {ADV_SCALES}, got {scale!r}")
    if unbiased and scale == "group" and group_size < 2:
        raise ValueError("an unbiased group std needs group_size >= 2")
    if not bool(torch.isfinite(rewards).all()):
        i = int((~torch.isfinite(rewards)).nonzero()[0])
        raise ValueError(f"rewards[{i}] = {float(rewards[i])} is not finite")


# ---------------------------------------------------------------------------------------- the GRPO loss


class _FusedGRPOLoss(torch.autograd.Function):
    """Forward computes the loss and, for token-level losses, the logits gradient in the same pass; backward
    only scales it. Nothing logits-sized is kept but that gradient (or none, with grad_inplace)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, launch: dict[str, Any]) -> Any:
        loss, outputs, grad = _grpo_forward(logits, **launch)
        ctx.save_for_backward(grad)
        ctx.used = False
        for t in outputs:
            ctx.mark_non_differentiable(t)
        return (loss, *outputs)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> Any:
        if ctx.used:
            raise RuntimeError("grpo_loss's fused gradient can be back-propagated once; compute the loss again")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if not bool(grad_loss == 1):
            grad.mul_(grad_loss.to(grad.dtype))  # e.g. (loss / accumulation_steps).backward()
        return grad, None



def _grpo_forward(
    logits: torch.Tensor,
    *,
    ids: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor | None,
    rewards: torch.Tensor | None,
    batch_std: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    is_weights: torch.Tensor | None,
    config: GRPOConfig,
    entropy: bool,
    write_grad: bool,
    grad_inplace: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    from r1vl_fast.kernels.grpo_loss import grpo_loss_fwd_kernel

    batch, length, vocab = logits.shape
    device = logits.device
    f32: dict[str, Any] = dict(dtype=torch.float32, device=device)
    loss_rows = torch.empty((batch, length), **f32)
    logp = torch.empty((batch, length), **f32)
    kl = torch.empty((batch, length), **f32)
    flags = torch.empty((batch, length), dtype=torch.int8, device=device)
    ent = torch.empty((batch, length), **f32) if entropy else loss_rows
    from_rewards = rewards is not None
    adv = torch.empty(batch, **f32) if from_rewards else advantages
    if not write_grad:
        grad = torch.empty(0, dtype=logits.dtype, device=device)
        grad_strides = (0, 0)
    elif grad_inplace:
        grad = logits
        grad_strides = (logits.stride(0), logits.stride(1))
    else:
        grad = torch.empty((batch, length, vocab), dtype=logits.dtype, device=device)
        grad_strides = (length * vocab, vocab)
    dummy = loss_rows
    group_size = config.group_size or 1
    if batch * length:
        block, warps = _block_v(vocab, device)
        grpo_loss_fwd_kernel[(batch * length,)](
            logits, logits.stride(0), logits.stride(1), length, vocab, ids, weights,
            adv, rewards if from_rewards else dummy, group_size, config.adv_eps,
            batch_std if batch_std is not None else dummy,
            old_logp if old_logp is not None else dummy,
            ref_logp if ref_logp is not None else dummy,
            is_weights if is_weights is not None else dummy,
            1.0 / config.temperature, config.beta, 1.0 - config.eps_low, 1.0 + config.eps_high,
            config.delta if config.delta is not None else 0.0,
            loss_rows, logp, kl, flags, ent, grad, *grad_strides,
            BLOCK_V=block, BLOCK_G=_next_pow2(group_size),
            FROM_REWARDS=from_rewards, SCALE=("none", "group", "batch").index(config.scale_rewards),
            UNBIASED=int(config.adv_unbiased),
            HAS_OLD=old_logp is not None, HAS_REF=ref_logp is not None, HAS_IS=is_weights is not None,
            HAS_DELTA=config.delta is not None, KL=KL_ESTIMATORS.index(config.kl) + 1, ENTROPY=entropy,
            WRITE_GRAD=write_grad, ALWAYS_READ=old_logp is not None or ref_logp is not None or entropy,
            num_warps=warps,
        )
    if grad_inplace and write_grad:
        torch.autograd.graph.increment_version(logits)  # anything that saved the logits now fails loudly
    empty = torch.zeros(0, **f32)
    outputs = (logp, kl, flags, ent if entropy else empty, adv if from_rewards and adv is not None else empty)
    return loss_rows.sum(), outputs, grad


def grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    config: GRPOConfig | None = None,
    *,
    rewards: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    num_items: float | None = None,
    return_entropy: bool = False,
    grad_inplace: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """StepGRPO's policy loss over completion tokens, and its metrics.

    logits [B, T, V] (bf16/fp16/fp32, last dim contiguous) score ``ids`` [B, T] where ``mask`` [B, T] is set. The
    settings (β, KL estimator, clip range, loss type, temperature, advantage normalisation) are one
    :class:`GRPOConfig`, built once per run. Give ``advantages`` [B], or ``rewards`` [B] to normalise them within
    each group of ``config.group_size`` in the same pass (``config.scale_rewards``). ``old_logp=None`` is on-policy
    (ratio = exp(logp − sg(logp)), R1-VL); ``ref_logp`` enables the KL term (β·KL). ``is_weights`` [B, T]
    multiplies the policy term (sampler mismatch correction); ``num_items`` is dapo's global token count.
    ``grad_inplace`` writes the logits gradient over the logits buffer (saves one logits-sized buffer; autograd's
    version counter then rejects any other use of those logits in backward).

    Returns (loss, metrics): metrics holds masked means ``kl``, ``clip_low``, ``clip_high``, ``clip_region``,
    ``entropy`` (when ``return_entropy``), the per-token ``logp`` and the ``advantages`` used.
    """
    config = GRPOConfig() if config is None else config
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
    _check_logits(logits)
    batch, length, vocab = logits.shape
    device = logits.device
    _check_bt("ids", ids, batch, length, device)
    _check_bt("mask", mask, batch, length, device)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("is_weights", is_weights)):
        _check_bt(name, x, batch, length, device)
    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages= [B] or rewards= [B] (with config.group_size)")
    if advantages is not None and (not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (batch,)):
        raise ValueError(f"advantages must have shape [B] = [{batch}], got {getattr(advantages, 'shape', None)}")
    if rewards is not None:
        if config.group_size is None:
            raise ValueError("rewards= needs config.group_size (the number of completions per prompt)")
        if tuple(rewards.shape) != (batch,):
            raise ValueError(f"rewards must have shape [B] = [{batch}], got {tuple(rewards.shape)}")
        _check_group(rewards, config.group_size, config.adv_unbiased, config.scale_rewards)
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must be bool or hold only 0 and 1")
    _check_ids(ids, vocab, where=mask.bool())

    weights = token_weights(mask, config, num_items)
    if resolve_impl(impl, device.type) == "torch":
        if rewards is not None:
            advantages = _advantages(rewards, config.group_size or 1, config.adv_eps, config.adv_unbiased,
                                     config.scale_rewards)
        assert advantages is not None
        loss, metrics = reference.grpo_loss(logits, ids, mask, advantages, config, old_logp=old_logp,
                                            ref_logp=ref_logp, is_weights=is_weights, num_items=num_items)
        if not return_entropy:
            metrics.pop("entropy")
        metrics["advantages"] = advantages.detach()
        return loss, metrics

    def f32(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(torch.float32).contiguous()

    batch_std = None
    if rewards is not None and config.scale_rewards == "batch":  # the whole batch's std: one small op first
        batch_std = f32(rewards.std(unbiased=config.adv_unbiased).reshape(1))
    launch: dict[str, Any] = dict(
        ids=ids.contiguous(), weights=weights.float().contiguous(), advantages=f32(advantages), rewards=f32(rewards),
        batch_std=batch_std, old_logp=f32(old_logp), ref_logp=f32(ref_logp), is_weights=f32(is_weights),
        config=config, entropy=return_entropy, grad_inplace=grad_inplace,
    )
    if torch.is_grad_enabled() and logits.requires_grad:
        loss, logp, kl_tok, flags, ent, adv = _FusedGRPOLoss.apply(logits, {**launch, "write_grad": True})
    else:
        loss, (logp, kl_tok, flags, ent, adv), _ = _grpo_forward(logits, **launch, write_grad=False)

    if rewards is None:
        adv = advantages
    with torch.no_grad():
        m = mask.to(torch.float32)
        n = m.sum().clamp(min=1)
        low = (flags & 1).to(torch.float32)
        high = ((flags >> 1) & 1).to(torch.float32)
        metrics = {
            "kl": (kl_tok * m).sum() / n,
            "clip_low": (low * m).sum() / n,
            "clip_high": (high * m).sum() / n,
            "clip_region": (((flags != 0).to(torch.float32)) * m).sum() / n,
            "logp": logp,
            "advantages": adv,
        }
        if return_entropy:
            metrics["entropy"] = (ent * m).sum() / n
    return loss, metrics
