"""The Triton implementation (the implementations layer, beside the PyTorch fallback in
``fallback.py``, docs/architecture.md): launch
plans for the kernels in ``kernels.py`` and the two entry points the op layer calls,
:func:`forward` and :class:`Backward` (the fallback exposes the same two).

Host path. A training step of the head is, at coco-r101-448 in bf16, 2 launches
forward (prep, fwd) and 5 backward (dS, x's NCHW copy for the GEMMs, the two GEMMs, the weight
gradient's projection); inference is 2 as well (prep, fwd): every call prepares the weight it is
given, from its current values (nothing derived from a tensor's values is kept between calls).
What a call computes on the host is built once per problem (:class:`Plan`, keyed by shapes,
strides, dtypes, device and the op's scalars) and looked up afterwards: the config, the grid,
the constexprs, the scalar-parameter tensor. With
``CSRA_TRITON_DIRECT_LAUNCH=1`` repeat launches also skip Triton's JIT dispatch (argument
binding, cache key) and run the compiled kernel directly, keyed by the argument
specialisation Triton would compute (:func:`_spec`); off by default until a GPU run has checked
it (bench/gpu_check.sh runs both).

Everything here also runs on CPU tensors under ``TRITON_INTERPRET=1`` (the tests), and
builds the exact launches that the compile report (``tools/compiled.py``) compiles for a GPU that is
not there.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from . import _compat, archs, kernels, tuning
from .common import (BoundedCache, Scalars, acc_dtype, cdiv, empty, fwd_outputs,
                     hold_if_capturing, mm_plain, new, pow2, rel_err, traced_tensor, x_matrix)
from .interface import Forward, ForwardState
from .settings import ENV

#: Whether the kernels are Triton's interpreter functions (CPU tensors: the tests): as Triton
#: made them when ``kernels`` was imported, from its own reading of ``TRITON_INTERPRET``.
INTERPRET = _compat.interpreted(kernels.csra_fwd_kernel)

#: Launch compiled kernels directly on repeat calls (see the module docstring).
DIRECT_LAUNCH = ENV.direct_launch

#: Largest number of dS' elements alive at once in the backward (class chunking bound).
DS_WORKSPACE_ELEMS = ENV.ds_elems
#: Prepared weights (w_op, x's dtype) up to this size are handed by the forward to the backward
#: (1.3 MB at coco-r101-448); beyond it (157 MB at 9,605 classes) the backward prepares its own
#: (:func:`keeps_weight`).
KEEP_WEIGHT_BYTES = ENV.keep_weight_bytes
#: A training forward writes its raw scores for the backward when they have no more elements
#: than x (:func:`keeps_scores`); ``CSRA_TRITON_KEEP_SCORES=0`` turns it off (dS' recomputed).
KEEP_SCORES = ENV.keep_scores
#: Weights (in the operand dtype) above this size are launched class-block-major, so that each
#: weight block is read from HBM once and x stays in L2 (see kernels.py, "Launch order").
#: ``CSRA_TRITON_CB_MAJOR_BYTES`` overrides it (the tests force the order at small shapes).
CB_MAJOR_BYTES = ENV.cb_major_bytes

#: Weight-row kernels (prep, proj): elements per program, whole rows when d fits
#: (:func:`row_tiles`: one load round trip per program, rows over many programs), and warps.
ROW_ELEMS = 4096
ROW_WARPS = 8
DS_KEPT_COLS = 256  # positions per step of the elementwise dS' kernel (scores kept)
DS_KEPT_ELEMS = 2048  # rows x positions per program of that kernel (8 per thread)
DS_KEPT_WARPS = 8


def tf32_enabled(x: Tensor, target: str | None = None, on_gpu: bool | None = None) -> bool:
    """fp32 scores on TF32 tensor cores: as the official 1x1 conv (cuDNN) computes them, i.e.
    when ``torch.backends.cudnn.allow_tf32`` is True (PyTorch's default); IEEE fp32 otherwise.
    Never under the interpreter (which has no TF32), nor on ROCm (fp32 MFMA, IEEE).
    ``target``: see :func:`_arch`; ``on_gpu``: whether the launch compiles for a GPU (None: x
    is a CUDA tensor or a target is given)."""
    if on_gpu is None:
        on_gpu = x.is_cuda if target is None else True
    if not (x.dtype == torch.float32 and on_gpu and torch.backends.cudnn.allow_tf32):
        return False
    if target is None and archs.is_rocm():
        return False
    # TF32 needs Ampere or newer (a T4 has none: IEEE fp32 there), and NVIDIA
    return archs.ARCHS[_arch(x, target)].mma not in ("none", "mfma")


def _arch(x: Tensor, target: str | None = None) -> str:
    """The arch the launches for x compile for: ``target`` (a name of ``archs.ARCHS``: the
    compile report builds launches for a GPU that is not there), else x's GPU, else the default
    (Hopper) where no GPU is there (fake CUDA tensors while tracing)."""
    if target is not None:
        return target
    if x.is_cuda and torch.cuda.is_available():
        return archs.device_arch(x.device)
    return archs.DEFAULT


def _acc_tl(dtype: torch.dtype):
    """The kernels' accumulation dtype (``tl``) for state in ``dtype``."""
    tl = kernels.tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _dtypes(x: Tensor, target: str | None) -> dict:
    """Dtype constexprs of the kernels for x, compiled for ``target`` (see :func:`_arch`; None:
    for this process, a GPU unless the interpreter runs them)."""
    tl = kernels.tl
    on_gpu = target is not None or not INTERPRET
    acc = _acc_tl(x.dtype)
    # The interpreter's tl.dot is wrong on bf16 operands: products go through fp32 there.
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16 if on_gpu else tl.float32,
           torch.float32: tl.float32, torch.float64: tl.float64}[x.dtype]
    return dict(ACC=acc, DOT=dot, PRECISION="tf32" if tf32_enabled(x, target, on_gpu) else "ieee",
                EMU_BF16=not on_gpu and x.dtype == torch.bfloat16)


