"""Run configuration: one dataclass per recipe, defaults written once, documented in ``--help``.

Values are resolved as: dataclass defaults < ``--preset`` < ``--config run.yaml`` < ``--key value`` on the command
line. Option names follow TRL's GRPOConfig / SFTConfig where one exists. Each choice list is owned by the component
it configures and imported here; every ``auto`` / ``None`` that depends on the machine (device, precision, loss
implementation, rollout engine, ...) is resolved once, when the config is built, so ``config.json`` records what
actually ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from r1vl_fast.data import Columns
from r1vl_fast.errors import ConfigError
from r1vl_fast.ops.config import ADV_SCALES, IMPLS, KL_ESTIMATORS, LOSS_TYPES, GRPOConfig, resolve_impl
from r1vl_fast.ops.importance import IS_MODES
from r1vl_fast.processing import MAX_PIXELS, MIN_PIXELS
from r1vl_fast.rewards.step_rar import PRESETS as REWARD_PRESETS
from r1vl_fast.rollout import ENGINES, default_sleep_mode, resolve_engine

log = logging.getLogger("r1vl_fast")

PRESET_NAMES = ("demo", "r1vl-2b", "r1vl-7b")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DEVICES = ("auto", "cuda", "cpu")
# The families the demo can build (r1vl_fast.demo.models.FAMILIES); Qwen3-VL and Qwen3.5 take 16-pixel patches, so
# the demo gives them 64 x 64 images (four image tokens, as Qwen2-VL's 56 x 56).
DEMO_ARCHS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe")
DEMO_PIXELS = {arch: 4096 if arch.startswith("qwen3") else 3136 for arch in DEMO_ARCHS}


def _opt(default: Any, help: str, choices: tuple | None = None) -> Any:  # noqa: A002
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class RunConfig:
    """Options shared by ``r1vl_fast.train`` and ``r1vl_fast.sft``."""

    model_name_or_path: str | None = _opt(None, "Model to train: a HF hub id or a save_pretrained directory. "
                                               "Tested families, every path (SFT, StepGRPO, shared prompt, fused "
                                               "head, frozen vision, checkpointing, DDP/FSDP2): Qwen2-VL, "
                                               "Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, and "
                                               "causal LMs for text datasets (README: Models). "
                                               "Unset with no --dataset: the built-in demo.")
    dataset: str | None = _opt(None, "Training data: a JSON array or JSONL file, a parquet file or folder, a folder "
                                     "written by datasets' save_to_disk, or a Hugging Face hub name org/name.")
    dataset_split: str | None = _opt(None, "Split of --dataset (default: train, or its only split).")
    prompt_key: str | None = _opt(None, "Column of the question (default: problem, else prompt, else question).")
    answer_key: str | None = _opt(None, "Column of the final answer, used where there is no solution column "
                                        "(default: answer).")
    solution_key: str | None = _opt(None, "Column of the reference solution ending in its final-answer line (RL), or "
                                          "of the response (SFT rows without messages) (default: solution).")
    image_key: str | None = _opt(None, "Column of the image: a path, HF Image bytes, or a list holding one "
                                       "(default: image_path, else images, else image).")
    key_steps_key: str | None = _opt(None, "Column of the key steps (default: key_steps; without it: none).")
    image_root: str | None = _opt(None, "Directory the rows' image paths are relative to (default: the dataset's).")
    eval_dataset: str | None = _opt(None, "Held-out rows (same formats and columns) scored before and after "
                                          "training.")
    eval_dataset_split: str | None = _opt(None, "Split of --eval_dataset (default: test, else validation, else its "
                                                "only split).")
    output_dir: str | None = _opt(None, "Where checkpoints, metrics.jsonl and TensorBoard events go "
                                        "(default: runs/<demo|run>-<time>).")
    preset: str | None = _opt(None, "Recipe preset applied before --config and the command line.", PRESET_NAMES)
    seed: int = _opt(42, "Seed of every random number generator (data order, sampling, initialisation).")
    learning_rate: float = _opt(1e-6, "Peak AdamW learning rate.")
    lr_scheduler_type: str = _opt("linear", "Learning-rate schedule (transformers.get_scheduler).", LR_SCHEDULERS)
    warmup_ratio: float = _opt(0.0, "Fraction of the steps spent warming up the learning rate.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables).")
    per_device_train_batch_size: int = _opt(1, "Prompts (train) or sequences (sft) per micro-batch.")
    gradient_accumulation_steps: int = _opt(4, "Micro-batches per optimizer step.")
    max_steps: int = _opt(-1, "Optimizer steps to run; -1: derive from --num_train_epochs.")
    num_train_epochs: float = _opt(1.0, "Epochs over the dataset when --max_steps is -1.")
    save_steps: int = _opt(500, "Save a checkpoint every this many optimizer steps (and at the end).")
    save_total_limit: int | None = _opt(None, "Keep only the newest this many checkpoints.")
    logging_steps: int = _opt(1, "Write TensorBoard / W&B scalars every this many steps (metrics.jsonl: every step).")
    report_to: str = _opt("tensorboard", "Trackers, comma-separated: tensorboard, wandb, none.")
    bf16: bool | None = _opt(None, "Train in bfloat16 (default: on when a CUDA GPU supports it).")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    min_pixels: int = _opt(MIN_PIXELS, "Smallest image area after resizing (pixels).")
    max_pixels: int = _opt(MAX_PIXELS, "Largest image area after resizing (pixels).")
    skip_invalid: bool = _opt(False, "Skip (and count) invalid rows and over-long prompts instead of stopping.")
    resume_from_checkpoint: str | None = _opt(None, "A checkpoint directory, or 'latest' in --output_dir.")
    overwrite_output_dir: bool = _opt(False, "Replace the checkpoints and logs of another run in --output_dir "
                                             "(without it, a new run refuses such a directory).")
    device: str = _opt("auto", "Training device: auto (cuda if present), cuda, cpu.", DEVICES)
    fsdp: bool = _opt(False, "Under torchrun, shard the policy (and reference) with FSDP2 per decoder layer and the "
                             "vision tower, instead of DDP replicas.")

    run_kind = "run"  # names the default output directory

    def __post_init__(self) -> None:
        self.resolve()

    def resolve(self) -> None:
        """Give every machine-dependent ``auto`` / ``None`` its value (idempotent: a resolved config stays as is)."""
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.bf16 is None:
            self.bf16 = self.device == "cuda" and torch.cuda.is_bf16_supported()
        if self.output_dir is None:
            kind = "demo" if self.is_demo and self.run_kind == "run" else self.run_kind
            stamp = time.strftime("%Y%m%d-%H%M%S")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank must agree on one directory
                run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
                if run_id == "none":  # torchrun without --standalone or --rdzv_id
                    raise ConfigError("under torchrun, pass --output_dir (or launch with torchrun --standalone)")
                stamp = run_id  # the same on every rank
            self.output_dir = str(Path("runs") / f"{kind}-{stamp}")

    def validate(self) -> None:
        """Every check that needs no model and no data, so that a bad option fails before anything is loaded or
        written."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number, got {value}")
        if not self.is_demo:
            if self.model_name_or_path is None or self.dataset is None:
                raise ConfigError("--model_name_or_path and --dataset are both needed"
                                  + (" (or neither, for the demo)" if self.run_kind == "run" else ""))
            check_model_path(self.model_name_or_path)
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps",
                    "min_pixels", "max_pixels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"--save_total_limit must be >= 1 (or unset: keep all), got {self.save_total_limit}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.num_train_epochs > 0:
            raise ConfigError(f"--num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.fsdp and "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
            raise ConfigError("--fsdp shards the model over torchrun's processes: launch with torchrun "
                              "(e.g. torchrun --nproc_per_node 2 -m r1vl_fast.train ...)")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"--min_pixels ({self.min_pixels}) exceeds --max_pixels ({self.max_pixels})")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"--max_steps must be >= 1, or -1 to use --num_train_epochs; got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate < 0:
            raise ConfigError(f"--learning_rate must be >= 0, got {self.learning_rate}")
        for name in self.trackers:
            if name not in ("tensorboard", "wandb"):
                raise ConfigError(f"--report_to: unknown tracker {name!r} (tensorboard, wandb, none)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")

    @property
    def trackers(self) -> list[str]:
        return [t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none"]

    @property
    def is_demo(self) -> bool:
        return self.preset == "demo"

    def columns(self) -> Columns:
        """Which dataset column holds what (the --*_key options)."""
        return Columns(prompt=self.prompt_key, answer=self.answer_key, image=self.image_key,
                       solution=self.solution_key, key_steps=self.key_steps_key)


@dataclass
class GRPOTrainConfig(RunConfig):
    """StepGRPO (``python -m r1vl_fast.train``)."""

    num_generations: int = _opt(4, "G: completions sampled per prompt.")
    temperature: float = _opt(1.2, "Sampling temperature of the rollouts.")
    top_p: float = _opt(1.0, "Nucleus sampling threshold of the rollouts.")
    top_k: int = _opt(0, "Top-k sampling of the rollouts (0: off).")
    logprob_temperature: float | None = _opt(None, "Temperature the log-probs are scored at (default: "
                                                   "--temperature; the r1vl presets use 1.0 as released).")
    max_prompt_length: int = _opt(512, "Longest prompt in tokens, image tokens included; longer prompts are "
                                       "reported (never cut), or skipped with --skip_invalid.")
    max_completion_length: int = _opt(1024, "Most tokens sampled per completion.")
    beta: float = _opt(0.04, "KL coefficient (0: no reference model).")
    kl_estimator: str = _opt("k3", "KL estimator.", KL_ESTIMATORS)
    epsilon: float = _opt(0.2, "PPO clip range below 1 (and above, unless --epsilon_high).")
    epsilon_high: float | None = _opt(None, "PPO clip range above 1 (default: --epsilon).")
    delta: float | None = _opt(None, "Upper bound on the unclipped ratio (two-sided clipping).")
    loss_type: str = _opt("grpo", "Loss reduction.", LOSS_TYPES)
    num_iterations: int = _opt(1, "mu: policy updates per rollout batch.")
    scale_rewards: str = _opt("group", "Advantage scale: group std (GRPO), batch std, or none (Dr. GRPO).",
                              ADV_SCALES)
    reward_preset: str = _opt("paper", "Reward definitions (SPEC): paper, or r1vl (the released code).",
                              REWARD_PRESETS)
    step_rar_alpha: float = _opt(0.1, "alpha: weight of the key-step fraction in StepRAR.")
    loss_impl: str = _opt("auto", "GRPO loss: the fused Triton kernel (triton), the PyTorch reference (torch), or "
                                  "auto (Triton on CUDA, the reference on CPU).", IMPLS)
    fused_lm_head: bool = _opt(True, "Fuse the LM head into the GRPO loss and the old / reference log-probs: no "
                                     "[B, T, V] logits tensor (false: materialise the logits, as TRL does).")
    share_prompt: bool = _opt(True, "Run each prompt (and its image) once for its G completions, which attend to "
                                    "its keys and values, instead of repeating it G times: exact, and cheaper.")
    max_tokens_per_micro_batch: int = _opt(0, "Token budget of one update micro-batch: whole groups (a prompt and "
                                              "its G completions), counting the tokens the pass computes (the "
                                              "prompt once per group with --share_prompt, completions padded to "
                                              "the micro-batch's longest). 0: the most one micro-batch of "
                                              "per_device_train_batch_size prompts could take (longest prompt and "
                                              "completions), so memory never exceeds that; config.json records "
                                              "the value.")
    max_tokens_per_forward: int = _opt(0, "Token budget of the no-grad passes (old policy, reference), which keep no "
                                          "activations: 0 = 4 x --max_tokens_per_micro_batch.")
    freeze_vision: bool = _opt(False, "Keep the vision encoder frozen (EasyR1's freeze_vision_tower); its image "
                                      "embeddings are then computed once per rollout batch and reused by every "
                                      "pass.")
    rollout_engine: str = _opt("auto", "Rollout engine: vllm (colocated, in-process), hf (transformers generate), or "
                                       "auto (vllm when importable on a GPU, else hf).", ENGINES)
    vllm_gpu_memory_utilization: float = _opt(0.3, "Fraction of the device memory vLLM may take (weights + KV "
                                                   "cache); on CPU, of the node's memory.")
    vllm_sleep_mode: bool | None = _opt(None, "Release vLLM's memory between rollouts (default: on with CUDA).")
    vllm_importance_sampling_correction: bool = _opt(True, "Reweight the policy term by pi_trainer / pi_sampler "
                                                           "(vLLM's log-probs differ slightly from the trainer's).")
    vllm_importance_sampling_mode: str = _opt("token_truncate", "Per-token or per-sequence ratio, capped (truncate) "
                                                                "or zeroed above the cap (mask).",
                                              IS_MODES)
    vllm_importance_sampling_cap: float = _opt(2.0, "Cap of the importance ratio.")
    eval_steps: int = _opt(0, "Score --eval_dataset with the current policy every this many steps and log it as "
                              "eval/* metrics (0: only before and after training).")
    log_completions_steps: int = _opt(10, "Write sample completions to completions.jsonl every this many steps.")
    num_completions_to_log: int = _opt(4, "Completions written each time.")
    sft_steps: int = _opt(300, "Demo only: SFT warm-up steps before StepGRPO.")
    demo_arch: str = _opt("qwen2-vl", "Demo only: the family of the tiny model it builds and trains: qwen2-vl, "
                                      "qwen2.5-vl, qwen3-vl, qwen3-vl-moe (MoE), qwen3.5 (Gated DeltaNet + "
                                      "attention), qwen3.5-moe.", DEMO_ARCHS)

    def resolve(self) -> None:
        super().resolve()
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.logprob_temperature is None:
            self.logprob_temperature = self.temperature
        if self.loss_impl == "auto":
            self.loss_impl = resolve_impl("auto", self.device)
        if self.rollout_engine == "auto":
            self.rollout_engine = resolve_engine("auto", self.device)
        if self.vllm_sleep_mode is None:
            self.vllm_sleep_mode = default_sleep_mode(self.device)
        if not self.max_tokens_per_micro_batch:
            self.max_tokens_per_micro_batch = self.default_token_budget(self.share_prompt)
        if not self.max_tokens_per_forward:
            self.max_tokens_per_forward = 4 * self.max_tokens_per_micro_batch

    def default_token_budget(self, shared: bool) -> int:
        """The tokens one micro-batch of per_device_train_batch_size prompts computes at the longest prompt and
        completions: each prompt once (shared layout) or G times, plus G completions each."""
        G, P = self.num_generations, self.per_device_train_batch_size
        return P * ((1 if shared else G) * self.max_prompt_length + G * self.max_completion_length)

    def loss_config(self) -> GRPOConfig:
        """The GRPO loss settings of this run (built once by the trainer)."""
        assert self.epsilon_high is not None and self.logprob_temperature is not None  # resolved
        return GRPOConfig(beta=self.beta, kl=self.kl_estimator, eps_low=self.epsilon, eps_high=self.epsilon_high,
                          delta=self.delta, loss_type=self.loss_type, temperature=self.logprob_temperature,
                          max_completion_length=self.max_completion_length, group_size=self.num_generations,
                          scale_rewards=self.scale_rewards)

    def validate(self) -> None:
        super().validate()
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0 (0: off), got {self.top_k}")
        if self.sft_steps < 1:
            raise ConfigError(f"--sft_steps must be >= 1, got {self.sft_steps}")
        if self.num_generations < 2:
            raise ConfigError(f"--num_generations must be >= 2 (advantages compare completions), "
                             f"got {self.num_generations}")
        for name in ("max_prompt_length", "max_completion_length", "num_iterations", "log_completions_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_tokens_per_micro_batch", "max_tokens_per_forward"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0 (0: the default budget), got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.logprob_temperature is not None and not self.logprob_temperature > 0:
            raise ConfigError(f"--logprob_temperature must be > 0, got {self.logprob_temperature}")
        if self.beta < 0:
            raise ConfigError(f"--beta must be >= 0, got {self.beta}")
        if self.eval_steps < 0:
            raise ConfigError(f"--eval_steps must be >= 0, got {self.eval_steps}")
        if self.eval_steps > 0 and self.eval_dataset is None:
            raise ConfigError("--eval_steps needs --eval_dataset (the held-out rows to score)")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"--vllm_gpu_memory_utilization must be in (0, 1], "
                              f"got {self.vllm_gpu_memory_utilization}")
        if not self.vllm_importance_sampling_cap > 0:
            raise ConfigError(f"--vllm_importance_sampling_cap must be > 0, got {self.vllm_importance_sampling_cap}")
        try:
            self.loss_config()  # the loss's own checks (clip ranges, delta, ...), named as options
        except ValueError as e:
            names = {"eps_low": "--epsilon", "eps_high": "--epsilon_high", "delta": "--delta", "beta": "--beta",
                     "temperature": "--logprob_temperature", "kl": "--kl_estimator"}
            message = str(e)
            for name, option in names.items():
                message = re.sub(rf"\b{name}\b", option, message)
            raise ConfigError(message) from None


@dataclass
class SFTConfig(RunConfig):
    """SFT warm-up on Mulberry-format data (``python -m r1vl_fast.sft``)."""

    run_kind = "sft"

    learning_rate: float = _opt(2e-5, "Peak AdamW learning rate.")
    lr_scheduler_type: str = _opt("cosine", "Learning-rate schedule (transformers.get_scheduler).", LR_SCHEDULERS)
    warmup_ratio: float = _opt(0.03, "Fraction of the steps spent warming up the learning rate.")
    num_train_epochs: float = _opt(2.0, "Epochs over the dataset when --max_steps is -1.")
    max_length: int = _opt(2048, "Longest training sequence in tokens (prompt + response); longer rows are "
                                 "reported, or skipped with --skip_invalid.")


# Presets (SPEC.md, "Recipe"). The released scripts ran 4 GPUs with per-device batch 1 x accumulation 4 for RL and
# a global batch of 128 for SFT; on one process we keep the per-device values.
_R1VL_RL = dict(num_generations=4, temperature=1.2, logprob_temperature=1.0, max_prompt_length=512,
                max_completion_length=1024, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, learning_rate=1e-6,
                lr_scheduler_type="linear", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, beta=0.04,
                per_device_train_batch_size=1, gradient_accumulation_steps=4, bf16=True, max_steps=13125,
                reward_preset="r1vl", loss_type="grpo", num_iterations=1, kl_estimator="k3",
                gradient_checkpointing=True)
_R1VL_SFT = dict(lr_scheduler_type="cosine", warmup_ratio=0.03, num_train_epochs=2.0, per_device_train_batch_size=4,
                 gradient_accumulation_steps=8, bf16=True, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS,
                 gradient_checkpointing=True)
PRESETS: dict[str, dict[type, dict[str, Any]]] = {  # keyed by PRESET_NAMES
    "r1vl-2b": {GRPOTrainConfig: _R1VL_RL, SFTConfig: {**_R1VL_SFT, "learning_rate": 2e-5}},
    "r1vl-7b": {GRPOTrainConfig: {**_R1VL_RL, "temperature": 1.0}, SFTConfig: {**_R1VL_SFT, "learning_rate": 5e-6}},
    "demo": {
        GRPOTrainConfig: dict(
            num_generations=4, temperature=1.0, max_prompt_length=64, max_completion_length=100, min_pixels=3136,
            max_pixels=3136, learning_rate=1e-4, lr_scheduler_type="constant", warmup_ratio=0.0, beta=0.01,
            per_device_train_batch_size=16, gradient_accumulation_steps=1, max_steps=240, save_steps=50,
            log_completions_steps=10, bf16=False, device="cpu",
        ),
        SFTConfig: dict(
            learning_rate=2e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, per_device_train_batch_size=8,
            gradient_accumulation_steps=1, max_steps=150, save_steps=1000, max_length=160, min_pixels=3136,
            max_pixels=3136, bf16=False, device="cpu",
        ),
    },
}


# The folders the demo keeps in its output directory beside StepGRPO's checkpoints: its data, its initial model and
# its SFT warm-up.
DEMO_DIRS = ("data", "init", "sft")


def is_demo_dir(path: Path) -> bool:
    """The demo's output directory: its data and initial model are the first things it writes."""
    return (path / "data").is_dir() and (path / "init").is_dir()


def check_model_path(name: str, option: str = "--model_name_or_path") -> None:
    """A local model directory that exists (a checkpoint of ours: complete, by its manifest), or a hub id
    (``org/name``); anything else is a path that does not exist, said so before transformers turns it into a hub
    error."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {name}: not a model directory (a save_pretrained folder)")
        from r1vl_fast.checkpoint import MANIFEST_FILE, STATE_FILE, check_checkpoint

        if (path / MANIFEST_FILE).is_file() or (path / STATE_FILE).is_file():  # a checkpoint: the weights' sizes
            check_checkpoint(path, option=option, hashes=False)
        return
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None and ".." not in name
    if not hub_id or name.startswith((".", "~")):
        raise ConfigError(f"{option} {name}: the path does not exist")


def _unwrap(annotation: Any) -> tuple[type, bool]:
    """(base type, optional?) of a field annotation such as ``int | None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {**vars(typing), **vars(types)}, {})  # dataclass string annotations
    args = typing.get_args(annotation)
    if args and type(None) in args:
        base = next(a for a in args if a is not type(None))
        return base, True
    return annotation, False


