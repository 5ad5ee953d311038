"""Settings of the GRPO loss, checked once, and the per-token weights each ``loss_type`` reduces with.

This module owns the loss's choices (``LOSS_TYPES``, ``KL_ESTIMATORS``, ``ADV_SCALES``, ``IMPLS``) and the rule that
resolves ``impl="auto"``; the run configuration and the command line import them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
ADV_SCALES = ("group", "batch", "none")  # what the group-centred reward is divided by: group std, batch std, nothing
IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, device_type: str) -> str:
    """``auto`` → the Triton kernels on CUDA, the PyTorch reference elsewhere (the CPU interpreter runs the kernels
    too, but slowly: ask for it with ``impl="triton"``)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "triton" if device_type == "cuda" else "torch"


@dataclass(frozen=True)
class GRPOConfig:
    """beta: KL coefficient (R1-VL 0.04); kl: estimator (k3 = R1-VL); eps_low / eps_high: PPO clip range
    [1 − eps_low, 1 + eps_high]; delta: optional upper bound on the unclipped ratio (two-sided clipping);
    loss_type: grpo (sequence means, then batch mean; R1-VL), bnpo (token mean over the batch), dr_grpo
    (÷ B·max_completion_length), dapo (÷ num_items, the global token count); temperature divides the logits.

    When the loss is given rewards, it normalises them into advantages in the same pass: group_size (G) consecutive
    completions share a prompt; A = (r − mean_G(r)) / (std + adv_eps), std as ``scale_rewards`` says (the group's,
    the batch's, or none: no division), unbiased (÷ G − 1, as torch.std and the R1-VL code) unless adv_unbiased is
    False."""

    beta: float = 0.04
    kl: str = "k3"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    loss_type: str = "grpo"
    temperature: float = 1.0
    max_completion_length: int | None = None
    group_size: int | None = None
    scale_rewards: str = "group"
    adv_eps: float = 1e-4
    adv_unbiased: bool = True

    def __post_init__(self) -> None:
        def finite(name: str, value: float, low: float = -math.inf) -> None:
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")

        finite("beta", self.beta)
        finite("eps_low", self.eps_low, 0.0)
        finite("eps_high", self.eps_high, 0.0)
        if self.eps_low >= 1:
            raise ValueError(f"eps_low must be < 1 (the lower clip bound is 1 - eps_low), got {self.eps_low}")
        if self.delta is not None:
            finite("delta", self.delta)
            if self.delta <= 1 + self.eps_high:
                raise ValueError(f"delta must exceed 1 + eps_high = {1 + self.eps_high}, got {self.delta}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.kl not in KL_ESTIMATORS:
            raise ValueError(f"kl must be one of {KL_ESTIMATORS}, got {self.kl!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.scale_rewards not in ADV_SCALES:
            raise ValueError(f"scale_rewards must be one of {ADV_SCALES}, got {self.scale_rewards!r}")
        finite("adv_eps", self.adv_eps, 0.0)
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
            if self.adv_unbiased and self.scale_rewards == "group" and self.group_size < 2:
                raise ValueError("an unbiased group std needs group_size >= 2")


def token_weights(mask: torch.Tensor, config: GRPOConfig, num_items: float | None = None) -> torch.Tensor:
    """w[b, t] such that loss = Σ w · ℓ: the reduction of each loss_type, as a weight per completion token.

    A fully masked sequence contributes 0 to a ``grpo`` loss and still counts in its batch mean (its token
    count is clamped to 1), as in TRL and the R1-VL code.
    """
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    batch, length = m.shape
    if config.loss_type == "grpo":
        return m / (batch * m.sum(dim=1, keepdim=True).clamp(min=1))
    if config.loss_type == "bnpo":
        return m / m.sum().clamp(min=1)
    if config.loss_type == "dr_grpo":
        return m / (batch * (config.max_completion_length or length))
    if num_items is None:
        return m / m.sum().clamp(min=1)
    if not float(num_items) > 0:
        raise ValueError(f"num_items must be > 0, got {num_items!r}")
    return m / float(num_items)
