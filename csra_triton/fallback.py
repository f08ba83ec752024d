"""The PyTorch implementation (the implementations layer, beside ``triton_impl``): vectorised
versions of the kernels in ``kernels.py``, for CPU tensors without Triton's interpreter, or under
``use_backend("torch")``.

Same inputs, outputs and state as the Triton kernels, so the op layer treats both alike. Classes
go in chunks of about ``CHUNK_ELEMS`` scores (H, chunk, B, N), so memory stays bounded at 9,605
classes and each chunk's elementwise passes stay in cache. Operands are rounded to x.dtype as the
kernels round them; the statistics are computed in fp32 (fp64 for fp64 inputs).

The products follow what the CPU does fast (:func:`gemm_dtype`). Where it multiplies bf16 in
hardware (AVX512-BF16, AMX, Arm BF16; the official head's bf16 1x1 convs are fast there too),
bf16 x runs bf16 GEMMs (faster than fp32 ones there); elsewhere the products run in fp32. A
bf16 GEMM accumulates in fp32 but rounds its output to bf16 (no CPU operator returns the fp32
sum), i.e. up to 2^-8 |s| in every score. Two GEMMs recover the sum to ~2^-17 |s|: ``hi = W x``
(rounded), then ``lo = addmm(hi, W, x, beta=-1)`` = W x - hi, where oneDNN adds ``-hi`` to the
fp32 accumulator before rounding, so only the small ``lo`` is rounded (:func:`products`).

The forward uses ``hi`` alone (``FWD_REFINE``): y moves by about one bf16 rounding of the
output, and one GEMM instead of two is what makes it faster than the official head. The
backward recomputes its softmax statistics
from ``hi + lo`` (:func:`ds_chunk`) for the softmax heads; a max head's scores serve only its
argmax, which ``hi`` alone gives up to near-ties (within one bf16 rounding), and those are
settled in float64 (:func:`exact_first_max`): its gradients are those of the fp32 sum, as the
GPU kernels', where rounded scores flip maxima (as the official eager head's do). When the
products have no more elements
than x, or at most ``KEEP_RATIO`` (64) times its elements, the forward hands them to the
backward (:func:`keeps_scores`), which then skips a GEMM.

The op layer reaches it through ``interface.Implementation`` (``forward``, ``Backward``,
``kept_output``, ``scores_output``, ``serves``, ``triton_op``); bench/NOTES.md has the
measurements behind the choices below.
"""
from __future__ import annotations

import functools
import math
import platform

import torch

from .common import acc_dtype, fwd_outputs, host_values, mm, new, x_matrix
from .interface import Forward, ForwardState
from .settings import ENV

LN2 = math.log(2.0)

#: ``None`` follows the CPU (:func:`native_bf16`); True/False force bf16/fp32 GEMMs for bf16 x
#: (the tests run both). ``CSRA_TRITON_CPU_BF16_GEMM`` (auto, 0 or 1) sets it at import.
BF16_GEMM: bool | None = ENV.cpu_bf16_gemm
#: Scores per class chunk (elements of fp32): the chunk's elementwise passes stay in cache.
CHUNK_ELEMS = 1 << 20
#: Weight elements per block of the passes over weight rows (inverse norms, the weight gradient's
#: projection): fp32 blocks of 1 MB, the fastest of the sizes tried (larger ones pay page faults
#: for their fresh buffers).
ROW_BLOCK_ELEMS = 1 << 18
#: Whether the forward's bf16 scores get the second (``lo``) GEMM; see the module docstring.
FWD_REFINE = False
#: How many times x's elements of score products a training forward may keep for its backward
#: (:func:`keeps_scores`: H*C <= KEEP_RATIO * D). Recomputing them is the backward's costliest
#: step at 9,605 classes: 5 GEMMs against the official head's 3; kept, 4. 64 covers 9,605
#: classes x 4 heads at d=2048 (18.8) and x 1 head at d=1024 (9.4). The rule is on static sizes (H, C, D), never on the batch, so a compiled graph's
#: fake outputs agree with the real ones at any batch (unbacked included). What is kept is the
#: size of the official head's convolution outputs (H*C*B*N in x's dtype; twice that where bf16
#: x runs fp32 GEMMs), less than that head keeps in all, and a fraction of what the backbone
#: that made x keeps for its own backward.
#: ``CSRA_TRITON_CPU_KEEP_RATIO`` sets it (1: only when no larger than x; 0: never).

