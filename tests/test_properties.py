"""Property tests (hypothesis): random shapes, heads, temperatures (inf included), lam, normalize,
dtype, layout and backend; forward, dx and dW against float64.

Profiles (HYPOTHESIS_PROFILE): "ci" (default) runs 200 examples; "long" runs 5,000, e.g.
    HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py
A failure prints the drawn case (hypothesis' falsifying example) and its reproduction blob. The
worst errors seen per dtype are printed at the end of the run.

Max heads have a gradient that jumps where two positions tie. Exact ties are fine (kernels and
torch.max both take the first position); examples whose top two scores differ by a nonzero amount
below 1e-4 of the row's scale are discarded, since rounding alone may order them either way.
Errors are relative to max(||ref||, ||the same sums over absolute values||) (see
helpers.error_scales): rounding error of a sum scales with the sum of |terms|, and random cases
include sums that cancel (a mean of scores near zero; dW of a normalised in_ch = 1 row, exactly 0).
Temperatures go up to 30 with unnormalised scores, where the softmax is ill-conditioned in fp32:
the tolerance grows with T * max|s| there (see _tolerance); in the official regime it is the
suite's usual one.
"""
import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import csra_triton
from csra_triton.reference import as_operand
from helpers import INF, TOL, WORST, error_scales, ref64, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def cases(draw):
    heads = draw(st.integers(1, 5))
    temp = st.one_of(st.just(INF), st.just(99.0), st.floats(0.05, 30.0))
    return dict(
        B=draw(st.integers(1, 3)), d=draw(st.integers(1, 40)), h=draw(st.integers(1, 6)),
        w=draw(st.integers(1, 12)), C=draw(st.integers(1, 12)),
        temps=draw(st.lists(temp, min_size=heads, max_size=heads)),
        lam=draw(st.floats(0.0, 2.0)), normalize=draw(st.booleans()),
        dtype=draw(st.sampled_from(list(DTYPES))),
        layout=draw(st.sampled_from(["nchw", "channels_last", "tokens"])),
        backend=draw(st.sampled_from(["triton", "torch"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _scores64(x, weight, normalize):
    w = as_operand(weight.double(), x.dtype)
    if normalize:
        w = w / w.norm(dim=-1, keepdim=True)
    return torch.einsum("hcd,bdn->bhcn", w, x.double().flatten(2))


def _near_tie(s, temps):
    """True if some max head has top-two scores apart by a nonzero gap below 1e-4 of the scale."""
    for k, t in enumerate(temps):
        if (math.isinf(t) or t == 99) and s.shape[-1] > 1:
            top = s[:, k].topk(2, dim=-1).values
            gap = top[..., 0] - top[..., 1]
            scale = s[:, k].abs().amax(dim=-1).clamp_min(1e-30)
            if ((gap > 0) & (gap < 1e-4 * scale)).any():
                return True
    return False


def _tolerance(dtype, s, temps):
    """TOL[dtype], or more where the softmax is ill-conditioned: fp32 rounding of s moves the
    softmax weights by ~T*|s|*eps, so the bound is max(TOL, 1e-7 * max_T T * max|s|). For the
    official temperatures (T <= 7) and normalised weights this is TOL itself."""
    finite = [t for t in temps if not (math.isinf(t) or t == 99)]
    cond = max(finite, default=0.0) * s.abs().max().item()
    return max(TOL[dtype], 1e-7 * cond)


@given(cases())
def test_forward_and_grads_match_float64(case):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    B, d, h, w, C, temps = (case[k] for k in ("B", "d", "h", "w", "C", "temps"))
    x = torch.randn(B, d, h, w, generator=gen).to(DEVICE, dtype)
    weight = torch.randn(len(temps), C, d, generator=gen).to(DEVICE)
    g = torch.randn(B, C, generator=gen).to(DEVICE)
    s64 = _scores64(x, weight, case["normalize"])
    assume(not _near_tie(s64, temps))
    if case["layout"] == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    xin = x.flatten(2).transpose(1, 2).contiguous() if case["layout"] == "tokens" else x
    xin.requires_grad_()
    weight.requires_grad_()
    layout = "tokens" if case["layout"] == "tokens" else "nchw"
    with csra_triton.use_backend(case["backend"]):
        y = csra_triton.csra(xin, weight, temps, case["lam"], case["normalize"], layout=layout)
        y.backward(g.to(dtype))
    dx = xin.grad.transpose(1, 2).reshape(x.shape) if layout == "tokens" else xin.grad
    ref, dx64, dw64 = ref64(x, weight, temps, case["lam"], case["normalize"], grad=g)
    # Each error is relative to max(||ref||, ||sum of |terms|||): see helpers.error_scales.
    scales = error_scales(x, weight, temps, case["lam"], case["normalize"], g)
    errs = tuple(rel_err(out, r, sc) for out, r, sc in
                 zip((y, dx, weight.grad), (ref, dx64, dw64), scales))
    worst = WORST.setdefault(case["dtype"], [0, 0.0, 0.0, 0.0])
    worst[0] += 1
    worst[1:] = [max(a, b) for a, b in zip(worst[1:], errs)]
    tol = _tolerance(dtype, s64, temps)
    assert y.dtype == dtype and dx.dtype == dtype and weight.grad.dtype == torch.float32
    assert max(errs) <= tol, dict(case, errors=errs)
