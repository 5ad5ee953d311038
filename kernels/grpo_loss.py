"""Triton kernels for the policy update: selective log-probs and the fused GRPO loss.

A persistent grid: each program walks token rows r = program_id, program_id + programs, ... (64-bit offsets), so
about one row per SM is in flight and pass 2's re-read of a row (~300 KB at V = 151,936 in bf16) still finds it
in L2 (pass 1 loads with evict_last; pass 2 loads and stores with evict_first). Pass 1 reads the row once with an
online log-sum-exp in base 2 (log2(e) / T folded into one scale; a scalar running max per block, so one exp2 per
element), plus the entropy's Σ p·z when asked. The token-level loss and its derivative are then scalars, so pass 2
writes the logits gradient once (one exp2 per element). Rows whose gradient is zero (mask 0, or A = 0 with no KL
and no metric needing the row) skip the vocabulary.

Per-row settings (where advantages come from, old/reference policies, importance weights, δ, the KL estimator)
are runtime arguments: they cost a few scalar instructions per row, and keep the number of compiled variants
small (``tests/test_kernels_compile.py`` compiles every one for sm_80 and sm_90). Only what changes the work per
element is a ``constexpr``: BLOCK_V, the entropy, and whether the gradient is written.

Callers: ``r1vl_fast.ops`` (never call these directly). Twins: ``r1vl_fast.ops.reference``.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_logsumexp2(row_ptr, V, scale2, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """(lse2, Σ p·z2) for z2 = logits · scale2 over one row, in base 2 (−inf entries allowed)."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], NEG_INF, tl.float32)
    s_lane = tl.zeros([BLOCK_V], tl.float32)
    t_lane = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(row_ptr + start + cols, mask=start + cols < V, other=NEG_INF,
                    eviction_policy="evict_last").to(tl.float32) * scale2
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Until a finite entry is seen the sums stay 0; shifting by 0 then avoids −inf − −inf.
        shift = tl.where(m_new != NEG_INF, m_new, 0.0)
        rescale = tl.exp2(m - shift)  # one scalar per block
        e = tl.exp2(z - shift)
        s_lane = s_lane * rescale + e
        if ENTROPY:
            t_lane = t_lane * rescale + e * tl.where(z != NEG_INF, z, 0.0)
        m = m_new
    s = tl.sum(s_lane, axis=0)
    lse2 = m + tl.log2(s)
    zp2 = tl.sum(t_lane, axis=0) / s
    return lse2, zp2


