"""Shared by the tests: float64 ground truth and relative-error helpers."""
import math

import torch

from csra_triton.reference import as_operand, csra_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}
INF = math.inf


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, poisoned element?)"
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def ref64(x, weight, temps, lam, normalize=True, grad=None):
    """float64 forward (and, with ``grad``, dx and dW) computed by csra_reference on the operands
    the kernels multiply: x as given, the weight rounded to x's dtype."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y = csra_reference(x64, as_operand(w64, x.dtype), temps, lam, normalize)
    if grad is None:
        return y.detach()
    y.backward(grad.double())
    return y.detach(), x64.grad, w64.grad
