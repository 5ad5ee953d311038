"""Loading the policy (and its frozen reference) with the Auto classes, and the per-token log-probabilities of
completions under a model."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch

from r1vl_fast.distributed import World, decoder_layers, unwrap, wrap
from r1vl_fast.ops import linear_log_probs, selective_log_probs
from r1vl_fast.processing import SHARED_KEY, is_multimodal

log = logging.getLogger("r1vl_fast")


def attn_implementation(device: torch.device) -> str:
    """flash_attention_2 when flash-attn is importable on a GPU, else PyTorch SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(path: str, *, device: torch.device, dtype: torch.dtype, trainable: bool = True) -> Any:
    """A vision-language model (``AutoModelForImageTextToText``: Qwen2-VL through Qwen3.5, dense or MoE) or a causal
    LM, by its config. An MoE model's router auxiliary loss is off: the StepGRPO loss is the paper's, and no router
    logits are kept for it."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if is_multimodal(path) else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation(device))
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "output_router_logits", False):
            log.info("%s: the MoE router's auxiliary loss is off (output_router_logits set to False); the loss is "
                     "StepGRPO's alone", path)
            config.output_router_logits = False
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
        recorded = _RecordingCache(model)
        first = model(**_model_inputs(prompt), **{_cache_argument(model): recorded}, use_cache=True,
                      logits_to_keep=1, output_hidden_states=True)
        last_prompt = first.hidden_states[-1][:, -1:].repeat_interleave(group, dim=0)
        steps = completion_length - 1  # the last completion token predicts past the end: not run
        if steps <= 0:
            return last_prompt[:, :completion_length]
        if packs_completions(model):
            return torch.cat([last_prompt, _packed_completions(model, batch, prompt, recorded, group, steps)], dim=1)
        cache = _PrefixCache(model, recorded, group)
        second = _completions(model, batch, prompt, cache, group, steps)
    return torch.cat([last_prompt, second.hidden_states[-1]], dim=1)


def packs_completions(model: Any) -> bool:
    """Whether the shared layout packs each group's completions into one row (:func:`_packed_completions`)."""
    return packing_refusal(model) is None