def _parse_value(name: str, text: str, *, base: type, optional: bool) -> Any:
    if optional and text.lower() in ("none", "null", ""):
        return None
    if base is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"--{name} expects true or false, got {text!r}")
    try:
        return base(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--{name} expects {base.__name__}, got {text!r}") from None


def _yaml_value(path: Path, f: dataclasses.Field, value: Any) -> Any:
    """A ``--config`` value, parsed and checked as the same option on the command line: YAML's own types do not
    slip through (``bf16: "false"`` is false, ``save_steps: 1.5`` and ``report_to: 5`` are errors, and
    ``learning_rate: 1e-5``, a string to YAML, is a float)."""
    base, optional = _unwrap(f.type)
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = str(value)
    else:
        raise ConfigError(f"{path}: option {f.name!r} expects {base.__name__}, got {type(value).__name__} {value!r}")
    if base is str and not isinstance(value, str) and value is not None:
        raise ConfigError(f"{path}: option {f.name!r} expects a string, got {type(value).__name__} {value!r}")
    if base is int and isinstance(value, float):
        raise ConfigError(f"{path}: option {f.name!r} expects int, got {value!r}")
    try:
        return _parse_value(f.name, text, base=base, optional=optional)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{path}: {e}") from None


def build_parser(cls: type[RunConfig], prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=(cls.__doc__ or "").strip(), formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="A YAML file of option: value pairs (overrides the preset).")
    for f in dataclasses.fields(cls):
        base, optional = _unwrap(f.type)
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(choices)}." if choices else ""
        help_text = f"{f.metadata.get('help', '')}{extra} (default: {f.default})".replace("%", "%%")
        parser.add_argument(
            f"--{f.name}", metavar=base.__name__.upper(), nargs="?" if base is bool else None,
            const="true" if base is bool else None, help=help_text,
            type=functools.partial(_parse_value, f.name, base=base, optional=optional),
        )
    return parser


