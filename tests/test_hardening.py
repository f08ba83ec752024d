"""Non-finite inputs, numerical range, determinism, saved state and bounded backward memory.

Non-finite policy (README "Semantics"): NaN and +/-inf propagate exactly as in the float64
reference. A NaN or inf anywhere in x[b] makes every score at that position non-finite, so y[b]
is NaN for every class (the reference's softmax of +inf is NaN, and 0 * -inf is NaN), while the
other batch rows are unaffected. A zero weight row with normalize=True gives NaN for that class
(the official 0/0).
"""
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import csra_triton
import csra_triton.fallback as fallback
import csra_triton.triton_impl as triton_impl
from csra_triton import tuning
from helpers import INF, TOL, ref64, rel_err

TEMPS = [1.0, 2.0, 4.0, INF]


def _same_nonfinite(y, ref):
    """Same NaN positions, same infinities, and close finite values."""
    y = y.double()
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(torch.isposinf(y), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(y), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    assert rel_err(y[fin], ref[fin]) <= 1e-5


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_x_follows_reference(value, backend, device):
    x = torch.randn(3, 8, 2, 3, device=device)
    x[1, 2, 0, 1] = value
    weight = torch.randn(4, 5, 8, device=device)
    y = csra_triton.csra(x, weight, TEMPS, 0.1)
    ref = ref64(x, weight, TEMPS, 0.1)
    _same_nonfinite(y, ref)
    assert y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all()


def test_zero_weight_row_is_nan_like_official(backend, device):
    x = torch.randn(2, 8, 3, 3, device=device)
    weight = torch.randn(4, 5, 8, device=device)
    weight[1, 3] = 0
    y = csra_triton.csra(x, weight, TEMPS, 0.1)
    _same_nonfinite(y, ref64(x, weight, TEMPS, 0.1))
    assert y[:, 3].isnan().all() and y.isnan().sum() == 2
    # Without normalisation a zero row is just a zero score: every logit as float64's.
    y = csra_triton.csra(x, weight, TEMPS, 0.1, normalize=False)
    assert rel_err(y, ref64(x, weight, TEMPS, 0.1, normalize=False)) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_extreme_range(dtype, backend, device):
    """|x| ~ 1e3 and T up to 100: logits ~ 1e4 (finite in fp16), T*s ~ 1e6 inside the softmax."""
    x = (torch.randn(2, 32, 7, 7, device=device) * 1e3).to(dtype).requires_grad_()
    weight = torch.randn(4, 6, 32, device=device, requires_grad=True)
    temps, g = [10.0, 100.0, 50.0, INF], torch.randn(2, 6, device=device)
    y = csra_triton.csra(x, weight, temps, 1.0)
    y.backward(g.to(dtype))
    ref, dx, dw = ref64(x, weight, temps, 1.0, grad=g)
    assert ref.abs().max() < torch.finfo(dtype).max  # the reference is representable
    for out in (y, x.grad, weight.grad):
        assert torch.isfinite(out).all()
    assert rel_err(y, ref) <= TOL[dtype]
    assert rel_err(x.grad, dx) <= TOL[dtype] and rel_err(weight.grad, dw) <= TOL[dtype]


def test_forward_is_bitwise_repeatable(backend, device):
    x = torch.randn(3, 40, 5, 5, device=device, dtype=torch.bfloat16)
    weight = torch.randn(4, 33, 40, device=device)
    ys = [csra_triton.csra(x, weight, TEMPS, 0.1) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_backward_deterministic_under_deterministic_algorithms(backend, device, monkeypatch):
    """No atomics anywhere (heads are summed in registers, GEMMs are cuBLAS/ATen): the backward is
    bitwise repeatable, also with several class chunks, and does not raise in deterministic mode."""
    monkeypatch.setattr(triton_impl, "DS_WORKSPACE_ELEMS", 600)
    x = torch.randn(3, 24, 4, 4, device=device, requires_grad=True)
    weight = torch.randn(4, 17, 24, device=device, requires_grad=True)
    g = torch.randn(3, 17, device=device)
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            x.grad = weight.grad = None
            csra_triton.csra(x, weight, TEMPS, 0.1).backward(g)
            grads.append((x.grad.clone(), weight.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(grads[0][0], a) and torch.equal(grads[0][1], b) for a, b in grads[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ratio", [1, 64], ids=["keep_ratio=1", "keep_ratio=64"])
@pytest.mark.parametrize("C", [7, 5, 4])
def test_saved_for_backward_is_x_weight_and_small_state(C, ratio, dtype, backend, device,
                                                         monkeypatch):
    """x and the weight themselves, O(B*H*C) state, and what the implementation keeps: the
    forward's score products only on the CPU fallback and only when H*C <= ratio * d
    (fallback.KEEP_RATIO: 1, no larger than x, 20 rows for C=5, d=20; or the default 64); on
    the Triton path the prepared weight (H*C, d) in x's dtype and the raw scores, only when
    they have no more elements than x."""
    if ratio != 1 and backend != "torch":
        pytest.skip("the keep ratio is the fallback's; the kernels keep by x's size alone")
    monkeypatch.setattr(fallback, "KEEP_RATIO", ratio)
    B, d, h, w, H = 3, 20, 5, 5, 4
    x = torch.randn(B, d, h, w, device=device).to(dtype).requires_grad_()
    weight = torch.randn(H, C, d, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        csra_triton.csra(x, weight, TEMPS, 0.1)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert x.untyped_storage().data_ptr() in ptrs            # x itself, no copy
    assert weight.untyped_storage().data_ptr() in ptrs
    others = [t for t in saved if t.untyped_storage().data_ptr() not in
              (x.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr())]
    # (the eager path saves the state as views of one allocation and None for what it does
    # not keep; the ops save separate tensors and empty ones: told apart by shape)
    small = [t for t in others if tuple(t.shape) in ((B, H, C), (H, C))]
    kept = [t for t in others if t.dim() == 2 and t.shape[0] == H * C]
    scores = [t for t in others if t.dim() == 4]
    empty = [t for t in others if t.numel() == 0]
    assert len(small) + len(kept) + len(scores) + len(empty) == len(others), others
    assert len(small) == 5                                    # m, l, att, argmax, inv_n
    assert all(t.dtype in (torch.float32, torch.int32) for t in small)
    if backend == "torch":      # the fallback's products, on CPU, within ratio x x's elements
        keeps = device == "cpu" and H * C <= ratio * d
        assert [tuple(t.shape) for t in kept] == ([(H * C, B * h * w)] if keeps else [])
        assert all(t.numel() <= ratio * x.numel() and t.element_size() <= 4 for t in kept)
        assert scores == []
    else:                       # the kernels' prepared weight: the weight's size in x's dtype
        assert [(tuple(t.shape), t.dtype) for t in kept] == [((H * C, d), dtype)]
        fits = H * C <= d       # 20 rows for C=5, 16 for C=4
        assert [tuple(t.shape) for t in scores] == ([(H, C, B, h * w)] if fits else [])
        assert all(t.numel() <= x.numel() and t.dtype == torch.float32 for t in scores)


def test_backward_workspace_is_bounded_by_the_chunk(backend, device, monkeypatch):
    """At 9,605 classes the full score gradient (H*B*N*C fp32) would be 19.7 MB here; with a
    bounded workspace no CPU allocation during backward exceeds dW's size (+10%), and on CUDA
    the whole backward's peak stays under a quarter of the full score gradient.

    On CPU this runs through the fallback, whose chunks hold fallback.CHUNK_ELEMS scores (the
    kernels' chunk offsets are covered by test_class_chunks); 9,605 classes in the interpreter
    take a minute. On CUDA it runs the kernels."""
    if backend == "triton" and device == "cpu":
        pytest.skip("9,605 classes in the Triton interpreter take ~1 min; the fallback covers it")
    monkeypatch.setattr(triton_impl, "DS_WORKSPACE_ELEMS", 1 << 14)
    monkeypatch.setattr(fallback, "CHUNK_ELEMS", 1 << 14)      # the fallback's own chunk size
    B, d, h, w, H, C = 2, 4, 8, 8, 4, 9605
    x = torch.randn(B, d, h, w, device=device, requires_grad=True)
    weight = torch.randn(H, C, d, device=device, requires_grad=True)
    y = csra_triton.csra(x, weight, TEMPS, 0.1)
    g = torch.randn(B, C, device=device)
    full_ds, dw_bytes = H * C * B * h * w * 4, H * C * d * 4
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y.backward(g)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base < full_ds / 4
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y.backward(g)
        biggest = max(e.cpu_memory_usage for e in prof.events())
        assert biggest <= 1.1 * dw_bytes < full_ds / 4, (biggest, dw_bytes, full_ds)
    _, dx, dw = ref64(x, weight, TEMPS, 0.1, grad=g)
    assert rel_err(x.grad, dx) <= 1e-5 and rel_err(weight.grad, dw) <= 1e-5


def test_kernels_backward_workspace_is_bounded(device, monkeypatch):
    """The kernels' path (in the interpreter on CPU) at 200 classes with a small workspace:
    the dS' chunks are bounded by the workspace, so no allocation during the backward exceeds
    the larger of the workspace and the weight-sized buffers (G, dW) by more than 10%, far below
    the full score gradient; gradients as float64's."""
    if device == "cuda":
        pytest.skip("covered on CUDA by test_backward_workspace_is_bounded_by_the_chunk")
    B, d, h, w, H, C = 2, 4, 8, 8, 4, 200
    ws_elems = 1 << 12
    monkeypatch.setattr(triton_impl, "DS_WORKSPACE_ELEMS", ws_elems)
    x = torch.randn(B, d, h, w, device=device, requires_grad=True)
    weight = torch.randn(H, C, d, device=device, requires_grad=True)
    with csra_triton.use_backend("triton"):
        y = csra_triton.csra(x, weight, TEMPS, 0.1)
        g = torch.randn(B, C, device=device)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y.backward(g)
    full_ds, dw_bytes = H * C * B * h * w * 4, H * C * d * 4
    # a chunk is whole class tiles: at least one tile of BC classes
    chunk = triton_impl.ds_chunk_classes(H, C, B, h * w,
                                         tuning.default_config(H, C, d, h * w).BC)
    assert chunk < C // 4
    bound = 1.1 * max(dw_bytes, H * chunk * B * h * w * 4)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest <= bound < full_ds / 4, (biggest, bound, full_ds)
    _, dx, dw = ref64(x, weight, TEMPS, 0.1, grad=g)
    assert rel_err(x.grad, dx) <= 1e-5 and rel_err(weight.grad, dw) <= 1e-5


def test_module_weight_shape_is_checked():
    m = csra_triton.CSRATriton(8, 5, heads=2)
    m.weight = torch.nn.Parameter(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match=r"weight: expected shape \(heads, classes, in_ch\)"):
        m(torch.randn(1, 8, 2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA streams")
def test_two_streams_match_sequential():
    x = [torch.randn(8, 64, 7, 7, device="cuda") for _ in range(2)]
    weight = torch.randn(4, 80, 64, device="cuda")
    seq = [csra_triton.csra(xi, weight, TEMPS, 0.1) for xi in x]
    streams = [torch.cuda.Stream() for _ in x]
    outs = [None, None]
    torch.cuda.synchronize()
    for i, (s, xi) in enumerate(zip(streams, x)):
        with torch.cuda.stream(s):
            outs[i] = csra_triton.csra(xi, weight, TEMPS, 0.1)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(outs, seq))
