"""StepRAR, the step-wise reasoning accuracy reward: answer correctness plus α · (fraction of key steps found).

Presets (SPEC.md): ``paper`` (default) r = 1 + α·k if the final answer is correct, α·k if a final answer exists
but is wrong, 0 without a final answer; soft key-step matching. ``r1vl`` reproduces the released code bit for
bit: r = 1[correct] + α·k always, math-verify on the whole completion with the gold second, then an exact
string fallback on the answer lines, and lower-cased substring key-step matching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from r1vl_fast.rewards.answers import MathVerifier, default_verifier, same_answer
from r1vl_fast.rewards.format import check_texts, final_answer
from r1vl_fast.rewards.key_steps import (
    CompiledKeySteps,
    KeyStepsItem,
    MatchMode,
    Scope,
    match_key_step_counts,
)

Preset = Literal["paper", "r1vl"]
PRESETS = ("paper", "r1vl")


@dataclass
class StepRARScores:
    reward: np.ndarray  # float32 (B,): the StepRAR reward
    correct: np.ndarray  # bool (B,): final answer judged correct
    has_answer: np.ndarray  # bool (B,): a non-empty final answer line exists
    key_steps: np.ndarray  # float64 (B,): k, the fraction of key-step groups matched


def preset_matching(preset: str) -> tuple[MatchMode, int]:
    """The key-step matcher of a reward preset, as (mode, min_alt_len): ``r1vl`` the released lower-cased substring
    search, empty alternatives included; ``paper`` the normalised soft matching, empty alternatives ignored."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return ("r1vl", 0) if preset == "r1vl" else ("normalized", 1)


def score_step_rar(
    completions: Sequence[str],
    solutions: Sequence[str],
    key_steps: Sequence[KeyStepsItem] | CompiledKeySteps | None,
    *,
    preset: Preset = "paper",
    alpha: float = 0.1,
    match_mode: MatchMode | None = None,
    scope: Scope = "steps",
    fuzzy_threshold: float = 90.0,
    min_alt_len: int | None = None,
    verifier: MathVerifier | None = None,
    threads: int = 0,
) -> StepRARScores:
    """StepRAR with its parts. ``match_mode`` defaults to ``normalized`` (paper) or ``r1vl``; ``min_alt_len`` to
    1 (paper) or 0 (r1vl). ``key_steps=None`` drops the key-step term (k = 0)."""
    preset_mode, preset_min_len = preset_matching(preset)
    completions = check_texts("completions", completions)
    n = len(completions)
    solutions = check_texts("solutions", solutions, n)
    verifier = verifier or default_verifier()

    k = np.zeros(n, dtype=np.float64)
    if key_steps is not None:
        if len(key_steps) != n:
            raise ValueError(f"key_steps has {len(key_steps)} items but completions has {n}")
        if isinstance(key_steps, CompiledKeySteps):
            mode, min_len = match_mode, min_alt_len
        else:
            mode = match_mode or preset_mode
            min_len = min_alt_len if min_alt_len is not None else preset_min_len
        matched, total = match_key_step_counts(
            completions, key_steps, mode=mode, scope=scope, fuzzy_threshold=fuzzy_threshold, min_alt_len=min_len,
            threads=threads,
        )
        np.divide(matched, total, out=k, where=total > 0)

    if preset == "r1vl":
        # verify(parse(completion), parse(solution)): the whole completion, gold second, as released.
        correct = np.array(verifier.check(list(zip(completions, solutions))), dtype=bool)
        for i in np.flatnonzero(~correct):
            gold = final_answer(solutions[i])
            pred = final_answer(completions[i])
            gold = gold if gold is not None else solutions[i].strip()
            pred = pred if pred is not None else completions[i].strip()
            correct[i] = pred == gold
        has_answer = np.array([final_answer(c) is not None for c in completions], dtype=bool)
        reward = correct.astype(np.float64) + k * alpha
    else:
        preds = [final_answer(c) for c in completions]
        has_answer = np.array([bool(p) for p in preds], dtype=bool)
        golds = [g if (g := final_answer(s)) is not None else s.strip() for s in solutions]
        answered = np.flatnonzero(has_answer)
        # gold first, on the final-answer lines only
        verdicts = verifier.check([(golds[i], preds[i]) for i in answered])  # type: ignore[misc]
        correct = np.zeros(n, dtype=bool)
        for i, ok in zip(answered, verdicts):
            correct[i] = ok or same_answer(preds[i], golds[i])  # type: ignore[arg-type]
        reward = np.where(has_answer, correct.astype(np.float64) + alpha * k, 0.0)
    return StepRARScores(reward=reward.astype(np.float32), correct=correct, has_answer=has_answer, key_steps=k)


def step_rar(
    completions: Sequence[str],
    solutions: Sequence[str],
    key_steps: Sequence[KeyStepsItem] | CompiledKeySteps | None,
    *,
    preset: Preset = "paper",
    alpha: float = 0.1,
    match_mode: MatchMode | None = None,
    scope: Scope = "steps",
    fuzzy_threshold: float = 90.0,
    min_alt_len: int | None = None,
    verifier: MathVerifier | None = None,
    threads: int = 0,
) -> np.ndarray:
    """StepRAR reward per completion, float32 (B,). See :func:`score_step_rar`."""
    return score_step_rar(
        completions, solutions, key_steps, preset=preset, alpha=alpha, match_mode=match_mode, scope=scope,
        fuzzy_threshold=fuzzy_threshold, min_alt_len=min_alt_len, verifier=verifier, threads=threads,
    ).reward
