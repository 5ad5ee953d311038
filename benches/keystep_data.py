"""A realistic StepRAR batch: Mulberry-format completions of ~3 KB and R1-VL-10K-style key steps
(12 groups × 3 alternatives), about half of the groups present in each completion."""

from __future__ import annotations

import random

FILLER = (
    "we look at the figure again and note that the segment is parallel to the base so the triangles are "
    "similar then the ratio of corresponding sides is the same for every pair and we can write the "
    "proportion carefully substituting the known lengths gives an equation in one unknown which we solve "
    "step by step below"
).split()


def _key_group(rng: random.Random, i: int) -> list[str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    kind = i % 4
    if kind == 0:
        return [f"{a * b}/{b} = {a}", f"frac{{{a * b}}}{{{b}}} = {a}", f"{a * b} / {b} = {a}"]
    if kind == 1:
        return [f"{a} + {b} = {a + b}", f"{b} + {a} = {a + b}", f"sum is {a + b}"]
    if kind == 2:
        word = rng.choice(["similar triangles", "pythagorean theorem", "area formula", "angle bisector"])
        return [word, word.title(), word.replace(" ", "-")]
    return [f"x = {a}", f"x={a}", f"value of x is {a}"]


def make_batch(n_completions: int = 1024, group_size: int = 4, seed: int = 0,
               n_groups: int = 12, target_bytes: int = 3000) -> tuple[list[str], list[dict]]:
    """Completions and one key_steps dict per completion (the G completions of a prompt share one object)."""
    rng = random.Random(seed)
    texts: list[str] = []
    key_steps: list[dict] = []
    for _ in range(n_completions // group_size):
        groups = [_key_group(rng, i) for i in range(n_groups)]
        item = {"Steps": groups}
        for _ in range(group_size):
            parts = ["### Image Description:\nA geometry figure with labelled lengths.",
                     "### Rationales:\nThe question asks for an unknown length.", "### Let's think step by step."]
            step = 1
            body_len = 0
            while body_len < target_bytes - 300:
                words = rng.choices(FILLER, k=rng.randint(30, 60))
                if rng.random() < 0.55:
                    words.insert(rng.randrange(len(words)), rng.choice(rng.choice(groups)))
                section = f"### Step {step}:\n" + " ".join(words)
                parts.append(section)
                body_len += len(section)
                step += 1
            parts.append(f"### The final answer is: {rng.randint(1, 99)}")
            texts.append("\n".join(parts))
            key_steps.append(item)
    return texts, key_steps


def distinct_copies(key_steps: list[dict]) -> list[dict]:
    """The same key steps as separate objects, so no two completions share a Python object."""
    return [{"Steps": [list(g) for g in item["Steps"]]} for item in key_steps]
