"""What every rollout engine shares: the ``RolloutEngine`` protocol the trainer calls, the sampling settings, the
``Rollouts`` it returns, and ``finish`` (masks, texts and finish reasons of sampled ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from r1vl_fast.processing import Processing, PromptInputs


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    greedy: bool = False


@dataclass
class Rollouts:
    """Completions in prompt-major order (the G completions of prompt i are rows i·G … i·G + G − 1).

    ``completion_ids`` [B, T] is right-padded; ``completion_mask`` [B, T] covers the tokens up to and including
    the first end-of-sequence token; ``logprobs`` [B, T] are the sampler's own, when the engine reports them.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    finish_reasons: list[str]
    logprobs: torch.Tensor | None = None


class RolloutEngine(Protocol):
    def generate(self, prompts: list[PromptInputs], n: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> Rollouts:
        """``n`` completions per prompt; ``seeds`` (one per prompt, default: drawn from torch's generator) make
        each prompt's samples independent of which other prompts share the batch or the rank."""

    def sync_weights(self, model: Any) -> None:
        """Called after every optimizer step with the updated policy."""


def completion_mask(ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first stop token, whether a stop token occurred) for ids [B, T]."""
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    stopped = is_stop.any(dim=1)
    first = torch.where(stopped, is_stop.int().argmax(dim=1), torch.full_like(stopped, ids.shape[1], dtype=torch.long))
    positions = torch.arange(ids.shape[1], device=ids.device)
    return positions[None, :] <= first[:, None], stopped


def finish(processing: Processing, ids: torch.Tensor, logprobs: torch.Tensor | None = None,
           sanitize: bool = False) -> Rollouts:
    """Masks, texts and finish reasons of sampled ids [B, T] (right-padded).

    Vision special tokens must not reach training: one would break the next forward's image-token count. Engines
    suppress them in sampling; with ``sanitize`` a completion that still holds one is cut just before it (finish
    reason ``sanitized``), otherwise it is an error.
    """
    mask, stopped = completion_mask(ids, processing.stop_token_ids)
    vision = torch.isin(ids, torch.tensor(processing.vision_token_ids or [-1], device=ids.device)) & mask
    sanitized = vision.any(dim=1)
    if sanitized.any():
        if not sanitize:
            row = int(sanitized.nonzero()[0])
            raise RuntimeError(f"completion {row} contains a vision special token; they must be suppressed in sampling")
        mask &= vision.int().cumsum(dim=1) == 0
    length = int(mask.sum(dim=1).max()) if mask.numel() else 0
    ids, mask = ids[:, :length], mask[:, :length]
    ids = ids.masked_fill(~mask, processing.pad_token_id)
    if logprobs is not None:
        logprobs = logprobs[:, :length].masked_fill(~mask, 0.0)
    texts = [processing.decode(row[m].tolist()) for row, m in zip(ids, mask)]
    reasons = ["sanitized" if z else "stop" if s else "length" for s, z in zip(stopped.tolist(), sanitized.tolist())]
    return Rollouts(ids, mask, texts, reasons, logprobs)


def draw_seeds(count: int) -> list[int]:
    return torch.randint(0, 2**31 - 1, (count,)).tolist()
