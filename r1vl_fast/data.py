"""Datasets: R1-VL-10K rows (RL) and Mulberry rows (SFT), validated up front, and a resumable sampler.

A dataset is a JSON / JSONL file (read here, so that errors name the line), or anything Hugging Face ``datasets``
reads: a parquet file or folder, a folder written by ``save_to_disk``, or a hub name ``org/name`` (``--dataset_split``
picks the split). Columns are found by name (:class:`Columns`: R1-VL's names first, then EasyR1's). An image is a
path (relative to ``--image_root`` or the data file), the ``{"bytes", "path"}`` dict of HF's Image feature, a PIL
image, or a list holding one; embedded images stay in the memory-mapped Arrow table until a batch needs them.

Every row is checked before training starts: fields present and typed, key steps well-formed, the image exists and
decodes, the prompt fits ``max_prompt_length`` without cutting image tokens. A bad row stops the run with its file,
line (or row) and reason, or, with ``skip_invalid``, is skipped and counted.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from r1vl_fast.errors import ConfigError, DataError, reports_user_errors
from r1vl_fast.processing import (
    MAX_PIXELS,
    MIN_PIXELS,
    EmbeddedImage,
    ImageRef,
    Processing,
    PromptInputs,
    open_image,
)
from r1vl_fast.rewards.format import ANSWER_MARKER

log = logging.getLogger("r1vl_fast")


class TooLongError(DataError):
    """A row over the run's length budget (prompts are never cut)."""


@dataclass
class Row:
    """One parsed record and where it came from; ``error`` says why a JSONL line could not be read (the row is then
    reported like any other invalid row, or skipped with ``skip_invalid``)."""

    data: Any
    file: Path
    line: int | None  # None: a row of a Hugging Face dataset
    index: int
    error: str | None = None
    source: DatasetRows | None = None  # the dataset an embedded image is read back from

    def where(self) -> str:
        if self.line is None:
            return f"{self.file}: row {self.index}"
        return f"{self.file}:{self.line}: sample {self.index}"


_BOM = b"\xef\xbb\xbf"


def _not_utf8(path: Path, data: bytes, error: UnicodeDecodeError, line: int | None = None) -> str:
    line = line if line is not None else data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column})"


JSON_SUFFIXES = (".json", ".jsonl")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_json_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in JSON_SUFFIXES


class DatasetRows:
    """The rows of a Hugging Face dataset, read lazily from its Arrow table (images left undecoded)."""

    def __init__(self, dataset: Any, name: str) -> None:
        self.dataset, self.name = dataset, name
        self.columns: list[str] = list(dataset.column_names)
        self._views: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i, example in enumerate(self.dataset):
            yield Row(example, Path(self.name), None, i, source=self)

    def view(self, column: str) -> Any:
        """The dataset with ``column`` alone: reading one row's image does not read the row's other columns."""
        if column not in self._views:
            self._views[column] = self.dataset.select_columns([column])
        return self._views[column]


