"""The policy-update ops: selective log-probs, group advantages and the fused GRPO loss.

Each op checks its inputs (errors name the argument), then runs the Triton kernels of ``r1vl_fast.kernels``
(``impl="triton"``, launched through ``r1vl_fast.ops.launch``) or the plain-PyTorch twin of
``r1vl_fast.ops.reference`` (``impl="torch"``); ``"auto"`` is resolved by :func:`r1vl_fast.ops.config.resolve_impl`
(Triton on CUDA tensors, PyTorch otherwise). With ``validate=False`` the checks that read tensor values (id range,
mask values, finite rewards), and so wait for the device, are skipped: the trainer's ids, masks and rewards come
from its own sampler and reward code. Under ``torch.compile`` they are skipped too (they would break the graph),
and the kernels run as the custom ops of ``r1vl_fast.ops.library``.
"""

from __future__ import annotations

from typing import Any

import torch

from r1vl_fast.ops import launch as L
from r1vl_fast.ops import library, reference
from r1vl_fast.ops.config import ADV_SCALES, GRPOConfig, resolve_impl, token_weights


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a [B, T, V] tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.shape[-1] > 0 and logits.stride(-1) != 1:
        raise ValueError(f"logits must be contiguous in the vocabulary dimension, got strides {logits.stride()}")


def _check_bt(name: str, x: torch.Tensor | None, batch: int, length: int, device: torch.device) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [B, T] = [{batch}, {length}], got {getattr(x, 'shape', type(x))}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logits are on {device}")


def _check_id_dtype(ids: torch.Tensor) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")


def _check_ids(ids: torch.Tensor, vocab: int, where: torch.Tensor | None = None) -> None:
    bad = (ids < 0) | (ids >= vocab)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        b, t = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"ids[{b}, {t}] = {int(ids[b, t])} is outside the vocabulary [0, {vocab})")


# ---------------------------------------------------------------------------------------- selective log-probs


