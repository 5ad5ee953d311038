"""Side by side with TRL's GRPOTrainer (issue 18): the same model checkpoint, the same rows in the same order, the
same settings and our rewards, each trainer run as a user would (TRL through benches/trl_step.py, ours through
``python -m r1vl_fast.train``), in separate processes interleaved A-B-B-A, because these machines are noisy.
Needs TRL (``pip install ".[peers]"``); skipped without it.

Two shapes (``R1VL_VS_TRL_SHAPES``, default ``tiny``; ``tiny,2b`` for both):

- ``tiny``: the demo's tiny Qwen2-VL after a short SFT warm-up, 8 prompts x G = 4 per step, 112-token completions,
  56 x 56 images. ``R1VL_VS_TRL_STEPS`` steps per run (default 12), ``R1VL_VS_TRL_LEARN_STEPS`` for the learning
  check (default 100; 0 skips it): the training reward of the first and last fifth, and both trained policies
  scored on the held-out rows by ``python -m r1vl_fast.eval``.
- ``2b``: a Qwen2-VL at Qwen2-VL-2B's widths with random weights (text 1536 wide, vocabulary 151,936 with a
  tokenizer padded to it, vision 1280 wide; 2 of 28 decoder layers, 2 of 32 vision blocks), R1-VL's 400,000-pixel
  budget (the demo's 56 x 56 images become 644 x 644: 529 image tokens on both sides), 2 prompts x G = 4 per step,
  128-token completions.
  ``R1VL_VS_TRL_2B_STEPS`` steps per run (default 4). About 50 minutes on 2 cores at 3 steps.

Each is beta = 0.01 with HF generate on both sides; the median step is over steps 3..N of both runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("trl") is None:
    pytest.skip("TRL is not installed: pip install '.[peers]'", allow_module_level=True)
if not Path("/proc/self/status").exists():
    pytest.skip("peak memory is read from Linux's /proc/self/status", allow_module_level=True)

HERE = Path(__file__).parent
SHAPES = {
    "tiny": dict(prompts=8, G=4, completion=112, beta=0.01, lr=1e-4, pixels=3136, seed=42, max_prompt_length=64,
                 steps=int(os.environ.get("R1VL_VS_TRL_STEPS", "12"))),
    # R1-VL's budget, min = max = 400,000 pixels: both sides resize each image once, with the HF processor's rule
    # (the first prompt's ids and pixels are checked equal)
    "2b": dict(prompts=2, G=4, completion=128, beta=0.01, lr=1e-5, pixels=400000, seed=42, max_prompt_length=1024,
               steps=int(os.environ.get("R1VL_VS_TRL_2B_STEPS", "4"))),
}
TRL_ARGS = ("prompts", "G", "completion", "beta", "lr", "pixels", "seed")
SETTINGS = SHAPES["tiny"]  # the learning check's
OURS = """
import json, sys
from r1vl_fast.train import main
code = main(sys.argv[2:])
peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
open(sys.argv[1], 'w').write(json.dumps({'code': code, 'peak_rss_MB': peak / 1024}))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's data and its tiny Qwen2-VL after a short SFT warm-up (so completions earn varied rewards)."""
    from r1vl_fast.config import PRESETS, SFTConfig
    from r1vl_fast.demo.models import build_demo_model, demo_processing
    from r1vl_fast.demo.shapes import write_demo_data
    from r1vl_fast.recipes import run_sft

    root = tmp_path_factory.mktemp("vs-trl")
    paths = write_demo_data(root / "data", train=256, sft=256, eval=64, seed=3)
    processing = demo_processing(3136, 3136)
    build_demo_model(processing, seed=0).save_pretrained(root / "init")
    processing.save_pretrained(root / "init")
    sft = SFTConfig(**{**PRESETS["demo"][SFTConfig], "model_name_or_path": str(root / "init"),
                       "dataset": str(paths["sft"]), "output_dir": str(root / "sft"), "max_steps": 150,
                       "report_to": "none"})
    return {"root": root, "model": run_sft(sft), **paths}


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Qwen2-VL-2B's widths, 2 + 2 blocks deep, random weights, the demo tokenizer padded to 151,936 entries."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from r1vl_fast.demo.models import build_qwen2_vl_2b_width, save_wide_tokenizer
    from r1vl_fast.demo.shapes import write_demo_data
    from r1vl_fast.processing import Processing

    root = tmp_path_factory.mktemp("vs-trl-2b")
    paths = write_demo_data(root / "data", train=64, sft=0, eval=0, seed=3)
    pixels = SHAPES["2b"]["pixels"]
    tokenizer = AutoTokenizer.from_pretrained(str(save_wide_tokenizer(root / "model")))
    processing = Processing(tokenizer, Qwen2VLImageProcessorPil(), min_pixels=pixels, max_pixels=pixels)
    build_qwen2_vl_2b_width(processing, layers=2, vision_depth=2).save_pretrained(root / "model")
    processing.save_pretrained(root / "model")
    return {"root": root, "model": root / "model", **paths}


