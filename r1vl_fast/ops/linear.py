"""The LM head fused into the log-prob and GRPO-loss ops: logits = hidden · weightᵀ (+ bias) are formed a block of
tokens at a time and never exist as one [N, V] tensor.

- :func:`linear_log_probs` (old and reference policies, held-out scoring; differentiable): per block of tokens,
  one GEMM, an online log-sum-exp over the vocabulary, the target logit as a row dot product, and Σ p·z for the
  entropy. Its backward recomputes each block's logits and forms dz = g · (onehot − p) / T, then grad_hidden = dz · W
  and grad_weight += dzᵀ · h: three GEMM-equivalents.
- :func:`linear_grpo_loss` (the policy update): the GRPO objective of a token depends on its own log-prob only, so
  its gradient coefficient g = ∂loss/∂logp is known as soon as the block's log-probs are. The forward therefore
  computes the gradient too (one GEMM for the logits, two for the gradients: three in all, against four for a
  recompute in backward or Liger's ``autograd.grad``), keeps grad_hidden and grad_weight, and backward only scales
  them. Masked positions are never read: only the kept rows are gathered, scored and given a gradient.

Blocks of ``block_rows`` tokens bound the extra memory at a few [block_rows, V] fp32 buffers, whatever N is (the
trainer's default keeps it under a quarter of one [N, V] fp32 logits tensor at N = 1024 and V = 151,936). This is
the PyTorch path, which runs everywhere, and the twin the Triton kernels are tested against.
"""

from __future__ import annotations

from typing import Any

import torch

from r1vl_fast.ops import reference
from r1vl_fast.ops.config import GRPOConfig, resolve_impl, token_weights

# Rows per block: a [rows, V] fp32 block of logits (turned into probabilities, then into their gradient, in place)
# holds this many bytes: 82 tokens at V = 151,936 (a twelfth of the logits of 1024 tokens).
BLOCK_BYTES = 48 * 2**20