def packing_refusal(model: Any) -> str | None:
    """Why the shared layout keeps each completion in its own padded row, or None when it packs them: every layer
    must be full attention (a linear-attention layer's state runs per sequence; a sliding window would need its own
    mask) and the attention must take a custom 4-D mask (SDPA, eager; flash-attn's varlen kernels are not wired
    yet)."""
    config = unwrap(model).config
    kinds = set(getattr(config.get_text_config(), "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention"}:
        return f"its layers are {sorted(kinds)}, and only full-attention layers are packed"
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention not in ("sdpa", "eager"):
        return f"its attention is {attention}, which takes no block mask (its varlen kernels are not wired yet)"
    return None


def _packed_completions(model: Any, batch: dict[str, torch.Tensor], prompt: dict[str, torch.Tensor], recorded: Any,
                        group: int, steps: int) -> torch.Tensor:
    """The P·G completions' hidden states [P·G, steps, H], computed padding-free within each group: the G
    completions of a prompt are laid end to end in one row, on that prompt's own keys and values (no G-fold copy),
    with a block mask (each token sees its prompt and the earlier tokens of its own completion) and each token's
    own position (its prompt's continued: n + t, shifted by the prompt's rope delta). Only the rows' ends are
    padded, to the longest group; the hidden states go back to the padded [P·G, steps] layout for the loss.
    Exact: the same numbers as the padded rows (``tests/test_share_prompt.py``)."""
    ids_in = batch["completion_input_ids"][:, :steps]
    real = batch["completion_attention_mask"][:, :steps].bool()  # [P·G, steps]
    P, W = prompt["input_ids"].shape
    device = ids_in.device
    seq = torch.arange(P * group, device=device).repeat_interleave(real.sum(1))  # each real token's completion
    owner = seq // group  # its prompt (and row)
    t = torch.arange(steps, device=device).expand_as(real)[real]  # its index within its completion
    per_row = torch.zeros(P, dtype=torch.long, device=device).index_add_(0, owner, torch.ones_like(owner))
    width = max(int(per_row.max()), 1)
    offset = torch.arange(len(seq), device=device) - (torch.cumsum(per_row, 0) - per_row)[owner]  # place in row
    ids = torch.full((P, width), int(ids_in[0, 0]) if ids_in.numel() else 0, dtype=ids_in.dtype, device=device)
    ids[owner, offset] = ids_in[real]
    # the block mask: a row's token sees its prompt (where not padding) and its own completion's earlier tokens;
    # a padding position sees only itself (its output is dropped)
    row_seq = torch.full((P, width), -1, dtype=torch.long, device=device)
    row_seq[owner, offset] = seq
    row_t = torch.zeros((P, width), dtype=torch.long, device=device)
    row_t[owner, offset] = t
    own = (row_seq[:, :, None] == row_seq[:, None, :]) & (row_t[:, :, None] >= row_t[:, None, :])
    own = (own & (row_seq[:, :, None] >= 0)) | torch.eye(width, dtype=torch.bool, device=device)
    sees_prompt = prompt["attention_mask"].bool()[:, None, :].expand(P, width, W) & (row_seq >= 0)[:, :, None]
    mask = torch.cat([sees_prompt, own], dim=2)[:, None]
    extra: dict[str, torch.Tensor] = {}
    if "mm_token_type_ids" in prompt:  # a vision-language model: its 3-D rotary positions, given explicitly
        extra["mm_token_type_ids"] = torch.zeros_like(ids, dtype=torch.int32)
        if "image_grid_thw" in prompt:  # text after the prompt: n + t, shifted by the prompt's rope delta
            rope_deltas = unwrap(model).model.rope_deltas.view(-1, 1).to(device)
            positions = prompt["attention_mask"].sum(dim=1, keepdim=True) + row_t + rope_deltas
        else:
            positions = W + row_t
        extra["position_ids"] = positions[None].expand(3, -1, -1)
    else:  # a text LM: positions continue from the left-padded prompt's width, as in the padded rows
        extra["position_ids"] = W + row_t
    cache = _cache_classes()[1](unwrap(model).config, dict(recorded.kv), {}, {})
    out = model(input_ids=ids, attention_mask=mask, **{_cache_argument(model): cache}, use_cache=True,
                logits_to_keep=1, output_hidden_states=True, **extra)
    hidden = out.hidden_states[-1]
    full = hidden.new_zeros(P * group, steps, hidden.shape[-1])
    full[real] = hidden[owner, offset]
    return full


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
    return model(input_ids=ids, attention_mask=mask, **{_cache_argument(model): cache}, use_cache=True,
                 logits_to_keep=1, output_hidden_states=True, **extra)


def _cache_argument(model: Any) -> str:
    """The name a model's forward takes its cache by: ``past_key_values`` up to transformers 5.19, ``cache`` in 5.2x
    (where the old name is deprecated)."""
    return _forward_cache_argument(type(unwrap(model)))  # type: ignore[arg-type]


@functools.cache
def _forward_cache_argument(cls: type) -> str:
    forward: Any = getattr(cls, "forward")  # noqa: B009 (a model class's forward)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing of every decoder layer, by transformers' current name for it
    (``activation_checkpointing_enable`` in 5.2x, ``gradient_checkpointing_enable`` before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@functools.cache
def _cache_classes() -> tuple[type, type]:
    """Two caches for the shared layout, over transformers' ``DynamicCache`` built from the model's config (so that a
    hybrid model gets its linear-attention layers): neither ever changes a tensor in place, so gradients flow through
    them and a recompute under gradient checkpointing sees what the forward saw. The methods overridden are the
    ones the Qwen3.5 layers call, by their names in transformers 5.19 and in 5.2x (``get_conv_state``,
    ``get_recurrent_state``, ``is_recording_past``)."""
    from transformers import DynamicCache

    class RecordingCache(DynamicCache):
        """Keeps what the prompt forward leaves in each layer, as it makes it, instead of accumulating it: the keys
        and values of an attention layer; the last ``kernel`` inputs of a linear-attention layer's causal
        convolution (its conv state) and its recurrent state."""

        def __init__(self, config: Any) -> None:
            super().__init__(config=config)
            self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            self.conv: dict[int, torch.Tensor] = {}
            self.recurrent: dict[int, torch.Tensor] = {}

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            self.kv[layer_idx] = (key_states, value_states)
            return key_states, value_states

        def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                              conv_kernel_size: int | None = None, **kwargs: Any) -> torch.Tensor:
            kernel = int(conv_kernel_size or conv_states.shape[-1])
            padded = torch.nn.functional.pad(conv_states, (max(kernel - conv_states.shape[-1], 0), 0))
            self.conv[layer_idx] = padded[..., -kernel:]
            return conv_states

        def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                                   **kwargs: Any) -> torch.Tensor:
            self.recurrent[layer_idx] = recurrent_states
            return recurrent_states

        def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
            return False

        def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> None:
            return None

        def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> None:
            return None

    class PrefixCache(DynamicCache):
        """The prompts' state, G-fold: keys and values, and the conv and recurrent states of linear-attention
        layers. The completions read it and never append to it: each layer gets the prefix and its own tokens."""

        def __init__(self, config: Any, kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
                     conv: dict[int, torch.Tensor], recurrent: dict[int, torch.Tensor]) -> None:
            super().__init__(config=config)
            for i, (k, v) in sorted(kv.items()):
                super().update(k, v, i)
            for i in sorted(conv):
                super().update_conv_state(conv[i], i, conv_kernel_size=conv[i].shape[-1])
                super().update_recurrent_state(recurrent[i], i)
                layer: Any = self.layers[i]
                layer.record_past = True  # never the single-token path, which updates the state in place

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            layer: Any = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

        def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                              **kwargs: Any) -> torch.Tensor:
            layer: Any = self.layers[layer_idx]
            return torch.cat([layer.conv_states[state_idx], conv_states], dim=-1)

        def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                                   **kwargs: Any) -> torch.Tensor:
            return recurrent_states

        def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
            return 0

    return RecordingCache, PrefixCache


