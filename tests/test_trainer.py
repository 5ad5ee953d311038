"""The trainer end to end on a CPU: a tiny Qwen2-VL built from a config, synthetic shapes data, real transformers
generation and the real rewards. Checks artifacts and metrics, exact resume, atomic saves, data validation errors,
reward alignment, and that checkpoints reload with transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from r1vl_fast.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from r1vl_fast.config import GRPOTrainConfig, SFTConfig, build_parser, parse_config
from r1vl_fast.data import DataError, load_rl_dataset, load_sft_dataset, read_rows
from r1vl_fast.grpo_trainer import StepGRPOTrainer
from r1vl_fast.heldout import evaluate_checkpoint
from r1vl_fast.modeling import load_model
from r1vl_fast.processing import Processing
from r1vl_fast.recipes import run_grpo
from r1vl_fast.rewards import step_rar, step_rvr
from r1vl_fast.rewards.step_rewards import StepRewards
from r1vl_fast.rollout import HFRolloutEngine
from r1vl_fast.train import main as train_main

TIME_KEYS = ("time/rollout", "time/reward", "time/logprobs", "time/update", "time/step")
REQUIRED = ("step", "loss", "reward", "reward_std", "rewards/step_rar", "rewards/step_rvr", "rewards/accuracy",
            "rewards/key_steps", "kl", "completion_length", "clip_ratio", *TIME_KEYS)


def _args(tiny: dict[str, Path], out: Path, **extra: object) -> list[str]:
    base = dict(model_name_or_path=tiny["model"], dataset=tiny["rl"], output_dir=out, max_steps=4, save_steps=2,
                num_generations=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                max_completion_length=96, max_prompt_length=64, min_pixels=3136, max_pixels=3136, temperature=1.0,
                learning_rate=2e-4, beta=0.04, device="cpu", report_to="none", seed=7)
    base.update(extra)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def _config(argv: list[str]) -> GRPOTrainConfig:
    config = parse_config(GRPOTrainConfig, argv, "test")
    assert isinstance(config, GRPOTrainConfig)
    return config


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


# ------------------------------------------------------------------------------------------------ the demo


def test_demo_runs_end_to_end_with_every_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert train_main(["--output_dir", str(out), "--max_steps", "3", "--sft_steps", "3", "--save_steps", "2",
                       "--log_completions_steps", "2"]) == 0
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(REQUIRED) <= set(r)
        assert all(np.isfinite(r[k]) for k in REQUIRED)
        assert 0 <= r["rewards/step_rvr"] <= 1 and 0 <= r["rewards/accuracy"] <= 1
    assert {p.name for p in out.iterdir() if p.name.startswith("checkpoint-")} == {"checkpoint-2", "checkpoint-3"}
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert completions and all({"completion", "reward", "step_rar", "step_rvr", "key_steps"} <= set(c)
                               for c in completions)
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _metrics(out / "sft")[-1]["step"] == 3
    summary = json.loads((out / "summary.json").read_text())
    for phase in ("before_rl", "after_rl"):
        assert set(summary[phase]) == {"reward", "accuracy", "validity", "key_step_recall"}
    assert "before RL" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ resume


def test_resume_reproduces_every_step_exactly(tiny: dict[str, Path], tmp_path: Path) -> None:
    # mu = 2: checkpoint-1 is saved mid-way through a rollout batch's reuse, checkpoint-2 at its end
    straight = tmp_path / "straight"
    run_grpo(_config(_args(tiny, straight, save_steps=1, num_iterations=2)))
    reference = _without_time(_metrics(straight))
    assert len(reference) == 4 and reference[0]["loss"] != reference[3]["loss"]
    for start in (1, 2):
        resumed = tmp_path / f"resumed-{start}"
        run_grpo(_config(_args(tiny, resumed, save_steps=1, num_iterations=2,
                               resume_from_checkpoint=straight / f"checkpoint-{start}")))
        assert _without_time(_metrics(resumed)) == reference[start:]


def test_sigterm_saves_and_stops_then_latest_resumes_exactly(tiny: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM mid-run: the step in progress is saved, the process exits 143 (128 + SIGTERM) and runs no "after
    training" evaluation; `latest` then resumes to exactly the uninterrupted run, and evaluates it."""
    args = _args(tiny, tmp_path / "x", max_steps=12, save_steps=1000, per_device_train_batch_size=1,
                 gradient_accumulation_steps=1, eval_dataset=tiny["eval"])
    straight = tmp_path / "straight"
    run_grpo(_config([*args, "--output_dir", str(straight)]))

    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "r1vl_fast.train", *args, "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1] and "Traceback" not in err
    done = len(_metrics(out))
    assert 2 <= done < 12
    assert latest_checkpoint(out) == out / f"checkpoint-{done}"
    assert set(json.loads((out / "eval.json").read_text())) == {"before"}  # no "after" for a partial run

    run_grpo(_config([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]))
    assert _without_time(_metrics(out)) == _without_time(_metrics(straight))
    assert json.loads((out / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def test_eval_steps_scores_the_live_policy_without_changing_training(tiny: dict[str, Path], tmp_path: Path) -> None:
    """--eval_steps logs eval/* at every 2nd step; the values are those of the checkpoint saved at that step
    scored on its own, and the training metrics are those of a run that never evaluates (RNGs untouched)."""
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    run_grpo(_config(_args(tiny, plain)))
    config = _config(_args(tiny, scored, eval_dataset=tiny["eval"], eval_steps=2))
    run_grpo(config)
    rows = _metrics(scored)
    eval_keys = {"eval/reward", "eval/accuracy", "eval/validity", "eval/key_step_recall"}
    assert [sorted(eval_keys & set(r)) == sorted(eval_keys) for r in rows] == [False, True, False, True]
    strip = ("time/eval", *eval_keys)
    assert _without_time([{k: v for k, v in r.items() if k not in strip} for r in rows]) == \
        _without_time(_metrics(plain))
    for step in (2, 4):
        alone = evaluate_checkpoint(scored / f"checkpoint-{step}", tiny["eval"], config, torch.device("cpu"))
        logged = rows[step - 1]
        assert {k: logged[f"eval/{k}"] for k in alone} == pytest.approx(alone, abs=1e-9)
    assert 0 <= rows[1]["eval/validity"] <= 1 and rows[1]["eval/reward"] > 0
    with pytest.raises(ValueError, match="--eval_steps needs --eval_dataset"):
        _config(_args(tiny, scored, eval_steps=2))


def test_interrupted_save_is_never_picked_as_latest(tiny: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    processing = Processing.from_pretrained(str(tiny["model"]), min_pixels=3136, max_pixels=3136, multimodal=True)
    model = load_model(str(tiny["model"]), device=torch.device("cpu"), dtype=torch.float32)
    good = save_checkpoint(tmp_path, 2, model=model, processing=processing, state={}, tensors={})
    assert latest_checkpoint(tmp_path) == good

    def killed(*args: object, **kwargs: object) -> None:  # the process dies while writing the trainer state
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 4, model=model, processing=processing, state={}, tensors={})
    monkeypatch.undo()
    assert (tmp_path / ".tmp-checkpoint-4" / "model.safetensors").is_file()  # half-written, but hidden
    assert not (tmp_path / "checkpoint-4").exists()
    # a directory that merely looks like a checkpoint (no trainer state) is not complete either
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "model.safetensors").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match=r"checkpoint-9: damaged checkpoint: no manifest.json and no "
                                              r"trainer_state.json \(not a complete checkpoint\); the newest "
                                              r"complete checkpoint is .*checkpoint-2: use that one instead"):
        run_grpo(_config(_args(tiny, tmp_path, resume_from_checkpoint=tmp_path / "checkpoint-9")))


