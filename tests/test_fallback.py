"""The PyTorch fallback's own choices (fallback.py): which GEMMs it runs on this CPU, the two-GEMM
fp32 sum of bf16 products, exact maxima in the backward where bf16 scores would tie, blocked
passes over the weight rows, and dx summed in fp32 over class chunks. Values against float64."""
import collections
import math
import os
import subprocess
import sys

import pytest
import torch

import csra_triton
import csra_triton.fallback as fallback
import csra_triton.ops as ops
from csra_triton import common, settings
from helpers import TOL, error_scales, ref64, rel_err

pytestmark = pytest.mark.no_triton   # the PyTorch fallback only


@pytest.fixture
def bf16_gemm():
    old = fallback.BF16_GEMM
    fallback.BF16_GEMM = True
    with ops.use_backend("torch"):
        yield
    fallback.BF16_GEMM = old


def test_gemm_choice_follows_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(fallback, "BF16_GEMM", None)
    for native in (True, False):
        monkeypatch.setattr(fallback, "native_bf16", lambda: native)
        want = torch.bfloat16 if native else torch.float32
        assert fallback.gemm_dtype(torch.bfloat16, cpu) == want
        assert fallback.gemm_dtype(torch.float16, cpu) == torch.float32
        assert fallback.gemm_dtype(torch.float32, cpu) == torch.float32
        assert fallback.gemm_dtype(torch.float64, cpu) == torch.float64
        assert fallback.gemm_dtype(torch.bfloat16, cuda) == torch.float32
    monkeypatch.setattr(fallback, "BF16_GEMM", False)
    monkeypatch.setattr(fallback, "native_bf16", lambda: True)
    assert fallback.gemm_dtype(torch.bfloat16, cpu) == torch.float32
    assert "native bf16" in fallback.cpu_description()


@pytest.mark.parametrize("D", [3, 130, 2048])
def test_two_gemms_recover_the_fp32_sum(D):
    """hi = bf16(W x); lo = W x - hi with -hi added before rounding: |hi + lo - W x| is a
    rounding of lo (<= 2^-9 |lo| <= 2^-18 |W x|) plus fp32 accumulation, against 2^-9 |W x|
    for hi alone. Bounds on sum_d |w_d x_d|, the scale of a sum's rounding error."""
    w = torch.randn(37, D).bfloat16()
    x2 = torch.randn(D, 50).bfloat16()
    exact = w.double() @ x2.double()
    scale = w.double().abs() @ x2.double().abs()
    two = fallback.products(w[None], x2, torch.float32, refine=True)[0].double()
    one = fallback.products(w[None], x2, torch.float32, refine=False)[0].double()
    assert ((two - exact).abs() / scale).max() <= 2.0 ** -16
    assert ((one - exact).abs() / scale).max() <= 2.0 ** -8
    fp32 = fallback.products(w.float()[None], x2.float(), torch.float32)[0].double()
    assert ((fp32 - exact).abs() / scale).max() <= 1e-6


def test_backward_maximum_of_the_fp32_sum(bf16_gemm):
    """A max head whose two top positions differ by less than a bf16 rounding of their score:
    rounded scores tie, and their first maximum is position 0; the fp32 sum (and float64) says
    position 1. A flipped position moves lam * g * Wn of dx, far over the tolerance."""
    D, N = 64, 6
    weight = torch.ones(1, 1, D, requires_grad=True)
    x = torch.randn(1, D, N) * 0.1
    x[:, :, :2] = 4.0
    x[0, 0, 1] = 4.0 + 2.0 ** -5                      # one bf16 ulp at 4: W x = 256 + 2^-5
    x = x.bfloat16().view(1, D, 2, 3).requires_grad_()
    w2, x2 = weight.detach().bfloat16(), x.detach().view(D, N)
    hi = fallback.products(w2, x2, torch.float32, refine=False)[0]
    assert hi[0, 0] == hi[0, 1]                       # bf16 ulp at 256 is 2
    assert fallback.products(w2, x2, torch.float32)[0, 0, 1] == 256.0 + 2.0 ** -5
    g = torch.ones(1, 1)
    csra_triton.csra(x, weight, [math.inf], 0.5).backward(g.bfloat16())
    _, dx, dw = ref64(x, weight, [math.inf], 0.5, grad=g)
    assert rel_err(x.grad, dx) <= TOL[torch.bfloat16]
    # dW of rows parallel to the top columns cancels (helpers.error_scales); a flip moves it by
    # lam * g * |x_0 - x_1| / |W|, far over this too
    _, _, dw_scale = error_scales(x, weight, [math.inf], 0.5, True, g)
    assert rel_err(weight.grad, dw, scale=dw_scale) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_blocks_and_chunks(dtype, bf16_gemm, monkeypatch):
    """Weight-row passes in blocks of one class and the scores in chunks of a few classes (so
    bf16 dx is summed in fp32 over chunks, and the forward's kept products are read by chunk) give
    the unchunked values, within TOL of float64."""
    x = torch.randn(2, 48, 3, 5).to(dtype).requires_grad_()
    weight = torch.randn(4, 11, 48, requires_grad=True)
    assert fallback.keeps_scores(x.flatten(2), 4, 11)                # 44 score rows <= 48 channels
    temps = [1.0, 2.0, 4.0, math.inf]
    g = torch.randn(2, 11)
    runs = []
    for row_block, chunk_elems in ((1 << 16, 1 << 20), (1, 4 * 2 * 15 * 3)):
        monkeypatch.setattr(fallback, "ROW_BLOCK_ELEMS", row_block)
        monkeypatch.setattr(fallback, "CHUNK_ELEMS", chunk_elems)
        x.grad = weight.grad = None
        y = csra_triton.csra(x, weight, temps, 0.2)
        y.backward(g.to(dtype))
        runs.append((y.detach(), x.grad, weight.grad))
    assert fallback.chunk_classes(4, 11, 2, 15) == 3
    y64, dx, dw = ref64(x, weight, temps, 0.2, grad=g.to(dtype).float())
    for y, gx, gw in runs:
        assert rel_err(y, y64) <= TOL[dtype]
        assert rel_err(gx, dx) <= TOL[dtype] and rel_err(gw, dw) <= TOL[dtype]
    assert rel_err(runs[1][2], runs[0][2]) <= 1e-6        # the projection is row-local


