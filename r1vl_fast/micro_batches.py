"""Token-budget micro-batches: a rollout batch's groups (a prompt and its G completions) split into micro-batches
that each stay under a token budget, instead of ``per_device_train_batch_size`` prompts per micro-batch padded to
the longest completion of the batch.

- **Whole groups.** A group shares its prompt (and, in the shared layout, runs it once), so it is never split. A
  group over the budget gets a micro-batch of its own, with a one-line warning.
- **Tokens as computed.** A micro-batch costs what its pass computes: in the shared layout each prompt once plus
  every completion, in the repeated layout each completion with its own prompt; completions are padded to the
  micro-batch's longest, and that padding counts. Where the shared layout packs each group's completions into one
  row (``packed``), a row is a group's completions end to end and only the rows' ends are padded. Groups are taken
  longest first, so that similar lengths share a micro-batch and little is padded.
- **In step across ranks.** Under torchrun every rank takes the same number of micro-batches (FSDP2 gathers each
  layer once per forward on every rank): a rank that needs fewer splits its largest ones, and a rank with fewer
  groups than that runs the rest on a group it holds with zero weight (``None`` in the plan).

The split changes no number: the loss of each micro-batch is scaled so that the step's gradient is the one-batch
gradient (:func:`loss_scale`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("r1vl_fast")


@dataclass(frozen=True)
class Group:
    """One prompt and its completions, as the planner sees them: the prompt's tokens, each completion's."""

    prompt_tokens: int
    completion_tokens: tuple[int, ...]


def cost(groups: list[Group], shared: bool, packed: bool = False) -> int:
    """Tokens one pass over ``groups`` computes: prompts (once each when shared, else once per completion) plus the
    completions padded to the longest, the prompts left-padded to the longest; ``packed`` (shared layout): each
    group's completions end to end in one row, the rows padded to the longest group."""
    if not groups:
        return 0
    prompt = max(g.prompt_tokens for g in groups)
    if packed:
        return len(groups) * (prompt + max(sum(g.completion_tokens) for g in groups))
    completion = max((t for g in groups for t in g.completion_tokens), default=0)
    sequences = sum(len(g.completion_tokens) for g in groups)
    if shared:
        return len(groups) * prompt + sequences * completion
    return sequences * (prompt + completion)


def plan(groups: list[Group], budget: int, *, shared: bool, packed: bool = False,
         at_least: Callable[[int], int] = lambda k: k, what: str = "micro-batch") -> list[list[int] | None]:
    """The micro-batches of ``groups``: lists of group indices, each under ``budget`` tokens (:func:`cost`) unless
    it is one group over it, as many as ``at_least(k)`` asks for (the most any rank needs, under torchrun; a rank
    that holds too few groups gets ``None`` entries: a pass with zero weight)."""
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    def size(g: Group) -> int:  # what sets a micro-batch's padded width
        return sum(g.completion_tokens) if packed else max(g.completion_tokens, default=0)

    order = sorted(range(len(groups)), key=lambda i: (-size(groups[i]), i))
    batches: list[list[int]] = []
    for i in order:
        if batches and cost([groups[j] for j in batches[-1] + [i]], shared, packed) <= budget:
            batches[-1].append(i)
            continue
        alone = cost([groups[i]], shared, packed)
        if alone > budget:
            log.warning("a group of %d completions costs %d tokens, over the %s budget of %d: it gets a %s of "
                        "its own", len(groups[i].completion_tokens), alone, what, budget, what)
        batches.append([i])
    want = at_least(len(batches))
    while len(batches) < want and any(len(b) > 1 for b in batches):
        largest = max(range(len(batches)), key=lambda k: (len(batches[k]), -k))
        b = batches.pop(largest)
        batches[largest:largest] = [b[: len(b) // 2], b[len(b) // 2:]]
    return [*batches, *([None] * (want - len(batches)))]  # type: ignore[list-item]


def loss_scale(loss_type: str, *, sequences: int, tokens: float, total_sequences: int, total_tokens: float,
               world_size: int) -> float:
    """The factor on a micro-batch's loss (normalised within the micro-batch, as each ``loss_type`` does) that makes
    the step's summed gradient the one-batch gradient: per-sequence normalisers (grpo, dr_grpo) over the step's
    sequences, token normalisers (bnpo, dapo) over its tokens, on every rank together (DDP and FSDP2 average the
    ranks' gradients: × world size)."""
    if loss_type in ("grpo", "dr_grpo"):
        return sequences / max(total_sequences, 1) * world_size
    return tokens / max(total_tokens, 1.0) * world_size
