"""Custom ops and autograd (stage 3 of reference -> kernels -> op -> module -> CLI).

Two ops in the ``csra_triton`` namespace, both with fake (meta) implementations so that
``torch.compile(fullgraph=True)`` and ``torch.export`` trace through them:

* ``csra_triton::csra_fwd(x, weight, temperatures, lam, normalize)``
    -> ``(y, m, l, att, argmax, inv_norm, kept)``; x is (B, D, N) with any strides, weight
    (H, C, D). y (B, C) has x's dtype; m, l, att, argmax, inv_norm are the O(B*H*C) state that
    the backward needs (see kernels.py: softmax max and sum in base 2, attention logit, argmax,
    inverse row norms); ``kept`` is empty (0,) except on the CPU fallback, where it holds the
    forward's score products when they have no more elements than x (:func:`keeps_scores`).
* ``csra_triton::csra_bwd(grad_y, x, weight, m, l, att, argmax, inv_norm, kept, temperatures,
  lam, normalize)`` -> ``(grad_x, grad_weight)``.

``csra_fwd`` carries ``register_autograd``; :class:`CSRAFunction` is a thin ``autograd.Function``
over the same two ops for users who want ``.apply``.

Dispatch: CUDA tensors run the Triton kernels. CPU tensors run the same kernels in Triton's
interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported, and otherwise the
vectorised PyTorch fallback in ``fallback.py``. :func:`use_backend` overrides this choice.

Backward memory: dS' is materialised in chunks of classes, (H, chunk, B, N) elements with
``chunk ~ DS_WORKSPACE_ELEMS // (H * B * N)`` rounded to whole class tiles (so that the backward
recomputes exactly the forward's tiles, bit for bit; the fallback's chunks hold
``fallback.CHUNK_ELEMS`` scores), then two GEMMs per chunk: ``dx += W_chunk^T dS'`` and
``G_chunk = dS' x^T``; finally ``dW = G - W * rowsum(W * G) * inv_norm^2`` (the gradient
through the row normalisation, :func:`weight_grad`).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, NamedTuple

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


_params_cache: dict = {}


def params_tensor(temps: list[float], lam: float, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """The kernels' scalar parameters as one (H + 2,) tensor in the accumulation dtype:
    the temperatures (inf = max head), lam and log2(e). Kernel float arguments would be fp32;
    a tensor keeps them exact for fp64 inputs. Cached, so that replays (CUDA graphs) copy
    nothing from the host."""
    key = (tuple(temps), float(lam), dtype, str(device))
    t = _params_cache.get(key)
    if t is None:
        t = _params_cache[key] = torch.tensor([*temps, lam, math.log2(math.e)], dtype=dtype,
                                              device=device)
    return t


def empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` with the allocator signature of :func:`_new` (never poisoned)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _new(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = empty(shape, dtype, device)
    if POISON:
        t.fill_(-(2**31) + 1 if dtype == torch.int32 else math.nan)
    return t


# --------------------------------------------------------------------------- launch helpers


def _chunk(H: int, C: int, B: int, N: int, bc: int) -> int:
    """Classes per backward workspace chunk (and per fallback forward chunk): about
    DS_WORKSPACE_ELEMS / (H*B*N), in whole class tiles (``bc`` classes) of the kernels."""
    per_class = max(1, H * B * N)
    return min(C, max(bc, DS_WORKSPACE_ELEMS // per_class // bc * bc))


def _torch_chunk(H: int, C: int, B: int, N: int) -> int:
    """Classes per chunk of the fallback: about fallback.CHUNK_ELEMS scores (cache-sized;
    chunks the size of the kernels' workspace made every elementwise pass over the scores
    memory-bound, 0.3 s of 1.7 s at openimages-r101-448@B=2)."""
    return min(C, max(1, fallback.CHUNK_ELEMS // max(1, H * B * N)))


#: Weights (in the operand dtype) above this size are launched class-block-major, so that each
#: weight block is read from HBM once and x stays in L2 (see kernels.py, "Launch order").
CB_MAJOR_BYTES = 8 << 20


def tf32_enabled(x: Tensor, gpu: bool | None = None) -> bool:
    """fp32 scores on TF32 tensor cores: as the official 1x1 conv (cuDNN) computes them, i.e.
    when ``torch.backends.cudnn.allow_tf32`` is True (PyTorch's default); IEEE fp32 otherwise.
    Never under the interpreter (which has no TF32)."""
    gpu = x.is_cuda if gpu is None else gpu
    return x.dtype == torch.float32 and gpu and bool(torch.backends.cudnn.allow_tf32)


def _dtypes(x: Tensor, gpu: bool) -> dict:
    """Dtype constexprs of the kernels for x; ``gpu`` False means the interpreter's choices."""
    import triton.language as tl

    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    # The interpreter's tl.dot is wrong on bf16 operands: products go through fp32 there.
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16 if gpu else tl.float32,
           torch.float32: tl.float32, torch.float64: tl.float64}[x.dtype]
    return dict(ACC=acc, DOT=dot, PRECISION="tf32" if tf32_enabled(x, gpu) else "ieee",
                EMU_BF16=not gpu and x.dtype == torch.bfloat16)


