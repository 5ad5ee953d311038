"""The completion format the rewards read (Mulberry / R1-VL): the section headers, the ``### Step N:`` sections, the
final-answer line, and the check that reward inputs are sequences of strings."""

from __future__ import annotations

import re
from collections.abc import Sequence

DESCRIPTION = "### Image Description:"
RATIONALES = "### Rationales:"
ANSWER_MARKER = "### The final answer is:"
_ANSWER_LINE = re.compile(r"### The final answer is:\s*\n?(.*)")
# The text of each "### Step N:" section, up to the next header (what the released code's key-step search reads).
STEP_SECTION = re.compile(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", re.DOTALL)


def final_answer(text: str) -> str | None:
    """Text after the first final-answer marker, up to the end of that line, stripped; None without a marker."""
    match = _ANSWER_LINE.search(text)
    return match.group(1).strip() if match else None


def check_texts(name: str, values: Sequence[str], n: int | None = None) -> list[str]:
    """``values`` as a list of str (``n`` of them when given); errors name the argument and the index."""
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of str, got a single str")
    values = list(values)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be str, got {type(v).__name__}")
    if n is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} items but completions has {n}")
    return values
