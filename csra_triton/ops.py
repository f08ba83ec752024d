"""Custom ops and autograd (the op layer, docs/ARCHITECTURE.md).

Two ops in the ``csra_triton`` namespace, both with fake (meta) implementations so that
``torch.compile(fullgraph=True)`` and ``torch.export`` trace through them:

* ``csra_triton::csra_fwd(x, weight, temperatures, lam, normalize, keep=True, backend="auto",
  lam_t=None, y_dtype=None, scalars=None)`` -> ``(y, m, l, att, argmax, inv_norm, kept,
  scores)``; x is (B, D, N) with any strides, weight (H, C, D). y (B, C) has x's dtype (or
  ``y_dtype``: the official head's under autocast); m, l, att, argmax are the O(B*H*C) state
  that the backward needs (see kernels.py: softmax max and sum in base 2, attention logit,
  argmax); inv_norm (H, C) the inverse row norms. ``kept``: the prepared weight (H*C, D) in
  x's dtype, which the Triton path hands its backward when it is small
  (``triton_impl.keeps_weight``), else empty (0,) (always on the fallback). ``scores``: the
  score products before the row norms, kept for the backward, in the implementation's layout:
  the Triton path's (H, C, B, N) in the accumulation dtype when they have no more elements
  than x (``triton_impl.keeps_scores``; dS' is then elementwise), the CPU fallback's (H*C,
  B*N) in its GEMM dtype (``fallback.keeps_scores``; one GEMM fewer), else empty (0,).
  ``keep=False`` (inference: the module passes it when no gradient is needed)
  keeps nothing: inv_norm, kept and scores are empty. ``lam_t``: a learnable lam (a
  one-element tensor, used instead of ``lam``); ``scalars``: the temperatures and lam as a
  tensor (:func:`scalars_tensor`, a compiled module's), used instead of both.
* ``csra_triton::csra_bwd(grad_y, x, weight, m, l, att, argmax, inv_norm, kept, scores,
  temperatures, lam, normalize, backend="auto", lam_t=None, scalars=None)`` ->
  ``(grad_x, grad_weight)``.

``backend`` names the implementation ("triton", "torch"; "auto": :func:`backend_for`). The
module resolves it when it calls (or traces) the op, so that the shapes of the outputs, which
depend on the implementation (``kept``), are a function of the arguments: a compiled graph
(and Inductor's FX-graph cache) never pairs one implementation's fake outputs with the other's.

``csra_fwd`` carries ``register_autograd`` (no zero gradients are materialised for its state
outputs); :class:`CSRAFunction` is a thin ``autograd.Function`` over the same two ops.

Dispatch, once per call: CUDA tensors run the Triton implementation (``triton_impl``). CPU
tensors run the same kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
triton was imported, and otherwise the PyTorch fallback (``fallback``). :func:`use_backend`
overrides this choice. Both implementations offer ``forward`` and ``Backward``; the backward's
loop over class chunks and its GEMMs are here, once:

dS' is materialised in chunks of classes, (H, chunk, B, N) elements, then two GEMMs per chunk:
``dx += W_chunk^T dS'`` and ``G_chunk = dS' x^T``; finally ``dW = G - W * rowsum(W * G) *
inv_norm^2`` (the gradient through the row normalisation).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
import warnings
from typing import Iterator

import torch
from torch import Tensor

from . import archs, fallback, triton_impl
from .common import (acc_dtype, as_bdn, channels_inner, check_lam, check_temperatures, dx_view,
                     empty, from_bdn, fwd_outputs, mm_plain, new)
from .settings import ENV

_BACKENDS = ("auto", "triton", "torch")
#: The backend ``use_backend`` forces, per thread: a new thread starts at "auto", and one
#: thread's block never changes another's calls. A ``threading.local`` rather than a
#: ``contextvars.ContextVar``: torch.compile traces (and guards on) a thread-local's attribute,
#: while ``ContextVar.get`` breaks a fullgraph trace.
_forced = threading.local()


def _forced_backend() -> str:
    return getattr(_forced, "name", "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``"triton"`` or ``"torch"`` (the fallback) inside the block, for the calls this
    thread makes; ``"auto"`` restores the automatic choice. Blocks nest."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    old = _forced_backend()
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = old


def backend_for(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Which implementation runs for tensors on ``device``: 'triton' or 'torch'. bf16 on a GPU
    without bf16 tensor cores (Turing, sm_75: Triton cannot multiply bf16 there) runs the
    PyTorch fallback on the GPU, with a warning once."""
    forced = getattr(_forced, "name", "auto")          # (_forced_backend, inline)
    if forced != "auto":
        return forced
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not triton_impl.INTERPRET and torch.cuda.is_available():
            arch = archs.device_arch(device)
            if not archs.bf16_supported(arch):
                _warn_bf16(device, arch)
                return "torch"
        return "triton"
    return "triton" if triton_impl.INTERPRET else "torch"


