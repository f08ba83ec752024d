"""Triton kernels for multi-head CSRA (stage 2 of reference -> kernels -> op -> module -> CLI).

Notation (see shared DESIGN.md §1-2): B batch, D channels (in_ch), N = h*w positions, H heads,
C classes. A "row" is one (head, class) pair. A program owns one batch element ``b`` and a block of
``BC`` classes for *all* heads at once: its row tile has ``HP * BC`` rows, laid out head-major
(``r = h * BC + c_local``), where ``HP`` is the next power of two of H (rows with ``h >= H`` are
padding). Because every head of a class lives in the same program, the sum over heads is a
register reshape + reduction: no atomics, no second launch, bitwise deterministic.

Operand precision: the score GEMM runs on ``x.dtype`` operands (the weight tile is cast to it,
as a 1x1 conv under autocast would), accumulating in fp32 (fp64 when x is fp64). fp32 inputs use
IEEE fp32 products unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32). The row
norms are computed from the weight in its own dtype, in fp32, as the official code does
(``torch.norm`` runs in fp32 under autocast). Softmax state is fp32 (fp64 for fp64 inputs) and
uses base-2 exponentials: with z_j = T*log2(e)*s_j, the forward saves m = max_j z_j and
l = sum_j 2^(z_j - m) (not their log-sum-exp: at |z| ~ 1e4 an fp32 lse is off by up to an ulp,
~1e-3, which would scale every softmax weight; 2^(z_j - m) is exact at the maximum). The backward
recomputes z bit for bit (same tiles, same channel order), so p_j = 2^(z_j - m) / l.

Pointer conventions: every tensor argument is followed by its strides in elements, in the order of
the shape given next to it. Outputs written with implicit strides are contiguous by contract
(the op layer allocates them).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _bf16_rtne(v):
    """fp32 -> fp32 holding the nearest-even bf16 value. Only used under the interpreter, whose
    own fp32 -> bf16 cast truncates (GPU casts round to nearest even already)."""
    bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(v, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """Cast ``v`` to ``dtype`` with round-to-nearest-even, also under the interpreter."""
    if EMU_BF16:
        v = _bf16_rtne(v)
    return v.to(dtype)


@triton.jit
def _row_setup(t_ptr, w_ptr, stride_wh, stride_wc, stride_wd, H, C, D, pid_c, c_start, c_stop,
               NORMALIZE: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
               ACC: tl.constexpr):
    """Per-row indices, temperatures and inverse row norms of one program's row tile."""
    r = tl.arange(0, HP * BC)
    h = r // BC
    c = c_start + pid_c * BC + r % BC
    row_ok = (h < H) & (c < c_stop)
    temp = tl.load(t_ptr + h, mask=h < H, other=1.0).to(ACC)
    is_max = temp == float("inf")
    t_fin = tl.where(is_max, 1.0, temp)  # the finite temperature used by softmax rows
    w_rows = w_ptr + h * stride_wh + c * stride_wc
    if NORMALIZE:
        ss = tl.zeros((HP * BC,), dtype=ACC)
        for d0 in range(0, D, BD):
            dd = d0 + tl.arange(0, BD)
            w = tl.load(w_rows[:, None] + dd[None, :] * stride_wd,
                        mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(ACC)
            ss += tl.sum(w * w, axis=1)
        # A zero row gives inv_n = inf and s = 0 * inf = NaN, as the official 0/0 does.
        inv_n = tl.where(row_ok, 1.0 / tl.sqrt(tl.where(row_ok, ss, 1.0)), 0.0)
    else:
        inv_n = tl.where(row_ok, 1.0, 0.0).to(ACC)
    return h, c, row_ok, is_max, t_fin, w_rows, inv_n


@triton.jit
def _scores(x_ptr, stride_xb, stride_xd, stride_xn, w_rows, stride_wd, row_ok, pid_b, nn, D, N,
            inv_n, HP: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
            ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
            EMU_BF16: tl.constexpr):
    """s[r, j] = inv_n[r] * sum_i W[r, i] x[b, i, nn[j]] for one (rows x BN) tile, fp32/fp64.

    The weight tile is rounded to x's dtype first (as a 1x1 conv under autocast does), then both
    operands go to the DOT dtype (x's own, except bf16 under the interpreter: fp32)."""
    acc = tl.zeros((HP * BC, BN), dtype=ACC)
    x_cols = x_ptr + pid_b * stride_xb + nn[None, :] * stride_xn
    n_ok = (nn < N)[None, :]
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        d_ok = dd < D
        w = tl.load(w_rows[:, None] + dd[None, :] * stride_wd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        xt = tl.load(x_cols + dd[:, None] * stride_xd, mask=d_ok[:, None] & n_ok, other=0.0)
        w = _round_to(w, x_ptr.dtype.element_ty, EMU_BF16)
        acc = tl.dot(w.to(DOT), xt.to(DOT), acc, input_precision=PRECISION)
    return acc * inv_n[:, None]


@triton.jit
def csra_fwd_kernel(
    x_ptr, stride_xb, stride_xd, stride_xn,      # x      (B, D, N), any strides, x.dtype
    w_ptr, stride_wh, stride_wc, stride_wd,      # weight (H, C, D), any strides, weight.dtype
    t_ptr,                                       # temps  (H,) contiguous fp32; inf = max head
    y_ptr, stride_yb, stride_yc,                 # y      (B, C) out, x.dtype
    m_ptr, l_ptr, att_ptr, amax_ptr,             # state  (B, H, C) contiguous: acc, acc, acc, int32
    invn_ptr,                                    # inv_n  (H, C) contiguous fp32/fp64, written by b == 0
    H, C, D, N, lam, inv_N,
    NORMALIZE: tl.constexpr, HP: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    """Grid (B, cdiv(C, BC)). One pass over positions with an online softmax per row."""
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: x may exceed 2**31 elements
    pid_c = tl.program_id(1)
    h, c, row_ok, is_max, t_fin, w_rows, inv_n = _row_setup(
        t_ptr, w_ptr, stride_wh, stride_wc, stride_wd, H, C, D, pid_c, 0, C,
        NORMALIZE, HP, BC, BD, ACC)
    state = pid_b * H * C + h * C + c  # offsets into (B, H, C) and, minus b, into (H, C)
    if pid_b == 0:
        tl.store(invn_ptr + h * C + c, inv_n, mask=row_ok)
    t2 = t_fin * 1.4426950408889634  # T * log2(e): softmax in base 2

    m2 = tl.full((HP * BC,), float("-inf"), dtype=ACC)  # running max of T*log2e*s
    l = tl.zeros((HP * BC,), dtype=ACC)                 # running sum of 2^(z - m2)
    ps = tl.zeros((HP * BC,), dtype=ACC)                # running sum of 2^(z - m2) * s
    s_sum = tl.zeros((HP * BC,), dtype=ACC)
    best = tl.full((HP * BC,), float("-inf"), dtype=ACC)
    best_j = tl.zeros((HP * BC,), dtype=tl.int32)
    for n0 in range(0, N, BN):
        nn = n0 + tl.arange(0, BN)
        n_ok = (nn < N)[None, :]
        s = _scores(x_ptr, stride_xb, stride_xd, stride_xn, w_rows, stride_wd, row_ok, pid_b, nn,
                    D, N, inv_n, HP, BC, BN, BD, ACC, DOT, PRECISION, EMU_BF16)
        s_sum += tl.sum(tl.where(n_ok, s, 0.0), axis=1)
        s_m = tl.where(n_ok, s, float("-inf"))
        blk_best = tl.max(s_m, axis=1)
        blk_j = tl.argmax(s_m, axis=1).to(tl.int32) + n0
        better = blk_best > best  # strict: ties keep the first position, as torch.max does
        best = tl.where(better, blk_best, best)
        best_j = tl.where(better, blk_j, best_j)
        z = s_m * t2[:, None]
        m_new = tl.maximum(m2, tl.max(z, axis=1))
        alpha = tl.exp2(m2 - m_new)
        p = tl.exp2(z - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        ps = ps * alpha + tl.sum(tl.where(n_ok, p * s, 0.0), axis=1)
        m2 = m_new

    att = tl.where(is_max, best, ps / l)
    y_rows = tl.where(row_ok, s_sum * inv_N + lam * att, 0.0)
    y = tl.sum(tl.reshape(y_rows, (HP, BC)), axis=0)
    cc = pid_c * BC + tl.arange(0, BC)
    tl.store(y_ptr + pid_b * stride_yb + cc * stride_yc,
             _round_to(y, y_ptr.dtype.element_ty, EMU_BF16), mask=cc < C)
    tl.store(m_ptr + state, m2, mask=row_ok)
    tl.store(l_ptr + state, l, mask=row_ok)
    tl.store(att_ptr + state, att, mask=row_ok)
    tl.store(amax_ptr + state, best_j, mask=row_ok)


@triton.jit
def csra_bwd_ds_kernel(
    x_ptr, stride_xb, stride_xd, stride_xn,      # x      (B, D, N), any strides
    w_ptr, stride_wh, stride_wc, stride_wd,      # weight (H, C, D), any strides
    t_ptr,                                       # temps  (H,) contiguous fp32
    g_ptr, stride_gb, stride_gc,                 # grad_y (B, C), any strides (stride 0 allowed)
    m_ptr, l_ptr, att_ptr, amax_ptr,             # state  (B, H, C) contiguous, from the forward
    invn_ptr,                                    # inv_n  (H, C) contiguous
    ds_ptr,                                      # dS'    (H, n_chunk, B, N) contiguous out
    B, H, C, D, N, c_start, n_chunk, lam, inv_N,
    HP: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, EMU_BF16: tl.constexpr,
):
    """Grid (B, cdiv(n_chunk, BC)) over classes [c_start, c_start + n_chunk).

    Recomputes s and writes dS' = inv_n * dy/ds, i.e. the score gradient already scaled by the
    inverse row norm, so that dx = W^T dS' and dW = dS' x^T - W * rowsum(W * dS' x^T) * inv_n^2.
        finite T: dy/ds_j = g * (1/N + lam * p_j * (1 + T * (s_j - att))),  p_j = 2^(z_j - m) / l
        T = inf:  dy/ds_j = g * (1/N + lam * [j == argmax])
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    c_stop = tl.minimum(c_start + n_chunk, C)
    h, c, row_ok, is_max, t_fin, w_rows, _unused = _row_setup(
        t_ptr, w_ptr, stride_wh, stride_wc, stride_wd, H, C, D, pid_c, c_start, c_stop,
        False, HP, BC, BD, ACC)
    inv_n = tl.load(invn_ptr + h * C + c, mask=row_ok, other=0.0).to(ACC)
    state = pid_b * H * C + h * C + c
    g = tl.load(g_ptr + pid_b * stride_gb + c * stride_gc, mask=row_ok, other=0.0).to(ACC)
    m2 = tl.load(m_ptr + state, mask=row_ok, other=0.0).to(ACC)
    inv_l = 1.0 / tl.load(l_ptr + state, mask=row_ok, other=1.0).to(ACC)
    att = tl.load(att_ptr + state, mask=row_ok, other=0.0).to(ACC)
    best_j = tl.load(amax_ptr + state, mask=row_ok, other=-1)
    t2 = t_fin * 1.4426950408889634
    g_scaled = g * inv_n  # folds the row normalisation into dS'
    out_rows = ds_ptr + ((h * n_chunk + (c - c_start)) * B + pid_b) * N
    for n0 in range(0, N, BN):
        nn = n0 + tl.arange(0, BN)
        n_ok = (nn < N)[None, :]
        s = _scores(x_ptr, stride_xb, stride_xd, stride_xn, w_rows, stride_wd, row_ok, pid_b, nn,
                    D, N, inv_n, HP, BC, BN, BD, ACC, DOT, PRECISION, EMU_BF16)
        p = tl.exp2(s * t2[:, None] - m2[:, None]) * inv_l[:, None]
        d_soft = p * (1.0 + t_fin[:, None] * (s - att[:, None]))
        d_max = tl.where(nn[None, :] == best_j[:, None], 1.0, 0.0)
        d_att = tl.where(is_max[:, None], d_max, d_soft)
        ds = g_scaled[:, None] * (inv_N + lam * d_att)
        tl.store(out_rows[:, None] + nn[None, :],
                 _round_to(ds, ds_ptr.dtype.element_ty, EMU_BF16), mask=row_ok[:, None] & n_ok)
