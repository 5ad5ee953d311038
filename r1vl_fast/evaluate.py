"""Scoring a model on held-out rows with the training rewards: mean reward, answer accuracy, validity (StepRVR)
and key-step recall, over ``n`` sampled completions per prompt (the quantity RL maximises) or greedy ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1vl_fast.config import GRPOTrainConfig
from r1vl_fast.data import Sample, encode_prompt, load_rl_dataset
from r1vl_fast.modeling import is_multimodal, load_model
from r1vl_fast.processing import Processing
from r1vl_fast.rewards.scoring import StepRewards
from r1vl_fast.rollout import HFRolloutEngine, SamplingConfig


def evaluate(model: Any, processing: Processing, samples: list[Sample], *, preset: str = "paper", alpha: float = 0.1,
             max_new_tokens: int = 256, batch_size: int = 16, temperature: float | None = None, n: int = 1,
             seed: int = 0, device: torch.device | None = None) -> dict[str, float]:
    """Means over the completions; ``temperature=None`` decodes greedily (then ``n`` should be 1)."""
    device = device or next(model.parameters()).device
    rewards = StepRewards([s.solution for s in samples], [s.key_steps for s in samples], preset=preset,  # type: ignore[arg-type]
                          alpha=alpha)
    engine = HFRolloutEngine(model, processing, device)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=temperature is None,
                              temperature=temperature or 1.0)
    parts = []
    torch.manual_seed(seed)
    for start in range(0, len(samples), batch_size):
        ids = list(range(start, min(start + batch_size, len(samples))))
        prompts = [encode_prompt(processing, samples[i].problem, samples[i].image) for i in ids]
        texts = engine.generate(prompts, n=n, sampling=sampling).texts
        parts.append(rewards(texts, [i for i in ids for _ in range(n)]))
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("total", "correct", "step_rvr", "key_steps")}
    return {"reward": float(cat["total"].mean()), "accuracy": float(cat["correct"].mean()),
            "validity": float(cat["step_rvr"].mean()), "key_step_recall": float(cat["key_steps"].mean())}


def evaluate_checkpoint(path: str | Path, dataset: str | Path, config: GRPOTrainConfig,
                        device: torch.device) -> dict[str, float]:
    """:func:`evaluate` on a saved model, with the run's rewards and sampling (G samples per prompt)."""
    processing = Processing.from_pretrained(str(path), min_pixels=config.min_pixels, max_pixels=config.max_pixels,
                                            multimodal=is_multimodal(str(path)))
    samples, _ = load_rl_dataset(dataset, processing, image_root=config.image_root,
                                 max_prompt_length=config.max_prompt_length, skip_invalid=config.skip_invalid)
    model = load_model(str(path), device=device, dtype=torch.float32, trainable=False)
    return evaluate(model, processing, samples, preset=config.reward_preset, alpha=config.step_rar_alpha,
                    max_new_tokens=config.max_completion_length, temperature=config.temperature,
                    n=config.num_generations, seed=config.seed, device=device)
