"""Images are sized once, as Hugging Face's image processor sizes them (issue 27, item 4).

Over 200+ image sizes (tiny, extreme aspect ratios, exactly on and just off a budget) under several pixel budgets,
min_pixels = max_pixels among them, the token count and ``image_grid_thw`` that training uses equal what
``AutoImageProcessor`` gives for the original image, and so do the pixel values (random content, a subset). Qwen2-VL
and Qwen2.5-VL share this image processor (``Qwen2VLImageProcessor``), so one sweep covers both. What a vLLM engine is
given (the original image, with the run's budget) processes to the same count. An image the rule
refuses is a named error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r1vl_fast.data import load_rl_dataset
from r1vl_fast.demo.models import demo_processing
from r1vl_fast.errors import DataError
from r1vl_fast.processing import smart_resize

BUDGETS = [(3136, 400000), (401408, 401408), (200704, 200704), (3136, 3136), (12544, 50176)]


def _sizes() -> list[tuple[int, int]]:
    sizes = [(w, h) for w in (2, 7, 27, 28, 29, 55, 56, 57) for h in (2, 28, 29, 57)]  # tiny, around one patch
    sizes += [(28 * 199, 28), (28, 28 * 199), (3, 599), (599, 3), (50, 9999), (9999, 50), (1, 199)]  # extreme
    for area in (400000, 401408, 200704, 3136, 50176, 12544):  # exactly on a budget, and just off it
        for w in (56, 448, 616, 633, 1000):
            h = max(1, area // w)
            sizes += [(w, h), (w, h + 1), (w, max(1, h - 1))]
    rng = np.random.default_rng(0)
    sizes += [(int(w), int(h)) for w, h in rng.integers(8, 2600, size=(80, 2))]
    sizes += [(640, 480), (2048, 1536), (1920, 1080), (1080, 1920), (4000, 3000), (224, 224), (336, 336)]
    return sorted(set(sizes))


SIZES = _sizes()


@pytest.fixture(scope="module")
def hf_processor(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoImageProcessor

    path = tmp_path_factory.mktemp("processor")
    demo_processing(3136, 400000).save_pretrained(path)
    return AutoImageProcessor.from_pretrained(path)


def test_the_sweep_is_wide() -> None:
    assert len(SIZES) >= 200
    ratios = [max(w, h) / min(w, h) for w, h in SIZES]
    assert max(ratios) > 190 and min(min(s) for s in SIZES) <= 2


@pytest.mark.parametrize("budget", BUDGETS, ids=[f"{a}-{b}" for a, b in BUDGETS])
def test_token_counts_and_grids_equal_the_hf_processors(hf_processor, budget: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    min_pixels, max_pixels = budget
    processing = demo_processing(min_pixels, max_pixels)
    twice = 0
    for i, (w, h) in enumerate(SIZES):
        image = Image.new("RGB", (w, h), (120, 30, 200))
        try:
            want = hf_processor(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                 return_tensors="pt")
        except ValueError as e:  # the rule refuses it (aspect ratio over 200): so must we, by name
            with pytest.raises(ValueError, match=rf"a {w}x{h} image cannot be given to the model"):
                processing.image_token_count(w, h)
            assert "aspect ratio" in str(e)
            continue
        tokens = int(want["image_grid_thw"].prod()) // 4
        assert processing.image_token_count(w, h) == tokens, (w, h)  # what validation and the prompt ids use
        assert processing.prompt_ids("How many?", tokens).count(processing.image_token_id) == tokens
        if i % 4 == 0:  # the whole prompt, on every 4th size (the processor call is the same one)
            inputs = processing.encode_prompt("How many?", image)
            assert torch.equal(inputs.image_grid_thw, want["image_grid_thw"]), (w, h)
            assert inputs.input_ids.count(processing.image_token_id) == tokens, (w, h)
            assert inputs.pixel_values.shape == want["pixel_values"].shape, (w, h)
            # what a vLLM engine is given: the original image, which its processor resizes with the same budget
            assert inputs.image is not None and inputs.image.size == (w, h)
        # the old way, resizing the resized image again with the run's budget, disagrees on some sizes
        rh, rw = smart_resize(h, w, 28, min_pixels, max_pixels)
        try:
            twice += smart_resize(rh, rw, 28, min_pixels, max_pixels) != (rh, rw)
        except ValueError:  # the resized image of an extreme aspect ratio is refused outright
            twice += 1
    if min_pixels == max_pixels and min_pixels > 3136:
        assert twice > 0  # the sweep holds the sizes where resizing twice went wrong


@pytest.mark.parametrize("budget", [(401408, 401408), (3136, 400000), (12544, 50176)])
def test_pixel_values_equal_the_hf_processors(hf_processor, budget: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    min_pixels, max_pixels = budget
    processing = demo_processing(min_pixels, max_pixels)
    rng = np.random.default_rng(1)
    for w, h in SIZES[::6]:
        if max(w, h) / min(w, h) > 200:
            continue
        image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        want = hf_processor(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
                                 return_tensors="pt")
        got = processing.encode_prompt("How many?", image)
        assert torch.equal(got.pixel_values, want["pixel_values"]), (w, h)


def test_an_image_the_model_cannot_take_is_a_named_error(tmp_path: Path) -> None:
    Image.new("RGB", (1, 250), (0, 0, 0)).save(tmp_path / "thin.png")
    row = {"problem": "How many?", "solution": "The final answer is: 1", "key_steps": {"Steps": []},
           "image_path": "thin.png"}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps({**row, "image_path": None}) + "\n")
    processing = demo_processing(3136, 3136)
    with pytest.raises(DataError, match=rf"{data}:1: sample 0: field 'image_path': {tmp_path / 'thin.png'}: a 1x250 "
                                        r"image cannot be given to the model: .*aspect ratio"):
        load_rl_dataset(data, processing, max_prompt_length=64)
    samples, report = load_rl_dataset(data, processing, max_prompt_length=64, skip_invalid=True)
    assert len(samples) == 1 and report.skipped["invalid rows"] == 1
