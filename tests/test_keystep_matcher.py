"""The C++ key-step matcher against its pure-Python twin (r1vl_fast.rewards.reference) and RapidFuzz."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from cot import random_completion, random_key_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz import fuzz

from r1vl_fast import _keystep
from r1vl_fast.rewards import (
    compile_key_steps,
    match_key_step_counts,
    match_key_step_groups,
    match_key_steps,
    normalize,
)
from r1vl_fast.rewards import reference as ref

MODES = ["r1vl", "normalized", "fuzzy"]
SCOPES = ["steps", "all"]

# Pieces that exercise every rule of extraction and normalisation.
TRICKY = [
    "### Step 1:", "### Step 12:", "### Step ١:", "### Step x:", "#### Step 2:", "\n###", "\n### Step 3:\n",
    "\n", " ", "\t", "\u2003", "\x85", "\u2028", ":", "$", "\\", "\\frac", "\\dfrac", "frac", "{", "}", "\\left(",
    "\\right)", "\\leftarrow", "\\times", "\\cdot", "\\div", "\\,", "\\!", "\\%", "\\circ", "^", "°", "−", "×", "÷",
    "·", "0", "1", "2", "5", "00", ".", ",", "1,000", "0.50", ".5", "5.0", "12/ 2 = 6", "=", "+", "-", "(", ")",
    "a", "B", "x", "ΑΣ", "Σ", "σ", "'", "İ", "ẞ", "K", "😀", "\u200f", "ש", "\x00", "\ud800",
]
tricky_text = st.lists(st.sampled_from(TRICKY), max_size=25).map("".join)
any_text = st.one_of(tricky_text, st.text(max_size=40))


# ---------------------------------------------------------------- building blocks


def test_lower_equals_str_lower_on_every_code_point():
    every = "".join(chr(c) for c in range(0x110000))
    assert _keystep.lower(every) == every.lower()
    spaced = " ".join(chr(c) for c in range(0x110000))
    assert _keystep.lower(spaced) == spaced.lower()


@pytest.mark.parametrize("text", ["İ", "ẞ", "Σ", "ΑΣ", "ΑΣ.", "ΑΣ'Α", "Α'Σ", ":Σ", "ΣΑ", "Α\u0345Σ", "ΟΔΟΣ ΟΔΟΣ", "ǅ"])
def test_lower_special_cases(text):
    assert _keystep.lower(text) == text.lower()


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(["Σ", "Α", "a", "'", ".", ":", "\u0345", "\u00ad", " ", "1", "İ", "ǅ", "\u02b0"]),
                max_size=12).map("".join))
def test_final_sigma_contexts(text):
    assert _keystep.lower(text) == text.lower()


@settings(max_examples=1500, deadline=None)
@given(any_text)
def test_step_extraction_matches_regex(text):
    assert _keystep.extract_steps(text) == ref.extract_steps(text)


@settings(max_examples=2000, deadline=None)
@given(any_text)
def test_normalize_matches_reference(text):
    assert normalize(text) == ref.normalize(text)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("12/ 2 = 6", "12/2 = 6"),
        ("frac{12}{2} = 6", "12/2=6"),
        ("$\\frac{12}{2} = 6$", "12 / 2 = 6"),
        ("\\dfrac{x+1}{2}", "(x + 1)/2"),
        ("\\tfrac{1}{2} is", "1/2 is"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("5.0", "5"),
        ("1,000,000", "1000000"),
        ("−3 × 4 ÷ 2", "-3*4/2"),
        ("3 \\times 4 \\cdot 2", "3*4*2"),
        ("a·b", "a*b"),
        ("\\left( x \\right)", "(x)"),
        ("1\\,000", "1000"),
        ("30^\\circ", "30°"),
        ("30^{\\circ}", "30°"),
        ("50\\%", "50%"),
        ("AREA", "area"),
    ],
)
def test_soft_normalisation_equivalences(a, b):
    assert normalize(a) == normalize(b)


@pytest.mark.parametrize(("a", "b"), [("1, 234", "1234"), ("\\leftarrow", "arrow"), ("x1", "x 1"), ("12", "1 2")])
def test_soft_normalisation_keeps_differences(a, b):
    assert normalize(a) != normalize(b)


# ---------------------------------------------------------------- partial_ratio


def _rand(rng: random.Random, alphabet: str, lo: int, hi: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


@pytest.mark.parametrize("alphabet", ["ab", "abcd ", "abcdefghijklmnopqrstuvwxyz0123456789 =+", "aΣ😀\x00"])
def test_partial_ratio_scores_equal_rapidfuzz(alphabet):
    rng = random.Random(hash(alphabet) & 0xFFFF)
    for _ in range(1500):
        a = _rand(rng, alphabet, 0, 20)
        b = _rand(rng, alphabet, 0, 60)
        if rng.random() < 0.3 and len(b) > 3:  # plant a near copy
            p = rng.randrange(len(b))
            b = b[:p] + a[: len(a) // 2] + rng.choice(alphabet) + a[len(a) // 2 + 1 :] + b[p:]
        assert _keystep.partial_ratio(a, b) == fuzz.partial_ratio(a, b), (a, b)
        assert _keystep.partial_ratio(b, a) == fuzz.partial_ratio(b, a), (b, a)


def test_partial_ratio_long_needles_equal_rapidfuzz():
    rng = random.Random(7)
    for _ in range(150):
        a = _rand(rng, "abcdefgh ", 60, 200)  # crosses the 64-bit word boundary
        b = _rand(rng, "abcdefgh ", len(a), 500)
        p = rng.randrange(len(b) - len(a) + 1)
        b = b[:p] + a[:40] + "x" + a[41:] + b[p + len(a) :]
        assert _keystep.partial_ratio(a, b) == fuzz.partial_ratio(a, b)


def test_partial_ratio_decisions_at_exact_boundaries():
    rng = random.Random(11)
    for _ in range(3000):
        a = _rand(rng, "abc ", 1, 12)
        b = _rand(rng, "abc ", 0, 30)
        score = fuzz.partial_ratio(a, b)
        for t in (score, np.nextafter(score, 101), np.nextafter(score, -1), 0.0, 90.0, 100.0, 100.5):
            assert _keystep.partial_ratio_reaches(a, b, float(t)) == (score >= t), (a, b, t)


def test_reference_partial_ratio_equals_rapidfuzz():
    rng = random.Random(3)
    for _ in range(400):
        a, b = _rand(rng, "abc ", 0, 8), _rand(rng, "abc ", 0, 16)
        assert ref.partial_ratio(a, b) == fuzz.partial_ratio(a, b)


# ---------------------------------------------------------------- whole matcher vs reference


def _corpus(seed: int, n: int) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    return [random_completion(rng) for _ in range(n)], [random_key_steps(rng) for _ in range(n)]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", ["r1vl", "normalized"])
@pytest.mark.parametrize("min_alt_len", [0, 1, 3])
def test_exact_modes_match_reference(mode, scope, min_alt_len):
    texts, key_steps = _corpus(1 + min_alt_len, 1500)
    got = match_key_step_groups(texts, key_steps, mode=mode, scope=scope, min_alt_len=min_alt_len)
    for text, item, flags in zip(texts, key_steps, got):
        assert flags.tolist() == ref.match_groups(text, item, mode=mode, scope=scope, min_alt_len=min_alt_len)


@pytest.mark.parametrize("threshold", [60.0, 85.0, 100.0])
def test_fuzzy_mode_matches_reference_and_rapidfuzz(threshold):
    texts, key_steps = _corpus(int(threshold), 250)
    got = match_key_step_groups(texts, key_steps, mode="fuzzy", fuzzy_threshold=threshold, min_alt_len=1)
    for text, item, flags in zip(texts, key_steps, got):
        assert flags.tolist() == ref.match_groups(text, item, mode="fuzzy", fuzzy_threshold=threshold, min_alt_len=1)
        body = ref.prepare_text(text, "fuzzy", "steps")
        decisions = [
            any(bool(a) and fuzz.partial_ratio(a, body) >= threshold for a in map(ref.normalize, group))
            for group in ref.groups_of(item)
        ]
        assert flags.tolist() == decisions


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(any_text, min_size=1, max_size=4),
    st.lists(st.lists(st.lists(st.sampled_from(TRICKY + ["", "step", "a b"]), min_size=1, max_size=3), max_size=4),
             min_size=1, max_size=4),
    st.sampled_from(MODES),
    st.sampled_from(SCOPES),
)
def test_adversarial_batches_match_reference(texts, groups, mode, scope):
    key_steps = [groups[i % len(groups)] for i in range(len(texts))]
    got = match_key_steps(texts, key_steps, mode=mode, scope=scope, fuzzy_threshold=80.0)
    want = ref.match_key_steps(texts, key_steps, mode=mode, scope=scope, fuzzy_threshold=80.0)
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float32))


# ---------------------------------------------------------------- SPEC.md edge cases


def test_r1vl_empty_alternative_matches_everything():
    ks = [{"Steps": [[""], "absent"]}]
    assert match_key_steps(["no steps at all"], ks, mode="r1vl").tolist() == [0.5]
    assert match_key_steps(["no steps at all"], ks, mode="normalized").tolist() == [0.0]
    assert match_key_steps(["no steps at all"], ks, mode="r1vl", min_alt_len=1).tolist() == [0.0]


def test_r1vl_has_no_normalisation_but_paper_does():
    text = "### Step 1: we get 12/ 2 = 6\n### The final answer is: 6"
    ks = [{"Steps": [["12/2 = 6", "frac{12}{2} = 6"]]}]
    assert match_key_steps([text], ks, mode="r1vl").tolist() == [0.0]
    assert match_key_steps([text], ks, mode="normalized").tolist() == [1.0]


def test_scope_steps_reads_only_step_sections():
    text = "### Image Description: a circle\n### Step 1: radius 2\n### The final answer is: circle"
    ks = [{"Steps": ["circle", "radius 2"]}]
    assert match_key_steps([text], ks, scope="steps").tolist() == [0.5]
    assert match_key_steps([text], ks, scope="all").tolist() == [1.0]


def test_step_sections_follow_the_released_regex():
    # "\s*" after a header swallows a newline, so an empty step absorbs the next header (released behaviour).
    text = "### Step 1:\n### Step 2: alpha\n### Step 3: beta"
    assert _keystep.extract_steps(text) == "### Step 2: alpha beta"


def test_string_group_is_one_alternative_and_only_steps_is_read():
    text = "### Step 1: the area is 6"
    ks = [{"Steps": ["area", ["perimeter", "AREA IS 6"]], "Answer": ["zzz"]}]
    assert match_key_steps([text], ks).tolist() == [1.0]
    assert match_key_steps([text], [["area", "zzz"]]).tolist() == [0.5]  # a plain list of groups


def test_no_groups_scores_zero():
    assert match_key_steps(["### Step 1: x"], [{"Steps": []}]).tolist() == [0.0]
    assert match_key_step_counts(["### Step 1: x"], [[]])[1].tolist() == [0]


def test_overlapping_alternatives_all_count():
    text = "### Step 1: abcd"
    assert match_key_steps([text], [["abc", "bcd", "cd", "d"]]).tolist() == [1.0]


def test_unicode_lowercasing_in_matching():
    text = "### Step 1: İSTANBUL ΟΔΟΣ STRAẞE"
    ks = [["i̇stanbul", "οδος", "straße"]]
    assert match_key_steps([text], ks).tolist() == [1.0]
    assert match_key_steps([text], [["istanbul"]]).tolist() == [0.0]  # 'İ'.lower() is 'i' + U+0307


# ---------------------------------------------------------------- the exact search's paths
# Small sets go through the q-gram filter (AVX2 or portable scan), one-character or large sets and texts that
# exhaust the filter's verification budget through Aho-Corasick. Every path must give the reference's answer.


@pytest.fixture(params=[True, False], ids=["simd", "portable"])
def simd(request):
    if request.param and not _keystep._simd_available():
        pytest.skip("this CPU has no AVX2: only the portable scan exists here")
    previous = _keystep._set_simd(request.param)
    yield request.param
    _keystep._set_simd(previous)


@pytest.mark.parametrize("mode", ["r1vl", "normalized"])
def test_exact_search_paths_match_reference(simd, mode):
    texts, key_steps = _corpus(11, 300)
    want = np.array(ref.match_key_steps(texts, key_steps, mode=mode), dtype=np.float32)
    np.testing.assert_array_equal(match_key_steps(texts, key_steps, mode=mode), want)


@pytest.mark.parametrize("extra", ["", "Σ"], ids=["latin1", "ucs2"])
def test_match_found_at_every_offset_and_length(simd, extra):
    rng = random.Random(3)
    for n in range(1, 41):
        body = "".join(rng.choices("xyz ", k=n))
        for length in (2, 3, 4, 5, 9, 17):
            for at in range(0, n - length + 1):
                pattern = "ab" * 9
                pattern = pattern[:length]
                text = "### Step 1: " + extra + body[:at] + pattern + body[at + length:]
                groups = [[pattern], ["q" * length]]
                assert match_key_step_groups([text], [groups])[0].tolist() == [True, False], (n, length, at)


def test_verification_budget_falls_back_to_automaton(simd):
    # Every position of the run of 'a's passes the filter and verifies ~40 characters: past the budget the
    # text is rescanned by Aho-Corasick.
    text = "### Step 1: " + "a" * 5000 + "b"
    groups = [["a" * 40 + "b"], ["a" * 40 + "c"], ["aab"]]
    assert match_key_step_groups([text], [groups])[0].tolist() == [True, False, True]
    assert ref.match_groups(text, groups) == [True, False, True]


def test_non_latin1_pattern_never_matches_a_colliding_latin1_text(simd):
    # The filter folds characters to 8 bits: 'š' (U+0161) folds to '`' (0x60), so "šabc" and "`abc" share a key.
    assert match_key_step_groups(["### Step 1: x `abc y"], [[["šabc"]]])[0].tolist() == [False]
    assert match_key_step_groups(["### Step 1: x šabc y"], [[["šabc"]]])[0].tolist() == [True]
    assert match_key_step_groups(["### Step 1: x Šabc y"], [[["šabc"]]])[0].tolist() == [True]


@pytest.mark.parametrize("n_groups", [1, 20, 60, 300])
@pytest.mark.parametrize("shortest", [1, 2, 3, 8])
def test_pattern_set_sizes_and_lengths(simd, n_groups, shortest):
    rng = random.Random(n_groups * 10 + shortest)
    groups = [["".join(rng.choices("abc", k=rng.randint(shortest, shortest + 3))) for _ in range(2)]
              for _ in range(n_groups)]
    texts = ["### Step 1: " + "".join(rng.choices("abc d", k=rng.randint(0, 300))) for _ in range(30)]
    got = match_key_step_groups(texts, [groups] * len(texts))
    for text, flags in zip(texts, got):
        assert flags.tolist() == ref.match_groups(text, groups)


# ---------------------------------------------------------------- compiled key steps


@pytest.mark.parametrize("mode", MODES)
def test_compiled_equals_raw(mode):
    texts, key_steps = _corpus(5, 400)
    compiled = compile_key_steps(key_steps, mode=mode)
    np.testing.assert_array_equal(match_key_steps(texts, compiled), match_key_steps(texts, key_steps, mode=mode))


def test_compiled_views_select_and_repeat():
    rng = random.Random(9)
    key_steps = [random_key_steps(rng) for _ in range(20)]
    compiled = compile_key_steps(key_steps, mode="normalized", min_alt_len=1)
    picks = [3, 3, 3, 3, 17, 17, 17, 17]
    texts = [random_completion(rng) for _ in picks]
    want = match_key_steps(texts, [key_steps[i] for i in picks], mode="normalized", min_alt_len=1)
    np.testing.assert_array_equal(match_key_steps(texts, compiled[picks]), want)
    np.testing.assert_array_equal(match_key_steps(texts, compiled[[3, 17]].repeat(4)), want)
    assert compiled[5].num_groups.tolist() == [len(key_steps[5]["Steps"])]
    with pytest.raises(ValueError, match="compiled for mode 'normalized'"):
        match_key_steps(texts, compiled[picks], mode="r1vl")
    with pytest.raises(ValueError, match="min_alt_len=1"):
        match_key_steps(texts, compiled[picks], min_alt_len=0)
    with pytest.raises(ValueError, match="8 texts but 2"):
        match_key_steps(texts, compiled[[3, 17]])


def test_shared_key_step_objects_give_the_same_result_as_copies():
    rng = random.Random(4)
    item = random_key_steps(rng)
    texts = [random_completion(rng) for _ in range(16)]
    shared = match_key_steps(texts, [item] * 16, mode="normalized")
    copies = match_key_steps(texts, [{"Steps": list(item["Steps"])} for _ in range(16)], mode="normalized")
    np.testing.assert_array_equal(shared, copies)


# ---------------------------------------------------------------- errors, threads, hostile input


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"steps": []}, r"key_steps\[1\]: dict has no 'Steps' key"),
        ({"Steps": "abc"}, r"key_steps\[1\]\['Steps'\]: expected a list"),
        ({"Steps": [["a", 3]]}, r"key_steps\[1\]\['Steps'\]\[0\]\[1\]: alternative must be str, got int"),
        ({"Steps": [None]}, r"key_steps\[1\]\['Steps'\]\[0\]: group must be str or list of str, got NoneType"),
        (None, r"key_steps\[1\]: expected a list of key-step groups"),
        ([b"bytes"], r"key_steps\[1\]\[0\]: group must be str"),
    ],
)
def test_malformed_key_steps_name_the_item(item, message):
    with pytest.raises(ValueError, match=message):
        match_key_steps(["a", "b"], [["ok"], item])
    with pytest.raises(ValueError, match=message):
        compile_key_steps([["ok"], item])


def test_bad_texts_and_arguments():
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got int"):
        match_key_steps(["a", 5], [[], []])
    with pytest.raises(ValueError, match="2 texts but 1"):
        match_key_steps(["a", "b"], [[]])
    with pytest.raises(ValueError, match="mode must be one of"):
        match_key_steps(["a"], [[]], mode="exact")
    with pytest.raises(ValueError, match="scope must be one of"):
        match_key_steps(["a"], [[]], scope="everything")
    with pytest.raises(ValueError, match="min_alt_len"):
        match_key_steps(["a"], [[]], min_alt_len=-1)


def test_concurrent_calls_from_python_threads():
    texts, key_steps = _corpus(21, 300)
    compiled = compile_key_steps(key_steps, mode="fuzzy")
    want_c = match_key_steps(texts, compiled, threads=1)
    want_r = match_key_steps(texts, key_steps, mode="normalized", threads=1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(5):
                np.testing.assert_array_equal(match_key_steps(texts, compiled, threads=2), want_c)
                np.testing.assert_array_equal(match_key_steps(texts, key_steps, mode="normalized", threads=i % 3),
                                              want_r)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors


def test_thread_counts_agree():
    texts, key_steps = _corpus(33, 500)
    for mode in MODES:
        one = match_key_steps(texts, key_steps, mode=mode, threads=1)
        for threads in (0, 2, 7):
            np.testing.assert_array_equal(match_key_steps(texts, key_steps, mode=mode, threads=threads), one)


def test_huge_and_strange_texts():
    big = "### Step 1: " + "area 12/2 = 6 " * 80_000  # ~1 MB
    texts = [big, "", "\x00" * 100, "### Step 1: \ud800\udfff 😀 שלום", "### Step 1:" + "#" * 3_000]
    ks = [[["area"], ["12/2 = 6"], ["😀"], ["\ud800"]]] * len(texts)
    for mode in MODES:
        got = match_key_steps(texts, ks, mode=mode)
        assert got[0] == 0.5
        want = ref.match_key_steps(texts[1:], ks[1:], mode=mode)
        np.testing.assert_array_equal(got[1:], np.array(want, dtype=np.float32))


def test_large_automaton_falls_back_to_sparse_transitions():
    rng = random.Random(2)
    alphabet = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]  # 3000 classes x many states > dense limit
    groups = [["".join(rng.choices(alphabet, k=30))] for _ in range(300)]  # > 256 patterns: no q-gram filter
    text = "### Step 1: " + groups[7][0] + " " + "".join(rng.choices(alphabet, k=500)) + groups[150][0][:29]
    got = match_key_step_groups([text], [groups])[0]
    assert got.tolist() == ref.match_groups(text, groups)
    assert got[7] and not got[150]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.sampled_from(["Steps", "steps", 1]), inner, max_size=2),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_json, min_size=1, max_size=3), st.sampled_from(MODES))
def test_binding_survives_hostile_key_steps(items, mode):
    texts = ["### Step 1: x"] * len(items)
    try:
        got = match_key_steps(texts, items, mode=mode)
    except (ValueError, TypeError):
        return
    assert got.shape == (len(items),) and np.all((got >= 0) & (got <= 1))
