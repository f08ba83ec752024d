"""Plain helpers shared by the two implementations and the op layer (the helpers layer of
docs/architecture.md).

Nothing here launches a kernel or imports another module of the package but ``settings``: dtype
rules, the temperature and lam checks, the error measure, the (optionally poisoned) allocator and
the forward's output buffers, the bounded caches and what holds a tensor a captured CUDA graph
reads, the layouts of x.
"""
from __future__ import annotations

import collections
import functools
import math
import numbers
import threading
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .settings import ENV

#: Tests set this: every output and workspace is filled with NaN (ints: -2**31 + 1) on
#: allocation, so that an element a kernel forgets to write fails the comparison
#: (``CSRA_TRITON_POISON``).
POISON = ENV.poison


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / state dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def onednn_fp32() -> bool:
    """Whether fp32 CPU products go through oneDNN's matmul (:func:`mm`): where mkldnn is built
    and its linear op gives a @ b on a small check. ``CSRA_TRITON_ONEDNN_FP32=0`` turns it off."""
    if not ENV.onednn_fp32:
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        a = torch.arange(15.0).view(3, 5) / 7
        b = torch.arange(20.0).view(5, 4) / 3
        r = torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
        return bool(torch.allclose(r, a @ b, rtol=1e-5, atol=1e-5))
    except Exception:       # no such op in this build: torch.mm
        return False


def mm(a: Tensor, b: Tensor, out: Tensor | None = None, buf: Tensor | None = None) -> Tensor:
    """``a @ b`` (into ``out`` if given). fp32 products on CPU go through oneDNN's matmul
    (``mkldnn._linear_pointwise``, the op Inductor's CPU GEMMs call), faster than ``aten::mm``'s
    fp32 GEMM on AVX512 CPUs and level with it on bf16, so bf16 stays with ``torch.mm``
    (bench/NOTES.md has the measurements). A transposed ``a`` is copied row-major first, into
    ``buf`` (flat, at least a's size) if given: oneDNN is slower on it as a strided operand.
    Not under autograd (the op has no derivative formula)."""
    if (a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu"
            and onednn_fp32()
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))):
        if not a.is_contiguous():
            a = (buf[:a.numel()].view(a.shape).copy_(a)
                 if buf is not None and buf.numel() >= a.numel() else a.contiguous())
        r = torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
        return r if out is None else out.copy_(r)
    return mm_plain(a, b, out)


