"""One full StepGRPO run of a few steps on a Qwen2-VL-2B-shaped model (random weights, built from a config): rollouts
with transformers ``generate``, StepRAR + StepRVR, the fused loss, AdamW. No downloads. ``--arch qwen3-vl``: at
Qwen3-VL-2B's widths (deepstack); ``--arch qwen3.5``: a 2B-class Qwen3.5 (Gated DeltaNet + full attention), layers
in multiples of its 3 + 1 pattern (``r1vl_fast.demo.models.build_qwen3_2b_width``).

    python benches/gpu_step.py --out runs/gpu_check/step            # on a GPU (benches/gpu_check.sh runs it)
    python benches/gpu_step.py --out /tmp/step --device cpu --layers 1 --vision_depth 1 --max_completion_length 8

Qwen2-VL-2B's widths are kept (text hidden 1536, 12 heads / 2 KV heads of 128, MLP 8960, vocabulary 151,936; vision
1280 wide, 16 heads); only the depth is cut to fit the time (``--layers`` of 28, ``--vision_depth`` of 32). The
demo's tokenizer and shapes data stand in for the real ones. Writes ``summary.json``: per-step times, peak GPU
memory, and the final metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

PIXELS = {"qwen2-vl": 3136, "qwen3-vl": 4096, "qwen3.5": 4096}


def build_model(path: Path, layers: int, vision_depth: int, arch: str = "qwen2-vl") -> None:
    from r1vl_fast.demo.models import build_qwen2_vl_2b_width, build_qwen3_2b_width, demo_processing

    processing = demo_processing(PIXELS[arch], PIXELS[arch], arch=arch)
    if arch == "qwen2-vl":
        model = build_qwen2_vl_2b_width(processing, layers, vision_depth)
    else:
        model = build_qwen3_2b_width(processing, arch, layers, vision_depth)
    model.to(torch.bfloat16).save_pretrained(path)
    processing.save_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--layers", type=int, default=4, help="Decoder layers (Qwen2-VL-2B has 28).")
    parser.add_argument("--vision_depth", type=int, default=4, help="Vision blocks (Qwen2-VL-2B has 32).")
    parser.add_argument("--steps", type=int, default=3, help="Optimizer steps (the first compiles the kernels).")
    parser.add_argument("--prompts", type=int, default=8, help="Prompts per step (G = 4 completions each).")
    parser.add_argument("--max_completion_length", type=int, default=256)
    parser.add_argument("--arch", default="qwen2-vl", choices=tuple(PIXELS))
    parser.add_argument("--share_prompt", default="true", choices=("true", "false"))
    args = parser.parse_args(argv)

    from r1vl_fast.config import GRPOTrainConfig
    from r1vl_fast.demo.shapes import write_demo_data
    from r1vl_fast.recipes import run_grpo
    from r1vl_fast.runner import setup_logging
    from r1vl_fast.tracking import read_metrics

    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_demo_data(out / "data", train=4 * args.prompts, sft=0, eval=0, seed=0)
    start = time.perf_counter()
    build_model(out / "model", args.layers, args.vision_depth, args.arch)
    build_seconds = time.perf_counter() - start
    config = GRPOTrainConfig(
        model_name_or_path=str(out / "model"), dataset=str(data["rl"]), output_dir=str(out / "run"),
        device=args.device, max_steps=args.steps, per_device_train_batch_size=args.prompts,
        gradient_accumulation_steps=1, num_generations=4, max_completion_length=args.max_completion_length,
        max_prompt_length=128, min_pixels=PIXELS[args.arch], max_pixels=PIXELS[args.arch], rollout_engine="hf",
        report_to="none", share_prompt=args.share_prompt == "true",
        save_steps=10**6, learning_rate=1e-6, beta=0.04, temperature=1.0, gradient_checkpointing=True,
        log_completions_steps=10**6,
    )
    config.validate()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run_grpo(config)
    metrics = read_metrics(out / "run" / "metrics.jsonl")
    summary = {
        "model": {"arch": args.arch, "layers": args.layers, "vision_depth": args.vision_depth,
                  "parameters_M": round(_parameters(out / "model") / 1e6, 1)},
        "config": {"loss_impl": config.loss_impl, "bf16": config.bf16, "rollout_engine": config.rollout_engine,
                   "share_prompt": config.share_prompt,
                   "prompts": args.prompts, "G": 4, "max_completion_length": args.max_completion_length},
        "build_seconds": round(build_seconds, 1), "run_seconds": round(time.perf_counter() - start, 1),
        "steps": [{k: m[k] for k in ("step", "loss", "reward", "kl", "grad_norm", "completion_length", "time/rollout",
                                     "time/reward", "time/logprobs", "time/update") if k in m} for m in metrics],
        "peak_gpu_memory_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if args.device == "cuda" else None,
    }
    assert len(metrics) == args.steps and all(m["grad_norm"] == m["grad_norm"] for m in metrics)  # no NaN
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def _parameters(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                total += math.prod(f.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    sys.exit(main())