def test_fused_lm_head_triton_loss_and_the_reference_take_the_same_step(tiny: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """Three ways to the same two steps: the LM head fused into the loss (the default, no logits tensor), and the
    materialised logits (--fused_lm_head false) through the Triton kernels (in the interpreter here:
    TRITON_INTERPRET=1, set by conftest) or the PyTorch reference."""
    runs = {}
    for impl in ("fused", "triton", "torch"):
        extra = {"fused_lm_head": "true"} if impl == "fused" else {"fused_lm_head": "false", "loss_impl": impl}
        run_grpo(_config(_args(tiny, tmp_path / impl, max_steps=2, per_device_train_batch_size=2, num_generations=4,
                               gradient_accumulation_steps=1, **extra)))
        runs[impl] = _metrics(tmp_path / impl)
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["fused_lm_head"] is True
    assert all(m["grad_norm"] > 0 for m in runs["fused"])  # real updates (the GRPO loss value itself is ~0)
    for impl in ("triton", "torch"):
        for a, b in zip(runs["fused"], runs[impl]):
            for key in ("loss", "kl", "grad_norm", "reward", "clip_ratio"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (impl, key)


def test_checkpoint_reloads_with_transformers(tiny: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    last = run_grpo(_config(_args(tiny, tmp_path, max_steps=1)))
    model = AutoModelForImageTextToText.from_pretrained(last)
    tokenizer = AutoTokenizer.from_pretrained(last)
    initial = AutoModelForImageTextToText.from_pretrained(tiny["model"])
    ids = torch.tensor([tokenizer("### Step 1:\nCount").input_ids])
    trained_logits, initial_logits = model(input_ids=ids).logits, initial(input_ids=ids).logits
    assert not torch.equal(trained_logits, initial_logits)  # the saved weights are the trained ones
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 1


def test_text_only_causal_lm_trains_on_a_text_dataset(tiny: dict[str, Path], tmp_path: Path) -> None:
    from r1vl_fast.demo.models import save_tiny_lm

    save_tiny_lm(tmp_path / "lm")  # the demo tokenizer, as the tiny Qwen2-VL uses
    rows = [r.data for r in read_rows(tiny["rl"])]
    for r in rows:
        del r["image_path"]
    data = _write(tmp_path / "text.jsonl", rows)
    last = run_grpo(_config(_args(tiny, tmp_path / "out", model_name_or_path=tmp_path / "lm", dataset=data,
                                  max_steps=2, max_completion_length=16, gradient_checkpointing="true")))
    assert [m["step"] for m in _metrics(tmp_path / "out")] == [1, 2]
    assert (last / "model.safetensors").is_file()
    # and an image row for a text-only model is a named error
    with pytest.raises(DataError, match="sample 0: field 'image_path': the model is text-only"):
        run_grpo(_config(_args(tiny, tmp_path / "bad", model_name_or_path=tmp_path / "lm")))


def test_vision_tokens_in_a_completion_are_an_error_or_cut_away(tiny: dict[str, Path]) -> None:
    from r1vl_fast.rollout import finish

    processing = Processing.from_pretrained(str(tiny["model"]), min_pixels=3136, max_pixels=3136, multimodal=True)
    pad, stop, word = processing.image_token_id, processing.stop_token_ids[0], 100
    ids = torch.tensor([[word, word, stop, word], [word, pad, word, stop], [word, word, word, word]])
    logp = -torch.rand(3, 4)
    with pytest.raises(RuntimeError, match="completion 1 contains a vision special token"):
        finish(processing, ids, logp)
    out = finish(processing, ids, logp, sanitize=True)
    assert out.finish_reasons == ["stop", "sanitized", "length"]
    assert out.completion_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert pad not in out.completion_ids[out.completion_mask].tolist()
    assert out.logprobs is not None and torch.equal(out.logprobs[~out.completion_mask], torch.zeros(4))


# ------------------------------------------------------------------------------------------------ rewards


def test_rewards_stay_aligned_when_a_micro_batch_holds_more_than_g_completions(tiny: dict[str, Path]) -> None:
    processing = Processing.from_pretrained(str(tiny["model"]), min_pixels=3136, max_pixels=3136, multimodal=True)
    samples, _ = load_rl_dataset(tiny["rl"], processing, max_prompt_length=64)
    rewards = StepRewards([s.solution for s in samples], [s.key_steps for s in samples])
    # each sample's own reference reasoning is a perfect completion for it, and (mostly) wrong for the others
    ids = [5, 5, 9, 9, 2, 2]
    texts = [samples[i].solution for i in ids]
    assert np.allclose(rewards(texts, ids).total, 2.1)
    shifted = ids[2:] + ids[:2]
    expect = step_rar(texts, [samples[i].solution for i in shifted], [samples[i].key_steps for i in shifted])
    expect = expect + step_rvr(texts)
    assert np.allclose(rewards(texts, shifted).total, expect)

    # and through the trainer: P = 3 prompts x G = 2 completions in one micro-batch
    config = _config(_args(tiny, tiny["root"] / "unused", per_device_train_batch_size=3))
    model = load_model(str(tiny["model"]), device=torch.device("cpu"), dtype=torch.float32)
    trainer = StepGRPOTrainer(config, policy=model, reference=None, processing=processing, samples=samples,
                              rewards=rewards, engine=HFRolloutEngine(model, processing, torch.device("cpu")),
                              device=torch.device("cpu"), total_steps=1)
    batch = trainer.make_rollouts([4, 11, 17], dict.fromkeys(TIME_KEYS, 0.0))
    assert batch.sample_ids == [4, 4, 11, 11, 17, 17]
    for j, i in enumerate(batch.sample_ids):
        alone = step_rar([batch.texts[j]], [samples[i].solution], [samples[i].key_steps]) + step_rvr([batch.texts[j]])
        assert batch.rewards.total[j] == pytest.approx(float(alone[0]))
    trainer.update([batch])  # the loss normalises the rewards within each group, in the same pass
    assert batch.advantages is not None
    adv = batch.advantages.view(3, 2)
    assert torch.allclose(adv.sum(1), torch.zeros(3), atol=1e-5)


# ------------------------------------------------------------------------------------------------ data


def _write(path: Path, rows: list[object], jsonl: bool = True) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("[\n" + ",\n".join(json.dumps(r, indent=1) for r in rows) + "\n]\n")
    return path


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"problem": 3}, "field 'problem' must be str, got int"),
        ({"solution": None}, "field 'solution' is missing"),
        ({"key_steps": {"Steps": [["ok", 5]]}}, r"field 'key_steps.Steps\[0\]\[1\]' must be str"),
        ({"key_steps": {"Steps": [[]]}}, r"'key_steps.Steps\[0\]' must be a string or a non-empty list"),
        ({"key_steps": ["a"]}, "field 'key_steps' must be dict"),
        ({"image_path": "images/missing.png"}, "image not found"),
        ({"image_path": "broken.png"}, "image does not decode"),
        ({"problem": "many words " * 40}, "prompts are never cut"),
    ],
)
@pytest.mark.parametrize("jsonl", [True, False])
def test_invalid_rows_name_file_line_and_field(tiny: dict[str, Path], tmp_path: Path, bad: dict, message: str,
                                               jsonl: bool) -> None:
    processing = Processing.from_pretrained(str(tiny["model"]), min_pixels=3136, max_pixels=3136, multimodal=True)
    good = [r.data for r in read_rows(tiny["rl"])][:4]
    for r in good:
        r["image_path"] = str(tiny["rl"].parent / r["image_path"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [*good[:2], {**good[2], **bad}, good[3]]
    path = _write(tmp_path / ("d.jsonl" if jsonl else "d.json"), rows, jsonl)
    line = 3 if jsonl else 1 + 1 + sum(json.dumps(r, indent=1).count("\n") + 1 for r in rows[:2])
    with pytest.raises(DataError, match=message) as err:
        load_rl_dataset(path, processing, image_root=tmp_path, max_prompt_length=64)
    assert f"{path}:{line}: sample 2:" in str(err.value)
    samples, report = load_rl_dataset(path, processing, image_root=tmp_path, max_prompt_length=64,
                                      skip_invalid=True)
    assert len(samples) == 3 and sum(report.skipped.values()) == 1
    assert [s.problem for s in samples] == [rows[i]["problem"] for i in (0, 1, 3)]


def test_sft_rows_are_validated(tiny: dict[str, Path], tmp_path: Path) -> None:
    processing = Processing.from_pretrained(str(tiny["model"]), min_pixels=3136, max_pixels=3136, multimodal=True)
    rows = [r.data for r in read_rows(tiny["sft"])][:3]
    rows[1]["messages"] = rows[1]["messages"][:1]
    path = _write(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:2: sample 1: field 'messages' must be \[user, assistant\]"):
        load_sft_dataset(path, processing, image_root=tiny["sft"].parent, max_length=512)
    ok, report = load_sft_dataset(path, processing, image_root=tiny["sft"].parent, max_length=512, skip_invalid=True)
    assert len(ok) == 2 and report.skipped["invalid rows"] == 1


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(DataError, match=rf"{path}:3: sample 1: invalid JSON"):
        read_rows(path)


# ------------------------------------------------------------------------------------------------ SFT + config


def test_sft_lowers_the_loss_and_saves_a_loadable_checkpoint(tiny: dict[str, Path], tmp_path: Path) -> None:
    from r1vl_fast.sft import main as sft_main

    args = ["--model_name_or_path", str(tiny["init"]), "--dataset", str(tiny["sft"]), "--output_dir", str(tmp_path),
            "--max_steps", "12", "--learning_rate", "3e-3", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--max_pixels", "3136", "--report_to", "none", "--device", "cpu",
            "--max_length", "256"]
    assert sft_main(args) == 0
    losses = [m["loss"] for m in _metrics(tmp_path)]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    model = load_model(str(tmp_path / "checkpoint-12"), device=torch.device("cpu"), dtype=torch.float32)
    assert model.config.vision_config.depth == 1


def test_help_documents_every_option_with_its_default() -> None:
    text = " ".join(build_parser(GRPOTrainConfig, "train").format_help().split())
    for option in ("--model_name_or_path", "--num_generations", "--epsilon_high", "--reward_preset",
                   "--rollout_engine", "--resume_from_checkpoint", "--max_pixels", "--skip_invalid"):
        assert option in text
    assert "(default: 1.2)" in text and "(default: 0.04)" in text
    assert "--max_length" in build_parser(SFTConfig, "sft").format_help()


def test_config_precedence_preset_then_yaml_then_command_line(tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 3.0e-6\nbeta: 0.0\nmodel_name_or_path: m\ndataset: d\n")
    config = _config(["--preset", "r1vl-7b", "--config", str(yaml_file), "--beta", "0.02", "--bf16", "false"])
    assert config.temperature == 1.0 and config.reward_preset == "r1vl" and config.logprob_temperature == 1.0
    assert config.learning_rate == 3e-6 and config.beta == 0.02 and config.bf16 is False
    assert _config([]).preset == "demo"
    with pytest.raises(ValueError, match="--num_generations must be >= 2"):
        _config(["--dataset", "d", "--model_name_or_path", "m", "--num_generations", "1"])
    yaml_file.write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match="unknown option 'learning_rat'"):
        _config(["--config", str(yaml_file)])
    with pytest.raises(SystemExit):
        _config(["--beta", "lots"])


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """Resuming unpickles the trainer state with weights_only: a crafted checkpoint (shared by someone else) that
    carries a callable is refused with a clear error, and its code never runs."""
    from r1vl_fast.checkpoint import STATE_FILE, TENSORS_FILE, UnsafeCheckpointError, load_state

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # what pickle would call on load
            return (os.system, (f"touch {marker}",))

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 1}))
    torch.save({"optimizer": {}, "rng": Payload()}, checkpoint / TENSORS_FILE)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_state(checkpoint)
    assert not marker.exists()


