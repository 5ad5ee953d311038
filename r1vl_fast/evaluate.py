"""Scoring a model on held-out rows with the training rewards: mean reward, answer accuracy, validity (StepRVR)
and key-step recall, from greedy completions."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from r1vl_fast.data import Sample, encode_prompt
from r1vl_fast.processing import Processing
from r1vl_fast.rewards.scoring import StepRewards
from r1vl_fast.rollout import HFRolloutEngine, SamplingConfig


def evaluate(model: Any, processing: Processing, samples: list[Sample], *, preset: str = "paper", alpha: float = 0.1,
             max_new_tokens: int = 256, batch_size: int = 16, device: torch.device | None = None) -> dict[str, float]:
    device = device or next(model.parameters()).device
    rewards = StepRewards([s.solution for s in samples], [s.key_steps for s in samples], preset=preset,  # type: ignore[arg-type]
                          alpha=alpha)
    engine = HFRolloutEngine(model, processing, device)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    parts = []
    for start in range(0, len(samples), batch_size):
        ids = list(range(start, min(start + batch_size, len(samples))))
        prompts = [encode_prompt(processing, samples[i].problem, samples[i].image) for i in ids]
        parts.append(rewards(engine.generate(prompts, n=1, sampling=sampling).texts, ids))
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("total", "correct", "step_rvr", "key_steps")}
    return {"reward": float(cat["total"].mean()), "accuracy": float(cat["correct"].mean()),
            "validity": float(cat["step_rvr"].mean()), "key_step_recall": float(cat["key_steps"].mean())}
