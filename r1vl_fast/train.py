"""``python -m r1vl_fast.train``: StepGRPO on R1-VL-10K-format data. With no arguments: the built-in CPU demo.

    python -m r1vl_fast.train --model_name_or_path ckpt/sft --dataset r1vl10k.json --image_root images/ \\
        --preset r1vl-2b --output_dir runs/r1vl-2b
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from r1vl_fast.config import GRPOTrainConfig, parse_config
from r1vl_fast.data import load_rl_dataset
from r1vl_fast.distributed import barrier, is_fsdp, unwrap, wrap
from r1vl_fast.eval import evaluate_checkpoint, evaluate_run, load_held_out
from r1vl_fast.modeling import load_model
from r1vl_fast.recipe import load_policy, run_loop, seed_everything, setup_logging, start_run
from r1vl_fast.rewards.scoring import StepRewards
from r1vl_fast.rollout import make_engine
from r1vl_fast.tracking import plot_rewards
from r1vl_fast.trainer import StepGRPOTrainer

log = logging.getLogger("r1vl_fast")


def total_steps(config: GRPOTrainConfig, num_samples: int, world_size: int = 1) -> int:
    if config.max_steps > 0:
        return config.max_steps
    prompts_per_rollout = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    return max(1, math.ceil(config.num_train_epochs * num_samples / prompts_per_rollout)) * config.num_iterations


def run_grpo(config: GRPOTrainConfig) -> Path:
    """Train with StepGRPO; returns the final checkpoint."""
    run = start_run(config, "run")
    assert config.model_name_or_path is not None and config.dataset is not None
    world, output_dir, checkpoint, device, dtype = run.world, run.output_dir, run.checkpoint, run.device, run.dtype
    processing = run.processing
    samples, report = load_rl_dataset(config.dataset, processing, image_root=config.image_root,
                                      max_prompt_length=config.max_prompt_length, skip_invalid=config.skip_invalid)
    log.info("dataset %s: %s", config.dataset, report.summary())

    evaluation: dict[str, dict[str, float]] = {}
    if config.eval_dataset is not None and checkpoint is None:
        if world.main:
            evaluation["before"] = evaluate_checkpoint(config.model_name_or_path, config.eval_dataset, config, device)
        barrier(world)
        seed_everything(config.seed)
    policy = load_policy(run, config)
    reference = None
    if config.beta > 0:  # the frozen initial policy
        reference = load_model(config.model_name_or_path, device=device, dtype=dtype, trainable=False)
        reference = wrap(reference, world, fsdp=config.fsdp, param_dtype=dtype, trainable=False)
    rewards = StepRewards([s.solution for s in samples], [s.key_steps for s in samples],
                          preset=config.reward_preset, alpha=config.step_rar_alpha)  # type: ignore[arg-type]
    engine = make_engine(config.rollout_engine, processing, device=device, dtype=dtype, weights_path=run.weights,
                         policy=unwrap(policy), synced=is_fsdp(policy),  # FSDP ranks step generate() together
                         max_model_len=config.max_prompt_length + config.max_completion_length,
                         gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                         sleep_mode=config.vllm_sleep_mode, seed=config.seed)
    trainer = StepGRPOTrainer(config, policy=policy, reference=reference, processing=processing, samples=samples,
                              rewards=rewards, engine=engine, device=device,
                              total_steps=total_steps(config, len(samples), world.size), world=world)

    def on_step(trainer: StepGRPOTrainer, runlog, metrics) -> None:  # type: ignore[no-untyped-def]
        if trainer.step_idx % config.log_completions_steps == 0:
            runlog.log_completions(trainer.step_idx, trainer.sample_completions(config.num_completions_to_log))

    evaluate_now = None
    if config.eval_steps > 0:
        assert config.eval_dataset is not None
        held_out = load_held_out(config.eval_dataset, processing, config)

        def evaluate_now() -> dict[str, float]:  # the live policy
            return evaluate_run(unwrap(policy), processing, held_out, config, device, world=world,
                                synced=is_fsdp(policy))

    last = run_loop(trainer, config, output_dir, processing, kind="StepGRPO", on_step=on_step,
                    checkpoint=checkpoint, world=world, evaluate=evaluate_now, eval_steps=config.eval_steps)
    if not world.main:
        return last
    plot_rewards(output_dir / "metrics.jsonl", output_dir / "reward_curve.png")
    if config.eval_dataset is not None:
        del policy, reference, engine, trainer
        evaluation["after"] = evaluate_checkpoint(last, config.eval_dataset, config, device)
        previous = output_dir / "eval.json"
        if "before" not in evaluation and previous.is_file():  # resumed: keep the first run's baseline
            evaluation = {**json.loads(previous.read_text()), **evaluation}
        previous.write_text(json.dumps(evaluation, indent=1))
        log.info("held-out evaluation: %s", evaluation)
    log.info("final checkpoint: %s", last)
    return last


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(GRPOTrainConfig, argv, "python -m r1vl_fast.train")
    assert isinstance(config, GRPOTrainConfig)
    if config.is_demo:
        from r1vl_fast.demo.run import run_demo

        run_demo(config)
    else:
        run_grpo(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
