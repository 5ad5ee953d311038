"""Key-step matching for StepRAR: the fraction k(c) of a sample's key-step groups found in a completion.

Front end of the C++ matcher (``r1vl_fast._keystep``): one call scores a whole batch with the GIL released.
Key steps are fixed per training sample, so they can be compiled once (:func:`compile_key_steps`) and reused
for the G completions of every epoch. ``reference.py`` holds the pure-Python twin the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

try:
    from r1vl_fast import _keystep  # type: ignore[attr-defined]  # the compiled module
except ImportError as e:  # a source checkout that was installed with `pip install .` shadows the installed copy
    raise ImportError(
        f"r1vl_fast's compiled key-step matcher (_keystep) is not in {Path(__file__).parents[1]}. From a source "
        f"checkout, install it in place with `pip install -e .`; after `pip install .`, run from outside the "
        f"checkout (its r1vl_fast/ folder shadows the installed package)."
    ) from e

MatchMode = Literal["r1vl", "normalized", "fuzzy"]
Scope = Literal["steps", "all"]

MODES: dict[str, int] = {"r1vl": 0, "normalized": 1, "fuzzy": 2}
SCOPES: dict[str, int] = {"steps": 0, "all": 1}
_MODE_NAMES = {v: k for k, v in MODES.items()}

# One sample's key steps: the R1-VL-10K dict {"Steps": [group, ...]} or a plain list of groups, where a group
# is a string or a list of equivalent alternative strings.
KeyStepsItem = dict[str, Any] | Sequence[str | Sequence[str]]


def _mode_id(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    return MODES[mode]


def _scope_id(scope: str) -> int:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {sorted(SCOPES)}, got {scope!r}")
    return SCOPES[scope]


def _check_min_alt_len(min_alt_len: int) -> int:
    if isinstance(min_alt_len, bool) or not isinstance(min_alt_len, (int, np.integer)) or min_alt_len < 0:
        raise ValueError(f"min_alt_len must be a non-negative int, got {min_alt_len!r}")
    return int(min_alt_len)


class CompiledKeySteps:
    """Key steps of many samples prepared for one matching mode; index it to select samples.

    ``compiled[i]`` and ``compiled[[i, i, j]]`` are views sharing the compiled key steps; a view whose length
    equals the batch is what :func:`match_key_steps` takes in place of raw key steps.
    """

    def __init__(self, core: Any, index: np.ndarray | None = None) -> None:
        self._core = core
        self._index = np.arange(len(core), dtype=np.int64) if index is None else index

    @property
    def mode(self) -> str:
        return _MODE_NAMES[self._core.mode]

    @property
    def min_alt_len(self) -> int:
        return int(self._core.min_alt_len)

    @property
    def num_groups(self) -> np.ndarray:
        """Number of key-step groups (the denominator n of k) of each selected sample."""
        return self._core.group_counts()[self._index]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, item: int | slice | Sequence[int] | np.ndarray) -> CompiledKeySteps:
        if isinstance(item, (int, np.integer)):
            selected = self._index[[int(item)]]
        else:
            selected = self._index[np.asarray(item) if not isinstance(item, slice) else item]
        return CompiledKeySteps(self._core, np.ascontiguousarray(selected, dtype=np.int64))

    def repeat(self, times: int) -> CompiledKeySteps:
        """Each selected sample ``times`` times in a row: the layout of G completions per prompt."""
        return CompiledKeySteps(self._core, np.repeat(self._index, times))

    def __repr__(self) -> str:
        return f"CompiledKeySteps(n={len(self)}, mode={self.mode!r}, min_alt_len={self.min_alt_len})"


def compile_key_steps(
    key_steps: Sequence[KeyStepsItem], *, mode: MatchMode = "r1vl", min_alt_len: int = 0, threads: int = 0
) -> CompiledKeySteps:
    """Prepare the key steps of many samples once (lower-casing or normalisation, q-gram filters).

    Raises ``ValueError`` naming the item (e.g. ``key_steps[3]['Steps'][2][0]``) when one is malformed.
    """
    if isinstance(key_steps, (str, bytes, dict)):
        kind = type(key_steps).__name__
        raise ValueError(f"key_steps must be a sequence with one item per sample, got a single {kind}")
    core = _keystep.CompiledKeySteps(list(key_steps), _mode_id(mode), _check_min_alt_len(min_alt_len), threads)
    return CompiledKeySteps(core)


def _match(
    texts: Sequence[str],
    key_steps: Sequence[KeyStepsItem] | CompiledKeySteps,
    mode: MatchMode | None,
    scope: Scope,
    fuzzy_threshold: float,
    min_alt_len: int | None,
    threads: int,
    return_groups: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of str, got a single str")
    texts = texts if isinstance(texts, list) else list(texts)
    threshold = float(fuzzy_threshold)
    if isinstance(key_steps, CompiledKeySteps):
        if mode is not None and mode != key_steps.mode:
            raise ValueError(f"key steps were compiled for mode {key_steps.mode!r}, not {mode!r}")
        if min_alt_len is not None and _check_min_alt_len(min_alt_len) != key_steps.min_alt_len:
            raise ValueError(f"key steps were compiled with min_alt_len={key_steps.min_alt_len}, not {min_alt_len}")
        return _keystep.match_compiled(
            texts, key_steps._core, key_steps._index, _scope_id(scope), threshold, threads, return_groups
        )
    if isinstance(key_steps, (str, bytes, dict)):
        kind = type(key_steps).__name__
        raise ValueError(f"key_steps must be a sequence with one item per text, got a single {kind}")
    return _keystep.match_raw(
        texts,
        key_steps if isinstance(key_steps, list) else list(key_steps),
        _mode_id(mode or "r1vl"),
        _scope_id(scope),
        threshold,
        _check_min_alt_len(0 if min_alt_len is None else min_alt_len),
        threads,
        return_groups,
    )


def match_key_step_counts(
    texts: Sequence[str],
    key_steps: Sequence[KeyStepsItem] | CompiledKeySteps,
    *,
    mode: MatchMode | None = None,
    scope: Scope = "steps",
    fuzzy_threshold: float = 90.0,
    min_alt_len: int | None = None,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(matched groups, total groups) per text as int32 arrays: k = matched / total, computed by the caller
    in float64 where bit-exactness with the released code matters."""
    matched, total, _ = _match(texts, key_steps, mode, scope, fuzzy_threshold, min_alt_len, threads, False)
    return matched, total


