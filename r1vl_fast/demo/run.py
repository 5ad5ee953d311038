"""The built-in demo (``python -m r1vl_fast.train`` with no arguments): synthetic shapes data, a tiny Qwen2-VL built
from a config with the packaged tokenizer, a short SFT warm-up, then StepGRPO, all on a CPU in minutes; it ends
with the held-out reward, accuracy, validity and key-step recall before and after RL."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from r1vl_fast.checkpoint import latest_checkpoint
from r1vl_fast.config import DEMO_DIRS, PRESETS, GRPOTrainConfig, SFTConfig
from r1vl_fast.demo.models import FAMILIES, build_demo_model, demo_processing
from r1vl_fast.demo.shapes import write_demo_data
from r1vl_fast.distributed import World, barrier, init_world
from r1vl_fast.errors import ConfigError
from r1vl_fast.recipes import run_grpo, run_sft
from r1vl_fast.runner import prepare_output_dir, release_output_dir
from r1vl_fast.tracking import read_metrics

log = logging.getLogger("r1vl_fast")

DEMO_ROWS = {"train": 2048, "sft": 2048, "eval": 128}


def run_demo(config: GRPOTrainConfig) -> dict[str, dict[str, float]]:
    """The whole demo; under torchrun every rank trains, rank 0 alone writes the data, the evaluation and the
    summary (and returns it; other ranks return an empty dict).

    A stop signal ends it in whichever stage it is (:class:`~r1vl_fast.errors.Stopped`): a stopped SFT warm-up never
    goes on into StepGRPO. ``--resume_from_checkpoint latest`` resumes the stage that was stopped: the SFT warm-up
    if it is short of ``--sft_steps``, then StepGRPO from its own latest checkpoint, if it has one."""
    assert config.output_dir is not None  # resolved: runs/demo-<time> by default
    output_dir = Path(config.output_dir)
    world = init_world(config.device)
    resuming = config.resume_from_checkpoint is not None
    if resuming and config.resume_from_checkpoint != "latest":
        raise ConfigError("the demo has two stages (SFT, then StepGRPO): resume it with --resume_from_checkpoint "
                          "latest, which picks the stage that was stopped")
    # the demo's own folders count as a run's: a new demo never reuses another's data, model or warm-up
    prepare_output_dir(output_dir, resuming=resuming, overwrite=config.overwrite_output_dir, world=world,
                       extra=DEMO_DIRS)  # held, against a second run, until the demo ends
    try:
        return _stages(config, world, output_dir, resuming)
    finally:
        release_output_dir(output_dir, world)


def _stages(config: GRPOTrainConfig, world: World, output_dir: Path, resuming: bool) -> dict[str, dict[str, float]]:
    data = output_dir / "data"
    paths = {name: data / f"{name}.jsonl" for name in ("rl", "sft", "eval")}
    init = output_dir / "init"
    if world.main:
        log.info("demo: writing everything to %s", output_dir)
        if not (data / "eval.jsonl").is_file():
            write_demo_data(data, **DEMO_ROWS, seed=config.seed)
        if not (init / "config.json").is_file():
            processing = demo_processing(config.min_pixels, config.max_pixels, arch=config.demo_arch)
            build_demo_model(processing, config.seed, arch=config.demo_arch).save_pretrained(init)
            processing.save_pretrained(init)
        built = json.loads((init / "config.json").read_text())["model_type"]
        if built != FAMILIES[config.demo_arch].model_type:
            raise ConfigError(f"--demo_arch {config.demo_arch}: the demo in {output_dir} was started with a "
                              f"{built} model; resume it without --demo_arch, or start a new demo")
    barrier(world)  # the other ranks read what rank 0 wrote

    sft_dir = output_dir / "sft"
    sft_done = latest_checkpoint(sft_dir)
    if sft_done is None or json.loads((sft_done / "trainer_state.json").read_text())["step"] < config.sft_steps:
        # the demo owns sft/: without a checkpoint, whatever an interrupted first attempt left there is replaced
        sft_config = SFTConfig(**{**PRESETS["demo"][SFTConfig], "preset": "demo", "model_name_or_path": str(init),
                                  "dataset": str(paths["sft"]), "output_dir": str(sft_dir),
                                  "max_steps": config.sft_steps, "seed": config.seed, "report_to": config.report_to,
                                  "min_pixels": config.min_pixels, "max_pixels": config.max_pixels,
                                  "resume_from_checkpoint": "latest" if sft_done is not None else None,
                                  "overwrite_output_dir": True})
        sft_config.validate()
        sft_done = run_sft(sft_config)  # a stop raises Stopped here: no StepGRPO from a partial warm-up

    rl_resume = "latest" if resuming and latest_checkpoint(output_dir) is not None else None
    rl_config = dataclasses.replace(config, model_name_or_path=str(sft_done), dataset=str(paths["rl"]),
                                    eval_dataset=str(paths["eval"]), output_dir=str(output_dir), preset=None,
                                    resume_from_checkpoint=rl_resume, overwrite_output_dir=True)
    final = run_grpo(rl_config)
    if not world.main:  # rank 0 evaluates the final policy and writes eval.json after the other ranks are done
        return {}
    evaluation = json.loads((output_dir / "eval.json").read_text())
    before, after = evaluation["before"], evaluation["after"]

    metrics = [m for m in read_metrics(output_dir / "metrics.jsonl")]
    fifth = max(1, len(metrics) // 5)
    first = sum(m["reward"] for m in metrics[:fifth]) / fifth
    last = sum(m["reward"] for m in metrics[-fifth:]) / fifth
    summary = {"before_rl": before, "after_rl": after,
               "train_reward": {"first_fifth": first, "last_fifth": last}, "final_checkpoint": str(final)}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["", f"demo summary ({output_dir}), held-out set of {DEMO_ROWS['eval']} prompts "
             f"x {config.num_generations} samples at temperature {config.temperature}:",
             f"  {'':18}{'before RL':>10}{'after RL':>10}"]
    for key in ("reward", "accuracy", "validity", "key_step_recall"):
        lines.append(f"  {key:18}{before[key]:10.3f}{after[key]:10.3f}")
    lines.append(f"  training reward, first fifth of RL steps {first:.3f} -> last fifth {last:.3f}")
    lines += what_changed(before, after)
    print("\n".join(lines), flush=True)
    return summary


def what_changed(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Two lines for the end of the demo's table: what StepGRPO changed on the held-out set, and what that means."""
    delta = {key: after[key] - before[key] for key in ("accuracy", "validity", "key_step_recall")}
    changed = (f"  changed by RL: accuracy {delta['accuracy']:+.3f}, validity {delta['validity']:+.3f}, "
               f"key-step recall {delta['key_step_recall']:+.3f} (held-out prompts the policy never trained on)")
    if delta["accuracy"] > 0 and delta["validity"] > 0:
        meaning = ("  why it matters: StepRAR paid for right answers and the key steps that lead to them, StepRVR for "
                   "complete, ordered reasoning; both rose, so RL improved the reasoning, not only its format")
    elif delta["accuracy"] > 0:
        meaning = ("  why it matters: StepRAR paid for right answers and their key steps, and accuracy rose; validity "
                   "(StepRVR: complete, ordered reasoning) did not, so the format gained nothing here")
    else:
        meaning = ("  why it matters: accuracy did not rise, so the reward went to format (StepRVR) rather than to "
                   "right answers (StepRAR); on this seed RL polished the reasoning's form, not its content")
    return [changed, meaning]
