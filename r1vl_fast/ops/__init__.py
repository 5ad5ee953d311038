"""Policy-update ops for StepGRPO: selective log-probs, group-normalised advantages and the fused GRPO loss
(Triton kernels in ``r1vl_fast.kernels``; plain-PyTorch twins in ``r1vl_fast.ops.reference``)."""

from r1vl_fast.ops.config import GRPOConfig, token_weights
from r1vl_fast.ops.fused import group_advantages, grpo_loss, selective_log_probs

__all__ = ["GRPOConfig", "group_advantages", "grpo_loss", "selective_log_probs", "token_weights"]
