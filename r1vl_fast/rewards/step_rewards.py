"""StepRAR + StepRVR for a batch of completions, each scored against its own sample's solution and key steps.

Completions carry the index of the sample they answer, so rewards stay aligned whatever the batch layout (the
released code misaligns them when a device holds more than G completions). Key steps are compiled once per dataset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from r1vl_fast.rewards.key_steps import compile_key_steps
from r1vl_fast.rewards.step_rar import Preset, preset_matching, score_step_rar
from r1vl_fast.rewards.step_rvr import step_rvr

log = logging.getLogger("r1vl_fast")


@dataclass
class RewardBreakdown:
    """Per completion: the total r = StepRAR + StepRVR and its parts (float32 / bool arrays of length B)."""

    total: np.ndarray
    step_rar: np.ndarray
    step_rvr: np.ndarray
    correct: np.ndarray
    key_steps: np.ndarray

    def row(self, i: int) -> dict[str, Any]:
        return {"reward": float(self.total[i]), "step_rar": float(self.step_rar[i]),
                "step_rvr": float(self.step_rvr[i]), "correct": bool(self.correct[i]),
                "key_steps": float(self.key_steps[i])}


class StepRewards:
    """The StepGRPO reward of a dataset: ``rewards(texts, sample_ids)``."""

    def __init__(self, solutions: Sequence[str], key_steps: Sequence[dict[str, Any]], *, preset: Preset = "paper",
                 alpha: float = 0.1, where: Sequence[str] | None = None) -> None:
        """``where`` names the rows (file:line) in the warning about empty key steps."""
        self.solutions = list(solutions)
        self.preset, self.alpha = preset, alpha
        mode, min_len = preset_matching(preset)
        self.key_steps = compile_key_steps(list(key_steps), mode=mode, min_alt_len=min_len)
        warn_empty_key_steps(key_steps, preset, where)

    def __call__(self, texts: Sequence[str], sample_ids: Sequence[int]) -> RewardBreakdown:
        if len(texts) != len(sample_ids):
            raise ValueError(f"{len(texts)} completions but {len(sample_ids)} sample ids")
        ids = np.asarray(sample_ids, dtype=np.int64)
        rar = score_step_rar(list(texts), [self.solutions[i] for i in ids], self.key_steps[ids], preset=self.preset,
                             alpha=self.alpha)
        rvr = step_rvr(list(texts), preset=self.preset)
        return RewardBreakdown(total=(rar.reward + rvr).astype(np.float32), step_rar=rar.reward, step_rvr=rvr,
                               correct=rar.correct, key_steps=rar.key_steps.astype(np.float32))


def _alternatives(group: Any) -> list[Any]:
    return [group] if isinstance(group, str) else list(group)


def warn_empty_key_steps(key_steps: Sequence[dict[str, Any]], preset: str,
                         where: Sequence[str] | None = None) -> dict[str, list[int]]:
    """One warning per dataset (per kind) for rows whose key steps are empty: no groups at all (StepRAR's key-step
    term is then 0 for that row), or, under ``r1vl``, an empty alternative, which as in the released code matches
    every completion. Both are kept as they are (the ``r1vl`` preset is bit-exact); the warning says so. Returns
    the rows of each kind."""
    no_groups = [i for i, k in enumerate(key_steps) if not k.get("Steps")]
    empty_alt = [i for i, k in enumerate(key_steps)
                 if any(a == "" for g in k.get("Steps") or [] for a in _alternatives(g))]

    def rows(ids: list[int]) -> str:
        names = [where[i] if where is not None else f"sample {i}" for i in ids[:3]]
        return ", ".join(names) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")

    if no_groups:
        log.warning("%d rows have no key steps ({\"Steps\": []}): their StepRAR has no key-step term (%s)",
                    len(no_groups), rows(no_groups))
    if empty_alt and preset == "r1vl":
        log.warning("%d rows have an empty key-step alternative (\"\"): under --reward_preset r1vl it matches "
                    "every completion, as in the released code (%s)", len(empty_alt), rows(empty_alt))
    return {"no_groups": no_groups, "empty_alternative": empty_alt if preset == "r1vl" else []}