def _undecoded(feature: Any) -> Any:
    """``feature`` with every HF Image in it left as ``{"bytes", "path"}`` (decoded here, once, when needed)."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    inner = getattr(feature, "feature", None)
    if inner is not None and isinstance(inner, datasets.Image):
        return type(feature)(datasets.Image(decode=False))
    return None


def open_hf_dataset(spec: str, split: str | None = None) -> DatasetRows:
    """A parquet file or folder, a ``save_to_disk`` folder, or a hub name, through ``datasets``; ``split`` picks
    the split (default: ``train``, or the only one)."""
    import datasets

    path = Path(spec)
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json",
                                                                "state.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file() and path.suffix.lower() == ".parquet":
            loaded = datasets.load_dataset("parquet", data_files={"train": str(path)})
        elif path.is_dir():
            if not any(path.rglob("*.parquet")):
                raise DataError(f"{spec}: a folder with no parquet files and no save_to_disk dataset")
            loaded = datasets.load_dataset(str(path))
        elif path.exists():
            raise DataError(f"{spec}: not a dataset: expected a JSON or JSONL file, a parquet file or folder, a "
                            f"folder written by save_to_disk, or a hub name org/name")
        elif _HUB_NAME.match(spec) and not spec.startswith((".", "/", "~")):
            loaded = datasets.load_dataset(spec)
        else:
            raise DataError(f"{spec}: no such dataset file")
    except DataError:
        raise
    except Exception as e:  # datasets raises many types: a hub it cannot reach, a corrupt file, ...
        raise DataError(f"{spec}: cannot load the dataset ({type(e).__name__}: {str(e).splitlines()[0][:300]})") \
            from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split if split is not None else ("train" if "train" in names else
                                                  names[0] if len(names) == 1 else None)
        if chosen not in loaded:
            raise DataError(f"{spec}: no split {chosen!r}; it has {', '.join(names)} (pass --dataset_split)")
        loaded = loaded[chosen]
    elif split is not None and getattr(loaded, "split", None) not in (None, split):
        raise DataError(f"{spec}: holds the split {loaded.split!r} only, not {split!r}")
    for column, feature in loaded.features.items():
        undecoded = _undecoded(feature)
        if undecoded is not None:
            loaded = loaded.cast_column(column, undecoded)
    return DatasetRows(loaded, spec)


def held_out_split(spec: str | Path) -> str | None:
    """The split a held-out dataset is scored on by default: test, else validation (None: a file's rows, or the
    train / only split)."""
    if is_json_file(spec) or not Path(spec).exists():
        return None
    return _default_split(str(spec), ("test", "validation"))


def _default_split(spec: str, prefer: tuple[str, ...]) -> str | None:
    import datasets

    try:
        names = list(datasets.load_from_disk(spec)) if (Path(spec) / "dataset_dict.json").is_file() else \
            list(datasets.get_dataset_split_names(spec))
    except Exception:  # a single split, or a layout datasets names no splits for: the default rule applies
        return None
    return next((name for name in prefer if name in names), None)


def read_rows(path: str | Path, *, keep_invalid: bool = False, split: str | None = None) -> list[Row] | DatasetRows:
    """The records of a dataset: a JSON array or JSONL file (read here: UTF-8, with or without a BOM, each record
    with its line number), or anything else :func:`open_hf_dataset` reads.

    A JSONL line that is not valid JSON or not UTF-8 raises a :class:`DataError` naming its line, or, with
    ``keep_invalid``, comes back as a row with ``error`` set, so that every bad line can be reported or skipped. A
    JSON array is one document: the first error in it ends the read."""
    if not is_json_file(path):
        return open_hf_dataset(str(path), split)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    raw = path.read_bytes()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    rows: list[Row] = []
    if raw.lstrip().startswith(b"["):  # a JSON array: walk its elements to know each one's line
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(_not_utf8(path, raw, e)) from None
        decoder = json.JSONDecoder()
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
    offset = 0
    for line_no, chunk in enumerate(raw.split(b"\n"), 1):
        start, offset = offset, offset + len(chunk) + 1
        if not chunk.strip():
            continue
        error = None
        try:
            value = json.loads(chunk.decode("utf-8"))
        except UnicodeDecodeError as e:
            e.start += start  # where in the file, for the column
            error = _not_utf8(path, raw, e, line_no).replace(f":{line_no}: ", f":{line_no}: sample {len(rows)}: ", 1)
        except json.JSONDecodeError as e:
            error = f"{path}:{line_no}: sample {len(rows)}: invalid JSON ({e.msg}, column {e.colno})"
        if error is not None:
            if not keep_invalid:
                raise DataError(error)
            value = None
        rows.append(Row(value, path, line_no, len(rows), error))
    return rows


@dataclass
class Sample:
    """A validated RL sample. ``image`` is where its image is (None for text-only rows)."""

    problem: str
    solution: str
    key_steps: dict[str, Any]
    image: ImageRef | None
    where: str
    prompt_tokens: int = 0
    image_size: tuple[int, int] | None = None  # (width, height) on disk
    image_tokens: int = 0


@dataclass
class SFTSample:
    prompt: str
    response: str
    image: ImageRef | None
    where: str
    tokens: int = 0  # prompt + response
    image_size: tuple[int, int] | None = None
    image_tokens: int = 0
    response_tokens: int = 0  # what the SFT loss averages over


@dataclass
class Report:
    """What validation skipped, by reason."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # every skipped row's message (file, line, reason)

    def skip(self, error: DataError, reason: str) -> None:
        """Count a skipped row under ``reason`` and keep its message."""
        self.skipped[reason] += 1
        self.errors.append(str(error))
        log.warning("skipped: %s", error)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept} rows"
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.kept} rows kept, {sum(self.skipped.values())} skipped ({reasons})"


