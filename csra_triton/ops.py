"""The op layer (docs/architecture.md): the registry of implementations, the one function that
chooses a call's route (:func:`run`), the custom ops and autograd.

Routes (:func:`run`, the first that applies):

===============  ===========================================  ==================================
route            when                                         forward / backward
===============  ===========================================  ==================================
composite        an ONNX export traces; a torch.func          ``graph``:
                 transform, or forward-mode AD on a dual      standard operators, which every
                 input, is active                             transform and exporter takes
eager inference  :func:`_eager`, no gradient will be asked    the implementation's ``forward``
eager training   :func:`_eager`, a gradient will be asked     :class:`_EagerCSRA`
triton_op        CUDA tensors on an implementation whose      ``csra_fwd_cuda`` /
                 ops are triton_ops (``triton_impl``)         ``csra_bwd_cuda``
op               anything else: torch.compile, export,        ``csra_fwd`` / ``csra_bwd``
                 dispatch modes, subclasses, the meta device,
                 ``CSRA_TRITON_EAGER=0``
===============  ===========================================  ==================================

Every route but the composite runs the implementation's ``forward`` and :func:`backward_loop`,
so they give the same bits. The ops (``csra_triton::csra_fwd`` / ``csra_bwd``, and on CUDA the
``triton_op`` pair ``csra_fwd_cuda`` / ``csra_bwd_cuda``) have fake implementations, so that
``torch.compile(fullgraph=True)`` and ``torch.export`` trace through them:

* ``csra_fwd(x, weight, values, normalize, keep=True, backend="auto", y_dtype=None)`` ->
  ``(y, *interface.ForwardState)``: x (B, D, N) with any strides, weight (H, C, D), ``values``
  the temperatures and lam as one (H + 1,) float64 tensor on x's device (:func:`op_values`:
  the ops' one form of them; a learnable lam enters as itself and gets its gradient through
  it), y (B, C) in x's dtype or ``y_dtype``; ``keep=False`` (inference) keeps nothing for a
  backward (``inv_norm``, ``kept`` and ``scores`` empty).
* ``csra_bwd(grad_y, x, weight, *state, values, normalize, backend="auto")`` ->
  ``(grad_x, grad_weight)``: grad_x as the backward's buffer, (B*N, D) for channels-innermost x
  (channels_last, tokens), else (D, B*N) (:func:`dx_of` views it as (B, D, N)): a plain
  2-D output, whose strides Inductor's dynamic shapes handle (a (B, D, N) view of the
  (D, B*N) buffer failed its stride reasoning, with a batch equal to h or w).

``backend`` names a registered implementation (:data:`IMPLEMENTATIONS`), "auto" letting
:func:`backend_for` choose; the module layer resolves it before calling, so that the shapes of
the outputs, which depend on the implementation (``kept``, ``scores``), are a function of the
arguments in a traced graph.

Backward: dS' is materialised in chunks of classes, (H, chunk, B, N) elements, then two GEMMs
per chunk: ``dx += W_chunk^T dS'`` and ``G_chunk = dS' x^T``; finally ``dW = G - W * rowsum(W *
G) * inv_norm^2`` (the gradient through the row normalisation): :func:`backward_loop`, once for
every implementation.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch
from torch import Tensor

from . import fallback, graph, triton_impl
from .common import (BoundedCache, Scalars, as_bdn, channels_inner, dx_view, empty, from_bdn,
                     fwd_outputs, hold_if_capturing, host_values, mm_plain, new, traced_tensor)
from .interface import Forward, ForwardState, Implementation
from .settings import ENV

# --------------------------------------------------------------------------- the registry

#: The implementations by name, in the order the automatic choice tries them
#: (``Implementation.serves``): a new backend is one module and one :func:`register` call.
IMPLEMENTATIONS: dict[str, Implementation] = {"triton": triton_impl, "torch": fallback}
#: The backend ``use_backend`` forces, per thread: a new thread starts at "auto", and one
#: thread's block never changes another's calls. A ``threading.local`` rather than a
#: ``contextvars.ContextVar``: torch.compile traces (and guards on) a thread-local's attribute,
#: while ``ContextVar.get`` breaks a fullgraph trace.
_forced = threading.local()


def register(name: str, impl: Implementation, first: bool = False) -> None:
    """Adds (or replaces) the implementation ``name``; ``first``: the automatic choice tries it
    before the others (else after them). ``use_backend(name)`` selects it explicitly."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name: expected a non-empty name other than 'auto', got {name!r}")
    missing = [m for m in Implementation.__annotations__ if not hasattr(impl, m)]
    if missing:
        raise TypeError(f"impl: missing the interface's members {missing} "
                        f"(csra_triton.interface.Implementation)")
    IMPLEMENTATIONS.pop(name, None)
    items = list(IMPLEMENTATIONS.items())
    IMPLEMENTATIONS.clear()
    IMPLEMENTATIONS.update([(name, impl)] + items if first else items + [(name, impl)])