def mm_plain(a: Tensor, b: Tensor, out: Tensor | None = None, buf: Tensor | None = None) -> Tensor:
    """``torch.mm`` with :func:`mm`'s signature (``buf`` unused)."""
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty`` with the allocator signature of :func:`new` (never poisoned)."""
    return torch.empty(shape, dtype=dtype, device=device)


def new(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty``, filled with NaN (ints: -2**31 + 1) when :data:`POISON` is set."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(-(2**31) + 1 if dtype == torch.int32 else math.nan)
    return t


def fwd_outputs(x: Tensor, H: int, C: int, alloc=new, keep: bool = True,
                y_dtype: torch.dtype | None = None) -> tuple:
    """The forward's outputs: y (B, C) in ``y_dtype`` (default x's dtype); m, l, att (B, H, C)
    in the accumulation dtype; argmax (B, H, C) int32; inv_norm (H, C) in the accumulation
    dtype, or (0,) when the caller keeps nothing for a backward (``keep=False``: inference)."""
    B, acc = x.shape[0], acc_dtype(x.dtype)
    return (alloc((B, C), y_dtype or x.dtype, x.device),
            *(alloc((B, H, C), acc, x.device) for _ in range(3)),
            alloc((B, H, C), torch.int32, x.device),
            alloc((H, C) if keep else (0,), acc, x.device))


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has a non-finite value."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    den = ref.norm().item()
    return (out - ref).norm().item() / den if den else (out - ref).norm().item()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int) -> int:
    """The next power of two of ``n`` (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


# --------------------------------------------------------------------------- bounded caches


class BoundedCache:
    """A dict of at most ``maxsize`` entries, the least recently used dropped first, safe when
    several threads read and write it at once (one lock around every access). What the package
    keeps between calls lives in these: launch plans, scalar-parameter tensors, compiled-kernel
    handles, tuned configs, all keyed on what the caller passes (shapes, strides, dtypes,
    device, scalars), never on a tensor's values, version counter, address or id."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._d: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            try:
                self._d.move_to_end(key)
            except KeyError:
                return default
            return self._d[key]

    def put(self, key, value):
        """Stores ``value`` (the first one stored wins if another thread raced ahead: every
        caller then uses the same object); returns the stored value."""
        with self._lock:
            old = self._d.get(key)
            if old is not None:
                self._d.move_to_end(key)
                return old
            self._store(key, value)
            return value

    def set(self, key, value) -> None:
        """Stores ``value``, replacing what ``key`` held."""
        with self._lock:
            self._store(key, value)

    def _store(self, key, value) -> None:       # (under the lock)
        # evict before inserting a new key, so that the bound holds at every instant (a reader
        # of len() between an insert and its eviction saw maxsize + 1 under threads)
        if key not in self._d:
            if self.maxsize <= 0:
                return
            while len(self._d) >= self.maxsize:
                self._d.popitem(last=False)
        self._d[key] = value
        self._d.move_to_end(key)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)


#: Tensors a captured CUDA graph reads by address (the kernels' scalar parameters): kept for the
#: process's life, one per distinct tensor captured (as many as the user captured).
_captured: dict = {}
_captured_lock = threading.Lock()


def hold_if_capturing(t: Tensor) -> None:
    """Under CUDA-graph capture, the graph will read ``t`` by address at every replay: it must
    outlive any cache eviction, so it is held for good (:data:`_captured`)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        with _captured_lock:
            _captured[id(t)] = t


# --------------------------------------------------------------------------- lam and temperatures


class Scalars(NamedTuple):
    """The temperatures and lam of one call: the package's one value of them, validated
    (:func:`scalars`).

    ``temps``: one per head, each > 0; ``inf`` is a max head (the official flag 99 becomes inf
    at the public entry points). ``lam``: a finite number, or a one-element floating tensor (a
    learnable lam, which gets a gradient). ``values``: the same numbers as the (H + 1,) float64
    tensor ``[T_1, ..., T_H, lam]`` on the call's device, the form the ops take
    (``ops.op_values`` makes it, ``ops.from_values`` reads it), where the caller has it
    already: a compiled module passes its values as a graph input and reads no Python float
    (a float would be a guarded constant of the graph: every new lam would recompile), so
    ``temps`` and a number ``lam`` are then None, "known on the device only"."""
    temps: tuple | None
    lam: "float | Tensor | None"
    values: Tensor | None = None


def _is_sym(v) -> bool:
    """A symbolic number (``torch.SymFloat``: a traced float; under torch.compile Dynamo shows
    it as a ``float`` that is not read on the host, which the checks below respect too)."""
    return isinstance(v, (torch.SymFloat, torch.SymInt))


def _number(v):
    """``v`` as a float, without reading a symbolic one (``float()`` would specialise it)."""
    return v if type(v) is float or _is_sym(v) else float(v)


def check_temperatures(temperatures, heads: int) -> tuple:
    """Validated temperatures, one per head, each > 0, in the package's one encoding: a max
    head is inf (the official flag 99 becomes inf here, at the public boundary). Raises
    TypeError / ValueError naming ``temperatures``."""
    if isinstance(temperatures, (str, bytes)) or isinstance(temperatures, Tensor) and \
            temperatures.dim() != 1:
        raise TypeError(f"temperatures: expected a sequence of {heads} numbers, "
                        f"got {type(temperatures).__name__}")
    try:
        items = list(temperatures)
    except TypeError:
        raise TypeError(f"temperatures: expected a sequence of {heads} numbers, "
                        f"got {temperatures!r}") from None
    temps = []
    for t in items:
        if isinstance(t, Tensor) and t.dim() == 0 and t.is_floating_point() or _is_sym(t) or \
                isinstance(t, numbers.Real) and not isinstance(t, (bool, np.bool_)):
            temps.append(_number(t))
        else:
            raise TypeError(f"temperatures: expected a sequence of {heads} numbers, got an "
                            f"element {t!r} ({type(t).__name__})")
    if len(temps) != heads:
        raise ValueError(f"temperatures: expected one per head ({heads}), got {len(temps)}: {temps}")
    for t in temps:
        if not t > 0:           # (NaN too; a symbolic one is guarded, not read)
            raise ValueError(f"temperatures: each must be > 0 (inf or 99 for a max head), got {t}")
    return tuple(math.inf if t == 99 else t for t in temps)


def check_lam(lam, device: torch.device | None = None):
    """A validated lam: a finite Python number (returned as float), or a one-element floating
    tensor on ``device`` (returned as it is: a learnable lam; its values are not read on the
    host, which would synchronise a GPU). Raises TypeError / ValueError naming ``lam``."""
    if isinstance(lam, Tensor):
        if not lam.is_floating_point() or lam.numel() != 1:
            raise TypeError(f"lam: expected a Python number or a one-element floating tensor, "
                            f"got a {lam.dtype} tensor of shape {tuple(lam.shape)}")
        if device is not None and lam.device != device:
            raise ValueError(f"lam: expected a tensor on {device} (x's device), got {lam.device}")
        return lam
    if isinstance(lam, (bool, np.bool_)) or not (isinstance(lam, numbers.Real) or _is_sym(lam)):
        raise TypeError(f"lam: expected a Python number (or a one-element tensor), "
                        f"got {type(lam).__name__}")
    if not lam - lam == 0:      # inf and NaN (symbolic numbers: guarded, not read)
        raise ValueError(f"lam: expected a finite number, got {lam}")
    return _number(lam)


def check_normalize(normalize) -> bool:
    """A validated ``normalize``: a bool (NumPy's too, and the integers 0 and 1). Raises
    TypeError naming ``normalize``: ``bool("no")`` is True, so strings, None and other objects
    are refused rather than read as truthy."""
    if isinstance(normalize, (bool, np.bool_)) or \
            isinstance(normalize, numbers.Integral) and normalize in (0, 1):
        return bool(normalize)
    raise TypeError(f"normalize: expected a bool, got {normalize!r} ({type(normalize).__name__})")


def traced_tensor(numbers, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``numbers`` (Python or symbolic) as a 1-D tensor made on ``device`` by fills, for a
    traced graph: no host tensor is lifted into it (a constant that Inductor would copy from
    the host on every call, which also keeps CUDA graphs from capturing it), and a symbolic
    number stays a graph input (``torch.full`` would specialise it)."""
    return torch.stack([torch.scalar_tensor(v, dtype=dtype, device=device) for v in numbers])


def host_values(s: Scalars) -> tuple:
    """(temps, lam) of ``s`` on the host: as given, or read from ``s.values`` (a device read,
    where those live on a GPU)."""
    if s.temps is not None:
        return s.temps, s.lam
    vals = s.values.detach().tolist()
    return tuple(vals[:-1]), vals[-1]


def scalars(temperatures, lam, heads: int, device: torch.device | None = None) -> Scalars:
    """The validated :class:`Scalars` of a call's ``temperatures`` and ``lam`` (see
    :func:`check_temperatures`, :func:`check_lam`)."""
    return Scalars(check_temperatures(temperatures, heads), check_lam(lam, device))


# --------------------------------------------------------------------------- backward layout


def channels_inner(x: Tensor) -> bool:
    """x (B, D, N) with channels innermost (channels_last, tokens): dx is computed (B*N, D)."""
    return x.stride(1) == 1 and x.shape[1] > 1


def as_bdn(x: Tensor, layout: str) -> Tensor:
    """x as the ops' (B, D, N) view: ``"nchw"`` (B, D, h, w) flattened, ``"tokens"`` (B, N, D)
    transposed, ``"bdn"`` as it is (a copy only where an NCHW x's h and w cannot merge)."""
    if layout == "nchw":
        return x.flatten(2)
    if layout == "tokens":
        return x.transpose(1, 2)
    return x


def from_bdn(g: Tensor, layout: str, shape) -> Tensor:
    """A (B, D, N) gradient in the layout ``as_bdn`` read x in (``shape``: x's)."""
    if layout == "nchw":
        return g.reshape(shape)
    if layout == "tokens":
        return g.transpose(1, 2)
    return g


def dx_view(dx: Tensor, B: int, D: int, N: int, inner: bool) -> Tensor:
    """The (B, D, N) view of the backward's dx buffer, (B*N, D) or (D, B*N) (no copy)."""
    if inner:
        return dx.view(B, N, D).transpose(1, 2)
    return dx.view(D, B, N).permute(1, 0, 2)


def x_matrix(x, dtype):
    """x (B, D, N) as the (D, B*N) matrix of the GEMMs, in ``dtype``: one copy at most (none when
    x is in ``dtype`` and B == 1 or its channels are innermost)."""
    B, D, N = x.shape
    xt = x.permute(1, 0, 2)
    if B == 1 or N == 1 or x.stride(0) == N * x.stride(2):   # batch and positions merge
        return xt.reshape(D, B * N).to(dtype)     # a view: B == 1, or tokens / channels_last
    out = torch.empty((D, B, N), dtype=dtype, device=x.device)   # NCHW: one copy
    return out.copy_(xt).view(D, B * N)
