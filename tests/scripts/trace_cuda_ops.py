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
    kernels, aten, outputs, h2d = [], [], [], 0
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
            src = n.args[0].meta.get("val") if n.args and hasattr(n.args[0], "meta") else None
            if str(n.target) == "aten._to_copy.default" and src is not None and \
                    src.device != n.meta["val"].device:
                h2d += 1          # a copy between devices (a dtype cast stays on the device)
    return dict(kernels=kernels, aten=aten, outputs=outputs, h2d=h2d)


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
    # the ops' values: temperatures and lam as one float64 tensor on the device (what a
    # compiled module passes as a graph input)
    values = torch.empty(H + 1, device="cuda", dtype=torch.float64)
temps = [1.0, 2.0, 4.0, float("inf")]
# the functional form with Python numbers: the values are made on the device in the graph
fwd = trace(lambda a, b: csra_triton.csra(a, b, temps, 0.1), x, weight)
# the training forward (keep=True) as the op: tracing autograd's backward needs a GPU context
train = trace(lambda a, b, v: torch.ops.csra_triton.csra_fwd_cuda(a.flatten(2), b, v, True,
                                                                  True), x, weight, values)


def bwd_op(*a):
    return torch.ops.csra_triton.csra_bwd_cuda(*a, True)


bwd = trace(bwd_op, g, x.flatten(2), weight, *state, scores, values)
bwd_recompute = trace(bwd_op, g, x.flatten(2), weight, *state, none, values)
# inference as a compiled module calls it: its values tensor a graph input
fwd_values = trace(lambda a, b, v: torch.ops.csra_triton.csra_fwd_cuda(
    a.flatten(2), b, v, True, False), x, weight, values)
print(json.dumps(dict(fwd=fwd, train=train, bwd=bwd, bwd_recompute=bwd_recompute,
                      fwd_values=fwd_values)))
