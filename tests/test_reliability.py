"""What a hostile but realistic user runs into (issue 15): stop signals at every stage, reruns into an existing
directory, a directory that cannot be written or a disk that fills up, flags and dataset bytes that are wrong, empty
key steps, answers that make sympy grind. Each case is a one-line error (exit code 2), a warning, or the documented
behaviour, and never a traceback for a user error or a run that silently goes on."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trainer import _args as trainer_args

from r1vl_fast.checkpoint import latest_checkpoint
from r1vl_fast.data import load_rl_dataset, read_rows
from r1vl_fast.data import main as data_main
from r1vl_fast.demo.models import demo_processing
from r1vl_fast.errors import DataError
from r1vl_fast.eval import main as eval_main
from r1vl_fast.rewards import MathVerifier
from r1vl_fast.rewards.step_rewards import StepRewards
from r1vl_fast.tracking import json_line
from r1vl_fast.train import main as train_main


def _args(tiny: dict[str, Path], out: Path, **extra: object) -> list[str]:
    """test_trainer's run, shorter: two steps, a checkpoint at each."""
    small = dict(max_steps=2, save_steps=1, gradient_accumulation_steps=1, max_completion_length=48)
    return trainer_args(tiny, out, **{**small, **extra})


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ a stop stops


def test_a_stop_during_the_demo_warm_up_ends_the_demo_and_latest_resumes_the_warm_up(tmp_path: Path) -> None:
    """SIGTERM during the demo's SFT: the warm-up saves and the process exits 143 within seconds, with no StepGRPO,
    no evaluation and no summary. `--resume_from_checkpoint latest` then finishes the warm-up (each step once) and
    trains StepGRPO from the *full* warm-up."""
    out = tmp_path / "demo"
    demo = ["--output_dir", str(out), "--sft_steps", "40", "--max_steps", "2", "--report_to", "none"]
    proc = subprocess.Popen([sys.executable, "-m", "r1vl_fast.train", *demo], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            cwd=tmp_path)
    sft_metrics = out / "sft" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if sft_metrics.is_file() and sft_metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert time.time() - signalled < 30
    assert "stopped by SIGTERM after step" in _last_line(err)
    stopped_at = len(_steps(sft_metrics))
    assert 2 <= stopped_at < 40
    assert latest_checkpoint(out / "sft") == out / "sft" / f"checkpoint-{stopped_at}"
    assert latest_checkpoint(out) is None  # no StepGRPO from the 4-step warm-up
    for name in ("metrics.jsonl", "eval.json", "summary.json", "config.json"):
        assert not (out / name).exists(), name

    assert train_main([*demo, "--resume_from_checkpoint", "latest"]) == 0
    assert _steps(sft_metrics) == list(range(1, 41))
    assert json.loads((out / "config.json").read_text())["model_name_or_path"] == str(out / "sft" / "checkpoint-40")
    assert _steps(out / "metrics.jsonl") == [1, 2]
    assert {"before_rl", "after_rl"} <= set(json.loads((out / "summary.json").read_text()))


# ------------------------------------------------------------------------------------------ one run, one directory


def test_a_new_run_refuses_a_directory_that_holds_another_run(tiny: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert train_main(_args(tiny, out, max_steps=3)) == 0
    metrics = (out / "metrics.jsonl").read_text()
    config = (out / "config.json").read_text()
    capsys.readouterr()

    # other settings, same directory: refused before anything is loaded, and nothing of the first run changes
    assert train_main(_args(tiny, out, learning_rate=1e-3)) == 2
    message = _last_line(capsys.readouterr().err)
    assert f"--output_dir {out} holds another run (checkpoint-1, checkpoint-2, checkpoint-3, config.json" in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "config.json").read_text() == config

    # a resume that asks for fewer steps than the checkpoint holds would do nothing: refused
    assert train_main(_args(tiny, out, max_steps=2, resume_from_checkpoint="latest")) == 2
    assert "--max_steps 2 is below the step of" in _last_line(capsys.readouterr().err)

    # --overwrite_output_dir replaces the first run: its checkpoints go, metrics.jsonl holds the new run only
    assert train_main([*_args(tiny, out, learning_rate=1e-3, max_steps=2), "--overwrite_output_dir"]) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]
    assert _steps(out / "metrics.jsonl") == [1, 2]
    assert json.loads((out / "config.json").read_text())["learning_rate"] == 1e-3

    # resuming appends from the checkpoint's step: rows past it (step 2) are dropped and rewritten once
    assert train_main(_args(tiny, out, learning_rate=1e-3, max_steps=3,
                            resume_from_checkpoint=out / "checkpoint-1")) == 0
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]


