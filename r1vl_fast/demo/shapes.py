"""The demo's synthetic visual reasoning set: PIL-drawn coloured shapes with counting and arithmetic questions,
reference reasoning in the R1-VL format, solutions and key steps with equivalent alternatives.

The images are made to be read by the demo's tiny vision tower: a 56 x 56 image is 2 x 2 cells of 28 px, and each
cell holds at most one large shape. After the 2 x 2 patch merge each cell is exactly one image token, so "is there a
shape here, and of which colour" is one token's content, and counting is counting tokens. The answers depend on the
image and are within the model's reach, so StepGRPO can raise the accuracy, not only the format.

Written as R1-VL-10K rows (RL) and Mulberry rows (SFT warm-up), so the demo exercises the same loaders as a real run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}
KINDS = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
IMAGE_SIZE = 56  # 4 x 4 patches of 14 px: 4 image tokens after the 2 x 2 merge
CELL = 28  # 2 x 2 cells, one image token each
MAX_SHAPES = 4


@dataclass
class Shape:
    color: str
    kind: str
    box: tuple[int, int, int, int]


def _draw(shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = s.box
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def _layout(rng: random.Random, n: int) -> list[tuple[int, int, int, int]]:
    """``n`` boxes in distinct cells of the 2 x 2 grid: one shape per image token, never overlapping."""
    boxes = []
    for c in rng.sample(range(4), n):
        size = rng.randint(18, 24)
        x = (c % 2) * CELL + rng.randint(2, CELL - size - 2)
        y = (c // 2) * CELL + rng.randint(2, CELL - size - 2)
        boxes.append((x, y, x + size, y + size))
    return boxes


def _describe(shapes: list[Shape]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for s in shapes:
        counts[(s.color, s.kind)] = counts.get((s.color, s.kind), 0) + 1
    parts = [f"{n} {color} {kind}{'' if n == 1 else 's'}" for (color, kind), n in sorted(counts.items())]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"The image shows {listing}."


def make_sample(rng: random.Random) -> tuple[Image.Image, dict]:
    """One image and its row: problem, reference reasoning, solution (= reasoning) and key steps."""
    n = rng.randint(1, MAX_SHAPES)
    shapes = [Shape(rng.choice(list(COLORS)), rng.choice(KINDS), box) for box in _layout(rng, n)]
    color = rng.choice([s.color for s in shapes] + [rng.choice(list(COLORS))])
    matching = sum(s.color == color for s in shapes)
    kind = rng.randint(0, 2)
    if kind == 0:
        problem = f"How many {color} shapes are in the image?"
        rationale = f"I count the {color} shapes."
        steps = [f"Count the {color} shapes: there are {matching}."]
        answer = matching
        key_steps = [[f"there are {matching}", f"there are {NUMBER_WORDS[matching]}"]]
    elif kind == 1:
        problem = "How many shapes are in the image in total?"
        rationale = "I count every shape."
        steps = [f"Count all shapes: there are {n}."]
        answer = n
        key_steps = [[f"there are {n}", f"there are {NUMBER_WORDS[n]}"]]
    else:
        extra = rng.randint(1, 4)
        answer = matching + extra
        problem = f"If {extra} more {color} shapes are added, how many {color} shapes will there be?"
        rationale = f"I count the {color} shapes, then add {extra}."
        steps = [f"Count the {color} shapes: there are {matching}.",
                 f"Add the new shapes: {matching} + {extra} = {answer}."]
        key_steps = [
            [f"there are {matching}", f"there are {NUMBER_WORDS[matching]}"],
            [f"{matching} + {extra} = {answer}", f"{extra} + {matching} = {answer}"],
        ]
    body = [
        "### Image Description:",
        _describe(shapes),
        "### Rationales:",
        rationale,
        "### Let's think step by step.",
    ]
    for i, step in enumerate(steps, 1):
        body += [f"### Step {i}:", step]
    body.append(f"### The final answer is: {answer}")
    reasoning = "\n".join(body)
    return _draw(shapes), {"problem": problem, "solution": reasoning, "key_steps": {"Steps": key_steps}}


def write_demo_data(root: str | Path, *, train: int, sft: int, eval: int, seed: int = 0) -> dict[str, Path]:
    """Writes images and three files under ``root``: ``rl.jsonl`` (R1-VL-10K rows), ``sft.jsonl`` (Mulberry rows)
    and ``eval.jsonl`` (held-out R1-VL rows). Deterministic in ``seed``; returns the three paths."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {name: root / f"{name}.jsonl" for name in ("rl", "sft", "eval")}
    counter = 0
    for name, count in (("sft", sft), ("rl", train), ("eval", eval)):
        with open(paths[name], "w", encoding="utf-8") as f:
            for _ in range(count):
                image, row = make_sample(rng)
                rel = f"images/{counter:06d}.png"
                image.save(root / rel)
                counter += 1
                if name == "sft":
                    record = {
                        "messages": [
                            {"role": "user", "content": "<image>" + row["problem"]},
                            {"role": "assistant", "content": row["solution"]},
                        ],
                        "images": [rel],
                    }
                else:
                    record = {"image_path": rel, **row}
                f.write(json.dumps(record) + "\n")
    return paths


def corpus(n: int, seed: int = 0) -> list[str]:
    """Problems and reasoning texts, for training the demo tokenizer."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        _, row = make_sample(rng)
        texts += [row["problem"], row["solution"]]
    return texts
