"""torchrun on CPU (gloo): two ranks reproduce one rank with the same global batch, FSDP2 reproduces DDP, and a
2-rank run resumes exactly, each with token-budget micro-batches that differ between ranks. Real processes, real
collectives, the tiny Qwen2-VL and the demo data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = ("loss", "reward", "kl", "rewards/step_rar", "rewards/step_rvr", "completion_length", "grad_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(tiny: dict[str, Path], out: Path, ranks: int, per_rank: int, *extra: str) -> list[dict]:
    args = ["--model_name_or_path", str(tiny["model"]), "--dataset", str(tiny["rl"]), "--output_dir", str(out),
            "--max_steps", "3", "--save_steps", "1", "--num_generations", "2",
            "--per_device_train_batch_size", str(per_rank), "--gradient_accumulation_steps", "1",
            "--max_completion_length", "112", "--max_prompt_length", "64", "--min_pixels", "3136",
            "--max_pixels", "3136", "--temperature", "1.0", "--learning_rate", "2e-4", "--beta", "0.04",
            "--device", "cpu", "--report_to", "none", "--rollout_engine", "hf", "--seed", "7",
            # a budget of 1-2 groups: the ranks split their rollouts differently from one rank, and from each
            # other (a rank that needs fewer micro-batches splits further or runs a zero-weight pass)
            "--max_tokens_per_micro_batch", "250", *extra]
    if ranks == 1:
        cmd = [sys.executable, "-m", "r1vl_fast.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "r1vl_fast.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out.parent, env=env)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "rank" in line]
    assert proc.returncode == 0, "\n".join(errors)[-6000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in KEYS:
            assert x[key] == pytest.approx(y[key], abs=1e-5, rel=1e-5), (x["step"], key)


@pytest.fixture(scope="module")
def runs(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    return {"root": root}


def test_two_ranks_match_one_rank_and_fsdp2_matches_ddp(tiny: dict[str, Path], runs: dict[str, Path]) -> None:
    root = runs["root"]
    scored = ("--eval_dataset", str(tiny["eval"]), "--eval_steps", "2")  # 8 held-out prompts, 4 per rank
    one = _train(tiny, root / "one", 1, 4, *scored)
    ddp = _train(tiny, root / "ddp", 2, 2, *scored)
    fsdp = _train(tiny, root / "fsdp", 2, 2, "--fsdp", *scored)
    # a real update happened (the on-policy GRPO loss value itself is ~0: group-normalised advantages average out)
    assert all(m["grad_norm"] > 0 for m in one) and len({m["reward"] for m in one}) > 1
    assert all(m["micro_batches"] > 1 for m in one + ddp + fsdp)  # the budget split every step
    _close(ddp, one)
    _close(fsdp, ddp)
    # held-out scoring mid-run: each rank scores its share, the reduced figures are one rank's
    evals = [{k: v for k, v in run[1].items() if k.startswith("eval/")} for run in (one, ddp, fsdp)]
    assert len(evals[0]) == 4 and all("eval/reward" not in run[0] for run in (one, ddp, fsdp))
    assert evals[1] == pytest.approx(evals[0], abs=1e-6) and evals[2] == pytest.approx(evals[0], abs=1e-6)
    # one HF directory with the full model, loadable by transformers, from either layout
    from transformers import AutoModelForImageTextToText

    for name in ("ddp", "fsdp"):
        model = AutoModelForImageTextToText.from_pretrained(root / name / "checkpoint-3")
        assert model.config.text_config.hidden_size == 128
    runs["ddp"], runs["fsdp"] = root / "ddp", root / "fsdp"


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_two_rank_run_resumes_exactly(tiny: dict[str, Path], runs: dict[str, Path], layout: str) -> None:
    if layout not in runs:
        pytest.skip("needs the 2-rank runs of the previous test")
    resumed = runs["root"] / f"resumed-{layout}"
    extra = ["--fsdp"] if layout == "fsdp" else []
    out = _train(tiny, resumed, 2, 2, *extra, "--resume_from_checkpoint", str(runs[layout] / "checkpoint-1"))
    reference = [json.loads(line) for line in (runs[layout] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in out] == [2, 3]
    for x, y in zip(out, reference[1:]):
        assert {k: x[k] for k in KEYS} == {k: y[k] for k in KEYS}


def test_the_demo_runs_under_torchrun_as_the_readme_says(tmp_path: Path) -> None:
    """`torchrun --standalone --nproc_per_node 2 -m r1vl_fast.train` (the demo, no --output_dir): every rank trains
    into one directory named after the launch; rank 0 alone writes the data, the evaluation and the summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "r1vl_fast.train", "--max_steps", "2", "--sft_steps", "2", "--report_to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    runs = list((tmp_path / "runs").glob("demo-*"))
    assert len(runs) == 1, runs
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert set(summary["before_rl"]) >= {"reward", "accuracy", "validity", "key_step_recall"}
    assert proc.stdout.count("demo summary") == 1  # printed once, by rank 0
    assert [json.loads(line)["step"] for line in (runs[0] / "metrics.jsonl").read_text().splitlines()] == [1, 2]