@functools.cache
def _warn_bf16(device, arch):
    warnings.warn(f"csra_triton: {archs.device_name(device)} ({arch}) has no bf16 tensor cores "
                  f"and Triton cannot multiply bf16 there; bf16 inputs run the PyTorch fallback "
                  f"on the GPU (cuBLAS). fp16 (autocast dtype=torch.float16) or fp32 run the "
                  f"Triton kernels.", stacklevel=4)


def implementation(x: Tensor, backend: str = "auto"):
    """The module implementing this call: ``triton_impl`` or ``fallback``. ``backend`` is the
    ops' argument: "triton", "torch", or "auto" (:func:`backend_for` decides)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    name = backend_for(x.device, x.dtype) if backend == "auto" else backend
    return triton_impl if name == "triton" else fallback


#: How the ops' schema carries a max head: temperature 0.0 (users' temperatures are > 0).
#: Exported programs serialise float lists as JSON numbers, and an inf there made
#: torch._inductor.aoti_load_package fail ("type must be number, but is string"). Everywhere
#: else in the package a max head is inf (``common.check_temperatures``); the two functions
#: below are the only crossing: where an op is called, and in the ops' bodies and contexts.
SCHEMA_MAX_HEAD = 0.0


def _to_schema(temps) -> list[float]:
    return [SCHEMA_MAX_HEAD if t == math.inf else t for t in temps]


def _from_schema(temps) -> list[float]:
    """(inf is taken as well: a direct call of an op may pass either.)"""
    return [math.inf if (t <= SCHEMA_MAX_HEAD or t == math.inf) else float(t) for t in temps]


# The kernels read x, the weight and grad_y through their strides: Inductor need not copy
# inputs into the layout it saw while tracing (it did, with an unbacked batch and a conv trunk).
_TAGS = (torch.Tag.flexible_layout,)


def _kept_like(x: Tensor, weight: Tensor, keep: bool, backend: str, alloc) -> Tensor:
    """The forward's ``kept`` output (the prepared weight) as the implementation returns it."""
    if implementation(x, backend) is fallback:
        return alloc((0,), x.dtype, x.device)
    H, C, D = weight.shape
    if keep and triton_impl.keeps_weight(x, weight):
        return alloc((H * C, D), x.dtype, x.device)
    return alloc((0,), x.dtype, x.device)


def _scores_like(x: Tensor, weight: Tensor, keep: bool, backend: str, alloc) -> Tensor:
    """The forward's ``scores`` output as the implementation returns it."""
    return implementation(x, backend).scores_output(x, weight, keep, alloc)


@torch.library.custom_op("csra_triton::csra_fwd", mutates_args=(), tags=_TAGS)
def csra_fwd(x: Tensor, weight: Tensor, temperatures: list[float], lam: float,
             normalize: bool, keep: bool = True, backend: str = "auto",
             lam_t: Tensor | None = None, y_dtype: torch.dtype | None = None,
             scalars: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, weight, _from_schema(temperatures), lam, normalize, keep,
                         backend, lam_t, y_dtype=y_dtype, scalars=scalars)


def scalars_tensor(temps, lam: float, device="cpu") -> Tensor:
    """The temperatures (inf = max head) and lam as one (H + 1,) int64
    tensor holding their float64 bits: what a compiled module passes the ops (``scalars``)
    instead of Python floats, so that new values reach a compiled graph without a recompile.
    int64, so that ``module.to(dtype)`` leaves the values exact."""
    vals = [float(t) for t in temps] + [float(lam)]
    return torch.tensor(vals, dtype=torch.float64, device=device).view(torch.int64)


