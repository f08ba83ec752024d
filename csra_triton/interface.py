"""The interface the two implementations share (the helpers layer, docs/ARCHITECTURE.md).

``triton_impl`` (the Triton kernels) and ``fallback`` (PyTorch) each provide, as module-level
names, what :class:`Implementation` declares; the op layer (``ops``) calls nothing else of
them. Their ``Backward`` objects are what :class:`BackwardPass` declares: ``ops._backward_loop``
drives one over chunks of classes. ``tests/test_layers.py`` checks that both modules conform.

Nothing here runs on the data path: these are declarations, for readers and type checkers.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor


class ForwardState(NamedTuple):
    """What a training forward returns beside y (the forward's outputs 2-8), saved for the
    backward. B, H, C: batch, heads, classes; ``acc``: the accumulation dtype (fp32, fp64 for
    fp64 inputs). An implementation may return an empty (0,) tensor for ``inv_norm``, ``kept``
    and ``scores`` (inference keeps none of them), and the eager path None for ``kept`` and
    ``scores``."""
    m: Tensor          #: (B, H, C) acc: softmax max of z = T log2(e) s, base 2
    l: Tensor          #: (B, H, C) acc: sum_j 2^(z_j - m)
    att: Tensor        #: (B, H, C) acc: the attention logit sum_j p_j s_j (max heads: max_j s)
    argmax: Tensor     #: (B, H, C) int32: the first position of max_j s
    inv_norm: Tensor   #: (H, C) acc: 1 / ||W row|| (ones without normalisation)
    kept: Tensor       #: (H*C, D) x's dtype: the prepared weight (Triton, when small)
    scores: Tensor     #: the score products before the row norms, in the implementation's layout


class BackwardPass(Protocol):
    """One backward of one call, driven by ``ops._backward_loop``: for each chunk of classes
    [c0, c1) it fills dS' (``ds``), multiplies (``mm``) into dx and G = dS' x^T, then hands G
    back (``chunk_done``; ``finish`` at the end) for the weight gradient through the row
    normalisation."""

    chunk: int               #: classes per chunk (every class: one chunk, no out= views)
    ws: Tensor               #: the dS' workspace, (H * chunk * B * N,) in ``gemm``
    x_dk: Tensor             #: x as the (D, B*N) GEMM operand, in ``gemm``
    w_gemm: Tensor           #: the weight as the (H, C, D) GEMM operand, in ``gemm``
    gemm: torch.dtype        #: the GEMMs' operand dtype
    dx_dtype: torch.dtype    #: the dtype dx accumulates in over chunks
    mm: Callable[..., Tensor]  #: ``mm(a, b, out=None, buf=None)``: the product a @ b

    def ds(self, c0: int, c1: int, out: Tensor) -> None:
        """dS' = dy/ds of classes [c0, c1) into ``out`` (H, c1 - c0, B, N)."""

    def new_weight_grad(self, G: Tensor) -> Tensor:
        """The tensor dW is written into (G itself where the dtypes allow)."""

    def chunk_done(self, G: Tensor, dW: Tensor, c0: int, c1: int) -> None:
        """Classes [c0, c1) of G are final: their dW may be computed now (or in ``finish``)."""

    def finish(self, G: Tensor, dW: Tensor) -> Tensor:
        """The weight gradient (H, C, D) in the weight's dtype."""


class Implementation(Protocol):
    """A module implementing the head: ``triton_impl`` or ``fallback``.

    ``forward(x, weight, temps, lam, normalize, keep, lam_t=None, y_dtype=None)`` ->
    ``(y, *ForwardState)``: x (B, D, N) with any strides, weight (H, C, D), ``temps`` validated
    (a max head is inf), ``keep`` False for inference (nothing kept for a backward), ``lam_t``
    a learnable lam (a one-element tensor, used instead of ``lam``), ``y_dtype`` y's dtype if
    not x's, in this order. (The Triton side also takes ``packed`` and ``scalars`` after them:
    see its docstring.)

    ``Backward(grad_y, x, weight, state, inv_n, kept, temps, lam, normalize, scores=None,
    lam_t=None, launch_plan=None)`` -> a :class:`BackwardPass`; ``state`` is (m, l, att, argmax),
    ``launch_plan`` the Triton forward's launch plan (reused by the eager path; None elsewhere).

    ``scores_output(x, weight, keep, alloc)``: the forward's ``scores`` output as it will be
    returned (``alloc(shape, dtype, device)``: real or fake tensors), for the ops' fake
    implementations.
    """

    forward: Callable[..., tuple]
    Backward: Callable[..., BackwardPass]
    scores_output: Callable[..., Tensor]