def _backward_calls(y, g) -> collections.Counter:
    """How many times each operator ran in ``y.backward(g)`` (torch.profiler's counts)."""
    with torch.profiler.profile() as prof:
        y.backward(g)
    return collections.Counter({e.key: e.count for e in prof.key_averages()})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_products_kept_within_the_ratio(dtype, bf16_gemm, monkeypatch):
    """More score rows than channels (H*C = 44 = 5.5 x 8): the products are kept for the
    backward exactly when H*C <= fallback.KEEP_RATIO * D, read by chunk, and the gradients agree
    with float64 (TOL) whether kept or recomputed; the backward runs one GEMM fewer when kept
    (the recomputed ``hi``)."""
    x = torch.randn(2, 8, 3, 5).to(dtype).requires_grad_()
    weight = torch.randn(4, 11, 8, requires_grad=True)
    temps = [1.0, 2.0, 4.0, math.inf]
    g = torch.randn(2, 11).to(dtype)
    monkeypatch.setattr(fallback, "CHUNK_ELEMS", 4 * 2 * 15 * 3)      # chunks of 3 classes
    y64, dx, dw = ref64(x, weight, temps, 0.2, grad=g.float())
    gemms, grads = {}, {}
    kept, not_kept = 5.5, 5.4
    for budget in (kept, not_kept):
        monkeypatch.setattr(fallback, "KEEP_RATIO", budget)
        assert fallback.keeps_scores(x.flatten(2), 4, 11) == (budget == kept)
        x.grad = weight.grad = None
        y = csra_triton.csra(x, weight, temps, 0.2)
        calls = _backward_calls(y, g)
        gemms[budget] = sum(calls[k] for k in ("aten::mm", "aten::addmm",
                                               "mkldnn::_linear_pointwise"))
        assert rel_err(y, y64) <= TOL[dtype]
        assert rel_err(x.grad, dx) <= TOL[dtype] and rel_err(weight.grad, dw) <= TOL[dtype]
        grads[budget] = (x.grad, weight.grad)
    # 4 chunks x 4 heads: the recomputed products are one GEMM per head and chunk
    assert gemms[not_kept] - gemms[kept] == 16, gemms
    # the same products either way (same GEMMs): bitwise the same gradients. (A bf16 ``hi`` of
    # the wrong classes would still pass TOL: ``lo`` = W x - hi corrects it to 2^-8 |lo|.)
    assert all(torch.equal(a, b) for a, b in zip(grads[kept], grads[not_kept]))


