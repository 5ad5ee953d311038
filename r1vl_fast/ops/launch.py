"""How the Triton kernels are launched: their tuning (vocabulary block, warps, persistent grid) and one builder per
kernel that turns tensors into a :class:`Launch` (the kernel, its grid, its arguments by name, its constexprs).

The ops run ``Launch.run()``. The compile check (``tests/test_kernels_compile.py``) calls the same builders on
``meta`` tensors with ``device_type="cuda"`` and compiles ``Launch.signature()`` ahead of time for sm_80 and sm_90,
so the signatures it checks are, by construction, the ones the ops launch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from r1vl_fast.ops.config import KL_ESTIMATORS, GRPOConfig

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}
SCALE_MODES = {"none": 0, "group": 1, "batch": 2}  # the kernel's scale_mode for GRPOConfig.scale_rewards
LOG2E = 1.4426950408889634
# Programs per SM of the persistent grid: one row in flight per SM keeps pass 2's re-read of a row in L2
# (132 SMs x ~300 KB bf16 rows ~ 40 MB, inside an H100/H200's 50 MB).
CTAS_PER_SM = 1
# Register bound per thread on a GPU. Without one, ptxas under Triton 3.6 aims at 4 CTAs per SM (64 registers) and
# spills the fp32 / fp64 GRPO kernel; the persistent grid runs one CTA per SM, so 128 costs no occupancy.
MAXNREG = 128


@dataclass
class Tuning:
    """Overrides for tests: ``block_v`` (vocabulary columns per step; several blocks per row exercise the online
    log-sum-exp across blocks) and ``programs`` (the persistent grid; fewer programs than rows exercise the row
    loop). ``None`` keeps each device's default."""

    block_v: int | None = None
    programs: int | None = None


TUNING = Tuning()


@contextlib.contextmanager
def tuning(block_v: int | None = None, programs: int | None = None) -> Iterator[None]:
    previous = (TUNING.block_v, TUNING.programs)
    TUNING.block_v, TUNING.programs = block_v, programs
    try:
        yield
    finally:
        TUNING.block_v, TUNING.programs = previous


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_and_warps(vocab: int, device_type: str) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096 columns over 8 warps on a GPU (16 per thread); the interpreter is fastest with
    the widest block it can take."""
    if TUNING.block_v is not None:
        return TUNING.block_v, 8 if device_type == "cuda" else 1
    if device_type == "cuda":
        return min(_next_pow2(vocab), 4096), 8
    return min(_next_pow2(vocab), 8192), 1


def grid_size(rows: int, device: torch.device) -> int:
    """Programs of the persistent grid: about one per SM on a GPU, one per row elsewhere."""
    if rows == 0:
        return 0
    if TUNING.programs is not None:
        return min(rows, TUNING.programs)
    if device.type == "cuda":
        return min(rows, torch.cuda.get_device_properties(device).multi_processor_count * CTAS_PER_SM)
    return rows


def triton_type(value: Any) -> str:
    """The Triton signature type of one runtime argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a runtime kernel argument: {value!r}")
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    return "fp32"


@dataclass
class Launch:
    kernel: Any  # a triton.JITFunction
    rows: int
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    device_type: str = "cpu"  # what the launch is built for: "cuda" adds the GPU-only compile options
    grid: tuple[int, ...] | None = None  # a fixed grid (else the persistent grid over ``rows``)
    maxnreg: int | None = MAXNREG  # the register bound on a GPU (None: the compiler's)
    num_stages: int | None = None  # software pipelining of tl.dot loads (None: the compiler's)

    @property
    def options(self) -> dict[str, Any]:
        """Compile options: the warps, and on a GPU the register bound and the pipeline depth."""
        gpu = self.device_type == "cuda"
        return {"num_warps": self.num_warps, **({"maxnreg": self.maxnreg} if gpu and self.maxnreg else {}),
                **({"num_stages": self.num_stages} if gpu and self.num_stages else {})}

    @property
    def name(self) -> str:
        return str(self.kernel.fn.__name__)

    def signature(self) -> dict[str, str]:
        """The kernel's signature for ``triton.compile`` (every argument, in order; constexprs marked)."""
        return {n: "constexpr" if n in self.constexprs else triton_type(self.args[n]) for n in self.kernel.arg_names}

    def run(self) -> None:
        grid = self.grid if self.grid is not None else (grid_size(self.rows, self.device),)
        if all(grid):
            self.kernel[grid](**self.args, **self.constexprs, **self.options)


