"""A random walk through the public API (hypothesis ``RuleBasedStateMachine``), checked against
float64 after every step.

One head per run, driven by a random sequence of what users do to it: assign temperatures
(finite, 99, inf), lam (a number, or a learnable ``nn.Parameter``) and normalize; take plain,
foreach and fused optimizer steps; write the weight behind the version counter (``.data``, a
numpy view, ``vector_to_parameters``, a write into ``weight.detach()``); cast the module between
fp32 and fp64; round-trip it through ``state_dict``, the official layout and pickling; switch
the input layout (NCHW, channels_last, tokens); compile it (``aot_eager``: Dynamo, the custom op
and its fake implementation, the ``_scalars`` buffer; Inductor itself is covered by
tests/test_integration.py). A check runs the head (eager, or compiled where it is) on fresh x,
with or without gradients, and compares y, dx, dW and a learnable lam's gradient with float64
on the values the head holds at that moment (``csra_reference``, which shares no code with the
head). Each backend is its own test; a failure prints the steps that reproduce it.

Budget: the Triton walk is interpreted (~0.1 s a checked training call), so its runs are few
and short; the fallback's are many.
"""
import io
import math

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)
from torch import nn

import csra_triton
from csra_triton.reference import as_operand, csra_reference
from helpers import TOL, error_scales, rel_err

D, C, H = 6, 5, 4
TEMP = st.one_of(st.just(math.inf), st.just(99.0), st.floats(0.05, 8.0))
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-foreach": lambda p: torch.optim.SGD(p, lr=0.05, foreach=True),
    "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=0.02, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.02, fused=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.02, fused=True),
}
#: (max_examples, steps per run) per backend under the ``ci`` profile (200 examples), scaled
#: with the profile's example count.
BUDGET = {"triton": (4, 6), "torch": (20, 15)}


def _reference(head, x, g):
    """float64 y, dx, dW, dlam (None for a fixed lam) and the error scales of y, dx, dW, dlam
    on the head's current values, with the weight rounded to x's dtype as the products see it."""
    lam = head.lam
    x64 = x.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    lam64 = lam.detach().double().requires_grad_() if isinstance(lam, torch.Tensor) else lam
    w_op = as_operand(w64, x.dtype)
    y = csra_reference(x64, w_op, head.temperatures, lam64, head.normalize)
    inputs = [x64, w64] + ([lam64] if isinstance(lam, torch.Tensor) else [])
    grads = torch.autograd.grad(y, inputs, g.double())
    lam_value = lam.item() if isinstance(lam, torch.Tensor) else lam
    scales = list(error_scales(x, head.weight, head.temperatures, lam_value, head.normalize, g))
    # dlam = sum(g * att): its rounding is bounded by sum |g| * sum_k |att_k|
    att_abs = sum((csra_reference(x64, w_op[k:k + 1], [t], 1.0, head.normalize)
                   - csra_reference(x64, w_op[k:k + 1], [t], 0.0, head.normalize)).abs()
                  for k, t in enumerate(head.temperatures))
    scales.append((g.double().abs() * att_abs).sum().item())
    return (y.detach(),) + tuple(grads) + ((None,) if len(grads) == 2 else ()), scales


