"""The run around a trainer's ``step()``, the same for StepGRPO and SFT: join torchrun, make the output directory,
seed, resume, log each step, save every ``save_steps`` and at the end, and stop cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np
import torch

from r1vl_fast.checkpoint import load_state, resolve_checkpoint, save_checkpoint, set_rng_state
from r1vl_fast.config import RunConfig, to_dict
from r1vl_fast.distributed import World, all_sum, barrier, full_model_state, init_world, unwrap, wrap
from r1vl_fast.errors import NonFiniteError
from r1vl_fast.modeling import load_model
from r1vl_fast.processing import Processing
from r1vl_fast.tracking import RunLog

log = logging.getLogger("r1vl_fast")


class Trainer(Protocol):
    policy: Any
    step_idx: int
    total_steps: int

    def step(self) -> dict[str, Any]: ...
    def state(self) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def load_state(self, state: dict[str, Any], tensors: dict[str, Any]) -> None: ...


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_device(config: RunConfig, world: World | None = None) -> torch.device:
    """cpu, or this rank's GPU (``config.device`` is resolved: cuda or cpu)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device("cuda", (world or World()).local_rank) if config.device == "cuda" else torch.device("cpu")


def run_dtype(config: RunConfig) -> torch.dtype:
    if config.bf16 and config.device == "cpu":
        log.warning("--bf16 on CPU: bfloat16 matmuls on CPU are slow")
    return torch.bfloat16 if config.bf16 else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_point(config: RunConfig, output_dir: Path) -> Path | None:
    if config.resume_from_checkpoint is None:
        return None
    return resolve_checkpoint(config.resume_from_checkpoint, output_dir)


@dataclass
class Run:
    """Where and how a recipe runs: its rank, output directory, checkpoint to resume, device, dtype, processing."""

    world: World
    output_dir: Path
    checkpoint: Path | None
    device: torch.device
    dtype: torch.dtype
    processing: Processing
    model_name_or_path: str

    @property
    def weights(self) -> str:
        """The policy's current weights: the checkpoint to resume, else the starting model."""
        return str(self.checkpoint) if self.checkpoint is not None else self.model_name_or_path


def start_run(config: RunConfig) -> Run:
    """Join torchrun (if launched by it), make the output directory, find the checkpoint to resume, pick the
    device and dtype, seed every generator, and load the tokenizer / image processor."""
    if config.model_name_or_path is None or config.dataset is None:
        raise ValueError("--model_name_or_path and --dataset are both needed"
                         + (" (or neither, for the demo)" if config.run_kind == "run" else ""))
    world = init_world(config.device)
    assert config.output_dir is not None  # resolved
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = resume_point(config, output_dir)
    device = run_device(config, world)
    dtype = run_dtype(config)
    seed_everything(config.seed)
    processing = Processing.from_pretrained(config.model_name_or_path, min_pixels=config.min_pixels,
                                            max_pixels=config.max_pixels)
    return Run(world, output_dir, checkpoint, device, dtype, processing, config.model_name_or_path)


def load_policy(run: Run, config: RunConfig) -> Any:
    """The trainable policy at its current weights, with gradient checkpointing if asked, wrapped for DDP / FSDP2."""
    policy = load_model(run.weights, device=run.device, dtype=run.dtype)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return wrap(policy, run.world, fsdp=config.fsdp, param_dtype=run.dtype)


class GracefulStop:
    """SIGINT / SIGTERM ask the loop to finish the current step, save and exit 0; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)",
                    self.requested)

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: signals stay with the caller
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_loop(trainer: Trainer, config: RunConfig, output_dir: Path, processing: Any, *, kind: str,
             on_step: Any = None, checkpoint: Path | None = None, world: World | None = None,
             evaluate: Callable[[], dict[str, float]] | None = None, eval_steps: int = 0) -> Path:
    """Steps ``trainer`` to ``total_steps`` with logging and checkpoints; returns the last checkpoint.
    Under torchrun every rank steps; rank 0 alone writes logs and checkpoints. Every ``eval_steps`` steps, every
    rank calls ``evaluate`` and its results join that step's metrics as ``eval/*``."""
    world = world or World()
    if checkpoint is not None:
        state, tensors = load_state(checkpoint)
        trainer.load_state(state, tensors)
        set_rng_state(tensors["rng"])
        log.info("resumed from %s at step %d", checkpoint, trainer.step_idx)
    if world.main:
        (output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=1))
    runlog = RunLog(output_dir, trackers=config.trackers if world.main else [], total_steps=trainer.total_steps,
                    start_step=trainer.step_idx, logging_steps=config.logging_steps, config=to_dict(config),
                    desc=kind, write=world.main)
    last = checkpoint

    def save() -> Path:
        state, tensors = trainer.state()  # collectives under FSDP2: every rank takes part
        model_state = full_model_state(trainer.policy)
        path = output_dir / f"checkpoint-{trainer.step_idx}"
        weights = model_state if model_state is not None else unwrap(trainer.policy).state_dict()
        bad = [k for k, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if all_sum(float(bool(bad)), world) > 0:  # every rank stops, none waits for a save that will not come
            raise NonFiniteError(f"the weights hold non-finite values ({', '.join(bad[:3]) or 'on another rank'}); "
                                 f"checkpoint-{trainer.step_idx} is not written, the previous checkpoints are kept")
        if world.main:
            path = save_checkpoint(output_dir, trainer.step_idx, model=unwrap(trainer.policy), processing=processing,
                                   state=state, tensors=tensors, save_total_limit=config.save_total_limit,
                                   model_state=model_state)
        barrier(world)
        return path

    try:
        with GracefulStop() as stop:
            while trainer.step_idx < trainer.total_steps:
                metrics = trainer.step()
                if evaluate is not None and eval_steps > 0 and trainer.step_idx % eval_steps == 0:
                    start = time.perf_counter()
                    metrics |= {f"eval/{k}": v for k, v in evaluate().items()}
                    metrics["time/eval"] = time.perf_counter() - start
                runlog.log(metrics)
                if on_step is not None and world.main:
                    on_step(trainer, runlog, metrics)
                if trainer.step_idx % config.save_steps == 0 or trainer.step_idx == trainer.total_steps:
                    last = save()
                if all_sum(1.0 if stop.requested else 0.0, world) > 0:  # every rank stops at the same step
                    stop.requested = stop.requested or "a signal to another rank"
                    if last is None or not last.name.endswith(f"-{trainer.step_idx}"):
                        last = save()
                    log.warning("stopped by %s after step %d; resume with --resume_from_checkpoint latest",
                                stop.requested, trainer.step_idx)
                    break
    finally:
        runlog.close()
    if last is None:  # nothing to do (already at total_steps)
        last = save()
    return last
