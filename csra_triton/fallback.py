"""Vectorised PyTorch versions of the two kernels in ``kernels.py`` (CPU without the interpreter).

Same inputs, outputs, layouts and state as the Triton kernels, so the op layer treats both alike.
All heads go through one product per class chunk; nothing larger than one chunk of
(B, H, chunk, N) scores is alive at a time. Computation is in fp32 (fp64 for fp64 inputs), after
rounding the operands to x.dtype as the kernels do.
"""
from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def scores(x, weight, temps, inv_n, c0, c1, acc):
    """Scores (B, H, c1-c0, N) in ``acc`` dtype and per-head temperature views."""
    H, _, D = weight.shape
    w = weight[:, c0:c1].to(x.dtype).to(acc)                       # (H, Cc, D)
    xa = x.to(acc)                                                  # (B, D, N)
    s = torch.einsum("hcd,bdn->bhcn", w, xa) * inv_n[:, c0:c1, None]
    t = temps.to(device=x.device, dtype=acc).view(H, 1, 1)
    is_max = torch.isinf(t)
    t_fin = torch.where(is_max, torch.ones_like(t), t)
    return s, is_max, t_fin


def inv_norms(weight, normalize, acc):
    """(H, C) inverse row norms (ones without normalisation)."""
    if not normalize:
        return torch.ones(weight.shape[:2], dtype=acc, device=weight.device)
    return 1.0 / weight.to(acc).pow(2).sum(-1).sqrt()


def fwd(x, weight, temps, lam, normalize, chunk, outs):
    """Fills and returns ``outs`` = (y (B, C), m, l, att (B, H, C), argmax (B, H, C) int32,
    inv_n (H, C)): the kernel's state, in base 2 (z = T log2(e) s, m = max_j z_j,
    l = sum_j 2^(z_j - m))."""
    y, m, l, att, amax, inv_n = outs
    C = y.shape[1]
    acc = inv_n.dtype
    inv_n.copy_(inv_norms(weight, normalize, acc))
    for c0 in range(0, C, chunk):
        c1 = min(C, c0 + chunk)
        s, is_max, t_fin = scores(x, weight, temps, inv_n, c0, c1, acc)
        z = s * (t_fin / LN2)
        zmax = z.amax(dim=-1, keepdim=True)
        e = torch.exp2(z - zmax)
        l_c = e.sum(-1)
        soft = (e * s).sum(-1) / l_c
        best, best_j = s.max(dim=-1)
        a = torch.where(is_max[..., 0], best, soft)
        y[:, c0:c1] = (s.mean(-1) + lam * a).sum(1).to(x.dtype)
        m[:, :, c0:c1] = zmax[..., 0]
        l[:, :, c0:c1] = l_c
        att[:, :, c0:c1] = a
        amax[:, :, c0:c1] = best_j.to(torch.int32)
    return outs


def ds_chunk(x, weight, temps, grad_y, m, l, att, amax, inv_n, lam, c0, c1, out):
    """Writes dS' = inv_n * dy/ds for classes [c0, c1) into ``out`` (H, c1-c0, B, N)."""
    B, D, N = x.shape
    acc = m.dtype
    s, is_max, t_fin = scores(x, weight, temps, inv_n, c0, c1, acc)   # (B, H, Cc, N)
    m_c, l_c, att_c = (t[:, :, c0:c1, None] for t in (m, l, att))
    p = torch.exp2(s * (t_fin / LN2) - m_c) / l_c
    d_soft = p * (1.0 + t_fin * (s - att_c))
    pos = torch.arange(N, device=x.device)
    d_max = (pos == amax[:, :, c0:c1, None]).to(acc)
    d_att = torch.where(is_max, d_max, d_soft)
    g = grad_y[:, None, c0:c1, None].to(acc) * inv_n[None, :, c0:c1, None]
    ds = g * (1.0 / N + lam * d_att)
    out.copy_(ds.permute(1, 2, 0, 3))


def forward_graph(x, weight, temps, lam, normalize):
    """y (B, C) in x's dtype as one graph of standard operators, for exporters that cannot call
    the custom op (ONNX): the same math and operand rounding as the kernels, in fp32 (fp64 for
    fp64 x). x (B, D, N); temps as the kernels take them (a max head is inf)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(x.dtype).to(acc)                                  # (H, C, D)
    s = torch.matmul(w.unsqueeze(0), x.to(acc).unsqueeze(1))        # (B, H, C, N)
    if normalize:
        s = s * torch.rsqrt(weight.to(acc).pow(2).sum(-1, keepdim=True))
    heads = []
    for k, t in enumerate(temps):
        sk = s[:, k]
        if math.isinf(t):
            att = sk.amax(dim=-1)
        else:
            att = (torch.softmax(sk * t, dim=-1) * sk).sum(-1)
        heads.append(sk.mean(-1) + lam * att)
    return torch.stack(heads, 0).sum(0).to(x.dtype)
