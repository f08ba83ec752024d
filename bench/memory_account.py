"""Allocation account of the GPU path (issue 20): every buffer the op's forward and backward
allocate, by size and lifetime, without a GPU.

The op bodies (the Triton path: ``use_backend("triton")``) run on meta tensors (shapes, dtypes
and strides, no memory, no arithmetic) with every kernel launch stubbed out; a dispatch mode
sees each ATen call's outputs, and each storage is live from its first output to the death of
the last tensor holding it. What autograd would keep between the passes is kept: the forward's
outputs until the backward has run, the gradients after it. The peak of live bytes (each
allocation rounded up to 512 bytes, as PyTorch's CUDA caching allocator rounds them) is what
``torch.cuda.max_memory_allocated`` minus the inputs measures on a GPU for one
forward+backward (bench's ``peak_mem_mb``).

Usage: python bench/memory_account.py [--root CHECKOUT] [SHAPES]
(default openimages-r101-448,coco-r101-448). ``--root`` accounts another checkout's package
(e.g. a worktree of an older commit), which is imported instead of this one.
"""
import argparse
import gc
import importlib
import inspect
import math
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _rounded(nbytes: int) -> int:
    return 512 * math.ceil(nbytes / 512) if nbytes else 0


class Allocations(TorchDispatchMode):
    """Live bytes over time, per storage, of everything allocated inside the mode."""

    def __init__(self, exclude=()):
        super().__init__()
        self.live = {}          # storage id -> bytes
        self.holders = {}       # storage id -> number of live tensors holding it
        self.peak = 0
        self.peak_at = ""
        self.log = []           # (event, op, bytes, live after)
        self.excluded = {self._sid(t) for t in exclude}

    @staticmethod
    def _sid(t):
        return t.untyped_storage()._cdata

    def _release(self, sid):
        self.holders[sid] -= 1
        if self.holders[sid] == 0:
            size = self.live.pop(sid)
            self.log.append(("free", "", size, self.total()))

    def total(self) -> int:
        return sum(self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            sid = self._sid(t)
            if sid in self.excluded:
                continue
            if sid not in self.live:
                self.live[sid] = _rounded(t.untyped_storage().nbytes())
                self.holders[sid] = 0
                now = self.total()
                self.log.append(("alloc", str(func), self.live[sid], now))
                if now > self.peak:
                    self.peak, self.peak_at = now, str(func)
            self.holders[sid] += 1
            weakref.finalize(t, self._release, sid)
        return out


def account(pkg, shape, stub) -> dict:
    """Peak bytes (beyond inputs) of one forward+backward of ``pkg``'s op bodies at ``shape``,
    launches stubbed by the context manager ``stub``."""
    ops = importlib.import_module(pkg.__name__ + ".ops")
    B, D, N, H, C = shape.B, shape.d, shape.N, shape.heads, shape.C
    dt = shape.torch_dtype
    x = torch.empty(B, D, N, dtype=dt, device="meta")
    weight = torch.empty(H, C, D, dtype=dt, device="meta")     # the benchmark's weight dtype
    g = torch.empty(B, C, dtype=dt, device="meta")
    temps = [1.0, 2.0, 4.0, 0.0][:H] if H <= 4 else [float(t) for t in range(1, H)] + [0.0]
    fwd = ops.csra_fwd._init_fn
    bwd = ops.csra_bwd._init_fn
    if "values" in inspect.signature(fwd).parameters:     # the ops' values tensor
        values = torch.empty(H + 1, dtype=torch.float64, device="meta")
        scalars = (values,)
    else:                                                   # (checkouts before it)
        values = None
        scalars = (temps, 0.1)
    mode = Allocations(exclude=(x, weight, g) + ((values,) if values is not None else ()))
    with stub(), ops.use_backend("triton"), torch.no_grad():
        with mode:
            y, *state = fwd(x, weight, *scalars, True)
            grads = bwd(g, x, weight, *state, *scalars, True)
            del y, state
            gc.collect()
            after = mode.total()
        del grads
    return dict(peak_bytes=mode.peak, peak_at=mode.peak_at, grads_bytes=after,
                allocations=sum(1 for e in mode.log if e[0] == "alloc"))


def stubs(pkg):
    """The launch stub for ``pkg``: its own (``triton_impl.stub_launches``), or for packages
    from before it existed, ``ops.Call.run`` replaced."""
    import contextlib
    import os

    # (decided by the checkout's files: an editable install's import hook would resolve
    # csra_triton.triton_impl to this checkout's even for an older package)
    if os.path.exists(os.path.join(pkg.__path__[0], "triton_impl.py")):
        return importlib.import_module(pkg.__name__ + ".triton_impl").stub_launches
    ops = importlib.import_module(pkg.__name__ + ".ops")

    @contextlib.contextmanager
    def stub():
        old = ops.Call.run
        ops.Call.run = lambda self: None
        try:
            yield
        finally:
            ops.Call.run = old
    return stub


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default=None, help="a checkout whose csra_triton to account")
    p.add_argument("shapes", nargs="?", default="openimages-r101-448,coco-r101-448")
    args = p.parse_args(argv)
    if args.root:
        sys.path.insert(0, args.root)
    pkg = importlib.import_module("csra_triton")
    try:                                   # (the benchmark moved into tools/)
        bm = importlib.import_module("csra_triton.tools.benchmark")
    except ImportError:
        bm = importlib.import_module("csra_triton.benchmark")
    print(f"package: {pkg.__file__}")
    for shape in bm.parse_shapes(args.shapes):
        r = account(pkg, shape, stubs(pkg))
        print(f"{shape.name}: peak {r['peak_bytes'] / 1e9:.3f} GB beyond inputs (at {r['peak_at']}), "
              f"gradients {r['grads_bytes'] / 1e6:.0f} MB, {r['allocations']} allocations")


if __name__ == "__main__":
    main()
