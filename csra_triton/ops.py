"""Custom ops and autograd (stage 3 of reference -> kernels -> op -> module -> CLI).

Two ops in the ``csra_triton`` namespace, both with fake (meta) implementations so that
``torch.compile(fullgraph=True)`` and ``torch.export`` trace through them:

* ``csra_triton::csra_fwd(x, weight, temperatures, lam, normalize)``
    -> ``(y, m, l, att, argmax, inv_norm)``; x is (B, D, N) with any strides, weight (H, C, D).
    y (B, C) has x's dtype; the rest is the O(B*H*C) state that the backward needs (see
    kernels.py: softmax max and sum in base 2, attention logit, argmax, inverse row norms).
* ``csra_triton::csra_bwd(grad_y, x, weight, m, l, att, argmax, inv_norm, temperatures, lam,
  normalize)`` -> ``(grad_x, grad_weight)``.

``csra_fwd`` carries ``register_autograd``; :class:`CSRAFunction` is a thin ``autograd.Function``
over the same two ops for users who want ``.apply``.

Dispatch: CUDA tensors run the Triton kernels. CPU tensors run the same kernels in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported, and otherwise the
vectorised PyTorch fallback in ``fallback.py``. :func:`use_backend` overrides this choice.

Backward memory: dS' is materialised in chunks of classes, (H, chunk, B, N) elements with
``chunk ~ DS_WORKSPACE_ELEMS // (H * B * N)`` rounded to whole class tiles (so that the backward
recomputes exactly the forward's tiles, bit for bit), then two GEMMs per chunk:
``dx += W_chunk^T dS'`` and ``G_chunk = dS' x^T``; finally
``dW = G - W * rowsum(W * G) * inv_norm^2`` (the gradient through the row normalisation).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
from torch import Tensor

from . import fallback, tuning

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Largest number of dS' elements alive at once in the backward (class chunking bound).
DS_WORKSPACE_ELEMS = int(os.environ.get("CSRA_TRITON_DS_ELEMS", 1 << 25))

#: Tests set this: every output and workspace is filled with NaN (ints: -2**31 + 1) on
#: allocation, so that an element a kernel forgets to write fails the comparison.
POISON = os.environ.get("CSRA_TRITON_POISON", "0") not in ("", "0")

_BACKENDS = ("auto", "triton", "torch")
_backend = "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``"triton"`` or ``"torch"`` (the fallback) inside the block; ``"auto"`` restores."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def backend_for(device: torch.device) -> str:
    """Which implementation runs for tensors on ``device``: 'triton' or 'torch'."""
    if _backend != "auto":
        return _backend
    return "triton" if device.type == "cuda" or INTERPRET else "torch"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / state dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_temps_cache: dict = {}


def _temps_tensor(temps: list[float], device: torch.device) -> Tensor:
    """Device copy of the temperatures, cached so that replays (CUDA graphs) copy nothing."""
    key = (tuple(temps), str(device))
    t = _temps_cache.get(key)
    if t is None:
        t = _temps_cache[key] = torch.tensor(temps, dtype=torch.float32, device=device)
    return t


def _new(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(-(2**31) + 1 if dtype == torch.int32 else math.nan)
    return t


# --------------------------------------------------------------------------- launch helpers


def _chunk(H: int, C: int, B: int, N: int, bc: int) -> int:
    """Classes per backward workspace chunk (and per fallback forward chunk): about
    DS_WORKSPACE_ELEMS / (H*B*N), in whole class tiles (``bc`` classes) of the kernels."""
    per_class = max(1, H * B * N)
    return min(C, max(bc, DS_WORKSPACE_ELEMS // per_class // bc * bc))


def _torch_chunk(H: int, C: int, D: int, B: int, N: int) -> int:
    return _chunk(H, C, B, N, tuning.default_config(H, C, D, N).BC)


def _dtypes(x: Tensor) -> dict:
    import triton.language as tl

    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    # The interpreter's tl.dot is wrong on bf16 operands: products go through fp32 there.
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.float32 if INTERPRET else tl.bfloat16,
           torch.float32: tl.float32, torch.float64: tl.float64}[x.dtype]
    tf32 = x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and x.is_cuda
    return dict(ACC=acc, DOT=dot, PRECISION="tf32" if tf32 else "ieee",
                EMU_BF16=INTERPRET and x.dtype == torch.bfloat16)


def _launch_kw(x: Tensor, cfg: tuning.Config, H: int) -> dict:
    kw = dict(HP=tuning.pow2(H), BC=cfg.BC, BN=cfg.BN, BD=cfg.BD, **_dtypes(x))
    if x.is_cuda:
        kw.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return kw


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


def fwd_outputs(x: Tensor, H: int, C: int, new=_new) -> tuple:
    """The forward's outputs: y (B, C) in x's dtype; m, l, att (B, H, C) and inv_norm (H, C) in
    the accumulation dtype; argmax (B, H, C) int32."""
    B, acc = x.shape[0], acc_dtype(x.dtype)
    return (new((B, C), x.dtype, x.device), *(new((B, H, C), acc, x.device) for _ in range(3)),
            new((B, H, C), torch.int32, x.device), new((H, C), acc, x.device))


def fwd_bench(x: Tensor, weight: Tensor, temps: Tensor, outs: tuple):
    """cfg -> median ms of one forward launch with that config (for tuning)."""
    return lambda cfg: _bench_ms(lambda: _fwd_launch(x, weight, temps, 0.1, True, outs, cfg))


def ds_bench(x, weight, temps, grad_y, state, chunk: int, ws: Tensor):
    """cfg -> median ms of the dS kernel on the first class chunk (for tuning)."""
    B, _, N = x.shape
    H, C, _ = weight.shape
    c1 = min(C, chunk)
    out = ws[: H * c1 * B * N].view(H, c1, B, N)
    return lambda cfg: _bench_ms(lambda: _ds_launch(x, weight, temps, grad_y, state, 0.1, 0, c1,
                                                    out, cfg))


def fwd_config(x: Tensor, H: int, C: int, D: int, N: int) -> tuning.Config:
    """The forward's launch config (tiles shared with the backward); tunes if asked to."""
    def bench(cfg):
        w, t = torch.randn(H, C, D, device=x.device), torch.ones(H, device=x.device)
        return fwd_bench(x, w, t, fwd_outputs(x, H, C, torch.empty))(cfg)

    return tuning.choose("fwd", H, C, D, N, x, bench)


