"""Importance-sampling correction for the sampler / trainer mismatch: rollouts come from vLLM, whose log-probs differ
slightly from the trainer's (kernels, precision), so the policy term is reweighted by π_trainer / π_sampler.

Modes: ``token_*`` use the per-token ratio, ``sequence_*`` the product over the completion; ``*_truncate`` caps the
ratio at ``cap``, ``*_mask`` zeroes it above ``cap``.
"""

from __future__ import annotations

import torch

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_weights(
    trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, *, mode: str = "token_truncate",
    cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weights [B, T] (0 where ``mask`` is off) and mismatch statistics for the log."""
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}")
    m = mask.to(torch.float32)
    delta = (trainer_logp.float() - sampler_logp.float()) * m
    per_token = mode.startswith("token")
    ratio = delta.exp() if per_token else delta.sum(dim=1, keepdim=True).exp().expand_as(delta)
    over = ratio > cap
    weights = ratio.clamp(max=cap) if mode.endswith("truncate") else ratio.masked_fill(over, 0.0)
    weights = weights * m
    n = m.sum().clamp(min=1)
    stats = {
        "sampler/logp_diff_mean": float(delta.abs().sum() / n),
        "sampler/logp_diff_max": float(delta.abs().max()) if delta.numel() else 0.0,
        "sampler/is_weight_mean": float(weights.sum() / n),
        "sampler/is_capped_frac": float((over.float() * m).sum() / n),
    }
    return weights, stats