def _host_scalars(x: Tensor, scalars: Tensor, temps, lam):
    """(temps, lam, scalars) for an implementation: read from ``scalars`` on the host (a CPU
    custom op reads them for free), except while tracing (the CUDA triton_op under
    torch.compile), where the tensor stays and the kernels' parameters are made from it on
    the device (``triton_impl.with_lam``)."""
    if triton_impl.tracing(x):
        return temps, lam, scalars
    vals = scalars.view(torch.float64).tolist()
    return vals[:-1], vals[-1], None


def _forward_impl(x, weight, temps, lam, normalize, keep, backend, lam_t, packed=False,
                  y_dtype=None, scalars=None):
    """What every forward path computes (the custom op, the triton_op, the eager path):
    ``temps`` validated (inf = max head); ``packed``: the eager path's allocation (see
    ``triton_impl.forward``), and a 9th element: the Triton launch plan the backward reuses
    (None on the fallback), so that a forward+backward looks its problem up once;
    ``y_dtype``: y's dtype where it is not x's (the official head's under autocast);
    ``scalars``: the temperatures and lam as a tensor (:func:`scalars_tensor`), which then
    replace ``temps`` and ``lam``."""
    impl = implementation(x, backend)
    if scalars is not None:
        temps, lam, scalars = _host_scalars(x, scalars, temps, lam)
    if impl is triton_impl:
        return triton_impl.forward(x, weight, temps, lam, normalize, keep, lam_t, y_dtype,
                                   packed, scalars)
    out = fallback.forward(x, weight, temps, lam, normalize, keep, lam_t, y_dtype)
    return (*out, None) if packed else out


@csra_fwd.register_fake
def _(x, weight, temperatures, lam, normalize, keep=True, backend="auto", lam_t=None,
      y_dtype=None, scalars=None):
    H, C, _ = weight.shape
    outs = fwd_outputs(x, H, C, empty, keep, y_dtype)
    return (*outs, _kept_like(x, weight, keep, backend, empty),
            _scores_like(x, weight, keep, backend, empty))


@torch.library.custom_op("csra_triton::csra_bwd", mutates_args=(), tags=_TAGS)
def csra_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, m: Tensor, l: Tensor, att: Tensor,
             amax: Tensor, inv_n: Tensor, kept: Tensor, scores: Tensor,
             temperatures: list[float], lam: float, normalize: bool, backend: str = "auto",
             lam_t: Tensor | None = None, scalars: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
    return _backward_loop(grad_y, x, weight, m, l, att, amax, inv_n, kept, scores,
                          _from_schema(temperatures), lam, normalize, backend, lam_t,
                          scalars=scalars)


def _backward_loop(grad_y, x, weight, m, l, att, amax, inv_n, kept, scores, temperatures, lam,
                   normalize, backend, lam_t=None, plan=None, scalars=None):
    B, D, N = x.shape
    H, C, _ = weight.shape
    inner = channels_inner(x)
    if B == 0 or C == 0:        # nothing to launch: zero gradients (an empty one for C == 0)
        dx = x.new_zeros((B * N, D) if inner else (D, B * N))
        return dx_view(dx, B, D, N, inner), torch.zeros_like(weight)
    kw = {}
    if scalars is not None:
        temperatures, lam, scalars = _host_scalars(x, scalars, temperatures, lam)
        kw = {} if scalars is None else {"scalars": scalars}      # (traced: the Triton side)
    bw = implementation(x, backend).Backward(grad_y, x, weight, (m, l, att, amax), inv_n, kept,
                                             temperatures, lam, normalize,
                                             scores, lam_t, plan, **kw)
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
        return dx_view(dx.to(x.dtype), B, D, N, inner), dW
    G = new((H, C, D), bw.gemm, x.device)
    dW = bw.new_weight_grad(G)
    # dx accumulates over class chunks in the layout of x: (B*N, D) for channels-innermost x,
    # else (D, B*N); both are returned as (B, D, N) views. Where the implementation sums chunks
    # in a wider dtype than its GEMMs (the fallback's bf16 products), each chunk is added.
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
    return dx_view(dx.to(x.dtype), B, D, N, inner), dW


@csra_bwd.register_fake
def _(grad_y, x, weight, m, l, att, amax, inv_n, kept, scores, temperatures, lam, normalize,
      backend="auto", lam_t=None, scalars=None):
    B, D, N = x.shape
    inner = channels_inner(x)
    dx = x.new_empty((B * N, D) if inner else (D, B * N))
    return dx_view(dx, B, D, N, inner), torch.empty_like(weight)