def test_yaml_values_are_parsed_and_checked_like_the_command_line(tmp_path: Path) -> None:
    """PyYAML's own types do not slip through: quoted booleans are parsed, not truthy strings; `1e-5` (a string to
    PyYAML) is a float; a wrong type names the file and the option."""
    yaml_file = tmp_path / "run.yaml"

    def load(text: str) -> GRPOTrainConfig:
        yaml_file.write_text("model_name_or_path: m\ndataset: d\n" + text)
        return _config(["--config", str(yaml_file), "--device", "cpu"])

    config = load('skip_invalid: "no"\nbf16: "false"\nlearning_rate: 1e-5\nsave_steps: 3\nepsilon_high: null\n')
    assert config.skip_invalid is False and config.bf16 is False
    assert config.learning_rate == 1e-5 and isinstance(config.learning_rate, float) and config.save_steps == 3
    assert load("bf16: true\nbeta: 0\n").bf16 is True
    for text, message in (("report_to: 5\n", "'report_to' expects a string"),
                          ("save_steps: 1.5\n", "'save_steps' expects int"),
                          ("skip_invalid: maybe\n", "--skip_invalid expects true or false"),
                          ("learning_rate: fast\n", "--learning_rate expects float"),
                          ("max_steps: [1, 2]\n", "'max_steps' expects int, got list")):
        with pytest.raises(ValueError, match=f"{yaml_file}: .*{message}"):
            load(text)


