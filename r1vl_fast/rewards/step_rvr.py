"""StepRVR, the step-wise reasoning validity reward: 1 if the reasoning is complete and logically ordered.

``paper`` (default): complete = description, rationales, at least one step and a non-empty final answer;
ordered = Image Description → Rationales → (Let's think step by step.) → Step 1 … Step N (numbered 1..N) →
final answer, each once. ``r1vl``: the released code's substring and order checks, bit for bit.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from r1vl_fast.rewards.format import ANSWER_MARKER, DESCRIPTION, RATIONALES, check_texts, final_answer
from r1vl_fast.rewards.step_rar import PRESETS, Preset

_R1VL_REQUIRED = (DESCRIPTION, RATIONALES, "### Step 1:", ANSWER_MARKER)
_R1VL_STEP = re.compile(r"### Step (\d+):")
_HEADER = re.compile(
    r"### (?:(?P<d>Image Description:)|(?P<r>Rationales:)|(?P<t>Let's think step by step\.)"
    r"|Step (?P<s>[0-9]+):|(?P<a>The final answer is:))"
)


def _step_number(digits: str) -> int | None:
    """int(digits) for any Unicode decimal digits, without int()'s 4300-digit limit (None when huge)."""
    value = 0
    for ch in digits:
        value = value * 10 + unicodedata.decimal(ch)
        if value > 1 << 62:
            return None
    return value


def r1vl_valid(text: str) -> bool:
    """The released ``check_reasoning_completeness(text) and check_reasoning_logic(text)``."""
    if not all(section in text for section in _R1VL_REQUIRED):
        return False
    steps = list(_R1VL_STEP.finditer(text))
    # unless the text ends with the marker, the first marker must start after the end of the last step header
    if not text.strip().endswith(ANSWER_MARKER) and text.find(ANSWER_MARKER) < steps[-1].end():
        return False
    numbers = [_step_number(m.group(1)) for m in steps]
    return numbers == list(range(1, len(numbers) + 1))


def paper_valid(text: str) -> bool:
    """Complete and ordered: D, R, (T), S1..SN, A, each once, the answer non-empty."""
    kinds: list[str] = []
    for m in _HEADER.finditer(text):
        kind = m.lastgroup or ""
        kinds.append(f"s{_step_number(m.group('s'))}" if kind == "s" else kind)
    if kinds[:2] != ["d", "r"]:
        return False
    body = kinds[2:]
    if body[:1] == ["t"]:
        body = body[1:]
    if len(body) < 2 or body[-1] != "a":
        return False
    if body[:-1] != [f"s{i}" for i in range(1, len(body))]:
        return False
    return bool(final_answer(text))


def step_rvr(completions: Sequence[str], *, preset: Preset = "paper") -> np.ndarray:
    """StepRVR reward per completion, float32 (B,): 1.0 if valid, else 0.0."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    completions = check_texts("completions", completions)
    valid = r1vl_valid if preset == "r1vl" else paper_valid
    return np.array([1.0 if valid(c) else 0.0 for c in completions], dtype=np.float32)
