"""The optimisation every trainer shares: AdamW with the configured schedule, the clipped optimizer step, and
:class:`TrainerBase`, which owns them with the data sampler and the step count, and saves and restores them."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from r1vl_fast.config import RunConfig
from r1vl_fast.data import EpochSampler
from r1vl_fast.distributed import World, load_optimizer_state, optimizer_state
from r1vl_fast.errors import NonFiniteError

log = logging.getLogger("r1vl_fast")
# Updates skipped in a row for a non-finite gradient norm before the run stops.
MAX_NONFINITE_STEPS = 3


def make_optimizer(model: Any, config: RunConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW and the configured schedule (R1-VL: linear decay without warm-up for RL, cosine with 3 % for SFT)."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def optimizer_step(model: Any, optimizer: Any, scheduler: Any, max_grad_norm: float) -> dict[str, float]:
    """Clip the accumulated gradients (0: no clipping), step the optimizer and the schedule, clear the gradients;
    returns the pre-clip gradient norm and the learning rate the step used. A non-finite norm (NaN or inf in the
    loss or the gradients) skips the parameter update, and says so (``skipped``); the schedule still advances.
    Under DDP / FSDP2 the norm is the global one, so every rank decides alike."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    lr = scheduler.get_last_lr()[0]
    finite = bool(torch.isfinite(norm))
    if finite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": float(norm), "learning_rate": lr, "skipped": 0.0 if finite else 1.0}


class TrainerBase:
    """The policy, its optimizer and schedule, the data sampler over ``num_samples`` rows and the step count, with
    the checkpoint state they make up. Subclasses define ``step()`` and may add tensors to the state
    (:meth:`extra_state` / :meth:`load_extra_state`)."""

    def __init__(self, config: RunConfig, policy: Any, *, num_samples: int, total_steps: int,
                 world: World | None = None) -> None:
        self.policy, self.total_steps = policy, total_steps
        self.world = world or World()
        self.optimizer, self.scheduler = make_optimizer(policy, config, total_steps)
        self.max_grad_norm = config.max_grad_norm
        self.sampler = EpochSampler(num_samples, config.seed)
        self.step_idx = 0  # optimizer steps taken
        self.nonfinite = [0, 0]  # updates skipped for a non-finite gradient norm: in a row, in all

    def optimizer_step(self) -> dict[str, float]:
        out = optimizer_step(self.policy, self.optimizer, self.scheduler, self.max_grad_norm)
        if out["skipped"]:
            self.nonfinite = [self.nonfinite[0] + 1, self.nonfinite[1] + 1]
            log.warning("step %d: non-finite loss or gradient norm (%s): update skipped (%d in a row)",
                        self.step_idx + 1, out["grad_norm"], self.nonfinite[0])
            if self.nonfinite[0] >= MAX_NONFINITE_STEPS:
                raise NonFiniteError(
                    f"{self.nonfinite[0]} steps in a row ended with a non-finite loss or gradient norm (the last at "
                    f"step {self.step_idx + 1}); stopping without saving. Lower --learning_rate, or resume from an "
                    f"earlier checkpoint")
        else:
            self.nonfinite[0] = 0
        return {**out, "skipped_total": float(self.nonfinite[1])}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, tensors: dict[str, Any]) -> None:
        pass

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(JSON state, tensor state) for a checkpoint (collectives under FSDP2: every rank calls it)."""
        tensors = {"optimizer": optimizer_state(self.policy, self.optimizer), "scheduler": self.scheduler.state_dict(),
                   **self.extra_state()}
        return {"sampler": self.sampler.state_dict(), "total_steps": self.total_steps,
                "nonfinite": self.nonfinite}, tensors

    def load_state(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.step_idx = int(state["step"])
        self.nonfinite = list(state.get("nonfinite", [0, 0]))
        self.sampler.load_state_dict(state["sampler"])
        load_optimizer_state(self.policy, self.optimizer, tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        self.load_extra_state(tensors)
