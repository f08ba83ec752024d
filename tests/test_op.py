"""The registered ops: opcheck, the autograd.Function, torch.compile."""
import math

import pytest
import torch

import csra_triton
import csra_triton.fallback as fallback
from helpers import INF, rel_err

TEMPS = [1.0, 2.0, 4.0, math.inf]


def _state(x3, weight):
    return torch.ops.csra_triton.csra_fwd(x3, weight, TEMPS, 0.1, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_fwd(dtype, backend, device):
    x3 = torch.randn(2, 8, 9, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 5, 8, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.csra_triton.csra_fwd.default, (x3, weight, TEMPS, 0.1, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_fwd_empty_batch(dtype, backend, device):
    """B = 0: only the weight is prepared (the Triton path's prep launch), and still every
    output is defined (the kept prepared weight is the weight in x's dtype, not uninitialised
    memory)."""
    x3 = torch.randn(0, 16, 3, device=device).to(dtype).requires_grad_()
    weight = torch.randn(2, 4, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.csra_triton.csra_fwd.default,
                          (x3, weight, [1.0, 0.0], 0.1, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_bwd(dtype, backend, device):
    """What the forward keeps for the backward, each in its own slot: ``kept`` the prepared
    weight (the Triton path: rows in x's dtype; never on the fallback), ``scores`` the score
    products (8 score rows <= 16 channels): the CPU fallback's (H*C, B*N) in its GEMM dtype,
    the Triton path's raw (H, C, B, N) in fp32, which equal the float64 products to the
    rounding of a d = 16 dot of rounded operands."""
    x3 = torch.randn(2, 16, 9, device=device).to(dtype)
    weight = torch.randn(4, 2, 16, device=device)
    _, *state = _state(x3, weight)
    kept, scores = state[-2:]
    if backend == "torch":
        keeps = device == "cpu"
        assert kept.shape == (0,)
        assert scores.shape == ((8, 18) if keeps else (0,))
        assert scores.dtype == (fallback.gemm_dtype(dtype, x3.device) if keeps else torch.float32)
    else:
        assert scores.dtype == torch.float32
        assert kept.shape == (8, 16) and kept.dtype == dtype
        torch.testing.assert_close(kept.float(), weight.to(dtype).view(8, 16).float(),
                                   rtol=0, atol=0)
        ref = torch.einsum("kcd,bdn->kcbn", weight.to(dtype).double(), x3.double())
        assert scores.shape == (4, 2, 2, 9)
        # fp32 accumulation of 16 products of exactly representable operands: |err| <=
        # 16 * 2^-24 * sum |w x| (the bound of a recursive sum), a few ulps here
        bound = 16 * 2.0 ** -24 * torch.einsum("kcd,bdn->kcbn", weight.to(dtype).double().abs(),
                                                x3.double().abs())
        assert ((scores.double() - ref).abs() <= bound).all()
    g = torch.randn(2, 2, device=device).to(dtype)
    torch.library.opcheck(torch.ops.csra_triton.csra_bwd.default,
                          (g, x3, weight, *state, TEMPS, 0.1, True))


def test_opcheck_fwd_keeps_bf16_products(backend, device):
    x3 = torch.randn(2, 16, 9, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 2, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.csra_triton.csra_fwd.default, (x3, weight, TEMPS, 0.1, True))


def test_opcheck_strided_input(backend, device):
    """Channels-last and token layouts reach the op as strided views."""
    x = torch.randn(2, 8, 3, 3, device=device).to(memory_format=torch.channels_last)
    weight = torch.randn(4, 5, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.csra_triton.csra_fwd.default,
                          (x.flatten(2), weight, TEMPS, 0.1, True))


def test_autograd_function(backend, device):
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    weight = torch.randn(4, 5, 8, device=device, requires_grad=True)
    y = csra_triton.CSRAFunction.apply(x.flatten(2), weight, TEMPS, 0.1, True)
    y.sum().backward()
    gx, gw = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    y2 = csra_triton.csra(x, weight, TEMPS, 0.1)
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(gx, x.grad) and torch.equal(gw, weight.grad)


def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    m = csra_triton.CSRATriton(8, 5, heads=4).to(device)
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    gx, gw = x.grad.clone(), m.weight.grad.clone()
    x.grad = m.weight.grad = None
    y2 = m(x)
    y2.square().sum().backward()
    assert rel_err(y, y2) <= 1e-6
    assert rel_err(gx, x.grad) <= 1e-6 and rel_err(gw, m.weight.grad) <= 1e-6


def test_compile_autograd_function(device):
    torch._dynamo.reset()
    x = torch.randn(2, 8, 3, 3, device=device, requires_grad=True)
    weight = torch.randn(2, 5, 8, device=device, requires_grad=True)
    f = torch.compile(lambda a, w: csra_triton.CSRAFunction.apply(a.flatten(2), w, [1.0, INF],
                                                                  0.2, True), fullgraph=True)
    f(x, weight).sum().backward()
    gx, gw = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    csra_triton.csra(x, weight, [1.0, INF], 0.2).sum().backward()
    assert rel_err(gx, x.grad) <= 1e-6 and rel_err(gw, weight.grad) <= 1e-6


def test_implementations_declare_the_interface(backend, device):
    """Both implementations provide what csra_triton.interface declares (a renamed or missing
    member fails here, not in some backward): forward's outputs as ForwardState, a Backward
    with every BackwardPass member, the same parameter names."""
    import inspect

    from csra_triton import common, interface, ops

    x3 = torch.randn(2, 16, 9, device=device)
    weight = torch.randn(4, 2, 16, device=device)
    impl = ops.implementation(x3, backend)
    for name in ("forward", "Backward", "scores_output"):
        assert callable(getattr(impl, name)), name
    params = list(inspect.signature(impl.forward).parameters)
    assert params[:8] == ["x", "weight", "temps", "lam", "normalize", "keep", "lam_t",
                          "y_dtype"], params
    assert list(inspect.signature(impl.Backward).parameters)[:12] == [
        "grad_y", "x", "weight", "state", "inv_n", "kept", "temps", "lam", "normalize",
        "scores", "lam_t", "launch_plan"]
    y, *rest = impl.forward(x3, weight, TEMPS, 0.1, True, True)[:8]
    state = interface.ForwardState(*rest)
    assert state.scores.shape == impl.scores_output(x3, weight, True, common.empty).shape
    bw = impl.Backward(torch.ones_like(y), x3, weight, tuple(state[:4]), state.inv_norm,
                       state.kept, TEMPS, 0.1, True, state.scores)
    members = set(interface.BackwardPass.__annotations__) | {
        n for n, v in vars(interface.BackwardPass).items() if callable(v) and n[0] != "_"}
    assert {"chunk", "ws", "x_dk", "w_gemm", "gemm", "dx_dtype", "mm", "ds",
            "new_weight_grad", "chunk_done", "finish"} == members
    for name in members:
        assert hasattr(bw, name), name