@triton.jit
def _write_row_grad(row_ptr, grad_row_ptr, V, scale2, lse2, target, coef, coef_entropy, entropy,
                    BLOCK_V: tl.constexpr, ENTROPY_GRAD: tl.constexpr):
    """grad_j = coef · (1[j = target] − p_j) − coef_entropy · p_j · (log p_j + H), coef including 1/T."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        j = start + cols
        z2 = tl.load(row_ptr + j, mask=j < V, other=NEG_INF, eviction_policy="evict_first").to(tl.float32) * scale2
        logp2 = z2 - lse2
        p = tl.exp2(logp2)
        g = coef * (tl.where(j == target, 1.0, 0.0) - p)
        if ENTROPY_GRAD:
            g -= coef_entropy * p * (tl.where(z2 != NEG_INF, logp2 * LN2, 0.0) + entropy)
        tl.store(grad_row_ptr + j, g.to(grad_row_ptr.dtype.element_ty), mask=j < V, eviction_policy="evict_first")


@triton.jit
def _zero_row(grad_row_ptr, V, BLOCK_V: tl.constexpr):
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        j = start + cols
        tl.store(grad_row_ptr + j, tl.zeros([BLOCK_V], tl.float32).to(grad_row_ptr.dtype.element_ty), mask=j < V,
                 eviction_policy="evict_first")


@triton.jit
def _row_ptr(base, row, T, stride_b, stride_t):
    b = row // T
    return base + b * stride_b + (row - b * T) * stride_t


@triton.jit
def selective_log_probs_fwd_kernel(
    logits_ptr, stride_b, stride_t, T, V, n_rows, ids_ptr, scale2,
    logp_ptr, lse_ptr, entropy_ptr,
    BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr,
):
    """logp[r] = z[r, ids[r]] − lse[r] (and entropy[r]) for z = logits / T; one read of each row. Saves lse in
    base 2 (lse2) for the backward."""
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        row_ptr = _row_ptr(logits_ptr, row, T, stride_b, stride_t)
        lse2, zp2 = _row_logsumexp2(row_ptr, V, scale2, BLOCK_V, ENTROPY)
        target = tl.load(ids_ptr + row).to(tl.int64)
        z_target2 = tl.load(row_ptr + target).to(tl.float32) * scale2
        tl.store(logp_ptr + row, (z_target2 - lse2) * LN2)
        tl.store(lse_ptr + row, lse2)
        if ENTROPY:
            tl.store(entropy_ptr + row, (lse2 - zp2) * LN2)


@triton.jit
def selective_log_probs_bwd_kernel(
    logits_ptr, stride_b, stride_t, T, V, n_rows, ids_ptr, scale2, inv_temp, lse_ptr, entropy_ptr,
    grad_logp_ptr, grad_entropy_ptr, grad_ptr, grad_stride_b, grad_stride_t,
    BLOCK_V: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
):
    """d/d logits of Σ g_logp·logp + g_H·H from the saved lse2 (and entropy); rows with zero upstream only get
    zeros. Also the GRPO loss's deferred backward (g_logp = the loss's per-row coefficient × its upstream)."""
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        row_ptr = _row_ptr(logits_ptr, row, T, stride_b, stride_t)
        grad_row_ptr = _row_ptr(grad_ptr, row, T, grad_stride_b, grad_stride_t)
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
            _write_row_grad(row_ptr, grad_row_ptr, V, scale2, tl.load(lse_ptr + row), tl.load(ids_ptr + row),
                            g * inv_temp, g_h * inv_temp, entropy, BLOCK_V, ENTROPY_GRAD)
        else:
            _zero_row(grad_row_ptr, V, BLOCK_V)


@triton.jit
def scale_rows_kernel(grad_ptr, grad_stride_b, grad_stride_t, T, V, n_rows, g_ptr, BLOCK_V: tl.constexpr):
    """grad *= g, read from the device (the upstream gradient of the loss); nothing is touched when g == 1."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        cols = tl.arange(0, BLOCK_V)
        for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
            grad_row_ptr = _row_ptr(grad_ptr, tl.cast(r, tl.int64), T, grad_stride_b, grad_stride_t)
            for start in range(0, V, BLOCK_V):
                j = start + cols
                x = tl.load(grad_row_ptr + j, mask=j < V, other=0.0).to(tl.float32)
                tl.store(grad_row_ptr + j, (x * g).to(grad_row_ptr.dtype.element_ty), mask=j < V)


@triton.jit(do_not_specialize=["group_size", "from_rewards", "scale_mode", "unbiased", "has_old", "has_ref",
                               "has_is", "has_delta", "kl_kind", "always_read"])
