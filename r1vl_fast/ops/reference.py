"""Plain-PyTorch twins of the fused kernels: the obviously-correct definitions the Triton path is tested against.

Everything is written as TRL / the R1-VL code computes it (log-softmax, gather, clamp, torch.min), so autograd
gives the reference gradients, ties included.
"""

from __future__ import annotations

import torch

from r1vl_fast.ops.config import GRPOConfig, token_weights


def selective_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / T)[ids] in fp32 (fp64 stays fp64), and optionally the entropy of softmax(logits / T)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp_all = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logp = logp_all.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, entropy


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4, unbiased: bool = True, scale: str = "group"
) -> torch.Tensor:
    """A_i = (r_i − mean_G(r)) / (std + eps) over each prompt's G consecutive completions.

    scale: ``"group"`` divides by the group's std (R1-VL, GRPO), ``"batch"`` by the whole batch's std,
    ``"none"`` does not divide (Dr. GRPO).
    """
    grouped = rewards.reshape(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, unbiased=unbiased).repeat_interleave(group_size)
    else:
        std = rewards.std(unbiased=unbiased).expand_as(rewards)
    return centred / (std + eps)


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(π_θ ‖ π_ref) estimators (Schulman's note), r = π_ref / π_θ:
    k1 = −log r, k2 = ½ (log r)², k3 = r − log r − 1."""
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - log_ratio - 1


def token_objective(
    logp: torch.Tensor, keep: torch.Tensor, a: torch.Tensor, config: GRPOConfig, *,
    old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None, is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GRPO objective of each token from its log-prob alone: (per-token loss, KL, ratio), any matching shapes
    (``a``, the advantage, broadcast to ``logp``). Positions outside ``keep`` read none of old / ref / weights."""
    old = logp.detach() if old_logp is None else torch.where(keep, old_logp.to(logp.dtype), logp.detach())
    ratio = torch.exp(logp - old)
    coef_1 = ratio if config.delta is None else torch.clamp(ratio, max=config.delta)
    coef_2 = torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    if is_weights is not None:
        per_token = per_token * torch.where(keep, is_weights.to(logp.dtype), 0.0)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = per_token_kl(logp, torch.where(keep, ref_logp.to(logp.dtype), logp.detach()), config.kl)
        if config.beta != 0:
            per_token = per_token + config.beta * kl
    return per_token, kl, ratio


def grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    config: GRPOConfig,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped, KL-regularised GRPO loss over [B, T] completion tokens (see ``r1vl_fast.ops.grpo_loss``).

    Masked positions are never read: their logits (NaN included) and ids (-100 padding included) do not reach the
    loss, the metrics or the gradient, as in the kernel."""
    keep = mask.bool()
    logits = logits.masked_fill(~keep.unsqueeze(-1), 0.0)
    ids = ids.masked_fill(~keep, 0)
    logp, entropy = selective_log_probs(logits, ids, temperature=config.temperature, return_entropy=True)
    m = mask.to(logp.dtype)
    a = advantages.to(logp.dtype).unsqueeze(1)
    per_token, kl, ratio = token_objective(logp, keep, a, config, old_logp=old_logp, ref_logp=ref_logp,
                                           is_weights=is_weights)
    loss = torch.where(keep, per_token * token_weights(m, config, num_items), 0.0).sum()

    with torch.no_grad():
        n = m.sum().clamp(min=1)
        low = (ratio < 1 - config.eps_low) & (a < 0)
        high = (ratio > 1 + config.eps_high) & (a > 0)
        metrics = {
            "kl": (kl * m).sum() / n,
            "clip_low": (low.to(m.dtype) * m).sum() / n,
            "clip_high": (high.to(m.dtype) * m).sum() / n,
            "clip_region": ((low | high).to(m.dtype) * m).sum() / n,
            "entropy": (entropy * m).sum() / n,
            "logp": logp.detach(),
        }
    return loss, metrics
