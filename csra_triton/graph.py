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


def onnx_graph(x: Tensor, weight: Tensor, temps, lam, normalize: bool,
               y_dtype: torch.dtype | None = None) -> Tensor:
    """:func:`composite`'s values for an ONNX export (a max head as one ReduceMax)."""
    acc = acc_dtype(x.dtype)
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
    return torch.stack(heads, 0).sum(0).to(y_dtype or x.dtype)