def unregister(name: str) -> None:
    """Removes the implementation ``name`` (one :func:`register` added)."""
    IMPLEMENTATIONS.pop(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a registered implementation ("triton", "torch": the fallback, ...) inside the
    block, for the calls this thread makes; ``"auto"`` restores the automatic choice. Blocks
    nest."""
    if name != "auto" and name not in IMPLEMENTATIONS:
        raise ValueError(f"backend must be 'auto' or one of {tuple(IMPLEMENTATIONS)}, "
                         f"got {name!r}")
    old = getattr(_forced, "name", "auto")
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = old


def backend_for(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The name of the implementation that runs for tensors on ``device`` of ``dtype``: the
    one :func:`use_backend` forces, else the first registered one that ``serves`` them."""
    name = getattr(_forced, "name", "auto")
    if name != "auto":
        return name
    for name, impl in IMPLEMENTATIONS.items():
        if impl.serves(device, dtype):
            return name
    raise RuntimeError(f"no registered implementation serves {dtype} tensors on {device}")


def implementation(backend: str, x: Tensor) -> Implementation:
    """The registered implementation ``backend`` ("auto": :func:`backend_for` x's)."""
    if backend == "auto":
        backend = backend_for(x.device, x.dtype)
    try:
        return IMPLEMENTATIONS[backend]
    except KeyError:
        raise ValueError(f"backend must be 'auto' or one of {tuple(IMPLEMENTATIONS)}, "
                         f"got {backend!r}") from None


# --------------------------------------------------------------------------- the ops' values

#: The ops' values of host scalars, per device (bounded; keyed by the values themselves, so
#: never stale): repeat calls on the op route copy nothing from the host.
_values_cache = BoundedCache(256)


def op_values(scalars: Scalars, device: torch.device, compiling: bool) -> Tensor:
    """The ops' form of ``scalars``: [T_1, ..., T_H, lam] as one (H + 1,) float64 tensor on
    ``device`` (inf: a max head), ``scalars.values`` where the caller has it. A learnable lam
    enters as itself (a differentiable ``cat``: the op's gradient for this tensor reaches it).
    Made in the graph while anything traces (torch.compile, a dispatch mode: symbolic numbers
    included), else taken from a cache keyed by the numbers."""
    values, lam = scalars.values, scalars.lam
    learnable = isinstance(lam, Tensor)
    if values is None:
        host = (*scalars.temps, 0.0 if learnable else lam)
        if compiling or device.type == "meta" or torch._C._len_torch_dispatch_stack():
            values = traced_tensor(host, torch.float64, device)     # (traced: not kept)
        else:
            key = (host, device)
            values = _values_cache.get(key)
            if values is None:
                values = _values_cache.put(key, torch.tensor(host, dtype=torch.float64,
                                                             device=device))
            hold_if_capturing(values)
    if learnable:
        values = torch.cat((values[:-1], lam.reshape(1).to(torch.float64)))
    return values


def from_values(values: Tensor) -> Scalars:
    """The :class:`Scalars` of the ops' ``values``: read on the host where that is free (CPU
    tensors), else left on the device (``Scalars.values`` alone: nothing waits for a GPU)."""
    if values.device.type == "cpu":
        vals = values.tolist()
        return Scalars(tuple(vals[:-1]), vals[-1], values)
    return Scalars(None, None, values)


# --------------------------------------------------------------------------- the ops

# The kernels read x, the weight and grad_y through their strides: Inductor need not copy
# inputs into the layout it saw while tracing (it did, with an unbacked batch and a conv trunk).
_TAGS = (torch.Tag.flexible_layout,)


def _check_devices(x: Tensor, weight: Tensor, values: Tensor) -> None:
    """An op called with tensors on several devices (a weight left on the meta device, say)
    would run its fake implementation, which allocates outputs and never fills them: refused."""
    if weight.device != x.device or values.device != x.device:
        raise ValueError(f"x, weight and values must be on one device: x on {x.device}, "
                         f"weight on {weight.device}, values on {values.device}")


@torch.library.custom_op("csra_triton::csra_fwd", mutates_args=(), tags=_TAGS)
def csra_fwd(x: Tensor, weight: Tensor, values: Tensor, normalize: bool, keep: bool = True,
             backend: str = "auto", y_dtype: torch.dtype | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_devices(x, weight, values)
    f = implementation(backend, x).forward(x, weight, from_values(values), normalize, keep,
                                           y_dtype)
    return (f.y, *f.state)


@csra_fwd.register_fake
def _(x, weight, values, normalize, keep=True, backend="auto", y_dtype=None):
    _check_devices(x, weight, values)
    impl = implementation(backend, x)
    H, C, _ = weight.shape
    outs = fwd_outputs(x, H, C, empty, keep, y_dtype)
    return (*outs, impl.kept_output(x, weight, keep, empty),
            impl.scores_output(x, weight, keep, empty))


@torch.library.custom_op("csra_triton::csra_bwd", mutates_args=(), tags=_TAGS)
def csra_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, m: Tensor, l: Tensor, att: Tensor,
             argmax: Tensor, inv_norm: Tensor, kept: Tensor, scores: Tensor, values: Tensor,
             normalize: bool, backend: str = "auto") -> tuple[Tensor, Tensor]:
    state = ForwardState(m, l, att, argmax, inv_norm, kept, scores)
    return backward_loop(grad_y, x, weight, state, from_values(values), normalize,
                         implementation(backend, x))


@csra_bwd.register_fake
def _(grad_y, x, weight, m, l, att, argmax, inv_norm, kept, scores, values, normalize,
      backend="auto"):
    B, D, N = x.shape
    return x.new_empty((B * N, D) if channels_inner(x) else (D, B * N)), torch.empty_like(weight)


# CUDA: the same two ops as ``torch.library.triton_op``s. In eager they run exactly as the
# custom ops above; under ``torch.compile`` / ``torch.export`` their bodies are traced and every
# kernel launch is recorded through ``wrap_triton`` (triton_impl._jit_launch), so that
# Inductor's generated code (and an AOTInductor package) launches the kernels itself, without
# a Python custom-op call, and CUDA graphs (``mode="reduce-overhead"``) capture them. CPU
# tensors never reach them: a traced ``wrap_triton`` needs a GPU driver ("0 active drivers").


@torch.library.triton_op("csra_triton::csra_fwd_cuda", mutates_args=())
def csra_fwd_cuda(x: Tensor, weight: Tensor, values: Tensor, normalize: bool, keep: bool = True,
                  y_dtype: torch.dtype | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_devices(x, weight, values)
    f = IMPLEMENTATIONS["triton"].forward(x, weight, from_values(values), normalize, keep,
                                          y_dtype)
    return (f.y, *f.state)


@torch.library.triton_op("csra_triton::csra_bwd_cuda", mutates_args=())
def csra_bwd_cuda(grad_y: Tensor, x: Tensor, weight: Tensor, m: Tensor, l: Tensor, att: Tensor,
                  argmax: Tensor, inv_norm: Tensor, kept: Tensor, scores: Tensor,
                  values: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    state = ForwardState(m, l, att, argmax, inv_norm, kept, scores)
    return backward_loop(grad_y, x, weight, state, from_values(values), normalize,
                         IMPLEMENTATIONS["triton"])


def _fwd_op(x3, weight, values, normalize, keep, backend, y_dtype) -> Forward:
    """The forward op of the route (the triton_op for CUDA tensors on an implementation whose
    ops are triton_ops, else the custom op), as a :class:`Forward`."""
    if x3.is_cuda and IMPLEMENTATIONS[backend].triton_op:
        outs = torch.ops.csra_triton.csra_fwd_cuda(x3, weight, values, normalize, keep, y_dtype)
    else:
        outs = torch.ops.csra_triton.csra_fwd(x3, weight, values, normalize, keep, backend,
                                              y_dtype)
    return Forward(outs[0], ForwardState(*outs[1:]))


# --------------------------------------------------------------------------- the backward


def backward_loop(grad_y: Tensor, x: Tensor, weight: Tensor, state: ForwardState,
                  scalars: Scalars, normalize: bool, impl: Implementation, plan=None):
    """(dx, dW) of one call: the implementation's :class:`interface.BackwardPass` driven over
    chunks of classes, with the GEMMs here. dx is the loop's buffer, (B*N, D) for
    channels-innermost x, else (D, B*N), in x's dtype (:func:`dx_of` views it as (B, D, N))."""
    B, D, N = x.shape
    H, C, _ = weight.shape
    inner = channels_inner(x)
    if B == 0 or C == 0:        # nothing to launch: zero gradients (an empty one for C == 0)
        return x.new_zeros((B * N, D) if inner else (D, B * N)), torch.zeros_like(weight)
    bw = impl.Backward(grad_y, x, weight, state, scalars, normalize, plan)
    chunk, x_dk, w_gemm = bw.chunk, bw.x_dk, bw.w_gemm
    if chunk >= C:
        # One chunk holds every class: one GEMM each over all heads, written functionally (no
        # out= views), which is also what a traced graph (the CUDA triton_op) wants.
        ds = bw.ws.view(H * C, B * N)             # the workspace is one chunk: every class
        bw.ds(0, C, ds.view(H, C, B, N))
        G = bw.mm(ds, x_dk.t()).view(H, C, D)
        w2 = w_gemm.reshape(H * C, D)
        dx = bw.mm(ds.t(), w2) if inner else bw.mm(w2.t(), ds)
        dW = bw.new_weight_grad(G)
        bw.chunk_done(G, dW, 0, C)
        dW = bw.finish(G, dW)
        return dx.to(x.dtype), dW
    G = new((H, C, D), bw.gemm, x.device)
    dW = bw.new_weight_grad(G)
    # dx accumulates over class chunks in the layout of x: (B*N, D) for channels-innermost x,
    # else (D, B*N). Where the implementation sums chunks in a wider dtype than its GEMMs (the
    # fallback's bf16 products), each chunk is added.
    several = bw.dx_dtype != bw.gemm
    dx = new((B * N, D) if inner else (D, B * N), bw.dx_dtype, x.device)
    # The Triton path sums chunks inside the GEMM (addmm_); the fallback's products (common.mm:
    # oneDNN's fp32 GEMM, no accumulating form) go through one buffer, and its transposed
    # operands through another (fresh tensors per chunk paid page faults).
    fused = bw.mm is mm_plain and not several
    part = None if fused else torch.empty(dx.shape, dtype=bw.gemm, device=x.device)
    tbuf = None if fused else torch.empty(chunk * max(D, B * N), dtype=bw.gemm, device=x.device)
    for i, c0 in enumerate(range(0, C, chunk)):
        c1 = min(C, c0 + chunk)
        rows = H * (c1 - c0)
        ds = bw.ws[: rows * B * N].view(H, c1 - c0, B, N)
        bw.ds(c0, c1, ds)
        # One GEMM each over all heads when the chunk holds every class; else one per head,
        # because a chunk of classes of every head is not a matrix of W or G (no copies).
        ds3, w3, G3 = ds.view(H, c1 - c0, B * N), w_gemm[:, c0:c1], G[:, c0:c1]
        if c1 - c0 == C:
            ds3, w3, G3 = ds3.reshape(1, rows, -1), w3.reshape(1, rows, D), G3.view(1, rows, D)
        for h in range(ds3.shape[0]):
            bw.mm(ds3[h], x_dk.t(), out=G3[h])
            a, b = (ds3[h].t(), w3[h]) if inner else (w3[h].t(), ds3[h])
            first = i == 0 and h == 0
            if fused:       # beta=0 ignores the (poisoned) buffer's contents
                dx.addmm_(a, b, beta=0.0 if first else 1.0)
            elif first and not several:
                bw.mm(a, b, out=dx, buf=tbuf)
            else:
                bw.mm(a, b, out=part, buf=tbuf)
                dx.copy_(part) if first else dx.add_(part)
        bw.chunk_done(G, dW, c0, c1)
    dW = bw.finish(G, dW)
    return dx.to(x.dtype), dW


def dx_of(dx: Tensor, x: Tensor) -> Tensor:
    """The (B, D, N) view of the backward's dx buffer for x (B, D, N) (no copy)."""
    B, D, N = x.shape
    return dx_view(dx, B, D, N, channels_inner(x))


# --------------------------------------------------------------------------- autograd

#: vmap's batched tensors: ``autograd.grad(..., is_grads_batched=True)`` hands an
#: autograd.Function's backward the legacy "Batched" kind; torch.func's is FuncTorchBatched.
_BATCHED = torch._C._dispatch_key_parse("Batched")
_FUNCTORCH_BATCHED = torch._C.DispatchKey.FuncTorchBatched
_state = functools.partial(tuple.__new__, ForwardState)     # (no Python call per backward)
_forward = functools.partial(tuple.__new__, Forward)        # (nor per eager call)


def _save(ctx, route: str, backend: str, x, weight, state, scalars: Scalars, normalize: bool,
          plan=None) -> None:
    """What every route with a backward saves for it, written once, by name: x and the weight
    as given, the forward's ``state``, and the scalars: the eager route's host values (a
    learnable lam as a saved tensor), the op routes' ``values`` tensor (saved: autograd checks
    their versions); normalize; ``route`` ("eager": the backward runs the loop itself with the
    forward's launch ``plan``; "op": csra_bwd; "triton_op": csra_bwd_cuda) and the
    implementation's name (``backend``)."""
    lam = scalars.lam
    extra = scalars.values if scalars.values is not None else (
        lam if isinstance(lam, Tensor) else None)
    ctx.save_for_backward(x, weight, *state, extra)
    ctx.temps = scalars.temps
    ctx.lam = lam if lam.__class__ is float else None
    ctx.normalize, ctx.route, ctx.backend, ctx.plan = normalize, route, backend, plan


def _setup_context(ctx, inputs, output):
    """The custom op's (csra_fwd): ``inputs`` by its schema, all passed (defaults filled in)."""
    x, weight, values, normalize, _keep, backend, _y_dtype = inputs
    _save_op(ctx, "op", backend, x, weight, output, values, normalize)


def _setup_context_cuda(ctx, inputs, output):
    """The CUDA triton_op's (csra_fwd_cuda: the Triton implementation, no backend argument)."""
    x, weight, values, normalize, _keep, _y_dtype = inputs
    _save_op(ctx, "triton_op", "triton", x, weight, output, values, normalize)


def _save_op(ctx, route, backend, x, weight, output, values, normalize):
    _, *state = output
    _save(ctx, route, backend, x, weight, state, Scalars(None, None, values), bool(normalize))
    ctx.mark_non_differentiable(*state)
    # The state outputs take no gradient: without this autograd hands the backward six
    # zero-filled tensors (six kernels per backward) for them.
    ctx.set_materialize_grads(False)


def _op_backward(n_args: int):
    """The custom op's backward (and the triton_op's): gradients for x, the weight and the
    values (slots 0-2), None for the op's other ``n_args - 3`` inputs."""
    def backward(ctx, grad_y, *_state_grads):
        return (*_grads(ctx, grad_y, ctx.needs_input_grad[:3]), *([None] * (n_args - 3)))
    return backward


def _scalars_of(ctx, extra) -> Scalars:
    """The forward's scalars, from what :func:`_save` kept."""
    if ctx.temps is None:                              # the op routes: values
        return Scalars(None, None, extra)
    return Scalars(ctx.temps, extra if extra is not None else ctx.lam)


def _grads(ctx, grad_y, need: tuple, layout: str = "bdn") -> tuple:
    """(dx, dW, d third) of every route's backward, from what :func:`_save` saved; ``need``:
    whether x, the weight and the third input (a learnable lam on the eager route, the values
    on the op routes) want one; ``layout``: how the saved x holds (B, D, N) (dx is returned in
    it). One rule: under ``create_graph=True`` through the composite (differentiable again);
    the eager route runs the loop itself; everything else, and a batch of gradients
    (``is_grads_batched``: vmap runs the op once per gradient; the loop and the kernels read
    storage, which a batched tensor has not), the backward op."""
    x, weight, *saved = ctx.saved_tensors
    extra = saved.pop()
    scalars = _scalars_of(ctx, extra)
    if grad_y is None:
        return None, None, None
    if torch.is_grad_enabled():                     # create_graph=True
        return _differentiable_backward(x, weight, scalars, extra, ctx.normalize, grad_y, need,
                                        layout)
    state = _state(saved)
    grad_x = grad_w = None
    keys = torch._C._dispatch_keys(grad_y)           # (inline: no Python call per backward)
    batched = keys.has(_BATCHED) or keys.has(_FUNCTORCH_BATCHED)
    if need[0] or need[1]:
        x3 = as_bdn(x, layout)
        if ctx.route == "eager" and not batched:
            grad_x, grad_w = backward_loop(grad_y, x3, weight, state, scalars, ctx.normalize,
                                           IMPLEMENTATIONS[ctx.backend], ctx.plan)
        else:
            grad_x, grad_w = _backward_op(ctx, grad_y, x3, weight, state, scalars)
        grad_x = dx_of(grad_x, x3)
        if need[0] and layout != "bdn":
            grad_x = from_bdn(grad_x, layout, x.shape)
    grad_third = None
    if extra is not None and len(need) > 2 and need[2]:
        grad_third = _scalar_grad(grad_y, state.att, extra, ctx.temps is None, batched)
    return grad_x if need[0] else None, grad_w if need[1] else None, grad_third


def _backward_op(ctx, grad_y, x, weight, state, scalars):
    """(dx, dW) from the backward op of the route's kind: csra_bwd_cuda for the triton_op
    (and for the eager route on CUDA tensors on a triton_op implementation), else csra_bwd.
    The eager route's state holds None for what it did not keep (its packed forward)."""
    m, l, att, argmax, inv_n, kept, scores = state
    kept = x.new_empty((0,)) if kept is None else kept
    scores = att.new_empty((0,)) if scores is None else scores
    values = op_values(scalars, x.device, False).detach()
    if x.is_cuda and IMPLEMENTATIONS[ctx.backend].triton_op:
        return torch.ops.csra_triton.csra_bwd_cuda(grad_y, x, weight, m, l, att, argmax, inv_n,
                                                   kept, scores, values, ctx.normalize)
    return torch.ops.csra_triton.csra_bwd(grad_y, x, weight, m, l, att, argmax, inv_n, kept,
                                          scores, values, ctx.normalize, ctx.backend)


def lam_grad(grad_y: Tensor, att: Tensor, batched: bool = False) -> Tensor:
    """d loss / d lam = sum_b,c g[b, c] * sum_k att[b, k, c] (att: the forward's attention
    logits, in score units, every head's), a 0-d tensor in att's dtype. ``batched``: grad_y
    is vmap's batched tensor (``is_grads_batched``), which einsum has no batching rule for."""
    g = grad_y.to(att.dtype)
    return (g.unsqueeze(1) * att).sum() if batched else torch.einsum("bc,bhc->", g, att)


def _scalar_grad(grad_y, att, target: Tensor, values: bool, batched: bool) -> Tensor:
    """The gradient for the third input: a learnable lam's (``target`` the lam, in its dtype
    and shape), or the ops' ``values``' (lam's slot; zeros for the temperatures)."""
    s = lam_grad(grad_y, att, batched)
    if not values:
        return s.to(target.dtype).reshape(target.shape)
    s = s.to(target.dtype).reshape(1)
    return torch.cat((s.new_zeros(target.shape[0] - 1), s))


def _differentiable_backward(x, weight, scalars: Scalars, extra, normalize, grad_y, need,
                             layout="bdn"):
    """The backward when its own graph is recorded (``create_graph=True``: a gradient
    penalty, Hessian-vector products): the first derivatives through ``graph.composite``, so
    that autograd differentiates them again exactly (double backward on both backends).
    ``need``: whether x (in ``layout``), the weight and ``extra`` (a learnable lam, or the
    ops' values) want a gradient; returns the three."""
    third = extra if extra is not None else None
    slots = [(i, t) for i, t in enumerate((x, weight, third)) if t is not None and
             i < len(need) and need[i]]
    grads = [None, None, None]
    if not slots:
        return tuple(grads)
    with torch.enable_grad():
        if scalars.temps is None:                 # the op routes: the values, read here
            temps = tuple(scalars.values.detach().tolist()[:-1])
            lam = extra[-1]                       # (differentiable: the values' lam slot)
        else:
            temps, lam = scalars.temps, scalars.lam
        y = graph.composite(as_bdn(x, layout), weight, temps, lam, normalize)
        got = torch.autograd.grad(y, [t for _, t in slots], grad_y, create_graph=True,
                                  allow_unused=True)
    for (i, t), g in zip(slots, got):
        grads[i] = torch.zeros_like(t) if g is None else g
    return tuple(grads)


# slots: csra_fwd (x, weight, values, normalize, keep, backend, y_dtype), csra_fwd_cuda (x,
# weight, values, normalize, keep, y_dtype)
csra_fwd.register_autograd(_op_backward(7), setup_context=_setup_context)
csra_fwd_cuda.register_autograd(_op_backward(6), setup_context=_setup_context_cuda)


# --------------------------------------------------------------------------- the eager route
# In eager mode (nothing tracing) a call reaches the implementation through a plain
# autograd.Function (training) or directly (inference), skipping torch.library's dispatch
# layers; torch.compile, export, ONNX, AOTI, tensor subclasses and dispatch modes take the ops
# above. Both run the implementation's forward and backward_loop: the same launches, the same
# results.

#: ``CSRA_TRITON_EAGER=0`` sends eager calls through the custom ops too.
EAGER = ENV.eager
_PLAIN = (Tensor, torch.nn.Parameter)


class _EagerCSRA(torch.autograd.Function):
    """The training forward in eager mode: y, with the state saved for the backward (views of
    one allocation: the implementation's ``packed`` forward). ``spec``: (scalars, normalize,
    backend, layout, y_dtype) as one argument (``apply`` costs per argument); x comes in the
    caller's ``layout`` and is viewed as (B, D, N) here, dx returned in that layout."""

    @staticmethod
    def forward(ctx, x, weight, lam_t, spec):
        scalars, normalize, backend, layout, y_dtype = spec
        f = IMPLEMENTATIONS[backend].forward(as_bdn(x, layout), weight, scalars, normalize,
                                             True, y_dtype, True)
        _save(ctx, "eager", backend, x, weight, f.state, scalars, normalize, f.plan)
        ctx.layout = layout
        return f.y

    @staticmethod
    def backward(ctx, grad_y):
        return (*_grads(ctx, grad_y, ctx.needs_input_grad[:3], ctx.layout), None)


_eager_training = _EagerCSRA.apply
_fwad = torch.autograd.forward_ad


def _dual(*ts) -> bool:
    """Whether any of ``ts`` carries a forward-mode tangent (a ``forward_ad`` dual tensor)."""
    return any(isinstance(t, Tensor) and _fwad.unpack_dual(t).tangent is not None for t in ts)


def run(x: Tensor, weight: Tensor, scalars: Scalars, normalize: bool, layout: str = "bdn",
        compiling: bool | None = None, need_state: bool = False) -> Forward:
    """One call of the head on the route chosen here (the module docstring's table): the one
    place that chooses it, for every public entry. x: validated, in ``layout`` (viewed as
    (B, D, N): ``common.as_bdn``); scalars: validated; ``compiling``: whether torch.compile is
    tracing, where the caller knows (None: asked); ``need_state``: the caller reads the
    forward's state (the attention maps: no gradient, not the composite). Returns a
    :class:`~csra_triton.interface.Forward` (``state`` None where autograd keeps it)."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    lam = scalars.lam
    y_dtype = None
    if normalize and not x.is_meta and torch.is_autocast_enabled(x.device.type):
        y_dtype = autocast_logits_dtype(x, weight)
    # (torch._C._is_tracing: torch.jit.is_tracing without its Python frames, reached only when
    # nothing compiles; ONNX's own check runs only while something traces)
    onnx = (compiling or torch._C._is_tracing()) and torch.onnx.is_in_onnx_export()
    composite = onnx or not (need_state or compiling) and (
        torch._C._functorch.peek_interpreter_stack() is not None
        or _fwad._current_level >= 0 and _dual(x, weight, lam))
    if not composite:
        return _implementation_route(x, weight, scalars, normalize, layout, compiling,
                                     need_state, y_dtype)
    # the composite route: one graph of standard operators
    temps, lam = host_values(scalars)
    if onnx:
        return Forward(graph.onnx_graph(x, layout, weight, temps, lam, normalize, y_dtype), None)
    return Forward(graph.composite(as_bdn(x, layout), weight, temps, lam, normalize, y_dtype),
                   None)


def _implementation_route(x, weight, scalars, normalize, layout, compiling, need_state,
                          y_dtype) -> Forward:
    """:func:`run`'s eager and op routes (an implementation's forward)."""
    lam = scalars.lam
    # keep=False when no gradient will be asked for (inference): the op then keeps nothing
    # for a backward (inv_norm, the prepared weight and the scores are not returned)
    keep = not need_state and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or isinstance(lam, Tensor) and lam.requires_grad)
    backend = backend_for(x.device, x.dtype)
    # the eager route takes plain tensors, with nothing tracing or compiling and no dispatch
    # mode (profilers' modes, fake tensors, FlopCounter see the ops; a TorchScript trace
    # records the op); everything else the op route
    if not (EAGER and not compiling and scalars.values is None and type(x) is Tensor
            and type(weight) in _PLAIN and (lam.__class__ is float or type(lam) in _PLAIN)
            and not x.is_meta and not torch._C._is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0):
        return _fwd_op(as_bdn(x, layout), weight, op_values(scalars, x.device, compiling),
                       normalize, keep, backend, y_dtype)
    if not keep:
        return IMPLEMENTATIONS[backend].forward(as_bdn(x, layout), weight, scalars,
                                                normalize, False, y_dtype, True)
    y = _eager_training(x, weight, lam if isinstance(lam, Tensor) else None,
                        (scalars, normalize, backend, layout, y_dtype))
    return _forward((y, None, None))


def autocast_logits_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """Under autocast the official head's logits are its conv output (the autocast dtype, x's
    here) divided by ``torch.norm`` of its weight, and that division promotes: the norm is
    fp32 on CUDA (autocast computes ``linalg_vector_norm`` in fp32 for fp16, bf16 and fp32
    weights; fp64 stays fp64) and in the weight's own dtype on the CPU. That dtype if it is not
    x's (the kernels then round their fp32 sums to it once), else None."""
    norm = weight.dtype
    if x.device.type == "cuda" and norm != torch.float64:
        norm = torch.float32
    out = torch.promote_types(x.dtype, norm)
    return None if out == x.dtype else out