def selective_log_probs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    validate: bool = True,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-probabilities of ``ids`` [B, T] under softmax(logits / temperature), logits [B, T, V] in any
    float dtype (last dimension contiguous, any strides otherwise); optionally also the entropy per token.
    Differentiable; without grad (old or reference policy) it reads the logits once and keeps nothing. The kernels
    run as the custom op ``r1vl_fast::log_probs_fwd`` (``r1vl_fast.ops.library``), in eager mode and under
    ``torch.compile`` alike."""
    _check_logits(logits)
    batch, length, vocab = logits.shape
    _check_bt("ids", ids, batch, length, logits.device)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_id_dtype(ids)
    compiling = torch.compiler.is_compiling()
    if validate and not compiling:
        _check_ids(ids, vocab)
    if resolve_impl(impl, logits.device.type) == "torch":
        return reference.selective_log_probs(logits, ids, temperature=temperature, return_entropy=return_entropy)
    # the custom op (eager and compiled alike); its backward writes the gradient from the saved lse
    logp, _, ent = library.log_probs_fwd(logits, ids.to(torch.int64).contiguous(), float(temperature),
                                         return_entropy)
    return (logp, ent) if return_entropy else logp


# ---------------------------------------------------------------------------------------- group advantages


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4, unbiased: bool = True, scale: str = "group"
) -> torch.Tensor:
    """(r − mean_G(r)) / (std + eps) over each prompt's ``group_size`` consecutive completions (fp32, [B]).

    scale ``"group"``: the group's std (GRPO, R1-VL); ``"batch"``: the batch's std; ``"none"``: no division
    (Dr. GRPO). ``unbiased`` divides the variance by G − 1, as torch.std and the R1-VL code do.
    """
    _check_group(rewards, group_size, unbiased, scale)
    return _advantages(rewards, group_size, eps, unbiased, scale)


def _advantages(rewards: torch.Tensor, group_size: int, eps: float, unbiased: bool, scale: str) -> torch.Tensor:
    """group_advantages on checked inputs, in fp32 (fp64 stays fp64)."""
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return reference.group_advantages(rewards.to(dtype), group_size, eps=eps, unbiased=unbiased, scale=scale)


def _check_group(rewards: torch.Tensor, group_size: int, unbiased: bool, scale: str, validate: bool = True) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    if scale not in ADV_SCALES:
        raise ValueError(f"scale must be one of {ADV_SCALES}, got {scale!r}")
    if unbiased and scale == "group" and group_size < 2:
        raise ValueError("an unbiased group std needs group_size >= 2")
    if validate and not bool(torch.isfinite(rewards).all()):
        i = int((~torch.isfinite(rewards)).nonzero()[0])
        raise ValueError(f"rewards[{i}] = {float(rewards[i])} is not finite")


# ---------------------------------------------------------------------------------------- the GRPO loss


def _check_advantage_source(advantages: torch.Tensor | None, rewards: torch.Tensor | None, config: GRPOConfig,
                            batch: int, validate: bool) -> None:
    """Exactly one of advantages [B] or rewards [B] (the latter with ``config.group_size``)."""
    if (advantages is None) == (rewards is None):
        raise ValueError("pass exactly one of advantages= [B] or rewards= [B] (with config.group_size)")
    if advantages is not None and (not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != (batch,)):
        raise ValueError(f"advantages must have shape [B] = [{batch}], got {getattr(advantages, 'shape', None)}")
    if rewards is not None:
        if config.group_size is None:
            raise ValueError("rewards= needs config.group_size (the number of completions per prompt)")
        if tuple(rewards.shape) != (batch,):
            raise ValueError(f"rewards must have shape [B] = [{batch}], got {tuple(rewards.shape)}")
        _check_group(rewards, config.group_size, config.adv_unbiased, config.scale_rewards, validate=validate)


def _finish_gradient(grad: torch.Tensor, logits: torch.Tensor, length: int) -> None:
    """Zero the positions past the completion (they predict nothing); when the gradient was written over the
    logits, bump their version so that anything else that saved them fails loudly."""
    if grad.shape[1] > length:
        grad[:, length:].zero_()
    if grad is logits:
        torch.autograd.graph.increment_version(logits)


class _FusedGRPOLoss(torch.autograd.Function):
    """The loss and its logits gradient in one kernel pass over the vocabulary.

    Immediate (bf16, fp32): the forward writes the gradient (into the logits themselves with ``grad_inplace``);
    backward multiplies it by the upstream gradient only when that is not 1, deciding on the device (no host
    sync). Deferred (fp16, whose per-entry gradients w·p can underflow before a loss scaler multiplies them): the
    forward keeps lse and the per-row coefficient, and backward writes upstream · coef · (onehot − p) / T, scaled
    before it is rounded. Nothing logits-sized is kept but the logits (deferred) or the gradient (immediate)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, kw: dict[str, Any]) -> Any:
        ids, length = kw["ids"], kw["ids"].shape[1]
        deferred = logits.dtype == torch.float16
        grad = None
        if not deferred:
            grad = logits if kw["grad_inplace"] else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        launch, out = L.grpo_fwd(logits, ids, kw["weights"], kw["config"], advantages=kw["advantages"],
                                 rewards=kw["rewards"], batch_std=kw["batch_std"], old_logp=kw["old_logp"],
                                 ref_logp=kw["ref_logp"], is_weights=kw["is_weights"], loss_scale=kw["loss_scale"],
                                 entropy=kw["entropy"], grad=grad)
        launch.run()
        if grad is not None:
            _finish_gradient(grad, logits, length)
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(logits, ids, out.lse, out.coef)
        ctx.deferred, ctx.inplace, ctx.length, ctx.used = deferred, kw["grad_inplace"], length, False
        ctx.temperature = kw["config"].temperature
        outputs = (out.logp, out.kl, out.flags, out.entropy, out.advantages)
        for t in outputs:
            ctx.mark_non_differentiable(t)
        return (out.loss.sum(), *outputs)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> Any:
        library.no_double_backward("grpo_loss")
        if ctx.used:
            raise RuntimeError("grpo_loss's fused gradient can be back-propagated once; compute the loss again")
        ctx.used = True
        g = grad_loss.to(torch.float32).reshape(1)
        if not ctx.deferred:
            (grad,) = ctx.saved_tensors
            L.scale_rows(grad, ctx.length, g).run()  # e.g. (loss / accumulation_steps).backward(); no-op for 1
            return grad, None
        logits, ids, lse, coef = ctx.saved_tensors
        grad = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        L.log_probs_bwd(logits, ids, ctx.temperature, lse, lse, (coef * g).contiguous(), None, grad).run()
        _finish_gradient(grad, logits, ctx.length)
        return grad, None


def grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    config: GRPOConfig | None = None,
    *,
    rewards: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    num_items: float | None = None,
    loss_scale: float = 1.0,
    last_position_unused: bool = False,
    return_entropy: bool = False,
    grad_inplace: bool = False,
    validate: bool = True,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """StepGRPO's policy loss over completion tokens, and its metrics.

    logits [B, T, V] (bf16/fp16/fp32, last dim contiguous) score ``ids`` [B, T] where ``mask`` [B, T] is set; with
    ``last_position_unused`` the logits are [B, T + 1, V] as the model produced them for the completion
    (``logits_to_keep=T + 1``): position t scores ids[t] and the last position gets a zero gradient, so no slice
    (and no copy of its gradient) stands between the loss and the model.

    The settings (β, KL estimator, clip range, loss type, temperature, advantage normalisation) are one
    :class:`GRPOConfig`, built once per run. Give ``advantages`` [B], or ``rewards`` [B] to normalise them within
    each group of ``config.group_size`` in the same pass (``config.scale_rewards``). ``old_logp=None`` is on-policy
    (ratio = exp(logp − sg(logp)), R1-VL); ``ref_logp`` enables the KL term (β·KL). ``is_weights`` [B, T]
    multiplies the policy term (sampler mismatch correction); ``num_items`` is dapo's global token count.
    ``loss_scale`` multiplies the loss and its gradient inside the kernel (gradient accumulation: 1 / micro-batches,
    then call ``loss.backward()`` as it is). ``grad_inplace`` writes the logits gradient over the logits buffer
    (saves one logits-sized buffer; autograd's version counter then rejects any other use of those logits in
    backward).

    Returns (loss, metrics): metrics holds masked means ``kl``, ``clip_low``, ``clip_high``, ``clip_region``,
    ``entropy`` (when ``return_entropy``), the per-token ``logp`` and the ``advantages`` used, all tensors (reading
    them is the caller's choice of when to wait for the device).
    """
    config = GRPOConfig() if config is None else config
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
    _check_logits(logits)
    batch, positions, vocab = logits.shape
    length = positions - 1 if last_position_unused else positions
    device = logits.device
    if last_position_unused and not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == length):
        raise ValueError(f"with last_position_unused the logits [B, T + 1, V] = {list(logits.shape)} need ids "
                         f"[B, T] = [{batch}, {length}], got {getattr(ids, 'shape', type(ids))}")
    _check_bt("ids", ids, batch, length, device)
    _check_bt("mask", mask, batch, length, device)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("is_weights", is_weights)):
        _check_bt(name, x, batch, length, device)
    compiling = torch.compiler.is_compiling()
    validate = validate and not compiling  # value checks would break a compiled graph
    _check_advantage_source(advantages, rewards, config, batch, validate)
    _check_id_dtype(ids)
    if validate:
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must be bool or hold only 0 and 1")
        _check_ids(ids, vocab, where=mask.bool())

    weights = token_weights(mask, config, num_items)
    if resolve_impl(impl, device.type) == "torch":
        if rewards is not None:
            advantages = _advantages(rewards, config.group_size or 1, config.adv_eps, config.adv_unbiased,
                                     config.scale_rewards)
        assert advantages is not None
        scored = logits[:, :length] if last_position_unused else logits
        loss, metrics = reference.grpo_loss(scored, ids, mask, advantages, config, old_logp=old_logp,
                                            ref_logp=ref_logp, is_weights=is_weights, num_items=num_items)
        if not return_entropy:
            metrics.pop("entropy")
        metrics["advantages"] = advantages.detach()
        return loss * loss_scale if loss_scale != 1.0 else loss, metrics

    def f32(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(torch.float32).contiguous()

    batch_std = None
    if rewards is not None and config.scale_rewards == "batch":  # the whole batch's std: one small op first
        batch_std = f32(rewards.std(unbiased=config.adv_unbiased).reshape(1))
    kw: dict[str, Any] = dict(
        ids=ids.to(torch.int64).contiguous(), weights=weights.float().contiguous(), advantages=f32(advantages),
        rewards=f32(rewards), batch_std=batch_std, old_logp=f32(old_logp), ref_logp=f32(ref_logp),
        is_weights=f32(is_weights), config=config, loss_scale=float(loss_scale), entropy=return_entropy,
        grad_inplace=grad_inplace,
    )
    if compiling or not (torch.is_grad_enabled() and logits.requires_grad):
        # the functional custom op: without grad, one read of the logits; under torch.compile its backward writes a
        # new gradient buffer (grad_inplace does not apply)
        rows, logp, kl_tok, flags, ent, _, _, adv = library.grpo_loss_fwd(
            logits, kw["ids"], kw["weights"], kw["advantages"], kw["rewards"], batch_std, kw["old_logp"],
            kw["ref_logp"], kw["is_weights"], config.beta, config.kl, config.eps_low, config.eps_high, config.delta,
            config.temperature, config.group_size, config.scale_rewards, config.adv_eps, config.adv_unbiased,
            kw["loss_scale"], return_entropy)
        loss = rows.sum()
    else:
        loss, logp, kl_tok, flags, ent, adv = _FusedGRPOLoss.apply(logits, kw)

    if rewards is None:
        adv = advantages
    elif batch * length == 0:  # no token row ran the kernel: the advantages still follow from the rewards
        adv = _advantages(rewards, config.group_size or 1, config.adv_eps, config.adv_unbiased, config.scale_rewards)
    with torch.no_grad():
        m = mask.to(torch.float32)
        n = m.sum().clamp(min=1)
        low = (flags & 1).to(torch.float32)
        high = ((flags >> 1) & 1).to(torch.float32)
        metrics = {
            "kl": (kl_tok * m).sum() / n,
            "clip_low": (low * m).sum() / n,
            "clip_high": (high * m).sum() / n,
            "clip_region": (((flags != 0).to(torch.float32)) * m).sum() / n,
            "logp": logp,
            "advantages": adv,
        }
        if return_entropy:
            metrics["entropy"] = (ent * m).sum() / n
    return loss, metrics