def test_max_heads_skip_the_lo_gemm(bf16_gemm, monkeypatch):
    """bf16 GEMMs with max heads: the backward's lo correction runs for the softmax heads only
    (a max head's scores serve only its argmax, settled from hi with a window of one bf16
    rounding), the gradients agree with float64. In one chunk (every class: the heads' rows
    are one matrix) a run of consecutive softmax heads is one GEMM (the official temperatures
    put the max head last); in chunks of classes, one GEMM per softmax head and chunk; none with
    max heads only."""
    x = torch.randn(2, 8, 3, 5).bfloat16().requires_grad_()
    weight = torch.randn(4, 11, 8, requires_grad=True)
    g = torch.randn(2, 11).bfloat16()
    for chunks, elems in ((1, 1 << 20), (4, 4 * 2 * 15 * 3)):      # chunks of 3 classes
        monkeypatch.setattr(fallback, "CHUNK_ELEMS", elems)
        for temps, runs, softmax in (([1.0, 2.0, 4.0, math.inf], 1, 3),
                                     ([1.0, math.inf, 4.0, 2.0], 2, 3),
                                     ([math.inf, 1.0, math.inf, math.inf], 1, 1),
                                     ([math.inf] * 4, 0, 0), ([1.0, 2.0, 3.0, 4.0], 1, 4)):
            x.grad = weight.grad = None
            addmm = _backward_calls(csra_triton.csra(x, weight, temps, 0.2), g)["aten::addmm"]
            assert addmm == (runs if chunks == 1 else chunks * softmax), (temps, chunks, addmm)
            _, dx, dw = ref64(x, weight, temps, 0.2, grad=g.float())
            assert rel_err(x.grad, dx) <= TOL[torch.bfloat16]
            assert rel_err(weight.grad, dw) <= TOL[torch.bfloat16]


def test_keep_ratio_from_the_environment():
    """CSRA_TRITON_CPU_KEEP_RATIO sets fallback.KEEP_RATIO at import (1: no larger than x, 0:
    never; unset or empty: 64); anything but a finite number >= 0 fails the import with the
    variable named."""
    def ratio(v):
        return settings.from_environ({"CSRA_TRITON_CPU_KEEP_RATIO": v}).cpu_keep_ratio

    assert ratio("64") == 64 and ratio("0") == 0 and ratio("1.5") == 1.5 and ratio("") == 64
    for bad in ("abc", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="CSRA_TRITON_CPU_KEEP_RATIO"):
            ratio(bad)
    code = "import csra_triton.fallback as f; print(f.KEEP_RATIO)"
    for env, want in (("2.5", "2.5"), ("abc", "CSRA_TRITON_CPU_KEEP_RATIO: expected")):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, CSRA_TRITON_CPU_KEEP_RATIO=env), timeout=300)
        assert want in run.stdout + run.stderr and (run.returncode == 0) == (env == "2.5")


def test_rounded_window_holds_the_maximum_one_rounding_below():
    """exact_first_max on scores from the rounded GEMM alone (a max head without lo): where the
    fp32 sums' error and bf16 rounding put the true maximum one bf16 rounding below another
    position (258 against 256, float64 sums 256.5 and 257), the window widened by the
    rounding holds it and float64 settles it (the fp32 sums' window alone misses it: the
    mutant that drops the widening returns 0)."""
    w = torch.ones(1, 2).bfloat16()
    x = torch.tensor([[256.0, 256.0], [0.5, 1.0]]).bfloat16()[None]        # (B=1, D=2, N=2)
    sk = torch.tensor([[[258.0, 256.0]]])                                   # (Cc=1, B=1, N=2)
    inv_n = torch.ones(1)
    assert fallback.exact_first_max(sk, x, w, inv_n).item() == 1


def test_x_matrix_copies_only_when_needed():
    x = torch.randn(3, 8, 5)
    tokens = torch.randn(3, 5, 8).transpose(1, 2)        # channels innermost
    one = torch.randn(1, 8, 5)
    for t in (x, tokens, one):
        m = fallback.x_matrix(t, t.dtype)
        assert torch.equal(m, t.permute(1, 0, 2).reshape(8, -1))
    assert fallback.x_matrix(tokens, tokens.dtype).data_ptr() == tokens.data_ptr()
    assert fallback.x_matrix(one, one.dtype).data_ptr() == one.data_ptr()
    bf = fallback.x_matrix(x, torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf, x.permute(1, 0, 2).reshape(8, -1).bfloat16())


def test_forward_on_rounded_scores_stays_near_fp32(bf16_gemm):
    """FWD_REFINE False (one bf16 GEMM): y moves by about one bf16 rounding of y."""
    x = torch.randn(4, 256, 7, 7).bfloat16()
    weight = torch.randn(4, 20, 256)
    temps = [1.0, 2.0, 4.0, math.inf]
    y64 = ref64(x, weight, temps, 0.1)
    errs = {}
    for refine in (False, True):
        old = fallback.FWD_REFINE
        fallback.FWD_REFINE = refine
        try:
            errs[refine] = rel_err(csra_triton.csra(x, weight, temps, 0.1), y64)
        finally:
            fallback.FWD_REFINE = old
    assert errs[True] <= 2.0 ** -8 and errs[False] <= 2.0 ** -8 + 2.0 ** -9