#: Entries the plan cache, the direct-launch cache and the scalar-parameter cache hold at most;
#: the least recently used goes first (a server with varying batch sizes, a training loop with a
#: lam schedule must not grow without bound).
CACHE_ENTRIES = 256


def _new_cache() -> BoundedCache:
    return BoundedCache(CACHE_ENTRIES)


_params_cache = _new_cache()


def params_tensor(temps: list[float], lam: float, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """The kernels' scalar parameters as one (H + 2,) tensor in the accumulation dtype:
    the temperatures (inf = max head), lam and log2(e). Kernel float arguments would be fp32;
    a tensor keeps them exact for fp64 inputs. Cached (bounded), so that repeat calls copy
    nothing from the host; its values never change once made."""
    key = (tuple(temps), float(lam), dtype, str(device))
    t = _params_cache.get(key)
    if t is None:
        t = _params_cache.put(key, torch.tensor([*temps, lam, math.log2(math.e)], dtype=dtype,
                                                device=device))
    return t


# --------------------------------------------------------------------------- launches

def _jit_launch(kernel, grid, args, kw):
    """Every launch goes through here (tests and ``bench --host`` replace it to stub launches
    out). Under tracing (``torch.compile`` or ``torch.export`` through the ``triton_op``, fake
    tensors) the launch is recorded with ``torch.library.wrap_triton``, so that Inductor's
    generated code launches the kernel itself."""
    if tracing(args[0]):
        return torch.library.wrap_triton(kernel)[grid](*args, **kw)
    if INTERPRET:           # Triton's interpreter patches module globals while a kernel runs:
        with _interpreter_lock:       # one kernel at a time (threads calling a head at once)
            return kernel[grid](*args, **kw)
    return kernel[grid](*args, **kw)


_interpreter_lock = threading.Lock()


def tracing(x: Tensor) -> bool:
    """Whether ``x`` is a fake tensor of a trace (nothing runs; no host cache may keep it).
    A plain eager tensor is answered without the (slower) subclass inspection."""
    if type(x) is Tensor:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x)


def _spec(v) -> object:
    """What Triton specialises an argument on: a tensor's 16-byte alignment, an integer's
    being 1, divisible by 16, or beyond int32 (the compiled kernel is valid for equal specs)."""
    if isinstance(v, Tensor):
        return v.data_ptr() % 16 == 0
    if isinstance(v, bool) or not isinstance(v, int):
        return v
    return (v == 1, v % 16 == 0, -(2**31) <= v < 2**31)


_compiled = _new_cache()


