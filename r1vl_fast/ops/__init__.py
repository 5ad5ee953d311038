"""Policy-update ops for StepGRPO: selective log-probs, group-normalised advantages and the fused GRPO loss
(Triton kernels in ``r1vl_fast.kernels``; plain-PyTorch twins in ``r1vl_fast.ops.reference``), and the same with
the LM head fused in (``r1vl_fast.ops.linear``: no logits tensor)."""

from r1vl_fast.ops.config import (
    ADV_SCALES,
    IMPLS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    GRPOConfig,
    resolve_impl,
    token_weights,
)
from r1vl_fast.ops.fused import group_advantages, grpo_loss, selective_log_probs
from r1vl_fast.ops.importance import IS_MODES, importance_weights
from r1vl_fast.ops.linear import linear_grpo_loss, linear_log_probs

__all__ = ["ADV_SCALES", "IMPLS", "IS_MODES", "KL_ESTIMATORS", "LOSS_TYPES", "GRPOConfig", "group_advantages",
           "grpo_loss", "importance_weights", "linear_grpo_loss", "linear_log_probs", "resolve_impl",
           "selective_log_probs", "token_weights"]