def test_max_head_gaps_below_two_gemms():
    """Scores tied at the two GEMMs' resolution (~2^-17) over a true gap of 2^-22 relative: the
    candidates are settled in float64, as the reference's argmax."""
    D, N, C = 64, 5, 6
    w = torch.ones(C, D)
    w[:, 0] = 2.0 ** -14
    x = torch.randn(1, D, N) * 0.01
    x[:, 1:, :2] = 4.0
    x[0, 0, 0], x[0, 0, 1] = 0.0, 1.0                   # W x differs by 2^-14 at ~252
    w, x = w.bfloat16(), x.bfloat16()
    inv_n = 1.0 / torch.linalg.vector_norm(w.float(), dim=-1)
    s = fallback.products(w[None], x[0], torch.float32).view(C, 1, N) * inv_n[:, None, None]
    s[..., 1] = s[..., 0]                               # as if tied at the GEMMs' resolution
    want = (w.double() @ x[0].double()).argmax(-1).view(C, 1)
    assert (want == 1).all()
    assert torch.equal(fallback.exact_first_max(s, x, w, inv_n), want)


@pytest.mark.parametrize("layout", ["rows", "transposed", "transposed-buf", "transposed-small-buf"])
def test_mm_through_onednn_matches_float64(layout):
    """common.mm (oneDNN's fp32 GEMM on CPU) against float64: within the fp32 accumulation bound
    |err| <= K u (|a| |b|) with u = 2^-24 (doubled for the output's rounding), every operand
    layout the backward hands it, into ``out`` or fresh; bf16 stays torch.mm, bit for bit."""
    from csra_triton.common import mm, onednn_fp32

    gen = torch.Generator().manual_seed(3)
    M, K, N = 37, 300, 45
    a = torch.randn(K, M, generator=gen).t() if layout != "rows" else torch.randn(
        M, K, generator=gen)
    b = torch.randn(K, N, generator=gen)
    buf = {"transposed-buf": torch.empty(M * K + 5),
           "transposed-small-buf": torch.empty(M * K - 1)}.get(layout)
    exact = a.double() @ b.double()
    bound = 2 * K * 2.0 ** -24 * (a.double().abs() @ b.double().abs())
    for out in (None, torch.full((M, N), math.nan)):
        r = mm(a, b, out=out, buf=buf)
        assert r.shape == (M, N) and r.dtype == torch.float32
        assert ((r.double() - exact).abs() <= bound).all()
        if out is not None:
            assert r is out
    ab, bb = a.bfloat16(), b.bfloat16()
    assert torch.equal(mm(ab, bb), torch.mm(ab, bb))
    if buf is not None and buf.numel() >= M * K:
        assert torch.equal(buf[:M * K].view(M, K), a)         # the copy went to the buffer
    assert isinstance(onednn_fp32(), bool)


def test_mm_keeps_autograd():
    """Under autograd common.mm is torch.mm (oneDNN's linear op has no derivative here)."""
    from csra_triton.common import mm

    a = torch.randn(5, 7, dtype=torch.float32, requires_grad=True)
    b = torch.randn(7, 3)
    r = mm(a, b)
    r.sum().backward()
    assert torch.allclose(a.grad, b.sum(1).expand(5, 7))


def _chunk_allocations(run, chunk_bytes):
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        run()
    return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= chunk_bytes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_chunk_passes_reuse_buffers(dtype, bf16_gemm, monkeypatch):
    """The class chunks' elementwise passes write into buffers allocated once per call
    (fallback.Work): a fresh chunk-sized tensor per pass paid a page fault per 4 KB (1-2 ns an
    element, 30x an in-place pass) and was most of the time at 9,605 classes. The number of
    chunk-sized allocations of a forward does not grow with the
    number of chunks (2 against 8 here). The backward's count still grows (24 -> 67 with 8
    chunks: its per-chunk max settling and weight-gradient blocks), left for issue 31."""
    B, D, N, H = 2, 16, 25, 4
    monkeypatch.setattr(fallback, "CHUNK_ELEMS", H * 8 * B * N)      # 8 classes a chunk
    chunk_bytes = H * 8 * B * N * 4 // 2
    temps = [1.0, 2.0, 4.0, math.inf]
    counts = {}
    for C in (16, 64):
        assert fallback.chunk_classes(H, C, B, N) == 8
        gen = torch.Generator().manual_seed(C)
        x = torch.randn(B, D, N, generator=gen).to(dtype)
        w = torch.randn(H, C, D, generator=gen).to(dtype)
        with torch.no_grad():
            fwd = _chunk_allocations(
                lambda: fallback.forward(x, w, common.scalars(temps, 0.1, H), True, False),
                chunk_bytes)
        counts[C] = fwd
    assert counts[64] == counts[16], counts