def _constexpr_names(kernel) -> tuple:
    """The kernel's constexpr parameters in order (they follow the others in every kernel here)."""
    names = getattr(kernel, "_csra_constexprs", None)
    if names is None:
        flags = [p.is_constexpr for p in kernel.params]
        assert flags == sorted(flags), "constexpr parameters must come last"
        names = kernel._csra_constexprs = tuple(p.name for p in kernel.params if p.is_constexpr)
    return names


class Call(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **constexprs, num_warps=.., num_stages=..)``.
    The compile report (tools/compiled.py) compiles exactly these for a GPU that is not there."""
    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int

    def run(self):
        """Launches (on CUDA with the config's warps and stages; the interpreter takes none)."""
        x = self.args[0]
        if not x.is_cuda:
            return _jit_launch(self.kernel, self.grid, self.args, self.constexprs)
        kw = dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)
        if tracing(x):
            return _jit_launch(self.kernel, self.grid, self.args, kw)
        with torch.cuda.device(x.device):
            if not DIRECT_LAUNCH:
                return _jit_launch(self.kernel, self.grid, self.args, kw)
            key = (self.kernel, x.device.index, self.num_warps, self.num_stages,
                   tuple(self.constexprs.items()), tuple(_spec(a) for a in self.args))
            ck = _compiled.get(key)
            if ck is None:
                return _compiled.put(key, _jit_launch(self.kernel, self.grid, self.args, kw))
            # the compiled kernel's launcher takes every parameter, constexprs included, in
            # the kernel's order
            ck[self.grid](*self.args, *(self.constexprs[n] for n in _constexpr_names(self.kernel)))
            return ck


def pow2_divisor(v: int, cap: int) -> int:
    """The largest power of two dividing ``v``, at most ``cap`` (``cap`` for v == 0)."""
    v = abs(int(v))
    return cap if v == 0 else min(cap, v & -v)


