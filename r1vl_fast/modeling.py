"""Loading the policy (and its frozen reference) with the Auto classes, and the per-token log-probabilities of
completions under a model."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from r1vl_fast.distributed import decoder_layers, unwrap
from r1vl_fast.ops import linear_log_probs, selective_log_probs
from r1vl_fast.processing import SHARED_KEY, is_multimodal


def attn_implementation(device: torch.device) -> str:
    """flash_attention_2 when flash-attn is importable on a GPU, else PyTorch SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(path: str, *, device: torch.device, dtype: torch.dtype, trainable: bool = True) -> Any:
    """A vision-language model (Qwen2-VL, Qwen2.5-VL) or a causal LM, by its config."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if is_multimodal(path) else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(device))
    model = model.to(device)  # type: ignore[arg-type]
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def completion_logits(model: Any, batch: dict[str, torch.Tensor], completion_length: int) -> torch.Tensor:
    """Logits [B, T + 1, V] as the model computes them for the last T = ``completion_length`` tokens of
    ``batch['input_ids']``: position t predicts completion token t, the last position predicts past the end. The
    loss takes this buffer as it is (``grpo_loss(..., last_position_unused=True)``): a slice would make autograd
    copy its gradient into a zeroed buffer of the full size."""
    return model(**_model_inputs(batch), use_cache=False, logits_to_keep=completion_length + 1).logits


def completion_hidden(model: Any, batch: dict[str, torch.Tensor], completion_length: int) -> torch.Tensor:
    """The final hidden states [B, T, H] (after the last norm) of the positions that predict the last T =
    ``completion_length`` tokens of ``batch['input_ids']``: what the LM head would turn into logits. The model runs
    through its wrapper (DDP and FSDP2 see a normal forward); it forms logits for one position only. A batch from
    :func:`r1vl_fast.processing.shared_inputs` runs each prompt once (:func:`shared_completion_hidden`)."""
    if SHARED_KEY in batch:
        return shared_completion_hidden(model, batch, completion_length)
    out = model(**_model_inputs(batch), use_cache=False, logits_to_keep=1, output_hidden_states=True)
    return out.hidden_states[-1][:, -completion_length - 1:-1]


def shared_completion_hidden(model: Any, batch: dict[str, torch.Tensor], completion_length: int) -> torch.Tensor:
    """:func:`completion_hidden` with each prompt (and its image) run once for its G completions.

    The P prompts run first, with a KV cache (the vision encoder sees each image once); each layer's keys and
    values are repeated G times (``repeat_interleave``: gradients flow back and sum over the group) and the P·G
    completions run on top of them. Qwen2-VL's 3-D rotary positions continue as in the repeated layout: text
    positions n + t shifted by each prompt's rope delta. The hidden state that predicts a completion's first token
    is its prompt's last, shared by the group. Exact: the same hidden states, hence log-probs and gradients, as the
    repeated layout (``tests/test_share_prompt.py``)."""
    group = int(batch["group_size"])
    prompt = {k: v for k, v in batch.items() if not k.startswith("completion_") and k != "group_size"}
    with _checkpoint_with_cache(model):
        recorded = _RecordingCache()
        first = model(**_model_inputs(prompt), past_key_values=recorded, use_cache=True, logits_to_keep=1,
                      output_hidden_states=True)
        last_prompt = first.hidden_states[-1][:, -1:].repeat_interleave(group, dim=0)
        steps = completion_length - 1  # the last completion token predicts past the end: not run
        if steps <= 0:
            return last_prompt[:, :completion_length]
        cache = _PrefixCache([(k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0))
                              for k, v in (recorded.kv[i] for i in sorted(recorded.kv))])
        second = _completions(model, batch, prompt, cache, group, steps)
    return torch.cat([last_prompt, second.hidden_states[-1]], dim=1)


def _completions(model: Any, batch: dict[str, torch.Tensor], prompt: dict[str, torch.Tensor], cache: Any,
                 group: int, steps: int) -> Any:
    """The P·G completions' forward on the prompts' repeated keys and values."""
    ids = batch["completion_input_ids"][:, :steps]
    mask = torch.cat([prompt["attention_mask"].repeat_interleave(group, dim=0),
                      batch["completion_attention_mask"][:, :steps]], dim=1)
    extra: dict[str, torch.Tensor] = {}
    if "mm_token_type_ids" in prompt:  # a vision-language model: its 3-D rotary positions, given explicitly
        extra["mm_token_type_ids"] = torch.zeros_like(ids, dtype=torch.int32)
        if "image_grid_thw" in prompt:  # text after the prompt: n + t, shifted by the prompt's rope delta
            rope_deltas = unwrap(model).model.rope_deltas  # computed by the first forward, from its images
            start = prompt["attention_mask"].sum(dim=1, keepdim=True)
            positions = (start + torch.arange(steps, device=ids.device)) + rope_deltas.to(ids.device)
        else:  # no image in the batch: plain positions, as the repeated layout gets
            width = prompt["input_ids"].shape[1]
            positions = (width + torch.arange(steps, device=ids.device)).expand(prompt["input_ids"].shape[0], -1)
        extra["position_ids"] = positions.repeat_interleave(group, dim=0)[None].expand(3, -1, -1)
    return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1,
                 output_hidden_states=True, **extra)


@functools.cache
def _cache_classes() -> tuple[type, type]:
    from transformers import DynamicCache

    class RecordingCache(DynamicCache):
        """Keeps each layer's keys and values as the prompt forward makes them (a recompute under gradient
        checkpointing overwrites them with equal ones) instead of accumulating them."""

        def __init__(self) -> None:
            super().__init__()
            self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.kv[layer_idx] = (key_states, value_states)
            return key_states, value_states

    class PrefixCache(DynamicCache):
        """The prompts' keys and values, G-fold, read by the completions' attention and never appended to, so that
        a recompute under gradient checkpointing sees the same cache as the forward did."""

        def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            super().__init__()
            for i, (k, v) in enumerate(prefix):
                super().update(k, v, i)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            layer: Any = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    return RecordingCache, PrefixCache


def _RecordingCache() -> Any:  # noqa: N802 (built lazily: transformers is imported on first use)
    return _cache_classes()[0]()


def _PrefixCache(prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:  # noqa: N802
    return _cache_classes()[1](prefix)


@contextlib.contextmanager
def _checkpoint_with_cache(model: Any) -> Iterator[None]:
    """Let transformers' gradient-checkpointed decoder layers keep the caches above (their default drops any
    cache, since an appending one would grow again on recompute; these two do not append)."""

    layers = decoder_layers(unwrap(model))
    saved = [layer.__dict__.get("_can_checkpoint_with_cache") for layer in layers]
    for layer in layers:
        setattr(layer, "_can_checkpoint_with_cache", True)  # noqa: B010 (an instance attribute nn.Module types)
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            if value is None:
                layer.__dict__.pop("_can_checkpoint_with_cache", None)
            else:
                setattr(layer, "_can_checkpoint_with_cache", value)  # noqa: B010


def vision_tower(model: Any) -> Any | None:
    """The vision encoder (with its merger) of a Qwen2-VL / Qwen2.5-VL model, or None for a text-only one."""
    return getattr(getattr(unwrap(model), "model", None), "visual", None)


def freeze_vision(model: Any) -> None:
    """``--freeze_vision``: the vision encoder and its merger keep their weights (EasyR1's freeze_vision_tower)."""
    visual = vision_tower(model)
    if visual is None:
        raise ValueError("--freeze_vision: the model has no vision encoder")
    visual.requires_grad_(False)


@torch.no_grad()
def embed_images(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with its pixel patches replaced by their image embeddings (``image_embeds``), computed once by the
    frozen vision encoder and reused by every later pass over the batch (policy, old policy, reference: a frozen
    encoder is the same in all three). Exact: the model takes them as ``mm_encoder_outputs``."""
    if "pixel_values" not in batch:
        return batch
    inner = unwrap(model).model
    features = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    out = {k: v for k, v in batch.items() if k != "pixel_values"}
    out["image_embeds"] = torch.cat(features.pooler_output)
    out["image_embed_sizes"] = torch.tensor([len(f) for f in features.pooler_output])
    return out


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments a model takes for ``batch``: cached image embeddings become ``mm_encoder_outputs``."""
    if "image_embeds" not in batch:
        return batch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    embeds = torch.split(batch["image_embeds"], batch["image_embed_sizes"].tolist())
    rest = {k: v for k, v in batch.items() if k not in ("image_embeds", "image_embed_sizes")}
    cached = BaseModelOutputWithPooling(pooler_output=embeds)  # type: ignore[arg-type]
    return {**rest, "mm_encoder_outputs": {"image": cached}}


def lm_head(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight [V, H], bias [V] or None), tied to the embedding or not. Call it right after a forward
    (:func:`completion_hidden`): under FSDP2 the root module then still holds its parameters gathered, so the
    head's gradient joins the embedding's in FSDP2's own reduce-scatter. A sharded weight outside a forward is
    gathered for a no-grad use only (the gradient of ``full_tensor`` would not be summed over ranks)."""
    from torch.distributed.tensor import DTensor

    head = unwrap(model).get_output_embeddings()
    params = [head.weight, getattr(head, "bias", None)]
    for i, x in enumerate(params):
        if isinstance(x, DTensor):
            if torch.is_grad_enabled() and x.requires_grad:
                raise RuntimeError("lm_head: the FSDP2 root is resharded; call it right after the model's forward")
            params[i] = x.full_tensor()
    return params[0], params[1]  # type: ignore[return-value]


@torch.no_grad()
def completion_log_probs(
    model: Any, batch: dict[str, torch.Tensor], completion_ids: torch.Tensor, temperature: float, impl: str = "auto",
    fused_lm_head: bool = True,
) -> torch.Tensor:
    """fp32 log-probs [B, T] of the completion tokens (the no-grad path: old and reference policies). With
    ``fused_lm_head`` no logits tensor is formed (``linear_log_probs``); else the logits are read once."""
    if fused_lm_head:
        hidden = completion_hidden(model, batch, completion_ids.shape[1])
        weight, bias = lm_head(model)  # after the forward (FSDP2, see lm_head)
        return linear_log_probs(hidden, weight, completion_ids, temperature=temperature, bias=bias)  # type: ignore[return-value]
    logits = completion_logits(model, batch, completion_ids.shape[1])[:, :-1]  # a view: read once, nothing copied
    return selective_log_probs(logits, completion_ids, temperature=temperature, validate=False,  # type: ignore[return-value]
                               impl=impl)
