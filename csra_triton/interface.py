"""The interface every implementation of the head provides (the helpers layer,
docs/architecture.md).

An implementation is a module (``triton_impl``: the Triton kernels; ``fallback``: PyTorch) with
the members :class:`Implementation` declares; the op layer (``ops``) finds it in its registry
(``ops.IMPLEMENTATIONS``, ``ops.register``) and calls nothing else of it. Its ``Backward``
objects are what :class:`BackwardPass` declares: ``ops.backward_loop`` drives one over chunks
of classes. ``tests/test_op.py`` checks that both modules conform and runs the op-level tests
through a third implementation registered by the test (the float64 reference).

Nothing here runs on the data path: these are declarations, for readers and type checkers.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor

from .common import Scalars


class ForwardState(NamedTuple):
    """What a training forward keeps for its backward (the op's outputs 2-8). B, H, C: batch,
    heads, classes; ``acc``: the accumulation dtype (fp32, fp64 for fp64 inputs). Inference
    (``keep=False``) returns empty (0,) tensors for ``inv_norm``, ``kept`` and ``scores``; the
    eager route's forward (``packed=True``) returns None for a ``kept`` or ``scores`` it did not
    keep."""
    m: Tensor          #: (B, H, C) acc: softmax max of z = T log2(e) s, base 2
    l: Tensor          #: (B, H, C) acc: sum_j 2^(z_j - m)
    att: Tensor        #: (B, H, C) acc: the attention logit sum_j p_j s_j (max heads: max_j s)
    argmax: Tensor     #: (B, H, C) int32: the first position of max_j s
    inv_norm: Tensor   #: (H, C) acc: 1 / ||W row|| (ones without normalisation)
    kept: Tensor       #: the prepared weight an implementation hands its backward, or (0,)
    scores: Tensor     #: the score products before the row norms, in the implementation's layout


class Forward(NamedTuple):
    """What a forward returns, from every implementation and on every route of ``ops.run``."""
    y: Tensor                          #: (B, C) logits
    state: ForwardState | None         #: None where autograd keeps it (training) or none exists
    plan: object = None                #: the implementation's handle for the eager backward


class BackwardPass(Protocol):
    """One backward of one call, driven by ``ops.backward_loop``: for each chunk of classes
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
    """A module implementing the head (``triton_impl``, ``fallback``).

    ``forward(x, weight, scalars, normalize, keep, y_dtype=None, packed=False)`` ->
    :class:`Forward`: x (B, D, N) with any strides, weight (H, C, D), ``scalars`` a validated
    :class:`~csra_triton.common.Scalars` (its ``values`` only where the host values are not
    known), ``keep`` False for inference (nothing kept for a backward), ``y_dtype`` y's dtype
    if not x's; ``packed``: the eager route's call (the state may share one allocation, what
    is not kept is None, and ``plan`` may hold what the backward reuses).

    ``Backward(grad_y, x, weight, state, scalars, normalize, plan=None)`` -> a
    :class:`BackwardPass`; ``state`` a :class:`ForwardState`, ``plan`` the forward's.

    ``kept_output(x, weight, keep, alloc)`` and ``scores_output(x, weight, keep, alloc)``: the
    forward's ``kept`` and ``scores`` outputs as it will return them (``alloc(shape, dtype,
    device)``: real or fake tensors), for the ops' fake implementations: the keep rules.

    ``serves(device, dtype)``: whether the automatic choice (``ops.backend_for``) may take it
    for tensors on ``device``; ``triton_op``: whether on CUDA tensors its ops are the
    ``torch.library.triton_op`` pair, whose kernel launches Inductor traces into its graph.
    """

    triton_op: bool
    serves: Callable[[torch.device, torch.dtype], bool]
    forward: Callable[..., Forward]
    Backward: Callable[..., BackwardPass]
    kept_output: Callable[..., Tensor]
    scores_output: Callable[..., Tensor]


__all__ = ["Scalars", "ForwardState", "Forward", "BackwardPass", "Implementation"]