@dataclass
class Columns:
    """Which column holds what (``--prompt_key``, ...). Unset: the first of the usual names that the row has,
    R1-VL's first, then EasyR1's."""

    prompt: str | None = None
    answer: str | None = None
    image: str | None = None
    solution: str | None = None
    key_steps: str | None = None

    DEFAULTS = {"prompt": ("problem", "prompt", "question"), "answer": ("answer",),
                "image": ("image_path", "images", "image"), "solution": ("solution",), "key_steps": ("key_steps",)}
    OPTIONS = {"prompt": "--prompt_key", "answer": "--answer_key", "image": "--image_key",
               "solution": "--solution_key", "key_steps": "--key_steps_key"}

    def key(self, role: str, row: Row) -> str:
        given = getattr(self, role)
        if given is not None:
            return given
        names = self.DEFAULTS[role]
        data = row.data if isinstance(row.data, dict) else {}
        return next((n for n in names if data.get(n) is not None), names[0])

    def check(self, rows: list[Row] | DatasetRows) -> None:
        """A column named by an option must exist: said with the columns that do (HF datasets know theirs)."""
        if not isinstance(rows, DatasetRows):
            return
        for role, option in self.OPTIONS.items():
            given = getattr(self, role)
            if given is not None and given not in rows.columns:
                raise DataError(f"{rows.name}: {option} {given!r}: no such column; it has {', '.join(rows.columns)}")


def _need(row: Row, name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    if row.error is not None:
        raise DataError(row.error)
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


def image_path(row: Row, field_name: str, rel: str, root: Path) -> Path:
    """A row's image file: ``rel`` under ``root`` unless absolute; a named error when it does not exist."""
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    if not path.is_file():
        raise DataError(f"{row.where()}: field {field_name!r}: image not found: {path}")
    return path


def image_ref(row: Row, field_name: str, value: Any, root: Path) -> ImageRef | None:
    """Where a row's image is, from its column's value: a path (relative to ``root`` unless absolute), HF's
    ``{"bytes", "path"}``, a PIL image, or a list holding at most one of these (None: no image)."""
    item = None
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            raise DataError(f"{row.where()}: field {field_name!r} holds {len(value)} images; a row takes at most one")
        if not value:
            return None
        value, item, field_name = value[0], 0, f"{field_name}[0]"
    if value is None:
        return None
    if isinstance(value, str):
        return image_path(row, field_name, value, root)
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        if row.source is not None:
            column = field_name.split("[")[0]
            return EmbeddedImage(row.source.view(column), row.index, column, item)
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(bytes(value["bytes"])))
        return image_path(row, field_name, value["path"], root)
    raise DataError(f"{row.where()}: field {field_name!r} must be an image path, an image's bytes "
                    f"({{'bytes': ..., 'path': ...}}) or a list holding one, got {type(value).__name__}")


