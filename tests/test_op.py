"""The registered ops: opcheck, the autograd.Function, torch.compile."""
import math

import pytest
import torch

import csra_triton
import csra_triton.fallback as fallback
from helpers import INF, op_values, rel_err

TEMPS = [1.0, 2.0, 4.0, math.inf]


@pytest.fixture(params=["triton", "torch", "torch-fp32gemm", "reference"])
def backend(request):
    """The conftest's backends, and a third implementation registered here (the float64
    reference behind the interface, tests/reference_impl.py): the op-level tests below run
    through each, unchanged."""
    import reference_impl
    from csra_triton import ops

    name = request.param
    old = fallback.BF16_GEMM
    fallback.BF16_GEMM = name != "torch-fp32gemm"
    if name == "reference":
        ops.register("reference", reference_impl)
    try:
        with ops.use_backend(name.split("-")[0]):
            yield name.split("-")[0]
    finally:
        fallback.BF16_GEMM = old
        if name == "reference":
            ops.unregister("reference")


def _state(x3, weight):
    return torch.ops.csra_triton.csra_fwd(x3, weight, op_values(TEMPS, 0.1, x3.device), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_fwd(dtype, backend, device):
    x3 = torch.randn(2, 8, 9, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 5, 8, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.csra_triton.csra_fwd.default,
                          (x3, weight, op_values(TEMPS, 0.1, device), True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_fwd_empty_batch(dtype, backend, device):
    """B = 0: only the weight is prepared (the Triton path's prep launch), and still every
    output is defined (the kept prepared weight is the weight in x's dtype, not uninitialised
    memory)."""
    x3 = torch.randn(0, 16, 3, device=device).to(dtype).requires_grad_()
    weight = torch.randn(2, 4, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.csra_triton.csra_fwd.default,
                          (x3, weight, op_values([1.0, INF], 0.1, device), True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_bwd(dtype, backend, device):
    """What the forward keeps for the backward, each in its own slot, as the implementation's
    keep rules say (``kept_output``, ``scores_output``): ``kept`` the prepared weight (the
    Triton path: rows in x's dtype, the weight exactly), ``scores`` the score products (8
    score rows <= 16 channels): the CPU fallback's (H*C, B*N) in its GEMM dtype, the Triton
    path's raw (H, C, B, N) in fp32, which equal the float64 products to the rounding of a
    d = 16 dot of rounded operands."""
    from csra_triton import common, ops

    x3 = torch.randn(2, 16, 9, device=device).to(dtype)
    weight = torch.randn(4, 2, 16, device=device)
    _, *state = _state(x3, weight)
    kept, scores = state[-2:]
    impl = ops.implementation(backend, x3)
    want_kept = impl.kept_output(x3, weight, True, common.empty)
    want_scores = impl.scores_output(x3, weight, True, common.empty)
    assert (kept.shape, kept.dtype) == (want_kept.shape, want_kept.dtype)
    assert (scores.shape, scores.dtype) == (want_scores.shape, want_scores.dtype)
    if kept.numel():
        torch.testing.assert_close(kept.float(), weight.to(dtype).view(8, 16).float(),
                                   rtol=0, atol=0)
    if scores.shape == (4, 2, 2, 9):
        ref = torch.einsum("kcd,bdn->kcbn", weight.to(dtype).double(), x3.double())
        # fp32 accumulation of 16 products of exactly representable operands: |err| <=
        # 16 * 2^-24 * sum |w x| (the bound of a recursive sum), a few ulps here
        bound = 16 * 2.0 ** -24 * torch.einsum("kcd,bdn->kcbn", weight.to(dtype).double().abs(),
                                                x3.double().abs())
        assert ((scores.double() - ref).abs() <= bound).all()
    g = torch.randn(2, 2, device=device).to(dtype)
    torch.library.opcheck(torch.ops.csra_triton.csra_bwd.default,
                          (g, x3, weight, *state, op_values(TEMPS, 0.1, device), True))


def test_opcheck_fwd_keeps_bf16_products(backend, device):
    x3 = torch.randn(2, 16, 9, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 2, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.csra_triton.csra_fwd.default,
                          (x3, weight, op_values(TEMPS, 0.1, device), True))


def test_opcheck_strided_input(backend, device):
    """Channels-last and token layouts reach the op as strided views."""
    x = torch.randn(2, 8, 3, 3, device=device).to(memory_format=torch.channels_last)
    weight = torch.randn(4, 5, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.csra_triton.csra_fwd.default,
                          (x.flatten(2), weight, op_values(TEMPS, 0.1, device), True))


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
    """Every registered implementation provides what csra_triton.interface declares (a renamed
    or missing member fails here, not in some backward): forward's Forward with a ForwardState,
    the keep rules agreeing with what forward returns, a Backward with every BackwardPass
    member, the same parameter names."""
    import inspect

    from csra_triton import common, interface, ops

    x3 = torch.randn(2, 16, 9, device=device)
    weight = torch.randn(4, 2, 16, device=device)
    impl = ops.implementation(backend, x3)
    for name in interface.Implementation.__annotations__:
        assert hasattr(impl, name), name
    assert list(inspect.signature(impl.forward).parameters) == [
        "x", "weight", "scalars", "normalize", "keep", "y_dtype", "packed"]
    assert list(inspect.signature(impl.Backward).parameters) == [
        "grad_y", "x", "weight", "state", "scalars", "normalize", "plan"]
    scalars = common.scalars(TEMPS, 0.1, 4)
    f = impl.forward(x3, weight, scalars, True, True)
    assert isinstance(f, interface.Forward) and isinstance(f.state, interface.ForwardState)
    assert f.state.scores.shape == impl.scores_output(x3, weight, True, common.empty).shape
    assert f.state.kept.shape == impl.kept_output(x3, weight, True, common.empty).shape
    bw = impl.Backward(torch.ones_like(f.y), x3, weight, f.state, scalars, True)
    members = set(interface.BackwardPass.__annotations__) | {
        n for n, v in vars(interface.BackwardPass).items() if callable(v) and n[0] != "_"}
    assert {"chunk", "ws", "x_dk", "w_gemm", "gemm", "dx_dtype", "mm", "ds",
            "new_weight_grad", "chunk_done", "finish"} == members
    for name in members:
        assert hasattr(bw, name), name


def test_a_new_backend_is_one_module_and_one_registry_line(device):
    """The float64 reference registered as a third implementation: every route of a call
    (eager, the ops, torch.compile) runs it, with y, dx and dW equal to float64's to its own
    rounding, and the automatic choice never picks it (``serves`` is False)."""
    import reference_impl
    from csra_triton import ops
    from helpers import ref64

    ops.register("reference", reference_impl)
    try:
        assert ops.backend_for(torch.device(device), torch.float32) != "reference"
        head = csra_triton.CSRATriton(8, 5, heads=4).double().to(device)
        x = torch.randn(2, 8, 3, 3, device=device, dtype=torch.float64)
        g = torch.randn(2, 5, device=device, dtype=torch.float64)
        _, dx64, dw64 = ref64(x, head.weight, list(head.temperatures), head.lam, grad=g)
        y64 = ref64(x, head.weight, list(head.temperatures), head.lam)
        torch._dynamo.reset()
        for route, fn in (("eager", head), ("compile", torch.compile(head, fullgraph=True))):
            for eager in (True, False):
                old, ops.EAGER = ops.EAGER, eager
                try:
                    xg = x.clone().requires_grad_()
                    head.weight.grad = None
                    with ops.use_backend("reference"):
                        y = fn(xg)
                        y.backward(g)
                finally:
                    ops.EAGER = old
                assert rel_err(y, y64) <= 1e-12, route
                assert rel_err(xg.grad, dx64) <= 1e-12 and rel_err(head.weight.grad, dw64) \
                    <= 1e-12, route
    finally:
        ops.unregister("reference")
