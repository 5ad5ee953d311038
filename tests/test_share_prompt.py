"""Each prompt once per group (``--share_prompt``, the default) is exact: for the tiny Qwen2-VL, a tiny Qwen2.5-VL
and a text-only LM, with left padding, prompts (and images) of different sizes in one batch and ragged
completions, the shared layout gives the repeated layout's per-token log-probs, loss and every parameter's
gradient; and the trainer takes the same steps with it (old and reference log-probs, mu = 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_trainer import TIME_KEYS, _config
from test_trainer import _args as trainer_args

from r1vl_fast.demo.models import build_demo_model, demo_processing, save_tiny_lm
from r1vl_fast.modeling import completion_hidden, enable_gradient_checkpointing, lm_head, load_model
from r1vl_fast.ops import GRPOConfig, linear_grpo_loss
from r1vl_fast.processing import Processing, batch_inputs, shared_inputs
from r1vl_fast.recipes import run_grpo

G = 3
# benches/gpu_check.sh runs the layout-parity test on the GPU too (fp32, SDPA): R1VL_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("R1VL_TEST_DEVICE", "cpu"))


def _model(kind: str, tmp_path: Path) -> tuple[torch.nn.Module, Processing]:
    if kind == "text":
        path = save_tiny_lm(tmp_path / "lm", seed=1)
        return load_model(str(path), device=torch.device("cpu"), dtype=torch.float32), Processing.from_pretrained(
            str(path))
    processing = demo_processing(3136, 4 * 3136, arch=kind)
    model = build_demo_model(processing, seed=1, arch=kind)
    return model.train(), processing


def _prompts(processing: Processing, mixed: bool = False) -> list:
    """Prompts of different lengths; images of different sizes; ``mixed``: a text-only prompt among them."""
    if mixed:
        return [*_prompts(processing)[:2], processing.encode_prompt("What is 3 + 4, in one word?", None)]
    if not processing.multimodal:
        return [processing.encode_prompt(q, None) for q in ("What is 3 + 4?", "Name the shape with three sides, "
                                                            "please, in one word.")]
    return [processing.encode_prompt("How many shapes?", Image.new("RGB", (56, 56), (200, 30, 30))),
            processing.encode_prompt("Which colour is the large one, and how many are there?",
                                     Image.new("RGB", (112, 56), (30, 200, 30))),
            processing.encode_prompt("Is there a circle?", Image.new("RGB", (56, 112), (30, 30, 200)))]


def _loss(model: torch.nn.Module, batch: dict, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    hidden = completion_hidden(model, batch, ids.shape[1])
    weight, bias = lm_head(model)
    rewards = torch.linspace(0, 1, ids.shape[0], device=ids.device)
    return linear_grpo_loss(hidden, weight, ids, mask, config=GRPOConfig(beta=0.0, group_size=G), rewards=rewards,
                            bias=bias)


FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe"]


@pytest.mark.parametrize("kind, checkpointing, mixed", [
    *((kind, False, False) for kind in [*FAMILIES, "text"]),
    *((kind, True, False) for kind in ("qwen2-vl", "qwen3-vl", "qwen3.5", "text")),
    *((kind, False, True) for kind in ("qwen2-vl", "qwen3-vl", "qwen3.5")),
])
def test_shared_prompts_give_the_repeated_layouts_log_probs_and_gradients(kind: str, checkpointing: bool, mixed: bool,
                                                                         tmp_path: Path) -> None:
    """Every family: Qwen3-VL's deepstack features enter in the prompt pass; Qwen3.5's linear-attention layers
    hand their convolution and recurrent states from the prompt to the G completions, and gradients flow back
    through the forked states. With gradient checkpointing too (the shared layout's caches never change, so a
    recompute sees what the forward saw), and with a text-only prompt among image prompts (``mixed``)."""
    model, processing = _model(kind, tmp_path)
    model.to(DEVICE)
    if checkpointing:
        enable_gradient_checkpointing(model)
    prompts = _prompts(processing, mixed)
    g = torch.Generator().manual_seed(0)
    vocab = len(processing.tokenizer)
    lengths = torch.randint(1, 7, (len(prompts) * G,), generator=g).tolist()
    responses = [torch.randint(0, vocab - 20, (n,), generator=g).tolist() for n in lengths]
    responses = [[t for t in r if t not in processing.vision_token_ids] or [1] for r in responses]
    width = max(len(r) for r in responses)
    ids = torch.zeros(len(responses), width, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, r in enumerate(responses):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True

    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    repeated = batch_inputs(processing, [p for p in prompts for _ in range(G)], responses, device=DEVICE)
    shared = shared_inputs(processing, prompts, responses, G, device=DEVICE)
    assert shared["input_ids"].shape[0] == len(prompts)  # the prompts (and images) once
    results = []
    for batch in (repeated, shared):
        model.zero_grad()
        loss, metrics = _loss(model, batch, ids, mask)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), metrics["logp"], grads))
    (loss_r, logp_r, grads_r), (loss_s, logp_s, grads_s) = results
    torch.testing.assert_close(logp_s[mask], logp_r[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_s, loss_r, rtol=1e-5, atol=1e-7)
    assert grads_s.keys() == grads_r.keys() and len(grads_r) > 10
    for name, grad in grads_r.items():
        err = float((grads_s[name] - grad).norm()) / max(float(grad.norm()), 1e-12)
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_the_trainer_takes_the_same_steps_with_shared_prompts(tiny: dict[str, Path], tmp_path: Path,
                                                              checkpointing: str) -> None:
    """mu = 2 (old log-probs, a reused rollout buffer) and beta > 0 (reference log-probs), both layouts, with and
    without gradient checkpointing."""
    runs = {}
    for share in ("true", "false"):
        out = tmp_path / share
        run_grpo(_config(trainer_args(tiny, out, max_steps=4, num_iterations=2, save_steps=1, num_generations=4,
                                      per_device_train_batch_size=2, gradient_accumulation_steps=1,
                                      share_prompt=share, gradient_checkpointing=checkpointing)))
        runs[share] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert json.loads((out / "config.json").read_text())["share_prompt"] is (share == "true")
    assert all(m["grad_norm"] > 0 for m in runs["true"])
    for a, b in zip(runs["true"], runs["false"]):
        # the same step; what the layout computes (its padding, its token budget's split) is its own
        for key in set(a) - set(TIME_KEYS) - {"time/total", "step_time", "padding_fraction", "micro_batches"}:
            if isinstance(a[key], float) and not key.startswith("time"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_each_image_is_processed_once_per_run(tiny: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rows with odd-sized images, two epochs: each image is decoded, resized and patchified once, and the
    token count the rollouts and the update see is the one validation counted."""
    rows = [json.loads(line) for line in Path(tiny["rl"]).read_text().splitlines()[:3]]
    for row, size in zip(rows, ((57, 83), (130, 61), (91, 90))):
        image = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (size[0], size[1], 90)).save(image)
        row["image_path"] = image.name
    data = tmp_path / "odd.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls: list[tuple[int, int, int]] = []
    real = Processing.encode_prompt

    def counted(self: Processing, problem: str, image: Image.Image | None):  # type: ignore[no-untyped-def]
        out = real(self, problem, image)
        if image is not None:  # (width, height) on disk, image tokens in the prompt, tokens the patches make
            calls.append((self.image_token_count(*image.size),
                          out.input_ids.count(self.image_token_id),
                          int(out.image_grid_thw.prod()) // self.merge_size**2))
        return out

    monkeypatch.setattr(Processing, "encode_prompt", counted)
    run_grpo(_config(trainer_args(tiny, tmp_path / "run", dataset=data, max_steps=3, per_device_train_batch_size=2,
                                  num_generations=2, gradient_accumulation_steps=1, max_pixels=4 * 3136,
                                  max_prompt_length=128, save_steps=10)))
    assert len(calls) == 3  # 6 prompts over 2 epochs, 3 distinct images
    assert all(a == b == c for a, b, c in calls), calls


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5"])
def test_frozen_vision_embeddings_are_computed_once_and_reused_exactly(kind: str, tmp_path: Path) -> None:
    """--freeze_vision: the image embeddings of a batch (with Qwen3-VL's deepstack features), computed once, give
    every later pass the hidden states that the pixels give, in both layouts, without running the vision encoder
    again; the deepstack mergers are frozen with the rest of the encoder."""
    from r1vl_fast.modeling import embed_images, freeze_vision, vision_tower

    model, processing = _model(kind, tmp_path)
    freeze_vision(model)
    prompts = _prompts(processing)
    words = processing.tokenizer.encode("three red squares and a circle", add_special_tokens=False)
    responses = [words[i % 3: i % 3 + 1 + i % 3] for i in range(len(prompts) * G)]
    calls = []
    vision_tower(model).register_forward_hook(lambda *_: calls.append(1))
    for batch in (batch_inputs(processing, [p for p in prompts for _ in range(G)], responses),
                  shared_inputs(processing, prompts, responses, G)):
        want = completion_hidden(model, batch, 3)
        cached = embed_images(model, batch)
        assert "pixel_values" not in cached and len(calls) == 2  # the pixels' pass, then the one embedding
        assert ("image_deepstack" in cached) == (kind == "qwen3-vl")  # one [tokens, H] feature per deepstack layer
        calls.clear()
        for _ in range(2):  # e.g. the old-policy pass, then the update
            torch.testing.assert_close(completion_hidden(model, cached, 3), want, rtol=1e-6, atol=1e-6)
        assert not calls
    assert not any(p.requires_grad for p in vision_tower(model).parameters())
    if kind == "qwen3-vl":
        mergers = [n for n, p in model.named_parameters() if "deepstack_merger" in n]
        assert mergers and not any(p.requires_grad for n, p in model.named_parameters() if n in mergers)


def test_the_trainer_with_a_frozen_vision_encoder(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "frozen"
    run_grpo(_config(trainer_args(tiny, out, max_steps=2, num_iterations=2, save_steps=2, freeze_vision="true")))
    before = load_file(str(Path(tiny["model"]) / "model.safetensors"))
    after = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    visual = [k for k in before if ".visual." in k or k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in visual)  # the rest trained


def test_the_prompt_cache_spills_to_disk_and_never_processes_an_image_twice(tmp_path: Path) -> None:
    from r1vl_fast.processing import PromptCache

    processing = demo_processing(3136, 4 * 3136)
    images = []
    for i, size in enumerate(((57, 83), (130, 61))):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", size, (9 * i, 90, 200)).save(images[-1])
    copy = tmp_path / "copy.png"
    copy.write_bytes(images[0].read_bytes())  # the same content under another name
    cache = PromptCache(processing, max_bytes=1, spill_dir=tmp_path / "spill")  # one entry in memory at a time
    first = cache.get("How many?", images[0])
    cache.get("How many?", images[1])  # evicts the first to disk
    assert len(list((tmp_path / "spill").glob("*.pt"))) == 1
    again = cache.get("How many?", copy)  # from disk, memory-mapped
    assert cache.images_processed == 2
    assert again.input_ids == first.input_ids and torch.equal(again.image_grid_thw, first.image_grid_thw)
    assert torch.equal(again.pixel_values, first.pixel_values) and again.image.size == first.image.size
    assert list(again.image.getdata()) == list(first.image.getdata())
    other = PromptCache(demo_processing(3136, 3136), spill_dir=tmp_path / "spill")  # another pixel budget
    other.get("How many?", images[0])
    assert other.images_processed == 1


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen3-vl", "text", "qwen3.5"])
def test_each_groups_completions_run_packed_in_one_row(kind: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared layout lays each group's G completions end to end in one row on its prompt's keys and values (a
    block mask, each token's own position): the hidden states equal the padded rows' in fp64, on a mixed batch
    with ragged completions, an empty one included. Linear-attention families (Qwen3.5) keep the padded rows."""
    import r1vl_fast.modeling as modeling

    model, processing = _model(kind, tmp_path)
    model = model.double()
    assert modeling.packs_completions(model) is (kind != "qwen3.5")
    if kind == "qwen3.5":  # the trainer logs why
        assert "only full-attention layers are packed" in (modeling.packing_refusal(model) or "")
    prompts = _prompts(processing, mixed=processing.multimodal)
    g = torch.Generator().manual_seed(2)
    lengths = [(3 * i + 2) % 9 for i in range(len(prompts) * G)]  # 2, 5, 8, 2, ..., and a 0 where it falls
    lengths[4] = 0
    responses = [torch.randint(10, 300, (n,), generator=g).tolist() for n in lengths]
    batch = shared_inputs(processing, prompts, responses, G)
    width = max(lengths)
    packed = completion_hidden(model, batch, width)
    monkeypatch.setattr(modeling, "packs_completions", lambda model: False)
    padded = completion_hidden(model, batch, width)
    real = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        real[i, :max(n, 1)] = True  # the first position (the prompt's last) predicts even an empty completion
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-12, atol=1e-12)
