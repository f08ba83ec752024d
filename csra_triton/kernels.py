"""Triton kernels for multi-head CSRA (the kernels layer, docs/architecture.md).

Notation (see bench/NOTES.md): B batch, D channels (in_ch), N = h*w positions, H heads, C classes.
A "row" is one (head, class) pair. Five kernels:

* ``csra_prep_kernel``: once per call, the weight (H, C, D) in any dtype and strides becomes
  ``w_op`` (H*C, D) contiguous in x's dtype (round to nearest even, as a 1x1 conv under autocast
  rounds its weight) and ``inv_n`` (H*C,) = 1 / ||W row|| computed in fp32 from the weight as
  stored (fp64 for fp64 x). The main kernels then read each weight element once per program, in
  the operand dtype, instead of re-reading fp32 rows for the norms and for every position tile.
* ``csra_fwd_kernel``: a program owns one batch element ``b`` and a block of ``BC`` classes for
  *all* heads: a row tile of ``HP * BC`` rows, head-major (``r = h * BC + c_local``, ``HP`` the
  next power of two of H, rows with ``h >= H`` are padding). The sum over heads is a register
  reshape + reduction: no atomics, no second launch, bitwise deterministic. It walks positions in
  tiles of ``BN`` (one tile when N <= BN: the softmax is then a single exact pass; an online
  softmax merges tiles beyond). Each position tile is two accumulators of ``BN/2`` columns:
  the epilogue finishes one half's statistics while the other waits, which is what keeps a
  128 x 256 tile free of register spills (one 128 x 256 accumulator spilled in that epilogue).
* ``csra_ds_kernel``: the same tiles and the same main loop (:func:`_score_tiles`) recompute
  the scores bit for bit, and write dS' = inv_n * dy/ds for a chunk of classes.
* ``csra_ds_kept_kernel``: the same dS' from the raw scores the forward wrote (``SAVE_A``,
  training, when the scores (H*C, B, N) in fp32 have no more elements than x: 16 MB at the
  coco headline, never at 9,605 classes; not on Blackwell yet): an elementwise pass instead of
  a recomputed GEMM. The storing forward runs 16 warps on Hopper (its stores spilled at 8).
* ``csra_proj_kernel``: the weight gradient through the row normalisation from G = dS' x^T
  (the two GEMMs between dS' and it are cuBLAS's, launched by the op layer).

Launch order: programs are numbered so that the class blocks of one batch element are adjacent
(``CB_MAJOR=False``: x[b] is read from HBM once and from L2 by its other class blocks) or, for
large weights (OpenImages' 9,605 classes: 157 MB in bf16, beyond L2), so that all batch
elements of one class block are adjacent (``CB_MAJOR=True``: each weight block is read from
HBM once, and x, 26 MB there, stays in L2).

Arithmetic: a = w_op . x accumulates in fp32 (fp64 for fp64 x) on ``DOT``-dtype operands: x's
own dtype, except bf16 under the interpreter (fp32: its bf16 dot is wrong). fp32 x uses TF32
when ``PRECISION="tf32"`` (the op follows ``torch.backends.cudnn.allow_tf32``, as the official
1x1 conv does). Scores are
s = a * inv_n; softmax state is kept in raw units with base-2 exponentials: z_j = a_j * cz,
cz = inv_n * T * log2(e). The forward saves m = max_j z_j and l = sum_j 2^(z_j - m) (not their
log-sum-exp: at |z| ~ 1e4 an fp32 lse is off by up to an ulp, ~1e-3, which would scale every
softmax weight), att (in score units) and argmax (the first of tied maxima, as torch.max).
The backward forms p_j = 2^(z_j - m) / l with the same shift m, so the two passes agree.

Pointer conventions: every tensor argument is followed by its strides in elements, in the order
of the shape given next to it. Outputs written with implicit strides are contiguous by contract
(the op layer allocates them).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _compat

BIG = tl.constexpr(2147483647)  # int32 max: "no position" in the argmax reduction


@triton.jit
def _bf16_rtne(v):
    """fp32 -> fp32 holding the nearest-even bf16 value. Only used under the interpreter, whose
    own fp32 -> bf16 cast truncates (GPU casts round to nearest even already)."""
    bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(v, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """Cast ``v`` to ``dtype`` with round-to-nearest-even, also under the interpreter
    (``EMU_BF16``: bf16 operands there; a wider ``dtype`` is cast as it is)."""
    if EMU_BF16:
        if dtype == tl.bfloat16:
            v = _bf16_rtne(v)
    return v.to(dtype)


@triton.jit
def _aligned(v, A: tl.constexpr):
    """``v`` (a stride or extent that the host found divisible by ``A``) rebuilt as ``(v // A) * A``
    so that Triton's alignment analysis knows the divisibility: x rows of 196 bf16 positions
    (392 bytes) are then loaded 8 bytes at a time and software-pipelined (cp.async); without the
    hint Triton assumes 2-byte alignment and loads x through registers, unpipelined."""
    if A > 1:
        v = (v // A) * A
    return v


@triton.jit
def csra_prep_kernel(
    w_ptr, stride_wh, stride_wc, stride_wd,      # weight (H, C, D), any strides, any float dtype
    wo_ptr,                                      # w_op   (H*C, D) contiguous out, x.dtype
    invn_ptr,                                    # inv_n  (H*C,) contiguous out, ACC
    R, C, D,                                     # R = H*C rows
    NORMALIZE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    """Grid (cdiv(R, BR),). Rounds the weight to the operand dtype and takes the row norms."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = r < R
    src = w_ptr + (r // C).to(tl.int64) * stride_wh + (r % C).to(tl.int64) * stride_wc
    dst = wo_ptr + r.to(tl.int64) * D
    ss = tl.zeros((BR,), dtype=ACC)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        ok = r_ok[:, None] & (dd < D)[None, :]
        w = tl.load(src[:, None] + dd[None, :] * stride_wd, mask=ok, other=0.0)
        wa = w.to(ACC)
        ss += tl.sum(wa * wa, axis=1)
        tl.store(dst[:, None] + dd[None, :], _round_to(w, wo_ptr.dtype.element_ty, EMU_BF16),
                 mask=ok)
    if NORMALIZE:
        # A zero row gives inv_n = inf and s = 0 * inf = NaN, as the official 0/0 does.
        inv = 1.0 / tl.sqrt(ss)
    else:
        inv = tl.full((BR,), 1.0, dtype=ACC)
    tl.store(invn_ptr + r, inv, mask=r_ok)


@triton.jit
def csra_proj_kernel(
    g_ptr,                                       # G      (H*C, D) contiguous, GEMM dtype
    w_ptr, stride_wh, stride_wc, stride_wd,      # weight (H, C, D), any strides, as stored
    invn_ptr,                                    # inv_n  (H*C,) contiguous, ACC
    out_ptr,                                     # dW     (H*C, D) contiguous out, weight dtype
    R, C, D,
    NORMALIZE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, ONE_PASS: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid (cdiv(R, BR),). The weight gradient from G = dS' x^T through the row normalisation,
    dW = G - W (W . G) inv_n^2 (G itself without it), in ACC, written in the weight's dtype:
    in one launch. ONE_PASS
    (D <= BD): whole rows loaded once; else two passes over d in steps of BD."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = r < R
    src = w_ptr + (r // C).to(tl.int64) * stride_wh + (r % C).to(tl.int64) * stride_wc
    rows = r.to(tl.int64) * D
    if ONE_PASS:
        dd = tl.arange(0, BD)
        ok = r_ok[:, None] & (dd < D)[None, :]
        g = tl.load(g_ptr + rows[:, None] + dd[None, :], mask=ok, other=0.0).to(ACC)
        if NORMALIZE:
            w = tl.load(src[:, None] + dd[None, :] * stride_wd, mask=ok, other=0.0).to(ACC)
            inv = tl.load(invn_ptr + r, mask=r_ok, other=0.0).to(ACC)
            g = g - w * (tl.sum(w * g, axis=1) * inv * inv)[:, None]
        tl.store(out_ptr + rows[:, None] + dd[None, :], g.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        coef = tl.zeros((BR,), dtype=ACC)
        if NORMALIZE:
            for d0 in range(0, D, BD):
                dd = d0 + tl.arange(0, BD)
                ok = r_ok[:, None] & (dd < D)[None, :]
                w = tl.load(src[:, None] + dd[None, :] * stride_wd, mask=ok, other=0.0).to(ACC)
                g = tl.load(g_ptr + rows[:, None] + dd[None, :], mask=ok, other=0.0).to(ACC)
                coef += tl.sum(w * g, axis=1)
            inv = tl.load(invn_ptr + r, mask=r_ok, other=0.0).to(ACC)
            coef = coef * inv * inv
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            ok = r_ok[:, None] & (dd < D)[None, :]
            g = tl.load(g_ptr + rows[:, None] + dd[None, :], mask=ok, other=0.0).to(ACC)
            if NORMALIZE:
                w = tl.load(src[:, None] + dd[None, :] * stride_wd, mask=ok, other=0.0).to(ACC)
                g = g - w * coef[:, None]
            tl.store(out_ptr + rows[:, None] + dd[None, :], g.to(out_ptr.dtype.element_ty),
                     mask=ok)


@triton.jit
def _row_params(p_ptr, invn_ptr, h, hc, h_ok, row_ok, H, N, ACC: tl.constexpr):
    """Per row (head ``h``, row ``hc`` of (H, C)): whether it is a max head, the temperature its
    softmax uses, its inverse norm, lam, the z-scale inv_n * T * log2(e), and 1/N. The forward
    and both dS kernels take them from here: the same values bit for bit."""
    temp = tl.load(p_ptr + h, mask=h_ok, other=1.0).to(ACC)
    is_max = temp == float("inf")
    t_fin = tl.where(is_max, 1.0, temp)                     # the temperature softmax rows use
    inv = tl.load(invn_ptr + hc, mask=row_ok, other=0.0).to(ACC)
    lam = tl.load(p_ptr + H).to(ACC)
    cz = inv * (t_fin * tl.load(p_ptr + H + 1).to(ACC))     # inv_n * T * log2(e)
    # cz is 0 for an inverse norm of 0 (a weight row whose norm overflows) or a temperature
    # that is 0 in ACC; then best * cz of a half with no position (-inf * 0) would be NaN. A
    # tiny cz instead: every 2^(z - m) is then exactly 1, a uniform softmax, as the official
    # head computes it (z = a * 1e-38 is below an ulp of 1 for any |a| < 1e30).
    cz = tl.where(cz == 0.0, 1e-38, cz)
    inv_N = 1.0 / (N + tl.zeros((1,), dtype=ACC))          # N == 1 arrives as a constant int
    return is_max, t_fin, inv, lam, cz, inv_N


@triton.jit
def _ds_coefs(g_ptr, stride_gb, stride_gc, m_ptr, l_ptr, att_ptr, amax_ptr, b, c, hc, row_ok,
              H, C, inv, lam, inv_N, is_max, ACC: tl.constexpr):
    """Per row of a dS program: the forward's m, att and argmax, and the coefficients of
    dS' = k0 + kp * d (:func:`_ds_half`) from grad_y (both dS kernels)."""
    state = b * H * C + hc
    g = tl.load(g_ptr + b * stride_gb + c * stride_gc, mask=row_ok, other=0.0).to(ACC)
    m = tl.load(m_ptr + state, mask=row_ok, other=0.0).to(ACC)
    l = tl.load(l_ptr + state, mask=row_ok, other=1.0).to(ACC)
    att = tl.load(att_ptr + state, mask=row_ok, other=0.0).to(ACC)
    best_j = tl.load(amax_ptr + state, mask=row_ok, other=-1)
    g_scaled = g * inv  # folds the row normalisation into dS'
    k0 = g_scaled * inv_N
    kp = tl.where(is_max, g_scaled * lam, g_scaled * lam / l)
    return m, att, best_j, k0, kp


@triton.jit
def _score_rows(hc, B, b, N):
    """Offsets of rows (hc, b) in the kept scores (H*C, B, N): int32 (the host keeps fewer than
    2^31 scores; 64-bit pointers per element spilled 40 B at the headline on sm_90a)."""
    return (hc * B + b.to(tl.int32)) * N


@triton.jit
def _program_setup(p_ptr, invn_ptr, x_ptr, stride_xb, stride_xd, stride_xn, wo_ptr, H, C, D, N,
                   B, n_cb, c_start, c_stop, HP: tl.constexpr, BC: tl.constexpr,
                   ACC: tl.constexpr, CB_MAJOR: tl.constexpr, XA_D: tl.constexpr,
                   XA_N: tl.constexpr, XA_P: tl.constexpr):
    """What the forward and dS programs share: this program's batch element and class block;
    per row its indices, temperature, inverse norm, lam and z-scale; 1/N; x[b] and the weight
    rows; x's strides and N with their alignment made visible to Triton (``_aligned``)."""
    if CB_MAJOR:  # grid (B, n_cb): the fastest-varying program index runs over batch elements
        b = tl.program_id(0)
        cb = tl.program_id(1)
    else:         # grid (n_cb, B): ... over the class blocks of one batch element
        cb = tl.program_id(0)
        b = tl.program_id(1)
    r = tl.arange(0, HP * BC)
    h = r // BC
    c = c_start + cb * BC + r % BC
    row_ok = (h < H) & (c < c_stop)
    hc = h * C + c                                          # row index into (H, C) and w_op
    is_max, t_fin, inv, lam, cz, inv_N = _row_params(p_ptr, invn_ptr, h, hc, h < H, row_ok, H,
                                                     N, ACC)
    b = b.to(tl.int64)
    x_b = x_ptr + b * stride_xb
    w_rows = wo_ptr + hc.to(tl.int64) * D
    return (b, cb, c, row_ok, hc, is_max, t_fin, inv, lam, cz, inv_N, x_b, w_rows,
            _aligned(stride_xd, XA_D), _aligned(stride_xn, XA_N),
            _aligned(N, XA_P))   # position masks then hold over whole vectors


@triton.jit
def _score_tiles(x_b, stride_xd, stride_xn, w_rows, row_ok, n0, D, N,
                 ROWS: tl.constexpr, HALF: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr):
    """Raw scores a = w_op . x for positions [n0, n0 + 2*HALF), as two (rows, HALF) halves.

    The forward and the backward both call this, with the same tiles: their scores agree bit
    for bit. Positions beyond N and padding rows load zeros (so their a is exactly 0)."""
    nn = n0 + tl.arange(0, HALF)
    ok0 = (nn < N)[None, :]
    ok1 = (nn + HALF < N)[None, :]
    a0 = tl.zeros((ROWS, HALF), dtype=ACC)
    a1 = tl.zeros((ROWS, HALF), dtype=ACC)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        d_ok = (dd < D) | EVEN_D      # EVEN_D (D % BD == 0): no channel mask at all
        w = tl.load(w_rows[:, None] + dd[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0).to(DOT)
        xp = x_b + dd[:, None] * stride_xd + nn[None, :] * stride_xn
        x0 = tl.load(xp, mask=d_ok[:, None] & ok0, other=0.0).to(DOT)
        x1 = tl.load(xp + HALF * stride_xn, mask=d_ok[:, None] & ok1, other=0.0).to(DOT)
        # out_dtype=ACC: triton 3.6 asserts that the accumulator has the out_dtype (default fp32),
        # so fp64 would not compile without it (see _compat).
        a0 = tl.dot(w, x0, a0, input_precision=PRECISION, out_dtype=ACC)
        a1 = tl.dot(w, x1, a1, input_precision=PRECISION, out_dtype=ACC)
    return a0, a1


@triton.jit
def _half_stats(a, nn, N, cz):
    """Per-row statistics of one (rows, HALF) half in raw units: sum_j a_j, max_j a_j, the
    first j of that max, m = max_j z_j (z = a * cz), l = sum_j 2^(z_j - m), sum_j 2^(z_j - m) a_j.
    The masks are written out per use (not shared) so that no masked copy of the tile stays
    live across the reductions (register pressure)."""
    n_ok = (nn < N)[None, :]
    best = tl.max(tl.where(n_ok, a, float("-inf")), axis=1)
    best_j = tl.min(tl.where((a == best[:, None]) & n_ok, nn[None, :], BIG), axis=1)
    m = best * cz
    p = tl.where(n_ok, tl.exp2(a * cz[:, None] - m[:, None]), 0.0)
    return tl.sum(a, axis=1), best, best_j, m, tl.sum(p, axis=1), tl.sum(p * a, axis=1)


@triton.jit
def _save_half(a, nn, N, a_ptr, a_rows, row_ok):
    """Stores one (rows, HALF) half of raw scores into its rows of the (H*C, B, N) scores
    (``a_rows``: :func:`_score_rows`)."""
    tl.store(a_ptr + (a_rows[:, None] + nn[None, :]), a,
             mask=row_ok[:, None] & (nn < N)[None, :])


@triton.jit
def _merge(s_sum, best, best_j, m, l, pa, s2, b2, j2, m2, l2, pa2):
    """Online merge of two sets of row statistics (from _half_stats or earlier tiles)."""
    m_new = tl.maximum(m, m2)
    e1 = tl.exp2(m - m_new)
    e2 = tl.exp2(m2 - m_new)
    # NaN-safe: a fresh state has m = -inf (then e1 = 0 while l = 0).
    e1 = tl.where(m == float("-inf"), 0.0, e1)
    new_best = tl.maximum(best, b2)
    j_first = tl.where(best == new_best, best_j, BIG)
    j_second = tl.where(b2 == new_best, j2, BIG)
    return (s_sum + s2, new_best, tl.minimum(j_first, j_second), m_new, l * e1 + l2 * e2,
            pa * e1 + pa2 * e2)


@triton.jit
def csra_fwd_kernel(
    x_ptr, stride_xb, stride_xd, stride_xn,      # x      (B, D, N), any strides, x.dtype
    wo_ptr,                                      # w_op   (H*C, D) contiguous, x.dtype (prep)
    invn_ptr,                                    # inv_n  (H*C,) contiguous, ACC (prep)
    p_ptr,                                       # params (H + 2,) contiguous ACC: the H
                                                 #   temperatures (inf = max head), lam, log2(e)
    y_ptr, stride_yb, stride_yc,                 # y      (B, C) out, x.dtype
    m_ptr, l_ptr, att_ptr, amax_ptr,             # state  (B, H, C) contiguous: ACC x3, int32
    a_ptr,                                       # scores (H*C, B, N) contiguous out, ACC
                                                 #   (SAVE_A only; any tensor otherwise)
    B, H, C, D, N, n_cb,                         # n_cb = cdiv(C, BC) class blocks
    HP: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    CB_MAJOR: tl.constexpr, EVEN_D: tl.constexpr, ONE_TILE: tl.constexpr,
    XA_D: tl.constexpr, XA_N: tl.constexpr, XA_P: tl.constexpr, EMU_BF16: tl.constexpr,
    SAVE_A: tl.constexpr,
):
    """Grid (n_cb, B), or (B, n_cb) with CB_MAJOR (see "Launch order"). One pass over positions;
    per row: sum, max/argmax, online softmax. SAVE_A (training, when the scores have no more
    elements than x): the raw scores a are also written, for :func:`csra_ds_kept_kernel`."""
    HALF: tl.constexpr = BN // 2
    (b, cb, c, row_ok, hc, is_max, t_fin, inv, lam, cz, inv_N, x_b, w_rows, stride_xd, stride_xn,
     N) = _program_setup(p_ptr, invn_ptr, x_ptr, stride_xb, stride_xd, stride_xn, wo_ptr, H, C, D,
                         N, B, n_cb, 0, C, HP, BC, ACC, CB_MAJOR, XA_D, XA_N, XA_P)

    s_sum = tl.zeros((HP * BC,), dtype=ACC)
    best = tl.full((HP * BC,), float("-inf"), dtype=ACC)
    best_j = tl.full((HP * BC,), BIG, dtype=tl.int32)
    m = tl.full((HP * BC,), float("-inf"), dtype=ACC)
    l = tl.zeros((HP * BC,), dtype=ACC)
    pa = tl.zeros((HP * BC,), dtype=ACC)
    a_rows = _score_rows(hc, B, b, N)
    if ONE_TILE:  # N <= BN: a single exact pass, no loop-carried state
        a0, a1 = _score_tiles(x_b, stride_xd, stride_xn, w_rows, row_ok, 0, D, N,
                              HP * BC, HALF, BD, ACC, DOT, PRECISION, EVEN_D)
        nn = tl.arange(0, HALF)
        if SAVE_A:
            _save_half(a0, nn, N, a_ptr, a_rows, row_ok)
            _save_half(a1, nn + HALF, N, a_ptr, a_rows, row_ok)
        s_sum, best, best_j, m, l, pa = _half_stats(a0, nn, N, cz)
        s1, b1, j1, m1, l1, p1 = _half_stats(a1, nn + HALF, N, cz)
        s_sum, best, best_j, m, l, pa = _merge(s_sum, best, best_j, m, l, pa,
                                               s1, b1, j1, m1, l1, p1)
    else:
        for n0 in range(0, N, BN):
            a0, a1 = _score_tiles(x_b, stride_xd, stride_xn, w_rows, row_ok, n0, D, N,
                                  HP * BC, HALF, BD, ACC, DOT, PRECISION, EVEN_D)
            nn = n0 + tl.arange(0, HALF)
            if SAVE_A:
                _save_half(a0, nn, N, a_ptr, a_rows, row_ok)
                _save_half(a1, nn + HALF, N, a_ptr, a_rows, row_ok)
            s0, b0, j0, m0, l0, p0 = _half_stats(a0, nn, N, cz)
            s_sum, best, best_j, m, l, pa = _merge(s_sum, best, best_j, m, l, pa,
                                                   s0, b0, j0, m0, l0, p0)
            s1, b1, j1, m1, l1, p1 = _half_stats(a1, nn + HALF, N, cz)
            s_sum, best, best_j, m, l, pa = _merge(s_sum, best, best_j, m, l, pa,
                                                   s1, b1, j1, m1, l1, p1)

    # No position matched the maximum only where a row is NaN: report position 0.
    best_j = tl.where(best_j == BIG, 0, best_j)
    att = tl.where(is_max, best, pa / l) * inv
    y_rows = tl.where(row_ok, s_sum * inv * inv_N + lam * att, 0.0)
    y = tl.sum(tl.reshape(y_rows, (HP, BC)), axis=0)
    cc = cb * BC + tl.arange(0, BC)
    tl.store(y_ptr + b * stride_yb + cc * stride_yc,
             _round_to(y, y_ptr.dtype.element_ty, EMU_BF16), mask=cc < C)
    state = b * H * C + hc
    tl.store(m_ptr + state, m, mask=row_ok)
    tl.store(l_ptr + state, l, mask=row_ok)
    tl.store(att_ptr + state, att, mask=row_ok)
    tl.store(amax_ptr + state, best_j, mask=row_ok)


@triton.jit
def _ds_half(a, nn, N, inv, cz, t_fin, m, att, best_j, is_max, k0, kp, out_rows, row_ok,
             EMU_BF16: tl.constexpr):
    """dS' for one (rows, HALF) half of recomputed raw scores, stored into ``out_rows``:
    k0 + kp * d with d = 2^(z - m) (1 + T (s - att)) (softmax rows; kp holds g lam inv_n / l)
    or d = [j == argmax] (max rows; kp = g lam inv_n), k0 = g inv_n / N."""
    e = tl.exp2(a * cz[:, None] - m[:, None])
    d_soft = e * (1.0 + t_fin[:, None] * (a * inv[:, None] - att[:, None]))
    d_att = tl.where(is_max[:, None], tl.where(nn[None, :] == best_j[:, None], 1.0, 0.0), d_soft)
    ds = k0[:, None] + kp[:, None] * d_att
    tl.store(out_rows[:, None] + nn[None, :], _round_to(ds, out_rows.dtype.element_ty, EMU_BF16),
             mask=row_ok[:, None] & (nn < N)[None, :])


@triton.jit
def csra_ds_kernel(
    x_ptr, stride_xb, stride_xd, stride_xn,      # x      (B, D, N), any strides
    wo_ptr,                                      # w_op   (H*C, D) contiguous, x.dtype (prep)
    invn_ptr,                                    # inv_n  (H*C,) contiguous, from the forward
    p_ptr,                                       # params (H + 2,) contiguous ACC (as forward)
    g_ptr, stride_gb, stride_gc,                 # grad_y (B, C), any strides (stride 0 allowed)
    m_ptr, l_ptr, att_ptr, amax_ptr,             # state  (B, H, C) contiguous, from the forward
    ds_ptr,                                      # dS'    (H, n_chunk, B, N) contiguous out
    B, H, C, D, N, c_start, n_chunk, n_cb,
    HP: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    CB_MAJOR: tl.constexpr, EVEN_D: tl.constexpr, ONE_TILE: tl.constexpr,
    XA_D: tl.constexpr, XA_N: tl.constexpr, XA_P: tl.constexpr, EMU_BF16: tl.constexpr,
):
    """Grid (n_cb, B), or (B, n_cb) with CB_MAJOR, over classes [c_start, c_start + n_chunk),
    n_cb = cdiv(n_chunk, BC).

    Recomputes the scores and writes dS' = inv_n * dy/ds, the score gradient already scaled by
    the inverse row norm, so that dx = w_op^T dS' and dW = dS' x^T - W rowsum(W dS' x^T) inv_n^2:
        finite T: dy/ds_j = g * (1/N + lam * p_j * (1 + T * (s_j - att))),  p_j = 2^(z_j - m) / l
        T = inf:  dy/ds_j = g * (1/N + lam * [j == argmax])
    """
    HALF: tl.constexpr = BN // 2
    c_stop = tl.minimum(c_start + n_chunk, C)
    (b, cb, c, row_ok, hc, is_max, t_fin, inv, lam, cz, inv_N, x_b, w_rows, stride_xd, stride_xn,
     N) = _program_setup(p_ptr, invn_ptr, x_ptr, stride_xb, stride_xd, stride_xn, wo_ptr, H, C, D,
                         N, B, n_cb, c_start, c_stop, HP, BC, ACC, CB_MAJOR, XA_D, XA_N, XA_P)
    m, att, best_j, k0, kp = _ds_coefs(g_ptr, stride_gb, stride_gc, m_ptr, l_ptr, att_ptr,
                                       amax_ptr, b, c, hc, row_ok, H, C, inv, lam, inv_N, is_max,
                                       ACC)
    h = hc // C
    out_rows = ds_ptr + ((h * n_chunk + (c - c_start)).to(tl.int64) * B + b) * N
    for n0 in range(0, 1 if ONE_TILE else N, BN):   # ONE_TILE (N <= BN): no loop
        a0, a1 = _score_tiles(x_b, stride_xd, stride_xn, w_rows, row_ok, n0, D, N,
                              HP * BC, HALF, BD, ACC, DOT, PRECISION, EVEN_D)
        nn = n0 + tl.arange(0, HALF)
        _ds_half(a0, nn, N, inv, cz, t_fin, m, att, best_j, is_max, k0, kp, out_rows, row_ok,
                 EMU_BF16)
        _ds_half(a1, nn + HALF, N, inv, cz, t_fin, m, att, best_j, is_max, k0, kp, out_rows,
                 row_ok, EMU_BF16)


@triton.jit
def csra_ds_kept_kernel(
    a_ptr,                                       # scores (H*C, B, N) contiguous, ACC (forward)
    invn_ptr,                                    # inv_n  (H*C,) contiguous, from the forward
    p_ptr,                                       # params (H + 2,) contiguous ACC (as forward)
    g_ptr, stride_gb, stride_gc,                 # grad_y (B, C), any strides (stride 0 allowed)
    m_ptr, l_ptr, att_ptr, amax_ptr,             # state  (B, H, C) contiguous, from the forward
    ds_ptr,                                      # dS'    (H, n_chunk, B, N) contiguous out
    B, H, C, N, c_start, n_chunk,
    BR: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, EMU_BF16: tl.constexpr,
    XA_P: tl.constexpr,
):
    """Grid (cdiv(H * n_chunk, BR), B): dS' as :func:`csra_ds_kernel` writes it, for classes
    [c_start, c_start + n_chunk), from the raw scores the forward kept (SAVE_A) instead of
    recomputing them: an elementwise pass (bytes: the scores and dS'), no GEMM, no x. The same
    row scalars and the same :func:`_ds_half` as the recomputing kernel, on the same values of
    a: the two write the same dS'."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    b = tl.program_id(1).to(tl.int64)
    N = _aligned(N, XA_P)       # rows of N scores / dS' in vectors (as the recomputing kernel)
    row_ok = r < H * n_chunk
    h = r // n_chunk
    c = c_start + r % n_chunk
    hc = h * C + c
    is_max, t_fin, inv, lam, cz, inv_N = _row_params(p_ptr, invn_ptr, h, hc, row_ok, row_ok, H,
                                                     N, ACC)
    m, att, best_j, k0, kp = _ds_coefs(g_ptr, stride_gb, stride_gc, m_ptr, l_ptr, att_ptr,
                                       amax_ptr, b, c, hc, row_ok, H, C, inv, lam, inv_N, is_max,
                                       ACC)
    a_rows = _score_rows(hc, B, b, N)
    out_rows = ds_ptr + (r.to(tl.int64) * B + b) * N
    for n0 in range(0, N, BN):
        nn = n0 + tl.arange(0, BN)
        a = tl.load(a_ptr + (a_rows[:, None] + nn[None, :]),
                    mask=row_ok[:, None] & (nn < N)[None, :], other=0.0)
        _ds_half(a, nn, N, inv, cz, t_fin, m, att, best_j, is_max, k0, kp, out_rows, row_ok,
                 EMU_BF16)


if _compat.interpreted(csra_fwd_kernel):      # (TRITON_INTERPRET: the tests on CPU)
    _compat.patch_interpreter()
