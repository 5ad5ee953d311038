"""``python -m r1vl_fast.eval``: answer judging on hand-written cases, and an end-to-end run on the demo's
checkpoint and held-out rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1vl_fast.eval import judge
from r1vl_fast.eval import main as eval_main


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("B", "B", True), ("(B) 12 apples", "B", True), ("B. 12", "(B)", True), ("The answer is (C)", "B", False),
        ("C", "B", False), ("Yes, it is.", "yes", True), ("no", "Yes", False), ("0.5", "1/2", True),
        ("\\frac{1}{2}", "0.5", True), ("12", "12.0", True), ("13", "12", False), (None, "12", False),
        ("", "12", False), ("x = 5", "5", True), ("Paris", "paris", True),
    ],
)
def test_judge(pred: str | None, gold: str, ok: bool, verifier) -> None:  # type: ignore[no-untyped-def]
    assert judge([pred], [gold], verifier) == [ok]


def test_eval_on_the_demo_checkpoint(tiny: dict[str, Path], tmp_path: Path) -> None:
    rows = [json.loads(line) for line in tiny["eval"].read_text().splitlines()]
    bench = tmp_path / "bench.jsonl"
    # answers as plain values (what benchmarks ship), key steps kept for recall
    with open(bench, "w") as f:
        for r in rows:
            answer = r["solution"].rsplit("### The final answer is:", 1)[1].strip()
            f.write(json.dumps({"image_path": str(tiny["eval"].parent / r["image_path"]), "problem": r["problem"],
                                "answer": answer, "key_steps": r["key_steps"]}) + "\n")
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tiny["model"]), "--dataset", str(bench), "--output_dir", str(out),
            "--max_pixels", "3136", "--max_new_tokens", "112", "--rollout_engine", "hf"]
    assert eval_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == len(rows) == 8
    for key in ("accuracy", "validity", "key_step_recall", "mean_completion_length"):
        assert 0 <= summary[key] <= (112 if key == "mean_completion_length" else 1)
    assert summary["validity"] > 0  # the SFT-warmed model writes the format
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(len(p["completions"]) == 1 for p in predictions)
    # greedy decoding is deterministic; several samples add pass@k
    assert eval_main(args + ["--output_dir", str(tmp_path / "again")]) == 0
    again = [json.loads(line) for line in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    assert [p["completions"] for p in again] == [p["completions"] for p in predictions]
    assert eval_main(args + ["--output_dir", str(tmp_path / "k"), "--num_samples", "3"]) == 0
    k = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert k["pass@3"] >= k["accuracy"] and k["temperature"] == 1.0
