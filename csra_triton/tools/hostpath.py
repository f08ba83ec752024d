"""The host path on CPU: the GPU path's launches and host time without a GPU.

The op runs its Triton implementation on CPU tensors with every kernel launch stubbed out
(``triton_impl.stub_launches``): nothing is computed, but everything the host does for a GPU
call happens, in the same order. What it records per call:

* Triton launches (kernel names, in order);
* ATen kernels: the outermost ATen calls that are not views or allocations, seen by
  ``torch.profiler`` (autograd's own calls included, e.g. zero-filled gradients), where a
  composite call (``reshape``, ``to``, ``contiguous``) counts the copies it makes, if any;
* host µs per call: the median of back-to-back calls, profiler off.

``python -m csra_triton bench --host`` prints this for any shape; tests/test_hostpath.py
holds the counts at the headline's shapes so that a regression fails CI.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .. import common, ops, triton_impl
from ..module import CSRATriton
from ..reference import MHA
from .shapes import Shape, temperatures

#: Calls that launch no kernel: views, metadata and allocations.
NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::view", "aten::_unsafe_view", "aten::as_strided",
    "aten::t", "aten::transpose", "aten::permute", "aten::unsqueeze", "aten::squeeze",
    "aten::select", "aten::slice", "aten::expand", "aten::detach", "aten::alias",
    "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::unflatten",
    "aten::_reshape_alias", "aten::numpy_T", "aten::unbind", "aten::split", "aten::chunk",
    "aten::narrow", "aten::result_type", "aten::is_nonzero", "aten::_has_compatible_shallow_copy_type",
    "detach", "aten::set_", "aten::split_with_sizes", "aten::lift", "aten::view_as",
    "aten::expand_as", "aten::movedim", "aten::_to_dense",
}
#: Composite calls that launch a kernel only through what they call (a copy, or nothing).
COMPOSITE = {"aten::reshape", "aten::flatten", "aten::contiguous", "aten::to", "aten::type_as",
             "aten::matmul", "aten::linalg_vecdot", "aten::mT", "aten::zeros_like",
             "aten::ones_like", "aten::full_like"}


def _kernels(event, children) -> list[str]:
    name = event.name
    if not name.startswith("aten::") or name in NO_KERNEL:
        return []
    if name in COMPOSITE:
        return [k for c in children.get(id(event), ()) for k in _kernels(c, children)]
    return [name]


def aten_kernels(prof) -> list[str]:
    """The kernels a device would run for the ATen calls in ``prof`` (see the module doc)."""
    events = list(prof.events())
    children: dict[int, list] = {}
    for e in events:
        if e.cpu_parent is not None:
            children.setdefault(id(e.cpu_parent), []).append(e)
    out = []
    for e in events:
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        if p is None:                              # outermost ATen call
            out.extend(_kernels(e, children))
    return out


def record(fn: Callable[[], None]) -> dict:
    """One call of ``fn`` with launches stubbed, after one untimed call (steady state: plans
    built, an inference weight prepared): {'triton': [...], 'aten': [...]}."""
    launched: list = []
    old = common.POISON
    common.POISON = False
    try:
        with triton_impl.stub_launches(launched), ops.use_backend("triton"):
            fn()
            launched.clear()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                fn()
    finally:
        common.POISON = old
    return dict(triton=[k for k, _ in launched], aten=aten_kernels(prof))


def host_us(fn: Callable[[], None], reps: int = 50) -> float:
    """Median host µs per call of ``fn`` with launches stubbed (profiler off)."""
    old = common.POISON
    common.POISON = False
    try:
        with triton_impl.stub_launches(), ops.use_backend("triton"):
            return floor_us(fn, reps)
    finally:
        common.POISON = old


def steps(shape: Shape, layout: str = "nchw", small: bool = True) -> dict:
    """The calls to count for ``shape``: module forward under no_grad (inference), forward with
    grad, forward+backward (``backward(g)``) and forward+``sum().backward()`` (a stride-0
    grad_y). ``small``: the real H, C, D but B, N from the shape only if ``small`` is False
    (the host work does not depend on them; tiny tensors keep the CPU quick)."""
    B, N = (2, 4) if small else (shape.B, shape.N)
    H, C, D = shape.heads, shape.C, shape.d
    head = CSRATriton(D, C, H, 0.1, temperatures(H))
    dt = shape.torch_dtype
    if layout == "tokens":
        x = torch.randn(B, N, D).to(dt)
        run = head.forward_tokens
    else:
        x = torch.randn(B, D, 1, N).to(dt)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        run = head.forward
    xg = x.detach().requires_grad_(True)
    g = torch.randn(B, C).to(dt)

    def infer():
        with torch.no_grad():
            run(x)

    def fwd():
        run(xg)

    def fwd_bwd():
        run(xg).backward(g)
        xg.grad = head.weight.grad = None

    def fwd_sum_bwd():
        run(xg).float().sum().backward()
        xg.grad = head.weight.grad = None

    return {"inference": infer, "fwd": fwd, "fwd+bwd": fwd_bwd, "fwd+sum().backward": fwd_sum_bwd}


class BareFunction(torch.autograd.Function):
    """The floor of a head as an ``autograd.Function``: what ours must allocate and do on the
    host with no Python of its own: the forward allocates the same outputs and saved state (y,
    m, l, att, argmax, inverse norms, the prepared weight; the scores where ours keeps them),
    launches nothing; the backward does the same ATen work as ours (x's (D, B*N) copy for NCHW
    x, a workspace, the two GEMMs, dW)."""

    @staticmethod
    def forward(ctx, x, weight, keep_scores):
        B, D, N = x.shape
        H, C, _ = weight.shape
        acc = common.acc_dtype(x.dtype)
        y = torch.empty((B, C), dtype=x.dtype, device=x.device)
        state = [torch.empty((B, H, C), dtype=acc, device=x.device) for _ in range(3)]
        amax = torch.empty((B, H, C), dtype=torch.int32, device=x.device)
        inv_n = torch.empty((H, C), dtype=acc, device=x.device)
        w_op = torch.empty((H * C, D), dtype=x.dtype, device=x.device)
        scores = torch.empty((H, C, B, N) if keep_scores else (0,), dtype=acc, device=x.device)
        ctx.save_for_backward(x, weight, *state, amax, inv_n, w_op, scores)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, m, l, att, amax, inv_n, w_op, scores = ctx.saved_tensors
        B, D, N = x.shape
        H, C, _ = weight.shape
        x_dk = common.x_matrix(x, x.dtype)
        ds = torch.empty((H * C, B * N), dtype=x.dtype, device=x.device)
        G = torch.mm(ds, x_dk.t())
        dx = torch.mm(w_op.t(), ds) if not common.channels_inner(x) else torch.mm(ds.t(), w_op)
        dw = torch.empty_like(weight)
        del G
        return common.dx_view(dx, B, D, N, common.channels_inner(x)), dw, None


def floor_steps(shape: Shape, layout: str = "nchw") -> dict:
    """:func:`steps`' calls for the bare floor (:class:`BareFunction`) and for the official
    eager head (``reference.MHA``: H 1x1 convs, norms, softmaxes; it computes for real on
    these tiny CPU tensors, as its kernels would on a GPU)."""
    B, N = 2, 4
    H, C, D = shape.heads, shape.C, shape.d
    dt = shape.torch_dtype
    head = CSRATriton(D, C, H, 0.1, temperatures(H))
    w = head.weight
    official = MHA(H, 0.1, D, C, temperatures(H)).to(dt)
    if layout == "tokens":
        x = torch.randn(B, N, D).to(dt)
        x3 = x.transpose(1, 2)
        x4 = x3.unflatten(2, (1, N))
    else:
        x = torch.randn(B, D, 1, N).to(dt)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x3, x4 = x.flatten(2), x
    keep = triton_impl.keeps_scores(x3, H, C)
    xg = x3.detach().requires_grad_(True)
    g = torch.randn(B, C).to(dt)

    def bare_infer():
        with torch.no_grad():
            BareFunction.apply(x3, w, False)

    def bare_fwd_bwd():
        BareFunction.apply(xg, w, keep).backward(g)
        xg.grad = w.grad = None

    x4g = x4.detach().requires_grad_(True)

    def official_infer():
        with torch.no_grad():
            official(x4)

    def official_fwd_bwd():
        official(x4g).backward(g)
        x4g.grad = None
        official.zero_grad(set_to_none=True)

    return {"bare": {"inference": bare_infer, "fwd+bwd": bare_fwd_bwd},
            "official": {"inference": official_infer, "fwd+bwd": official_fwd_bwd}}


def floor_us(fn: Callable[[], None], reps: int = 50) -> float:
    """Median host µs per call of ``fn`` after 5 untimed calls, nothing stubbed (profiler off;
    :func:`host_us` runs it with launches stubbed), on one intra-op thread (as the tables say:
    the issuing thread's work, not a parallel CPU kernel's)."""
    # stubbed kernels leave their outputs unwritten: denormal garbage there would make the
    # small CPU GEMMs that do run 10x slower than on real values
    flush = torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for _ in range(5):
            fn()
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    finally:
        torch.set_num_threads(threads)
        if flush:
            torch.set_flush_denormal(False)
    return statistics.median(times)


def ratios(shapes: list[Shape], layouts=("nchw",), reps: int = 200) -> list[dict]:
    """Per shape x layout x call (inference, fwd+bwd): host µs of ours (launches stubbed), of
    the bare autograd.Function and of the official eager head, measured in alternation (ours,
    bare, official, repeated over 10 rounds); each ratio is the median of the rounds' ratios,
    so that a change of this CPU's speed between rounds (a shared VM's steal time: 2x seen
    here) hits the three measurements of a round alike instead of skewing medians taken apart."""
    rows = []
    for shape in shapes:
        for layout in layouts:
            ours = steps(shape, layout)
            floors = floor_steps(shape, layout)
            for call in ("inference", "fwd+bwd"):
                t = {"ours": [], "bare": [], "official": []}
                for _ in range(10):
                    t["ours"].append(host_us(ours[call], max(1, reps // 10)))
                    t["bare"].append(floor_us(floors["bare"][call], max(1, reps // 10)))
                    t["official"].append(floor_us(floors["official"][call], max(1, reps // 10)))
                med = {k: statistics.median(v) for k, v in t.items()}
                rows.append(dict(shape=shape.name, layout=layout, call=call, ours_us=med["ours"],
                                 bare_us=med["bare"], official_us=med["official"],
                                 vs_bare=statistics.median(
                                     o / b for o, b in zip(t["ours"], t["bare"])),
                                 vs_official=statistics.median(
                                     o / f for o, f in zip(t["ours"], t["official"]))))
    return rows


def ratio_table(rows: list[dict]) -> str:
    lines = ["| shape | layout | call | ours µs | bare autograd.Function µs | official head µs | "
             "ours / bare | ours / official |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['layout']} | {r['call']} | {r['ours_us']:.1f} | "
                     f"{r['bare_us']:.1f} | {r['official_us']:.1f} | {r['vs_bare']:.2f} | "
                     f"{r['vs_official']:.3f} |")
    return "\n".join(lines)


def report(shapes: list[Shape], layouts=("nchw",), reps: int = 50) -> list[dict]:
    """One row per shape x layout x call: launches and host µs (see the module doc)."""
    rows = []
    for shape in shapes:
        for layout in layouts:
            for name, fn in steps(shape, layout).items():
                rec = record(fn)
                rows.append(dict(shape=shape.name, layout=layout, call=name,
                                 triton=rec["triton"], aten=rec["aten"],
                                 launches=len(rec["triton"]) + len(rec["aten"]),
                                 host_us=host_us(fn, reps)))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | layout | call | launches | Triton | ATen | host µs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['layout']} | {r['call']} | {r['launches']} | "
                     f"{', '.join(k.replace('csra_', '').replace('_kernel', '') for k in r['triton'])} | "
                     f"{', '.join(a.replace('aten::', '') for a in r['aten'])} | "
                     f"{r['host_us']:.0f} |")
    return "\n".join(lines)