def _RecordingCache(model: Any) -> Any:  # noqa: N802 (built lazily: transformers is imported on first use)
    return _cache_classes()[0](unwrap(model).config)


def _PrefixCache(model: Any, recorded: Any, group: int) -> Any:  # noqa: N802
    """The prompts' recorded state, each prompt's repeated for its G completions (``repeat_interleave``: the
    gradients of the G copies flow back and sum into the prompt's)."""
    def fork(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(group, dim=0)

    return _cache_classes()[1](
        unwrap(model).config, {i: (fork(k), fork(v)) for i, (k, v) in recorded.kv.items()},
        {i: fork(c) for i, c in recorded.conv.items()}, {i: fork(r) for i, r in recorded.recurrent.items()})


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
    """The vision encoder (with its merger, and Qwen3-VL's deepstack mergers) of a Qwen-VL family model, or None for
    a text-only one."""
    return getattr(getattr(unwrap(model), "model", None), "visual", None)


# Where another image-text family keeps its vision encoder and the projector into the text width.
VISION_PARTS = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "mm_projector")


def vision_modules(model: Any) -> list[torch.nn.Module]:
    """Every module of the vision side: Qwen's ``visual`` (encoder, merger, deepstack mergers), or another family's
    encoder and projector (Gemma 3 and LLaVA: ``vision_tower`` and ``multi_modal_projector``)."""
    return _vision_parts(getattr(unwrap(model), "model", None))


def _vision_parts(inner: Any) -> list[torch.nn.Module]:
    return [m for m in (getattr(inner, name, None) for name in VISION_PARTS) if isinstance(m, torch.nn.Module)]


def freeze_vision(model: Any) -> None:
    """``--freeze_vision``: the vision encoder, its merger and Qwen3-VL's deepstack mergers (all inside ``visual``),
    or another family's encoder and projector, keep their weights (EasyR1's freeze_vision_tower)."""
    parts = vision_modules(model)
    if not parts:
        raise ValueError("--freeze_vision: the model has no vision encoder")
    for part in parts:
        part.requires_grad_(False)


CACHED_KEYS = ("image_embeds", "image_embed_sizes", "image_deepstack", "vision_cached")


