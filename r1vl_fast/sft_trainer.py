"""The SFT warm-up step on Mulberry-format data, which teaches the step-by-step format before StepGRPO: cross-entropy
on the response tokens, a token mean over the whole accumulated global batch."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from r1vl_fast.config import SFTConfig
from r1vl_fast.data import SFTSample, encode_prompt
from r1vl_fast.distributed import World, all_sum
from r1vl_fast.modeling import completion_logits
from r1vl_fast.optim import TrainerBase
from r1vl_fast.processing import Processing, batch_inputs


class SFTTrainer(TrainerBase):
    """Cross-entropy on the response tokens (the prompt and image tokens are context only)."""

    def __init__(self, config: SFTConfig, *, policy: Any, processing: Processing, samples: list[SFTSample],
                 device: torch.device, total_steps: int, world: World | None = None) -> None:
        super().__init__(config, policy, num_samples=len(samples), total_steps=total_steps, world=world)
        self.config, self.processing, self.samples, self.device = config, processing, samples, device

    def micro_batch_loss(self, ids: list[int]) -> torch.Tensor:
        """Summed cross-entropy of the responses of samples ``ids``."""
        prompts = [encode_prompt(self.processing, self.samples[i].prompt, self.samples[i].image) for i in ids]
        responses = [self.processing.encode_response(self.samples[i].response) for i in ids]
        width = max(len(r) for r in responses)
        inputs = batch_inputs(self.processing, prompts, responses, device=self.device)
        targets = inputs["input_ids"][:, -width:]
        mask = torch.zeros_like(targets, dtype=torch.bool)
        for j, r in enumerate(responses):
            mask[j, : len(r)] = True
        logits = completion_logits(self.policy, inputs, width)[:, :-1].float()
        return F.cross_entropy(logits[mask], targets[mask], reduction="sum")

    def step(self) -> dict[str, Any]:
        c = self.config
        start = time.perf_counter()
        self.policy.train()
        batches = [self.world.shard(self.sampler.take(c.per_device_train_batch_size * self.world.size))
                   for _ in range(c.gradient_accumulation_steps)]
        # token-mean over the whole accumulated global batch: count the response tokens first (known from loading)
        local_tokens = sum(self.samples[i].response_tokens for b in batches for i in b)
        total_tokens = int(all_sum(float(local_tokens), self.world))
        total_loss = 0.0
        for ids in batches:
            loss = self.micro_batch_loss(ids)
            (loss * self.world.size / total_tokens).backward()  # DDP / FSDP average gradients over ranks
            total_loss += float(loss.detach())
        total_loss = all_sum(total_loss, self.world)
        stepped = self.optimizer_step()
        self.step_idx += 1
        return {"step": self.step_idx, "loss": total_loss / total_tokens, **stepped,
                "tokens": total_tokens, "time/update": time.perf_counter() - start,
                "epoch": self.sampler.epoch + self.sampler.position / len(self.samples)}