class Call(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=.., num_stages=..)``.
    The compile report (compiled.py) compiles exactly these for a GPU that is not there."""
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int

    def run(self):
        """Launches (on CUDA with the config's warps and stages; the interpreter takes none)."""
        x = self.args[0]
        kw = dict(self.constexprs)
        if x.is_cuda:
            kw.update(num_warps=self.num_warps, num_stages=self.num_stages)
        with _device_guard(x):
            return self.kernel[self.grid](*self.args, **kw)


def _gpu(x: Tensor, gpu: bool | None) -> bool:
    return (not INTERPRET) if gpu is None else gpu


def pow2_divisor(v: int, cap: int) -> int:
    """The largest power of two dividing ``v``, at most ``cap`` (``cap`` for v == 0)."""
    v = abs(int(v))
    return cap if v == 0 else min(cap, v & -v)


def _tile_kw(x: Tensor, cfg: tuning.Config, H: int, D: int, major: bool, gpu: bool) -> dict:
    # Alignment (in elements, up to 16 bytes) of x's channel and position strides and of the
    # dS' workspace rows (N): lets the kernels load x and store dS' in vectors (kernels._aligned).
    vec = max(1, 16 // x.element_size())
    return dict(HP=tuning.pow2(H), BC=cfg.BC, BN=cfg.BN, BD=cfg.BD,
                CB_MAJOR=major, EVEN_D=D % cfg.BD == 0,
                ONE_TILE=x.shape[2] <= cfg.BN, XA_D=pow2_divisor(x.stride(1), vec),
                XA_N=pow2_divisor(x.stride(2), vec), XA_P=pow2_divisor(x.shape[2], vec),
                **_dtypes(x, gpu))


def cb_major(H: int, C: int, D: int, itemsize: int) -> bool:
    """Class-block-major launch order for weights beyond ``CB_MAJOR_BYTES`` (see kernels.py)."""
    return H * C * D * itemsize > CB_MAJOR_BYTES


PREP_ROWS = 8       # rows per prep program: 40 programs for 320 rows (10 took 22 µs on an H200)
PREP_WARPS = 4


def _grid(B: int, n_cb: int, major: bool) -> tuple:
    """(n_cb, B), or (B, n_cb) in class-block-major order (see kernels.py, "Launch order")."""
    return (B, n_cb) if major else (n_cb, B)


def prep_call(x: Tensor, weight: Tensor, normalize: bool, w_op: Tensor, inv_n: Tensor,
              gpu: bool | None = None) -> Call:
    from .kernels import csra_prep_kernel

    H, C, D = weight.shape
    R = H * C
    d = _dtypes(x, _gpu(x, gpu))
    return Call(csra_prep_kernel, (triton_cdiv(R, PREP_ROWS),),
                (weight, *weight.stride(), w_op, inv_n, R, C, D),
                dict(NORMALIZE=bool(normalize), BR=PREP_ROWS, BD=min(256, tuning.pow2(max(D, 16))),
                     ACC=d["ACC"], EMU_BF16=d["EMU_BF16"]), PREP_WARPS, 2)


def fwd_call(x, w_op, inv_n, params, outs, cfg, H, gpu: bool | None = None) -> Call:
    from .kernels import csra_fwd_kernel

    B, D, N = x.shape
    C = inv_n.shape[-1]
    y, m, l, att, amax, _ = outs
    n_cb = triton_cdiv(C, cfg.BC)
    major = cb_major(H, C, D, x.element_size())
    return Call(csra_fwd_kernel, _grid(B, n_cb, major),
                (x, *x.stride(), w_op, inv_n, params, y, *y.stride(), m, l, att, amax,
                 B, H, C, D, N, n_cb),
                _tile_kw(x, cfg, H, D, major, _gpu(x, gpu)), cfg.num_warps, cfg.num_stages)


def ds_call(x, w_op, inv_n, params, grad_y, state, c0, c1, out, cfg, H,
            gpu: bool | None = None) -> Call:
    from .kernels import csra_bwd_ds_kernel

    B, D, N = x.shape
    C = inv_n.shape[-1]
    m, l, att, amax = state
    n_cb = triton_cdiv(c1 - c0, cfg.BC)
    major = cb_major(H, C, D, x.element_size())
    return Call(csra_bwd_ds_kernel, _grid(B, n_cb, major),
                (x, *x.stride(), w_op, inv_n, params, grad_y, *grad_y.stride(),
                 m, l, att, amax, out, B, H, C, D, N, c0, c1 - c0, n_cb),
                _tile_kw(x, cfg, H, D, major, _gpu(x, gpu)), cfg.num_warps, cfg.num_stages)


def _bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


def fwd_outputs(x: Tensor, H: int, C: int, new=_new) -> tuple:
    """The forward's outputs: y (B, C) in x's dtype; m, l, att (B, H, C) and inv_norm (H, C) in
    the accumulation dtype; argmax (B, H, C) int32."""
    B, acc = x.shape[0], acc_dtype(x.dtype)
    return (new((B, C), x.dtype, x.device), *(new((B, H, C), acc, x.device) for _ in range(3)),
            new((B, H, C), torch.int32, x.device), new((H, C), acc, x.device))


def prep_weight(x: Tensor, weight: Tensor, normalize: bool, inv_n: Tensor | None = None,
                new=_new) -> tuple[Tensor, Tensor]:
    """(w_op (H*C, D) in x's dtype, inv_n (H, C)): the weight rounded to the operand dtype and
    its inverse row norms, once per call (one launch; ``inv_n`` is written in place if given)."""
    H, C, D = weight.shape
    w_op = new((H * C, D), x.dtype, x.device)
    if inv_n is None:
        inv_n = new((H, C), acc_dtype(x.dtype), x.device)
    prep_call(x, weight, normalize, w_op, inv_n).run()
    return w_op, inv_n


def _rel_err(got: Tensor, want: Tensor) -> float:
    from .benchmark import rel_err   # ||got - want|| / ||want||, inf if got is not finite

    return rel_err(got, want)


#: A tuning candidate whose output is further than this from float64 is dropped (fp32 under
#: TF32 and bf16 operands land near 1e-3; a wrong tile lands near 1).
TUNE_TOL = {torch.float64: 1e-9, torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 2e-2}


class ConfigRejected(RuntimeError):
    """A tuning candidate that spills registers or computes something else (see tuning.sweep)."""


def _checked(launch, check):
    """Bench closure body: launch once, reject spills and wrong outputs, then time."""
    def bench(cfg):
        kernel = launch(cfg)
        spills = getattr(kernel, "n_spills", 0) or 0
        if spills:
            raise ConfigRejected(f"spills {spills} registers")
        err = check()
        if err is not None:
            raise ConfigRejected(f"output differs from float64 by {err:.1e}")
        return _bench_ms(lambda: launch(cfg))
    return bench


def fwd_bench(x: Tensor, weight: Tensor, params: Tensor, outs: tuple):
    """cfg -> median ms of one forward launch with that config (for tuning), after checking its
    output once against float64 and its compiled form for spills."""
    H, C, _ = weight.shape
    w_op, inv_n = prep_weight(x, weight, True, outs[5])
    ref = y64(x, w_op.view(H, C, -1), inv_n, params)

    def check():
        err = _rel_err(outs[0], ref)
        return err if err > TUNE_TOL[x.dtype] else None

    return _checked(lambda cfg: _fwd_launch(x, w_op, inv_n, params, outs, cfg, H), check)


def y64(x: Tensor, w_op: Tensor, inv_n: Tensor, params: Tensor) -> Tensor:
    """float64 forward on the kernels' own operands, s = inv_n * (w_op . x) (tuning checks)."""
    H = w_op.shape[0]
    s = torch.einsum("hcd,bdn->bhcn", w_op.double(), x.double()) * inv_n.double()[..., None]
    t = params[:H].double().view(1, -1, 1, 1)
    lam = float(params[H])
    is_max = torch.isinf(t)
    soft = (torch.softmax(s * torch.where(is_max, 1.0, t), -1) * s).sum(-1)
    att = torch.where(is_max[..., 0], s.amax(-1), soft)
    return (s.mean(-1) + lam * att).sum(1)


def ds_bench(x, w_op, inv_n, params, grad_y, state, chunk: int, ws: Tensor):
    """cfg -> median ms of the dS kernel on the first class chunk (for tuning), after checking
    its output once against the default config's and its compiled form for spills."""
    B, _, N = x.shape
    H, C = inv_n.shape
    c1 = min(C, chunk)
    out = ws[: H * c1 * B * N].view(H, c1, B, N)
    launch = lambda cfg: _ds_launch(x, w_op, inv_n, params, grad_y, state, 0, c1, out, cfg, H)
    ref = None

    def check():
        nonlocal ref
        if ref is None:   # the first candidate is the default config (config_space's order)
            ref = out.double().clone()
            return None
        err = _rel_err(out, ref)
        return err if err > TUNE_TOL[x.dtype] else None

    return _checked(launch, check)


def fwd_config(x: Tensor, H: int, C: int, D: int, N: int) -> tuning.Config:
    """The forward's launch config (tiles shared with the backward); tunes if asked to."""
    def bench():
        w = torch.randn(H, C, D, device=x.device)
        params = params_tensor([1.0] * H, 0.1, acc_dtype(x.dtype), x.device)
        return fwd_bench(x, w, params, fwd_outputs(x, H, C, empty))

    return tuning.choose("fwd", H, C, D, N, x, bench)


def bwd_config(x: Tensor, H: int, C: int, D: int, N: int, fwd: tuning.Config,
               bench=None) -> tuning.Config:
    """The dS kernel's config: the forward's tiles; ``bench()`` makes the timer if tuning."""
    return tuning.choose("bwd", H, C, D, N, x, bench, tiles=fwd.tiles())


def _fwd_launch(x, w_op, inv_n, params, outs, cfg, H):
    return fwd_call(x, w_op, inv_n, params, outs, cfg, H).run()


def _ds_launch(x, w_op, inv_n, params, grad_y, state, c0, c1, out, cfg, H):
    return ds_call(x, w_op, inv_n, params, grad_y, state, c0, c1, out, cfg, H).run()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------- the ops

# The kernels read x, the weight and grad_y through their strides: Inductor need not copy
# inputs into the layout it saw while tracing (it did, with an unbacked batch and a conv trunk).
_TAGS = (torch.Tag.flexible_layout,)


def keeps_scores(x: Tensor, H: int, C: int) -> bool:
    """Whether the forward returns its score products (W x, before the row norms, in the GEMM
    dtype) for the backward: on the CPU fallback, when they have no more elements than x
    (H*C <= D), which autograd keeps anyway. The backward then skips a GEMM: its bf16 path runs
    one (the ``lo`` correction) instead of two, its fp32 path none instead of one. The kernels
    never keep them (they recompute in registers), nor does the fallback at 9,605 classes: the
    kept memory is bounded by x's, never by classes x positions."""
    return backend_for(x.device) == "torch" and x.device.type == "cpu" and H * C <= x.shape[1]


def _kept_scores(x: Tensor, H: int, C: int, new=_new) -> Tensor:
    """The forward's 7th output: (H*C, B*N) in the fallback's GEMM dtype if
    :func:`keeps_scores`, else (0,) in x's dtype."""
    B, _, N = x.shape
    if not keeps_scores(x, H, C):
        return new((0,), x.dtype, x.device)
    return new((H * C, B * N), fallback.gemm_dtype(x.dtype, x.device), x.device)


@torch.library.custom_op("csra_triton::csra_fwd", mutates_args=(), tags=_TAGS)
def csra_fwd(x: Tensor, weight: Tensor, temperatures: list[float], lam: float,
             normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, D, N = x.shape
    H, C, _ = weight.shape
    acc = acc_dtype(x.dtype)
    temperatures = kernel_temperatures(temperatures)
    kept = _kept_scores(x, H, C)
    if backend_for(x.device) == "torch" or B == 0:
        temps = torch.tensor(temperatures, dtype=acc)
        outs = fallback.fwd(x, weight, temps, lam, normalize, _torch_chunk(H, C, B, N),
                            fwd_outputs(x, H, C), kept=kept if kept.numel() else None)
        return (*outs, kept)
    outs = fwd_outputs(x, H, C)
    w_op, _ = prep_weight(x, weight, normalize, outs[5])
    _fwd_launch(x, w_op, outs[5], params_tensor(temperatures, lam, acc, x.device), outs,
                fwd_config(x, H, C, D, N), H)
    return (*outs, kept)


@csra_fwd.register_fake
def _(x, weight, temperatures, lam, normalize):
    B, _, _ = x.shape
    H, C, _ = weight.shape
    acc = acc_dtype(x.dtype)
    state = [x.new_empty((B, H, C), dtype=acc) for _ in range(3)]
    return (x.new_empty((B, C)), *state, x.new_empty((B, H, C), dtype=torch.int32),
            x.new_empty((H, C), dtype=acc), _kept_scores(x, H, C, empty))


@torch.library.custom_op("csra_triton::csra_bwd", mutates_args=(), tags=_TAGS)
def csra_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, m: Tensor, l: Tensor, att: Tensor,
             amax: Tensor, inv_n: Tensor, kept: Tensor, temperatures: list[float], lam: float,
             normalize: bool) -> tuple[Tensor, Tensor]:
    B, D, N = x.shape
    H, C, _ = weight.shape
    acc = m.dtype
    if B == 0:
        inner = _channels_inner(x)
        dx = x.new_zeros((B * N, D) if inner else (D, B * N))
        return _dx_view(dx, B, D, N, inner), torch.zeros_like(weight)
    use_torch = backend_for(x.device) == "torch"
    temperatures = kernel_temperatures(temperatures)
    # GEMM operands: x's dtype, except the fallback on CPU, where they follow what the CPU
    # multiplies fast (fallback.gemm_dtype: bf16 with native bf16, else fp32).
    gemm = fallback.gemm_dtype(x.dtype, x.device) if use_torch and not x.is_cuda else x.dtype
    # x as a (D, B*N) matrix: G = dS' x_dk^T and dx = W^T dS' are then single GEMMs over all
    # batch elements. A view when x's channels are innermost (channels_last, tokens); for NCHW
    # a copy of contiguous position runs (coalesced, unlike a (B*N, D) transpose).
    x_dk = fallback.x_matrix(x, gemm)
    channels_inner = _channels_inner(x)
    G = _new((H, C, D), gemm, x.device)
    state = (m, l, att, amax)
    if use_torch:
        temps = torch.tensor(temperatures, dtype=acc)
        chunk = _torch_chunk(H, C, B, N)
        w_gemm = weight.to(x.dtype).to(gemm)
        operands = (x_dk, lambda c0, c1: w_gemm[:, c0:c1])
    else:  # the forward's tiles (so that its scores are recomputed exactly), chunks of whole tiles
        params = params_tensor(temperatures, lam, acc, x.device)
        fwd_cfg = fwd_config(x, H, C, D, N)
        chunk = _chunk(H, C, B, N, fwd_cfg.BC)
        w_op, _ = prep_weight(x, weight, normalize)           # as in the forward, bit for bit
        w_gemm = w_op.view(H, C, D)
    ws = _new((H * chunk * B * N,), gemm, x.device)
    if not use_torch:
        bwd_cfg = bwd_config(x, H, C, D, N, fwd_cfg, lambda: ds_bench(
            x, w_op, inv_n, params, grad_y, state, chunk, ws))
    # dx accumulates over class chunks in the layout of x: (B*N, D) for channels-innermost x,
    # else (D, B*N); both are returned as (B, D, N) views.
    # The fallback rounds bf16 products once per chunk; over several chunks it sums them in acc
    # (the kernels' path keeps x's dtype, as the GPU's addmm_ adds in fp32 before rounding).
    several = use_torch and gemm != acc and chunk < C
    dx = _new((B * N, D) if channels_inner else (D, B * N), acc if several else gemm, x.device)
    dW = G if G.dtype == weight.dtype else torch.empty_like(weight)
    for i, c0 in enumerate(range(0, C, chunk)):
        c1 = min(C, c0 + chunk)
        rows = H * (c1 - c0)
        ds = ws[: rows * B * N].view(H, c1 - c0, B, N)
        if use_torch:
            # the forward's products of these classes, if it kept them
            hi = kept.view(H, C, B * N)[:, c0:c1] if kept.numel() else None
            fallback.ds_chunk(x, weight, temps, grad_y, inv_n, lam, c0, c1, ds, operands, hi)
        else:
            _ds_launch(x, w_op, inv_n, params, grad_y, state, c0, c1, ds, bwd_cfg, H)
        # One GEMM each over all heads when the chunk holds every class; else one per head,
        # because a chunk of classes of every head is not a matrix of W or G (no copies).
        ds3, w3, G3 = ds.view(H, c1 - c0, B * N), w_gemm[:, c0:c1], G[:, c0:c1]
        if c1 - c0 == C:
            ds3, w3, G3 = ds3.reshape(1, rows, -1), w3.reshape(1, rows, D), G3.view(1, rows, D)
        for h in range(ds3.shape[0]):
            torch.mm(ds3[h], x_dk.t(), out=G3[h])
            a, b = (ds3[h].t(), w3[h]) if channels_inner else (w3[h].t(), ds3[h])
            first = i == 0 and h == 0
            if several:
                dx.copy_(a @ b) if first else dx.add_(a @ b)
            else:   # beta=0 ignores the (poisoned) buffer's contents
                dx.addmm_(a, b, beta=0.0 if first else 1.0)
        # these classes' dW while their G is in cache (a pass over all of G and W afterwards
        # read both from memory again: ~0.1 s of a 1.3 s step at 9,605 classes on CPU)
        weight_grad(G, weight, inv_n, normalize, acc, dW, c0, c1)
    grad_x = _dx_view(dx.to(x.dtype), B, D, N, channels_inner)
    return grad_x, dW


def weight_grad(G: Tensor, weight: Tensor, inv_n: Tensor, normalize: bool, acc, out: Tensor,
                c0: int, c1: int) -> None:
    """dL/dW of classes [c0, c1) into ``out`` (H, C, D, weight's dtype; may be G itself) from
    G = dS' x^T (H, C, D): through the row normalisation, G - W (W.G) inv_n^2, computed in
    ``acc`` blocks of rows at a time. No weight-sized fp32 temporaries: at 9,605 classes the
    three of them were ~1 GB of the GPU's peak, and ~0.3 s of page faults on CPU."""
    H, C, D = weight.shape
    if not normalize:
        if out is not G:
            out[:, c0:c1] = G[:, c0:c1]
        return
    step = max(1, (PROJECT_ELEMS_CUDA if G.is_cuda else fallback.ROW_BLOCK_ELEMS) // (H * D))
    for b0 in range(c0, c1, step):
        b1 = min(c1, b0 + step)
        g = G[:, b0:b1].to(acc)
        w = weight[:, b0:b1].to(acc)
        coef = torch.linalg.vecdot(w, g).mul_(inv_n[:, b0:b1].square())
        # (a broadcast multiply and subtract was 18x slower than addcmul_ on CPU)
        g.addcmul_(w, coef[..., None], value=-1.0)
        if g.data_ptr() != out[:, b0:b1].data_ptr():      # else g is that block of out already
            out[:, b0:b1] = g


#: Elements per block of weight_grad on CUDA: a few launches at 9,605 classes, 64 MB of fp32
#: temporaries at most (on CPU: fallback.ROW_BLOCK_ELEMS, cache-sized).
PROJECT_ELEMS_CUDA = 1 << 24


def _channels_inner(x: Tensor) -> bool:
    """x (B, D, N) with channels innermost (channels_last, tokens): dx is computed (B*N, D)."""
    return x.stride(1) == 1 and x.shape[1] > 1


def _dx_view(dx: Tensor, B: int, D: int, N: int, channels_inner: bool) -> Tensor:
    """The (B, D, N) view of the backward's dx buffer, (B*N, D) or (D, B*N) (no copy)."""
    if channels_inner:
        return dx.view(B, N, D).transpose(1, 2)
    return dx.view(D, B, N).permute(1, 0, 2)


@csra_bwd.register_fake
def _(grad_y, x, weight, m, l, att, amax, inv_n, kept, temperatures, lam, normalize):
    B, D, N = x.shape
    inner = _channels_inner(x)
    dx = x.new_empty((B * N, D) if inner else (D, B * N))
    return _dx_view(dx, B, D, N, inner), torch.empty_like(weight)


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
        temps, lam, normalize = op_temperatures(temperatures), float(lam), bool(normalize)
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


#: How a max head reaches the ops: temperature 0 (users' temperatures must be > 0). A finite
#: flag, because exported programs serialise float lists as JSON numbers: an inf there made
#: torch._inductor.aoti_load_package fail ("type must be number, but is string").
MAX_HEAD = 0.0


def op_temperatures(temps) -> list[float]:
    """The ops' encoding of validated temperatures: inf (a max head) -> MAX_HEAD."""
    return [MAX_HEAD if math.isinf(t) else t for t in temps]


def kernel_temperatures(temps) -> list[float]:
    """The kernels' encoding: a max head is inf (the ops accept inf or MAX_HEAD)."""
    return [math.inf if (t <= MAX_HEAD or math.isinf(t)) else float(t) for t in temps]
