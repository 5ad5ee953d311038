"""Triton kernels for the policy update: selective log-probs and the fused GRPO loss.

One program per token row (a 1-D grid, 64-bit offsets). Pass 1 reads the row's logits once with an online,
per-lane log-sum-exp in fp32 (and the entropy's Σ p·z when asked); the token-level loss and its derivative
d loss / d logp are then scalars, so pass 2 writes the logits gradient once, during the forward — nothing
logits-sized is saved for backward. Rows whose gradient is zero (mask 0, or A = 0 with no KL and no metric
needing the row) skip the vocabulary entirely. The re-read of pass 2 comes from L2 on a GPU (one row is
~300 KB at V = 151,936 in bf16), so DRAM sees about one read and one write of the logits.

Callers: ``r1vl_fast.ops`` (never call these directly). Twins: ``r1vl_fast.ops.reference``.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = float("-inf")


@triton.jit
def _row_logsumexp(row_ptr, V, inv_temp, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """(lse, Σ softmax·z) of z = logits · inv_temp over one row, online per lane (−inf entries allowed)."""
    cols = tl.arange(0, BLOCK_V)
    m_lane = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s_lane = tl.zeros([BLOCK_V], tl.float32)
    t_lane = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=NEG_INF).to(tl.float32) * inv_temp
        m_new = tl.maximum(m_lane, z)
        # A lane that has only seen −inf keeps s = t = 0; shifting by 0 there avoids computing −inf − −inf.
        shift = tl.where(m_new != NEG_INF, m_new, 0.0)
        rescale = tl.exp(m_lane - shift)
        e = tl.exp(z - shift)
        s_lane = s_lane * rescale + e
        if ENTROPY:
            t_lane = t_lane * rescale + e * tl.where(z != NEG_INF, z, 0.0)
        m_lane = m_new
    m = tl.max(m_lane, axis=0)
    weight = tl.exp(m_lane - m)
    s = tl.sum(s_lane * weight, axis=0)
    lse = m + tl.log(s)
    zp = tl.sum(t_lane * weight, axis=0) / s
    return lse, zp


@triton.jit
def _write_row_grad(row_ptr, grad_row_ptr, V, inv_temp, lse, target, coef, coef_entropy, entropy,
                    BLOCK_V: tl.constexpr, ENTROPY_GRAD: tl.constexpr):
    """grad_j = coef · (1[j = target] − p_j) − coef_entropy · p_j · (log p_j + H), with coef including 1/T."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        j = start + cols
        z = tl.load(row_ptr + j, mask=j < V, other=NEG_INF).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        g = coef * (tl.where(j == target, 1.0, 0.0) - p)
        if ENTROPY_GRAD:
            g -= coef_entropy * p * (tl.where(z != NEG_INF, logp, 0.0) + entropy)
        tl.store(grad_row_ptr + j, g.to(grad_row_ptr.dtype.element_ty), mask=j < V)


@triton.jit
def _zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        j = start + cols
        tl.store(grad_row_ptr + j, tl.zeros([BLOCK_V], tl.float32).to(grad_row_ptr.dtype.element_ty), mask=j < V)


@triton.jit
def selective_log_probs_fwd_kernel(
    logits_ptr, stride_b, stride_t, T, V, ids_ptr, inv_temp,
    logp_ptr, lse_ptr, entropy_ptr,
    BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr,
):
    """logp[r] = z[r, ids[r]] − lse[r] (and entropy[r]) for z = logits / T; one read of the row."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    row_ptr = logits_ptr + b * stride_b + (row - b * T) * stride_t
    lse, zp = _row_logsumexp(row_ptr, V, inv_temp, BLOCK_V, ENTROPY)
    target = tl.load(ids_ptr + row).to(tl.int64)
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    if ENTROPY:
        tl.store(entropy_ptr + row, lse - zp)


@triton.jit
def selective_log_probs_bwd_kernel(
    logits_ptr, stride_b, stride_t, T, V, ids_ptr, inv_temp, lse_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, grad_ptr,
    BLOCK_V: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
):
    """d/d logits of Σ g_logp·logp + g_H·H, from the saved lse (and entropy); rows with zero upstream skip."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    row_ptr = logits_ptr + b * stride_b + (row - b * T) * stride_t
    grad_row_ptr = grad_ptr + row * V
    g = tl.load(grad_logp_ptr + row)
    if ENTROPY_GRAD:
        g_h = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        nonzero = (g != 0.0) | (g_h != 0.0)
    else:
        g_h = 0.0
        entropy = 0.0
        nonzero = g != 0.0
    if nonzero:
        _write_row_grad(row_ptr, grad_row_ptr, V, inv_temp, tl.load(lse_ptr + row), tl.load(ids_ptr + row),
                        g * inv_temp, g_h * inv_temp, entropy, BLOCK_V, ENTROPY_GRAD)
    else:
        _zero_row(grad_row_ptr, V, BLOCK_V)


