"""Traces the CUDA triton_ops with fake CUDA tensors, as AOTAutograd does under torch.compile,
on a machine without a GPU (needs a torch build with CUDA; run without TRITON_INTERPRET).
Prints one JSON line: for the inference forward and for the backward op, the Triton kernels
the graph launches (in order) and its ATen calls."""
import json
import warnings

import torch
from functorch.compile import aot_function, make_boxed_func
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode

import csra_triton

HOP = torch.ops.higher_order.triton_kernel_wrapper_functional


def summary(gm):
    kernels, aten, outputs = [], [], []
    for n in gm.graph.nodes:
        if n.op == "output":
            outputs = [list(v.meta["val"].shape) for v in torch.utils._pytree.tree_leaves(n.args)
                       if hasattr(v, "meta") and hasattr(v.meta.get("val"), "shape")]
        if n.op != "call_function":
            continue
        if n.target is HOP:
            kernels.append(kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__)
        elif str(n.target).startswith("aten."):
            aten.append(str(n.target))
    return dict(kernels=kernels, aten=aten, outputs=outputs)


def trace(fn, *args):
    graphs = []

    def keep(gm, _inputs):
        graphs.append(summary(gm))
        return make_boxed_func(gm.forward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = aot_function(fn, fw_compiler=keep, bw_compiler=keep)
        with mode:
            f(*args)
    return graphs[0]


mode = FakeTensorMode(allow_non_fake_inputs=True)
with mode:
    B, D, h, w, H, C = 2, 64, 3, 3, 4, 9
    x = torch.randn(B, D, h, w, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(H, C, D, device="cuda")
    g = torch.randn(B, C, device="cuda", dtype=torch.bfloat16)
    state = (torch.empty(B, H, C, device="cuda"), torch.empty(B, H, C, device="cuda"),
             torch.empty(B, H, C, device="cuda"),
             torch.empty(B, H, C, device="cuda", dtype=torch.int32),
             torch.empty(H, C, device="cuda"), torch.empty(H * C, D, device="cuda",
                                                           dtype=torch.bfloat16))
    scores = torch.empty(H, C, B, h * w, device="cuda")      # kept by a training forward
    none = torch.empty(0, device="cuda")                     # not kept: dS' recomputed
    # a compiled module's temperatures and lam: its _scalars buffer (float64 bits as int64)
    scalars = torch.empty(H + 1, device="cuda", dtype=torch.int64)
temps = [1.0, 2.0, 4.0, float("inf")]
fwd = trace(lambda a, b: csra_triton.csra(a, b, temps, 0.1), x, weight)
# the training forward (keep=True) as the op: tracing autograd's backward needs a GPU context
train = trace(lambda a, b: torch.ops.csra_triton.csra_fwd_cuda(a.flatten(2), b,
                                                               [1.0, 2.0, 4.0, 0.0], 0.1, True,
                                                               True), x, weight)


def bwd_op(*a):
    return torch.ops.csra_triton.csra_bwd_cuda(*a, [1.0, 2.0, 4.0, 0.0], 0.1, True)


bwd = trace(bwd_op, g, x.flatten(2), weight, *state, scores)
bwd_recompute = trace(bwd_op, g, x.flatten(2), weight, *state, none)
# the ops as a compiled module calls them: placeholder floats, the values from the buffer
fwd_scalars = trace(lambda a, b, s: torch.ops.csra_triton.csra_fwd_cuda(
    a.flatten(2), b, [1.0] * H, 0.0, True, False, None, None, s), x, weight, scalars)
bwd_scalars = trace(lambda *a: torch.ops.csra_triton.csra_bwd_cuda(
    *a[:-1], [1.0] * H, 0.0, True, None, a[-1]), g, x.flatten(2), weight, *state, scores, scalars)
print(json.dumps(dict(fwd=fwd, train=train, bwd=bwd, bwd_recompute=bwd_recompute,
                      fwd_scalars=fwd_scalars, bwd_scalars=bwd_scalars)))
