"""Hand-written and generated Mulberry-format completions for the tests."""

from __future__ import annotations

import random

GOOD = (
    "### Image Description:\nA triangle with legs 3 and 4.\n"
    "### Rationales:\nUse the Pythagorean theorem.\n"
    "### Let's think step by step.\n"
    "### Step 1:\nCompute 3^2 + 4^2 = 25.\n"
    "### Step 2:\nThe hypotenuse is \\sqrt{25} = 5.\n"
    "### The final answer is: 5"
)
SOLUTION = "### Step 1:\n3^2 + 4^2 = 25\n### Step 2:\nsqrt(25) = 5\n### The final answer is: 5"
KEY_STEPS = {"Steps": [["3^2 + 4^2 = 25", "9 + 16 = 25"], "hypotenuse", ["= 5", "is 5"]]}

WORDS = ["area", "angle", "sum", "x", "12/2 = 6", "frac{12}{2} = 6", "0.5", "ΑΣ", "İ", "ẞ", "3 × 4", "\\frac{1}{2}",
         "$5$", "1,000", "−3", "\u200f", "😀", "\x00", "\n", "### ", "Step", ":", "  ", "\\left(", "\\right)", "°"]


def random_completion(rng: random.Random, max_steps: int = 4) -> str:
    parts = []
    if rng.random() < 0.9:
        parts.append("### Image Description:\n" + " ".join(rng.choices(WORDS, k=rng.randint(0, 5))))
    if rng.random() < 0.9:
        parts.append("### Rationales:\n" + " ".join(rng.choices(WORDS, k=rng.randint(0, 5))))
    if rng.random() < 0.5:
        parts.append("### Let's think step by step.")
    numbers = list(range(1, rng.randint(0, max_steps) + 1))
    if rng.random() < 0.2:
        rng.shuffle(numbers)
    if rng.random() < 0.1 and numbers:
        numbers[-1] += 1
    for n in numbers:
        words = " ".join(rng.choices(WORDS, k=rng.randint(0, 8)))
        parts.append(f"### Step {n}:" + rng.choice(["\n", " ", "", "\n\n"]) + words)
    if rng.random() < 0.85:
        parts.append("### The final answer is:" + rng.choice([" 6", " 5", "", "\n6", " 0.5", " \\frac{1}{2}", " A"]))
    if rng.random() < 0.1:
        rng.shuffle(parts)
    return "\n".join(parts) + rng.choice(["", "\n", " trailing", "\n### Step 9: late"])


def random_key_steps(rng: random.Random) -> dict:
    groups = []
    for _ in range(rng.randint(0, 5)):
        alts = rng.choices(WORDS + ["", "step", "x"], k=rng.randint(1, 3))
        groups.append(alts[0] if len(alts) == 1 and rng.random() < 0.5 else alts)
    return {"Steps": groups}