def grpo_loss_fwd_kernel(
    logits_ptr, stride_b, stride_t, T, V, n_rows, ids_ptr, weight_ptr,
    adv_ptr, rewards_ptr, group_size, adv_eps, batch_std_ptr,
    old_ptr, ref_ptr, is_ptr,
    scale2, inv_temp, beta, clip_low, clip_high, delta, loss_scale,
    from_rewards, scale_mode, unbiased, has_old, has_ref, has_is, has_delta, kl_kind, always_read,
    loss_ptr, logp_ptr, kl_ptr, flags_ptr, entropy_ptr, lse_ptr, coef_ptr,
    grad_ptr, grad_stride_b, grad_stride_t,
    BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """Per token row r = (b, t) with weight w (mask · the loss_type's normaliser) and s = loss_scale:
    loss[r] = s·w·ℓ, ℓ = −min(c1·A, c2·A)·is + β·KL; coef[r] = s·w·dℓ/dlogp; and, with WRITE_GRAD,
    grad[r, :] = coef · (onehot − p) / T (else the backward writes it from lse and coef).

    Runtime flags: from_rewards (A from the G rewards of the row's group, divided by the group std
    (scale_mode 1), the batch std (2) or nothing (0), unbiased or not), has_old / has_ref / has_is / has_delta,
    kl_kind (1: k1, 2: k2, 3: k3), always_read (a metric needs every row with w ≠ 0)."""
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        b = row // T
        row_ptr = _row_ptr(logits_ptr, row, T, stride_b, stride_t)
        grad_row_ptr = _row_ptr(grad_ptr, row, T, grad_stride_b, grad_stride_t)  # may be the logits themselves
        w = tl.load(weight_ptr + row)

        # The group-normalised advantage, from the G rewards of this row's prompt (every row of b agrees).
        if from_rewards != 0:
            first = (b // group_size) * group_size
            total = 0.0
            for k in range(0, group_size):
                total += tl.load(rewards_ptr + first + k).to(tl.float32)
            mean = total / group_size
            a = tl.load(rewards_ptr + b).to(tl.float32) - mean
            if scale_mode == 1:
                var = 0.0
                for k in range(0, group_size):
                    d = tl.load(rewards_ptr + first + k).to(tl.float32) - mean
                    var += d * d
                a = a / (tl.sqrt(var / (group_size - unbiased)) + adv_eps)
            elif scale_mode == 2:
                a = a / (tl.load(batch_std_ptr) + adv_eps)
            if row - b * T == 0:
                tl.store(adv_ptr + b, a)
        else:
            a = tl.load(adv_ptr + b).to(tl.float32)

        # A row needs its logits unless its loss and gradient are zero and no metric reads it.
        needed = (w != 0.0) & ((a != 0.0) | (beta != 0.0) | (always_read != 0))
        if needed:
            lse2, zp2 = _row_logsumexp2(row_ptr, V, scale2, BLOCK_V, ENTROPY)
            target = tl.load(ids_ptr + row).to(tl.int64)
            logp = (tl.load(row_ptr + target).to(tl.float32) * scale2 - lse2) * LN2
            if has_old != 0:
                ratio = tl.exp(logp - tl.load(old_ptr + row).to(tl.float32))
            else:
                ratio = tl.exp(logp - logp)  # on-policy: exactly 1, with the gradient of exp(logp − sg(logp))
            # c1 = min(ratio, delta) or ratio; c2 = clamp(ratio, 1 − eps_low, 1 + eps_high); both pass the
            # gradient ratio where they are not clamped (bounds inclusive, as torch.clamp).
            # tl.minimum / tl.maximum drop a NaN operand; the ratio's NaN (a NaN or +inf logit in the row) must
            # reach the loss, as it does in PyTorch.
            finite = ratio == ratio
            c1 = ratio
            dc1 = ratio
            if has_delta != 0:
                c1 = tl.where(finite, tl.minimum(ratio, delta), ratio)
                dc1 = tl.where(ratio <= delta, ratio, 0.0)
            c2 = tl.where(finite, tl.minimum(tl.maximum(ratio, clip_low), clip_high), ratio)
            dc2 = tl.where((ratio >= clip_low) & (ratio <= clip_high), ratio, 0.0)
            l1 = c1 * a
            l2 = c2 * a
            # torch.min's gradient: to the smaller side, split evenly on a tie (the on-policy case).
            w1 = tl.where(l1 < l2, 1.0, tl.where(l1 > l2, 0.0, 0.5))
            loss = -tl.where(finite, tl.minimum(l1, l2), ratio)
            dloss = -a * (w1 * dc1 + (1.0 - w1) * dc2)
            if has_is != 0:
                is_w = tl.load(is_ptr + row).to(tl.float32)
                loss = loss * is_w
                dloss = dloss * is_w
            kl = 0.0
            if has_ref != 0:
                log_ratio = tl.load(ref_ptr + row).to(tl.float32) - logp
                if kl_kind == 1:
                    kl = -log_ratio
                    dkl = tl.full([], 1.0, tl.float32)
                elif kl_kind == 2:
                    kl = 0.5 * log_ratio * log_ratio
                    dkl = -log_ratio
                else:
                    e = tl.exp(log_ratio)
                    kl = e - log_ratio - 1.0
                    dkl = 1.0 - e
                loss += beta * kl
                dloss += beta * dkl
            flags = tl.where((ratio < clip_low) & (a < 0.0), 1, 0) + tl.where((ratio > clip_high) & (a > 0.0), 2, 0)
            coef = loss_scale * w * dloss
            tl.store(loss_ptr + row, loss_scale * w * loss)
            tl.store(logp_ptr + row, logp)
            tl.store(kl_ptr + row, kl)
            tl.store(flags_ptr + row, flags.to(tl.int8))
            tl.store(lse_ptr + row, lse2)
            tl.store(coef_ptr + row, coef)
            if ENTROPY:
                tl.store(entropy_ptr + row, (lse2 - zp2) * LN2)
            if WRITE_GRAD:
                if coef != 0.0:
                    _write_row_grad(row_ptr, grad_row_ptr, V, scale2, lse2, target, coef * inv_temp, 0.0, 0.0,
                                    BLOCK_V, False)
                else:
                    _zero_row(grad_row_ptr, V, BLOCK_V)
        else:
            tl.store(loss_ptr + row, 0.0)
            tl.store(logp_ptr + row, 0.0)
            tl.store(kl_ptr + row, 0.0)
            tl.store(flags_ptr + row, tl.zeros([], tl.int8))
            tl.store(lse_ptr + row, 0.0)
            tl.store(coef_ptr + row, 0.0)
            if ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
            if WRITE_GRAD:
                _zero_row(grad_row_ptr, V, BLOCK_V)


# ------------------------------------------------------------------------------------- the LM head fused in


@triton.jit
def linear_lse_fwd_kernel(h_ptr, w_ptr, bias_ptr, ids_ptr, m_ptr, s_ptr, zp_ptr, target_ptr, N, V, H, stride_h,
                          stride_w, scale2, cols_per_split, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr,
                          IEEE: tl.constexpr):
    """Log-probs with the LM head fused in, no logits in memory: program (i, j) takes BLOCK_M tokens and the j-th
    slice of ``cols_per_split`` vocabulary columns, forms z = h · Wᵀ (+ b) tile by tile with ``tl.dot`` (fp32
    accumulation) and keeps, in its epilogue, each row's running max and Σ exp2 (online, base 2, z scaled by
    log2(e) / T), the target's logit when it falls in the slice, and Σ e·z for the entropy. Partial results
    [splits, N] are combined on the host (a few elementwise ops on [splits, N])."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # 32-bit offsets: the launch checks N·H and V·H < 2^31
    row_ok = rows < N
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    m = tl.full([BLOCK_M], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    zp = tl.zeros([BLOCK_M], tl.float32)
    target = tl.zeros([BLOCK_M], tl.float32)
    v_start = split * cols_per_split
    v_end = tl.minimum(V, v_start + cols_per_split)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_h + ks[None, :]
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        b_ptrs = w_ptr + cols[None, :] * stride_w + ks[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            a = tl.load(a_ptrs + k0, mask=row_ok[:, None] & (ks[None, :] < H - k0), other=0.0)
            b = tl.load(b_ptrs + k0, mask=col_ok[None, :] & (ks[:, None] < H - k0), other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * scale2, NEG_INF)
        target += tl.sum(tl.where(cols[None, :] == ids[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new != NEG_INF, m_new, 0.0)
        rescale = tl.exp2(m - shift)
        e = tl.exp2(z - shift[:, None])
        s = s * rescale + tl.sum(e, axis=1)
        if ENTROPY:
            zp = zp * rescale + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(target_ptr + out, target, mask=row_ok)
    if ENTROPY:
        tl.store(zp_ptr + out, zp, mask=row_ok)
