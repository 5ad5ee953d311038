"""Running on torchrun: the process group, the data shard of this rank, DDP or FSDP2 wrapping, metrics reduced
across ranks, and full state dicts for checkpoints. PyTorch's own machinery only; one process is world size 1.

Every rank draws the same random numbers (same seed, same draws), so the global data order and the per-prompt
sampling seeds are identical to a single process with the same global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's contiguous slice of a global list whose length is a multiple of the world size."""
        per_rank = len(items) // self.size
        return items[self.rank * per_rank: (self.rank + 1) * per_rank]


def init_world(device_kind: str) -> World:
    """Join torchrun's process group (gloo on CPU, NCCL on GPU) when launched by it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def on_main(fn: Callable[[], T], world: World) -> T:
    """``fn()`` on rank 0 alone (reading, hashing, locking); its result, or the user error it raised, reaches every
    rank, so that all of them go on, or all stop with the same one-line error."""
    if world.size == 1:
        return fn()
    from r1vl_fast.errors import user_errors

    outcome: list[Any] = [None]
    if world.main:
        try:
            outcome = [(fn(), None)]
        except user_errors() as e:
            outcome = [(None, e)]
    dist.broadcast_object_list(outcome, src=0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def reduce_metrics(metrics: dict[str, Any], world: World) -> dict[str, Any]:
    """Mean over ranks (each holds the same number of completions); ``*_max`` and ``time/*`` take the maximum."""
    if world.size == 1:
        return metrics
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"]
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    is_max = torch.tensor([k.endswith("_max") or k.startswith("time/") for k in keys])
    summed, maxed = values.clone(), values.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    reduced = torch.where(is_max, maxed, summed / world.size)
    return {**metrics, **{k: float(v) for k, v in zip(keys, reduced.tolist())}}


def all_sum(value: float, world: World) -> float:
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def all_max(value: int, world: World) -> int:
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of a causal LM or of a vision-language model's language model."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", inner)
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    return list(layers)


def vision_blocks(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of a vision-language model's vision encoder (Qwen2-VL through Qwen3.5: ``blocks``;
    a SigLIP or CLIP tower, as Gemma 3's and LLaVA's: ``vision_model.encoder.layers``)."""
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None)
    if visual is not None:
        return list(getattr(visual, "blocks", None) or [])
    tower = getattr(inner, "vision_tower", None)
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    return list(getattr(encoder, "layers", None) or [])


def wrap(model: Any, world: World, *, fsdp: bool, param_dtype: torch.dtype, trainable: bool = True) -> Any:
    """FSDP2 (``fully_shard`` per decoder layer, per vision block, the rest of the vision encoder, then the root) or
    DDP for a trainable model; the model unchanged at world size 1 (and a frozen model under DDP: a plain replica).
    The trainer wraps through :func:`r1vl_fast.modeling.wrap_model`, which also keeps the vision encoder in step."""
    if world.size == 1 or (not fsdp and not trainable):
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for layer in decoder_layers(model) + vision_blocks(model):
            fully_shard(layer, mp_policy=policy)
        inner = getattr(model, "model", model)
        visual = getattr(inner, "visual", None)
        for part in (getattr(inner, name, None) for name in ("visual", "vision_tower", "multi_modal_projector")):
            if isinstance(part, torch.nn.Module):
                fully_shard(part, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        # FSDP2 initialises from the first forward through the root. generate() reaches the vision tower before
        # the root forward, so run one tiny forward through the root now, on every rank.
        ids = torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device)
        extra = {"mm_token_type_ids": torch.zeros_like(ids, dtype=torch.int32)} if visual is not None else {}
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, **extra)
        model.reshard()  # the root keeps its parameters gathered after a forward; the optimizer must see shards
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: Any) -> Any:
    """The transformers model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return getattr(model, "module", model)


def is_fsdp(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def full_model_state(model: Any) -> dict[str, Any] | None:
    """The full, unsharded state dict on CPU (a collective under FSDP2: every rank must call it; rank 0 gets it)."""
    if not is_fsdp(model):
        return None  # save_pretrained reads the (replicated) model itself
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
