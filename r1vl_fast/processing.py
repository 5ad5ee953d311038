"""Turns a problem (and its image) into model inputs: the chat prompt, the resized image's pixel patches, and
as many ``<|image_pad|>`` tokens as the vision encoder will emit for it.

Another image-text model (Gemma 3, LLaVA, InternVL, ...) is processed by its own processor (``AutoProcessor``):
its chat template, its image placeholders, its pixel inputs and its token-type ids, whatever they are; the Qwen-VL
families below take the path described next.

Images are resized once, by the Hugging Face image processor itself, from the original image with the run's pixel
budget (Qwen2-VL's rule: sides multiples of patch × merge, area within min/max pixels). The same original image and
budget go to a vLLM engine, whose processor applies the same rule, so training, rollouts and inference under
transformers see one size. The token count known at validation time comes from the same rule on the image's size.
(Resizing before the processor would resize twice, and the rule is not idempotent when min_pixels is close to
max_pixels.)
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Processor files a vLLM engine (and AutoProcessor) reads beside the model; carried into every checkpoint.
PROCESSOR_FILES = ("processor_config.json", "chat_template.json", "video_preprocessor_config.json")
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
# End-of-turn tokens, the first present being what ends a response (Qwen's, Gemma's, Llama 3's, Phi's), then EOS.
STOP_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
# The pixel budget of a resized image (R1-VL's, and Qwen2-VL's processor's): 56 × 56 up to 400k pixels.
MIN_PIXELS, MAX_PIXELS = 3136, 400000
# The families processed by the Qwen2-VL image processor's rule and ``<|image_pad|>`` expansion below.
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
# What a processor returns besides the image inputs: the token ids and masks, rebuilt per batch.
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def is_multimodal(path: str) -> bool:
    """Whether the model at ``path`` (a directory or hub id) has a vision tower, by its config."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None


@dataclass
class PromptInputs:
    """One tokenised prompt; ``pixel_values`` [patches, C·T·P·P], ``image_grid_thw`` [1, 3] and the original RGB
    ``image`` (what a vLLM engine is given, with the same budget) when it has one; ``source`` names the sample in
    errors. Another family's processor may return more image inputs (``image_sizes``, ...): ``image_inputs``,
    each concatenated over a batch's images like ``pixel_values``."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    image: Image.Image | None = None
    source: str = ""
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class EmbeddedImage:
    """An image stored as bytes in a Hugging Face dataset's column (``{"bytes", "path"}``, as its Image feature
    stores it; or the ``i``-th of a list of them), read from the memory-mapped Arrow table when needed: a dataset of
    100k embedded images is never held in memory whole."""

    def __init__(self, dataset: Any, row: int, column: str, item: int | None = None) -> None:
        self.dataset, self.row, self.column, self.item = dataset, row, column, item

    def value(self) -> Any:
        value = self.dataset[self.row][self.column]
        return value[self.item] if self.item is not None else value

    def read_bytes(self) -> bytes:
        value = self.value()
        if isinstance(value, dict) and value.get("bytes") is not None:
            return bytes(value["bytes"])
        if isinstance(value, dict) and value.get("path"):
            return Path(value["path"]).read_bytes()
        raise ValueError(f"row {self.row}: column {self.column!r} holds no image bytes")

    def __repr__(self) -> str:
        where = f"[{self.item}]" if self.item is not None else ""
        return f"EmbeddedImage(row {self.row}, column {self.column!r}{where})"


# Where a row's image is: a file, bytes in a dataset (read on demand), or an image already in memory.
ImageRef = Path | EmbeddedImage | Image.Image


def image_bytes(ref: ImageRef) -> bytes:
    """What identifies an image's content (the prompt cache's key): the file's or the stored bytes, or the pixels."""
    if isinstance(ref, Image.Image):
        return f"{ref.mode}{ref.size}".encode() + ref.tobytes()
    return ref.read_bytes()