def test_user_errors_print_one_line_and_exit_2(tiny: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A bad file or option value is `error: <message>` on stderr and exit code 2, without a traceback, in every
    command line; real bugs keep theirs."""
    from r1vl_fast.data import main as data_main
    from r1vl_fast.eval import main as eval_main
    from r1vl_fast.sft import main as sft_main

    missing = tmp_path / "missing.jsonl"
    calls = [
        (train_main, _args(tiny, tmp_path / "a", dataset=missing), f"{missing}: no such dataset file"),
        (train_main, _args(tiny, tmp_path / "b", num_generations=1), "--num_generations must be >= 2"),
        (sft_main, ["--model_name_or_path", str(tiny["model"]), "--dataset", str(missing), "--output_dir",
                    str(tmp_path / "c"), "--device", "cpu", "--report_to", "none"], "no such dataset file"),
        (eval_main, ["--model_name_or_path", str(tiny["model"]), "--dataset", str(missing), "--output_dir",
                     str(tmp_path / "d")], "no such dataset file"),
        (data_main, ["check", str(missing)], "no such dataset file"),
    ]
    for main, argv, message in calls:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: ") and message in err.strip().splitlines()[-1]


def test_non_finite_values_never_train_on(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Non-finite options are refused at parse time; a non-finite gradient norm skips the update (logged and
    counted), three in a row stop the run; weights that are not finite are never saved."""
    from transformers import AutoModelForImageTextToText

    from r1vl_fast.errors import ConfigError, NonFiniteError

    for option, value in (("learning_rate", "inf"), ("beta", "nan"), ("max_grad_norm", "nan")):
        with pytest.raises(ConfigError, match=f"--{option} must be a finite number"):
            _config(_args(tiny, tmp_path / "x", **{option: value}))

    # a learning rate of 1e30 sends the weights to ~1e30 after step 1: every later forward overflows
    diverged = tmp_path / "diverged"
    with pytest.raises(NonFiniteError, match="3 steps in a row ended with a non-finite loss or gradient norm"):
        run_grpo(_config(_args(tiny, diverged, learning_rate=1e30, max_steps=8, save_steps=1)))
    metrics = _metrics(diverged)
    assert [m["skipped"] for m in metrics] == [0.0, 1.0, 1.0]  # the third skip raised before it was logged
    assert metrics[-1]["skipped_total"] == 2.0
    last = latest_checkpoint(diverged)  # skipped updates left the weights finite: those checkpoints are good
    assert last is not None and last.name == "checkpoint-3"

    # a model whose weights are NaN: its one step is skipped, and its final save is refused
    broken = tmp_path / "broken-model"
    model = AutoModelForImageTextToText.from_pretrained(tiny["model"])
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    model.save_pretrained(broken)
    Processing.from_pretrained(str(tiny["model"])).save_pretrained(broken)
    out = tmp_path / "nan-run"
    with pytest.raises(NonFiniteError, match="checkpoint-1 is not written"):
        run_grpo(_config(_args(tiny, out, model_name_or_path=broken, max_steps=1)))
    assert latest_checkpoint(out) is None and not (out / "checkpoint-1").exists()