def _tile_kw(x: Tensor, cfg: tuning.Config, H: int, D: int, major: bool,
             target: str | None) -> dict:
    # Alignment (in elements, up to 16 bytes) of x's channel and position strides and of the
    # dS' workspace rows (N): lets the kernels load x and store dS' in vectors (kernels._aligned).
    vec = max(1, 16 // x.element_size())
    return dict(HP=pow2(H), BC=cfg.BC, BN=cfg.BN, BD=cfg.BD,
                CB_MAJOR=major, EVEN_D=D % cfg.BD == 0,
                ONE_TILE=x.shape[2] <= cfg.BN, XA_D=pow2_divisor(x.stride(1), vec),
                XA_N=pow2_divisor(x.stride(2), vec), XA_P=pow2_divisor(x.shape[2], vec),
                **_dtypes(x, target))


def cb_major(H: int, C: int, D: int, itemsize: int) -> bool:
    """Class-block-major launch order for weights beyond ``CB_MAJOR_BYTES`` (see kernels.py)."""
    return H * C * D * itemsize > CB_MAJOR_BYTES


def _grid(B: int, n_cb: int, major: bool) -> tuple:
    """(n_cb, B), or (B, n_cb) in class-block-major order (see kernels.py, "Launch order")."""
    return (B, n_cb) if major else (n_cb, B)


def prep_call(x: Tensor, weight: Tensor, normalize: bool, w_op: Tensor, inv_n: Tensor,
              target: str | None = None, kw: dict | None = None) -> Call:
    """The prep launch; ``kw``: a :class:`Plan`'s constexprs (its ACC and EMU_BF16), if known.
    ``target`` (every builder): the arch to build for (:func:`_arch`), None for this process's
    device."""
    H, C, D = weight.shape
    R = H * C
    d = kw if kw is not None else _dtypes(x, target)
    br, bd = row_tiles(D)
    return Call(kernels.csra_prep_kernel, (cdiv(R, br),),
                (weight, *weight.stride(), w_op, inv_n, R, C, D),
                dict(NORMALIZE=bool(normalize), BR=br, BD=bd,
                     ACC=d["ACC"], EMU_BF16=d["EMU_BF16"]), ROW_WARPS, 2)


def fwd_call(x, w_op, inv_n, params, outs, cfg, H, target: str | None = None,
             kw: dict | None = None, scores: Tensor | None = None) -> Call:
    """The forward launch; ``kw``: its constexprs if already known (a :class:`Plan`'s);
    ``scores`` (H, C, B, N) in the accumulation dtype: where the raw scores go (SAVE_A), if
    given; that launch runs 16 warps where the config has 8 on Hopper (wgmma), where the stores
    spilled at 8 (128 x 256 fp32 accumulators already take 255 registers there)."""
    B, D, N = x.shape
    C = inv_n.shape[-1]
    y, m, l, att, argmax = outs[:5]
    major = cb_major(H, C, D, x.element_size())
    if kw is None:
        kw = _tile_kw(x, cfg, H, D, major, target)
    n_cb = cdiv(C, kw["BC"])
    save = scores is not None and scores.numel() > 0
    warps = cfg.num_warps
    on_gpu = target is not None or not INTERPRET
    if save and warps == 8 and on_gpu and archs.ARCHS[_arch(x, target)].mma == "wgmma":
        warps = 16
    return Call(kernels.csra_fwd_kernel, _grid(B, n_cb, major),
                (x, *x.stride(), w_op, inv_n, params, y, *y.stride(), m, l, att, argmax,
                 scores if save else m, B, H, C, D, N, n_cb), dict(kw, SAVE_A=save),
                warps, cfg.num_stages)


def ds_call(x, w_op, inv_n, params, grad_y, state, c0, c1, out, cfg, H,
            target: str | None = None, kw: dict | None = None) -> Call:
    """The dS launch for classes [c0, c1). ``kw``: the forward's constexprs (a
    :class:`Plan`'s), whose tiles the kernel runs (it recomputes the forward's scores): the
    grid is sized by them too, and ``cfg`` gives only its warps and stages; without ``kw``
    the tiles are ``cfg``'s."""
    B, D, N = x.shape
    C = inv_n.shape[-1]
    m, l, att, argmax = state
    major = cb_major(H, C, D, x.element_size())
    if kw is None:
        kw = _tile_kw(x, cfg, H, D, major, target)
    n_cb = cdiv(c1 - c0, kw["BC"])
    return Call(kernels.csra_ds_kernel, _grid(B, n_cb, major),
                (x, *x.stride(), w_op, inv_n, params, grad_y, *grad_y.stride(),
                 m, l, att, argmax, out, B, H, C, D, N, c0, c1 - c0, n_cb),
                kw, cfg.num_warps, cfg.num_stages)


def ds_kept_call(scores, inv_n, params, grad_y, state, c0, c1, out, H,
                 target: str | None = None) -> Call:
    """dS' for classes [c0, c1) from the forward's raw scores (H, C, B, N): elementwise."""
    _, C, B, N = scores.shape
    m, l, att, argmax = state
    rows = H * (c1 - c0)
    br, bn = ds_kept_tiles(rows, N)
    acc = _acc_tl(scores.dtype)
    emu = target is None and INTERPRET and out.dtype == torch.bfloat16    # the interpreter's
    return Call(kernels.csra_ds_kept_kernel, (cdiv(rows, br), B),
                (scores, inv_n, params, grad_y, *grad_y.stride(), m, l, att, argmax, out,
                 B, H, C, N, c0, c1 - c0),
                dict(BR=br, BN=bn, ACC=acc, EMU_BF16=emu,
                     XA_P=pow2_divisor(N, max(1, 16 // scores.element_size()))),
                DS_KEPT_WARPS, 1)


@functools.lru_cache(maxsize=CACHE_ENTRIES)
def ds_kept_tiles(rows: int, N: int) -> tuple[int, int]:
    """(rows, positions) per program of the elementwise dS' kernel for a chunk of ``rows``."""
    bn = min(DS_KEPT_COLS, pow2(max(N, 16)))
    return min(pow2(rows), max(1, DS_KEPT_ELEMS // bn)), bn


def proj_call(G: Tensor, weight: Tensor, inv_n: Tensor, out: Tensor, normalize: bool) -> Call:
    """The weight gradient from G (H*C, D) into ``out`` (H*C, D) in the weight's dtype."""
    H, C, D = weight.shape
    R = H * C
    acc = _acc_tl(inv_n.dtype)
    br, bd = row_tiles(D)
    return Call(kernels.csra_proj_kernel, (cdiv(R, br),),
                (G, weight, *weight.stride(), inv_n, out, R, C, D),
                dict(NORMALIZE=bool(normalize), BR=br, BD=bd, ONE_PASS=D <= bd, ACC=acc),
                ROW_WARPS, 2)


@functools.lru_cache(maxsize=CACHE_ENTRIES)
def row_tiles(D: int) -> tuple[int, int]:
    """(rows, channels) per program of the weight-row kernels (prep, proj): whole rows when d
    fits ``ROW_ELEMS`` (one load round trip per program, rows over many programs: 160 programs
    of 2 rows at the headline), else 8 rows walked in steps of 256 channels."""
    bd = pow2(max(D, 16))
    if bd <= ROW_ELEMS:
        return max(1, ROW_ELEMS // bd), bd
    return 8, 256


def ds_chunk_classes(H: int, C: int, B: int, N: int, bc: int) -> int:
    """Classes per backward workspace chunk: about DS_WORKSPACE_ELEMS / (H*B*N), in whole class
    tiles (``bc`` classes) of the kernels, so that the backward recomputes the forward's tiles."""
    per_class = max(1, H * B * N)
    return min(C, max(bc, DS_WORKSPACE_ELEMS // per_class // bc * bc))


# --------------------------------------------------------------------------- the prepared weight


def prep_weight(x: Tensor, weight: Tensor, normalize: bool, inv_n: Tensor | None = None,
                alloc=new) -> tuple[Tensor, Tensor]:
    """(w_op (H*C, D) in x's dtype, inv_n (H, C)): the weight rounded to the operand dtype and
    its inverse row norms (one launch; ``inv_n`` is written in place if given)."""
    H, C, D = weight.shape
    w_op = alloc((H * C, D), x.dtype, x.device)
    if inv_n is None:
        inv_n = alloc((H, C), acc_dtype(x.dtype), x.device)
    prep_call(x, weight, normalize, w_op, inv_n).run()
    return w_op, inv_n


def keeps_weight(x: Tensor, weight: Tensor) -> bool:
    """Whether a training forward hands its prepared weight to the backward (its 7th output):
    up to ``KEEP_WEIGHT_BYTES``."""
    return weight.numel() * x.element_size() <= KEEP_WEIGHT_BYTES


def keeps_scores(x: Tensor, H: int, C: int, target: str | None = None) -> bool:
    """Whether a training forward writes its raw scores (H, C, B, N), in the accumulation
    dtype, for the backward (its 8th output), which then computes dS' elementwise instead of
    recomputing the scores' GEMM: when they have no more elements than x (H*C <= D, the
    fallback's rule), so that what the op keeps is bounded by x's size, never by classes x
    positions (16 MB at the coco headline; never at 9,605 classes), and fewer than 2^31 (the
    kernel's offsets are int32); not on Blackwell yet (see below). ``KEEP_SCORES`` (env
    ``CSRA_TRITON_KEEP_SCORES=0``) turns it off."""
    B, D, N = x.shape
    if not (KEEP_SCORES and H * C <= D and H * C * B * N < 2 ** 31):     # int32 offsets
        return False
    # Blackwell (tcgen05): the storing forward spills 8 B under triton 3.6 with 8 warps and
    # leaves tcgen05 with 16; it recomputes there until that is solved (bench/NOTES.md)
    return not (x.is_cuda or target) or archs.ARCHS[_arch(x, target)].mma != "tcgen05"


# --------------------------------------------------------------------------- configs and tuning


def fwd_bench(x: Tensor, weight: Tensor, params: Tensor, outs: tuple):
    """cfg -> median ms of one forward launch with that config (for tuning), after checking its
    output once against float64 and its compiled form for spills."""
    H, C, _ = weight.shape
    w_op, inv_n = prep_weight(x, weight, True, outs[5])
    ref = tuning.y_reference(x, w_op.view(H, C, -1), inv_n, params)

    def check():
        err = rel_err(outs[0], ref)
        return err if err > tuning.TUNE_TOL[x.dtype] else None

    return tuning.checked_timer(
        lambda cfg: fwd_call(x, w_op, inv_n, params, outs, cfg, H).run(), check)


def ds_bench(x, w_op, inv_n, params, grad_y, state, chunk: int, ws: Tensor):
    """cfg -> median ms of the dS kernel on the first class chunk (for tuning), after checking
    its output once against the default config's and its compiled form for spills."""
    B, _, N = x.shape
    H, C = inv_n.shape
    c1 = min(C, chunk)
    out = ws[: H * c1 * B * N].view(H, c1, B, N)
    launch = lambda cfg: ds_call(x, w_op, inv_n, params, grad_y, state, 0, c1, out, cfg, H).run()
    ref = None

    def check():
        nonlocal ref
        if ref is None:   # the first candidate is the default config (config_space's order)
            ref = out.double().clone()
            return None
        err = rel_err(out, ref)
        return err if err > tuning.TUNE_TOL[x.dtype] else None

    return tuning.checked_timer(launch, check)


def fwd_config(x: Tensor, H: int, C: int, D: int, N: int, tune: bool = True) -> tuning.Config:
    """The forward's launch config (tiles shared with the backward); tunes if asked to
    (``tune``: whether it may: never for a traced x)."""
    return tuning.choose("fwd", H, C, D, N, x,
                         functools.partial(_fwd_tuning_bench, x, H, C, D) if tune else None,
                         source=kernel_source("fwd"))


def _fwd_tuning_bench(x: Tensor, H: int, C: int, D: int):
    """:func:`fwd_bench` on a random weight (the timer autotuning sweeps the forward with)."""
    w = torch.randn(H, C, D, device=x.device)
    params = params_tensor([1.0] * H, 0.1, acc_dtype(x.dtype), x.device)
    return fwd_bench(x, w, params, fwd_outputs(x, H, C, empty))


def ds_config(x: Tensor, H: int, C: int, D: int, N: int, fwd: tuning.Config,
              bench=None) -> tuning.Config:
    """The dS kernel's config: the forward's tiles; ``bench()`` makes the timer if tuning."""
    return tuning.choose("ds", H, C, D, N, x, bench, tiles=fwd.tiles(),
                         source=kernel_source("ds"))


def kernel_source(kernel: str) -> str | None:
    """The source hash of the kernel behind tuning's ``kernel`` ("fwd", "ds"), which keys the
    compile report's cache; None under the interpreter (nothing is compiled)."""
    from . import kernels as k

    if kernel not in tuning.KERNELS:
        raise ValueError(f"kernel must be one of {tuning.KERNELS}, got {kernel!r}")
    fn = k.csra_ds_kernel if kernel == "ds" else k.csra_fwd_kernel
    return getattr(fn, "cache_key", None)


# --------------------------------------------------------------------------- plans


class Plan(NamedTuple):
    """What the host computes once per problem: the forward's config, the kernels' scalar
    parameters (None where only ``Scalars.values`` is known: :func:`params_of` makes them on
    the device) and the main kernels' constexprs (tiles, dtypes, alignment, launch order)."""
    cfg: tuning.Config
    params: Tensor | None
    kw: dict


_plans = _new_cache()


def plan_for(x: Tensor, weight: Tensor, scalars: Scalars) -> Plan:
    """The plan for x (B, D, N) and weight (H, C, D) with these scalars, built once per
    problem and host values (a learnable lam's slot is filled per call: :func:`params_of`);
    under tracing built anew and not kept (its parameters are made on the device: a host
    tensor would become a constant of the graph, copied to the device on every call)."""
    B, D, N = x.shape
    H, C, _ = weight.shape
    temps, lam = scalars.temps, scalars.lam
    if lam.__class__ is not float:      # a learnable lam (filled per call), or only values known
        lam = 0.0
    traced = tracing(x)
    if not traced:
        key = (x.shape, x.stride(), x.dtype, x.device, weight.shape, temps, lam,
               tf32_enabled(x))           # (torch.Size hashes as the tuple it is)
        p = _plans.get(key)
        if p is not None:
            if p.params is not None:
                hold_if_capturing(p.params)
            return p
    cfg = fwd_config(x, H, C, D, N, tune=not traced and not INTERPRET)
    kw = _tile_kw(x, cfg, H, D, cb_major(H, C, D, x.element_size()), None)
    acc = acc_dtype(x.dtype)
    if temps is None:
        params = None
    elif traced:
        params = traced_tensor((*temps, lam, math.log2(math.e)), acc, x.device)
    else:
        params = params_tensor(temps, lam, acc, x.device)
    if traced:
        return Plan(cfg, params, kw)
    p = _plans.put(key, Plan(cfg, params, kw))
    if p.params is not None:
        hold_if_capturing(p.params)
    return p


# --------------------------------------------------------------------------- entry points


def params_of(p: Plan, scalars: Scalars, x: Tensor) -> Tensor:
    """The kernels' scalar parameters for this call on x: the plan's, with a learnable lam's
    value put in, or made from ``scalars.values`` where only those are known; both on the
    device (a small device op per call, nothing read on the host)."""
    if p.params is None:
        acc = acc_dtype(x.dtype)
        values = scalars.values
        return torch.cat((values.to(acc), traced_tensor((math.log2(math.e),), acc,
                                                        values.device)))
    lam = scalars.lam
    if not isinstance(lam, Tensor):
        return p.params
    H = p.params.shape[0] - 2
    return torch.cat((p.params[:H], lam.detach().reshape(1).to(p.params.dtype),
                      p.params[H + 1:]))


#: triton_op route on CUDA tensors (interface.Implementation): Inductor traces the launches.
triton_op = True


def serves(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA tensors (bf16 only where Triton multiplies it: not on Turing, where the fallback
    runs on the GPU, with a warning once), and CPU tensors under the interpreter."""
    if device.type == "cuda":
        return not (dtype == torch.bfloat16 and not INTERPRET and torch.cuda.is_available()
                    and archs.lacks_bf16(device))
    return device.type == "cpu" and INTERPRET


def kept_output(x: Tensor, weight: Tensor, keep: bool, alloc=new) -> Tensor:
    """The forward's ``kept`` output: the prepared weight (H*C, D) in x's dtype when ``keep``
    and it is small (:func:`keeps_weight`), else (0,)."""
    if keep and keeps_weight(x, weight):
        H, C, D = weight.shape
        return alloc((H * C, D), x.dtype, x.device)
    return alloc((0,), x.dtype, x.device)


def forward(x: Tensor, weight: Tensor, scalars: Scalars, normalize: bool, keep: bool,
            y_dtype: torch.dtype | None = None, packed: bool = False) -> Forward:
    """y and the state (``interface.Forward``): two launches (prep, fwd; for B = 0 the prep
    alone), the weight prepared from its current values. ``kept`` is the prepared weight when
    ``keep`` and it is small (:func:`keeps_weight`), else (0,); ``scores`` the raw scores when
    ``keep`` and :func:`keeps_scores`, else (0,). ``y_dtype``: y's dtype if not x's (the kernel
    rounds its fp32 sum to it once).

    ``packed`` (the eager route): m, l, att, argmax and the inverse norms are views of one
    allocation (3 allocations a call instead of 10), what is not kept is None, and ``plan`` is
    the launch plan (the eager backward's: one plan lookup per forward+backward; None for
    B = 0, whose backward launches nothing). The ops' calls allocate each output apart (a
    custom op returns no aliased outputs); the launches and their results are the same."""
    B, D, N = x.shape
    H, C, _ = weight.shape
    acc = acc_dtype(x.dtype)
    # B = 0: y and the state are empty and only the weight is prepared; no plan (nothing to
    # tune: a sweep of empty launches would time launch overhead alone)
    p = plan_for(x, weight, scalars) if B != 0 else None
    y = new((B, C), y_dtype or x.dtype, x.device)
    if packed:
        if acc == torch.float32:          # argmax: an int32 view of fp32 rows
            buf = new((4 * B + 1, H, C), acc, x.device)
            m, l, att, argmax, inv_n = buf.split_with_sizes((B, B, B, B, 1))  # (a C call)
            argmax = argmax.view(torch.int32)
        else:                             # (fp64 rows: an int32 view would double C)
            buf = new((3 * B + 1, H, C), acc, x.device)
            m, l, att, inv_n = buf.split_with_sizes((B, B, B, 1))
            argmax = new((B, H, C), torch.int32, x.device)
        inv_n = inv_n.view(H, C)
        scores = new((H, C, B, N), acc, x.device) if keep and keeps_scores(x, H, C) else None
    else:
        m, l, att = (new((B, H, C), acc, x.device) for _ in range(3))
        argmax = new((B, H, C), torch.int32, x.device)
        inv_n = new((H, C), acc, x.device)
        scores = scores_output(x, weight, keep)
    w_op = new((H * C, D), x.dtype, x.device)
    prep_call(x, weight, normalize, w_op, inv_n, kw=p.kw if p is not None else None).run()
    if p is not None:
        fwd_call(x, w_op, inv_n, params_of(p, scalars, x), (y, m, l, att, argmax), p.cfg, H,
                 kw=p.kw, scores=scores).run()
    if keep and keeps_weight(x, weight):
        kept = w_op
    else:
        kept = None if packed else new((0,), x.dtype, x.device)
    if not (keep or packed):
        inv_n = new((0,), acc, x.device)
    return Forward(y, ForwardState(m, l, att, argmax, inv_n, kept, scores),
                   p if packed else None)


def scores_output(x: Tensor, weight: Tensor, keep: bool, alloc=new) -> Tensor:
    """The forward's ``scores`` output: the raw scores (H, C, B, N) in the accumulation dtype
    when ``keep`` and :func:`keeps_scores`, else (0,) in that dtype."""
    B, _, N = x.shape
    H, C, _ = weight.shape
    if keep and keeps_scores(x, H, C):
        return alloc((H, C, B, N), acc_dtype(x.dtype), x.device)
    return alloc((0,), acc_dtype(x.dtype), x.device)


class Backward:
    """The Triton side of the op's backward loop (see ops.backward_loop): dS' of a class chunk
    from the kernels, the GEMMs in x's dtype, the weight gradient in one projection launch."""

    #: the product G = dS' x^T of the backward loop
    mm = staticmethod(mm_plain)

    def __init__(self, grad_y, x, weight, state: ForwardState, scalars: Scalars, normalize,
                 plan: Plan | None = None):
        B, D, N = x.shape
        H, C, _ = weight.shape
        self.x, self.weight, self.grad_y = x, weight, grad_y
        self.state = state[:4]
        scores, kept = state.scores, state.kept
        self.scores = scores if scores is not None and scores.numel() else None
        self.normalize, self.H = normalize, H
        # the forward's plan where the caller has it (the eager route), else looked up again
        if plan is not None:
            p = plan
            hold_if_capturing(p.params)      # a captured backward reads it at every replay
        else:
            p = plan_for(x, weight, scalars)
        self.params, fwd_cfg, self.kw = params_of(p, scalars, x), p.cfg, p.kw
        self.gemm = self.dx_dtype = x.dtype
        self.chunk = ds_chunk_classes(H, C, B, N, fwd_cfg.BC)
        if kept is not None and kept.numel():    # the forward's prepared weight, bit for bit
            self.w_op, self.inv_n = kept, state.inv_norm
        else:
            self.w_op, self.inv_n = prep_weight(x, weight, normalize)
        self.w_gemm = self.w_op.view(H, C, D)
        # x as the (D, B*N) matrix of the GEMMs: a view for channels-innermost x, one copy of
        # contiguous position runs for NCHW
        self.x_dk = x_matrix(x, self.gemm)
        self.ws = new((H * self.chunk * B * N,), self.gemm, x.device)
        w_op, inv_n, params, ws, chunk = self.w_op, self.inv_n, self.params, self.ws, self.chunk
        if self.scores is not None:     # dS' elementwise from the kept scores: no config
            return
        st = self.state
        self.cfg = ds_config(x, H, C, D, N, fwd_cfg, None if tracing(x) else lambda: ds_bench(
            x, w_op, inv_n, params, grad_y, st, chunk, ws))

    def ds(self, c0: int, c1: int, out: Tensor) -> None:
        if self.scores is not None:
            ds_kept_call(self.scores, self.inv_n, self.params, self.grad_y, self.state, c0, c1,
                         out, self.H).run()
            return
        ds_call(self.x, self.w_op, self.inv_n, self.params, self.grad_y, self.state, c0, c1,
                out, self.cfg, self.H, kw=self.kw).run()

    def new_weight_grad(self, G: Tensor) -> Tensor:
        return new(self.weight.shape, self.weight.dtype, self.weight.device)

    def chunk_done(self, G: Tensor, dW: Tensor, c0: int, c1: int) -> None:
        pass

    def finish(self, G: Tensor, dW: Tensor) -> Tensor:
        """dW through the row normalisation in one launch over every class."""
        proj_call(G.view(-1, G.shape[-1]), self.weight, self.inv_n, dW, self.normalize).run()
        return dW


@contextlib.contextmanager
def stub_launches(counter: list | None = None):
    """Inside the block no kernel runs: each launch appends (kernel name, grid) to ``counter``
    instead (``bench --host`` and the launch-count tests: the GPU path's host work alone)."""
    global _jit_launch
    old = _jit_launch

    def fake(kernel, grid, args, kw):
        if counter is not None:
            counter.append((getattr(kernel, "fn", kernel).__name__, grid))
        return None

    _jit_launch = fake
    try:
        yield counter
    finally:
        _jit_launch = old