def open_image(ref: ImageRef) -> Image.Image:
    """The image ``ref`` points to (decoded lazily by PIL; close it, or use it in a ``with``)."""
    if isinstance(ref, Image.Image):
        return ref.copy()
    if isinstance(ref, EmbeddedImage):
        return Image.open(io.BytesIO(ref.read_bytes()))
    return Image.open(ref)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides rounded to multiples of ``factor``, area brought within [min, max] pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as rule

    return rule(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


class Processing:
    """Tokenizer + (for vision-language models) Qwen2-VL image processor, with a fixed pixel budget; or, for another
    image-text family, its own ``processor`` (``AutoProcessor``) and the config's ``image_token_id``, which size
    images by their own rule (the pixel budget does not apply)."""

    def __init__(self, tokenizer: Any, image_processor: Any | None, *, min_pixels: int, max_pixels: int,
                 processor: Any | None = None, image_token_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.image_processor = processor.image_processor if processor is not None else image_processor
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        # The key of the image-position ids the model takes (Qwen's mm_token_type_ids, Gemma 3's token_type_ids).
        self.type_ids_key: str | None = "mm_token_type_ids"
        if processor is not None:
            if image_token_id is None:
                raise ValueError("another family's processor needs the config's image_token_id")
            names = list(getattr(processor, "model_input_names", ()))
            self.type_ids_key = next((k for k in ("token_type_ids", "mm_token_type_ids") if k in names), None)
        elif image_processor is not None:
            image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
            for attr in ("min_pixels", "max_pixels"):
                if hasattr(image_processor, attr):
                    setattr(image_processor, attr, min_pixels if attr == "min_pixels" else max_pixels)
            self.patch_size = int(image_processor.patch_size)
            self.merge_size = int(image_processor.merge_size)
        vocab = tokenizer.get_vocab()
        if processor is None:
            self.image_token_id = vocab.get("<|image_pad|>")
            self.vision_token_ids = [vocab[t] for t in VISION_TOKENS if t in vocab]
        else:  # the image token and the boundaries around it, where the tokenizer names them
            self.image_token_id = image_token_id
            named = [getattr(tokenizer, a, None) for a in ("boi_token", "eoi_token", "image_token", "video_token")]
            self.vision_token_ids = list(dict.fromkeys([image_token_id, *(vocab[t] for t in named if t in vocab)]))
        stops = [vocab[t] for t in STOP_TOKENS if t in vocab]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
            stops.insert(0, tokenizer.eos_token_id)
        if not stops:
            raise ValueError("the tokenizer has no end-of-sequence token (<|im_end|>, <|endoftext|> or eos_token)")
        self.stop_token_ids = stops
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
        self.source: Path | None = None  # the directory this was loaded from

    @property
    def multimodal(self) -> bool:
        return self.image_processor is not None

    @property
    def own_processor(self) -> bool:
        """Whether images go through another family's own processor (not the Qwen-VL rule)."""
        return self.processor is not None

    @classmethod
    def from_pretrained(cls, path: str, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                        multimodal: bool | None = None) -> Processing:
        """The tokenizer (and, for a vision-language model, image processor) saved at ``path``; ``multimodal``
        defaults to what the model's config says."""
        from transformers import AutoTokenizer

        if multimodal is None:
            multimodal = is_multimodal(path)
        if multimodal:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
            if config.model_type not in QWEN_VL_TYPES:
                return cls._own(path, config, min_pixels=min_pixels, max_pixels=max_pixels)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = None
        if multimodal:
            # The PIL processor needs no torchvision (absent beside the CPU torch build); same arithmetic.
            from transformers import Qwen2VLImageProcessorPil

            config = Path(path) / "preprocessor_config.json"
            kwargs: dict[str, Any] = {}
            if config.is_file():
                saved = json.loads(config.read_text())
                kwargs = {k: saved[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean",
                                                 "image_std") if k in saved}
                image_processor = Qwen2VLImageProcessorPil(**kwargs)
            else:
                image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        processing = cls(tokenizer, image_processor, min_pixels=min_pixels, max_pixels=max_pixels)
        processing.source = Path(path) if Path(path).is_dir() else None
        return processing

    @classmethod
    def _own(cls, path: str, config: Any, *, min_pixels: int, max_pixels: int) -> Processing:
        """Another image-text family: its ``AutoProcessor`` (image processor, tokenizer, chat template)."""
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        token = next((getattr(config, k) for k in ("image_token_id", "image_token_index")
                      if getattr(config, k, None) is not None), None)
        if token is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{path}: a {config.model_type} model, whose config names no image token or whose "
                             "processor has no image processor")
        processing = cls(processor.tokenizer, None, min_pixels=min_pixels, max_pixels=max_pixels,
                         processor=processor, image_token_id=int(token))
        processing.source = Path(path) if Path(path).is_dir() else None
        return processing

    def save_pretrained(self, path: str | Path) -> None:
        if self.processor is not None:
            self.processor.save_pretrained(path)
            return
        self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)
        if self.source is not None:
            for name in PROCESSOR_FILES:
                if (self.source / name).is_file() and not (Path(path) / name).exists():
                    shutil.copyfile(self.source / name, Path(path) / name)

    # ------------------------------------------------------------------------------------------------ images

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is resized to; an image the rule refuses (an aspect ratio over
        200) is a ValueError that says so."""
        try:
            h, w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        except ValueError as e:
            raise ValueError(f"a {width}x{height} image cannot be given to the model: {e}") from None
        return w, h

    def image_token_count(self, width: int, height: int) -> int:
        if self.processor is not None:  # the processor's own count
            count = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            return int(count.num_image_tokens[0])
        w, h = self.resized_size(width, height)
        return (w // self.patch_size) * (h // self.patch_size) // (self.merge_size**2)

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """The image as the processor and a vLLM engine take it: RGB, at its own size (the processor resizes it,
        once); one the rule refuses is a ValueError that names its size."""
        if self.processor is None:
            self.resized_size(*image.size)
        return image.convert("RGB")

    # ------------------------------------------------------------------------------------------------ text

    def _messages(self, problem: str, has_image: bool) -> list[dict[str, Any]]:
        if not has_image:  # plain string content: what text-only chat templates expect
            return [{"role": "user", "content": problem}]
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem}]}]

    def chat_text(self, problem: str, has_image: bool) -> str:
        """The prompt through the chat template (the processor's, for another family), the assistant's turn open."""
        messages = self._messages(problem, has_image)
        owner = self.processor if self.processor is not None and self.processor.chat_template else self.tokenizer
        if owner.chat_template:
            return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return problem

    def prompt_ids(self, problem: str, image_tokens: int | None,
                   image_size: tuple[int, int] | None = None) -> list[int]:
        """Token ids of the chat prompt, each image placeholder expanded to ``image_tokens`` pad tokens; for another
        family, as its processor expands them for an image of ``image_size`` (width, height): a blank one."""
        has_image = image_tokens is not None
        if has_image and not self.multimodal:
            raise ValueError("a row has an image but the model is text-only")
        if has_image and self.processor is not None:
            if image_size is None:
                raise ValueError("another family's prompt length needs the image's size")
            return self.encode_prompt(problem, Image.new("RGB", image_size)).input_ids
        ids = self.tokenizer(self.chat_text(problem, has_image), add_special_tokens=False).input_ids
        if image_tokens is not None:
            at = ids.index(self.image_token_id)
            ids = ids[:at] + [self.image_token_id] * image_tokens + ids[at + 1:]
        return ids

    def encode_prompt(self, problem: str, image: Image.Image | None) -> PromptInputs:
        if image is None:
            return PromptInputs(self.prompt_ids(problem, None))
        if self.image_processor is None:
            raise ValueError("a row has an image but the model is text-only")
        image = self.prepare_image(image)
        if self.processor is not None:  # the family's own placeholders and image inputs
            out = self.processor(text=[self.chat_text(problem, True)], images=[[image]], return_tensors="pt",
                                 add_special_tokens=False)
            extra = {k: v for k, v in out.items() if k not in TEXT_KEYS and k != "pixel_values"}
            return PromptInputs(out["input_ids"][0].tolist(), out["pixel_values"], None, image, image_inputs=extra)
        out = self.image_processor(images=[image], return_tensors="pt")  # resized once, here, by HF's rule
        grid = out["image_grid_thw"]
        tokens = int(grid.prod()) // (self.merge_size**2)
        return PromptInputs(self.prompt_ids(problem, tokens), out["pixel_values"], grid, image)

    def encode_response(self, text: str) -> list[int]:
        """A response's ids as the model should produce them: the text, then the end-of-turn token."""
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.stop_token_ids[0]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def batch_inputs(
    processing: Processing, prompts: list[PromptInputs], responses: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Model inputs for prompts (left-padded) optionally followed by responses (right-padded to a common length).

    Vision-language models also get the concatenated pixel patches, ``image_grid_thw`` and ``mm_token_type_ids``.
    """
    width = max(len(p.input_ids) for p in prompts)
    resp_width = max((len(r) for r in responses), default=0) if responses is not None else 0
    ids = torch.full((len(prompts), width + resp_width), processing.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[i, width - n: width] = torch.tensor(p.input_ids)
        attention[i, width - n: width] = 1
        if responses is not None:
            r = responses[i]
            ids[i, width: width + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, width: width + len(r)] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": attention.to(device)}
    if processing.multimodal:
        pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
        grids = [p.image_grid_thw for p in prompts if p.image_grid_thw is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels).to(device)
            if grids:
                batch["image_grid_thw"] = torch.cat(grids).to(device)
            for key in dict.fromkeys(k for p in prompts for k in p.image_inputs):
                batch[key] = torch.cat([p.image_inputs[key] for p in prompts if key in p.image_inputs]).to(device)
        if processing.type_ids_key is not None:
            batch[processing.type_ids_key] = (batch["input_ids"] == processing.image_token_id).to(
                torch.int32 if processing.type_ids_key == "mm_token_type_ids" else torch.long)
    return batch


SHARED_KEY = "completion_input_ids"  # marks a batch whose prompts run once per group


def shared_inputs(
    processing: Processing, prompts: list[PromptInputs], responses: list[list[int]], group_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Model inputs with each prompt once: the P ``prompts`` (left-padded, with their images) and the P·G
    ``responses`` (right-padded; G = ``group_size`` consecutive responses per prompt) apart, for
    :func:`r1vl_fast.modeling.shared_completion_hidden`. The same tokens as :func:`batch_inputs` on the prompts
    repeated G times, whose prompt columns are these."""
    if len(responses) != len(prompts) * group_size:
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x G = {group_size}")
    batch = batch_inputs(processing, prompts, device=device)
    width = max((len(r) for r in responses), default=0)
    ids = torch.full((len(responses), width), processing.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, r in enumerate(responses):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, :len(r)] = 1
    return {**batch, SHARED_KEY: ids.to(device), "completion_attention_mask": attention.to(device),
            "group_size": torch.tensor(group_size)}


class PromptCache:
    """Each distinct (problem, image) turned into model inputs once per run: the RGB image, its pixel patches,
    ``image_grid_thw`` and the prompt's token ids, keyed by the image's content hash (a file's bytes, or a dataset's
    embedded bytes) and the pixel budget. Rollouts and training take the same ``PromptInputs``, so the engine and
    the trainer cannot disagree on an image's token count. Beyond ``max_bytes`` of pixel patches and images in
    memory, the least recently used entries move to ``spill_dir`` (one file each, read back memory-mapped), or are
    dropped without one. ``images_processed`` counts the images actually decoded and processed."""

    def __init__(self, processing: Processing, max_bytes: int = 1 << 30, spill_dir: Path | None = None) -> None:
        self.processing, self.max_bytes, self.spill_dir = processing, max_bytes, spill_dir
        self._entries: OrderedDict[str, PromptInputs] = OrderedDict()
        self._spilled: dict[str, Path] = {}
        self._bytes = 0
        self.images_processed = 0

    def _key(self, problem: str, image: ImageRef | None) -> str:
        h = hashlib.sha1(problem.encode())
        if image is not None:
            h.update(image_bytes(image))
            h.update(f"{self.processing.min_pixels}/{self.processing.max_pixels}".encode())
        return h.hexdigest()

    @staticmethod
    def _size(inputs: PromptInputs) -> int:
        if inputs.pixel_values is None:
            return 0
        image = inputs.image.size[0] * inputs.image.size[1] * 3 if inputs.image is not None else 0
        return inputs.pixel_values.numel() * inputs.pixel_values.element_size() + image

    def get(self, problem: str, image: ImageRef | None) -> PromptInputs:
        key = self._key(problem, image)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        if key in self._spilled:
            inputs = self._load(self._spilled[key])
        elif image is None:
            inputs = self.processing.encode_prompt(problem, None)
        else:
            with open_image(image) as im:
                inputs = self.processing.encode_prompt(problem, im)
            self.images_processed += 1
        self._entries[key] = inputs
        self._bytes += self._size(inputs)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            old_key, old = self._entries.popitem(last=False)
            self._bytes -= self._size(old)
            if self.spill_dir is not None and old.pixel_values is not None and old_key not in self._spilled:
                self._spilled[old_key] = self._save(old_key, old)
        return inputs

    def _save(self, key: str, inputs: PromptInputs) -> Path:
        assert self.spill_dir is not None and inputs.image is not None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{key}.pt"
        torch.save({"input_ids": torch.tensor(inputs.input_ids), "pixel_values": inputs.pixel_values,
                    "image_grid_thw": inputs.image_grid_thw, "image_inputs": inputs.image_inputs,
                    "image": torch.from_numpy(np.asarray(inputs.image.convert("RGB")).copy())}, path)
        return path

    @staticmethod
    def _load(path: Path) -> PromptInputs:
        saved = torch.load(path, mmap=True, weights_only=True)
        return PromptInputs(saved["input_ids"].tolist(), saved["pixel_values"], saved["image_grid_thw"],
                            Image.fromarray(saved["image"].numpy()), image_inputs=saved.get("image_inputs", {}))