def bwd_config(x: Tensor, H: int, C: int, D: int, N: int, fwd: tuning.Config,
               bench=None) -> tuning.Config:
    return tuning.choose("bwd", H, C, D, N, x, bench, tiles=fwd.tiles())


def _fwd_launch(x, weight, temps, lam, normalize, outs, cfg):
    from .kernels import csra_fwd_kernel

    B, D, N = x.shape
    H, C, _ = weight.shape
    y, m, l, att, amax, inv_n = outs
    with _device_guard(x):
        csra_fwd_kernel[(B, triton_cdiv(C, cfg.BC))](
            x, *x.stride(), weight, *weight.stride(), temps, y, *y.stride(),
            m, l, att, amax, inv_n, H, C, D, N, float(lam), 1.0 / N,
            NORMALIZE=bool(normalize), **_launch_kw(x, cfg, H))


def _ds_launch(x, weight, temps, grad_y, state, lam, c0, c1, out, cfg):
    from .kernels import csra_bwd_ds_kernel

    B, D, N = x.shape
    H, C, _ = weight.shape
    m, l, att, amax, inv_n = state
    with _device_guard(x):
        csra_bwd_ds_kernel[(B, triton_cdiv(c1 - c0, cfg.BC))](
            x, *x.stride(), weight, *weight.stride(), temps, grad_y, *grad_y.stride(),
            m, l, att, amax, inv_n, out, B, H, C, D, N, c0, c1 - c0, float(lam), 1.0 / N,
            **_launch_kw(x, cfg, H))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------- the ops

# The kernels read x, the weight and grad_y through their strides: Inductor need not copy
# inputs into the layout it saw while tracing (it did, with an unbacked batch and a conv trunk).
_TAGS = (torch.Tag.flexible_layout,)


