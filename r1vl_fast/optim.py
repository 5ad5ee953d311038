"""The optimisation every trainer shares: AdamW with the configured schedule, the clipped optimizer step, and
:class:`TrainerBase`, which owns them with the data sampler and the step count, and saves and restores them."""

from __future__ import annotations

import math
from typing import Any

import torch

from r1vl_fast.config import RunConfig
from r1vl_fast.data import EpochSampler
from r1vl_fast.distributed import World, load_optimizer_state, optimizer_state


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
    returns the pre-clip gradient norm and the learning rate the step used."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": float(norm), "learning_rate": lr}


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

    def optimizer_step(self) -> dict[str, float]:
        return optimizer_step(self.policy, self.optimizer, self.scheduler, self.max_grad_norm)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, tensors: dict[str, Any]) -> None:
        pass

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(JSON state, tensor state) for a checkpoint (collectives under FSDP2: every rank calls it)."""
        tensors = {"optimizer": optimizer_state(self.policy, self.optimizer), "scheduler": self.scheduler.state_dict(),
                   **self.extra_state()}
        return {"sampler": self.sampler.state_dict(), "total_steps": self.total_steps}, tensors

    def load_state(self, state: dict[str, Any], tensors: dict[str, Any]) -> None:
        self.step_idx = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        load_optimizer_state(self.policy, self.optimizer, tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        self.load_extra_state(tensors)
