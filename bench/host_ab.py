"""Host µs of two checkouts side by side (bench/NOTES.md, "Host path v3"): the module's training
forward, its backward and an inference call, with Triton launches stubbed (CPU, one thread),
beside the bare autograd.Function of ``csra_triton.tools.hostpath``, at d=64, C=16, H=4, B=2, N=4 fp32.

Run it for each checkout in turn, alternating, and compare medians taken in the same phase of
the machine (a shared VM's speed can change by 2x within minutes):

    for i in 1 2; do for t in OLD_CHECKOUT .; do python bench/host_ab.py $t nchw; done; done
"""
import statistics
import sys
import time

import torch


def main(root: str, layout: str = "nchw", rounds: int = 10, calls: int = 100) -> None:
    sys.path.insert(0, root)
    from csra_triton import common, ops, triton_impl
    from csra_triton.module import CSRATriton
    try:                                    # (checkouts before the tools moved into tools/)
        from csra_triton.tools import hostpath
        from csra_triton.tools.shapes import temperatures
    except ImportError:
        from csra_triton import hostpath
        from csra_triton.shapes import temperatures

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)          # stubbed kernels leave their outputs unwritten
    common.POISON = False
    B, N, H, C, D = 2, 4, 4, 16, 64
    head = CSRATriton(D, C, H, 0.1, temperatures(H))
    if layout == "tokens":
        x, run = torch.randn(B, N, D), head.forward_tokens
        x3 = x.transpose(1, 2)
    else:
        x, run = torch.randn(B, D, 1, N), head.forward
        x3 = x.flatten(2)
    xg, x3g = x.detach().requires_grad_(True), x3.detach().requires_grad_(True)
    g = torch.randn(B, C)
    keep = triton_impl.keeps_scores(x3, H, C)

    def one(f):
        t0 = time.perf_counter()
        y = f(True)
        t1 = time.perf_counter()
        y.backward(g)
        t2 = time.perf_counter()
        xg.grad = x3g.grad = head.weight.grad = None
        with torch.no_grad():
            t3 = time.perf_counter()
            f(False)
            t4 = time.perf_counter()
        return (t1 - t0) * 1e6, (t2 - t1) * 1e6, (t4 - t3) * 1e6

    impls = {"ours": lambda grad: run(xg if grad else x),
             "bare": lambda grad: hostpath.BareFunction.apply(x3g if grad else x3, head.weight,
                                                              keep and grad)}
    out = {k: [] for k in impls}
    with triton_impl.stub_launches(), ops.use_backend("triton"):
        for f in impls.values():
            for _ in range(calls):
                one(f)
        for _ in range(rounds):
            for name, f in impls.items():
                out[name].extend(one(f) for _ in range(calls))
    print(f"{root} ({layout}), µs per call, median / min of {rounds * calls}:")
    for name, v in out.items():
        cols = list(zip(*v))
        print(f"  {name:5s} " + "  ".join(
            f"{lab} {statistics.median(c):6.1f} / {min(c):6.1f}"
            for lab, c in zip(("training fwd", "backward", "inference"), cols)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", sys.argv[2] if len(sys.argv) > 2 else "nchw")
