"""The L2 -> SM read rate per SM (issue 29): the rate model v2 prices a pipelined forward at
(35.3 GB/s per SM, calibrated on v1's forward; bench/NOTES.md "Kernels v2"). A kernel that
only streams an L2-resident buffer into registers says whether that is L2's rate or v1's
kernel's: each program sums its own slice of the buffer ``reps`` times (loads in ``BLOCK``
vectors, nothing else), one value per lane stored at the end, so the loads cannot be dropped.

Rows printed (and written as JSON lines to ``OUT/l2_probe.jsonl`` if OUT is given):
* grid = SMs x CTAs-per-SM over a buffer that fits in L2 (24 MiB), 4 and 8 warps;
* one program alone (one SM, no contention);
* the same over a 2 GiB buffer read once (HBM, for scale).

GB/s per SM = bytes loaded / time / SMs used. Seconds on an H200; ``--dry`` runs it under
Triton's interpreter on tiny sizes and checks the sums (no timing).

Usage: python bench/l2_probe.py [OUT] [--dry]
"""
import json
import os
import sys

if "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MODEL_GBPS_PER_SM = 35.3


@triton.jit
def l2_read_kernel(src, out, slice_elems, reps, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    # slices start at multiples of BLOCK elements: 16-byte vector loads (ld.global.v4)
    base = src + tl.multiple_of(pid.to(tl.int64) * slice_elems, BLOCK)
    lane = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(reps):
        for start in range(0, slice_elems, BLOCK):
            offs = tl.max_contiguous(tl.multiple_of(start + lane, BLOCK), BLOCK)
            acc += tl.load(base + offs).to(tl.float32)
    tl.store(out + pid * BLOCK + lane, acc)


def run(src: torch.Tensor, programs: int, reps: int, block: int, warps: int, timed: bool):
    """Sums of each program's slice (``reps`` passes), and ms per launch if ``timed``."""
    slice_elems = src.numel() // programs // block * block
    out = torch.empty(programs * block, dtype=torch.float32, device=src.device)
    launch = lambda: l2_read_kernel[(programs,)](src, out, slice_elems, reps, BLOCK=block,
                                                 num_warps=warps)
    launch()
    ms = None
    if timed:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 5
        start.record()
        for _ in range(n):
            launch()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / n
    return out, slice_elems, ms


def check(src, out, programs, slice_elems, reps, block):
    """Each program's lane sums equal ``reps`` x its slice's column sums (float64 reference)."""
    ref = (src[: programs * slice_elems].double().view(programs, slice_elems // block, block)
           .sum(1) * reps)
    got = out.view(programs, block).double()
    tol = 1e-3 * ref.abs().max().item() + 1e-3
    return (got - ref).abs().max().item() <= tol


def main() -> int:
    dry = "--dry" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--dry"]
    out_dir = args[0] if args else None
    dev = torch.device("cpu" if dry else "cuda")
    sms = 4 if dry else torch.cuda.get_device_properties(dev).multi_processor_count
    block = 64 if dry else 2048
    l2_bytes = (64 << 10) if dry else (24 << 20)
    hbm_bytes = (256 << 10) if dry else (2 << 30)
    rows = []
    small = torch.randn(l2_bytes // 2, device=dev).to(torch.bfloat16)
    big = torch.randn(hbm_bytes // 2, device=dev).to(torch.bfloat16)
    cases = [("L2", small, sms * per_sm, reps, warps)
             for per_sm in (1, 2, 4) for warps in (4, 8) for reps in ((2,) if dry else (20,))]
    cases += [("L2, one program", small, 1, 2 if dry else 2, 8),
              ("HBM", big, sms * 4, 1, 8)]
    for where, src, programs, reps, warps in cases:
        out, slice_elems, ms = run(src, programs, reps, block, warps, timed=not dry)
        ok = check(src, out, programs, slice_elems, reps, block)
        nbytes = programs * slice_elems * 2 * reps
        used = min(programs, sms)
        row = dict(where=where, programs=programs, ctas_per_sm=programs / sms, warps=warps,
                   reps=reps, bytes=nbytes, ms=ms, sums_ok=ok,
                   gbps_per_sm=None if ms is None else nbytes / (ms * 1e-3) / used / 1e9,
                   tbps=None if ms is None else nbytes / (ms * 1e-3) / 1e12,
                   model_gbps_per_sm=MODEL_GBPS_PER_SM)
        rows.append(row)
        print(f"{where:16s} programs {programs:5d} warps {warps} reps {reps:3d}: "
              + ("dry (untimed)" if ms is None else
                 f"{ms * 1e3:8.1f} µs  {row['tbps']:.2f} TB/s  {row['gbps_per_sm']:.1f} GB/s per SM "
                 f"(model {MODEL_GBPS_PER_SM})") + ("" if ok else "  SUMS WRONG"))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "l2_probe.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0 if all(r["sums_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