def _image(row: Row, field_name: str, value: Any, root: Path,
           processing: Processing) -> tuple[ImageRef | None, tuple[int, int] | None, int | None]:
    """A row's image: where it is, its (width, height) as stored and the image tokens it becomes (all None for
    none); named errors when the model is text-only, or the image is missing, does not decode, or is one the model
    cannot take."""
    ref = image_ref(row, field_name, value, root)
    if ref is None:
        return None, None, None
    if not processing.multimodal:
        raise DataError(f"{row.where()}: field {field_name!r}: the model is text-only")
    name = ref if isinstance(ref, Path) else "the embedded image"
    raw = value[0] if isinstance(value, (list, tuple)) else value
    try:  # the bytes at hand, when the row holds them: an embedded image is not read twice
        with (Image.open(io.BytesIO(bytes(raw["bytes"]))) if isinstance(raw, dict) and raw.get("bytes") is not None
              else open_image(ref)) as im:
            im.load()
            size = im.size
    except Exception as e:  # PIL raises many types for a corrupt file
        raise DataError(f"{row.where()}: field {field_name!r}: image does not decode: {name} ({e})") from None
    try:
        return ref, size, processing.image_token_count(*size)
    except ValueError as e:
        raise DataError(f"{row.where()}: field {field_name!r}: {name}: {e}") from None


T = TypeVar("T")


def _load(path: str | Path, parse: Callable[[Row], T], *, skip_invalid: bool, allow_empty: bool,
          too_long: str, split: str | None = None, columns: Columns | None = None) -> tuple[list[T], Report]:
    """``parse`` every row of ``path``: a bad row stops the load with its error, or with ``skip_invalid`` is
    skipped and counted (as ``too_long`` when over the length budget, else as an invalid row)."""
    samples: list[T] = []
    report = Report()
    rows = read_rows(path, keep_invalid=True, split=split)
    (columns or Columns()).check(rows)
    for row in rows:
        try:
            samples.append(parse(row))
        except DataError as e:
            if not skip_invalid:
                raise
            report.skip(e, too_long if isinstance(e, TooLongError) else "invalid rows")
    report.kept = len(samples)
    if not samples and not allow_empty:
        raise DataError(f"{path}: no usable rows ({report.summary()})")
    return samples, report


def _root(path: str | Path, image_root: str | Path | None) -> Path:
    return Path(image_root) if image_root is not None else (Path(path) if Path(path).is_dir() else Path(path).parent)


def load_rl_dataset(
    path: str | Path, processing: Processing, *, image_root: str | Path | None = None, max_prompt_length: int,
    skip_invalid: bool = False, allow_empty: bool = False, split: str | None = None, columns: Columns | None = None,
) -> tuple[list[Sample], Report]:
    """R1-VL-10K rows (``image_path``, ``problem``, ``solution``, ``key_steps``), or any rows with a prompt, an
    answer (when there is no solution: the solution is then its final-answer line) and optionally an image and key
    steps (none: StepRAR has no key-step term for the row, and a warning names the rows), validated."""
    root = _root(path, image_root)
    columns = columns or Columns()

    def parse(row: Row) -> Sample:
        problem = _need(row, columns.key("prompt", row), str)
        solution_key = columns.key("solution", row)
        solution = _need(row, solution_key, str, optional=True)
        if solution is None:
            answer_key = columns.key("answer", row)
            answer = _need(row, answer_key, (str, int, float), optional=True)
            if answer is None:
                raise DataError(f"{row.where()}: field {solution_key!r} is missing, and there is no "
                                f"{answer_key!r} to take the final answer from")
            solution = f"{ANSWER_MARKER} {answer}"
        steps = _need(row, columns.key("key_steps", row), dict, optional=True)
        key_steps = _check_key_steps(row, steps) if steps is not None else {"Steps": []}
        image_key = columns.key("image", row)
        value = row.data.get(image_key) if isinstance(row.data, dict) else None
        image, size, tokens = _image(row, image_key, value, root, processing)
        length = len(processing.prompt_ids(problem, tokens, size))
        if length > max_prompt_length:
            raise TooLongError(f"{row.where()}: prompt is {length} tokens (image tokens included) > "
                               f"max_prompt_length {max_prompt_length}; prompts are never cut")
        return Sample(problem, solution, key_steps, image, row.where(), length, size, tokens or 0)

    return _load(path, parse, skip_invalid=skip_invalid, allow_empty=allow_empty, too_long="over-long prompts",
                 split=split, columns=columns)


