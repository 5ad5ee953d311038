"""Datasets: R1-VL-10K rows (RL) and Mulberry rows (SFT), validated up front, and a resumable sampler.

Every row is checked before training starts: fields present and typed, key steps well-formed, the image exists and
decodes, the prompt fits ``max_prompt_length`` without cutting image tokens. A bad row stops the run with its file,
line and reason, or, with ``skip_invalid``, is skipped and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from r1vl_fast.processing import Processing, PromptInputs

log = logging.getLogger("r1vl_fast")


class DataError(ValueError):
    """A dataset row that cannot be used; the message names the file, line, sample index and field."""


@dataclass
class Row:
    """One parsed record and where it came from."""

    data: Any
    file: Path
    line: int
    index: int

    def where(self) -> str:
        return f"{self.file}:{self.line}: sample {self.index}"


def read_rows(path: str | Path) -> list[Row]:
    """Records of a JSON array or JSONL file, each with its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    rows: list[Row] = []
    decoder = json.JSONDecoder()
    if stripped.startswith("["):  # a JSON array: walk its elements to know each one's line
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: unterminated JSON array")
            if text[pos] == "]":
                break
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: sample {len(rows)}: invalid JSON ({e.msg})") from None
            rows.append(Row(value, path, line, len(rows)))
        return rows
    for line_no, record in enumerate(text.splitlines(), 1):
        if not record.strip():
            continue
        try:
            value = json.loads(record)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: sample {len(rows)}: invalid JSON ({e.msg})") from None
        rows.append(Row(value, path, line_no, len(rows)))
    return rows


@dataclass
class Sample:
    """A validated RL sample. ``image`` is the resolved path (None for text-only rows)."""

    problem: str
    solution: str
    key_steps: dict[str, Any]
    image: Path | None
    where: str
    prompt_tokens: int = 0


@dataclass
class SFTSample:
    prompt: str
    response: str
    image: Path | None
    where: str


@dataclass
class Report:
    """What validation skipped, by reason."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept} rows"
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.kept} rows kept, {sum(self.skipped.values())} skipped ({reasons})"


def _need(row: Row, name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    if not isinstance(row.data, dict):
        raise DataError(f"{row.where()}: expected a JSON object, got {type(row.data).__name__}")
    if name not in row.data or row.data[name] is None:
        if optional:
            return None
        raise DataError(f"{row.where()}: field {name!r} is missing")
    value = row.data[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{row.where()}: field {name!r} must be {want}, got {type(value).__name__}")
    return value


def _check_key_steps(row: Row, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or "Steps" not in value:
        raise DataError(f"{row.where()}: field 'key_steps' must be an object with a 'Steps' list")
    steps = value["Steps"]
    if not isinstance(steps, list):
        raise DataError(f"{row.where()}: field 'key_steps.Steps' must be a list, got {type(steps).__name__}")
    for g, group in enumerate(steps):
        alts = [group] if isinstance(group, str) else group
        if not isinstance(alts, list) or not alts:
            raise DataError(f"{row.where()}: field 'key_steps.Steps[{g}]' must be a string or a non-empty list "
                            f"of strings")
        for a, alt in enumerate(alts):
            if not isinstance(alt, str):
                raise DataError(f"{row.where()}: field 'key_steps.Steps[{g}][{a}]' must be str, "
                                f"got {type(alt).__name__}")
    return value


def _image_size(row: Row, field_name: str, rel: str, root: Path) -> tuple[Path, tuple[int, int]]:
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    if not path.is_file():
        raise DataError(f"{row.where()}: field {field_name!r}: image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return path, im.size
    except Exception as e:  # PIL raises many types for a corrupt file
        raise DataError(f"{row.where()}: field {field_name!r}: image does not decode: {path} ({e})") from None


def load_rl_dataset(
    path: str | Path, processing: Processing, *, image_root: str | Path | None = None, max_prompt_length: int,
    skip_invalid: bool = False,
) -> tuple[list[Sample], Report]:
    """R1-VL-10K rows (``image_path``, ``problem``, ``solution``, ``key_steps``), validated."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    samples: list[Sample] = []
    report = Report()
    for row in read_rows(path):
        try:
            problem = _need(row, "problem", str)
            solution = _need(row, "solution", str)
            key_steps = _check_key_steps(row, _need(row, "key_steps", dict))
            rel = _need(row, "image_path", str, optional=True)
            image, tokens = None, None
            if rel is not None:
                if not processing.multimodal:
                    raise DataError(f"{row.where()}: field 'image_path': the model is text-only")
                image, size = _image_size(row, "image_path", rel, root)
                tokens = processing.image_token_count(*size)
            length = len(processing.prompt_ids(problem, tokens))
            if length > max_prompt_length:
                raise DataError(f"{row.where()}: prompt is {length} tokens (image tokens included) > "
                                f"max_prompt_length {max_prompt_length}; prompts are never cut")
        except DataError as e:
            if not skip_invalid:
                raise
            reason = "over-long prompts" if "max_prompt_length" in str(e) else "invalid rows"
            report.skipped[reason] += 1
            log.warning("skipped: %s", e)
            continue
        samples.append(Sample(problem, solution, key_steps, image, row.where(), length))
    report.kept = len(samples)
    if not samples:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return samples, report


def load_sft_dataset(
    path: str | Path, processing: Processing, *, image_root: str | Path | None = None, max_length: int,
    skip_invalid: bool = False,
) -> tuple[list[SFTSample], Report]:
    """Mulberry rows: ``messages`` [user (``<image>`` + question), assistant (reasoning)] and ``images`` [path]."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    samples: list[SFTSample] = []
    report = Report()
    for row in read_rows(path):
        try:
            messages = _need(row, "messages", list)
            roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
            if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in messages):
                raise DataError(f"{row.where()}: field 'messages' must be [user, assistant] turns with str content, "
                                f"got roles {roles}")
            prompt, response = messages[0]["content"], messages[1]["content"]
            images = _need(row, "images", list, optional=True) or []
            image, tokens = None, None
            if len(images) > 1 or (images and not isinstance(images[0], str)):
                raise DataError(f"{row.where()}: field 'images' must hold at most one path")
            if images:
                if not processing.multimodal:
                    raise DataError(f"{row.where()}: field 'images': the model is text-only")
                image, size = _image_size(row, "images[0]", images[0], root)
                tokens = processing.image_token_count(*size)
            prompt = prompt.replace("<image>", "")
            length = len(processing.prompt_ids(prompt, tokens)) + len(processing.encode_response(response))
            if length > max_length:
                raise DataError(f"{row.where()}: sequence is {length} tokens > max_length {max_length}")
        except DataError as e:
            if not skip_invalid:
                raise
            report.skipped["over-long rows" if "max_length" in str(e) else "invalid rows"] += 1
            log.warning("skipped: %s", e)
            continue
        samples.append(SFTSample(prompt, response, image, row.where()))
    report.kept = len(samples)
    if not samples:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return samples, report


def encode_prompt(processing: Processing, problem: str, image: Path | None) -> PromptInputs:
    if image is None:
        return processing.encode_prompt(problem, None)
    with Image.open(image) as im:
        return processing.encode_prompt(problem, im)


class EpochSampler:
    """Shuffled passes over ``n`` items, one seeded permutation per epoch; its state is two integers."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(int(self._order[self.position]))
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"the checkpoint's dataset had {state['n']} usable rows, this one has {self.n}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation()