def parse_config(cls: type[RunConfig], argv: list[str] | None, prog: str) -> RunConfig:
    """Command line (and its --config YAML and --preset) → a validated config of type ``cls``."""
    args = vars(build_parser(cls, prog).parse_args(argv))
    from_yaml: dict[str, Any] = {}
    if "config" in args:
        path = Path(args.pop("config"))
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file {path}")
        from_yaml = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(from_yaml, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value, got {type(from_yaml).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in from_yaml:
            if key not in fields:
                raise ConfigError(f"{path}: unknown option {key!r}")
        from_yaml = {key: _yaml_value(path, fields[key], value) for key, value in from_yaml.items()}
    preset = args.get("preset", from_yaml.get("preset"))
    given = set(args) | set(from_yaml)
    resume = args.get("resume_from_checkpoint", from_yaml.get("resume_from_checkpoint"))
    output_dir = args.get("output_dir", from_yaml.get("output_dir"))
    if resume == "latest" and output_dir is None:
        raise ConfigError("--resume_from_checkpoint latest needs the --output_dir of the run to continue")
    values: dict[str, Any] = {}
    resumed = None
    if resume is not None and not (output_dir is not None and is_demo_dir(Path(output_dir))
                                   and not given & {"dataset", "model_name_or_path"}):
        from r1vl_fast.resume import resumed_options

        resumed = resumed_options(cls, resume, output_dir)
    if resumed is not None:  # the checkpoint's resolved options; those given again are checked against them
        values.update(resumed)
        preset = values.get("preset")
    elif resume is not None and not given & {"dataset", "model_name_or_path"} and (
            resume != "latest" or (Path(str(output_dir)).is_dir() and not is_demo_dir(Path(str(output_dir))))):
        if resume != "latest" and not Path(resume).exists():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint")
        where = f"in {output_dir}" if resume == "latest" else "there"
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no checkpoint {where} with the run's options "
                                f"(run.json) to resume from; pass --model_name_or_path and --dataset")
    else:
        if preset is None and cls is GRPOTrainConfig and not given & {"dataset", "model_name_or_path"}:
            preset = "demo"  # no data and no model: the built-in demo
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"--preset must be one of {tuple(PRESETS)}, got {preset!r}")
            values.update(PRESETS[preset].get(cls, {}), preset=preset)
    values.update(from_yaml)
    values.update(args)
    if "sft_steps" in given and preset != "demo":
        raise ConfigError("--sft_steps sets the demo's SFT warm-up; for a real run, warm up with "
                          "python -m r1vl_fast.sft and pass its checkpoint as --model_name_or_path")
    if "demo_arch" in given and preset != "demo":
        raise ConfigError("--demo_arch picks the demo's tiny model; a real run takes its model from "
                          "--model_name_or_path")
    if preset == "demo" and cls is GRPOTrainConfig:
        pixels = DEMO_PIXELS.get(values.get("demo_arch", "qwen2-vl"), 3136)
        values.update({k: pixels for k in ("min_pixels", "max_pixels") if k not in given})
    config = cls(**values)
    config.validate()
    if isinstance(config, GRPOTrainConfig) and "kl_estimator" in given and config.beta == 0:
        log.warning("--kl_estimator %s has no effect with --beta 0 (no KL term, no reference model)",
                    config.kl_estimator)
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