class HeadWalk(RuleBasedStateMachine):
    backend = "torch"

    @initialize(seed=st.integers(0, 2**16))
    def build(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.head = csra_triton.CSRATriton(D, C, heads=H, lam=0.3)
        self.opt = self.opt_kind = self.compiled = None
        self.layout = "nchw"

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self.gen).to(self.head.weight.dtype)

    # ------------------------------------------------------------------ attributes

    @rule(temps=st.lists(TEMP, min_size=H, max_size=H))
    def assign_temperatures(self, temps):
        self.head.temperatures = temps

    @rule(lam=st.floats(0.0, 2.0))
    def assign_lam(self, lam):
        self.head.lam = lam
        self.opt = None                    # a learnable lam it held is gone

    @rule(lam=st.floats(0.0, 2.0))
    def learnable_lam(self, lam):
        w = self.head.weight
        self.head.lam = nn.Parameter(torch.tensor([lam], dtype=w.dtype, device=w.device))
        self.opt = None

    @rule(normalize=st.booleans())
    def assign_normalize(self, normalize):
        self.head.normalize = normalize

    @rule(layout=st.sampled_from(["nchw", "channels_last", "tokens"]))
    def switch_layout(self, layout):
        self.layout = layout

    # ------------------------------------------------------------------ weight updates

    @rule(kind=st.sampled_from(sorted(OPTIMIZERS)))
    def optimizer_step(self, kind):
        if self.opt is None or self.opt_kind != kind:
            self.opt, self.opt_kind = OPTIMIZERS[kind](list(self.head.parameters())), kind
        x = self._input(self._randn(2, D, 2, 3))
        y = (self.head.forward_tokens(x) if self.layout == "tokens" else self._model()(x))
        loss = (y * self._randn(*y.shape)).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    @rule(kind=st.sampled_from(["data", "numpy", "vector_to_parameters", "detach"]),
          scale=st.floats(-2.0, 2.0).filter(lambda s: abs(s) > 0.1))
    def write_weight(self, kind, scale):
        w = self.head.weight
        new = self._randn(*w.shape) * scale
        if kind == "data":
            w.data.copy_(new)
        elif kind == "numpy":
            w.detach().numpy()[...] = new.numpy()
        elif kind == "vector_to_parameters":
            vec = nn.utils.parameters_to_vector(self.head.parameters()).detach().clone()
            vec[:w.numel()] = new.flatten()
            nn.utils.vector_to_parameters(vec, self.head.parameters())
        else:
            w.detach().copy_(new)

    # ------------------------------------------------------------------ module operations

    @rule(dtype=st.sampled_from([torch.float32, torch.float64]))
    def cast(self, dtype):
        self.head.to(dtype)
        self.opt = None

    @rule(kind=st.sampled_from(["state_dict", "official", "pickle"]))
    def round_trip(self, kind):
        old = self.head
        if kind == "pickle":
            buf = io.BytesIO()
            torch.save(old, buf)
            buf.seek(0)
            new = torch.load(buf, weights_only=False)
        else:
            new = csra_triton.CSRATriton(D, C, heads=H, lam=old.lam if isinstance(old.lam, float)
                                         else 0.0, temperatures=old.temperatures,
                                         normalize=old.normalize).to(old.weight.dtype)
            if isinstance(old.lam, nn.Parameter):
                new.lam = nn.Parameter(old.lam.detach().clone())
            if kind == "state_dict":
                new.load_state_dict(old.state_dict())
            else:
                csra_triton.load_official(old.to_official_state_dict(), head=new)
                if isinstance(old.lam, nn.Parameter):
                    new.lam.data.copy_(old.lam.detach())
        self.head, self.opt, self.compiled = new, None, None

    @precondition(lambda self: self.compiled is None)
    @rule()
    def compile(self):
        self.compiled = torch.compile(self.head, backend="aot_eager", fullgraph=True)
        self.compiled_tokens = torch.compile(self.head.forward_tokens, backend="aot_eager",
                                             fullgraph=True)

    # ------------------------------------------------------------------ the check

    def teardown(self):
        if self.compiled is not None:      # each run compiles afresh: no guards left behind
            torch._dynamo.reset()

    def _model(self):
        return self.compiled if self.compiled is not None else self.head

    def _input(self, x):
        if self.layout == "channels_last":
            return x.to(memory_format=torch.channels_last)
        if self.layout == "tokens":
            return x.flatten(2).transpose(1, 2).contiguous()
        return x

    @invariant()
    def matches_float64(self):
        """After every step: an inference call and a training call on fresh x of a random
        batch and size (N = 1 included)."""
        B = int(torch.randint(1, 4, (), generator=self.gen))
        hw = [(1, 1), (2, 3), (3, 3)][int(torch.randint(0, 3, (), generator=self.gen))]
        for grad in (False, True):
            self._check(grad, B, hw)

    def _check(self, grad, B, hw):
        head = self.head
        x = self._randn(B, D, *hw)
        g = self._randn(B, C)
        xin = self._input(x).requires_grad_(grad)
        call = self._model()
        if self.layout == "tokens":
            call = head.forward_tokens if self.compiled is None else self.compiled_tokens
        for p in head.parameters():
            p.grad = None
        with torch.set_grad_enabled(grad):
            y = call(xin)
        refs, scales = _reference(head, x, g)
        outs = [y]
        if grad:
            y.backward(g)
            dx = xin.grad
            if self.layout == "tokens":
                dx = dx.transpose(1, 2).reshape(x.shape)
            lam = head.lam
            outs += [dx, head.weight.grad, lam.grad if isinstance(lam, torch.Tensor) else None]
        tol = self._tolerance(x)
        for name, out, ref, scale in zip(("y", "dx", "dW", "dlam"), outs, refs, scales):
            if ref is None:
                continue
            assert out is not None and out.dtype == x.dtype, (name, out, x.dtype)
            err = rel_err(out, ref, scale)
            assert err <= tol, (name, err, tol, self.backend, head)

    def _tolerance(self, x):
        """TOL of x's dtype, or more where the softmax is ill-conditioned: rounding s moves the
        softmax weights by ~T*|s|*eps (see tests/test_properties.py)."""
        head = self.head
        w = head.weight.detach().double()
        if head.normalize:
            w = w / w.norm(dim=-1, keepdim=True)
        s_max = torch.einsum("hcd,bdn->bhcn", w, x.double().flatten(2)).abs().max().item()
        finite = [t for t in head.temperatures if not math.isinf(t)]
        return max(TOL[x.dtype], torch.finfo(x.dtype).eps * max(finite, default=0.0) * s_max)


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_walk_through_the_public_api(backend_name):
    examples, steps = BUDGET[backend_name]
    scale = settings.default.max_examples / 200
    walk = type(f"HeadWalk_{backend_name}", (HeadWalk,), {"backend": backend_name})
    # a run recompiles on a new dtype, grad mode or stride order (each a guard) and after a
    # round trip (a new module)
    with csra_triton.use_backend(backend_name), torch._dynamo.config.patch(recompile_limit=64):
        run_state_machine_as_test(walk, settings=settings(
            settings.default, max_examples=max(1, round(examples * scale)),
            stateful_step_count=steps))
