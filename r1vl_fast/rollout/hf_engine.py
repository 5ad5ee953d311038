"""The transformers rollout engine: ``generate`` on the training model itself (colocated, no weight copy, always in
sync), with per-row seeded sampling so that a completion depends on its seed only."""

from __future__ import annotations

from typing import Any

import torch

from r1vl_fast.distributed import is_fsdp
from r1vl_fast.modeling import vision_before_generate
from r1vl_fast.processing import Processing, PromptInputs, batch_inputs
from r1vl_fast.rollout.engine import Rollouts, SamplingConfig, draw_seeds, finish


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
            vision_before_generate(self.model, batch)  # a rank without images keeps in step with those with
            out = self.model.generate(**batch, **kwargs)
        finally:
            self.model.train(was_training)
            if is_fsdp(self.model):
                self.model.reshard()  # FSDP2 leaves the root gathered after generate(); saves and steps need shards
        return finish(self.processing, out[:, batch["input_ids"].shape[1]:].cpu())

    def sync_weights(self, model: Any) -> None:
        pass
