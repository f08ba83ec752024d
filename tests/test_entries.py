"""Every public entry (``csra``, ``CSRAFunction``, ``CSRATriton.forward``, ``forward_tokens``)
under every autograd mode, on both backends and both eager settings, against float64; and every
entry refusing what ``csra`` refuses, with the same message.

The AD modes: reverse, forward-mode dual tensors (``torch.autograd.forward_ad``), a batch of
gradients (``is_grads_batched``), double backward, ``vmap``, ``jvp``, ``jacfwd``, ``jacrev``, and
``jacobian(vectorize=True, strategy="forward-mode")``. Before this table, forward-mode AD outside
``torch.func`` returned no tangent (a zero Jacobian) on the eager and ops routes and raised on
the fallback's eager route, and ``CSRAFunction`` skipped ``csra``'s validation.
"""
import math

import pytest
import torch
from torch.autograd import forward_ad as fwAD

import csra_triton
from csra_triton import ops
from csra_triton.reference import csra_reference
from helpers import rel_err

TEMPS = [1.0, math.inf]
B, D, h, w, C, H = 2, 4, 2, 2, 3, 2
ENTRIES = ["csra", "CSRAFunction", "CSRATriton", "forward_tokens"]
MODES = ["reverse", "dual", "batched", "double", "vmap", "jvp", "jacfwd", "jacrev",
         "jacobian_forward"]
TOL = 1e-5          # fp32 inputs (helpers.TOL), float64 reference


@pytest.fixture(params=["eager", "ops"])
def eager(request, monkeypatch):
    monkeypatch.setattr(ops, "EAGER", request.param == "eager")
    return request.param


