"""Forward against independent float64 computations, on both backends."""
import pytest
import torch

import csra_triton
from csra_triton import common, triton_impl, tuning
from csra_triton.reference import MHA, OFFICIAL_TEMPERATURES
from helpers import INF, TOL, ref64, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TEMPS = {**{f"official{h}": t for h, t in OFFICIAL_TEMPERATURES.items()}, "custom": [0.5, 3, INF]}


def _inputs(B, d, h, w, H, C, dtype, device, scale=1.0):
    x = (torch.randn(B, d, h, w, device=device) * scale).to(dtype)
    weight = torch.randn(H, C, d, device=device)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temps", list(TEMPS.values()), ids=list(TEMPS))
def test_heads(temps, normalize, dtype, backend, device):
    x, weight = _inputs(2, 24, 3, 5, len(temps), 7, dtype, device)
    y = csra_triton.csra(x, weight, temps, 0.1, normalize)
    assert y.dtype == dtype and y.shape == (2, 7)
    assert rel_err(y, ref64(x, weight, temps, 0.1, normalize)) <= TOL[dtype]


@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_lam(lam, backend, device):
    x, weight = _inputs(3, 16, 4, 4, 4, 5, torch.float32, device)
    temps = [1, 2, 4, 99]
    y = csra_triton.csra(x, weight, temps, lam)
    assert rel_err(y, ref64(x, weight, temps, lam)) <= TOL[torch.float32]


SHAPES = {  # B, d, h, w, C, heads
    "N=1": (2, 20, 1, 1, 6, 4),
    "C=1": (2, 20, 3, 3, 1, 4),
    "B=1": (1, 20, 3, 3, 6, 4),
    "d=3": (2, 3, 3, 3, 6, 2),
    "d=129": (2, 129, 2, 3, 5, 4),
    "N=577": (2, 16, 1, 577, 5, 4),
    "N=784": (1, 16, 28, 28, 3, 8),
    "C=37,H=6": (2, 20, 5, 3, 37, 6),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_shapes(shape, dtype, backend, device):
    B, d, h, w, C, H = shape
    temps = OFFICIAL_TEMPERATURES[H]
    x, weight = _inputs(B, d, h, w, H, C, dtype, device)
    y = csra_triton.csra(x, weight, temps, 0.1)
    assert rel_err(y, ref64(x, weight, temps, 0.1)) <= TOL[dtype]


def test_matches_official_structure(backend, device):
    """Against the eager module written like the official code, both in float64."""
    x, weight = _inputs(2, 32, 5, 5, 4, 9, torch.float64, device)
    temps = OFFICIAL_TEMPERATURES[4]
    official = MHA.from_weight(weight.double(), temps, 0.2)
    y = csra_triton.csra(x, weight.double(), temps, 0.2)
    assert rel_err(y, official(x)) <= 1e-12


def test_large_temperature_and_magnitude(backend, device):
    """The online softmax must not overflow for large T * s."""
    x, weight = _inputs(2, 16, 7, 7, 4, 5, torch.float32, device, scale=30.0)
    temps = [50.0, 100.0, 2.0, INF]
    y = csra_triton.csra(x, weight, temps, 1.0, normalize=False)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref64(x, weight, temps, 1.0, False)) <= 1e-5


def test_mixed_weight_dtype(backend, device):
    """fp32 weight with bf16 features (as under autocast): products in bf16, norms in fp32."""
    x, weight = _inputs(2, 40, 4, 4, 4, 6, torch.bfloat16, device)
    temps = [1, 2, 4, INF]
    y = csra_triton.csra(x, weight, temps, 0.1)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref64(x, weight, temps, 0.1)) <= TOL[torch.bfloat16]


def test_backends_agree(device):
    x, weight = _inputs(3, 50, 6, 6, 4, 11, torch.float32, device)
    temps = [1, 2, 4, INF]
    with csra_triton.use_backend("triton"):
        a = csra_triton.csra(x, weight, temps, 0.3)
    with csra_triton.use_backend("torch"):
        b = csra_triton.csra(x, weight, temps, 0.3)
    assert rel_err(a, b) <= 1e-6


def test_tf32_follows_cudnn_flag(device):
    """fp32 scores use TF32 tensor cores exactly when torch.backends.cudnn.allow_tf32 is True
    (as the official 1x1 conv does; PyTorch's default), IEEE fp32 otherwise. TF32 keeps 10
    mantissa bits: ~1e-3 relative error against float64, where IEEE fp32 gives ~1e-7. The
    interpreter (CPU) has no TF32, so there the flag changes nothing."""
    x, weight = _inputs(4, 256, 7, 7, 4, 20, torch.float32, device)
    temps = OFFICIAL_TEMPERATURES[4]
    ref = ref64(x, weight, temps, 0.1)
    errs = {}
    old = torch.backends.cudnn.allow_tf32
    try:
        for flag in (False, True):
            torch.backends.cudnn.allow_tf32 = flag
            with csra_triton.use_backend("triton"):
                errs[flag] = rel_err(csra_triton.csra(x, weight, temps, 0.1), ref)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert errs[False] <= 1e-5
    if device == "cuda":
        assert 1e-5 < errs[True] <= 5e-3, errs
    else:
        assert errs[True] == errs[False]      # the interpreter has no TF32
    # What a GPU launch carries (the compile report compiles exactly these): TF32 products
    # exactly when the flag is on and x is fp32.
    x3 = x.flatten(2)
    H, C, D = weight.shape
    outs = common.fwd_outputs(x3, H, C, common.empty)
    cfg = tuning.default_config(H, C, D, x3.shape[2], 4)
    try:
        for flag in (False, True):
            torch.backends.cudnn.allow_tf32 = flag
            for xx in (x3, x3.to(torch.bfloat16)):
                w_op = torch.empty(H * C, D, dtype=xx.dtype)
                calls = [triton_impl.fwd_call(xx, w_op, outs[5], torch.empty(H + 2), outs, cfg, H,
                                              target="sm_90a"),
                         triton_impl.ds_call(xx, w_op, outs[5], torch.empty(H + 2),
                                             torch.empty(4, C), outs[1:5], 0, C,
                                             torch.empty(H, C, 4, 49), cfg, H, target="sm_90a")]
                want = "tf32" if flag and xx.dtype == torch.float32 else "ieee"
                assert [c.constexprs["PRECISION"] for c in calls] == [want, want]
    finally:
        torch.backends.cudnn.allow_tf32 = old
