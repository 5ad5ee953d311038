"""One clear outcome for the faults of issue 26: two runs started into one directory (one runs, the other is refused
at once, on one process and under torchrun), a damaged checkpoint (named, with the newest complete one to use
instead), and a resume that does not fit its checkpoint (each differing option named). Each refusal is one line,
exit code 2, and writes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import _free_port
from test_reliability import _last_line, _steps
from test_trainer import _args as trainer_args

from r1vl_fast.checkpoint import MANIFEST_FILE, _write_manifest, latest_checkpoint, verify_checkpoint
from r1vl_fast.config import GRPOTrainConfig, parse_config
from r1vl_fast.eval import main as eval_main
from r1vl_fast.lock import LOCK_FILE
from r1vl_fast.resume import check_fits
from r1vl_fast.train import main as train_main

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _args(tiny: dict[str, Path], out: Path, **extra: object) -> list[str]:
    small = dict(max_steps=3, save_steps=1, gradient_accumulation_steps=1, max_completion_length=48)
    return trainer_args(tiny, out, **{**small, **extra})


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and modification time: what "writes nothing" compares."""
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def _holder_pid(out: Path) -> int | None:
    try:
        return int(json.loads((out / LOCK_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _wait_for_holder(out: Path, proc: subprocess.Popen, pid: int | None = None) -> int:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        holder = _holder_pid(out)
        if holder is not None and (pid is None or holder == pid) and (out / "config.json").is_file():
            return holder
        time.sleep(0.05)
    raise AssertionError(f"the first run never took the lock (exit {proc.poll()})")


# ------------------------------------------------------------------------------------------ one run per directory


def test_two_runs_started_together_into_one_directory_one_runs(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The same command twice at once (a job submitted twice): one trains, the other exits 2 at once with one line
    naming the directory and the process that holds it; a third run with --overwrite_output_dir is refused the same
    way while the first lives. The first, stopped, holds its own steps once each, and the directory is free again."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "r1vl_fast.train", *_args(tiny, out, max_steps=100)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
             for _ in range(2)]
    # the one that lost comes back long before the winner is done
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    _, err = loser.communicate()
    assert loser.returncode == 2, err[-3000:]
    assert winner.poll() is None, "the loser should be refused while the winner trains"
    message = _last_line(err)
    assert message.startswith(f"error: --output_dir {out} is in use by another run (pid {winner.pid} on ")
    assert "r1vl_fast.train" in message

    # --overwrite_output_dir does not override a live lock, and removes nothing
    assert _wait_for_holder(out, winner) == winner.pid
    overwrite = subprocess.run([*cmd, "--overwrite_output_dir"], capture_output=True, text=True, env=ENV,
                               cwd=tmp_path, timeout=300)
    assert overwrite.returncode == 2 and "is in use by another run" in _last_line(overwrite.stderr)

    assert winner.poll() is None  # still training
    winner.send_signal(signal.SIGTERM)
    _, err = winner.communicate(timeout=300)
    assert winner.returncode == 128 + signal.SIGTERM, err[-3000:]
    done = len(_steps(out / "metrics.jsonl"))
    assert _steps(out / "metrics.jsonl") == list(range(1, done + 1))  # one run's steps, not two interleaved
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == sorted(
        f"checkpoint-{i}" for i in range(1, done + 1))
    assert all(not verify_checkpoint(out / f"checkpoint-{i}") for i in range(1, done + 1))
    # the lock went with its process: the directory is free to resume
    assert train_main(_args(tiny, out, max_steps=done + 1, resume_from_checkpoint="latest")) == 0
    assert _steps(out / "metrics.jsonl") == list(range(1, done + 2))


def test_the_lock_holds_under_torchrun_both_ways(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A 2-rank torchrun run holds its directory (rank 0 takes the lock): a plain run into it is refused and names
    rank 0's process; a second torchrun into it stops on every rank at once (no hang) with the same error; the
    first run goes on untouched until it is stopped."""
    out = tmp_path / "ddp"
    args = _args(tiny, out, max_steps=100, num_generations=2, per_device_train_batch_size=1)

    def torchrun() -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), "-m", "r1vl_fast.train", *args]

    first = subprocess.Popen(torchrun(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                             cwd=tmp_path)
    pid = _wait_for_holder(out, first)
    assert pid != first.pid  # a rank's process, not torchrun's

    plain = subprocess.run([sys.executable, "-m", "r1vl_fast.train", *args], capture_output=True, text=True,
                           env=ENV, cwd=tmp_path, timeout=300)
    assert plain.returncode == 2
    assert f"is in use by another run (pid {pid} on " in _last_line(plain.stderr)

    start = time.time()
    second = subprocess.run(torchrun(), capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert second.returncode != 0 and time.time() - start < 120
    refusals = [line for line in second.stderr.splitlines() if line.startswith("error: --output_dir")]
    assert len(refusals) == 2 and all(f"is in use by another run (pid {pid} on " in r for r in refusals), \
        second.stderr[-3000:]
    assert first.poll() is None  # still training
    first.send_signal(signal.SIGTERM)  # torchrun passes it to its ranks, which save and stop
    _, err = first.communicate(timeout=300)
    done = len(_steps(out / "metrics.jsonl"))
    assert done >= 1 and _steps(out / "metrics.jsonl") == list(range(1, done + 1)), err[-3000:]


def test_a_plain_run_holds_against_torchrun(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Held by a plain run in this process (the lock is re-entrant here, so the other side is a fresh process):
    torchrun into the same directory stops on both ranks at once."""
    from r1vl_fast import lock

    out = tmp_path / "held"
    out.mkdir()
    with lock.holding(out):
        before = _tree(out)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m",
                               "r1vl_fast.train", *_args(tiny, out)], capture_output=True, text=True, env=ENV,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode != 0
        refusals = [line for line in proc.stderr.splitlines() if line.startswith("error: --output_dir")]
        assert len(refusals) == 2 and f"(pid {os.getpid()} on " in refusals[0], proc.stderr[-3000:]
        assert _tree(out) == before


# ------------------------------------------------------------------------------------------ damaged checkpoints


@pytest.fixture(scope="module")
def finished(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_main(_args(tiny, out)) == 0
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_damaged_checkpoint_is_named_with_the_newest_complete_one(finished: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Every file of the newest checkpoint in turn, removed or cut short: `latest` and the explicit path both get
    one line naming the checkpoint, the file and what is wrong with it, and checkpoint-2 to use instead; exit 2,
    nothing written. A byte changed in the trainer state (same size) is caught by its hash."""
    out = _copy(finished, tmp_path / "run")
    newest, good = out / "checkpoint-3", out / "checkpoint-2"
    files = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    assert {"model.safetensors", "trainer_state.json", "trainer_state.pt", "run.json", MANIFEST_FILE} <= set(files)
    resume = ["--output_dir", str(out), "--max_steps", "4", "--resume_from_checkpoint"]
    for name in files:
        original = (newest / name).read_bytes()
        for damage in ("removed", "truncated"):
            if damage == "removed":
                (newest / name).unlink()
            else:
                (newest / name).write_bytes(original[: len(original) // 2])
            before = _tree(out)
            for spec in ("latest", str(newest)):
                assert train_main([*resume, spec]) == 2, (name, damage, spec)
                message = _last_line(capsys.readouterr().err)
                assert message.startswith(f"error: --resume_from_checkpoint {newest}: damaged checkpoint: "), message
                if name != MANIFEST_FILE or damage == "removed":
                    assert name in message, message
                assert message.endswith(f"the newest complete checkpoint is {good}: use that one instead"), message
            assert _tree(out) == before, (name, damage)
            (newest / name).write_bytes(original)
    assert latest_checkpoint(out) == newest

    # the same size, other bytes: the trainer state's SHA-256 tells
    state = bytearray((newest / "trainer_state.pt").read_bytes())
    state[len(state) // 2] ^= 0xFF
    (newest / "trainer_state.pt").write_bytes(bytes(state))
    assert train_main([*resume, "latest"]) == 2
    assert "trainer_state.pt has changed since it was written" in _last_line(capsys.readouterr().err)

    # every checkpoint damaged: said so
    for i in (1, 2):
        (out / f"checkpoint-{i}" / "model.safetensors").unlink()
    assert train_main([*resume, "latest"]) == 2
    assert _last_line(capsys.readouterr().err).endswith(f"{out} holds no complete checkpoint")


def test_model_name_or_path_and_eval_check_a_checkpoint_too(finished: Path, tiny: dict[str, Path],
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path / "run")
    newest = out / "checkpoint-3"
    size = (newest / "model.safetensors").stat().st_size
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(size - 100)
    expected = f"{newest}: damaged checkpoint: model.safetensors is {size - 100} bytes, was {size} when written"
    assert train_main(_args(tiny, tmp_path / "next", model_name_or_path=newest)) == 2
    message = _last_line(capsys.readouterr().err)
    assert message.startswith(f"error: --model_name_or_path {expected}")
    assert message.endswith(f"the newest complete checkpoint is {out / 'checkpoint-2'}: use that one instead")
    assert not (tmp_path / "next").exists()
    assert eval_main(["--model_name_or_path", str(newest), "--dataset", str(tiny["eval"]), "--output_dir",
                      str(tmp_path / "eval")]) == 2
    assert _last_line(capsys.readouterr().err).startswith(f"error: --model_name_or_path {expected}")
    assert not (tmp_path / "eval").exists()


# ------------------------------------------------------------------------------------------ resume fits


def test_a_resume_that_does_not_fit_names_each_option(finished: Path, tiny: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = _copy(finished, tmp_path / "run")
    before = _tree(out)
    four = tmp_path / "four.jsonl"
    four.write_text("".join(Path(tiny["rl"]).read_text().splitlines(keepends=True)[:4]))
    resume = ["--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    where = f"error: --resume_from_checkpoint {out / 'checkpoint-3'} does not fit this run: "

    assert train_main([*resume, "--dataset", str(four)]) == 2
    message = _last_line(capsys.readouterr().err)
    assert message.startswith(where + f"--dataset {tiny['rl']} (24 usable rows, SHA-256 ")
    assert f"in the checkpoint, {four} (SHA-256 " in message

    assert train_main([*resume, "--model_name_or_path", str(tiny["init"])]) == 2
    message = _last_line(capsys.readouterr().err)
    assert message.startswith(where + f"--model_name_or_path {tiny['model']} in the checkpoint, {tiny['init']} now")

    # several at once, each with the checkpoint's value and the given one; a YAML --config counts as given
    config = tmp_path / "run.yaml"
    config.write_text("loss_type: bnpo\n")
    assert train_main([*resume, "--beta", "0.1", "--num_generations", "4", "--seed", "8", "--config",
                       str(config), "--save_steps", "5"]) == 2
    message = _last_line(capsys.readouterr().err)
    for part in ("--seed 7 in the checkpoint, 8 now", "--num_generations 2 in the checkpoint, 4 now",
                 "--beta 0.04 in the checkpoint, 0.1 now", "--loss_type grpo in the checkpoint, bnpo now"):
        assert part in message, message
    assert "save_steps" not in message  # changeable on resume

    # the dataset edited in place since the checkpoint: a run that trained on a copy of it, then one row more
    edited = _copy(out, tmp_path / "edited")
    data = tmp_path / "data.jsonl"
    shutil.copy(tiny["rl"], data)
    newest = edited / "checkpoint-3"
    record = json.loads((newest / "run.json").read_text())
    record["dataset"]["path"] = str(data)
    (newest / "run.json").write_text(json.dumps(record))
    (newest / MANIFEST_FILE).unlink()
    _write_manifest(newest)
    data.write_text(data.read_text() + Path(tiny["rl"]).read_text().splitlines(keepends=True)[0])
    assert train_main(["--output_dir", str(edited), "--resume_from_checkpoint", "latest", "--max_steps", "4"]) == 2
    message = _last_line(capsys.readouterr().err)
    assert f"--dataset {data} (24 usable rows, SHA-256 " in message
    assert "now (its content changed since the checkpoint was written)" in message

    # nothing to resume from
    assert train_main(["--resume_from_checkpoint", str(tmp_path / "no-such")]) == 2
    assert _last_line(capsys.readouterr().err) == \
        f"error: --resume_from_checkpoint {tmp_path / 'no-such'}: no such checkpoint"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_main(["--output_dir", str(empty), "--resume_from_checkpoint", "latest"]) == 2
    assert f"--resume_from_checkpoint latest: no checkpoint in {empty}" in _last_line(capsys.readouterr().err)

    # SFT's checkpoint resumed by the trainer
    assert train_main(["--resume_from_checkpoint", str(tiny["model"])]) == 2
    assert "this checkpoint is from python -m r1vl_fast.sft; resume it with that command" in \
        _last_line(capsys.readouterr().err)
    assert _tree(out) == before


def test_an_explicit_checkpoint_alone_resumes_exactly(finished: Path, tmp_path: Path) -> None:
    """`--resume_from_checkpoint <dir>` with nothing else: model, data and every setting come from the checkpoint,
    the run continues in the checkpoint's directory, and step 3 is the uninterrupted run's step 3."""
    out = _copy(finished, tmp_path / "run")
    shutil.rmtree(out / "checkpoint-3")
    assert train_main(["--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    drop = ("time/",)
    strip = [{k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
             for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [{k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
                 for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert strip == reference


def test_resume_checks_the_number_of_ranks(finished: Path) -> None:
    config = parse_config(GRPOTrainConfig, ["--output_dir", str(finished), "--resume_from_checkpoint", "latest"],
                          "test")
    check_fits(config, finished / "checkpoint-3", 1)
    with pytest.raises(ValueError, match=r"ranks \(torchrun --nproc_per_node\) 1 in the checkpoint, 2 now"):
        check_fits(config, finished / "checkpoint-3", 2)
