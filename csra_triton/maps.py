"""Class score maps and attention maps: what each class looks at (used by CSRATriton's methods).

* score maps: s = (W_k x) / ||W_k|| per head, class and position, shape (B, H, K, h, w): the maps
  the official visualisation overlays;
* attention maps: for a finite-temperature head, the softmax weights softmax_j(T s) the head
  used; for a max head, a one-hot of the position the forward chose (the op's own argmax, so it
  is exactly the forward's choice, ties included).

K is all classes or a chosen subset. Work goes in class chunks so that intermediates stay bounded
(the result itself is B*H*K*h*w). Products use the operands the kernels use (the weight rounded to
x's dtype), computed in fp32 (fp64 for fp64 x).
"""
from __future__ import annotations

import math
import torch
from torch import Tensor

from . import fallback, ops
from .common import Scalars, acc_dtype

#: Largest number of score elements computed at once.
CHUNK_ELEMS = 1 << 24


def _class_index(classes, C: int, device) -> Tensor:
    if classes is None:
        return torch.arange(C, device=device)
    idx = torch.as_tensor(classes, device=device).flatten()
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"classes: expected integer class indices, got dtype {idx.dtype}")
    if idx.numel() == 0:
        raise ValueError("classes: expected at least one class index, got none")
    if int(idx.min()) < -C or int(idx.max()) >= C:
        raise ValueError(f"classes: indices must lie in [0, {C}), got min {int(idx.min())}, "
                         f"max {int(idx.max())}")
    return idx.long() % C


def _maps(x: Tensor, weight: Tensor, scalars: Scalars, normalize: bool, classes,
          kind: str) -> Tensor:
    B, D, h, w = x.shape
    N = h * w
    H, C, _ = weight.shape
    idx = _class_index(classes, C, x.device)
    acc = acc_dtype(x.dtype)
    x3 = x.flatten(2)
    w_sel = weight.index_select(1, idx)                                 # (H, K, D)
    inv_n = fallback.inv_norms(w_sel, normalize, acc)                   # (H, K)
    temps = torch.tensor(scalars.temps, dtype=acc)                      # (inf: a max head)
    if kind == "attention" and math.inf in scalars.temps:
        with torch.no_grad():  # the forward's own argmax, for every class
            argmax = ops.run(x3.detach(), weight.detach(), scalars, normalize,
                             need_state=True).state.argmax
        argmax = argmax.index_select(2, idx)                            # (B, H, K)
    K = idx.numel()
    out = torch.empty(B, H, K, N, dtype=acc, device=x.device)
    chunk = max(1, CHUNK_ELEMS // max(1, B * H * N))
    for c0 in range(0, K, chunk):
        c1 = min(K, c0 + chunk)
        s, is_max, t_fin = fallback.score_chunk(x3, w_sel, temps, inv_n, c0, c1, acc)
        s, is_max, t_fin = s.permute(2, 0, 1, 3), is_max.view(H, 1, 1), t_fin.view(H, 1, 1)
        if kind == "score":
            out[:, :, c0:c1] = s
            continue
        soft = torch.softmax(s * t_fin, dim=-1)
        if is_max.any():
            pos = torch.arange(N, device=x.device)
            one_hot = (pos == argmax[:, :, c0:c1, None]).to(acc)
            soft = torch.where(is_max, one_hot, soft)
        out[:, :, c0:c1] = soft
    return out.view(B, H, K, h, w)


def score_maps(x, weight, scalars: Scalars, normalize=True, classes=None) -> Tensor:
    """(B, H, K, h, w) score maps of x (B, D, h, w), validated (``CSRATriton.score_maps``)."""
    return _maps(x, weight, scalars, normalize, classes, "score")


def attention_maps(x, weight, scalars: Scalars, normalize=True, classes=None) -> Tensor:
    """(B, H, K, h, w) attention maps of x (B, D, h, w), validated
    (``CSRATriton.attention_maps``)."""
    return _maps(x, weight, scalars, normalize, classes, "attention")