def _ours(tiny: dict[str, Path], out: Path, steps: int, s: dict = SETTINGS) -> dict:
    args = ["--model_name_or_path", str(tiny["model"]), "--dataset", str(tiny["rl"]), "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", str(s["prompts"]),
            "--num_generations", str(s["G"]), "--gradient_accumulation_steps", "1",
            "--max_completion_length", str(s["completion"]), "--max_prompt_length", str(s["max_prompt_length"]),
            "--temperature", "1.0",
            "--top_p", "1.0", "--top_k", "0", "--beta", str(s["beta"]), "--kl_estimator", "k3", "--epsilon", "0.2",
            "--loss_type", "grpo", "--learning_rate", str(s["lr"]), "--lr_scheduler_type", "constant",
            "--max_grad_norm", "1.0", "--bf16", "false", "--device", "cpu", "--rollout_engine", "hf",
            "--min_pixels", str(s["pixels"]), "--max_pixels", str(s["pixels"]), "--seed", str(s["seed"]),
            "--save_steps", str(10 * steps), "--report_to", "none", "--log_completions_steps", str(10 * steps)]
    result = out.with_suffix(".json")
    proc = subprocess.run([sys.executable, "-c", OURS, str(result), *args], capture_output=True, text=True,
                          timeout=3600, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {"rollout": [r["time/rollout"] for r in rows], "reward": [r["time/reward"] for r in rows],
              "logprobs": [r["time/logprobs"] for r in rows], "update": [r["time/update"] for r in rows]}
    return {"step_seconds": [r["time/step"] for r in rows], "phases": phases, "rewards": [r["reward"] for r in rows],
            "peak_rss_MB": json.loads(result.read_text())["peak_rss_MB"]}


def _held_out(checkpoint: Path, eval_rows: Path, out: Path) -> dict:
    """Both trained policies scored by our evaluation CLI on the same held-out rows: 4 samples per prompt."""
    proc = subprocess.run([sys.executable, "-m", "r1vl_fast.eval", "--model_name_or_path", str(checkpoint),
                           "--dataset", str(eval_rows), "--output_dir", str(out), "--num_samples", "4",
                           "--temperature", "1.0", "--max_new_tokens", str(SETTINGS["completion"]),
                           "--min_pixels", "3136", "--max_pixels", str(SETTINGS["pixels"]), "--rollout_engine", "hf"],
                          capture_output=True, text=True, timeout=1800, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return {k: summary[k] for k in ("accuracy", "validity", "key_step_recall", "pass@4")}


def _trl(tiny: dict[str, Path], out: Path, steps: int, first_prompt: Path | None = None,
         save: Path | None = None, s: dict = SETTINGS) -> dict:
    args = [sys.executable, str(HERE / "trl_step.py"), "--model", str(tiny["model"]), "--dataset", str(tiny["rl"]),
            "--steps", str(steps), "--out", str(out.with_suffix(".json")),
            *[x for k in TRL_ARGS for x in (f"--{k}", str(s[k]))]]
    if first_prompt is not None:
        args += ["--first_prompt", str(first_prompt)]
    if save is not None:
        args += ["--save", str(save)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())


def _first_prompt_matches(tiny: dict[str, Path], trl_first: Path, s: dict) -> None:
    from PIL import Image

    from r1vl_fast.data import EpochSampler, read_rows
    from r1vl_fast.processing import Processing

    processing = Processing.from_pretrained(str(tiny["model"]), min_pixels=s["pixels"], max_pixels=s["pixels"])
    rows = [r.data for r in read_rows(tiny["rl"])]
    i = EpochSampler(len(rows), s["seed"]).take(1)[0]
    with Image.open(Path(tiny["rl"]).parent / rows[i]["image_path"]) as image:
        ours = processing.encode_prompt(rows[i]["problem"], image)
    theirs = torch.load(trl_first)
    assert ours.input_ids == theirs["input_ids"].tolist()
    assert torch.equal(ours.pixel_values, theirs["pixel_values"])


@pytest.mark.parametrize("shape", ["tiny", "2b"])
def test_step_time_against_trl(shape: str, request: pytest.FixtureRequest, tmp_path: Path, benchmark) -> None:
    if shape not in os.environ.get("R1VL_VS_TRL_SHAPES", "tiny").split(","):
        pytest.skip(f"shape {shape!r} is not in R1VL_VS_TRL_SHAPES")
    s = SHAPES[shape]
    model = request.getfixturevalue("tiny" if shape == "tiny" else "wide")
    first = tmp_path / "trl-first-prompt.pt"
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for i, who in enumerate(("ours", "trl", "trl", "ours")):  # A-B-B-A
        out = tmp_path / f"{who}-{i}"
        runs[who].append(_ours(model, out, s["steps"], s) if who == "ours"
                         else _trl(model, out, s["steps"], first, s=s))
        if i == 1:  # the same token ids and pixels went in on both sides: checked before the other two runs
            _first_prompt_matches(model, first, s)
    table = {}
    for who, results in runs.items():
        pooled = [t for r in results for t in r["step_seconds"][2:]]
        phases = {name: statistics.median([t for r in results for t in r["phases"].get(name, [])] or [0.0])
                  for name in sorted({k for r in results for k in r["phases"]})}
        table[who] = {"median_step_s": statistics.median(pooled), "steps_timed": len(pooled),
                      "peak_rss_MB": max(r["peak_rss_MB"] for r in results), "phase_medians_s": phases}
    ratio = table["ours"]["median_step_s"] / table["trl"]["median_step_s"]
    print(f"\n{shape} Qwen2-VL, {s['prompts']} prompts x G = {s['G']}, {s['completion']} tokens, {s['pixels']}-pixel "
          f"images, CPU: ours {table['ours']['median_step_s']:.3f} s/step, TRL {table['trl']['median_step_s']:.3f} "
          f"s/step: ours/TRL = {ratio:.2f} ({1 / ratio:.2f}x TRL's steps per second)")
    print(json.dumps(table, indent=1))
    benchmark.extra_info.update(shape=shape, settings=s, table=table, ratio=ratio)
    benchmark.pedantic(lambda: None, rounds=1)


def test_both_learn_the_same(tiny: dict[str, Path], tmp_path: Path, benchmark) -> None:
    steps = int(os.environ.get("R1VL_VS_TRL_LEARN_STEPS", "100"))
    if steps <= 0:
        pytest.skip("R1VL_VS_TRL_LEARN_STEPS=0")
    ours_dir, trl_dir = tmp_path / "ours-learn", tmp_path / "trl-final"
    results = {"ours": _ours(tiny, ours_dir, steps), "trl": _trl(tiny, tmp_path / "trl-learn", steps, save=trl_dir)}
    fifth = max(1, steps // 5)
    summary = {who: {"first_fifth": statistics.mean(r["rewards"][:fifth]),
                     "last_fifth": statistics.mean(r["rewards"][-fifth:])} for who, r in results.items()}
    held_out = {"start": _held_out(tiny["model"], tiny["eval"], tmp_path / "eval-start"),
                "ours": _held_out(ours_dir / f"checkpoint-{steps}", tiny["eval"], tmp_path / "eval-ours"),
                "trl": _held_out(trl_dir, tiny["eval"], tmp_path / "eval-trl")}
    print(f"\nmean training reward over {steps} steps, first fifth -> last fifth: {json.dumps(summary)}")
    print(f"held-out (python -m r1vl_fast.eval, 64 prompts x 4 samples): {json.dumps(held_out)}")
    for who in summary:
        assert summary[who]["last_fifth"] > summary[who]["first_fifth"], who
    summary["held_out"] = held_out
    benchmark.extra_info.update(summary)
    benchmark.pedantic(lambda: None, rounds=1)
