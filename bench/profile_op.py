"""Where one call's time goes on a GPU (run by hand or from bench/gpu_check.sh):

* host microbenchmarks: microseconds per call spent on the host (calls issued back to back,
  no synchronisation) and wall time per call, for the whole op and for its launches alone;
* torch.profiler tables of the device kernels and the host ops of csra-triton's forward and
  forward+backward at the headline and latency shapes.

Usage: python bench/profile_op.py [SHAPES] (default coco-r101-448,latency-r101-224)
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from csra_triton import benchmark as bm
from csra_triton import common
from csra_triton import triton_impl as ti


def host_us(fn, n=200):
    """(host µs per call issuing back to back, wall µs per call after synchronising)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    issued = time.perf_counter() - t0
    torch.cuda.synchronize()
    return issued / n * 1e6, (time.perf_counter() - t0) / n * 1e6


def table(prof, key):
    try:
        return prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60)
    except Exception:  # noqa: BLE001 - older sort keys
        return prof.key_averages().table(sort_by=key.replace("device", "cuda"), row_limit=14)


def main(spec: str) -> None:
    dev = torch.device("cuda")
    for shape in bm.parse_shapes(spec):
        b = bm.Bench(shape, "triton", dev, n_sets=1)
        x3, w = b.xs[0].flatten(2), b.weight0
        H, C = shape.heads, shape.C
        params = ti.params_tensor(bm.temperatures(H), 0.1, common.acc_dtype(x3.dtype), dev)
        outs = common.fwd_outputs(x3, H, C, common.empty)
        w_op, inv_n = ti.prep_weight(x3, w, True, outs[5])
        cfg = ti.fwd_config(x3, H, C, shape.d, shape.N)
        parts = {
            "prep launch": lambda: ti.prep_weight(x3, w, True, outs[5]),
            "fwd launch": lambda: ti.fwd_call(x3, w_op, inv_n, params, outs, cfg, H).run(),
            "op csra_fwd": lambda: torch.ops.csra_triton.csra_fwd(x3, w, bm.temperatures(H),
                                                                  0.1, True),
        }
        for pass_ in ("fwd", "fwd+bwd"):
            parts[f"module {pass_}"] = b.step(pass_)
        for name, fn in parts.items():
            issued, wall = host_us(fn)
            print(f"{shape.name:18s} {name:14s} host {issued:8.1f} µs/call   wall {wall:8.1f} µs/call")
        for pass_ in ("fwd", "fwd+bwd"):
            step = b.step(pass_)
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(f"\n== {shape.name} {pass_}: 5 calls, device time")
            print(table(prof, "self_device_time_total"))
            print(f"== {shape.name} {pass_}: 5 calls, host time")
            print(table(prof, "self_cpu_time_total"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "coco-r101-448,latency-r101-224")