KEEP_RATIO = ENV.cpu_keep_ratio


class Work:
    """Scratch buffers that a call's class chunks (and weight-row blocks) reuse, by name.

    Every pass that returned a fresh chunk-sized tensor paid a page fault per 4 KB of it, many
    times the pass itself into a buffer already touched: at 9,605 classes that made the
    elementwise passes, not the GEMMs, most of the time. A buffer is allocated once per call at
    its largest size; a request for fewer elements gets a view of its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bufs: dict = {}

    def get(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16, AMX, Arm BF16). Without it
    oneDNN emulates bf16 and fp32 GEMMs are the faster ones."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_description() -> str:
    """The CPU facts the fallback's choices follow, for benchmark output."""
    return (f"{platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16 {'yes' if native_bf16() else 'no'}, {torch.get_num_threads()} threads")


def gemm_dtype(x_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of the fallback's GEMM operands for x of ``x_dtype`` on ``device``: bf16 for bf16 x on
    a CPU that multiplies bf16 in hardware (or as ``BF16_GEMM`` forces), else fp32 (fp64 for
    fp64 x)."""
    acc = acc_dtype(x_dtype)
    if x_dtype != torch.bfloat16 or device.type != "cpu":
        return acc
    fast = native_bf16() if BF16_GEMM is None else BF16_GEMM
    return torch.bfloat16 if fast else acc


def head_mm(w3, x2, out, add=None, beta=1.0):
    """out (H, Cc, M) = w3 (H, Cc, D) @ x2 (D, M) [+ beta * add], returned. One GEMM when the
    chunk's rows are contiguous (all classes), else one per head: a chunk of classes of every
    head is not a matrix, and reshaping it would copy the weight chunk."""
    H, Cc, D = w3.shape
    if torch.is_grad_enabled() and (w3.requires_grad or x2.requires_grad):   # maps: autograd
        w2 = w3.reshape(H * Cc, D)      # (mm's rows are independent; bmm's were not at Cc < 16)
        res = torch.mm(w2, x2) if add is None else torch.addmm(add.reshape(H * Cc, -1), w2, x2,
                                                                beta=beta)
        return res.view(H, Cc, -1)
    if w3.is_contiguous() and out.is_contiguous() and (add is None or add.is_contiguous()):
        w3, out2 = w3.view(1, H * Cc, D), out.view(1, H * Cc, -1)
        add = None if add is None else add.view(1, H * Cc, -1)
    else:
        out2 = out
    for h in range(w3.shape[0]):
        if add is None:
            mm(w3[h], x2, out=out2[h])
        else:
            torch.addmm(add[h], w3[h], x2, beta=beta, out=out2[h])
    return out


def products(w3, x2, acc, refine=True, hi=None, products_out=None, work=None):
    """``w3 @ x2`` in ``acc``: w3 (H, Cc, D) and x2 (D, B*N) in the GEMM dtype; (H, Cc, B*N).

    bf16 operands: the fp32 sum to ~2^-17 relative (two GEMMs, see the module docstring), or,
    with ``refine=False``, rounded to bf16 (one GEMM); ``refine`` a list of heads: those heads
    refined, the others rounded. ``hi``: the (rounded) product, already
    computed (the forward's, kept); ``products_out``: an (H, Cc, B*N) view that receives it.
    ``work``
    (:class:`Work`): where the products and the sum go (buffers "hi", "lo", "s"); fresh tensors
    without it."""
    H, Cc, _ = w3.shape
    shape = (H, Cc, x2.shape[1])
    work = work or Work(w3.device)
    if w3.dtype != torch.bfloat16:          # fp32/fp64: the sum itself, kept or computed
        if hi is not None:
            return hi
        out = products_out if products_out is not None else work.get("s", shape, w3.dtype)
        return head_mm(w3, x2, out)
    if hi is None:
        out = products_out if products_out is not None else work.get("hi", shape, w3.dtype)
        hi = head_mm(w3, x2, out)
    out = work.get("s", shape, acc).copy_(hi)
    heads = sorted(range(H) if refine is True else (refine or ()))
    # W x - hi: -hi joins the fp32 sum. Runs of consecutive heads go as one product each (the
    # official temperatures put the max head last: heads 0..H-2 in one GEMM).
    runs: list[list[int]] = []
    for k in heads:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    lo = work.get("lo", shape, w3.dtype) if runs else None
    for run in runs:
        a, b = run[0], run[-1] + 1
        out[a:b].add_(head_mm(w3[a:b], x2, lo[a:b], add=hi[a:b], beta=-1.0))
    return out


def gemm_operands(x, weight):
    """(x as the (D, B*N) GEMM matrix, a function c0, c1 -> that class chunk's (H, c1-c0, D)
    weight), both in the GEMM dtype, the weight rounded to x's dtype first."""
    gemm = gemm_dtype(x.dtype, x.device)

    def w_chunk(c0, c1):
        return weight[:, c0:c1].to(x.dtype).to(gemm)
    return x_matrix(x, gemm), w_chunk


def score_chunk(x, weight, temps, inv_n, c0, c1, acc, refine=True, operands=None, hi=None,
                products_out=None, work=None):
    """Scores (H, c1-c0, B, N) in ``acc``, and the temperatures as (H, 1, 1, 1): whether a head
    is a max head, and T (1 for a max head). ``operands`` from :func:`gemm_operands`; ``hi`` and
    ``products_out`` as for :func:`products`; the scores go to ``work``'s buffer "s" (fresh without
    it)."""
    H, _, _ = weight.shape
    B, _, N = x.shape
    x2, w_chunk = operands or gemm_operands(x, weight)
    work = work or Work(x.device)
    p = products(w_chunk(c0, c1), x2, acc, refine, hi, products_out, work)
    scale = inv_n[:, c0:c1, None, None]
    if p is not hi and p is not products_out:     # the sum in "s" (or autograd's own tensor)
        s = p.view(H, c1 - c0, B, N).mul_(scale)
    else:                                   # never scale the kept products in place
        s = torch.mul(p.view(H, c1 - c0, B, N), scale,
                      out=work.get("s", (H, c1 - c0, B, N), acc))
    t = temps.to(device=x.device, dtype=acc).view(H, 1, 1, 1)
    is_max = torch.isinf(t)
    t_fin = torch.where(is_max, torch.ones_like(t), t)
    return s, is_max, t_fin


def inv_norms(weight, normalize, acc, out=None, work=None):
    """(H, C) inverse row norms in ``acc`` (ones without normalisation), into ``out`` if given.
    Blocks of rows (``ROW_BLOCK_ELEMS``) converted into one reused buffer of ``work``, rather
    than the whole weight at once or a fresh block per step (page faults)."""
    H, C, D = weight.shape
    if out is None:
        out = torch.empty((H, C), dtype=acc, device=weight.device)
    if not normalize:
        return out.fill_(1.0)
    work = work or Work(weight.device)
    step = max(1, ROW_BLOCK_ELEMS // max(1, H * D))
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        w = weight[:, c0:c1]
        if w.dtype != acc and not w.requires_grad:
            w = work.get("w", w.shape, acc).copy_(w)
        elif w.dtype == torch.float64 and acc != torch.float64:
            w = w.to(acc)           # (an fp64 weight beside fp32 x: dtype= may not narrow)
        out[:, c0:c1] = torch.linalg.vector_norm(w, dim=-1, dtype=acc)
    return out.reciprocal_()


def _softmax(s, t_fin, work):
    """Per row of s (..., N), z = T log2(e) s: m = max_j z_j and l = sum_j 2^(z_j - m) (both
    (..., 1)), and the softmax weights p (..., N), in ``work``'s buffer "p"."""
    p = torch.mul(s, t_fin / LN2, out=work.get("p", s.shape, s.dtype))
    zmax = p.amax(dim=-1, keepdim=True)
    l_c = p.sub_(zmax).exp2_().sum(-1, keepdim=True)
    return zmax, l_c, p.div_(l_c)


def fwd(x, weight, temps, lam, normalize, chunk, outs, scores_out=None):
    """Fills and returns ``outs`` = (y (B, C), m, l, att (B, H, C), argmax (B, H, C) int32,
    inv_n (H, C)): the kernel's state, in base 2 (z = T log2(e) s, m = max_j z_j,
    l = sum_j 2^(z_j - m)). ``scores_out`` (H*C, B*N) in the GEMM dtype, if given, receives
    the products (:func:`keeps_scores`)."""
    y, m, l, att, argmax, inv_n = outs
    C = y.shape[1]
    acc = inv_n.dtype
    work = Work(x.device)
    inv_norms(weight, normalize, acc, out=inv_n, work=work)
    operands = gemm_operands(x, weight)
    for c0 in range(0, C, chunk):
        c1 = min(C, c0 + chunk)
        kept = None if scores_out is None else scores_out.view(weight.shape[0], C, -1)[:, c0:c1]
        s, is_max, t_fin = score_chunk(x, weight, temps, inv_n, c0, c1, acc, FWD_REFINE,
                                       operands, products_out=kept, work=work)
        zmax, l_c, p = _softmax(s, t_fin, work)                     # (H, Cc, B, 1|N)
        best, best_j = s.max(dim=-1)
        a = torch.where(is_max[..., 0], best, p.mul_(s).sum(-1))   # p . s (p is spent)
        y[:, c0:c1] = (s.mean(-1) + lam * a).sum(0).t().to(y.dtype)
        m[:, :, c0:c1] = zmax[..., 0].permute(2, 0, 1)
        l[:, :, c0:c1] = l_c[..., 0].permute(2, 0, 1)
        att[:, :, c0:c1] = a.permute(2, 0, 1)
        argmax[:, :, c0:c1] = best_j.permute(2, 0, 1)
    return outs


def exact_first_max(sk, x, w_rows, inv_n, rel=2.0 ** -15, block=1024):
    """First position of the maximum of the exact sums W x for scores ``sk`` = inv_n W x
    (Cc, B, N) from the rounded bf16 GEMM (``products`` without its ``lo`` correction: what a
    max head's backward computes); w_rows (Cc, D) and x (B, D, N) are its bf16 operands,
    inv_n (Cc,) the rows' scales. Each score is within 2^-8 (1 + 2^-8) |s| of its fp32 sum;
    rounding is monotonic, so only a tie or a gap within the fp32 sums' own error hides the
    true maximum, behind one rounding at most.

    The fp32 sums resolve ~2^-17 |w||x| (accumulation, ~2^-18.5 at d=2048, typically); a max
    head's argmax flips on smaller gaps, and one flipped position moves lam * g * Wn of dx.
    Positions within ``rel`` |w_c| sqrt(D) max|x| (>= |w_c||x_bj|) of the row's maximum, plus
    twice 2^-8 (1 + 2^-8) of the row's largest |s| (the rounding of both the maximum and a
    candidate), are candidates; rows with several are settled in float64 on the candidates
    alone (products of bf16 are exact there), in blocks of ``block`` pairs (3 x block x D
    float64 at a time)."""
    j = sk.argmax(-1)
    # |x_bj| <= sqrt(D) max|x|: one pass over bf16 x
    lo_x, hi_x = torch.aminmax(x)
    x_max = torch.maximum(hi_x, -lo_x).float() * math.sqrt(x.shape[1])
    # row norms of bf16 w in bf16 (no fp32 copy of the rows), with a margin for their rounding
    w_norm = torch.linalg.vector_norm(w_rows, dim=-1).float() * (1 + 2.0 ** -7)
    slack = (rel * x_max) * (inv_n * w_norm)[:, None, None]
    lo_s, top = torch.aminmax(sk, dim=-1, keepdim=True)
    slack = slack + torch.maximum(top, -lo_s) * (2.0 ** -7 * (1 + 2.0 ** -8))
    cand = sk >= top - slack                                           # (Cc, B, N)
    rows = (cand.sum(-1) > 1).nonzero()                                # (r, 2): class, batch
    if rows.numel() == 0:
        return j
    rc, rb = rows.unbind(1)
    pr, pj = cand[rc, rb].nonzero().unbind(1)                          # candidate pairs
    exact = torch.full((rows.shape[0], sk.shape[-1]), -math.inf, dtype=torch.float64,
                       device=sk.device)
    for p0 in range(0, pr.numel(), block):
        r, n = pr[p0:p0 + block], pj[p0:p0 + block]
        exact[r, n] = (w_rows[rc[r]].double() * x[rb[r], :, n].double()).sum(-1)
    j[rc, rb] = exact.argmax(-1)                                       # first of equal maxima
    return j


def ds_chunk(x, weight, temps, grad_y, inv_n, lam, c0, c1, out, operands=None, hi=None,
             work=None):
    """Writes dS' = inv_n * dy/ds for classes [c0, c1) into ``out`` (H, c1-c0, B, N).

    The softmax statistics (m, l, att, argmax) are recomputed from this chunk's scores, which
    hold every position, rather than read from the forward's state: the backward is then exact
    for its own fp32 scores even where the forward ran on bf16-rounded ones, for a max and a sum
    more. ``hi``: the forward's products of these classes (H, c1-c0, B*N), if kept: then the
    bf16 path runs one GEMM (``lo``) instead of two, and the fp32 path none. ``work``: the
    :class:`Work` whose buffers the chunk's passes reuse."""
    B, D, N = x.shape
    acc = inv_n.dtype
    operands = operands or gemm_operands(x, weight)
    work = work or Work(x.device)
    x2, w_chunk = operands
    max_heads = [k for k, t in enumerate(temps.tolist()) if math.isinf(t)]
    bf16 = x2.dtype == torch.bfloat16
    # a max head's scores serve only its argmax, which exact_first_max settles from hi alone
    # (a wider window): its lo GEMM is skipped (a quarter of them at 4 heads)
    refine = [k for k in range(len(temps)) if k not in max_heads] if bf16 and max_heads else True
    s, is_max, t_fin = score_chunk(x, weight, temps, inv_n, c0, c1, acc, refine, operands, hi,
                                   work=work)
    if bf16 and max_heads:
        w_rows = w_chunk(c0, c1)
        best_j = {k: exact_first_max(s[k], x, w_rows[k], inv_n[k, c0:c1])
                  for k in max_heads}
    else:
        best_j = {k: s[k].argmax(-1) for k in max_heads}        # first maximum, as the kernels
    _, _, p = _softmax(s, t_fin, work)
    att_c = torch.mul(p, s, out=work.get("t", s.shape, acc)).sum(-1, keepdim=True)   # p . s
    d_att = p.mul_(s.sub_(att_c).mul_(t_fin).add_(1.0))         # s is spent here
    pos = torch.arange(N, device=x.device)
    for k, j in best_j.items():
        torch.eq(pos, j[..., None], out=d_att[k])               # one-hot at the argmax
    g = grad_y[:, c0:c1].t().to(acc) * inv_n[:, c0:c1, None]     # (H, Cc, B)
    d_att.mul_(lam).add_(1.0 / N)
    if out.dtype == acc:
        torch.mul(d_att, g[..., None], out=out)
    else:   # in place, then rounded (a broadcast multiply into bf16 is several times slower)
        out.copy_(d_att.mul_(g[..., None]))


# --------------------------------------------------------------------------- the op's interface


def chunk_classes(H: int, C: int, B: int, N: int) -> int:
    """Classes per chunk: about CHUNK_ELEMS scores (cache-sized; chunks the size of the
    kernels' workspace made every elementwise pass over the scores memory-bound)."""
    return max(1, min(C, CHUNK_ELEMS // max(1, H * B * N)))   # (1 for C == 0: no chunk runs)


def keeps_scores(x, H: int, C: int, keep: bool = True) -> bool:
    """Whether the forward returns its score products (W x, before the row norms, in the GEMM
    dtype) for the backward: on CPU, when a backward will run (``keep``) and they have no more
    elements than ``KEEP_RATIO`` times x's (H*C <= KEEP_RATIO * D; at 1, what autograd keeps
    anyway). The backward then skips a GEMM: its bf16 path runs one (the ``lo`` correction)
    instead of two, its fp32 path none instead of one. Static sizes only: the batch (possibly
    symbolic under torch.compile) never decides it."""
    return keep and x.device.type == "cpu" and H * C <= KEEP_RATIO * x.shape[1]


def scores_output(x, weight, keep: bool, alloc=new):
    """The forward's ``scores`` output: the products (H*C, B*N) in the GEMM dtype if
    :func:`keeps_scores`, else (0,) in the accumulation dtype."""
    B, _, N = x.shape
    H, C, _ = weight.shape
    if not keeps_scores(x, H, C, keep):
        return alloc((0,), acc_dtype(x.dtype), x.device)
    return alloc((H * C, B * N), gemm_dtype(x.dtype, x.device), x.device)


def kept_output(x, weight, keep: bool, alloc=new):
    """The forward's ``kept`` output: always empty here (the products read the weight as it
    is; nothing is prepared)."""
    return alloc((0,), x.dtype, x.device)


#: Never a triton_op (interface.Implementation): its ops are the custom ops on every device.
triton_op = False


def serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Every device and dtype (the automatic choice's last resort)."""
    return True


def _lam(lam, acc):
    """lam for the products: a number as it is, a learnable one as a 0-d tensor in ``acc``."""
    return lam.detach().reshape(()).to(acc) if isinstance(lam, torch.Tensor) else lam


def forward(x, weight, scalars, normalize, keep, y_dtype=None, packed=False) -> Forward:
    """y and the state (``interface.Forward``), as the Triton implementation returns them:
    ``kept`` is always empty here (the products use the weight as it is); ``scores`` holds the
    score products when :func:`keeps_scores`, else is empty. ``y_dtype``: y's dtype if not
    x's (rounded once, from the accumulation dtype). ``packed`` changes nothing here."""
    B, D, N = x.shape
    H, C, _ = weight.shape
    acc = acc_dtype(x.dtype)
    temps, lam = host_values(scalars)
    products_out = scores_output(x, weight, keep)
    outs = fwd_outputs(x, H, C, y_dtype=y_dtype)
    fwd(x, weight, torch.tensor(temps, dtype=acc), _lam(lam, acc), normalize,
        chunk_classes(H, C, B, N), outs,
        scores_out=products_out if products_out.numel() else None)
    if not keep:
        outs = (*outs[:5], new((0,), acc, x.device))
    return Forward(outs[0], ForwardState(*outs[1:], kept_output(x, weight, keep), products_out))


class Backward:
    """The fallback's side of the op's backward loop (see ops.backward_loop): dS' of a class
    chunk recomputed from the scores, GEMMs in :func:`gemm_dtype`, the weight gradient
    projected per chunk while its rows are in cache."""

    #: the product G = dS' x^T of the backward loop (common.mm: oneDNN's fp32 GEMM on CPU)
    mm = staticmethod(mm)

    def __init__(self, grad_y, x, weight, state, scalars, normalize, plan=None):
        # (plan: the Triton implementation's launch plan; none here)
        B, D, N = x.shape
        H, C, _ = weight.shape
        self.acc = acc = acc_dtype(x.dtype)
        temps, lam = host_values(scalars)
        inv_n = state.inv_norm
        if inv_n.numel() == 0:                  # the forward kept nothing (keep=False)
            inv_n = inv_norms(weight, normalize, acc)
        self.x, self.weight, self.grad_y, self.inv_n = x, weight, grad_y, inv_n
        self.scores = state.scores
        self.lam, self.normalize = _lam(lam, acc), normalize
        self.temps = torch.tensor(temps, dtype=acc)
        self.gemm = gemm_dtype(x.dtype, x.device) if not x.is_cuda else x.dtype
        self.chunk = chunk_classes(H, C, B, N)
        self.w_gemm = w_gemm = weight.to(x.dtype).to(self.gemm)
        self.x_dk = x_matrix(x, self.gemm)
        # (the closure holds w_gemm, not self: no reference cycle keeps the workspace alive)
        self.operands = (self.x_dk, lambda c0, c1: w_gemm[:, c0:c1])
        # bf16 products are rounded once per chunk; over several chunks dx sums them in acc
        self.dx_dtype = acc if (self.gemm != acc and self.chunk < C) else self.gemm
        self.ws = new((H * self.chunk * B * N,), self.gemm, x.device)
        self.work = Work(x.device)

    def ds(self, c0, c1, out):
        H, C, _ = self.weight.shape
        scores = self.scores
        hi = scores.view(H, C, -1)[:, c0:c1] if scores is not None and scores.numel() else None
        ds_chunk(self.x, self.weight, self.temps, self.grad_y, self.inv_n, self.lam, c0, c1, out,
                 self.operands, hi, self.work)

    def chunk_done(self, G, dW, c0, c1):
        """These classes' dW while their G is in cache (a pass over all of G and W afterwards
        would read both from memory again)."""
        weight_grad(G, self.weight, self.inv_n, self.normalize, self.acc, dW, c0, c1, self.work)

    def new_weight_grad(self, G):
        return G if G.dtype == self.weight.dtype else torch.empty_like(self.weight)

    def finish(self, G, dW):
        return dW


def weight_grad(G, weight, inv_n, normalize, acc, out, c0, c1, work=None):
    """dL/dW of classes [c0, c1) into ``out`` (H, C, D, weight's dtype; may be G itself) from
    G = dS' x^T (H, C, D): through the row normalisation, G - W (W.G) inv_n^2, computed in
    ``acc`` blocks of rows at a time, in ``work``'s buffers. No weight-sized fp32 temporaries
    (at 9,605 classes three of them would be most of the GPU's peak memory, and page faults on
    the CPU)."""
    H, C, D = weight.shape
    if not normalize:
        if out is not G:
            out[:, c0:c1] = G[:, c0:c1]
        return
    work = work or Work(weight.device)
    step = max(1, ROW_BLOCK_ELEMS // (H * D))
    for b0 in range(c0, c1, step):
        b1 = min(c1, b0 + step)
        g, w = G[:, b0:b1], weight[:, b0:b1]
        if g.dtype != acc:                  # else g is that block of G, updated in place
            g = work.get("g", g.shape, acc).copy_(g)
        if w.dtype != acc:
            w = work.get("w", w.shape, acc).copy_(w)
        coef = torch.mul(w, g, out=work.get("t", w.shape, acc)).sum(-1)       # W . G
        # (addcmul_: a broadcast multiply and subtract is many times slower on CPU)
        g.addcmul_(w, coef.mul_(inv_n[:, b0:b1].square())[..., None], value=-1.0)
        if g.data_ptr() != out[:, b0:b1].data_ptr():      # else g is that block of out already
            out[:, b0:b1] = g