@torch.library.custom_op("csra_triton::csra_fwd", mutates_args=(), tags=_TAGS)
def csra_fwd(x: Tensor, weight: Tensor, temperatures: list[float], lam: float,
             normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, D, N = x.shape
    H, C, _ = weight.shape
    acc = acc_dtype(x.dtype)
    if backend_for(x.device) == "torch" or B == 0:
        temps = torch.tensor(temperatures, dtype=acc)
        return fallback.fwd(x, weight, temps, lam, normalize, _torch_chunk(H, C, D, B, N),
                            fwd_outputs(x, H, C))
    outs = fwd_outputs(x, H, C)
    _fwd_launch(x, weight, _temps_tensor(temperatures, x.device), lam, normalize, outs,
                fwd_config(x, H, C, D, N))
    return outs


@csra_fwd.register_fake
def _(x, weight, temperatures, lam, normalize):
    B, _, _ = x.shape
    H, C, _ = weight.shape
    acc = acc_dtype(x.dtype)
    state = [x.new_empty((B, H, C), dtype=acc) for _ in range(3)]
    return (x.new_empty((B, C)), *state, x.new_empty((B, H, C), dtype=torch.int32),
            x.new_empty((H, C), dtype=acc))


@torch.library.custom_op("csra_triton::csra_bwd", mutates_args=(), tags=_TAGS)
def csra_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, m: Tensor, l: Tensor, att: Tensor,
             amax: Tensor, inv_n: Tensor, temperatures: list[float], lam: float,
             normalize: bool) -> tuple[Tensor, Tensor]:
    B, D, N = x.shape
    H, C, _ = weight.shape
    acc = m.dtype
    if B == 0:
        return x.new_zeros((B, D, N)), torch.zeros_like(weight)
    use_torch = backend_for(x.device) == "torch"
    temps = (torch.tensor(temperatures, dtype=acc) if use_torch
             else _temps_tensor(temperatures, x.device))
    # GEMM operands: x's dtype, except the fallback on CPU, where half-precision GEMMs are slow
    # and fp32 ones are both faster and more precise.
    gemm = acc if use_torch and x.device.type == "cpu" else x.dtype
    # (B*N, D) view of x for G = dS' x^T; a copy only when x's channels are not innermost.
    x_t = x.transpose(1, 2).reshape(B * N, D).to(gemm)
    G = _new((H, C, D), gemm, x.device)
    state = (m, l, att, amax, inv_n)
    if use_torch:
        chunk = _torch_chunk(H, C, D, B, N)
    else:  # the forward's tiles (so that its scores are recomputed exactly), chunks of whole tiles
        fwd_cfg = fwd_config(x, H, C, D, N)
        chunk = _chunk(H, C, B, N, fwd_cfg.BC)
    ws = _new((H * chunk * B * N,), gemm, x.device)
    if not use_torch:
        bwd_cfg = bwd_config(x, H, C, D, N, fwd_cfg,
                             ds_bench(x, weight, temps, grad_y, state, chunk, ws))
    grad_x = None
    for c0 in range(0, C, chunk):
        c1 = min(C, c0 + chunk)
        rows = H * (c1 - c0)
        ds = ws[: rows * B * N].view(H, c1 - c0, B, N)
        if use_torch:
            fallback.ds_chunk(x, weight, temps, grad_y, m, l, att, amax, inv_n, lam, c0, c1, ds)
        else:
            _ds_launch(x, weight, temps, grad_y, state, lam, c0, c1, ds, bwd_cfg)
        ds2 = ds.view(rows, B * N)
        G[:, c0:c1] = (ds2 @ x_t).view(H, c1 - c0, D)
        w_c = weight[:, c0:c1].to(x.dtype).to(gemm).reshape(rows, D)
        dx_c = torch.matmul(w_c.t(), ds.view(rows, B, N).transpose(0, 1))  # (B, D, N)
        grad_x = dx_c if grad_x is None else grad_x.add_(dx_c)
    grad_x = grad_x.to(x.dtype)
    Gf = G.to(acc)
    if normalize:
        wf = weight.to(acc)
        Gf = Gf - wf * ((wf * Gf).sum(-1, keepdim=True) * (inv_n * inv_n)[..., None])
    return grad_x, Gf.to(weight.dtype)


@csra_bwd.register_fake
def _(grad_y, x, weight, m, l, att, amax, inv_n, temperatures, lam, normalize):
    B, D, N = x.shape
    return x.new_empty((B, D, N)), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, temperatures, lam, normalize = inputs
    _, *state = output
    ctx.save_for_backward(x, weight, *state)
    ctx.temperatures, ctx.lam, ctx.normalize = list(temperatures), float(lam), bool(normalize)
    ctx.mark_non_differentiable(*state)


def _backward(ctx, grad_y, *_state_grads):
    x, weight, *state = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None, None
    grad_x, grad_w = torch.ops.csra_triton.csra_bwd(
        grad_y, x, weight, *state, ctx.temperatures, ctx.lam, ctx.normalize)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None, None, None, None)


csra_fwd.register_autograd(_backward, setup_context=_setup_context)


class CSRAFunction(torch.autograd.Function):
    """``CSRAFunction.apply(x, weight, temperatures, lam, normalize) -> y``.

    x (B, D, N) with any strides, weight (H, C, D), temperatures a list of H floats (inf = max
    head). Forward and backward call the registered ops, so this traces under torch.compile too.
    Arguments are not validated here; :func:`csra_triton.csra` validates and then calls the op.
    """

    @staticmethod
    def forward(ctx, x, weight, temperatures, lam, normalize=True):
        temps, lam, normalize = list(temperatures), float(lam), bool(normalize)
        y, *state = torch.ops.csra_triton.csra_fwd(x, weight, temps, lam, normalize)
        ctx.save_for_backward(x, weight, *state)
        ctx.temperatures, ctx.lam, ctx.normalize = temps, lam, normalize
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y)


def official_temperature(t: float) -> float:
    """Maps the official flag value 99 to inf (a max-pooling head)."""
    t = float(t)
    return math.inf if t == 99 else t
