"""StepRAR and StepRVR: preset r1vl against the released code's semantics, preset paper against SPEC.md."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import released_oracle
from cot import GOOD, KEY_STEPS, SOLUTION, random_completion, random_key_steps

from r1vl_fast.rewards import MathVerifier, compile_key_steps, score_step_rar, step_rar, step_rvr

ALPHA = 0.1


def _solution(answer: str) -> str:
    return f"### Step 1:\nwork\n### The final answer is: {answer}"


# ---------------------------------------------------------------- preset r1vl == released code


def test_r1vl_step_rar_equals_released_code(verifier):
    rng = random.Random(0)
    completions, solutions, key_steps = [], [], []
    for _ in range(240):
        completions.append(random_completion(rng))
        solutions.append(_solution(rng.choice(["6", "5", "0.5", "\\frac{1}{2}", "A"])) if rng.random() < 0.9
                         else rng.choice(["6", " 5 "]))
        key_steps.append(random_key_steps(rng))
    got = step_rar(completions, solutions, key_steps, preset="r1vl", verifier=verifier)
    want = [released_oracle.accuracy(c, s, k) for c, s, k in zip(completions, solutions, key_steps)]
    np.testing.assert_array_equal(got, np.array(want, dtype=np.float32))


def test_r1vl_step_rvr_equals_released_code():
    rng = random.Random(1)
    completions = [random_completion(rng) for _ in range(5000)] + [
        GOOD,
        GOOD.replace("### Step 2:", "### Step 3:"),
        GOOD + "\n### Step 3: after the answer",
        "### The final answer is: 5\n" + GOOD,
        GOOD.replace("### Image Description:", "### Rationales:\nx\n### Image Description:", 1),
        "### Image Description:### Rationales:### Step 1:### The final answer is:",
        "### Image Description: ### Rationales: ### Step 1: x ### Step 02: y ### The final answer is: 3",
        "### Image Description: ### Rationales: ### Step 1: x ### Step ٢: y ### The final answer is: 3",
    ]
    got = step_rvr(completions, preset="r1vl")
    want = np.array([released_oracle.validity(c) for c in completions], dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    assert 0 < got.mean() < 1


def test_r1vl_quirks(verifier):
    # a correct whole-completion parse without any final-answer marker still earns 1 + 0.1·k
    scores = score_step_rar(["The result is 6."], [_solution("6")], [[["6"]]], preset="r1vl", verifier=verifier)
    assert scores.correct.tolist() == [True] and scores.has_answer.tolist() == [False]
    # without an answer, the released code still pays α·k (steps only; no final answer)
    text = "### Step 1: the area is 12"
    got = step_rar([text], [_solution("7")], [[["area"], ["zzz"]]], preset="r1vl", verifier=verifier)
    assert got.tolist() == [np.float32(0.5 * ALPHA)]
    # the empty alternative matches anything
    got = step_rar(["nothing"], [_solution("7")], [[[""]]], preset="r1vl", verifier=verifier)
    assert got.tolist() == [np.float32(ALPHA)]


# ---------------------------------------------------------------- preset paper (SPEC.md)


def test_paper_step_rar_cases(verifier):
    wrong = GOOD.replace("answer is: 5", "answer is: 7")
    no_answer = GOOD.split("### The final answer is:")[0]
    empty_answer = no_answer + "### The final answer is:   "
    latex = GOOD.replace("answer is: 5", "answer is: $\\frac{10}{2}$")
    scores = score_step_rar(
        [GOOD, wrong, no_answer, empty_answer, latex],
        [SOLUTION] * 5,
        [KEY_STEPS] * 5,
        preset="paper",
        verifier=verifier,
    )
    k = scores.key_steps
    assert k[0] == pytest.approx(1.0)  # "3^2 + 4^2 = 25", "hypotenuse", "= 5" all present
    assert scores.correct.tolist() == [True, False, False, False, True]
    assert scores.has_answer.tolist() == [True, True, False, False, True]
    expected = [1 + ALPHA * k[0], ALPHA * k[1], 0.0, 0.0, 1 + ALPHA * k[4]]
    np.testing.assert_allclose(scores.reward, np.array(expected, dtype=np.float32))


def test_paper_judges_the_answer_line_gold_first(verifier):
    # the released preset parses the whole completion (math-verify takes the last number it finds); the
    # paper preset reads only the final-answer line
    text = "### Step 1: 5 is wrong, so\n### The final answer is: 7\nCheck: 5"
    paper = score_step_rar([text], [_solution("7")], None, preset="paper", verifier=verifier)
    assert paper.correct.tolist() == [True]
    letters = score_step_rar([GOOD.replace("is: 5", "is: (B).")], [_solution("(B)")], None, verifier=verifier)
    assert letters.correct.tolist() == [True]


def test_paper_soft_matching_and_min_length(verifier):
    text = "### Step 1: we get 12/ 2 = 6\n### The final answer is: 6"
    ks = [{"Steps": [["12/2 = 6"], [""]]}]
    paper = score_step_rar([text], [_solution("6")], ks, preset="paper", verifier=verifier)
    r1vl = score_step_rar([text], [_solution("6")], ks, preset="r1vl", verifier=verifier)
    assert paper.key_steps.tolist() == [0.5]  # normalised hit; the empty alternative never matches
    assert r1vl.key_steps.tolist() == [0.5]  # no normalisation; the empty alternative always matches


def test_compiled_key_steps_in_step_rar(verifier):
    compiled = compile_key_steps([KEY_STEPS], mode="normalized", min_alt_len=1)
    a = step_rar([GOOD] * 4, [SOLUTION] * 4, compiled.repeat(4), verifier=verifier)
    b = step_rar([GOOD] * 4, [SOLUTION] * 4, [KEY_STEPS] * 4, verifier=verifier)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        (GOOD, 1.0),
        (GOOD.replace("### Let's think step by step.\n", ""), 1.0),
        (GOOD.replace("### Rationales:\nUse the Pythagorean theorem.\n", ""), 0.0),
        (GOOD.replace("### Image Description:\nA triangle with legs 3 and 4.\n", ""), 0.0),
        (GOOD.replace("### Step 2:", "### Step 3:"), 0.0),
        (GOOD.replace("### Step 1:", "### Step 0:"), 0.0),
        (GOOD + "\n### Step 3: after the answer", 0.0),
        (GOOD.replace("answer is: 5", "answer is:   "), 0.0),
        (GOOD.replace("answer is: 5", "answer is: 5\n### The final answer is: 6"), 0.0),
        (GOOD.replace("### Image Description:\nA triangle with legs 3 and 4.\n### Rationales:\nUse the "
                      "Pythagorean theorem.\n", "### Rationales:\nx\n### Image Description:\ny\n"), 0.0),
        (GOOD + "\n### Image Description: again", 0.0),
        ("### Image Description:### Rationales:### Step 1: x### The final answer is: 3", 1.0),
    ],
)
def test_paper_step_rvr_cases(text, valid):
    assert step_rvr([text], preset="paper").tolist() == [valid]


def test_r1vl_does_not_check_description_position():
    swapped = GOOD.replace(
        "### Image Description:\nA triangle with legs 3 and 4.\n### Rationales:\nUse the Pythagorean theorem.\n",
        "### Rationales:\nx\n### Image Description:\ny\n",
    )
    assert step_rvr([swapped], preset="r1vl").tolist() == [1.0]
    assert step_rvr([swapped], preset="paper").tolist() == [0.0]


# ---------------------------------------------------------------- robustness


HOSTILE = [
    "",
    "x" * 1_000_000,
    "### Step 1: " + "12/2 = 6 " * 120_000 + "\n### The final answer is: 6",
    "\x00" * 1000 + "### The final answer is: \x00",
    "### The final answer is: \ud800\udc00\udfff",
    "### Image Description: 😀🙂\n### Rationales: שלום עולם\n### Step 1: مرحبا ١٢\n### The final answer is: ٦",
    "### Step " + "9" * 5000 + ": x\n### The final answer is: 1",
    "### Image Description:### Rationales:### Step 1:### Step " + "0" * 5000 + "2: ### The final answer is: 1",
    "$" + "\\frac{" * 3000 + "1" + "}{2}" * 3000 + "$",
    "{" * 50_000 + "frac{" * 20_000,
]


@pytest.mark.parametrize("preset", ["paper", "r1vl"])
def test_rewards_never_raise_on_hostile_completions(preset, verifier):
    solutions = [_solution("6")] * len(HOSTILE)
    key_steps = [KEY_STEPS] * len(HOSTILE)
    rar = step_rar(HOSTILE, solutions, key_steps, preset=preset, verifier=verifier)
    rvr = step_rvr(HOSTILE, preset=preset)
    assert rar.dtype == np.float32 and rvr.dtype == np.float32
    assert np.all(np.isfinite(rar)) and np.all((rar >= 0) & (rar <= 1 + ALPHA))
    assert set(rvr.tolist()) <= {0.0, 1.0}


def test_bad_inputs_are_named(verifier):
    with pytest.raises(TypeError, match=r"completions\[1\] must be str, got NoneType"):
        step_rar(["a", None], ["1", "2"], None, verifier=verifier)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="solutions has 1 items but completions has 2"):
        step_rar(["a", "b"], ["1"], None, verifier=verifier)
    with pytest.raises(ValueError, match="preset must be one of"):
        step_rvr(["a"], preset="R1-VL")  # type: ignore[arg-type]


def test_hanging_math_verify_is_cut_off_and_counted_wrong():
    tower = "### The final answer is: $" + "2^{" * 12 + "2" + "}" * 12 + "$"
    with MathVerifier(timeout=1.5, workers=1) as v:
        scores = score_step_rar([tower, GOOD], [_solution("1"), SOLUTION], None, preset="paper", verifier=v)
        assert scores.correct.tolist() == [False, True]
        assert v.timeouts == 1
        # the replacement worker keeps serving
        assert v.check([("2", "2"), ("1/2", "0.5")]) == [True, True]


def test_rewards_work_off_the_main_thread(verifier):
    out: dict[str, np.ndarray] = {}

    def run() -> None:
        out["paper"] = step_rar([GOOD], [SOLUTION], [KEY_STEPS], preset="paper", verifier=verifier)
        out["r1vl"] = step_rar([GOOD], [SOLUTION], [KEY_STEPS], preset="r1vl", verifier=verifier)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out["paper"][0] == np.float32(1 + ALPHA) and out["r1vl"][0] == np.float32(1 + ALPHA)
