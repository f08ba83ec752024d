"""nn.Module's generic machinery applied to a head in random sequences (hypothesis
``RuleBasedStateMachine``), with eager, compiled (``aot_eager``; Inductor with dynamic shapes off
and on) and exported results checked against float64 after every step.

The steps are what generic code does to any module: ``.to(dtype)``, ``.type``, ``.double()`` /
``.float()``, ``to_empty`` and a reload, a rebuild on the meta device loaded with
``load_state_dict(assign=True)``, ``copy.copy`` (then a new lam on one of the two), ``deepcopy``,
a pickle round trip, ``share_memory``, ``load_state_dict``, a ``.data`` write; and a user's
assignments of lam (a number or learnable), temperatures and normalize. The compiled callables
are made once per run and kept across the steps, as a training script keeps its compiled model
(a rebuilt or copied head is compiled anew). A second copy of lam and the temperatures that
the machinery could move, cast, share or leave behind (as the module's former ``_scalars``
buffer) fails here on the first step that reaches it, whichever it is.
"""
import copy
import io
import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, \
    run_state_machine_as_test
from torch import nn

import csra_triton
from csra_triton.reference import as_operand, csra_reference
from helpers import TOL, rel_err

D, C, H = 6, 5, 4
TEMP = st.one_of(st.just(math.inf), st.just(99.0), st.floats(0.05, 8.0))
DTYPES = [torch.float32, torch.float64]
#: (max_examples, steps per run) per backend under the ``ci`` profile (200 examples), scaled
#: with the profile's example count.
BUDGET = {"triton": (4, 6), "torch": (10, 8)}


