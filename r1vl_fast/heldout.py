"""Held-out scoring during and around training: the policy samples like in training (G completions per prompt at
the sampling temperature) and is scored with the training rewards: mean reward, answer accuracy, validity (StepRVR)
and key-step recall. Benchmark evaluation in the paper's format is ``python -m r1vl_fast.eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1vl_fast.checkpoint import rng_state, set_rng_state
from r1vl_fast.config import GRPOTrainConfig
from r1vl_fast.data import Sample, held_out_split, load_rl_dataset
from r1vl_fast.distributed import World, all_sum
from r1vl_fast.modeling import load_model
from r1vl_fast.processing import Processing
from r1vl_fast.rewards.step_rewards import StepRewards
from r1vl_fast.rollout import HFRolloutEngine, draw_seeds, sample_completions


def evaluate(model: Any, processing: Processing, samples: list[Sample], *, preset: str = "paper", alpha: float = 0.1,
             max_new_tokens: int = 256, batch_size: int = 16, temperature: float | None = None, n: int = 1,
             seed: int = 0, device: torch.device | None = None, world: World | None = None,
             synced: bool = False) -> dict[str, float]:
    """Held-out scoring with the training rewards: mean reward, answer accuracy, validity (StepRVR) and key-step
    recall over ``n`` completions per sample (sampled: the quantity RL maximises; or greedy).

    Leaves every random generator as it found it, so a run that evaluates mid-training trains exactly like one
    that does not. Under torchrun each rank scores its share and the sums are reduced (``synced``: FSDP ranks
    generate in step, so every rank runs the same number of batches)."""
    device = device or next(model.parameters()).device
    world = world or World()
    state = rng_state()
    try:
        torch.manual_seed(seed)
        seeds = draw_seeds(len(samples))  # one per held-out prompt, whichever rank scores it
        share, share_seeds = samples[world.rank :: world.size], seeds[world.rank :: world.size]
        padded = -(-len(samples) // world.size)  # every rank the same batches: pad with copies that carry no weight
        weights = [1.0] * len(share) + [0.0] * (padded - len(share))
        share, share_seeds = share + [samples[0]] * (padded - len(share)), share_seeds + [0] * (padded - len(share))
        texts, _ = sample_completions(HFRolloutEngine(model, processing, device, synced=synced), processing,
                                      [(s.problem, s.image) for s in share], n=n, temperature=temperature,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, seeds=share_seeds)
    finally:
        set_rng_state(state)
    rewards = StepRewards([s.solution for s in share], [s.key_steps for s in share], preset=preset,  # type: ignore[arg-type]
                          alpha=alpha)
    scores = rewards(texts, [i for i in range(len(share)) for _ in range(n)])
    weight = np.repeat(np.asarray(weights), n)
    count = all_sum(float(weight.sum()), world)
    parts = {"reward": scores.total, "accuracy": scores.correct, "validity": scores.step_rvr,
             "key_step_recall": scores.key_steps}
    return {k: all_sum(float((np.asarray(v, dtype=np.float64) * weight).sum()), world) / count
            for k, v in parts.items()}


def load_held_out(dataset: str | Path, processing: Processing, config: GRPOTrainConfig) -> list[Sample]:
    """Held-out R1-VL rows, validated like the run's training rows."""
    samples, _ = load_rl_dataset(dataset, processing, image_root=config.image_root,
                                 max_prompt_length=config.max_prompt_length, skip_invalid=config.skip_invalid,
                                 split=config.eval_dataset_split or held_out_split(dataset),
                                 columns=config.columns())
    return samples


def evaluate_run(model: Any, processing: Processing, samples: list[Sample], config: GRPOTrainConfig,
                 device: torch.device, *, world: World | None = None, synced: bool = False) -> dict[str, float]:
    """:func:`evaluate` with the run's rewards and sampling (G samples per prompt at ``--temperature``)."""
    return evaluate(model, processing, samples, preset=config.reward_preset, alpha=config.step_rar_alpha,
                    max_new_tokens=config.max_completion_length, temperature=config.temperature,
                    n=config.num_generations, seed=config.seed, device=device, world=world, synced=synced)


def evaluate_checkpoint(path: str | Path, dataset: str | Path, config: GRPOTrainConfig,
                        device: torch.device) -> dict[str, float]:
    """:func:`evaluate_run` on a saved model."""
    processing = Processing.from_pretrained(str(path), min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    samples = load_held_out(dataset, processing, config)
    model = load_model(str(path), device=device, dtype=torch.float32, trainable=False)
    return evaluate_run(model, processing, samples, config, device)
