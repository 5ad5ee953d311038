"""Loading the policy (and its frozen reference) with the Auto classes, and the per-token log-probabilities of
completions under a model."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from r1vl_fast.ops import selective_log_probs
from r1vl_fast.processing import is_multimodal


def attn_implementation(device: torch.device) -> str:
    """flash_attention_2 when flash-attn is importable on a GPU, else PyTorch SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(path: str, *, device: torch.device, dtype: torch.dtype, trainable: bool = True) -> Any:
    """A vision-language model (Qwen2-VL, Qwen2.5-VL) or a causal LM, by its config."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if is_multimodal(path) else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(device))
    model = model.to(device)  # type: ignore[arg-type]
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def completion_logits(model: Any, batch: dict[str, torch.Tensor], completion_length: int) -> torch.Tensor:
    """Logits [B, T + 1, V] as the model computes them for the last T = ``completion_length`` tokens of
    ``batch['input_ids']``: position t predicts completion token t, the last position predicts past the end. The
    loss takes this buffer as it is (``grpo_loss(..., last_position_unused=True)``): a slice would make autograd
    copy its gradient into a zeroed buffer of the full size."""
    return model(**batch, use_cache=False, logits_to_keep=completion_length + 1).logits


@torch.no_grad()
def completion_log_probs(
    model: Any, batch: dict[str, torch.Tensor], completion_ids: torch.Tensor, temperature: float, impl: str = "auto"
) -> torch.Tensor:
    """fp32 log-probs [B, T] of the completion tokens (the no-grad path: old and reference policies)."""
    logits = completion_logits(model, batch, completion_ids.shape[1])[:, :-1]  # a view: read once, nothing copied
    return selective_log_probs(logits, completion_ids, temperature=temperature, validate=False,  # type: ignore[return-value]
                               impl=impl)
