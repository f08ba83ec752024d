"""Eager references (the helpers layer, docs/architecture.md).

* :class:`MHA` / :class:`CSRA` mirror the official ICCV 2021 module's structure and state-dict
  layout: one bias-free 1x1 conv per head in ``multi_head``, scores divided by the weight row
  norms, softmax over positions (or max for the flag value T = 99), heads summed. This is the
  "eager" baseline of the benchmarks, and ``torch.compile`` of it is the "compile" baseline.
* :func:`csra_reference` is a separate, vectorised statement of the same math, meant to be run in
  float64 by the tests and the verification table. It shares no code with the kernels or the op.

Neither is meant to be fast.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

#: Official temperatures per number of heads; 99 is the official flag for a max-pooling head.
OFFICIAL_TEMPERATURES = {
    1: [1],
    2: [1, 99],
    4: [1, 2, 4, 99],
    6: [1, 2, 3, 4, 5, 99],
    8: [1, 2, 3, 4, 5, 6, 7, 99],
}


class CSRA(nn.Module):
    """One head: ``base + lam * att`` for every class, from a (B, d, h, w) feature map."""

    def __init__(self, input_dim: int, num_classes: int, T: float, lam: float,
                 normalize: bool = True):
        super().__init__()
        self.T = T
        self.lam = lam
        self.normalize = normalize
        self.head = nn.Conv2d(input_dim, num_classes, 1, bias=False)
        self.softmax = nn.Softmax(dim=2)

    def forward(self, x: Tensor) -> Tensor:
        score = self.head(x)
        if self.normalize:
            norm = torch.norm(self.head.weight, dim=1, keepdim=True).transpose(0, 1)
            score = score / norm
        score = score.flatten(2)                       # (B, C, N)
        base_logit = torch.mean(score, dim=2)
        if self.T == 99 or math.isinf(self.T):         # max-pooling head
            att_logit = torch.max(score, dim=2)[0]
        else:
            weights = self.softmax(score * self.T)
            att_logit = torch.sum(score * weights, dim=2)
        return base_logit + self.lam * att_logit


class MHA(nn.Module):
    """Sum of ``num_heads`` CSRA heads, with the official temperatures unless given."""

    def __init__(self, num_heads: int, lam: float, input_dim: int, num_classes: int,
                 temperatures: Sequence[float] | None = None, normalize: bool = True):
        super().__init__()
        temps = list(temperatures) if temperatures is not None else OFFICIAL_TEMPERATURES[num_heads]
        if len(temps) != num_heads:
            raise ValueError(f"temperatures: expected {num_heads} values, got {len(temps)}")
        self.temp_list = temps
        self.multi_head = nn.ModuleList(
            [CSRA(input_dim, num_classes, t, lam, normalize) for t in temps])

    def forward(self, x: Tensor) -> Tensor:
        logit = 0.0
        for head in self.multi_head:
            logit = logit + head(x)
        return logit

    @classmethod
    def from_weight(cls, weight: Tensor, temperatures: Sequence[float], lam: float,
                    normalize: bool = True) -> "MHA":
        """An MHA holding ``weight`` (H, C, d) as its per-head 1x1 convs."""
        H, C, d = weight.shape
        m = cls(H, lam, d, C, temperatures, normalize).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for k, head in enumerate(m.multi_head):
                head.head.weight.copy_(weight[k].view(C, d, 1, 1))
        return m


def csra_reference(x: Tensor, weight: Tensor, temperatures: Sequence[float], lam: float,
                   normalize: bool = True) -> Tensor:
    """Vectorised CSRA in x's dtype (use float64). x (B, d, h, w) or (B, d, N); weight (H, C, d).

    Temperatures may be ``math.inf`` or 99 for a max head. Differentiable by autograd.
    """
    w = weight
    if normalize:
        w = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    s = torch.einsum("hcd,bdn->bhcn", w, x.flatten(2))        # (B, H, C, N)
    heads = []
    for k, t in enumerate(temperatures):
        sk = s[:, k]
        if t == 99 or math.isinf(t):
            att = sk.max(dim=-1).values
        else:
            att = (torch.softmax(t * sk, dim=-1) * sk).sum(dim=-1)
        heads.append(sk.mean(dim=-1) + lam * att)
    return torch.stack(heads, dim=0).sum(dim=0)


def as_operand(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight`` with the values the products see when x has ``dtype`` (rounded to it, as a 1x1
    conv under autocast rounds its weight), keeping ``weight``'s dtype and an identity gradient.

    A float64 reference on these operands is what the kernels are compared with: on the unrounded
    weight, near-tied maxima of a max head can pick another position, a discontinuity that no
    tolerance covers (one flipped position moves lam * g * ||Wn|| of gradient).
    """
    return weight + (weight.to(dtype).to(weight.dtype) - weight).detach()