def block_rows(vocab: int, n: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Tokens per block for a vocabulary of ``vocab``: a [rows, vocab] fp32 block fits ``block_bytes``."""
    return max(1, min(n, block_bytes // max(1, 4 * vocab)))


def _check(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [N, H], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]}, got {getattr(weight, 'shape', None)}")
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ids must have shape {list(hidden.shape[:-1])}, got {getattr(ids, 'shape', type(ids))}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.device != weight.device or ids.device != hidden.device:
        raise ValueError(f"hidden ({hidden.device}), weight ({weight.device}) and ids ({ids.device}) must share a "
                         f"device")


def _acc(x: torch.Tensor) -> torch.dtype:
    """What a block is scored in: fp32, or fp64 for fp64 inputs (the reference's precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """One block's logits / T in fp32: [rows, V]."""
    z = (h @ weight.T) if bias is None else torch.addmm(bias, h, weight.T)
    z = z.to(_acc(weight))
    return z.div_(temperature) if temperature != 1.0 else z


def _target(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """z[id] / T per row, as a row dot product (no gather from the block)."""
    acc = _acc(weight)
    z = (h.to(acc) * weight[ids].to(acc)).sum(-1)
    if bias is not None:
        z = z + bias[ids].to(acc)
    return z / temperature


def _scores(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
            temperature: float, entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs [N], log-sum-exp [N], entropy [N] or None) of rows ``h`` [N, H], a block of rows at a time."""
    n = h.shape[0]
    logp = torch.empty(n, dtype=_acc(weight), device=h.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else None
    step = block_rows(weight.shape[0], n, 2 * BLOCK_BYTES)  # no gradient buffers here: blocks twice as tall
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        z = _logits(h[rows], weight, bias, temperature)
        if ent is not None:  # H = lse − Σ p·z
            lse[rows] = torch.logsumexp(z, dim=-1)
            ent[rows] = lse[rows] - (torch.exp(z - lse[rows, None]) * z).sum(-1)
        else:  # the block's exponentials in place: no second block-sized buffer
            top = z.amax(dim=-1)
            lse[rows] = top + z.sub_(top[:, None]).exp_().sum(dim=-1).log()
        logp[rows] = _target(h[rows], weight, bias, ids[rows], temperature) - lse[rows]
    return logp, lse, ent


def _softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax of a block of logits, in place (z becomes p), and its log-sum-exp per row."""
    top = z.amax(dim=-1)
    p = z.sub_(top[:, None]).exp_()
    total = p.sum(dim=-1)
    return p.div_(total[:, None]), top + total.log()


def _grad_from_p(p: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    """dz = g · (onehot(ids) − p) / T for one block, in place of its probabilities p: [rows, V]."""
    scale = (g / temperature).to(p.dtype)
    dz = p.mul_(-scale[:, None])
    dz[torch.arange(len(ids), device=dz.device), ids] += scale
    return dz


def _scores_triton(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                   temperature: float, entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_scores` through the Triton kernel (tl.dot tiles, the log-sum-exp in their epilogue): per vocabulary
    slice a partial max / sum / target / Σ e·z, merged here over the slices ([splits, N], a few small ops)."""
    from r1vl_fast.ops import launch as L

    launch, part = L.linear_lse_fwd(h.contiguous(), weight.contiguous(), bias, ids.contiguous(), temperature,
                                    entropy)
    launch.run()
    top = part["m"].amax(dim=0)
    share = torch.exp2(part["m"] - top)
    total = (part["s"] * share).sum(dim=0)
    lse2 = top + torch.log2(total)
    logp = (part["target"].sum(dim=0) - lse2) * _LN2
    ent = (lse2 - (part["zp"] * share).sum(dim=0) / total) * _LN2 if entropy else None
    return logp, lse2 * _LN2, ent


_LN2 = 0.6931471805599453


def _fits(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    from r1vl_fast.ops.launch import linear_fits

    return linear_fits(hidden.reshape(-1, hidden.shape[-1]), weight)


def _grad_block(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                lse: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    """dz for one block from its recomputed logits and the saved log-sum-exp."""
    p = _logits(h, weight, bias, temperature).sub_(lse[:, None]).exp_()
    return _grad_from_p(p, ids, g, temperature)


def _accumulate(dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, grad_weight: torch.Tensor | None,
                grad_bias: torch.Tensor | None) -> torch.Tensor:
    """grad_hidden of the block (returned) and grad_weight / grad_bias += the block's part."""
    dz_w = dz.to(weight.dtype)
    if grad_weight is not None:
        grad_weight.addmm_(dz_w.T.to(grad_weight.dtype), h.to(grad_weight.dtype))
    if grad_bias is not None:
        grad_bias.add_(dz.sum(0).to(grad_bias.dtype))
    return dz_w @ weight


def _flat(hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1).long()


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                temperature: float, entropy: bool, impl: str) -> Any:
        h, flat_ids = _flat(hidden, ids)
        scores = _scores_triton if impl == "triton" else _scores
        logp, lse, ent = scores(h, weight, bias, flat_ids, temperature, entropy)
        ctx.save_for_backward(hidden, weight, bias, flat_ids, lse)
        ctx.temperature = temperature
        logp = logp.reshape(ids.shape)
        if ent is None:
            return logp
        ctx.mark_non_differentiable(ent)
        return logp, ent.reshape(ids.shape)

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, *_: Any) -> Any:
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        h = hidden.reshape(-1, hidden.shape[-1])
        g = grad_logp.reshape(-1).to(_acc(weight))
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h) if need_h else None
        acc = torch.float32 if weight.dtype != torch.float64 else torch.float64
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None else None
        step = block_rows(weight.shape[0], h.shape[0])
        for start in range(0, h.shape[0], step):
            rows = slice(start, min(h.shape[0], start + step))
            dz = _grad_block(h[rows], weight, bias, ids[rows], lse[rows], g[rows], ctx.temperature)
            block = _accumulate(dz, h[rows], weight, grad_w, grad_b)
            if grad_h is not None:
                grad_h[rows] = block.to(h.dtype)
        return (grad_h.reshape(hidden.shape) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None)


def linear_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, *, temperature: float = 1.0,
    bias: torch.Tensor | None = None, return_entropy: bool = False, impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-probs of ``ids`` [B, T] (or [N]) under softmax((hidden · weightᵀ + bias) / temperature), hidden
    [B, T, H] (or [N, H]), weight [V, H] (the LM head, tied or not): no [B, T, V] tensor is formed. Differentiable
    in ``hidden``, ``weight`` and ``bias``; with ``return_entropy`` also the entropy per token (a metric: not
    differentiable). Without grad it is one GEMM's worth of work: on CUDA (``impl="auto"`` or ``"triton"``) one
    Triton kernel whose tiles never leave the chip; elsewhere blocks of tokens through PyTorch."""
    _check(hidden, weight, ids, bias)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    impl = resolve_impl(impl, hidden.device.type)
    if hidden.dtype == torch.float64 or weight.dtype != hidden.dtype or not _fits(hidden, weight):
        impl = "torch"  # the kernel takes fp32 / bf16 / fp16 hidden and weight of one dtype, 32-bit offsets
    out = _LinearLogProbs.apply(hidden, weight, bias, ids, float(temperature), return_entropy, impl)
    return out  # type: ignore[no-any-return]


class _LinearGRPOLoss(torch.autograd.Function):
    """Loss and metrics in forward, with the gradients of the kept rows computed there too (see the module doc)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                kw: dict[str, Any]) -> Any:
        config: GRPOConfig = kw["config"]
        keep, ids = kw["keep"], kw["ids"]
        h = hidden.reshape(-1, hidden.shape[-1])
        rows_kept = keep.reshape(-1).nonzero().squeeze(1)
        hk, idk = h[rows_kept], ids.reshape(-1)[rows_kept].long()
        per_row = {k: (v.reshape(-1)[rows_kept] if v is not None else None)
                   for k, v in (("a", kw["a"]), ("w", kw["weights"]), ("old", kw["old_logp"]),
                                ("ref", kw["ref_logp"]), ("isw", kw["is_weights"]))}
        n, vocab = hk.shape[0], weight.shape[0]
        want_grad = kw["grad"]
        grad_hk = torch.zeros_like(hk) if want_grad and ctx.needs_input_grad[0] else None
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_w = (torch.zeros(weight.shape, dtype=acc, device=weight.device)
                  if want_grad and ctx.needs_input_grad[1] else None)
        grad_b = (torch.zeros(vocab, dtype=acc, device=weight.device)
                  if want_grad and bias is not None and ctx.needs_input_grad[2] else None)
        out = {k: torch.zeros(n, dtype=acc, device=hidden.device) for k in ("logp", "loss", "kl", "ratio", "ent")}
        ones = torch.ones(n, dtype=torch.bool, device=hidden.device)
        step = block_rows(vocab, n)
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            z = _logits(hk[rows], weight, bias, config.temperature)
            if kw["entropy"]:  # a metric, off in training: one more block-sized buffer
                lse = torch.logsumexp(z, dim=-1)
                out["ent"][rows] = lse - (torch.exp(z - lse[:, None]) * z).sum(-1)
            p, lse = _softmax_(z)  # z becomes p: no second block-sized buffer
            logp = (_target(hk[rows], weight, bias, idk[rows], config.temperature) - lse).to(acc)
            with torch.enable_grad():  # the per-token GRPO stage, differentiated by autograd on [rows] only
                leaf = logp.detach().requires_grad_(want_grad)
                sub = {k: (v[rows] if v is not None else None) for k, v in per_row.items()}
                per_token, kl, ratio = reference.token_objective(
                    leaf, ones[rows], sub["a"].to(acc), config, old_logp=sub["old"], ref_logp=sub["ref"],  # type: ignore[union-attr]
                    is_weights=sub["isw"])
                loss_rows = per_token * sub["w"].to(acc) * kw["loss_scale"]  # type: ignore[union-attr]
                g = torch.autograd.grad(loss_rows.sum(), leaf)[0] if want_grad else None
            out["logp"][rows], out["loss"][rows] = logp, loss_rows.detach()
            out["kl"][rows], out["ratio"][rows] = kl.detach(), ratio.detach()
            if g is not None:
                dz = _grad_from_p(p, idk[rows], g, config.temperature)
                block = _accumulate(dz, hk[rows], weight, grad_w, grad_b)
                if grad_hk is not None:
                    grad_hk[rows] = block.to(hk.dtype)
        grad_h = None
        if grad_hk is not None:
            grad_h = torch.zeros_like(h).index_copy_(0, rows_kept, grad_hk).reshape(hidden.shape)
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                     grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None)

        def scatter(x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(ids.numel(), dtype=acc, device=x.device).index_copy_(
                0, rows_kept, x).reshape(ids.shape)

        tokens = {k: scatter(v) for k, v in out.items() if k != "loss"}
        loss = out["loss"].sum().to(torch.float32 if acc == torch.float32 else acc)
        for t in tokens.values():
            ctx.mark_non_differentiable(t)
        return loss, tokens["logp"], tokens["kl"], tokens["ratio"], tokens["ent"]

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> Any:
        grads = ctx.grads
        ctx.grads = None  # the gradient is handed over once
        if grads is None:
            raise RuntimeError("linear_grpo_loss computes its gradient in the forward: backward runs once")
        # the buffers are ours: scaled in place (a no-op for loss.backward()), then handed to autograd as they are
        return (*[None if g is None else (g if bool(grad_loss == 1) else g.mul_(grad_loss.to(g.dtype)))
                  for g in grads], None)


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
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
    bias: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`r1vl_fast.ops.grpo_loss` with the LM head fused in: ``hidden`` [B, T, H] (the final hidden states that
    predict the completion tokens ``ids`` [B, T]) and ``weight`` [V, H] (and ``bias``) in place of the logits. The
    same settings, advantages or rewards, old / reference log-probs and importance weights; the same loss and
    metrics; gradients for ``hidden``, ``weight`` and ``bias``. Call ``backward`` once on the loss (its gradient is
    computed in the forward)."""
    from r1vl_fast.ops.fused import _advantages, _check_advantage_source, _check_bt

    config = GRPOConfig() if config is None else config
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
    _check(hidden, weight, ids, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {list(hidden.shape)}")
    batch, length = ids.shape
    for name, x in (("mask", mask), ("old_logp", old_logp), ("ref_logp", ref_logp), ("is_weights", is_weights)):
        _check_bt(name, x, batch, length, hidden.device)
    _check_advantage_source(advantages, rewards, config, batch, validate=False)
    if rewards is not None:
        advantages = _advantages(rewards, config.group_size or 1, config.adv_eps, config.adv_unbiased,
                                 config.scale_rewards)
    assert advantages is not None
    keep = mask.bool()
    kw: dict[str, Any] = dict(
        config=config, keep=keep, ids=ids, a=advantages.detach().float()[:, None].expand(batch, length),
        weights=token_weights(mask, config, num_items), old_logp=old_logp, ref_logp=ref_logp, is_weights=is_weights,
        loss_scale=float(loss_scale), entropy=return_entropy,
        grad=torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                          or (bias is not None and bias.requires_grad)),
    )
    loss, logp, kl, ratio, ent = _LinearGRPOLoss.apply(hidden, weight, bias, kw)
    with torch.no_grad():
        m = mask.to(torch.float32)
        n = m.sum().clamp(min=1)
        a = advantages.float()[:, None]
        low = (ratio < 1 - config.eps_low) & (a < 0) & keep
        high = (ratio > 1 + config.eps_high) & (a > 0) & keep
        metrics = {"kl": (kl * m).sum() / n, "clip_low": low.float().sum() / n, "clip_high": high.float().sum() / n,
                   "clip_region": (low | high).float().sum() / n, "logp": logp, "advantages": advantages.detach()}
        if return_entropy:
            metrics["entropy"] = (ent * m).sum() / n
    return loss, metrics