class _Tokens(torch.nn.Module):
    """``forward_tokens`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.forward_tokens(x.flatten(2).transpose(1, 2))


def _entry(name):
    """f(x (B, D, h, w), weight (H, C, D), lam (a 0-d tensor)) -> y (B, C) through ``name``,
    differentiable in all three (the module's parameters swapped in by functional_call)."""
    if name == "csra":
        return lambda x, wt, lam: csra_triton.csra(x, wt, TEMPS, lam)
    if name == "CSRAFunction":
        return lambda x, wt, lam: csra_triton.CSRAFunction.apply(x.flatten(2), wt, TEMPS, lam)
    head = csra_triton.CSRATriton(D, C, H, temperatures=TEMPS)
    head.lam = torch.nn.Parameter(torch.tensor(0.3))
    if name == "forward_tokens":
        module, prefix = _Tokens(head), "head."
    else:
        module, prefix = head, ""
    return lambda x, wt, lam: torch.func.functional_call(
        module, {prefix + "weight": wt, prefix + "lam": lam}, (x,))


def _ref(x, wt, lam):
    return csra_reference(x, wt, TEMPS, lam)


def _inputs():
    x = torch.randn(B, D, h, w)
    wt = torch.randn(H, C, D)
    lam = torch.tensor(0.3)
    return x, wt, lam


def _f64(*ts):
    return tuple(t.detach().double() for t in ts)


def _close(got, want):
    if isinstance(got, (tuple, list)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _close(a, b)
        return
    assert got is not None, "no result (a None tangent or gradient)"
    assert rel_err(got, want) <= TOL, rel_err(got, want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_every_entry_under_every_ad_mode(backend_name, entry, mode, eager):
    f = _entry(entry)
    x, wt, lam = _inputs()
    x64, w64, l64 = _f64(x, wt, lam)
    with ops.use_backend(backend_name):
        if mode == "reverse":
            g = torch.randn(B, C)
            args = [t.clone().requires_grad_() for t in (x, wt, lam)]
            got = torch.autograd.grad(f(*args), args, g)
            a64 = [t.clone().requires_grad_() for t in (x64, w64, l64)]
            want = torch.autograd.grad(_ref(*a64), a64, g.double())
        elif mode == "dual":
            tang = [torch.randn_like(t) for t in (x, wt, lam)]
            with fwAD.dual_level():
                y = f(*[fwAD.make_dual(t, d) for t, d in zip((x, wt, lam), tang)])
                got = fwAD.unpack_dual(y).tangent
            want = torch.func.jvp(_ref, (x64, w64, l64), tuple(d.double() for d in tang))[1]
        elif mode == "batched":
            gs = torch.randn(3, B, C)
            args = [t.clone().requires_grad_() for t in (x, wt, lam)]
            got = torch.autograd.grad(f(*args), args, gs, is_grads_batched=True)
            want = []
            for i in range(3):
                a64 = [t.clone().requires_grad_() for t in (x64, w64, l64)]
                want.append(torch.autograd.grad(_ref(*a64), a64, gs[i].double()))
            want = [torch.stack([wi[k] for wi in want]) for k in range(3)]
        elif mode == "double":
            g = torch.randn(B, C)

            def second(fn, ts):
                ts = [t.clone().requires_grad_() for t in ts]
                gx, gw = torch.autograd.grad(fn(*ts), ts[:2], g.to(ts[0].dtype),
                                             create_graph=True)
                return torch.autograd.grad(gx.square().sum() + gw.square().sum(), ts[:2])
            got = second(f, (x, wt, lam))
            want = second(_ref, (x64, w64, l64))
        elif mode == "vmap":
            xs = torch.randn(3, B, D, h, w)
            got = torch.func.vmap(f, in_dims=(0, None, None))(xs, wt, lam)
            want = torch.func.vmap(_ref, in_dims=(0, None, None))(xs.double(), w64, l64)
        elif mode == "jvp":
            tang = [torch.randn_like(t) for t in (x, wt, lam)]
            got = torch.func.jvp(f, (x, wt, lam), tuple(tang))[1]
            want = torch.func.jvp(_ref, (x64, w64, l64), tuple(d.double() for d in tang))[1]
        elif mode in ("jacfwd", "jacrev"):
            jac = getattr(torch.func, mode)
            got = jac(f, argnums=(0, 1, 2))(x, wt, lam)
            want = jac(_ref, argnums=(0, 1, 2))(x64, w64, l64)
        else:  # jacobian_forward
            got = torch.autograd.functional.jacobian(f, (x, wt, lam), vectorize=True,
                                                     strategy="forward-mode")
            want = torch.autograd.functional.jacobian(_ref, (x64, w64, l64))
    _close(got, want)


# --------------------------------------------------------------------------- refusals


def _bad_cases():
    """(label, x (NCHW), weight, temperatures, lam, normalize): each one thing wrong."""
    x, wt = torch.randn(B, D, h, w), torch.randn(H, C, D)
    ok = dict(x=x, weight=wt, temperatures=TEMPS, lam=0.3, normalize=True)
    cases = {
        "x int64": dict(x=x.long()),
        "x complex": dict(x=x.to(torch.complex64)),
        "x no positions": dict(x=torch.randn(B, D, 0, w)),
        "x channels": dict(x=torch.randn(B, D + 1, h, w)),
        "x not a tensor": dict(x=x.tolist()),
        "weight 2-D": dict(weight=wt[0]),
        "weight int": dict(weight=wt.long()),
        "weight on meta": dict(weight=wt.to("meta")),
        "temperatures count": dict(temperatures=[1.0]),
        "temperatures string": dict(temperatures="12"),
        "temperatures string element": dict(temperatures=[1.0, "2"]),
        "temperatures bool element": dict(temperatures=[True, 2.0]),
        "temperatures NaN": dict(temperatures=[math.nan, 2.0]),
        "temperatures zero": dict(temperatures=[0.0, 2.0]),
        "lam inf": dict(lam=math.inf),
        "lam string": dict(lam="0.3"),
        "lam bool": dict(lam=True),
        "lam 2 elements": dict(lam=torch.ones(2)),
        "normalize string": dict(normalize="no"),
        "normalize None": dict(normalize=None),
        "normalize 2": dict(normalize=2),
    }
    return {k: {**ok, **v} for k, v in cases.items()}


CASES = _bad_cases()


def _refusal(fn):
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    return info.type, str(info.value)


@pytest.mark.parametrize("case", list(CASES))
def test_every_entry_refuses_what_csra_refuses(case):
    """The same exception type, and the same message wherever the error is not about x's
    layout (whose messages name the layout each entry takes)."""
    a = CASES[case]
    want = _refusal(lambda: csra_triton.csra(a["x"], a["weight"], a["temperatures"], a["lam"],
                                             a["normalize"]))
    x = a["x"]
    tokens = x.flatten(2).transpose(1, 2) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
    bdn = x.flatten(2) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
    got = {
        "tokens": _refusal(lambda: csra_triton.csra(tokens, a["weight"], a["temperatures"],
                                                    a["lam"], a["normalize"], layout="tokens")),
        "CSRAFunction": _refusal(lambda: csra_triton.CSRAFunction.apply(
            bdn, a["weight"], a["temperatures"], a["lam"], a["normalize"])),
    }

    def module(tok):
        head = csra_triton.CSRATriton(D, C, H, temperatures=TEMPS)
        head.temperatures = a["temperatures"]
        lam = a["lam"]
        head.lam = torch.nn.Parameter(lam) if isinstance(lam, torch.Tensor) else lam
        head.normalize = a["normalize"]
        if a["weight"].device.type == "meta":
            head.to("meta")
        elif a["weight"].is_floating_point():
            head.weight.data = a["weight"]
        else:       # (an integer Parameter cannot require a gradient)
            head.weight = torch.nn.Parameter(a["weight"], requires_grad=False)
        return head.forward_tokens(tokens) if tok else head(x)
    got["CSRATriton"] = _refusal(lambda: module(False))
    got["forward_tokens"] = _refusal(lambda: module(True))
    for entry, (typ, msg) in got.items():
        assert typ is want[0], (entry, typ, msg, want)
        if case in ("x no positions", "x channels"):            # x's layout is named
            assert msg.startswith("x:"), (entry, msg)
        elif case == "weight 2-D" and entry.startswith(("CSRATriton", "forward")):
            assert msg.startswith("weight:"), (entry, msg)        # the module's own shape
        else:
            assert msg == want[1], (entry, msg, want[1])


def test_a_weight_left_on_meta_is_refused_by_the_op_too(monkeypatch):
    """The ops themselves refuse tensors on several devices: on the meta device an op runs its
    fake implementation, which would return unwritten outputs."""
    x, wt = torch.randn(B, D, h * w), torch.randn(H, C, D, device="meta")
    values = torch.tensor([*TEMPS, 0.3], dtype=torch.float64)
    with pytest.raises(ValueError, match="one device"):
        torch.ops.csra_triton.csra_fwd(x, wt, values, True)