def mulberry_turns(row: Row) -> tuple[str, str, str | None]:
    """A Mulberry row's user prompt (``<image>`` removed), assistant response and image path (None if none)."""
    prompt, response = _turns(row)
    images = _need(row, "images", list, optional=True) or []
    if len(images) > 1 or (images and not isinstance(images[0], str)):
        raise DataError(f"{row.where()}: field 'images' must hold at most one path")
    return prompt, response, images[0] if images else None


def _turns(row: Row) -> tuple[str, str]:
    messages = _need(row, "messages", list)
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"{row.where()}: field 'messages' must be [user, assistant] turns with str content, "
                        f"got roles {roles}")
    return messages[0]["content"].replace("<image>", ""), messages[1]["content"]


def load_sft_dataset(
    path: str | Path, processing: Processing, *, image_root: str | Path | None = None, max_length: int,
    skip_invalid: bool = False, allow_empty: bool = False, split: str | None = None, columns: Columns | None = None,
) -> tuple[list[SFTSample], Report]:
    """Mulberry rows: ``messages`` [user (``<image>`` + question), assistant (reasoning)] and ``images`` (a path,
    embedded bytes, or a list holding one); without ``messages``, the prompt and solution columns are the turns."""
    root = _root(path, image_root)
    columns = columns or Columns()

    def parse(row: Row) -> SFTSample:
        data = row.data if isinstance(row.data, dict) else {}
        if "messages" in data or columns.prompt is None and columns.key("prompt", row) not in data:
            prompt, response = _turns(row)
            image_key = columns.image or "images"
        else:
            prompt = _need(row, columns.key("prompt", row), str).replace("<image>", "")
            response = _need(row, columns.key("solution", row), str)
            image_key = columns.key("image", row)
        image, size, tokens = _image(row, image_key, data.get(image_key), root, processing)
        response_tokens = len(processing.encode_response(response))
        length = len(processing.prompt_ids(prompt, tokens, size)) + response_tokens
        if length > max_length:
            raise TooLongError(f"{row.where()}: sequence is {length} tokens > max_length {max_length}")
        return SFTSample(prompt, response, image, row.where(), length, size, tokens or 0, response_tokens)

    return _load(path, parse, skip_invalid=skip_invalid, allow_empty=allow_empty, too_long="over-long rows",
                 split=split, columns=columns)


def encode_prompt(processing: Processing, problem: str, image: ImageRef | None) -> PromptInputs:
    if image is None:
        return processing.encode_prompt(problem, None)
    with open_image(image) as im:
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
            raise ConfigError(f"--dataset: the checkpoint's dataset had {state['n']} usable rows, this one has "
                              f"{self.n}; resume with the checkpoint's dataset (and --skip_invalid, "
                              f"--max_prompt_length, pixel limits), or start a new run in another --output_dir")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._permutation()


# ---------------------------------------------------------------------------------------------------- check


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": int(a.max())}