def _kernels() -> Any:
    from r1vl_fast.kernels import grpo_loss  # triton is needed only when the kernels run

    return grpo_loss


def _layout(logits: torch.Tensor, length: int) -> dict[str, Any]:
    return dict(stride_b=logits.stride(0), stride_t=logits.stride(1), T=length, V=logits.shape[-1],
                n_rows=logits.shape[0] * length)


def log_probs_fwd(logits: torch.Tensor, ids: torch.Tensor, temperature: float, entropy: bool, *,
                  device_type: str | None = None) -> tuple[Launch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch of the selective log-probs forward over rows (b, t < ids.shape[1]) of ``logits``; returns it with its
    outputs logp, lse2 (base-2 log-sum-exp, for the backward) and the entropy (a 1-element dummy without it)."""
    batch, length = ids.shape
    f32: dict[str, Any] = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty((batch, length), **f32)
    lse = torch.empty((batch, length), **f32)
    ent = torch.empty((batch, length), **f32) if entropy else torch.zeros(1, **f32)
    block, warps = block_and_warps(logits.shape[-1], device_type or logits.device.type)
    args = dict(logits_ptr=logits, **_layout(logits, length), ids_ptr=ids, scale2=LOG2E / temperature,
                logp_ptr=logp, lse_ptr=lse, entropy_ptr=ent)
    launch = Launch(_kernels().selective_log_probs_fwd_kernel, batch * length, args,
                    dict(BLOCK_V=block, ENTROPY=entropy), warps, logits.device, device_type or logits.device.type)
    return launch, logp, lse, ent


def log_probs_bwd(logits: torch.Tensor, ids: torch.Tensor, temperature: float, lse: torch.Tensor, ent: torch.Tensor,
                  grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None, grad: torch.Tensor, *,
                  device_type: str | None = None) -> Launch:
    """Launch that writes d/d logits of Σ grad_logp·logp (+ grad_entropy·H) into ``grad`` (same layout as the
    logits, possibly the logits themselves) for rows (b, t < ids.shape[1])."""
    length = ids.shape[1]
    block, warps = block_and_warps(logits.shape[-1], device_type or logits.device.type)
    args = dict(logits_ptr=logits, **_layout(logits, length), ids_ptr=ids, scale2=LOG2E / temperature,
                inv_temp=1.0 / temperature, lse_ptr=lse, entropy_ptr=ent, grad_logp_ptr=grad_logp,
                grad_entropy_ptr=grad_entropy if grad_entropy is not None else lse, grad_ptr=grad,
                grad_stride_b=grad.stride(0), grad_stride_t=grad.stride(1))
    return Launch(_kernels().selective_log_probs_bwd_kernel, ids.numel(), args,
                  dict(BLOCK_V=block, ENTROPY_GRAD=grad_entropy is not None), warps, logits.device,
                  device_type or logits.device.type)


def scale_rows(grad: torch.Tensor, length: int, g: torch.Tensor, *, device_type: str | None = None) -> Launch:
    """Launch that multiplies rows (b, t < length) of ``grad`` by the device scalar ``g`` (nothing when g == 1)."""
    block, warps = block_and_warps(grad.shape[-1], device_type or grad.device.type)
    args = dict(grad_ptr=grad, grad_stride_b=grad.stride(0), grad_stride_t=grad.stride(1), T=length,
                V=grad.shape[-1], n_rows=grad.shape[0] * length, g_ptr=g)
    return Launch(_kernels().scale_rows_kernel, grad.shape[0] * length, args, dict(BLOCK_V=block), warps, grad.device,
                  device_type or grad.device.type)


@dataclass
class GRPOOutputs:
    """Per token row: the weighted loss, logp, KL, clip flags (bit 0 low, bit 1 high), entropy (or a dummy),
    lse2 and the gradient coefficient coef = loss_scale · w · dℓ/dlogp; per sequence: the advantages the kernel
    computed from rewards (or a dummy)."""

    loss: torch.Tensor
    logp: torch.Tensor
    kl: torch.Tensor
    flags: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    coef: torch.Tensor
    advantages: torch.Tensor


def grpo_fwd(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, config: GRPOConfig, *,
             advantages: torch.Tensor | None, rewards: torch.Tensor | None, batch_std: torch.Tensor | None,
             old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, is_weights: torch.Tensor | None,
             loss_scale: float, entropy: bool, grad: torch.Tensor | None,
             device_type: str | None = None) -> tuple[Launch, GRPOOutputs]:
    """Launch of the fused GRPO loss over rows (b, t < ids.shape[1]); with ``grad`` (the logits' layout, possibly
    the logits themselves) it also writes the logits gradient. Every tensor argument is fp32 and contiguous but
    the logits, ``ids`` (int64) and ``grad``."""
    batch, length = ids.shape
    f32: dict[str, Any] = dict(dtype=torch.float32, device=logits.device)
    out = GRPOOutputs(
        loss=torch.empty((batch, length), **f32), logp=torch.empty((batch, length), **f32),
        kl=torch.empty((batch, length), **f32),
        flags=torch.empty((batch, length), dtype=torch.int8, device=logits.device),
        entropy=torch.empty((batch, length), **f32) if entropy else torch.zeros(1, **f32),
        lse=torch.empty((batch, length), **f32), coef=torch.empty((batch, length), **f32),
        advantages=torch.empty(batch, **f32) if rewards is not None else torch.zeros(1, **f32),
    )
    dummy = out.lse
    block, warps = block_and_warps(logits.shape[-1], device_type or logits.device.type)
    write_grad = grad is not None
    grad = grad if grad is not None else torch.empty(0, dtype=logits.dtype, device=logits.device)
    args = dict(
        logits_ptr=logits, **_layout(logits, length), ids_ptr=ids, weight_ptr=weights,
        adv_ptr=out.advantages if rewards is not None else advantages, rewards_ptr=rewards if rewards is not None
        else dummy, group_size=config.group_size or 1, adv_eps=config.adv_eps,
        batch_std_ptr=batch_std if batch_std is not None else dummy,
        old_ptr=old_logp if old_logp is not None else dummy, ref_ptr=ref_logp if ref_logp is not None else dummy,
        is_ptr=is_weights if is_weights is not None else dummy,
        scale2=LOG2E / config.temperature, inv_temp=1.0 / config.temperature, beta=config.beta,
        clip_low=1.0 - config.eps_low, clip_high=1.0 + config.eps_high,
        delta=config.delta if config.delta is not None else math.inf, loss_scale=loss_scale,
        from_rewards=int(rewards is not None), scale_mode=SCALE_MODES[config.scale_rewards],
        unbiased=int(config.adv_unbiased), has_old=int(old_logp is not None), has_ref=int(ref_logp is not None),
        has_is=int(is_weights is not None), has_delta=int(config.delta is not None),
        kl_kind=KL_ESTIMATORS.index(config.kl) + 1,
        always_read=int(old_logp is not None or ref_logp is not None or entropy),
        loss_ptr=out.loss, logp_ptr=out.logp, kl_ptr=out.kl, flags_ptr=out.flags, entropy_ptr=out.entropy,
        lse_ptr=out.lse, coef_ptr=out.coef, grad_ptr=grad,
        grad_stride_b=grad.stride(0) if write_grad else 0, grad_stride_t=grad.stride(1) if write_grad else 0,
    )
    launch = Launch(_kernels().grpo_loss_fwd_kernel, batch * length, args,
                    dict(BLOCK_V=block, ENTROPY=entropy, WRITE_GRAD=write_grad), warps, logits.device,
                    device_type or logits.device.type)
    return launch, out


# The LM head fused in: token tiles × vocabulary tiles × hidden tiles through tl.dot.
# (BLOCK_M, BLOCK_V, BLOCK_K) over 8 warps on a GPU: chosen with tools/compile_kernels.py as the widest tiles that
# compile without spills (no stack, no local memory) on sm_80 and sm_90; fp32 tiles are thinner in K.
LINEAR_BLOCKS = {"cuda": (64, 128, 32), "cuda-fp32": (64, 128, 16), "cpu": (16, 64, 32)}


def linear_lse_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                   temperature: float, entropy: bool, *, device_type: str | None = None,
                   splits: int | None = None) -> tuple[Launch, dict[str, torch.Tensor]]:
    """Launch of the fused LM-head log-sum-exp over rows of ``hidden`` [N, H] (``weight`` [V, H], row-major):
    partial (max, Σ exp2, Σ e·z, target logit) per vocabulary slice, [splits, N] each, all in base 2. The
    vocabulary is split so that about four programs per SM run on a GPU (``splits`` overrides it). Offsets are
    32-bit: N·H, V·H and splits·N must stay below 2^31 (``linear_fits``)."""
    device_type = device_type or hidden.device.type
    n, h = hidden.shape
    vocab = weight.shape[0]
    if device_type == "cuda":
        block_m, block_v, block_k = LINEAR_BLOCKS["cuda-fp32" if hidden.dtype == torch.float32 else "cuda"]
    else:
        block_m, block_v, block_k = LINEAR_BLOCKS["cpu"]
    if TUNING.block_v is not None:
        block_v = TUNING.block_v
    row_blocks = max(1, -(-n // block_m))
    tiles = max(1, -(-vocab // block_v))
    if splits is None:
        sms = (torch.cuda.get_device_properties(hidden.device).multi_processor_count
               if hidden.device.type == "cuda" else 1)
        splits = max(1, min(tiles, -(-4 * sms // row_blocks))) if device_type == "cuda" else min(tiles, 2)
    cols_per_split = -(-tiles // splits) * block_v
    splits = -(-vocab // cols_per_split)
    f32: dict[str, Any] = dict(dtype=torch.float32, device=hidden.device)
    out = {name: torch.empty((splits, n), **f32) for name in ("m", "s", "target")}
    out["zp"] = torch.empty((splits, n), **f32) if entropy else torch.zeros(1, **f32)
    args = dict(h_ptr=hidden, w_ptr=weight, bias_ptr=bias if bias is not None else weight, ids_ptr=ids,
                m_ptr=out["m"], s_ptr=out["s"], zp_ptr=out["zp"], target_ptr=out["target"], N=n, V=vocab, H=h,
                stride_h=hidden.stride(0), stride_w=weight.stride(0), scale2=LOG2E / temperature,
                cols_per_split=cols_per_split)
    constexprs = dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, HAS_BIAS=bias is not None,
                      ENTROPY=entropy, IEEE=hidden.dtype == torch.float32)
    launch = Launch(_kernels().linear_lse_fwd_kernel, n, args, constexprs, 8 if device_type == "cuda" else 4,
                    hidden.device, device_type,
                    grid=(row_blocks if n else 0, splits), maxnreg=None,
                    num_stages=2 if hidden.dtype == torch.float32 else 3)
    return launch, out


def linear_fits(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear_lse_fwd`'s 32-bit offsets reach every element (else the PyTorch path runs)."""
    return hidden.numel() < 2**31 and weight.numel() < 2**31 and hidden.shape[0] * 2048 < 2**31