def test_an_unwritable_output_dir_is_an_error_before_anything_loads(tiny: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    start = time.perf_counter()
    assert train_main(_args(tiny, blocker / "run")) == 2
    assert f"--output_dir {blocker / 'run'}: cannot write there" in _last_line(capsys.readouterr().err)
    assert time.perf_counter() - start < 5  # no model was loaded first
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert train_main(_args(tiny, locked)) == 2
        assert "cannot write there" in _last_line(capsys.readouterr().err)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A tmpfs just big enough for one checkpoint (in a private mount namespace): the second save fails with
    "no space left on <dir>", exit code 2, its partial directory removed and checkpoint-1 intact."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small tmpfs")
    size = sum(p.stat().st_size for p in Path(tiny["model"]).rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    run = " ".join(_args(tiny, disk / "run", max_steps=3, save_steps=1))
    script = (f"mount -t tmpfs -o size={int(size * 1.5) // 1024}k tmpfs {disk} || exit 99; "
              f"{sys.executable} -m r1vl_fast.train {run}; echo rc=$?; ls -a {disk / 'run'}; "
              f"ls {disk / 'run' / 'checkpoint-1'}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if "rc=" not in proc.stdout and proc.returncode == 99:
        pytest.skip("cannot mount a tmpfs here")
    listing = proc.stdout.split()
    assert "rc=2" in listing, proc.stdout + proc.stderr[-3000:]
    assert f"error: no space left on {disk / 'run'}: checkpoint-2 is not written" in proc.stderr
    assert "the previous checkpoint checkpoint-1 is kept" in _last_line(proc.stderr)
    assert "checkpoint-1" in listing and not any(name.startswith(".tmp-checkpoint") for name in listing)
    assert {"model.safetensors", "trainer_state.json", "trainer_state.pt"} <= set(listing)


# ------------------------------------------------------------------------------------------ flags, checked first


@pytest.mark.parametrize("extra, message", [
    ({"model_name_or_path": "/no/such/dir"}, "--model_name_or_path /no/such/dir: the path does not exist"),
    ({"model_name_or_path": "runs/sft/checkpoint-9"}, "the path does not exist"),
    ({"seed": -1}, "--seed must be in [0, 2**32)"),
    ({"weight_decay": -1}, "--weight_decay must be >= 0"),
    ({"epsilon": -0.5}, "--epsilon must be a finite number >= 0"),
    ({"delta": 0.5}, "--delta must exceed 1 + --epsilon_high"),
    ({"device": "tpu"}, "--device must be one of"),
    ({"top_p": 0}, "--top_p must be in (0, 1]"),
    ({"top_p": 2}, "--top_p must be in (0, 1]"),
    ({"top_k": -3}, "--top_k must be >= 0"),
    ({"max_grad_norm": -1}, "--max_grad_norm must be >= 0"),
    ({"save_total_limit": 0}, "--save_total_limit must be >= 1"),
    ({"num_train_epochs": 0, "max_steps": -1}, "--num_train_epochs must be > 0"),
    ({"fsdp": "true"}, "--fsdp shards the model over torchrun's processes"),
    ({"sft_steps": 5}, "--sft_steps sets the demo's SFT warm-up"),
    ({"temperature": "inf"}, "--temperature must be a finite number"),
])
def test_bad_flags_fail_before_anything_is_loaded_or_written(tiny: dict[str, Path], tmp_path: Path, extra: dict,
                                                             message: str, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "never"
    assert train_main(_args(tiny, out, **extra)) == 2
    assert message in _last_line(capsys.readouterr().err)
    assert not out.exists()


def test_beta_zero_with_a_kl_estimator_warns(tiny: dict[str, Path], tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    from r1vl_fast.config import GRPOTrainConfig, parse_config

    with caplog.at_level(logging.WARNING, logger="r1vl_fast"):
        parse_config(GRPOTrainConfig, _args(tiny, tmp_path / "x", beta=0, kl_estimator="k1"), "test")
    assert "--kl_estimator k1 has no effect with --beta 0" in caplog.text
    assert not (tmp_path / "x").exists()


def test_resume_latest_needs_the_output_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--resume_from_checkpoint", "latest"]) == 2
    assert "--resume_from_checkpoint latest needs the --output_dir" in _last_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ dataset bytes


def _rl_row(tiny: dict[str, Path], i: int = 0) -> dict:
    row = json.loads(Path(tiny["rl"]).read_text().splitlines()[i])
    row["image_path"] = str((Path(tiny["rl"]).parent / row["image_path"]).resolve())
    return row


def test_dataset_bytes_are_named_by_file_and_line(tiny: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    processing = demo_processing(3136, 3136)
    good = [json.dumps(_rl_row(tiny, i)).encode() for i in range(3)]

    # a non-UTF-8 byte: file, line and column, not a raw UnicodeDecodeError
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(good[0] + b"\n" + b'{"problem": "caf\xe9"}\n' + good[1] + b"\n")
    with pytest.raises(DataError, match=rf"{latin}:2: sample 1: not UTF-8 text \(byte 0xe9 at column 17\)"):
        load_rl_dataset(latin, processing, max_prompt_length=64)
    array = tmp_path / "latin1.json"
    array.write_bytes(b"[\n" + good[0] + b",\n" + b'{"problem": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=rf"{array}:3: not UTF-8 text"):
        read_rows(array)

    # a malformed JSON line is skipped (and counted) with skip_invalid, like any other invalid row
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"\n".join([good[0], b'{"problem": "x",', good[1], b"not json", good[2]]) + b"\n")
    with pytest.raises(DataError, match=rf"{broken}:2: sample 1: invalid JSON"):
        load_rl_dataset(broken, processing, max_prompt_length=64)
    samples, report = load_rl_dataset(broken, processing, max_prompt_length=64, skip_invalid=True)
    assert len(samples) == 3 and report.skipped["invalid rows"] == 2
    assert [e.split(": ")[0] for e in report.errors] == [f"{broken}:2", f"{broken}:4"]

    # data check reports every bad line, not only the first
    assert data_main(["check", str(broken)]) == 1
    out = capsys.readouterr().out
    assert f"{broken}:2: sample 1: invalid JSON" in out and f"{broken}:4: sample 3: invalid JSON" in out

    # a UTF-8 byte-order mark is accepted, in JSONL and in a JSON array
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b"\n".join(good) + b"\n")
    assert len(load_rl_dataset(bom, processing, max_prompt_length=64)[0]) == 3
    bom_array = tmp_path / "bom.json"
    bom_array.write_bytes(b"\xef\xbb\xbf[" + b",".join(good) + b"]")
    assert len(load_rl_dataset(bom_array, processing, max_prompt_length=64)[0]) == 3

    # an empty dataset fails data check, and eval says so instead of writing "accuracy": NaN
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert data_main(["check", str(empty)]) == 1
    assert "no usable rows" in capsys.readouterr().out
    eval_out = tmp_path / "eval"
    assert eval_main(["--model_name_or_path", str(tiny["model"]), "--dataset", str(empty), "--output_dir",
                      str(eval_out)]) == 2
    assert f"{empty}: no rows to evaluate" in _last_line(capsys.readouterr().err)
    assert not (eval_out / "summary.json").exists()


def test_metrics_are_strict_json() -> None:
    line = json_line({"step": 3, "loss": float("nan"), "kl": float("inf"), "nested": [1.0, float("-inf")]})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "step": 3, "loss": None, "kl": None, "nested": [1.0, None]}


# ------------------------------------------------------------------------------------------ rewards


def test_empty_key_steps_warn_once_per_dataset(caplog: pytest.LogCaptureFixture) -> None:
    key_steps = [{"Steps": []}, {"Steps": [[""]]}, {"Steps": [["x", ""]]}, {"Steps": [["area = 6"]]}]
    solutions = ["### Step 1: x\n\nThe final answer is: 6"] * 4
    where = [f"data.jsonl:{i + 1}: sample {i}" for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="r1vl_fast"):
        rewards = StepRewards(solutions, key_steps, preset="r1vl", where=where)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "1 rows have no key steps" in warnings[0] and "data.jsonl:1: sample 0" in warnings[0]
    assert "2 rows have an empty key-step alternative" in warnings[1] and "data.jsonl:3: sample 2" in warnings[1]
    # the quirk is kept: under r1vl the empty alternative matches a completion that has none of the key steps
    text = "### Step 1: nothing here\n\nThe final answer is: 5"
    assert rewards([text, text], [1, 3]).key_steps.tolist() == [1.0, 0.0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1vl_fast"):
        StepRewards(solutions, key_steps, preset="paper")
    assert [r.getMessage()[:28] for r in caplog.records] == ["1 rows have no key steps ({\""]


def test_a_batch_of_hostile_answers_costs_at_most_the_budget() -> None:
    """Answers that make sympy grind time out in parallel within one per-batch budget (serially, 8 of them took
    41 s); what the budget cut is counted, not cached, and the verifier stays usable."""
    hostile = [(str(i), "9^9^9^9^9^9") for i in range(8)]
    with MathVerifier(timeout=5.0, budget=3.0, workers=2) as verifier:
        assert verifier.check([("1/2", "0.5")]) == [True]  # workers started and warm
        start = time.perf_counter()
        verdicts = verifier.check([("2", "2"), *hostile])
        elapsed = time.perf_counter() - start
        assert verdicts == [True] + [False] * 8
        assert elapsed < 3.0 + 5.0, elapsed  # the budget, plus slack for a loaded CI machine (serial: 40 s)
        assert verifier.budget_cuts + verifier.timeouts == 8
        assert verifier.check([("3", "3"), ("x", "y")]) == [True, False]
