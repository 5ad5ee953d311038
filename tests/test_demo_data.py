"""The demo's dataset: deterministic for a seed (so the demo's figures are reproducible), and its answers are what
the image shows, one shape per image token."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from r1vl_fast.demo.run import what_changed
from r1vl_fast.demo.shapes import CELL, COLORS, IMAGE_SIZE, make_sample, write_demo_data


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_generator_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = write_demo_data(tmp_path / "a", train=24, sft=24, eval=8, seed=1)
    b = write_demo_data(tmp_path / "b", train=24, sft=24, eval=8, seed=1)
    c = write_demo_data(tmp_path / "c", train=24, sft=24, eval=8, seed=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # every byte: rows and PNGs
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert [len(p.read_text().splitlines()) for p in a.values()] == [24, 24, 8]
    assert a["rl"].read_text() != c["rl"].read_text()
    assert b["eval"].read_text() == a["eval"].read_text()


def _cells(image: Image.Image) -> list[str | None]:
    """The colour of the shape in each 28-px cell (row-major), or None for an empty cell, read from the pixels."""
    pixels = np.asarray(image).astype(int)
    found: list[str | None] = []
    for cell in range(4):
        y, x = (cell // 2) * CELL, (cell % 2) * CELL
        block = pixels[y:y + CELL, x:x + CELL].reshape(-1, 3)
        inked = block[(block != 255).any(axis=1)]
        if len(inked) == 0:
            found.append(None)
            continue
        names = {min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - p).sum()) for p in inked}
        assert len(names) == 1, f"cell {cell} mixes colours {names}"
        found.append(names.pop())
    return found


def test_answers_are_what_the_image_shows() -> None:
    rng = random.Random(7)
    for _ in range(200):
        image, row = make_sample(rng)
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        cells = _cells(image)
        shapes = [c for c in cells if c is not None]
        assert 1 <= len(shapes) <= 4
        answer = int(row["solution"].rsplit("### The final answer is: ", 1)[1])
        problem = row["problem"]
        if problem.startswith("How many shapes"):
            assert answer == len(shapes)
        else:
            color = next(c for c in COLORS if f" {c} shapes" in problem)
            extra = int(problem.split()[1]) if problem.startswith("If ") else 0
            assert answer == sum(c == color for c in shapes) + extra
        assert json.dumps(row["key_steps"])  # JSON-serialisable, as written to the rows


def test_the_summary_says_what_changed() -> None:
    before = {"accuracy": 0.30, "validity": 0.50, "key_step_recall": 0.20}
    up = what_changed(before, {"accuracy": 0.45, "validity": 0.70, "key_step_recall": 0.30})
    assert len(up) == 2 and "accuracy +0.150" in up[0] and "not only its format" in up[1]
    flat = what_changed(before, {"accuracy": 0.25, "validity": 0.70, "key_step_recall": 0.30})
    assert "accuracy -0.050" in flat[0] and "did not rise" in flat[1]
