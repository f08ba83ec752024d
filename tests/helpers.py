"""Shared by the tests: float64 ground truth and relative-error helpers."""
import math

import torch

from csra_triton.reference import as_operand, csra_reference

#: Tolerances from the rounding analysis: the operands and the outputs are rounded once to the
#: input dtype (unit roundoff u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32), sums run in fp32.
#: Measured at the test shapes: bf16 1.8e-3 (y) / 3.1e-3 (grads) = 0.5u / 0.8u; fp16 2e-4 /
#: 4e-4, the same multiples of its u. bf16's tolerance is 5u (2e-2, ~6x the measured
#: gradients); fp16's is 2u (1e-3, ~2.5x): a bug that rounded fp16 operands or the workspace
#: to bf16 (1.8e-3 / 3e-3) fails it. fp32 1e-5 (~170u: T * |s| amplification included).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
INF = math.inf
#: dtype -> [examples, worst fwd, worst dx, worst dW] relative errors of the property tests.
WORST: dict = {}


def op_values(temps, lam, device="cpu"):
    """The ops' ``values`` argument: [T_1, ..., T_H, lam] as float64 (inf: a max head)."""
    return torch.tensor([*temps, lam], dtype=torch.float64, device=device)


def rel_err(out, ref, scale=None) -> float:
    """||out - ref|| / max(||ref||, scale) in float64 (0 when both are zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values (an unwritten, poisoned element?)"
    den = max(ref.norm().item(), scale or 0.0)
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


def error_scales(x, weight, temps, lam, normalize, grad):
    """Norms of the absolute-value sums behind y, dx and dW (float64, same operands).

    Rounding error of a sum is bounded by eps * sum|terms|, not eps * |sum|: where terms cancel
    (a mean of scores near zero; dW of a normalised row, a projection that is exactly 0 for
    in_ch = 1) the result's own norm is no scale for its error. These are
        y:  sum_k mean_j |s| + lam * sum_j p_j |s_j|     (max heads: |max_j s|)
        dx: |Wn|^T |dS|          dW: |dS| |x|^T / ||W||   (dS = dy/ds, g applied)
    """
    x64 = x.detach().double().flatten(2)
    w64 = as_operand(weight.detach().double(), x.dtype)
    norm = torch.linalg.vector_norm(w64, dim=-1, keepdim=True) if normalize else w64.new_ones(1)
    wn = w64 / norm
    s = torch.einsum("hcd,bdn->bhcn", wn, x64).requires_grad_()
    y, y_abs = 0.0, 0.0
    for k, t in enumerate(temps):
        sk = s[:, k]
        if math.isinf(t) or t == 99:
            att, att_abs = sk.max(dim=-1).values, sk.max(dim=-1).values.abs()
        else:
            p = torch.softmax(t * sk, dim=-1)
            att, att_abs = (p * sk).sum(-1), (p * sk.abs()).sum(-1)
        y = y + sk.mean(-1) + lam * att
        y_abs = y_abs + sk.abs().mean(-1) + lam * att_abs
    (ds,) = torch.autograd.grad(y, s, grad.double())
    dx_abs = torch.einsum("hcd,bhcn->bdn", wn.abs(), ds.abs())
    dw_abs = torch.einsum("bhcn,bdn->hcd", ds.abs(), x64.abs()) / norm
    return y_abs.norm().item(), dx_abs.norm().item(), dw_abs.norm().item()
