"""Token-budget micro-batches: the planner (whole groups, within the budget, in step across ranks) and, through the
trainer, one global normaliser: for every loss type the step's gradient is the one-batch gradient however the
batch is split."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_trainer import TIME_KEYS, _args, _config

from r1vl_fast.data import load_rl_dataset
from r1vl_fast.grpo_trainer import StepGRPOTrainer
from r1vl_fast.micro_batches import Group, cost, loss_scale, plan
from r1vl_fast.modeling import load_model
from r1vl_fast.processing import Processing
from r1vl_fast.rewards.step_rewards import StepRewards
from r1vl_fast.rollout import HFRolloutEngine


def _groups() -> list[Group]:
    return [Group(30, (5, 80, 12, 40)), Group(50, (3, 3, 3, 3)), Group(20, (100, 90, 7, 1)), Group(40, (60, 0, 0, 2))]


def test_cost_counts_the_tokens_a_pass_computes() -> None:
    g = _groups()
    assert cost([g[0]], shared=True) == 30 + 4 * 80
    assert cost([g[0]], shared=False) == 4 * (30 + 80)
    assert cost([g[0], g[1]], shared=True) == 2 * 50 + 8 * 80  # prompts left-padded, completions right-padded
    assert cost([], shared=True) == 0


def test_plan_keeps_groups_whole_within_the_budget_longest_first(caplog: pytest.LogCaptureFixture) -> None:
    g = _groups()
    chunks = plan(g, 700, shared=True)
    assert sorted(i for c in chunks for i in c) == [0, 1, 2, 3]  # each group once, none split
    assert all(cost([g[i] for i in c], True) <= 700 for c in chunks)
    assert chunks[0][0] == 2  # the longest completions first
    assert plan(g, 10**6, shared=True) == [[2, 0, 3, 1]]  # one micro-batch when all fit
    with caplog.at_level(logging.WARNING, logger="r1vl_fast"):
        over = plan(g, 300, shared=True)
    assert [2] in over and any("over the micro-batch budget of 300" in r.getMessage() for r in caplog.records)
    # in step with other ranks: as many micro-batches as asked for, splitting the largest, then empty passes
    assert len(plan(g, 10**6, shared=True, at_least=lambda k: 3)) == 3
    six = plan(g, 10**6, shared=True, at_least=lambda k: 6)
    assert six[4:] == [None, None] and sorted(i for c in six[:4] for i in c) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="budget must be >= 1"):
        plan(g, 0, shared=True)


def test_loss_scale_makes_the_step_normaliser_global() -> None:
    # grpo: a micro-batch of 4 of the step's 16 sequences, 2 ranks (DDP averages their gradients)
    assert loss_scale("grpo", sequences=4, tokens=50, total_sequences=16, total_tokens=400, world_size=2) == 0.5
    assert loss_scale("dr_grpo", sequences=8, tokens=50, total_sequences=16, total_tokens=400, world_size=1) == 0.5
    assert loss_scale("bnpo", sequences=4, tokens=100, total_sequences=16, total_tokens=400, world_size=1) == 0.25
    assert loss_scale("dapo", sequences=4, tokens=0, total_sequences=16, total_tokens=400, world_size=1) == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_the_step_gradient_is_the_one_batch_gradient_however_the_batch_is_split(tiny: dict[str, Path],
                                                                                loss_type: str) -> None:
    """Two rollout batches of 2 prompts x G = 4 (gradient accumulation 2), with a reference (β > 0) and old-policy
    log-probs (μ = 2), the policy then moved off both, in fp64: the accumulated gradient of every parameter, the
    loss and the KL are the same with one micro-batch, with one group per micro-batch, and with a budget in between,
    within 1e-6 relative."""
    processing = Processing.from_pretrained(str(tiny["model"]), min_pixels=3136, max_pixels=3136, multimodal=True)
    samples, _ = load_rl_dataset(tiny["rl"], processing, max_prompt_length=64)
    rewards = StepRewards([s.solution for s in samples], [s.key_steps for s in samples])
    config = _config(_args(tiny, tiny["root"] / "unused", per_device_train_batch_size=2, num_generations=4,
                           loss_type=loss_type, num_iterations=2, max_completion_length=48))
    model = load_model(str(tiny["model"]), device=torch.device("cpu"), dtype=torch.float64)
    reference = load_model(str(tiny["model"]), device=torch.device("cpu"), dtype=torch.float64, trainable=False)
    trainer = StepGRPOTrainer(config, policy=model, reference=reference, processing=processing, samples=samples,
                              rewards=rewards, engine=HFRolloutEngine(model, processing, torch.device("cpu")),
                              device=torch.device("cpu"), total_steps=1)
    torch.manual_seed(3)
    buffer = [trainer.make_rollouts(ids, dict.fromkeys(TIME_KEYS, 0.0)) for ids in ([4, 11], [17, 2])]
    lengths = torch.cat([mb.completion_mask.sum(1) for mb in buffer])
    assert lengths.max() > lengths.min()  # ragged completions
    with torch.no_grad():  # the policy moves off the old policy and the reference: ratios and KL away from 1 and 0
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=2e-3)

    def step(budget: int) -> tuple[dict[str, float], list[torch.Tensor]]:
        trainer.update_budget, trainer._planned = budget, None
        model.zero_grad(set_to_none=True)
        metrics = trainer.accumulate(buffer)
        return metrics, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    one, grads = step(10**9)
    assert one["micro_batches"] == 1
    assert sum(float(g.norm()) for g in grads) > 0
    for budget in (1, 400):
        split, split_grads = step(budget)
        assert split["micro_batches"] == (4 if budget == 1 else split["micro_batches"]) and split["micro_batches"] > 1
        for key in ("loss", "kl", "clip_ratio"):
            assert split[key] == pytest.approx(one[key], rel=1e-6, abs=1e-12), key
        for a, b in zip(split_grads, grads):
            assert float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-15
    assert 0 <= one["padding_fraction"] < 1