@torch.no_grad()
def embed_images(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with its pixel patches replaced by their image embeddings (``image_embeds``, and Qwen3-VL's deepstack
    features ``image_deepstack`` [layers, tokens, H]), computed once by the frozen vision encoder and reused by every
    later pass over the batch (policy, old policy, reference: a frozen encoder is the same in all three). Exact: the
    model takes them as ``mm_encoder_outputs``. A batch without images is marked ``vision_cached`` too, so that no
    later pass runs the encoder on any rank (:func:`keep_vision_in_step`)."""
    if vision_tower(model) is None:  # another family: its encoder runs in each pass, as unfrozen (the same numbers)
        return batch
    out = {k: v for k, v in batch.items() if k != "pixel_values"}
    out["vision_cached"] = torch.tensor(True)
    if "pixel_values" not in batch:
        if _vision_in_lockstep(model):
            _dummy_vision_features(unwrap(model).model)  # the ranks with images run the encoder here too
        return out
    inner = unwrap(model).model
    features = inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    out["image_embeds"] = torch.cat(features.pooler_output)
    out["image_embed_sizes"] = torch.tensor([len(f) for f in features.pooler_output])
    deepstack = getattr(features, "deepstack_features", None)
    if deepstack:
        out["image_deepstack"] = torch.stack([torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
                                              for f in deepstack])
    return out


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments a model takes for ``batch``: cached image embeddings become ``mm_encoder_outputs`` (an
    empty one for a cached batch without images: the model runs no encoder)."""
    if "vision_cached" not in batch:
        return batch
    rest = {k: v for k, v in batch.items() if k not in CACHED_KEYS}
    if "image_embeds" not in batch:
        return {**rest, "mm_encoder_outputs": {}}
    sizes = batch["image_embed_sizes"].tolist()
    embeds = torch.split(batch["image_embeds"], sizes)
    deepstack = ([torch.split(layer, sizes) for layer in batch["image_deepstack"]]
                 if "image_deepstack" in batch else None)
    return {**rest, "mm_encoder_outputs": {"image": _cached_features(embeds, deepstack)}}


def _cached_features(embeds: tuple[torch.Tensor, ...], deepstack: list[tuple[torch.Tensor, ...]] | None) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    cached = BaseModelOutputWithPooling(pooler_output=embeds)  # type: ignore[arg-type]
    if deepstack is not None:
        object.__setattr__(cached, "deepstack_features", deepstack)  # what Qwen3-VL reads beside pooler_output
    return cached


# ------------------------------------------------------------------------------------------------ mixed batches

def _vision_in_lockstep(model: Any) -> bool:
    """Whether every rank must run the vision encoder the same number of times (:func:`keep_vision_in_step`)."""
    return bool(getattr(unwrap(model), "_r1vl_vision_lockstep", False))


def _dummy_vision_features(inner: Any) -> torch.Tensor:
    """The sum of everything the vision encoder outputs (merged features, deepstack features) for the smallest image
    it takes (one merged token of zeros; another family's fixed-size image of zeros): a scalar that depends on every
    encoder parameter."""
    visual = getattr(inner, "visual", None)
    if visual is None:
        config = inner.config.vision_config
        param = next(_vision_parts(inner)[0].parameters())
        size = int(config.image_size)
        pixels = torch.zeros(1, int(getattr(config, "num_channels", 3)), size, size, dtype=param.dtype,
                             device=param.device)
        out = inner.get_image_features(pixel_values=pixels, return_dict=True)
        return sum((t.float().sum() for t in _tensors(out)), torch.zeros((), device=param.device))
    config = visual.config
    merge = int(config.spatial_merge_size)
    channels = int(getattr(config, "in_channels", getattr(config, "in_chans", 3)))
    param = next(visual.parameters())
    pixels = torch.zeros(merge * merge, channels * int(config.temporal_patch_size) * int(config.patch_size) ** 2,
                         dtype=param.dtype, device=param.device)
    out = visual(pixels, grid_thw=torch.tensor([[1, merge, merge]], device=param.device))
    return sum((t.float().sum() for t in _tensors(out)), torch.zeros((), device=param.device))


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):  # ModelOutput too
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def vision_before_generate(model: Any, batch: dict[str, torch.Tensor]) -> None:
    """Before ``generate`` on a batch without images, under torchrun: where transformers' ``generate`` runs the
    vision encoder on the other ranks' images before its first forward (Qwen3-VL; not Qwen3.5, whose model declares
    text input only, so its encoder runs inside the forward), this rank runs it on a dummy at the same point
    (:func:`keep_vision_in_step`)."""
    inner = getattr(unwrap(model), "model", None)
    if "pixel_values" in batch or not _vision_in_lockstep(model) or inner is None:
        return
    top = unwrap(model)
    supports = getattr(top, "_supports_mm_encoder_outputs", None)  # generate's own test, as it makes it
    modalities = getattr(top, "input_modalities", ())
    if supports is not None and supports() and any(m in modalities for m in ("image", "video")):
        with torch.no_grad():
            _dummy_vision_features(inner)


