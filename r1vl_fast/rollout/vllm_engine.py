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
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # under torchrun: one engine per rank inside the existing process group (TP = 1 each)
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

    def _request(self, prompt: PromptInputs) -> dict[str, Any]:
        if prompt.image is None:
            return {"prompt_token_ids": list(prompt.input_ids)}
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
        """Push the policy's weights into the engine (full state dict: tied weights included). Tensors go one at a
        time, by reference, so no second copy of the model is made; FSDP2 shards are gathered one parameter at a
        time (every rank must call this together)."""
        self._wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _full_tensors(model),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def prompt_log_probs(self, token_ids: list[int]) -> torch.Tensor:
        """log p(token_t | tokens_<t) for t ≥ 1 under the engine's current weights (for checking a sync)."""
        from vllm import SamplingParams

        self._wake()
        out = self.llm.generate([{"prompt_token_ids": token_ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)[0]
        return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], token_ids[1:])])
