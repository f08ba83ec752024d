"""Training setups beyond a plain backward (issue 28): double backward (a gradient penalty,
``create_graph=True``) and torch.func (``grad``, per-sample gradients by ``vmap(grad)``,
``jacrev``), on both backends against float64.

Under ``create_graph=True`` the op's backward computes its first derivatives through the
composite (``graph.composite``), which autograd differentiates again; under a torch.func transform
the module runs the composite. Each test fails when that routing is removed: the op then raises
("no autograd formula" for the double backward; functorch's own error for the transforms).
"""
import math
import os
import socket
import tempfile

import pytest
import torch
from torch import nn

import csra_triton
from csra_triton.reference import csra_reference
from helpers import INF, TOL, rel_err

import fsdp_worker

BACKENDS = ["triton", "torch"]
TEMPS = [1.0, 2.0, 4.0, 99]
TEMPS_REF = [1.0, 2.0, 4.0, INF]
#: float64 throughout: the op and the float64 reference agree to ~1e-15 (rounding of sums of a
#: few hundred terms); 1e-10 leaves room for the softmax's exp without hiding a wrong formula.
TOL64 = 1e-10


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("backend, layout", [("triton", "nchw"), ("torch", "nchw"),
                                             ("torch", "tokens")])
def test_gradgradcheck(backend, layout):
    """Second derivatives through the head, x and W (and a learnable lam), by finite
    differences of the analytic first derivatives (torch.autograd.gradgradcheck, float64;
    small, since every finite difference is a forward in Triton's interpreter)."""
    x = torch.randn(2, 3, 2, 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    if layout == "tokens":
        x = x.detach().flatten(2).transpose(1, 2).contiguous().requires_grad_()

    def f(x, w, lam):
        return csra_triton.csra(x, w, TEMPS, lam, layout=layout)

    with csra_triton.use_backend(backend):
        assert torch.autograd.gradcheck(f, (x, w, lam))
        assert torch.autograd.gradgradcheck(f, (x, w, lam))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_step(backend):
    """One SGD step on BCE + a gradient penalty ||d loss / d x||^2 (create_graph=True) gives
    the float64 reference's weight; the penalty's gradient is the double backward."""
    torch.manual_seed(0)
    head = csra_triton.CSRATriton(8, 5, heads=4, lam=0.3).double()
    w_ref = head.weight.detach().clone().requires_grad_()
    x = torch.randn(3, 8, 3, 3, dtype=torch.float64)
    target = (torch.rand(3, 5) < 0.5).double()

    def step(logits_fn, params):
        xg = x.clone().requires_grad_()
        loss = nn.functional.binary_cross_entropy_with_logits(logits_fn(xg), target)
        (gx,) = torch.autograd.grad(loss, xg, create_graph=True)
        total = loss + 10.0 * gx.pow(2).sum()
        return torch.autograd.grad(total, params)

    with csra_triton.use_backend(backend):
        (g_ours,) = step(head, [head.weight])
    (g_ref,) = step(lambda xg: csra_reference(xg, w_ref, TEMPS_REF, 0.3), [w_ref])
    # the penalty's part is not negligible: without it the gradient differs
    (g_plain,) = torch.autograd.grad(nn.functional.binary_cross_entropy_with_logits(
        csra_reference(x, w_ref, TEMPS_REF, 0.3), target), w_ref)
    assert _rel(g_plain, g_ref) > 1e-2
    assert _rel(g_ours, g_ref) <= TOL64


def test_first_order_backward_still_runs_the_op(monkeypatch):
    """Without create_graph the backward is the op's own (the composite is not used)."""
    from csra_triton import graph

    called = []
    real = graph.composite
    monkeypatch.setattr(graph, "composite", lambda *a, **k: called.append(1) or real(*a, **k))
    x = torch.randn(2, 6, 3, 2, requires_grad=True)
    w = torch.randn(4, 3, 6, requires_grad=True)
    csra_triton.csra(x, w, TEMPS, 0.3).sum().backward()
    assert not called and x.grad is not None


def _head_and_batch():
    torch.manual_seed(1)
    head = csra_triton.CSRATriton(6, 4, heads=4, lam=0.25).double()
    x = torch.randn(5, 6, 3, 2, dtype=torch.float64)
    target = (torch.rand(5, 4) < 0.5).double()
    return head, x, target


def _loss(logits, target):
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_per_sample_gradients(backend):
    """torch.func.grad of a functional_call, and per-sample gradients (vmap of grad, as Opacus
    and functorch users compute them), equal float64's computed one sample at a time."""
    head, x, target = _head_and_batch()
    params = {k: v.detach() for k, v in head.named_parameters()}

    def loss(p, xb, tb):
        return _loss(torch.func.functional_call(head, p, (xb,)), tb)

    def loss_ref(w, xb, tb):
        return _loss(csra_reference(xb, w, TEMPS_REF, 0.25), tb)

    with csra_triton.use_backend(backend):
        g = torch.func.grad(loss)(params, x, target)["weight"]
        per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
            params, x.unsqueeze(1), target.unsqueeze(1))["weight"]
    w = params["weight"].clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(loss_ref(w, x, target), w)
    assert _rel(g, g_ref) <= TOL64
    assert per.shape == (5, *w.shape)
    for i in range(5):
        (gi,) = torch.autograd.grad(loss_ref(w, x[i:i + 1], target[i:i + 1]), w)
        assert _rel(per[i], gi) <= TOL64


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_jacrev(backend):
    """The Jacobian of the logits with respect to the features and to the weight."""
    head, x, _ = _head_and_batch()
    w = head.weight.detach()
    with csra_triton.use_backend(backend):
        jx = torch.func.jacrev(head)(x)
        jw = torch.func.jacrev(lambda w_: torch.func.functional_call(head, {"weight": w_},
                                                                     (x,)))(w)
        jf = torch.func.jacrev(lambda x_: csra_triton.CSRAFunction.apply(
            x_.flatten(2), w, TEMPS, 0.25))(x)
    jx_ref = torch.autograd.functional.jacobian(lambda x_: csra_reference(x_, w, TEMPS_REF, 0.25), x)
    jw_ref = torch.autograd.functional.jacobian(lambda w_: csra_reference(x, w_, TEMPS_REF, 0.25), w)
    assert _rel(jx, jx_ref) <= TOL64 and _rel(jf, jx_ref) <= TOL64
    assert _rel(jw, jw_ref) <= TOL64


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_vmap_forward(backend):
    """vmap of the forward over a leading dimension (e.g. an ensemble of inputs)."""
    head, x, _ = _head_and_batch()
    xs = torch.stack([x, 2 * x, -x])
    with csra_triton.use_backend(backend):
        ys = torch.func.vmap(head)(xs)
    for i in range(3):
        assert _rel(ys[i], csra_reference(xs[i], head.weight.detach(), TEMPS_REF, 0.25)) <= TOL64
    assert not math.isnan(ys.sum().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_step_equals_single_process(backend):
    """FSDP2 (``fully_shard``) on two gloo ranks, each on half of the batch: the sharded weight
    after an eager SGD step, then after a step of the sharded model under torch.compile, equals
    one process's two steps on the whole batch."""
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.multiprocessing.spawn(fsdp_worker.worker,
                                    args=(2, f"tcp://127.0.0.1:{port}", tmp, backend),
                                    nprocs=2, join=True)
        got = torch.load(os.path.join(tmp, f"fsdp-{backend}.pt"))
    assert got["sharded"] == (2, 6, 8)                 # the weight really was sharded
    head, x, target = fsdp_worker.make()
    w0 = head.weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    with csra_triton.use_backend(backend):
        for k in range(2):
            fsdp_worker.step(head, opt, x, target)
            assert rel_err(got["weights"][k], head.weight) <= TOL[torch.float32], k
    assert rel_err(head.weight, w0) > 1e-3                    # the steps moved the weight


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_checkpointing(backend, reentrant):
    """``torch.utils.checkpoint`` around a trunk + head recomputes the head's forward in the
    backward: the same gradients as without it (bit for bit: the same kernels run)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    head = csra_triton.CSRATriton(8, 5, heads=4, lam=0.3)
    x = torch.randn(2, 3, 4, 4)

    def block(x):
        return head(torch.relu(conv(x)))

    grads = []
    with csra_triton.use_backend(backend):
        for ckpt in (False, True):
            xg = x.clone().requires_grad_()
            y = (torch.utils.checkpoint.checkpoint(block, xg, use_reentrant=reentrant)
                 if ckpt else block(xg))
            y.pow(2).sum().backward()
            grads.append([xg.grad, conv.weight.grad.clone(), head.weight.grad.clone()])
            conv.weight.grad = head.weight.grad = conv.bias.grad = None
    for a, b in zip(*grads):
        assert torch.equal(a, b)