def wrap_model(model: Any, world: World, *, fsdp: bool, param_dtype: torch.dtype, trainable: bool = True) -> Any:
    """:func:`r1vl_fast.distributed.wrap` (DDP or FSDP2), and under torchrun a vision encoder kept in step across
    ranks whose batches differ in images (:func:`keep_vision_in_step`)."""
    wrapped = wrap(model, world, fsdp=fsdp, param_dtype=param_dtype, trainable=trainable)
    if wrapped is not model or fsdp and world.size > 1:
        keep_vision_in_step(wrapped)
    return wrapped


def keep_vision_in_step(model: Any) -> None:
    """Under torchrun, a rank whose batch has no image (text-only rows) still runs the vision encoder once per
    prefill forward, on a one-token dummy image whose features are added to the token embeddings times zero. Every
    rank then runs the encoder the same number of times, at the same point of the model's forward: FSDP2's
    all-gathers match (no hang), DDP reduces a zero gradient for the encoder, and no number changes. A forward that
    continues a cache (decoding, the shared layout's completions) or takes cached embeddings runs no encoder on any
    rank, and gets no dummy."""
    inner = getattr(unwrap(model), "model", None)
    if inner is None or not vision_modules(model):
        return
    if getattr(inner, "visual", None) is None and not (
            hasattr(inner, "get_image_features") and hasattr(getattr(inner.config, "vision_config", None),
                                                             "image_size")):
        log.warning("%s: its vision encoder is not kept in step across ranks (no fixed image size to run a dummy "
                    "at); under torchrun every rank's batch must hold images", type(inner).__name__)
        return
    unwrap(model)._r1vl_vision_lockstep = True
    pending: list[torch.Tensor] = []
    logged: list[bool] = []

    def before(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs") is not None:
            return
        cache = next((kwargs[k] for k in ("past_key_values", "cache") if kwargs.get(k) is not None), None)
        if cache is not None and cache.get_seq_length() > 0:
            return
        if not logged:
            log.info("a batch without images on this rank: the vision encoder runs on a dummy image, in "
                     "step with the other ranks (logged once)")
            logged.append(True)
        pending.append(_dummy_vision_features(module))

    def after_embedding(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not pending:
            return output
        return output + 0.0 * pending.pop().to(output.dtype)

    inner.register_forward_pre_hook(before, with_kwargs=True)
    inner.get_input_embeddings().register_forward_hook(after_embedding)


# ------------------------------------------------------------------------------------------------ speed paths

# The vision-language families whose shared layout (``--share_prompt``) is tested exact: their rotary positions,
# caches (Qwen3.5's linear-attention states) and vision features (Qwen3-VL's deepstack) are the ones handled above.
SHARED_LAYOUT_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def shared_layout_refusal(model: Any) -> str | None:
    """Why the shared layout cannot run this model exactly, or None when it can: the Qwen-VL families above, and
    text-only LMs whose layers are all full attention. Another image-text model (Gemma 3, InternVL, LLaVA-OneVision,
    GLM-4.1V, ...) has its own positions, image masks or caches; the trainer runs it in the repeated layout."""
    config = unwrap(model).config
    if getattr(config, "vision_config", None) is None:  # a text-only LM
        kinds = set(getattr(config.get_text_config(), "layer_types", None) or ["full_attention"])
        if kinds <= {"full_attention"}:
            return None
        return f"its layers are {sorted(kinds)}, and the shared layout is tested on full-attention text LMs only"
    if config.model_type in SHARED_LAYOUT_FAMILIES:
        return None
    return (f"{config.model_type} is not one of the families the shared layout is tested exact on "
            f"({', '.join(SHARED_LAYOUT_FAMILIES)})")


def fused_head_refusal(model: Any) -> str | None:
    """Why the LM head cannot be fused into the loss exactly, or None: it must be a plain linear layer whose output
    is the logits (no soft-capping, no scaling)."""
    head = unwrap(model).get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a plain linear one"
    text = unwrap(model).config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(text, name, None)
        if value not in (None, 1, 1.0):
            return f"it transforms its logits after the linear layer ({name} = {value})"
    return None


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
