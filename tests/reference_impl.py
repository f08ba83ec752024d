"""A third implementation of the head behind ``csra_triton.interface``, for the tests: the
float64 statement of the math (standard operators, every class at once), registered with
``ops.register("reference", reference_impl)``. It shows what a new backend is (this one module
and one registry line), and the op-level tests run through it unchanged (tests/test_op.py).

Never chosen automatically (``serves`` is False): ``use_backend("reference")`` selects it.
"""
import math

import torch

from csra_triton.common import acc_dtype, empty, host_values
from csra_triton.interface import Forward, ForwardState

triton_op = False
LOG2E = math.log2(math.e)


def serves(device, dtype):
    return False


def kept_output(x, weight, keep, alloc=empty):
    return alloc((0,), x.dtype, x.device)


def scores_output(x, weight, keep, alloc=empty):
    return alloc((0,), acc_dtype(x.dtype), x.device)


def _scores(x, weight, normalize):
    """(s (B, H, C, N) float64 on the operands the kernels multiply, inv_n (H, C) float64)."""
    w = weight.detach().to(x.dtype).double()
    inv_n = (1.0 / torch.linalg.vector_norm(weight.detach().double(), dim=-1) if normalize
             else torch.ones(weight.shape[:2], dtype=torch.float64, device=x.device))
    s = torch.einsum("hcd,bdn->bhcn", w, x.detach().double()) * inv_n[None, :, :, None]
    return s, inv_n


def _lam(lam):
    return float(lam.detach()) if isinstance(lam, torch.Tensor) else float(lam)


def forward(x, weight, scalars, normalize, keep, y_dtype=None, packed=False):
    temps, lam = host_values(scalars)
    acc = acc_dtype(x.dtype)
    s, inv_n = _scores(x, weight, normalize)
    T = torch.tensor([1.0 if math.isinf(t) else t for t in temps], dtype=torch.float64,
                     device=x.device)[None, :, None, None]
    is_max = torch.tensor([math.isinf(t) for t in temps], device=x.device)[None, :, None]
    z = s * T * LOG2E
    m = z.amax(-1)
    l = torch.exp2(z - m[..., None]).sum(-1)
    p = torch.exp2(z - m[..., None]) / l[..., None]
    best, argmax = s.max(dim=-1)
    att = torch.where(is_max, best, (p * s).sum(-1))
    y = (s.mean(-1) + _lam(lam) * att).sum(1)
    inv = inv_n.to(acc) if keep else x.new_empty((0,), dtype=acc)
    state = ForwardState(m.to(acc), l.to(acc), att.to(acc), argmax.to(torch.int32), inv,
                         kept_output(x, weight, keep), scores_output(x, weight, keep))
    return Forward(y.to(y_dtype or x.dtype), state)


class Backward:
    """dS' of every class at once, in float64; the op layer's loop does the GEMMs."""

    gemm = dx_dtype = torch.float64

    def __init__(self, grad_y, x, weight, state, scalars, normalize, plan=None):
        B, D, N = x.shape
        H, C, _ = weight.shape
        self.temps, self.lam = host_values(scalars)
        self.x, self.weight, self.grad_y, self.normalize = x, weight, grad_y, normalize
        self.chunk = C
        self.ws = torch.empty(H * C * B * N, dtype=torch.float64, device=x.device)
        self.x_dk = x.detach().double().permute(1, 0, 2).reshape(D, B * N)
        self.w_gemm = weight.detach().to(x.dtype).double()
        self.s, self.inv_n = _scores(x, weight, normalize)

    @staticmethod
    def mm(a, b, out=None, buf=None):
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)

    def ds(self, c0, c1, out):
        s = self.s[:, :, c0:c1]                                     # (B, H, c, N)
        N = s.shape[-1]
        lam = _lam(self.lam)
        parts = []
        for k, t in enumerate(self.temps):
            sk = s[:, k]
            if math.isinf(t):
                d_att = torch.nn.functional.one_hot(sk.argmax(-1), N).double()
            else:
                p = torch.softmax(t * sk, dim=-1)
                att = (p * sk).sum(-1, keepdim=True)
                d_att = p * (1 + t * (sk - att))
            parts.append(1.0 / N + lam * d_att)
        dyds = torch.stack(parts, 1) * self.grad_y.double()[:, None, c0:c1, None]
        out.copy_((dyds * self.inv_n[None, :, c0:c1, None]).permute(1, 2, 0, 3))

    def new_weight_grad(self, G):
        return torch.empty_like(self.weight)

    def chunk_done(self, G, dW, c0, c1):
        pass

    def finish(self, G, dW):
        w = self.weight.detach().double()
        if self.normalize:
            G = G - w * ((w * G).sum(-1, keepdim=True) * self.inv_n[..., None] ** 2)
        return dW.copy_(G)
