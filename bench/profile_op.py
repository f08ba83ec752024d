"""Where one call's host time goes on a GPU (bench/gpu_check.sh section 1, or by hand):

* host microbenchmarks: µs per call spent on the issuing thread (calls back to back, no
  synchronisation inside the loop) and wall µs per call, for the module's forward, inference
  forward and forward+backward, and for single launches;
* the same with ``CSRA_TRITON_DIRECT_LAUNCH`` on (compiled kernels launched directly), after
  checking that both launch paths give bitwise equal outputs;
* cProfile of 50 forward+backward calls (the top 25 functions by own time), and torch.profiler
  tables with stacks (device kernels and host ops) of forward and forward+backward.

Usage: python bench/profile_op.py [SHAPES] (default latency-r101-224,coco-r101-448)
"""
import cProfile
import io
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from csra_triton.tools import benchmark as bm
from csra_triton import common
from csra_triton import triton_impl as ti


def host_us(fn, n=200):
    """(host µs per call issuing back to back, wall µs per call after synchronising)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(n):
        fn()
    issued = time.thread_time() - c0
    torch.cuda.synchronize()
    return issued / n * 1e6, (time.perf_counter() - t0) / n * 1e6


def table(prof, key):
    try:
        return prof.key_averages(group_by_stack_n=4).table(sort_by=key, row_limit=16,
                                                           max_name_column_width=70)
    except Exception:  # noqa: BLE001 - older sort keys
        return prof.key_averages().table(sort_by=key.replace("device", "cuda"), row_limit=16)


def parts(shape, dev):
    b = bm.Bench(shape, "triton", dev, n_sets=1)
    x3, w = b.xs[0].flatten(2), b.weight0
    H, C = shape.heads, shape.C
    params = ti.params_tensor(bm.temperatures(H), 0.1, common.acc_dtype(x3.dtype), dev)
    outs = common.fwd_outputs(x3, H, C, common.empty)
    w_op, inv_n = ti.prep_weight(x3, w, True, outs[5])
    cfg = ti.fwd_config(x3, H, C, shape.d, shape.N)
    x = b.xs[0]

    def infer():
        with torch.no_grad():
            b.module(x)
    return b, {
        "prep launch": lambda: ti.prep_weight(x3, w, True, outs[5]),
        "fwd launch": lambda: ti.fwd_call(x3, w_op, inv_n, params, outs, cfg, H).run(),
        "module inference": infer,
        "module fwd+bwd": b.step("fwd+bwd"),
    }


def main(spec: str) -> None:
    dev = torch.device("cuda")
    for shape in bm.parse_shapes(spec):
        b, fns = parts(shape, dev)
        for direct in (False, True):
            ti.DIRECT_LAUNCH = direct
            ti._compiled.clear()
            with torch.no_grad():
                y = b.module(b.xs[0]).clone()
                y2 = b.module(b.xs[0])            # the second call launches directly
            print(f"{shape.name} direct={int(direct)}: repeat call bitwise equal: "
                  f"{bool(torch.equal(y, y2))}", flush=True)
            for name, fn in fns.items():
                issued, wall = host_us(fn)
                print(f"{shape.name:18s} direct={int(direct)} {name:17s} host {issued:8.1f} "
                      f"µs/call   wall {wall:8.1f} µs/call", flush=True)
        ti.DIRECT_LAUNCH = False
        step = fns["module fwd+bwd"]
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            step()
        torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(f"\n== {shape.name} fwd+bwd: cProfile of 50 calls (own time)\n{s.getvalue()}")
        for pass_ in ("fwd", "fwd+bwd"):
            step = b.step(pass_)
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                         with_stack=True) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(f"\n== {shape.name} {pass_}: 5 calls, device time")
            print(table(prof, "self_device_time_total"))
            print(f"== {shape.name} {pass_}: 5 calls, host time (with stacks)")
            print(table(prof, "self_cpu_time_total"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "latency-r101-224,coco-r101-448")
