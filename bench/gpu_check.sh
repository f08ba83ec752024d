#!/usr/bin/env bash
# The GPU check. One command on a CUDA machine, no network, about 8-9 minutes on an H100/H200:
#   0. the machine: versions, GPU, and two probes (device copy bandwidth from HBM and from L2)
#      that calibrate the compile report's traffic model (csra_triton/compiled.py, RATES);
#   1. every benchmark shape x pass x impl (eager, torch.compile, csra-triton), eager and triton
#      rows first, compile rows afterwards and skipped once their time budget is spent; the
#      results JSON (bench/NOTES.md "Results format") is written into the folder given as $1;
#   2. the test suite on CUDA (real kernels, no interpreter; parallel when pytest-xdist is there);
#   3. one ResNet-101 training step (448, B=32, bf16 autocast) with the official head and with
#      CSRATriton (bench --e2e; its own results JSON under $1/e2e; torch.compile'd rows with
#      E2E_COMPILE_BUDGET_S set);
#   4. a bounded tuning sweep of the headline shape (every candidate checked against float64 and
#      for spills before it is timed), compute-sanitizer memcheck of one forward+backward, and
#      an ncu Speed-of-Light + bytes readout of the headline forward (where ncu works);
#   5. the short tables last: shape, pass, ms per impl, speed-ups, % of floor, peak MB; e2e.
# Logs: $1/{machine,bench,tests,e2e,extras}.log. Usage: bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CSRA_TRITON_TUNE_CACHE="$out/tune-cache.json"
start=$(date +%s)
since() { echo $(( $(date +%s) - start )); }
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')" || exit 2

{
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), 'cc', torch.cuda.get_device_capability())"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv 2>&1 | head -3
  timeout 60 "$py" - <<'EOF'
import torch
def copy_tbps(nbytes, reps):
    """Device copy, bytes read + written, timed over a CUDA graph of `reps` copies."""
    x = torch.randn(nbytes // 4, device="cuda").to(torch.bfloat16)
    y = torch.empty_like(x)
    y.copy_(x); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            y.copy_(x)
    g.replay(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); g.replay(); e.record(); torch.cuda.synchronize()
    return 2 * x.numel() * 2 * reps / (s.elapsed_time(e) * 1e-3) / 1e12
print(f"probe: device copy {copy_tbps(2 << 30, 10):.2f} TB/s from HBM (2 GiB x2); "
      f"{copy_tbps(12 << 20, 400):.2f} TB/s from L2 (12 MiB x2, resident)")
EOF
} 2>&1 | tee "$out/machine.log"

echo "== bench ($(since) s)"
timeout 200 "$py" -m csra_triton bench --out "$out" --budget-s 110 > "$out/bench.log" 2>&1
bench_rc=$?
tail -n 4 "$out/bench.log"

echo "== tests ($(since) s)"
xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
tmo=()
"$py" -c "import pytest_timeout" 2>/dev/null && tmo=(--timeout 90)
# On a GPU every drawn shape of the property tests compiles new kernel variants: 25 examples here
# (the CPU CI runs 200), derandomized like CI.
HYPOTHESIS_PROFILE=gpu-check timeout 140 "$py" -m pytest -q tests "${xdist[@]}" "${tmo[@]}" \
    -p no:cacheprovider -rfE > "$out/tests.log" 2>&1
test_rc=$?
tail -n 12 "$out/tests.log"

echo "== e2e ($(since) s)"
# Eager model only by default (compiling ResNet-101 twice takes minutes of a short lease):
# E2E_COMPILE_BUDGET_S=600 adds the torch.compile'd rows.
timeout $(( 60 + ${E2E_COMPILE_BUDGET_S:-0} * 3 )) "$py" -m csra_triton bench \
    --shapes latency-r101-224 --pass fwd --impls triton --e2e \
    --budget-s "${E2E_COMPILE_BUDGET_S:-0}" --out "$out/e2e" > "$out/e2e.log" 2>&1
e2e_rc=$?

echo "== extras ($(since) s)"
{
  timeout 45 "$py" -m csra_triton tune --shapes coco-r101-448 --budget-s 12
  echo "-- compute-sanitizer memcheck"
  timeout 40 compute-sanitizer --tool memcheck --print-limit 20 "$py" - <<'EOF'
import torch, csra_triton
x = torch.randn(2, 64, 7, 7, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(4, 10, 64, device="cuda", requires_grad=True)
csra_triton.csra(x, w, [1.0, 2.0, 4.0, float("inf")], 0.1).sum().backward()
torch.cuda.synchronize()
print("memcheck run finished", float(x.grad.float().norm()), float(w.grad.norm()))
EOF
  echo "-- ncu (headline forward)"
  timeout 45 ncu --clock-control none -k regex:csra_fwd_kernel -c 1 --section SpeedOfLight \
      --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,gpu__time_duration.sum \
      "$py" - <<'EOF'
import torch, csra_triton
from csra_triton import benchmark as bm
b = bm.Bench(bm.SHAPES["coco-r101-448"], "triton", torch.device("cuda"), n_sets=1)
with torch.no_grad():
    b.module(b.xs[0])
torch.cuda.synchronize()
EOF
} > "$out/extras.log" 2>&1
grep -E "best|rejected|ERROR SUMMARY|memcheck run|Duration|dram__bytes|lts__t_bytes|Throughput" \
    "$out/extras.log" | head -30

echo "tests rc=$test_rc, bench rc=$bench_rc, e2e rc=$e2e_rc, total $(since) s (logs in $out)"
grep -E "^\| e2e|^\| (eager|torch.compile)" "$out/e2e.log"
sed -n '/^| shape | pass/,$p' "$out/bench.log"   # the table, last
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