def check_dataset(path: str | Path, processing: Processing, *, kind: str = "auto", image_root: str | Path | None = None,
                  max_length: int = 512, split: str | None = None, columns: Columns | None = None) -> dict[str, Any]:
    """Validate every row (never stopping at the first bad one) and describe the good ones: image sizes, the
    image-token counts they imply under the processing's pixel budget, and prompt (or sequence) lengths."""
    rows = read_rows(path, keep_invalid=True, split=split)
    if kind == "auto":
        first: Any = next((r.data for r in rows if r.error is None), {})
        kind = "sft" if isinstance(first, dict) and "messages" in first else "rl"
    samples: list[Any]
    if kind == "rl":
        samples, report = load_rl_dataset(path, processing, image_root=image_root, max_prompt_length=max_length,
                                          skip_invalid=True, allow_empty=True, split=split, columns=columns)
        lengths = [s.prompt_tokens for s in samples]
    else:
        samples, report = load_sft_dataset(path, processing, image_root=image_root, max_length=max_length,
                                           skip_invalid=True, allow_empty=True, split=split, columns=columns)
        lengths = [s.tokens for s in samples]
    sizes = [s.image_size for s in samples if s.image_size is not None]
    errors = report.errors + ([f"{path}: no usable rows: training on this file would stop"] if not samples else [])
    return {
        "file": str(path), "kind": kind, "rows": len(rows), "valid": len(samples),
        "skipped": dict(report.skipped), "errors": errors,
        "text_only_rows": sum(s.image is None for s in samples),
        "image_width": _spread([w for w, _ in sizes]), "image_height": _spread([h for _, h in sizes]),
        "image_tokens": _spread([s.image_tokens for s in samples if s.image_size is not None]),
        "prompt_tokens" if kind == "rl" else "sequence_tokens": _spread(lengths),
        "pixels": {"min_pixels": processing.min_pixels, "max_pixels": processing.max_pixels},
        "length_limit": max_length,
    }


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m r1vl_fast.data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="Validate a dataset file and print a report.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    check.add_argument("file", help="An R1-VL-10K (RL) or Mulberry (SFT) dataset: a JSON / JSONL file, a parquet "
                                    "file or folder, a save_to_disk folder, or a hub name org/name.")
    check.add_argument("--dataset_split", default=None, help="The split to check (default: train, or the only one).")
    for role, option in Columns.OPTIONS.items():
        check.add_argument(option, default=None, help=f"Column of the {role.replace('_', ' ')} (default: the first "
                                                      f"of {', '.join(Columns.DEFAULTS[role])} present).")
    check.add_argument("--kind", choices=("auto", "rl", "sft"), default="auto", help="Row format.")
    check.add_argument("--model_name_or_path", default=None,
                       help="Tokenizer (and image processor) to count tokens with (default: the demo's).")
    check.add_argument("--image_root", default=None, help="Directory image paths are relative to.")
    check.add_argument("--min_pixels", type=int, default=MIN_PIXELS, help="Smallest image area after resizing.")
    check.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="Largest image area after resizing.")
    check.add_argument("--max_length", type=int, default=512,
                       help="Prompt budget (RL rows) or sequence budget (SFT rows), in tokens.")
    check.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args(argv)
    logging.getLogger("r1vl_fast").setLevel(logging.ERROR)  # the report lists every error itself
    if args.model_name_or_path is None:
        from r1vl_fast.demo.models import demo_processing

        processing = demo_processing(args.min_pixels, args.max_pixels)
    else:
        processing = Processing.from_pretrained(args.model_name_or_path, min_pixels=args.min_pixels,
                                                max_pixels=args.max_pixels)
    columns = Columns(**{role: getattr(args, option[2:]) for role, option in Columns.OPTIONS.items()})
    report = check_dataset(args.file, processing, kind=args.kind, image_root=args.image_root,
                           max_length=args.max_length, split=args.dataset_split, columns=columns)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['file']} ({report['kind']} rows): {report['rows']} rows, {report['valid']} valid")
        for why, n in report["skipped"].items():
            print(f"  {n} {why}")
        for message in report["errors"]:
            print(f"  - {message}")
        print(f"  text-only rows: {report['text_only_rows']}")
        pixels = report["pixels"]
        for key in ("image_width", "image_height", "image_tokens", "prompt_tokens", "sequence_tokens"):
            if report.get(key):
                s = report[key]
                note = f" (at {pixels['min_pixels']}-{pixels['max_pixels']} pixels)" if key == "image_tokens" else ""
                print(f"  {key:16} min {s['min']}, median {s['median']:g}, p95 {s['p95']:g}, max {s['max']}{note}")
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
