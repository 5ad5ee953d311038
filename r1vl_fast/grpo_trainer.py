"""The StepGRPO step, as in the paper: sample prompts → G rollouts each → StepRAR + StepRVR → group-normalised
advantages → old / reference log-probs → policy update with the clipped, KL-regularised GRPO loss.

Components do the work (``rollout``, ``rewards``, ``ops``); this module only wires one step and keeps the state a
checkpoint needs (``optim.TrainerBase``: optimizer, scheduler, data position; here also the rollout buffer when
μ > 1 reuses it). The rewards go into the loss kernel, which normalises them into advantages within each group in
the same pass as the log-probs, the clipped ratio and the KL.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1vl_fast.config import GRPOTrainConfig
from r1vl_fast.data import Sample
from r1vl_fast.distributed import World, all_max, all_sum, reduce_metrics, unwrap
from r1vl_fast.micro_batches import Group, cost, loss_scale, plan
from r1vl_fast.modeling import (
    completion_hidden,
    completion_log_probs,
    completion_logits,
    embed_images,
    fused_head_refusal,
    lm_head,
    packing_refusal,
    packs_completions,
    shared_layout_refusal,
)
from r1vl_fast.ops import grpo_loss, importance_weights, linear_grpo_loss
from r1vl_fast.ops.fused import _advantages
from r1vl_fast.optim import TrainerBase
from r1vl_fast.processing import Processing, PromptCache, PromptInputs, batch_inputs, shared_inputs
from r1vl_fast.rewards.step_rewards import RewardBreakdown, StepRewards
from r1vl_fast.rollout import RolloutEngine, SamplingConfig, draw_seeds

log = logging.getLogger("r1vl_fast")


@dataclass
class RolloutBatch:
    """One rollout batch of P prompts × G completions, scored, with everything the update needs (the update splits
    the step's rollout batches into token-budget micro-batches of whole groups)."""

    sample_ids: list[int]  # per completion
    inputs: dict[str, torch.Tensor]  # unused: model inputs are built per micro-batch (kept for older checkpoints)
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    rewards: RewardBreakdown
    advantages: torch.Tensor | None  # [B], group-normalised from the rewards
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    finish_reasons: list[str]
    is_weights: torch.Tensor | None = None  # sampler-mismatch correction (vLLM rollouts)
    sampler_stats: dict[str, float] | None = None

    def to_state(self) -> dict[str, Any]:
        return dict(vars(self), rewards=vars(self.rewards))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RolloutBatch:
        return cls(**{**state, "rewards": RewardBreakdown(**state["rewards"])})


def fused_head_here(config: GRPOTrainConfig, world: World | None, model: Any = None) -> bool:
    """Whether this run fuses the LM head into the loss and the log-prob passes (``--fused_lm_head``): it steps aside,
    saying why once, for a model whose logits are not its head's plain linear output."""
    reason = fused_head_refusal(model) if config.fused_lm_head and model is not None else None
    if reason is not None:
        if world is None or world.main:
            log.warning("--fused_lm_head: the logits are formed by the model instead, because %s", reason)
        return False
    return config.fused_lm_head


def share_prompt_here(config: GRPOTrainConfig, world: World | None, model: Any = None,
                      fused_head: bool | None = None) -> bool:
    """Whether this run shares each prompt over its group (``--share_prompt``); the shared layout runs on the fused
    LM head, for the families it is tested exact on, and says once why it falls back to repeating each prompt G
    times. (Checked with gradient checkpointing, and under torchrun: 2 DDP or FSDP2 ranks take one rank's steps.)"""
    if not config.share_prompt:
        return False
    fused = config.fused_lm_head if fused_head is None else fused_head
    reason = None if fused else "the LM head is not fused (--fused_lm_head false, or the model's head refuses it)"
    if reason is None and model is not None:
        reason = shared_layout_refusal(model)
    if reason is not None:
        if world is None or world.main:
            log.warning("--share_prompt: each prompt is repeated G times instead of run once, because %s", reason)
        return False
    return True


@dataclass
class MicroBatch:
    """Whole groups of the step's rollout batches, within the token budget: their model inputs and the rows of
    everything the loss takes. ``weight`` 0 marks a pass a rank runs only to stay in step with the others."""

    inputs: dict[str, torch.Tensor]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    is_weights: torch.Tensor | None
    weight: float
    tokens: int  # as computed (padding included)
    real_tokens: int


class StepGRPOTrainer(TrainerBase):
    def __init__(self, config: GRPOTrainConfig, *, policy: Any, reference: Any | None, processing: Processing,
                 samples: list[Sample], rewards: StepRewards, engine: RolloutEngine, device: torch.device,
                 total_steps: int, world: World | None = None) -> None:
        super().__init__(config, policy, num_samples=len(samples), total_steps=total_steps, world=world)
        self.config, self.reference = config, reference
        self.processing, self.samples, self.rewards, self.engine = processing, samples, rewards, engine
        self.device = device
        self.buffer: list[RolloutBatch] = []
        self.sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                       max_new_tokens=config.max_completion_length)
        self.loss_config = config.loss_config()  # the loss settings, built once
        self.impl = config.loss_impl
        self.fused_head = fused_head_here(config, self.world, policy)
        self.share_prompt = share_prompt_here(config, self.world, policy, self.fused_head)
        # rollouts and training share one processing of each image; past 1 GiB, entries wait on disk
        spill = Path(config.output_dir) / "prompt_cache" if config.output_dir is not None else None
        self.prompts = PromptCache(processing, spill_dir=spill)
        # token budgets of the micro-batches (update; no-grad passes), for the layout this run takes
        self.update_budget = config.max_tokens_per_micro_batch or config.default_token_budget(self.share_prompt)
        self.forward_budget = config.max_tokens_per_forward or 4 * self.update_budget
        if self.share_prompt != config.share_prompt and self.update_budget == config.default_token_budget(True):
            self.update_budget = config.default_token_budget(False)  # the default, for the layout taken
            if self.forward_budget == 4 * config.default_token_budget(True):
                self.forward_budget = 4 * self.update_budget
        self._planned: tuple[list[RolloutBatch], list[MicroBatch]] | None = None
        self.packed = self.share_prompt and packs_completions(policy)  # each group's completions in one row
        if self.share_prompt and not self.packed and self.world.main:
            log.info("packing: each completion keeps its own padded row (the token budget still applies), "
                     "because %s", packing_refusal(policy))

    # ------------------------------------------------------------------------------------------------ one step

    def step(self) -> dict[str, Any]:
        """One optimizer step; new rollouts every μ = num_iterations steps. Returns the step's metrics."""
        c = self.config
        times = {"time/rollout": 0.0, "time/reward": 0.0, "time/logprobs": 0.0}
        if self.step_idx % c.num_iterations == 0:
            self.buffer = []
            for _ in range(c.gradient_accumulation_steps):
                # the global batch, then this rank's share: the same prompts and seeds as on one process
                sample_ids = self.sampler.take(c.per_device_train_batch_size * self.world.size)
                seeds = draw_seeds(len(sample_ids))
                self.buffer.append(self.make_rollouts(self.world.shard(sample_ids), times, self.world.shard(seeds)))
        start = time.perf_counter()
        update = self.update(self.buffer)
        times["time/update"] = time.perf_counter() - start
        self.step_idx += 1
        metrics = {"step": self.step_idx, **update, **self.rollout_metrics(self.buffer), **times,
                   "epoch": self.sampler.epoch + self.sampler.position / len(self.samples)}
        return reduce_metrics(metrics, self.world)

    def make_rollouts(self, sample_ids: list[int], times: dict[str, float],
                      seeds: list[int] | None = None) -> RolloutBatch:
        c, G = self.config, self.config.num_generations
        prompts = [self.prompt(i) for i in sample_ids]

        start = time.perf_counter()
        rollouts = self.engine.generate(prompts, n=G, sampling=self.sampling, seeds=seeds)
        times["time/rollout"] += time.perf_counter() - start

        start = time.perf_counter()
        completion_sample_ids = [i for i in sample_ids for _ in range(G)]  # reward inputs aligned per completion
        rewards = self.rewards(rollouts.texts, completion_sample_ids)
        times["time/reward"] += time.perf_counter() - start

        responses = [row[m].tolist() for row, m in zip(rollouts.completion_ids, rollouts.completion_mask)]
        ids = rollouts.completion_ids.to(self.device)
        mask = rollouts.completion_mask.to(self.device)
        lc = self.loss_config
        advantages = _advantages(torch.from_numpy(rewards.total).to(self.device, torch.float32), G, lc.adv_eps,
                                 lc.adv_unbiased, lc.scale_rewards)
        start = time.perf_counter()
        old_logp = ref_logp = is_weights = stats = None
        correct = rollouts.logprobs is not None and c.vllm_importance_sampling_correction
        if c.num_iterations > 1 or correct or self.reference is not None:
            old_logp, ref_logp = self.no_grad_passes(prompts, responses, ids, old=c.num_iterations > 1 or correct)
        if correct:
            assert rollouts.logprobs is not None and old_logp is not None
            is_weights, stats = importance_weights(old_logp, rollouts.logprobs.to(self.device), mask,
                                                   mode=c.vllm_importance_sampling_mode,
                                                   cap=c.vllm_importance_sampling_cap)
            if c.num_iterations == 1:
                old_logp = None  # on-policy ratio, as without correction
        times["time/logprobs"] += time.perf_counter() - start
        return RolloutBatch(completion_sample_ids, {}, ids, mask, rollouts.texts, rewards, advantages,
                            old_logp, ref_logp, rollouts.finish_reasons, is_weights, stats)

    # ------------------------------------------------------------------------------------------------ micro-batches

    def _inputs(self, prompts: list[PromptInputs], responses: list[list[int]]) -> dict[str, torch.Tensor]:
        """Model inputs of whole groups: each prompt once (shared layout) or G times, then its completions; a frozen
        vision encoder runs here, once, and every pass over these inputs reuses its embeddings."""
        G = self.config.num_generations
        if self.share_prompt:  # each prompt (and image) once; its G completions on its keys and values
            inputs = shared_inputs(self.processing, prompts, responses, G, device=self.device)
        else:
            inputs = batch_inputs(self.processing, [p for p in prompts for _ in range(G)], responses,
                                  device=self.device)
        return embed_images(self.policy, inputs) if self.config.freeze_vision else inputs

    def _groups(self, prompts: list[PromptInputs], responses: list[list[int]]) -> list[Group]:
        G = self.config.num_generations
        return [Group(len(p.input_ids), tuple(len(r) for r in responses[g * G:(g + 1) * G]))
                for g, p in enumerate(prompts)]

    def no_grad_passes(self, prompts: list[PromptInputs], responses: list[list[int]], ids: torch.Tensor, *,
                       old: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The old policy's (when ``old``) and the reference's log-probs [B, T] of a rollout batch's completions, over
        micro-batches of whole groups within the no-grad budget (``--max_tokens_per_forward``)."""
        G, temperature = self.config.num_generations, self.loss_config.temperature
        chunks = plan(self._groups(prompts, responses), self.forward_budget, shared=self.share_prompt,
                      packed=self.packed, at_least=lambda k: all_max(k, self.world), what="no-grad micro-batch")
        wanted = [name for name, on in (("old", old), ("ref", self.reference is not None)) if on]
        out: dict[str, torch.Tensor] = {}
        for chunk in chunks:
            groups = chunk if chunk is not None else [0]  # a pass in step with the other ranks, its result unused
            rows = [g * G + j for g in groups for j in range(G)]
            width = max(1, max(len(responses[r]) for r in rows))
            inputs = self._inputs([prompts[g] for g in groups], [responses[r] for r in rows])
            sub = ids[rows, :width]
            for name, model in (("old", self.policy), ("ref", self.reference)):
                if name in wanted:
                    logp = completion_log_probs(model, inputs, sub, temperature, self.impl,
                                                fused_lm_head=self.fused_head)
                    if chunk is not None:  # fp32 (fp64 for an fp64 model), zero past each completion
                        out.setdefault(name, ids.new_zeros(ids.shape, dtype=logp.dtype))[rows, :width] = logp
        return out.get("old"), out.get("ref")

    def micro_batches(self, buffer: list[RolloutBatch]) -> list[MicroBatch]:
        """The update's micro-batches over the step's rollout batches: whole groups within the budget
        (``--max_tokens_per_micro_batch``), the same number on every rank; built once per buffer and reused by every
        μ iteration (a resumed run builds the same ones from the same buffer)."""
        if self._planned is not None and self._planned[0] is buffer:
            return self._planned[1]
        G = self.config.num_generations
        prompts, responses, rows = [], [], []  # over the buffer: per group, per completion
        for b, mb in enumerate(buffer):
            prompts += [self.prompt(i) for i in mb.sample_ids[::G]]
            responses += [row[m].tolist() for row, m in zip(mb.completion_ids.cpu(), mb.completion_mask.cpu())]
            rows += [(b, j) for j in range(len(mb.sample_ids))]
        groups = self._groups(prompts, responses)
        chunks = plan(groups, self.update_budget, shared=self.share_prompt, packed=self.packed,
                      at_least=lambda k: all_max(k, self.world), what="micro-batch")
        out = []
        for chunk in chunks:
            group_ids = chunk if chunk is not None else [0]
            seqs = [g * G + j for g in group_ids for j in range(G)]
            width = max(1, max(len(responses[r]) for r in seqs))

            def gather(name: str, seqs: list[int] = seqs, width: int = width) -> torch.Tensor | None:
                parts = [getattr(buffer[rows[r][0]], name) for r in seqs]
                if any(p is None for p in parts):
                    return None
                return torch.stack([_row(p[rows[r][1]], width) for p, r in zip(parts, seqs)])

            real = sum(len(responses[r]) for r in seqs) + sum(
                groups[g].prompt_tokens * (1 if self.share_prompt else G) for g in group_ids)
            rewards = torch.tensor([float(buffer[rows[r][0]].rewards.total[rows[r][1]]) for r in seqs],
                                   device=self.device)
            out.append(MicroBatch(
                inputs=self._inputs([prompts[g] for g in group_ids], [responses[r] for r in seqs]),
                completion_ids=gather("completion_ids"), completion_mask=gather("completion_mask"),  # type: ignore[arg-type]
                rewards=rewards, advantages=gather("advantages"), old_logp=gather("old_logp"),  # type: ignore[arg-type]
                ref_logp=gather("ref_logp"), is_weights=gather("is_weights"), weight=float(chunk is not None),
                tokens=cost([groups[g] for g in group_ids], self.share_prompt, self.packed), real_tokens=real))
        self._planned = (buffer, out)
        return out

    def update(self, buffer: list[RolloutBatch]) -> dict[str, float]:
        """One optimizer step over the token-budget micro-batches of ``buffer`` (gradient accumulation).

        The loss reads the logits buffer as the model produced it and writes its gradient there, already scaled
        (:func:`r1vl_fast.micro_batches.loss_scale`): one read and one write of the logits per micro-batch, and
        nothing waits for the device until the step's metrics are read at the end."""
        sums = self.accumulate(buffer)
        stepped = self.optimizer_step()
        self.engine.sync_weights(unwrap(self.policy))
        return {**sums, **stepped}

    def accumulate(self, buffer: list[RolloutBatch]) -> dict[str, float]:
        """The step's gradient, accumulated over its micro-batches into the policy's ``.grad``, each micro-batch's
        loss scaled so that the sum is the one-batch gradient; returns the loss and the token-level metrics."""
        self.policy.train()
        lc = self.loss_config
        chunks = self.micro_batches(buffer)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum, tokens = zero, zero
        # the step's normalisers, over every rank: the one-batch gradient however the batch is split
        step_tokens = all_sum(float(sum(mb.completion_mask.sum() for mb in buffer)), self.world)
        step_sequences = int(all_sum(float(sum(len(mb.sample_ids) for mb in buffer)), self.world))
        # token-level metrics are summed over tokens, then divided by the global token count
        token_sums = {"kl": zero, "clip_ratio": zero, "clip_ratio/low": zero, "clip_ratio/high": zero}
        for mb in chunks:
            scale = mb.weight * loss_scale(lc.loss_type, sequences=len(mb.completion_ids),
                                           tokens=float(mb.completion_mask.sum()), total_sequences=step_sequences,
                                           total_tokens=step_tokens, world_size=self.world.size)
            # rewards in, the kernel normalises them per group; a batch-wide std comes from the rollout batch
            batch_std = lc.scale_rewards == "batch"
            rewards, advantages = (None, mb.advantages) if batch_std else (mb.rewards, None)
            if self.fused_head:  # the LM head inside the loss: no [B, T, V] logits
                hidden = completion_hidden(self.policy, mb.inputs, mb.completion_ids.shape[1])
                weight, bias = lm_head(self.policy)  # after the forward: FSDP2 holds it gathered (see lm_head)
                loss, m = linear_grpo_loss(hidden, weight, mb.completion_ids, mb.completion_mask,
                                           config=lc, old_logp=mb.old_logp, ref_logp=mb.ref_logp,
                                           is_weights=mb.is_weights, bias=bias, loss_scale=scale,
                                           rewards=rewards, advantages=advantages)
            else:
                logits = completion_logits(self.policy, mb.inputs, mb.completion_ids.shape[1])
                loss, m = grpo_loss(logits, mb.completion_ids, mb.completion_mask, config=lc,
                                    old_logp=mb.old_logp, ref_logp=mb.ref_logp, is_weights=mb.is_weights,
                                    loss_scale=scale, last_position_unused=True, grad_inplace=True, validate=False,
                                    impl=self.impl, rewards=rewards, advantages=advantages)
            loss.backward()
            loss_sum = loss_sum + loss.detach()
            n = mb.completion_mask.sum() * mb.weight
            tokens = tokens + n
            for key, value in (("kl", m["kl"]), ("clip_ratio", m["clip_region"]), ("clip_ratio/low", m["clip_low"]),
                               ("clip_ratio/high", m["clip_high"])):
                token_sums[key] = token_sums[key] + value.double() * n
        computed = sum(mb.tokens for mb in chunks)
        layout = {"micro_batches": float(len(chunks)),
                  "padding_fraction": 1.0 - sum(mb.real_tokens for mb in chunks if mb.weight) / max(computed, 1)}
        total_tokens = max(all_sum(float(tokens), self.world), 1.0)
        return {"loss": all_sum(float(loss_sum), self.world) / self.world.size,
                **{k: all_sum(float(v), self.world) / total_tokens for k, v in token_sums.items()}, **layout}

    def rollout_metrics(self, buffer: list[RolloutBatch]) -> dict[str, float]:
        r = [mb.rewards for mb in buffer]
        G = self.config.num_generations
        total = np.concatenate([x.total for x in r])
        lengths = torch.cat([mb.completion_mask.sum(1).float().cpu() for mb in buffer])
        group_std = total.reshape(-1, G).std(axis=1, ddof=1)
        truncated = sum(f == "length" for mb in buffer for f in mb.finish_reasons)
        sanitized = sum(f == "sanitized" for mb in buffer for f in mb.finish_reasons)
        sampler: dict[str, float] = {}
        for mb in buffer:
            for k, v in (mb.sampler_stats or {}).items():
                sampler[k] = max(sampler.get(k, v), v) if k.endswith("_max") else sampler.get(k, 0.0) + v / len(buffer)
        return {
            **sampler,
            "completions/sanitized": sanitized,
            "reward": float(total.mean()),
            "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": float((group_std == 0).mean()),
            "rewards/step_rar": float(np.concatenate([x.step_rar for x in r]).mean()),
            "rewards/step_rvr": float(np.concatenate([x.step_rvr for x in r]).mean()),
            "rewards/accuracy": float(np.concatenate([x.correct for x in r]).mean()),
            "rewards/key_steps": float(np.concatenate([x.key_steps for x in r]).mean()),
            "completion_length": float(lengths.mean()),
            "completions/truncated_ratio": truncated / len(total),
        }

    def prompt(self, i: int) -> PromptInputs:
        """Sample i's model inputs, each image processed once per run (``self.prompts``), named for errors."""
        s = self.samples[i]
        return dataclasses.replace(self.prompts.get(s.problem, s.image), source=s.where)

    def sample_completions(self, k: int) -> list[dict[str, Any]]:
        """Up to ``k`` prompts and completions of the current rollouts with their reward breakdown."""
        out: list[dict[str, Any]] = []
        for mb in self.buffer:
            for j in range(len(mb.texts)):
                if len(out) == k:
                    return out
                s = self.samples[mb.sample_ids[j]]
                advantage = float(mb.advantages[j]) if mb.advantages is not None else None
                out.append({"sample": s.where, "problem": s.problem, "completion": mb.texts[j],
                            "advantage": advantage, **mb.rewards.row(j)})
        return out

    # ------------------------------------------------------------------------------------------------ state

    def extra_state(self) -> dict[str, Any]:
        """The rollout buffer, when a checkpoint lands while μ > 1 still reuses it (every rank's)."""
        reuse = self.step_idx % self.config.num_iterations != 0
        buffer = [_to(mb.to_state(), torch.device("cpu")) for mb in self.buffer] if reuse else []
        buffers: list[Any] = [buffer]
        if self.world.size > 1:  # each rank reuses its own rollouts: keep all of them
            buffers = [None] * self.world.size
            torch.distributed.all_gather_object(buffers, buffer)
        return {"buffers": buffers}

    def load_extra_state(self, tensors: dict[str, Any]) -> None:
        buffers = tensors["buffers"]
        if len(buffers) != self.world.size:
            raise ValueError(f"the checkpoint was saved by {len(buffers)} ranks; resume with the same world size "
                             f"(this run has {self.world.size})")
        self.buffer = [RolloutBatch.from_state(_to(b, self.device)) for b in buffers[self.world.rank]]


def _row(x: torch.Tensor, width: int) -> torch.Tensor:
    """A per-completion row cut or zero-padded to ``width`` positions (rollout batches differ in width); a scalar
    (an advantage) as it is."""
    if x.dim() == 0:
        return x
    x = x[:width]
    return torch.nn.functional.pad(x, (0, width - len(x))) if len(x) < width else x


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