# --------------------------------------------------------------------------- CUDA: triton_op
# The same two ops for CUDA tensors as ``torch.library.triton_op``s: in eager they run exactly
# as the custom ops above; under ``torch.compile`` / ``torch.export`` their bodies are traced and
# every kernel launch is recorded through ``wrap_triton`` (triton_impl._jit_launch), so that
# Inductor's generated code (and an AOTInductor package) launches the kernels itself, without a
# Python custom-op call, and CUDA graphs (``mode="reduce-overhead"``) capture them. CPU tensors
# never reach them: a traced ``wrap_triton`` needs a GPU driver ("0 active drivers").


@torch.library.triton_op("csra_triton::csra_fwd_cuda", mutates_args=())
def csra_fwd_cuda(x: Tensor, weight: Tensor, temperatures: list[float], lam: float,
                  normalize: bool, keep: bool = True, lam_t: Tensor | None = None,
                  y_dtype: torch.dtype | None = None, scalars: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, weight, _from_schema(temperatures), lam, normalize, keep,
                         "triton", lam_t, y_dtype=y_dtype, scalars=scalars)


@torch.library.triton_op("csra_triton::csra_bwd_cuda", mutates_args=())
def csra_bwd_cuda(grad_y: Tensor, x: Tensor, weight: Tensor, m: Tensor, l: Tensor, att: Tensor,
                  amax: Tensor, inv_n: Tensor, kept: Tensor, scores: Tensor,
                  temperatures: list[float], lam: float, normalize: bool,
                  lam_t: Tensor | None = None, scalars: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    return _backward_loop(grad_y, x, weight, m, l, att, amax, inv_n, kept, scores,
                          _from_schema(temperatures), lam, normalize, "triton", lam_t,
                          scalars=scalars)


def use_cuda_ops(x: Tensor, backend: str) -> bool:
    """CUDA tensors on the Triton implementation take the triton_ops."""
    return x.is_cuda and implementation(x, backend) is triton_impl


def run(x: Tensor, weight: Tensor, temps, lam, normalize: bool, layout: str = "bdn",
        scalars: Tensor | None = None, compiling: bool | None = None) -> Tensor:
    """y (B, C) of one call of the head, on the route chosen here: the one place that chooses
    it, the first that applies (docs/ARCHITECTURE.md, "The routes of a call"):

    ===============  ==========================================  ===========================
    route            when                                        forward / backward
    ===============  ==========================================  ===========================
    onnx             an ONNX export traces                       ``fallback.forward_graph``
    composite        a torch.func transform is active            :func:`composite`'s graph
    eager inference  :func:`_eager`, no gradient will be asked   the implementation's forward
    eager training   :func:`_eager`, a gradient will be asked    :class:`_EagerCSRA`
    triton_op        CUDA tensors on the Triton implementation   ``csra_fwd_cuda`` / ``_bwd_cuda``
    op               anything else (compile, export, modes, ...) ``csra_fwd`` / ``csra_bwd``
    ===============  ==========================================  ===========================

    The last four are :func:`forward`'s. x: validated, in ``layout`` (viewed as (B, D, N):
    ``common.as_bdn``); temps: validated (inf = max head); lam: a number or a learnable
    one-element tensor; scalars: a compiled module's temperatures and lam as a tensor
    (:func:`scalars_tensor`), which replace ``temps`` and ``lam``; compiling: whether
    torch.compile is tracing, where the caller knows (None: asked)."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    y_dtype = None
    if normalize and torch.is_autocast_enabled(x.device.type):
        y_dtype = autocast_logits_dtype(x, weight)
    # (torch._C._is_tracing: torch.jit.is_tracing without its Python frames, reached only when
    # nothing compiles; ONNX's own check runs only while something traces)
    onnx = (compiling or torch._C._is_tracing()) and torch.onnx.is_in_onnx_export()
    if not (onnx or functorch_active(compiling)):
        # keep=False when no gradient will be asked for (inference): the op then keeps nothing
        # for a backward (inv_norm, the prepared weight and the scores are not returned)
        keep = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
            isinstance(lam, Tensor) and lam.requires_grad))
        return forward(x, weight, temps, lam, normalize, keep, layout=layout, y_dtype=y_dtype,
                       scalars=scalars, compiling=compiling)[0]
    # the onnx and composite routes: one graph of standard operators
    return fallback.forward_graph(as_bdn(x, layout), weight, temps, lam, normalize,
                                  first_max=not onnx, y_dtype=y_dtype)


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


def forward(x: Tensor, weight: Tensor, temps: list[float], lam, normalize: bool,
            keep: bool, backend: str = "auto", eager: bool = True, layout: str = "bdn",
            y_dtype: torch.dtype | None = None, scalars: Tensor | None = None,
            compiling: bool | None = None) -> tuple:
    """Every output of the forward, on the eager or op routes of :func:`run` (resolved once,
    when the module calls or traces it). ``temps``: validated (inf = max head). ``lam`` is a
    Python number, or a one-element tensor (a learnable lam: it reaches the op as ``lam_t``,
    and its gradient is sum_b,c g * sum_k att from the forward's state).
    In eager mode (:func:`_eager`) inference returns the implementation's outputs directly and
    a training call returns ``(y,)`` from :class:`_EagerCSRA`; ``eager=False`` always calls
    the ops (every output). ``layout``: how x holds (B, D, N) (:func:`common.as_bdn`); the
    eager training call takes x as it is and views it inside, so that autograd records no
    view node (~17 µs of a forward+backward on the CPU proxy). ``y_dtype``: y's dtype where
    it is not x's (None: x's). ``scalars`` (:func:`scalars_tensor`): the temperatures and lam
    as a tensor, which replace ``temps`` and ``lam`` (a compiled module's: always the ops).
    ``compiling``: whether torch.compile is tracing, where the caller knows (None: asked)."""
    backend = backend_for(x.device, x.dtype) if backend == "auto" else backend
    lam, lam_t = (0.0, lam) if isinstance(lam, Tensor) else (lam, None)
    if eager and EAGER and scalars is None and _eager(x, weight, lam_t, compiling):
        if not keep:              # inference: nothing for autograd to record
            return _forward_impl(as_bdn(x, layout), weight, temps, lam, normalize, False,
                                 backend, lam_t, True, y_dtype)
        return (_eager_training(x, weight, lam_t,
                                (temps, lam, normalize, backend, layout, y_dtype)),)
    x = as_bdn(x, layout)
    if x.is_cuda and backend == "triton":      # the triton_op route (use_cuda_ops, inline)
        return torch.ops.csra_triton.csra_fwd_cuda(x, weight, _to_schema(temps), lam,
                                                   normalize, keep, lam_t, y_dtype, scalars)
    return torch.ops.csra_triton.csra_fwd(x, weight, _to_schema(temps), lam, normalize, keep,
                                          backend, lam_t, y_dtype, scalars)


def _save(ctx, route: str, backend: str, x, weight, state, lam_t, scalars, temps, lam,
          normalize, plan=None) -> None:
    """What every route with a backward saves for it, written once, by name: x and the weight
    as given, the forward's ``state`` (``interface.ForwardState``), a learnable ``lam_t`` and a
    compiled module's ``scalars`` where there are (saved tensors, so that autograd checks
    their versions); the temperatures (inf = max head), lam and normalize; ``route`` ("eager":
    the backward runs the loop itself with the forward's launch ``plan``; "op": csra_bwd;
    "triton_op": csra_bwd_cuda) and the implementation's name (``backend``)."""
    ctx.has_lam_t = lam_t is not None
    ctx.has_scalars = scalars is not None
    ctx.save_for_backward(x, weight, *state, *((lam_t,) if ctx.has_lam_t else ()),
                          *((scalars,) if ctx.has_scalars else ()))
    ctx.temperatures, ctx.lam, ctx.normalize = temps, lam, normalize
    ctx.route, ctx.backend, ctx.plan = route, backend, plan


def _setup_context(ctx, inputs, output):
    """The custom op's (csra_fwd): ``inputs`` by its schema, all passed (defaults filled in)."""
    x, weight, temperatures, lam, normalize, _keep, backend, lam_t, _y_dtype, scalars = inputs
    _save_op_outputs(ctx, "op", backend, x, weight, output, lam_t, scalars, temperatures, lam,
                     normalize)


def _setup_context_cuda(ctx, inputs, output):
    """The CUDA triton_op's (csra_fwd_cuda: the Triton implementation, no backend argument)."""
    x, weight, temperatures, lam, normalize, _keep, lam_t, _y_dtype, scalars = inputs
    _save_op_outputs(ctx, "triton_op", "triton", x, weight, output, lam_t, scalars,
                     temperatures, lam, normalize)


def _save_op_outputs(ctx, route, backend, x, weight, output, lam_t, scalars, temperatures, lam,
                     normalize):
    _, *state = output
    _save(ctx, route, backend, x, weight, state, lam_t, scalars, _from_schema(temperatures),
          float(lam), bool(normalize))
    ctx.mark_non_differentiable(*state)
    # The state outputs take no gradient: without this autograd hands the backward six
    # zero-filled tensors (six kernels per backward) for them.
    ctx.set_materialize_grads(False)


def functorch_active(compiling: bool | None = None) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active in this thread. The
    ops have no batching or functional-grad rules: under a transform the head runs its
    composite (:func:`composite`), which every transform differentiates and batches.
    ``compiling``: whether torch.compile is tracing, where the caller knows (None: asked)."""
    if torch.compiler.is_compiling() if compiling is None else compiling:
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def composite(x: Tensor, weight: Tensor, temps: list[float], lam, normalize: bool,
              y_dtype: torch.dtype | None = None) -> Tensor:
    """y through standard operators with autograd at every step (``fallback.forward_graph``,
    first-maximum routing as the op's): what torch.func transforms and double backward
    differentiate. Same values as the op to rounding; it holds the (B, H, C, N) scores."""
    return fallback.forward_graph(x, weight, temps, lam, normalize, first_max=True,
                                  y_dtype=y_dtype)


def _differentiable_backward(ctx, x, weight, lam_t, grad_y, need, layout="bdn", scalars=None):
    """The backward when its own graph is recorded (``create_graph=True``: a gradient
    penalty, Hessian-vector products): the first derivatives through :func:`composite`, so
    that autograd differentiates them again exactly (double backward on both backends).
    ``need``: whether x (in ``layout``), the weight and lam_t want a gradient; returns (dx,
    dW, dlam)."""
    slots = [(i, t) for i, t in enumerate((x, weight, lam_t)) if t is not None and need[i]]
    grads = [None, None, None]
    if not slots:
        return tuple(grads)
    temps, lam = ctx.temperatures, ctx.lam
    if scalars is not None:           # a compiled module's: the values, read on the host
        vals = scalars.view(torch.float64).tolist()
        temps, lam = vals[:-1], vals[-1]
    with torch.enable_grad():
        y = composite(as_bdn(x, layout), weight, temps, lam_t if lam_t is not None else lam,
                      ctx.normalize)
        got = torch.autograd.grad(y, [t for _, t in slots], grad_y, create_graph=True,
                                  allow_unused=True)
    for (i, t), g in zip(slots, got):
        grads[i] = torch.zeros_like(t) if g is None else g
    return tuple(grads)


def lam_grad(grad_y: Tensor, att: Tensor, lam_t: Tensor, batched: bool = False) -> Tensor:
    """d loss / d lam = sum_b,c g[b, c] * sum_k att[b, k, c] (att: the forward's attention
    logits, in score units, every head's), in lam_t's dtype and shape. ``batched``: grad_y is
    vmap's batched tensor (``is_grads_batched``), which einsum has no batching rule for."""
    g = grad_y.to(att.dtype)
    s = (g.unsqueeze(1) * att).sum() if batched else torch.einsum("bc,bhc->", g, att)
    return s.to(lam_t.dtype).reshape(lam_t.shape)


def _op_backward(lam_slot: int, n_args: int):
    """The custom op's backward (and the triton_op's): gradients for x (slot 0), the weight
    (slot 1) and lam_t (``lam_slot``), None for the op's other ``n_args - 3`` inputs."""
    def backward(ctx, grad_y, *_state_grads):
        need = ctx.needs_input_grad      # shorter where trailing defaults were not passed
        need_lam = len(need) > lam_slot and need[lam_slot]
        gx, gw, glam = _grads(ctx, grad_y, (need[0], need[1], need_lam))
        grads = [None] * n_args
        grads[0], grads[1], grads[lam_slot] = gx, gw, glam
        return tuple(grads)
    return backward


def _backward_op(ctx, grad_y, x, weight, state, lam_t, scalars):
    """(dx, dW) from the backward op of the route's kind: csra_bwd_cuda for the triton_op
    (and for the eager route on CUDA tensors on the Triton side), else csra_bwd. The eager
    route's state holds None for what it did not keep (its packed forward)."""
    m, l, att, amax, inv_n, kept, scores = state
    if kept is None or scores is None:
        kept = x.new_empty((0,)) if kept is None else kept
        scores = att.new_empty((0,)) if scores is None else scores
    temps = _to_schema(ctx.temperatures)
    if ctx.route == "triton_op" or (ctx.route == "eager" and use_cuda_ops(x, ctx.backend)):
        return torch.ops.csra_triton.csra_bwd_cuda(grad_y, x, weight, m, l, att, amax, inv_n,
                                                   kept, scores, temps, ctx.lam, ctx.normalize,
                                                   lam_t, scalars)
    return torch.ops.csra_triton.csra_bwd(grad_y, x, weight, m, l, att, amax, inv_n, kept,
                                          scores, temps, ctx.lam, ctx.normalize, ctx.backend,
                                          lam_t, scalars)


#: vmap's batched tensors: ``autograd.grad(..., is_grads_batched=True)`` hands an
#: autograd.Function's backward the legacy "Batched" kind; torch.func's is FuncTorchBatched.
_BATCHED = torch._C._dispatch_key_parse("Batched")
_FUNCTORCH_BATCHED = torch._C.DispatchKey.FuncTorchBatched


def _grads(ctx, grad_y, need: tuple, layout: str = "bdn") -> tuple:
    """(dx, dW, dlam) of every route's backward, from what :func:`_save` saved; ``need``:
    whether x, the weight and lam_t want one (None where not); ``layout``: how the saved x
    holds (B, D, N) (dx is returned in it). One rule: under ``create_graph=True`` through the
    composite (differentiable again); the eager route runs the loop itself; everything else,
    and a batch of gradients (``is_grads_batched``: vmap runs the op once per gradient; the
    loop and the kernels read storage, which a batched tensor has not), the backward op."""
    x, weight, *state = ctx.saved_tensors
    scalars = state.pop() if ctx.has_scalars else None
    lam_t = state.pop() if ctx.has_lam_t else None
    if grad_y is None:
        return None, None, None
    if torch.is_grad_enabled():                     # create_graph=True
        return _differentiable_backward(ctx, x, weight, lam_t, grad_y, need, layout, scalars)
    grad_x = grad_w = None
    keys = torch._C._dispatch_keys(grad_y)           # (inline: no Python call per backward)
    batched = keys.has(_BATCHED) or keys.has(_FUNCTORCH_BATCHED)
    if need[0] or need[1]:
        if ctx.route == "eager" and not batched:
            grad_x, grad_w = _backward_loop(grad_y, as_bdn(x, layout), weight, *state,
                                            ctx.temperatures, ctx.lam, ctx.normalize,
                                            ctx.backend, lam_t, ctx.plan)
        else:
            grad_x, grad_w = _backward_op(ctx, grad_y, as_bdn(x, layout), weight, state, lam_t,
                                          scalars)
        if need[0] and layout != "bdn":
            grad_x = from_bdn(grad_x, layout, x.shape)
    grad_lam = (lam_grad(grad_y, state[2], lam_t, batched) if lam_t is not None and need[2]
                else None)
    return grad_x if need[0] else None, grad_w if need[1] else None, grad_lam


# --------------------------------------------------------------------------- the eager path
# In eager mode (nothing tracing) a call reaches the implementation through a plain
# autograd.Function (training) or directly (inference), skipping torch.library's dispatch
# layers; torch.compile, export, ONNX, AOTI, tensor subclasses and dispatch modes take the ops
# above. Both run _forward_impl and _backward_loop: the same launches, the same results.

#: ``CSRA_TRITON_EAGER=0`` sends eager calls through the custom ops too.
EAGER = ENV.eager


def _eager(x: Tensor, weight: Tensor, lam_t, compiling: bool | None = None) -> bool:
    """Whether this call may take the eager path: plain tensors, nothing tracing, no
    dispatch mode (profilers' modes, fake tensors, FlopCounter see the ops). ``compiling``:
    whether torch.compile is tracing, where the caller knows (None: asked). (The C-level
    checks are torch.jit.is_tracing's and _get_current_dispatch_mode's, without their Python
    frames; the first is reached only when nothing compiles.)"""
    return (type(x) is Tensor and type(weight) in _PLAIN
            and (lam_t is None or type(lam_t) in _PLAIN)
            and not (torch.compiler.is_compiling() if compiling is None else compiling)
            and not torch._C._is_tracing()          # a TorchScript trace records the op
            and torch._C._len_torch_dispatch_stack() == 0)


_PLAIN = (Tensor, torch.nn.Parameter)


class _EagerCSRA(torch.autograd.Function):
    """The training forward in eager mode: y, with the op's state saved for the backward
    (views of one allocation: ``triton_impl.forward(packed=True)``). ``spec``: (temps,
    lam, normalize, backend, layout, y_dtype) as one argument (``apply`` costs per argument); x comes
    in the caller's ``layout`` and is viewed as (B, D, N) here, dx returned in that layout."""

    @staticmethod
    def forward(ctx, x, weight, lam_t, spec):
        temps, lam, normalize, backend, layout, y_dtype = spec
        y, *state, plan = _forward_impl(as_bdn(x, layout), weight, temps, lam, normalize, True,
                                        backend, lam_t, True, y_dtype)
        _save(ctx, "eager", backend, x, weight, state, lam_t, None, temps, lam, normalize, plan)
        ctx.layout = layout
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return (*_grads(ctx, grad_y, ctx.needs_input_grad[:3], ctx.layout), None)


#: ``_EagerCSRA.apply``, bound once (the eager training route's entry)
_eager_training = _EagerCSRA.apply


# slots: csra_fwd (x, weight, temperatures, lam, normalize, keep, backend, lam_t, y_dtype,
# scalars), csra_fwd_cuda (x, weight, temperatures, lam, normalize, keep, lam_t, y_dtype,
# scalars)
csra_fwd.register_autograd(_op_backward(7, 10), setup_context=_setup_context)
csra_fwd_cuda.register_autograd(_op_backward(6, 9), setup_context=_setup_context_cuda)


class CSRAFunction(torch.autograd.Function):
    """``CSRAFunction.apply(x, weight, temperatures, lam, normalize) -> y``.

    x (B, D, N) with any strides, weight (H, C, D), temperatures one per head, each > 0 (inf or
    the official 99: a max head), validated as :func:`csra_triton.csra` validates them, and lam
    a finite number or a one-element floating tensor (which gets a gradient). Forward and
    backward call the registered ops, so this traces under torch.compile too.
    """

    @classmethod
    def apply(cls, x, weight, temperatures, lam, normalize=True):
        if functorch_active():       # torch.func: the composite (no functorch rules here)
            _check_function_args(x, weight)
            temps = check_temperatures(temperatures, weight.shape[0])
            return composite(x, weight, temps, check_lam(lam, x.device), bool(normalize))
        return super().apply(x, weight, temperatures, lam, normalize)

    @staticmethod
    def forward(ctx, x, weight, temperatures, lam, normalize=True):
        _check_function_args(x, weight)
        temps = check_temperatures(temperatures, weight.shape[0])
        lam, normalize = check_lam(lam, x.device), bool(normalize)
        backend = backend_for(x.device, x.dtype)
        lam_t = lam if isinstance(lam, torch.Tensor) else None
        lam_f = 0.0 if lam_t is not None else lam
        plan = None
        if EAGER and _eager(x, weight, lam_t):
            route = "eager"
            y, *state, plan = _forward_impl(x, weight, temps, lam_f, normalize, True, backend,
                                            lam_t, packed=True)
        else:
            route = "triton_op" if use_cuda_ops(x, backend) else "op"
            y, *state = forward(x, weight, temps, lam, normalize, True, backend, eager=False)
        _save(ctx, route, backend, x, weight, state, lam_t, None, temps, lam_f, normalize, plan)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        need = ctx.needs_input_grad           # (x, weight, temperatures, lam, normalize)
        gx, gw, glam = _grads(ctx, grad_y, (need[0], need[1], need[3]))
        return gx, gw, None, glam, None


def _check_function_args(x, weight) -> None:
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[0] == 0
            or weight.shape[2] == 0):
        raise ValueError(f"weight: expected a (heads, classes, in_ch) tensor with heads >= 1 "
                         f"and in_ch >= 1, got {getattr(weight, 'shape', type(weight).__name__)}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"x: expected a (B, {weight.shape[2]}, N) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")

