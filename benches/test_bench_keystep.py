"""Key-step matching on a realistic StepRAR batch (1,024 completions of ~3 KB, 12 groups × 3 alternatives).

Exact mode: the released code's Python loop (baseline) vs pyahocorasick vs r1vl_fast (raw lists and compiled
key steps, 1 and 2 threads). Fuzzy mode: a RapidFuzz partial_ratio loop making the same decisions (baseline) vs
r1vl_fast. Every implementation's result is checked against the baseline's before it is timed.

Run: pytest benches/ --benchmark-only
"""

from __future__ import annotations

import re

import ahocorasick
import numpy as np
import pytest
from keystep_data import distinct_copies, make_batch
from rapidfuzz import fuzz

from r1vl_fast.rewards import compile_key_steps, match_key_steps, normalize

STEP = re.compile(r"### Step \d+:\s*(.*?)(?=\n###|\Z)", re.DOTALL)
THRESHOLD = 90.0
ROUNDS = 5


@pytest.fixture(scope="module")
def batch():
    texts, key_steps = make_batch()
    return texts, key_steps, distinct_copies(key_steps)


def released_loop(texts, key_steps):
    out = []
    for text, item in zip(texts, key_steps):
        steps = " ".join(STEP.findall(text)).lower()
        groups = item.get("Steps", [])
        hits = sum(1 for g in groups if any(a.lower() in steps for a in ([g] if isinstance(g, str) else g)))
        out.append(hits / len(groups) if groups else 0.0)
    return np.array(out, dtype=np.float32)


def build_automaton(item):
    automaton = ahocorasick.Automaton()
    for g, group in enumerate(item["Steps"]):
        for alt in [group] if isinstance(group, str) else group:
            key = alt.lower()
            groups = automaton.get(key, set()) if automaton.exists(key) else set()
            automaton.add_word(key, groups | {g})
    automaton.make_automaton()
    return automaton


def pyahocorasick_loop(texts, key_steps, automata=None):
    out = []
    for i, (text, item) in enumerate(zip(texts, key_steps)):
        automaton = automata[i] if automata is not None else build_automaton(item)
        found = set()
        for _, groups in automaton.iter(" ".join(STEP.findall(text)).lower()):
            found |= groups
        out.append(len(found) / len(item["Steps"]) if item["Steps"] else 0.0)
    return np.array(out, dtype=np.float32)


def rapidfuzz_loop(texts, prepared_groups):
    """Same decisions as fuzzy mode: normalised text; a group counts if an alternative is a substring or its
    partial_ratio reaches the threshold."""
    out = []
    for text, groups in zip(texts, prepared_groups):
        body = normalize(" ".join(STEP.findall(text)))
        hits = 0
        for alts in groups:
            if any(a in body or fuzz.partial_ratio(a, body, score_cutoff=THRESHOLD) >= THRESHOLD for a in alts):
                hits += 1
        out.append(hits / len(groups) if groups else 0.0)
    return np.array(out, dtype=np.float32)


def _run(benchmark, fn, *args, baseline=False, rounds=ROUNDS):
    benchmark.extra_info["baseline"] = baseline
    return benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=1)


# ------------------------------------------------------------------ exact mode


@pytest.mark.benchmark(group="exact")
def test_released_python_loop(benchmark, batch):
    texts, key_steps, _ = batch
    _run(benchmark, released_loop, texts, key_steps, baseline=True)


@pytest.mark.benchmark(group="exact")
def test_pyahocorasick_built_per_call(benchmark, batch):
    texts, key_steps, _ = batch
    np.testing.assert_array_equal(pyahocorasick_loop(texts, key_steps), released_loop(texts, key_steps))
    _run(benchmark, pyahocorasick_loop, texts, key_steps)


@pytest.mark.benchmark(group="exact")
def test_pyahocorasick_prebuilt(benchmark, batch):
    texts, key_steps, _ = batch
    automata = [build_automaton(item) for item in key_steps]
    np.testing.assert_array_equal(pyahocorasick_loop(texts, key_steps, automata), released_loop(texts, key_steps))
    _run(benchmark, pyahocorasick_loop, texts, key_steps, automata)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="exact")
def test_r1vl_fast_raw_shared_per_prompt(benchmark, batch, threads):
    """Raw Python lists, the G = 4 completions of a prompt sharing one key_steps object (conversion included)."""
    texts, key_steps, _ = batch
    np.testing.assert_array_equal(match_key_steps(texts, key_steps), released_loop(texts, key_steps))
    _run(benchmark, lambda: match_key_steps(texts, key_steps, threads=threads))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="exact")
def test_r1vl_fast_raw_distinct(benchmark, batch, threads):
    """Raw Python lists, every completion with its own key_steps object (conversion included)."""
    texts, _, distinct = batch
    np.testing.assert_array_equal(match_key_steps(texts, distinct), released_loop(texts, distinct))
    _run(benchmark, lambda: match_key_steps(texts, distinct, threads=threads))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="exact")
def test_r1vl_fast_compiled(benchmark, batch, threads):
    texts, key_steps, _ = batch
    compiled = compile_key_steps(key_steps[::4]).repeat(4)  # one compiled entry per prompt, G = 4
    np.testing.assert_array_equal(match_key_steps(texts, compiled), released_loop(texts, key_steps))
    _run(benchmark, lambda: match_key_steps(texts, compiled, threads=threads))


# ------------------------------------------------------------------ fuzzy mode


@pytest.fixture(scope="module")
def fuzzy_batch(batch):
    texts, key_steps, _ = batch
    texts, key_steps = texts[:256], key_steps[:256]  # the RapidFuzz loop is slow; a quarter batch suffices
    prepared = [[[a for a in map(normalize, g if isinstance(g, list) else [g]) if a] for g in item["Steps"]]
                for item in key_steps]
    return texts, key_steps, prepared


@pytest.mark.benchmark(group="fuzzy")
def test_rapidfuzz_partial_ratio_loop(benchmark, fuzzy_batch):
    texts, _, prepared = fuzzy_batch
    _run(benchmark, rapidfuzz_loop, texts, prepared, baseline=True, rounds=2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="fuzzy")
def test_r1vl_fast_fuzzy_compiled(benchmark, fuzzy_batch, threads):
    texts, key_steps, prepared = fuzzy_batch
    compiled = compile_key_steps(key_steps, mode="fuzzy", min_alt_len=1)
    want = rapidfuzz_loop(texts, prepared)
    np.testing.assert_array_equal(match_key_steps(texts, compiled, fuzzy_threshold=THRESHOLD), want)
    _run(benchmark, lambda: match_key_steps(texts, compiled, fuzzy_threshold=THRESHOLD, threads=threads))


# ------------------------------------------------------------------ normalised mode (no baseline exists)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="exact")
def test_r1vl_fast_normalized_compiled(benchmark, batch, threads):
    texts, key_steps, _ = batch
    compiled = compile_key_steps(key_steps[::4], mode="normalized", min_alt_len=1).repeat(4)
    _run(benchmark, lambda: match_key_steps(texts, compiled, threads=threads))
