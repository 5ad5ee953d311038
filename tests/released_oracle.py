"""Test oracle: the released R1-VL reward functions' semantics restated in plain Python (SPEC.md, preset r1vl).

Written for the tests only; r1vl_fast's own implementation lives in r1vl_fast/rewards.
"""

from __future__ import annotations

import re

from math_verify import parse, verify

MARKER = "### The final answer is:"


def answer_or_whole(text: str) -> str:
    m = re.search(r"### The final answer is:\s*\n?(.*)", text)
    return m.group(1).strip() if m else text.strip()


def key_step_fraction(content: str, item: dict) -> float:
    steps = re.findall(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", content, re.DOTALL)
    haystack = " ".join(steps).lower()
    groups = item.get("Steps", [])
    hits = 0
    for group in groups:
        alternatives = [group] if isinstance(group, str) else group
        if any(alt.lower() in haystack for alt in alternatives):
            hits += 1
    return hits / len(groups) if len(groups) > 0 else 0.0


def accuracy(content: str, solution: str, item: dict | None) -> float:
    reward = 0.0
    try:
        if float(verify(parse(content), parse(solution))) > 0:
            reward = 1.0
    except Exception:
        pass
    if reward == 0.0 and answer_or_whole(content) == answer_or_whole(solution):
        reward = 1.0
    if item is not None:
        reward += key_step_fraction(content, item) * 0.1
    return reward


def validity(text: str) -> float:
    required = ["### Image Description:", "### Rationales:", "### Step 1:", MARKER]
    if any(r not in text for r in required):
        return 0.0
    if not text.strip().endswith(MARKER):
        first_answer = re.search(r"### The final answer is:.*?$", text, re.DOTALL)
        last_step_end = max(re.finditer(r"### Step \d+:", text), key=lambda m: m.end()).end()
        if not first_answer or first_answer.start() < last_step_end:
            return 0.0
    numbers = [int(d) for d in re.findall(r"### Step (\d+):", text)]
    return 1.0 if numbers and numbers == list(range(1, len(numbers) + 1)) else 0.0
