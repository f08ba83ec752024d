"""The head as one graph of standard operators (the implementations layer, beside the two
implementations, docs/architecture.md): what the op layer's composite route runs.

* :func:`composite`: what every autograd transform differentiates and batches (torch.func,
  forward-mode AD, double backward): autograd at every step, a max head's gradient to its first
  maximum (``max(dim)``), as the op routes it.
* :func:`onnx_graph`: what an ONNX export writes (ONNX has no translation for the custom op):
  the same values, in the operators onnxruntime runs fastest.

Both compute what the kernels compute, with the same operand rounding (the weight rounded to
x's dtype), in fp32 (fp64 for fp64 x), and hold the (B, H, C, N) scores.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import acc_dtype


def composite(x: Tensor, weight: Tensor, temps, lam, normalize: bool,
              y_dtype: torch.dtype | None = None) -> Tensor:
    """y (B, C) in x's dtype (or ``y_dtype``): x (B, D, N), weight (H, C, D), temps validated
    (a max head is inf), lam a number or a tensor."""
    acc = acc_dtype(x.dtype)
    w = weight.to(x.dtype).to(acc)                                  # (H, C, D)
    s = torch.matmul(w.unsqueeze(0), x.to(acc).unsqueeze(1))        # (B, H, C, N)
    if normalize:
        s = s * torch.rsqrt(weight.to(acc).pow(2).sum(-1, keepdim=True))
    heads = []
    for k, t in enumerate(temps):
        sk = s[:, k]
        if math.isinf(t):
            att = sk.max(dim=-1).values
        else:
            att = (torch.softmax(sk * t, dim=-1) * sk).sum(-1)
        heads.append(sk.mean(-1) + lam * att)
    return torch.stack(heads, 0).sum(0).to(y_dtype or x.dtype)


#: Temperatures folded into an ONNX graph's constant weights (:func:`onnx_graph`) lie within
#: these bounds: a product T * w of a normal weight stays normal in fp32.
_FOLDABLE = (2.0 ** -20, 2.0 ** 20)
#: Heads are summed by one constant matrix up to this many elements of (HC, C) (1 MB in fp32)
_SUM_MATRIX = 1 << 18


def onnx_graph(x: Tensor, layout: str, weight: Tensor, temps, lam, normalize: bool,
               y_dtype: torch.dtype | None = None) -> Tensor:
    """:func:`composite`'s values for an ONNX export, in the operators onnxruntime runs
    fastest. x in ``layout`` ("nchw" (B, D, h, w), "tokens" (B, N, D), "bdn" (B, D, N)).

    The weight's row scale (1 / ||W row|| and each head's temperature T; 1 for a max head) is
    folded into one constant weight, which onnxruntime computes once when it loads the model:
    the scores' product then yields z = T s directly, one Conv (x as an image: onnxruntime's
    blocked-layout convolution, its fastest GEMM for NCHW input) or one MatMul with a constant
    right operand (tokens: packed once). Every head's rows go through one softmax, one weighted
    sum and one mean (a max head's attention is its row's max, selected by a constant mask),
    and y = (mean z + lam sum p z) / T, summed over heads. Rounding: (T w) x instead of
    T (w x): exact for power-of-two temperatures, within an ulp otherwise."""
    acc = acc_dtype(x.dtype)
    H, C, D = weight.shape
    if not isinstance(lam, Tensor):     # (a Python number became an fp32 constant in ONNX)
        lam = torch.tensor(lam, dtype=acc, device=x.device)
    finite = [t for t in temps if not math.isinf(t)]
    fold = all(_FOLDABLE[0] <= t <= _FOLDABLE[1] for t in finite)
    t_row = torch.tensor([t if fold and not math.isinf(t) else 1.0 for t in temps],
                         dtype=acc, device=x.device)[:, None, None]           # (H, 1, 1)
    w = weight.to(x.dtype).to(acc)
    scale = t_row
    if normalize:
        scale = scale * torch.rsqrt(weight.to(acc).pow(2).sum(-1, keepdim=True))
    w = (w * scale).reshape(H * C, D)
    if layout == "tokens":
        z = torch.matmul(x.to(acc), w.t()).transpose(1, 2)                 # (B, HC, N)
    elif acc == torch.float32:
        x4 = x if layout == "nchw" else x.unsqueeze(-1)
        z = torch.nn.functional.conv2d(x4.to(acc), w[:, :, None, None]).flatten(2)
    else:   # (fp64: onnxruntime's Conv is fp32-only)
        x3 = x.flatten(2) if layout == "nchw" else x
        z = torch.matmul(w, x3.to(acc))
    if not fold:                           # temperatures multiplied into the scores instead
        t_each = torch.tensor([1.0 if math.isinf(t) else t for t in temps], dtype=acc,
                              device=x.device).repeat_interleave(C)
        s, z = z, z * t_each[:, None]
    p = torch.softmax(z, dim=-1)
    if fold:
        att = (p * z).sum(-1)
        mean = z.mean(-1)
    else:
        att = (p * s).sum(-1)
        mean = s.mean(-1)
    if finite != list(temps):             # max heads: the row's max (T = 1 in their rows)
        is_max = torch.tensor([math.isinf(t) for t in temps],
                              device=x.device).repeat_interleave(C)
        att = torch.where(is_max, z.amax(-1), att)
    inv_t = (1.0 / t_row.reshape(H, 1)).expand(H, C).reshape(H * C) if fold else None
    if H * C * C <= _SUM_MATRIX:
        # y = [mean, att] @ S: the 1/T, lam and the sum over heads as one small constant
        # matrix (2HC, C): one node for what were five
        eye = torch.eye(C, dtype=acc, device=x.device).repeat(H, 1)           # (HC, C)
        if inv_t is not None:
            eye = eye * inv_t[:, None]
        sum_mat = torch.cat((eye, eye * lam.to(acc)))
        return torch.matmul(torch.cat((mean, att), -1), sum_mat).to(y_dtype or x.dtype)
    y = mean + lam * att                                                    # (B, HC)
    if inv_t is not None and any(t != 1.0 for t in finite):
        y = y * inv_t
    return y.view(-1, H, C).sum(1).to(y_dtype or x.dtype)
