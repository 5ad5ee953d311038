"""Token-budget micro-batches against today's layout (``per_device_train_batch_size`` prompts per micro-batch, padded
to its longest completion), counted with the trainer's own planner (``r1vl_fast.micro_batches``) on R1-VL-like
lengths: 8 prompts x G = 4 per step, ~640-token prompts (a 400k-pixel image and the question), completion lengths
drawn log-normally between 50 and 1,024 tokens (median ~300), 200 steps. Tokens computed per step are what each
pass's linear layers and attention run over, so they stand for the update's FLOPs; the budget is the default (one
micro-batch of P prompts at the longest prompt and completions, so no micro-batch outgrows today's worst case).

Printed per P and layout (the shared layout with each group's completions packed in one row is what the trainer
runs for full-attention models on SDPA): tokens computed / real tokens (1.00 = no padding at all), micro-batches
per step, and the largest micro-batch against the budget. Without packing, a micro-batch of two groups pads the
shorter one's completions to the longer's: the budget alone bounds the micro-batch and merges short groups into
fewer passes, and sorting by length pads less than taking prompts in order; packing takes the padding away.
"""

from __future__ import annotations

import numpy as np
import pytest

from r1vl_fast.micro_batches import Group, cost, plan

PROMPTS, G, PROMPT_TOKENS, LONGEST = 8, 4, 640, 1024
STEPS = 200


def _steps(seed: int = 0) -> list[list[Group]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        lengths = np.clip(rng.lognormal(np.log(300), 0.6, size=(PROMPTS, G)), 50, LONGEST).astype(int)
        prompts = rng.integers(PROMPT_TOKENS - 40, PROMPT_TOKENS + 40, size=PROMPTS)
        out.append([Group(int(p), tuple(int(t) for t in row)) for p, row in zip(prompts, lengths)])
    return out


def _real(groups: list[Group], shared: bool) -> int:
    return sum(g.prompt_tokens * (1 if shared else len(g.completion_tokens)) + sum(g.completion_tokens)
               for g in groups)


@pytest.mark.parametrize(("shared", "packed"), [(True, True), (True, False), (False, False)],
                         ids=["shared-packed", "shared", "repeated"])
def test_token_budget_against_prompts_per_micro_batch(shared: bool, packed: bool) -> None:
    steps = _steps()
    name = "shared, each group's completions packed in one row" if packed else "shared" if shared else "repeated"
    print(f"\n{name} layout, {PROMPTS} prompts x G = {G} per step, {STEPS} steps:")
    print("   P | today: computed/real  micro-batches | budget: computed/real  micro-batches  largest/budget")
    for P in (1, 2, 4):
        budget = P * ((1 if shared else G) * (PROMPT_TOKENS + 40) + G * LONGEST)
        today = budget_side = real = 0
        today_mb = budget_mb = 0
        largest = 0.0
        for groups in steps:
            real += _real(groups, shared)
            fixed = [groups[i:i + P] for i in range(0, PROMPTS, P)]
            today += sum(cost(c, shared) for c in fixed)
            today_mb += len(fixed)
            chunks = plan(groups, budget, shared=shared, packed=packed)
            costs = [cost([groups[i] for i in c], shared, packed) for c in chunks if c is not None]
            budget_side += sum(costs)
            budget_mb += len(chunks)
            largest = max(largest, max(costs) / budget)
        print(f"   {P} | {today / real:20.3f}  {today_mb / STEPS:13.1f} | {budget_side / real:21.3f}  "
              f"{budget_mb / STEPS:13.1f}  {largest:14.2f}")
        assert largest <= 1.0  # every micro-batch within the budget (no group here is over it)
        assert budget_mb <= today_mb  # never more passes than today's layout
        if packed:
            assert budget_side < today  # packing computes fewer tokens than today's padded rows
