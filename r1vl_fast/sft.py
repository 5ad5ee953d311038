"""``python -m r1vl_fast.sft``: the SFT warm-up on Mulberry-format data that teaches the step-by-step format
before StepGRPO (same options, checkpoints and resume as the trainer).

    python -m r1vl_fast.sft --model_name_or_path Qwen/Qwen2-VL-2B-Instruct --dataset mulberry.jsonl \\
        --image_root images/ --preset r1vl-2b --output_dir runs/sft-2b
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from r1vl_fast.config import SFTConfig, parse_config
from r1vl_fast.data import EpochSampler, SFTSample, encode_prompt, load_sft_dataset
from r1vl_fast.distributed import World, all_sum, load_optimizer_state, optimizer_state
from r1vl_fast.modeling import completion_logits
from r1vl_fast.processing import Processing, batch_inputs
from r1vl_fast.recipe import load_policy, run_loop, setup_logging, start_run
from r1vl_fast.trainer import make_optimizer, optimizer_step

log = logging.getLogger("r1vl_fast")


class SFTTrainer:
    """Cross-entropy on the response tokens (the prompt and image tokens are context only)."""

    def __init__(self, config: SFTConfig, *, policy: Any, processing: Processing, samples: list[SFTSample],
                 device: torch.device, total_steps: int, world: World | None = None) -> None:
        self.config, self.policy, self.processing, self.samples = config, policy, processing, samples
        self.world = world or World()
        self.device, self.total_steps = device, total_steps
        self.optimizer, self.scheduler = make_optimizer(policy, config, total_steps)
        self.sampler = EpochSampler(len(samples), config.seed)
        self.step_idx = 0

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
        logits = completion_logits(self.policy, inputs, width).float()
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
        stepped = optimizer_step(self.policy, self.optimizer, self.scheduler, c.max_grad_norm)
        self.step_idx += 1
        return {"step": self.step_idx, "loss": total_loss / total_tokens, **stepped,
                "tokens": total_tokens, "time/update": time.perf_counter() - start,
                "epoch": self.sampler.epoch + self.sampler.position / len(self.samples)}

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return ({"sampler": self.sampler.state_dict(), "total_steps": self.total_steps},
                {"optimizer": optimizer_state(self.policy, self.optimizer), "scheduler": self.scheduler.state_dict()})

    def load_state(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.step_idx = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        load_optimizer_state(self.policy, self.optimizer, tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])


def run_sft(config: SFTConfig) -> Path:
    """Supervised warm-up; returns the final checkpoint."""
    run = start_run(config, "sft")
    assert config.dataset is not None
    samples, report = load_sft_dataset(config.dataset, run.processing, image_root=config.image_root,
                                       max_length=config.max_length, skip_invalid=config.skip_invalid)
    log.info("dataset %s: %s", config.dataset, report.summary())
    policy = load_policy(run, config)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * run.world.size
    steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * len(samples)
                                                                            / per_step))
    trainer = SFTTrainer(config, policy=policy, processing=run.processing, samples=samples, device=run.device,
                         total_steps=steps, world=run.world)
    return run_loop(trainer, config, run.output_dir, run.processing, kind="SFT", checkpoint=run.checkpoint,
                    world=run.world)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(SFTConfig, argv, "python -m r1vl_fast.sft")
    assert isinstance(config, SFTConfig)
    run_sft(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