class Machinery(RuleBasedStateMachine):
    backend = "torch"

    @initialize(seed=st.integers(0, 2**16))
    def build(self, seed):
        torch.manual_seed(seed)
        self.head = csra_triton.CSRATriton(D, C, heads=H, lam=0.3)
        self._compile()

    def _compile(self):
        head = self.head
        self.compiled = {
            "aot_eager": torch.compile(head, backend="aot_eager", fullgraph=True),
            "inductor": torch.compile(head, backend="inductor", fullgraph=True, dynamic=False),
            "inductor-dynamic": torch.compile(head, backend="inductor", fullgraph=True,
                                              dynamic=True),
        }

    # ---------------------------------------------------------------- what users assign
    @rule(lam=st.floats(-1.0, 1.0))
    def set_lam(self, lam):
        self.head.lam = lam

    @rule(lam=st.floats(-1.0, 1.0))
    def set_learnable_lam(self, lam):
        dtype = self.head.weight.dtype
        self.head.lam = nn.Parameter(torch.tensor(lam, dtype=dtype))

    @rule(temps=st.lists(TEMP, min_size=H, max_size=H))
    def set_temperatures(self, temps):
        self.head.temperatures = temps

    @rule(value=st.booleans())
    def set_normalize(self, value):
        self.head.normalize = value

    # ---------------------------------------------------------------- nn.Module's machinery
    @rule(dtype=st.sampled_from(DTYPES), how=st.sampled_from(["to", "type", "method"]))
    def cast(self, dtype, how):
        head = self.head
        if how == "to":
            head.to(dtype)
        elif how == "type":
            head.type(dtype)          # every tensor of the module, buffers included
        else:
            head.double() if dtype == torch.float64 else head.float()

    @rule()
    def to_empty_and_reload(self):
        sd = {k: v.clone() for k, v in self.head.state_dict().items()}
        self.head.to_empty(device="cpu")
        self.head.load_state_dict(sd)

    @rule()
    def rebuild_on_meta_and_assign(self):
        old = self.head
        sd = {k: v.clone() for k, v in old.state_dict().items()}
        with torch.device("meta"):
            head = csra_triton.CSRATriton(D, C, heads=H, temperatures=old.temperatures,
                                          normalize=old.normalize)
            if isinstance(old.lam, torch.Tensor):
                head.lam = nn.Parameter(torch.empty((), dtype=old.lam.dtype))
            else:
                head.lam = old.lam
        head.load_state_dict(sd, assign=True)
        self.head = head
        self._compile()

    @rule(lam=st.floats(-1.0, 1.0), keep_copy=st.booleans())
    def shallow_copy(self, lam, keep_copy):
        """``copy.copy``: the copy gets a new lam; the run goes on with either of the two, and
        the other is checked here, unchanged."""
        original = self.head
        x = _x(original)
        before = _reference(original, x, None)[0]
        twin = copy.copy(original)
        twin.lam = lam
        with torch.no_grad():
            _check(self.compiled["aot_eager"](x), before, TOL[x.dtype], "copy.copy: original")
            _check(original(x), before, TOL[x.dtype], "copy.copy: the original, eager")
        if keep_copy:
            self.head = twin
            self._compile()

    @rule(how=st.sampled_from(["deepcopy", "pickle"]))
    def round_trip(self, how):
        if how == "deepcopy":
            self.head = copy.deepcopy(self.head)
        else:
            buf = io.BytesIO()
            torch.save(self.head, buf)
            buf.seek(0)
            self.head = torch.load(buf, weights_only=False)
        self._compile()

    @rule()
    def share_memory(self):
        self.head.share_memory()

    @rule(scale=st.floats(0.5, 2.0))
    def load_scaled_state_dict(self, scale):
        sd = {k: v * scale for k, v in self.head.state_dict().items()}
        self.head.load_state_dict(sd)

    @rule(scale=st.floats(0.5, 2.0))
    def data_write(self, scale):
        self.head.weight.data.mul_(scale)

    # ---------------------------------------------------------------- the check
    @invariant()
    def results_match_float64(self):
        head = self.head
        x = _x(head)
        g = torch.randn(2, C, dtype=head.weight.dtype)
        ref, dx64, dw64 = _reference(head, x, g)
        tol = TOL[x.dtype]
        with torch.no_grad():
            _check(head(x), ref, tol, "eager inference")
            ep = torch.export.export(head, (x,))
            _check(ep.module()(x), ref, tol, "export")
            _check(self.compiled["inductor-dynamic"](x), ref, tol, "inductor (dynamic)")
        for name in ("eager", "aot_eager", "inductor"):
            fn = head if name == "eager" else self.compiled[name]
            xg = x.clone().requires_grad_()
            head.weight.grad = None
            y = fn(xg)
            y.backward(g)
            _check(y, ref, tol, name)
            _check(xg.grad, dx64, tol, name + " dx")
            _check(head.weight.grad, dw64, tol, name + " dW")


def _x(head):
    return torch.randn(2, D, 2, 3, dtype=head.weight.dtype)


def _reference(head, x, g):
    """float64 y (and with ``g``: dx, dW) on the head's current values, the weight rounded to
    x's dtype as the products see it (``csra_reference``: no code shared with the head)."""
    lam = head.lam
    lam = lam.item() if isinstance(lam, torch.Tensor) else lam
    x64 = x.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    y = csra_reference(x64, as_operand(w64, x.dtype), head.temperatures, lam, head.normalize)
    if g is None:
        return y.detach(), None, None
    dx, dw = torch.autograd.grad(y, (x64, w64), g.double())
    return y.detach(), dx, dw


def _check(got, want, tol, what):
    assert got is not None, what
    err = rel_err(got, want)
    assert err <= tol, (what, err, tol)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_module_machinery_in_random_sequences(backend_name):
    examples, steps = BUDGET[backend_name]
    scale = settings.default.max_examples / 200
    machine = type(f"Machinery_{backend_name}", (Machinery,), {"backend": backend_name})
    torch._dynamo.reset()
    with csra_triton.use_backend(backend_name), torch._dynamo.config.patch(recompile_limit=64):
        run_state_machine_as_test(machine, settings=settings(
            settings.default, max_examples=max(1, round(examples * scale)),
            stateful_step_count=steps))