@triton.jit
def grpo_loss_fwd_kernel(
    logits_ptr, stride_b, stride_t, T, V, ids_ptr, weight_ptr,
    adv_ptr, rewards_ptr, group_size, adv_eps, batch_std_ptr,
    old_ptr, ref_ptr, is_ptr,
    inv_temp, beta, clip_low, clip_high, delta,
    loss_ptr, logp_ptr, kl_ptr, flags_ptr, entropy_ptr, grad_ptr, grad_stride_b, grad_stride_t,
    BLOCK_V: tl.constexpr, BLOCK_G: tl.constexpr,
    FROM_REWARDS: tl.constexpr, SCALE: tl.constexpr, UNBIASED: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_IS: tl.constexpr, HAS_DELTA: tl.constexpr,
    KL: tl.constexpr, ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr, ALWAYS_READ: tl.constexpr,
):
    """Per token row r = (b, t) with weight w (mask · the loss_type's normaliser):
    loss[r] = w · ℓ, ℓ = −min(c1·A, c2·A)·is + β·KL, and grad[r, :] = w · dℓ/dlogp · (onehot − p) / T."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    row_ptr = logits_ptr + b * stride_b + (row - b * T) * stride_t
    grad_row_ptr = grad_ptr + b * grad_stride_b + (row - b * T) * grad_stride_t  # may be the logits themselves
    w = tl.load(weight_ptr + row)

    # The group-normalised advantage, from the G rewards of this row's prompt (every row of b agrees), divided by
    # the group's std (SCALE 1), the batch's (SCALE 2, computed before the launch) or nothing (SCALE 0).
    if FROM_REWARDS:
        first = (b // group_size) * group_size
        k = tl.arange(0, BLOCK_G)
        r = tl.load(rewards_ptr + first + k, mask=k < group_size, other=0.0).to(tl.float32)
        mean = tl.sum(r, axis=0) / group_size
        a = tl.load(rewards_ptr + b).to(tl.float32) - mean
        if SCALE == 1:
            centred = tl.where(k < group_size, r - mean, 0.0)
            var = tl.sum(centred * centred, axis=0) / (group_size - UNBIASED)
            a = a / (tl.sqrt(var) + adv_eps)
        elif SCALE == 2:
            a = a / (tl.load(batch_std_ptr) + adv_eps)
        if row - b * T == 0:
            tl.store(adv_ptr + b, a)
    else:
        a = tl.load(adv_ptr + b).to(tl.float32)

    # A row needs its logits unless its loss and gradient are zero and no metric reads it (ALWAYS_READ: an
    # old policy, a reference policy or the entropy is given or asked for).
    if ALWAYS_READ:
        needed = w != 0.0
    else:
        needed = (w != 0.0) & ((a != 0.0) | (beta != 0.0))
    if needed:
        lse, zp = _row_logsumexp(row_ptr, V, inv_temp, BLOCK_V, ENTROPY)
        target = tl.load(ids_ptr + row).to(tl.int64)
        logp = tl.load(row_ptr + target).to(tl.float32) * inv_temp - lse
        if HAS_OLD:
            ratio = tl.exp(logp - tl.load(old_ptr + row).to(tl.float32))
        else:
            ratio = tl.exp(logp - logp)  # on-policy: exactly 1, with the gradient of exp(logp − sg(logp))
        # c1 = min(ratio, delta) or ratio; c2 = clamp(ratio, 1 − eps_low, 1 + eps_high); both pass the
        # gradient ratio where they are not clamped (bounds inclusive, as torch.clamp).
        c1 = ratio
        dc1 = ratio
        if HAS_DELTA:
            c1 = tl.minimum(ratio, delta)
            dc1 = tl.where(ratio <= delta, ratio, 0.0)
        c2 = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
        dc2 = tl.where((ratio >= clip_low) & (ratio <= clip_high), ratio, 0.0)
        l1 = c1 * a
        l2 = c2 * a
        # torch.min's gradient: to the smaller side, split evenly on a tie (the on-policy case).
        w1 = tl.where(l1 < l2, 1.0, tl.where(l1 > l2, 0.0, 0.5))
        loss = -tl.minimum(l1, l2)
        dloss = -a * (w1 * dc1 + (1.0 - w1) * dc2)
        if HAS_IS:
            is_w = tl.load(is_ptr + row).to(tl.float32)
            loss = loss * is_w
            dloss = dloss * is_w
        kl = 0.0
        if HAS_REF:
            log_ratio = tl.load(ref_ptr + row).to(tl.float32) - logp
            if KL == 1:
                kl = -log_ratio
                dkl = 1.0
            elif KL == 2:
                kl = 0.5 * log_ratio * log_ratio
                dkl = -log_ratio
            else:
                e = tl.exp(log_ratio)
                kl = e - log_ratio - 1.0
                dkl = 1.0 - e
            loss += beta * kl
            dloss += beta * dkl
        flags = tl.where((ratio < clip_low) & (a < 0.0), 1, 0) + tl.where((ratio > clip_high) & (a > 0.0), 2, 0)
        tl.store(loss_ptr + row, w * loss)
        tl.store(logp_ptr + row, logp)
        tl.store(kl_ptr + row, kl)
        tl.store(flags_ptr + row, flags.to(tl.int8))
        if ENTROPY:
            tl.store(entropy_ptr + row, lse - zp)
        if WRITE_GRAD:
            coef = w * dloss * inv_temp
            if coef != 0.0:
                _write_row_grad(row_ptr, grad_row_ptr, V, inv_temp, lse, target, coef, 0.0, 0.0, BLOCK_V, False)
            else:
                _zero_row(grad_row_ptr, V, BLOCK_V)
    else:
        tl.store(loss_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(kl_ptr + row, 0.0)
        tl.store(flags_ptr + row, tl.zeros([], tl.int8))
        if ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        if WRITE_GRAD:
            _zero_row(grad_row_ptr, V, BLOCK_V)
