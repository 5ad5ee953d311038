"""TRL's GRPOTrainer on our model and rows, as a user would run it, for the side-by-side step benchmark
(benches/test_bench_vs_trl.py). Needs ``trl`` (the ``peers`` extra).

    python benches/trl_step.py --model DIR --dataset rl.jsonl --steps N --out trl.json [--prompts 8] [--G 4]
        [--completion 112] [--beta 0.01] [--lr 1e-4] [--pixels 3136] [--seed 42] [--first_prompt first.pt]

The rows go in our sampler's order (``EpochSampler(n, seed)``) with TRL's shuffling off, so both trainers see the
same prompts at each step; the rewards are ours (StepRAR + StepRVR, two reward functions); the processor is a
``Qwen2VLProcessor`` on the PIL image processor (no torchvision) with our pixel budget. A callback takes each step's
wall time, and TRL's generation, reward and log-prob methods are wrapped with timers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:  # noqa: PLR0915
    parser = argparse.ArgumentParser()
    for name, kind, default in (("model", str, None), ("dataset", str, None), ("out", str, None), ("steps", int, 10),
                                ("prompts", int, 8), ("G", int, 4), ("completion", int, 112), ("beta", float, 0.01),
                                ("lr", float, 1e-4), ("pixels", int, 3136), ("seed", int, 42),
                                ("first_prompt", str, None), ("temperature", float, 1.0), ("save", str, None)):
        parser.add_argument(f"--{name}", type=kind, default=default)
    args = parser.parse_args()

    from datasets import Dataset
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1vl_fast.data import EpochSampler, read_rows
    from r1vl_fast.rewards import step_rar, step_rvr

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"  # TRL left-pads prompts; the processor's mm_token_type_ids must line up
    image_processor = Qwen2VLImageProcessorPil()
    image_processor.size = {"shortest_edge": args.pixels, "longest_edge": args.pixels}

    class ImageOnlyProcessor(Qwen2VLProcessor):  # no video processor: it needs torchvision, absent beside CPU torch
        def check_argument_for_proper_class(self, attribute_name: str, arg: Any) -> Any:
            return None if arg is None else super().check_argument_for_proper_class(attribute_name, arg)

    processor = ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=tokenizer.chat_template)
    rows = [r.data for r in read_rows(args.dataset)]
    root = Path(args.dataset).parent
    order = EpochSampler(len(rows), args.seed).take(args.steps * args.prompts)
    records = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": rows[i]["problem"]}]}],
                "image": Image.open(root / rows[i]["image_path"]).convert("RGB"),
                "solution": rows[i]["solution"], "key_steps": json.dumps(rows[i]["key_steps"])} for i in order]
    dataset = Dataset.from_list(records)

    def step_rar_reward(completions: list, solution: list[str], key_steps: list[str], **_: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return step_rar(texts, solution, [json.loads(k) for k in key_steps]).tolist()

    def step_rvr_reward(completions: list, **_: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return step_rvr(texts).tolist()

    vision = [tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                           "<|vision_end|>")]
    config = GRPOConfig(
        output_dir=str(Path(args.out).with_suffix("")) + "-run", per_device_train_batch_size=args.prompts * args.G,
        num_generations=args.G, gradient_accumulation_steps=1, max_completion_length=args.completion,
        temperature=args.temperature, top_p=1.0, top_k=0, beta=args.beta, loss_type="grpo", epsilon=0.2,
        learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=1.0, bf16=False, use_cpu=True,
        shuffle_dataset=False, max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no",
        seed=args.seed, num_iterations=1, scale_rewards="group", warmup_steps=0, weight_decay=0.0,
        log_completions=False, generation_kwargs={"suppress_tokens": vision})
    trainer = GRPOTrainer(model=args.model, reward_funcs=[step_rar_reward, step_rvr_reward], args=config,
                          train_dataset=dataset, processing_class=processor)

    phases: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, method: str) -> None:
        inner = getattr(trainer, method)

        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                phases[name].append(time.perf_counter() - start)

        setattr(trainer, method, wrapper)

    for name, method in (("rollout", "_generate"), ("reward", "_calculate_rewards"),
                         ("logprobs_and_update", "_get_per_token_logps_and_entropies")):
        if hasattr(trainer, method):
            timed(name, method)
    if args.first_prompt:  # what TRL feeds the model for the first prompt
        first = processor.apply_chat_template(records[0]["prompt"], add_generation_prompt=True, tokenize=False)
        enc = processor(text=[first], images=[records[0]["image"]], return_tensors="pt")
        torch.save({"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"]}, args.first_prompt)

    steps: list[float] = []
    rewards: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            steps.append(time.perf_counter() - self.start)

        def on_log(self, _args: Any, state: Any, control: Any, logs: dict | None = None, **k: Any) -> None:
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))

    trainer.add_callback(Timer())
    trainer.train()
    if args.save:  # the trained policy with our processing files, for python -m r1vl_fast.eval
        # the model alone: TRL's save_model also saves the processor, whose missing video part cannot be saved
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(args.save)
        from r1vl_fast.processing import Processing

        processing = Processing.from_pretrained(args.model, min_pixels=args.pixels, max_pixels=args.pixels)
        processing.save_pretrained(args.save)
    Path(args.out).write_text(json.dumps({"step_seconds": steps, "phases": dict(phases), "rewards": rewards,
                                          "peak_rss_MB": _rss_peak() / 2**20}))


if __name__ == "__main__":
    main()