def match_key_steps(
    texts: Sequence[str],
    key_steps: Sequence[KeyStepsItem] | CompiledKeySteps,
    *,
    mode: MatchMode | None = None,
    scope: Scope = "steps",
    fuzzy_threshold: float = 90.0,
    min_alt_len: int | None = None,
    threads: int = 0,
) -> np.ndarray:
    """Fraction of key-step groups matched in each text, float32 of shape (B,) (0 where a sample has no groups).

    mode: ``"r1vl"`` (default for raw key steps) lower-cased substring search, as the released code, quirks
        included (an empty alternative matches everything); ``"normalized"`` the paper preset's soft matching
        (docs/REWARDS.md); ``"fuzzy"`` normalised, and an alternative also counts when RapidFuzz's
        ``partial_ratio`` of it against the text reaches ``fuzzy_threshold``. ``None`` takes the mode of
        compiled key steps.
    scope: ``"steps"`` searches only the ``### Step N:`` sections joined by a space (the released code);
        ``"all"`` the whole completion.
    min_alt_len: alternatives shorter than this (after lower-casing / normalisation) are ignored; in the
        normalised modes empty alternatives are always ignored.
    threads: worker threads (0 = one per core, fewer for small batches).
    """
    matched, total = match_key_step_counts(
        texts, key_steps, mode=mode, scope=scope, fuzzy_threshold=fuzzy_threshold, min_alt_len=min_alt_len,
        threads=threads,
    )
    fraction = np.zeros(len(matched), dtype=np.float64)
    np.divide(matched, total, out=fraction, where=total > 0)
    return fraction.astype(np.float32)


def match_key_step_groups(
    texts: Sequence[str],
    key_steps: Sequence[KeyStepsItem] | CompiledKeySteps,
    *,
    mode: MatchMode | None = None,
    scope: Scope = "steps",
    fuzzy_threshold: float = 90.0,
    min_alt_len: int | None = None,
    threads: int = 0,
) -> list[np.ndarray]:
    """Per text, a bool array with one entry per key-step group: was the group found? (diagnostics)"""
    _, total, flags = _match(texts, key_steps, mode, scope, fuzzy_threshold, min_alt_len, threads, True)
    assert flags is not None
    bounds = np.concatenate([[0], np.cumsum(total, dtype=np.int64)])
    as_bool = flags.astype(bool)
    return [as_bool[bounds[i] : bounds[i + 1]] for i in range(len(total))]


def normalize(text: str) -> str:
    """The paper preset's soft normalisation of one string (C++; ``reference.normalize`` is its twin)."""
    return _keystep.normalize(text)
