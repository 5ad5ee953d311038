"""The run around a trainer's ``step()``, the same for StepGRPO and SFT: join torchrun, claim the output directory
(one run at a time), check the checkpoint to resume and that it fits, seed, log each step, save every ``save_steps``
and at the end, and stop cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np
import torch

from r1vl_fast import lock
from r1vl_fast.checkpoint import STATE_FILE, load_state, resolve_checkpoint, save_checkpoint, set_rng_state
from r1vl_fast.config import RunConfig, to_dict
from r1vl_fast.distributed import World, all_sum, barrier, full_model_state, init_world, on_main, unwrap
from r1vl_fast.errors import ConfigError, NonFiniteError, Stopped
from r1vl_fast.modeling import enable_gradient_checkpointing, freeze_vision, load_model, wrap_model
from r1vl_fast.processing import Processing
from r1vl_fast.resume import check_fits, run_record
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


def resume_point(config: RunConfig, output_dir: Path, world_size: int = 1) -> Path | None:
    """The checkpoint to resume, if any, verified against its manifest and checked to fit ``config`` (see
    :mod:`r1vl_fast.resume`); a ``--max_steps`` below its step is an error (the run would do nothing)."""
    if config.resume_from_checkpoint is None:
        return None
    checkpoint = resolve_checkpoint(config.resume_from_checkpoint, output_dir)
    check_fits(config, checkpoint, world_size)
    step = json.loads((checkpoint / STATE_FILE).read_text())["step"]
    if 0 < config.max_steps < step:
        raise ConfigError(f"--max_steps {config.max_steps} is below the step of {checkpoint} ({step}): nothing "
                          f"would run; pass a larger --max_steps to train on")
    return checkpoint


# What a run writes into its output directory; a new run refuses a directory that holds any of these.
RUN_FILES = ("config.json", "metrics.jsonl", "completions.jsonl", "eval.json", "summary.json", "reward_curve.png",
             "tensorboard", "prompt_cache")
_CHECKPOINT_DIR = re.compile(r"^(\.tmp-|\.removing-)?checkpoint-\d+$")


def run_artifacts(output_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The names in ``output_dir`` that a run wrote: checkpoints (complete or not) and ``RUN_FILES`` (+ ``extra``)."""
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir()
                  if p.name in RUN_FILES or p.name in extra or _CHECKPOINT_DIR.match(p.name))


def prepare_output_dir(output_dir: Path, *, resuming: bool, overwrite: bool, world: World,
                       extra: tuple[str, ...] = ()) -> None:
    """Before anything is loaded: make ``output_dir``, take its lock (rank 0, until :func:`release_output_dir`: a
    second run into it is refused while this one lives, even with ``overwrite``), check that it can be written, and
    refuse one that holds another run's checkpoints or logs unless this run resumes (and appends to them) or
    ``overwrite`` is set (they are removed first). Two runs never mix in one directory."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output_dir {output_dir}: cannot write there ({e.strerror or e})") from None
    on_main(lambda: lock.acquire(output_dir), world)
    try:
        _check_output_dir(output_dir, resuming=resuming, overwrite=overwrite, world=world, extra=extra)
    except BaseException:
        release_output_dir(output_dir, world)
        raise


def release_output_dir(output_dir: Path, world: World) -> None:
    if world.main:
        lock.release(output_dir)


def _check_output_dir(output_dir: Path, *, resuming: bool, overwrite: bool, world: World,
                      extra: tuple[str, ...]) -> None:
    try:
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"r1vl_fast")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output_dir {output_dir}: cannot write there ({e.strerror or e})") from None
    found = run_artifacts(output_dir, extra)
    barrier(world)  # every rank has looked before rank 0 removes anything
    if not found or resuming:
        return
    if not overwrite:
        listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(f"--output_dir {output_dir} holds another run ({listed}); pass --resume_from_checkpoint "
                          f"latest to continue it, --overwrite_output_dir to replace it, or another --output_dir")
    if world.main:
        log.warning("--overwrite_output_dir: removing the previous run's %s from %s", ", ".join(found), output_dir)
        for name in found:
            path = output_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    barrier(world)


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

    def close(self) -> None:
        """Let go of the output directory (the end of the run, however it ends)."""
        release_output_dir(self.output_dir, self.world)

    @property
    def weights(self) -> str:
        """The policy's current weights: the checkpoint to resume, else the starting model."""
        return str(self.checkpoint) if self.checkpoint is not None else self.model_name_or_path


def start_run(config: RunConfig) -> Run:
    """Join torchrun (if launched by it), find the checkpoint to resume (complete, and fitting this run), claim the
    output directory (writable, not another run's, and not in use), pick the device and dtype, seed every
    generator, and load the tokenizer / image processor. The caller closes the run when it ends."""
    assert config.model_name_or_path is not None and config.dataset is not None  # validated
    world = init_world(config.device)
    assert config.output_dir is not None  # resolved
    output_dir = Path(config.output_dir)
    checkpoint = on_main(lambda: resume_point(config, output_dir, world.size), world)  # rank 0 reads and hashes
    prepare_output_dir(output_dir, resuming=checkpoint is not None, overwrite=config.overwrite_output_dir,
                       world=world)
    try:
        device = run_device(config, world)
        dtype = run_dtype(config)
        seed_everything(config.seed)
        processing = Processing.from_pretrained(config.model_name_or_path, min_pixels=config.min_pixels,
                                                max_pixels=config.max_pixels)
    except BaseException:
        release_output_dir(output_dir, world)
        raise
    return Run(world, output_dir, checkpoint, device, dtype, processing, config.model_name_or_path)


def load_policy(run: Run, config: RunConfig) -> Any:
    """The trainable policy at its current weights, with gradient checkpointing if asked, wrapped for DDP / FSDP2."""
    policy = load_model(run.weights, device=run.device, dtype=run.dtype)
    if getattr(config, "freeze_vision", False):  # before DDP / FSDP2 see which parameters train
        freeze_vision(policy)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    return wrap_model(policy, run.world, fsdp=config.fsdp, param_dtype=run.dtype)


class GracefulStop:
    """SIGINT / SIGTERM ask the loop to finish the current step, save and raise :class:`Stopped` (the command line
    exits with 128 + the signal's number); a second SIGINT aborts at once."""

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
    record = run_record(config, world.size) if world.main else None  # each checkpoint's run.json
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
                                   model_state=model_state, run=record)
        barrier(world)
        return path

    try:
        with GracefulStop() as stop:
            while trainer.step_idx < trainer.total_steps:
                start = time.perf_counter()
                metrics = trainer.step()
                metrics["time/step"] = time.perf_counter() - start  # the whole step, as a user waits for it
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
                    raise Stopped(stop.requested, trainer.step_idx, last)  # nothing after this stage runs
    finally:
        runlog.close()
    if last is None:  # nothing to do (already at total_steps)
        last = save()
    return last
