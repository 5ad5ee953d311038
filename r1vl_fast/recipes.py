"""The two recipes, each wiring components into a run: SFT warm-up (:func:`run_sft`) and StepGRPO
(:func:`run_grpo`). The command lines (``train.py``, ``sft.py``) and the demo call these."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from r1vl_fast.config import GRPOTrainConfig, SFTConfig
from r1vl_fast.data import load_rl_dataset, load_sft_dataset
from r1vl_fast.distributed import barrier, is_fsdp, unwrap
from r1vl_fast.grpo_trainer import StepGRPOTrainer
from r1vl_fast.heldout import evaluate_checkpoint, evaluate_run, load_held_out
from r1vl_fast.modeling import load_model, wrap_model
from r1vl_fast.rewards.step_rewards import StepRewards
from r1vl_fast.rollout import make_engine
from r1vl_fast.runner import Run, load_policy, run_loop, seed_everything, start_run
from r1vl_fast.sft_trainer import SFTTrainer
from r1vl_fast.tracking import plot_rewards

log = logging.getLogger("r1vl_fast")


def total_steps(config: GRPOTrainConfig, num_samples: int, world_size: int = 1) -> int:
    if config.max_steps > 0:
        return config.max_steps
    prompts_per_rollout = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    return max(1, math.ceil(config.num_train_epochs * num_samples / prompts_per_rollout)) * config.num_iterations


def run_sft(config: SFTConfig) -> Path:
    """Supervised warm-up; returns the final checkpoint."""
    run = start_run(config)
    try:
        return _sft(config, run)
    finally:
        run.close()


def _sft(config: SFTConfig, run: Run) -> Path:
    assert config.dataset is not None
    samples, report = load_sft_dataset(config.dataset, run.processing, image_root=config.image_root,
                                       split=config.dataset_split, columns=config.columns(),
                                       max_length=config.max_length, skip_invalid=config.skip_invalid)
    log.info("dataset %s: %s", config.dataset, report.summary())
    policy = load_policy(run, config)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * run.world.size
    steps = config.max_steps if config.max_steps > 0 else max(1, math.ceil(config.num_train_epochs * len(samples)
                                                                            / per_step))
    trainer = SFTTrainer(config, policy=policy, processing=run.processing, samples=samples, device=run.device,
                         total_steps=steps, world=run.world)
    return run_loop(trainer, config, run.output_dir, run.processing, kind="SFT", checkpoint=run.checkpoint,
                    world=run.world)


def run_grpo(config: GRPOTrainConfig) -> Path:
    """Train with StepGRPO; returns the final checkpoint."""
    run = start_run(config)
    try:
        return _grpo(config, run)
    finally:
        run.close()


def _grpo(config: GRPOTrainConfig, run: Run) -> Path:
    assert config.model_name_or_path is not None and config.dataset is not None
    world, output_dir, checkpoint, device, dtype = run.world, run.output_dir, run.checkpoint, run.device, run.dtype
    processing = run.processing
    samples, report = load_rl_dataset(config.dataset, processing, image_root=config.image_root,
                                      split=config.dataset_split, columns=config.columns(),
                                      max_prompt_length=config.max_prompt_length, skip_invalid=config.skip_invalid)
    log.info("dataset %s: %s", config.dataset, report.summary())

    evaluation: dict[str, dict[str, float]] = {}
    if config.eval_dataset is not None and checkpoint is None:
        if world.main:
            evaluation["before"] = evaluate_checkpoint(config.model_name_or_path, config.eval_dataset, config, device)
            (output_dir / "eval.json").write_text(json.dumps(evaluation, indent=1))  # kept if the run stops
        barrier(world)
        seed_everything(config.seed)
    policy = load_policy(run, config)
    reference = None
    if config.beta > 0:  # the frozen initial policy
        reference = load_model(config.model_name_or_path, device=device, dtype=dtype, trainable=False)
        reference = wrap_model(reference, world, fsdp=config.fsdp, param_dtype=dtype, trainable=False)
    rewards = StepRewards([s.solution for s in samples], [s.key_steps for s in samples],
                          preset=config.reward_preset, alpha=config.step_rar_alpha,  # type: ignore[arg-type]
                          where=[s.where for s in samples])
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

    # a stop raises Stopped from run_loop after its save: no "after training" evaluation of a partial run
    last = run_loop(trainer, config, output_dir, processing, kind="StepGRPO", on_step=on_step,
                    checkpoint=checkpoint, world=world, evaluate=evaluate_now, eval_steps=config.eval_steps)
    if not world.main:
        return last
    plot_rewards(output_dir / "metrics.jsonl", output_dir / "reward_curve.png")
    if config.eval_dataset is not None:
        del policy, reference, engine, trainer
        evaluation["after"] = evaluate_checkpoint(last, config.eval_dataset, config, device)
        previous = output_dir / "eval.json"
        if "before" not in evaluation and previous.is_file():  # resumed: keep the run's baseline
            evaluation = {**json.loads(previous.read_text()), **evaluation}
        previous.write_text(json.dumps(evaluation, indent=1))
        log.info("held-out evaluation: %s", evaluation)
    log.info("final checkpoint: %s", last)
    return last
