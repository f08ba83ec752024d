#!/usr/bin/env bash
# The GPU check (issue 22's order). One command on a CUDA machine, no network, ~9-10 minutes on
# an H100/H200; every section has its own time limit and writes into $1 as it goes, so a run
# cut short still returns what it measured. GPU_CHECK_SECTIONS (default "machine host bench
# e2e tests extras") picks sections, e.g. for a rerun of what a cut run missed.
#   machine: versions, GPU, two probes (device copy from HBM and from L2) for the model's rates,
#            and the L2 -> SM read rate per SM (bench/l2_probe.py; model v2 assumes 35.3 GB/s);
#   host:    where one forward and one forward+backward spend host time (bench/profile_op.py:
#            host µs per call and per launch, the direct-launch path checked bitwise and timed,
#            cProfile, torch.profiler with stacks) at latency-r101-224 and coco-r101-448;
#   bench:   every benchmark shape x pass x impl (eager, compile, compile-cg of the official
#            head; triton, triton-compile, triton-compile-cg), host µs and device µs per call,
#            peak memory, errors vs float64; compile rows after the rest, cut by a budget;
#   e2e:     one ResNet-101 CSRA training step (448, B=32, bf16 autocast) at 80 and 9,605
#            classes, official head vs CSRATriton (compiled rows with E2E_COMPILE_BUDGET_S);
#   tests:   the suite on CUDA (real kernels);
#   extras:  compute-sanitizer memcheck, racecheck and initcheck of a small forward+backward,
#            a bounded tuning sweep of the headline, the headline's fwd+bwd with and without
#            the kept scores (CSRA_TRITON_KEEP_SCORES), an ncu readout of the headline forward.
# Logs: $1/{machine,host,bench,e2e,tests,extras}.log; results JSON: $1/*.json.
# GPU_CHECK_DRY=1 runs the flow on a CPU machine (tiny shapes, CUDA-only steps skipped).
# Usage: bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CSRA_TRITON_TUNE_CACHE="$out/tune-cache.json"
start=$(date +%s)
since() { echo $(( $(date +%s) - start )); }
sections=" ${GPU_CHECK_SECTIONS:-machine host bench e2e tests extras} "
want() { [[ "$sections" == *" $1 "* ]]; }
dry="${GPU_CHECK_DRY:-0}"
if [ "$dry" = 1 ]; then
  shapes=(--shapes "coco-r101-448@B=2@d=32@h=3@w=3@C=5" --reps 2)
  echo "DRY RUN on $(uname -m): tiny shapes, CUDA-only steps skipped"
else
  shapes=()
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')" || exit 2
fi
bench_rc=0; test_rc=0; e2e_rc=0

want machine && [ "$dry" != 1 ] && {

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

if want machine; then
  echo "== L2 -> SM probe ($(since) s)"
  if [ "$dry" = 1 ]; then
    "$py" bench/l2_probe.py "$out" --dry
  else
    timeout 60 "$py" bench/l2_probe.py "$out"
  fi 2>&1 | tee "$out/l2_probe.log" | tail -n 9
fi

if want host; then
  echo "== host ($(since) s)"
  if [ "$dry" = 1 ]; then
    "$py" -m csra_triton bench --host --shapes latency-r101-224,coco-r101-448 --reps 5 \
        > "$out/host.log" 2>&1
  else
    timeout 90 "$py" bench/profile_op.py latency-r101-224,coco-r101-448 > "$out/host.log" 2>&1
  fi
  grep -E "host .* µs/call|bitwise|^\| coco" "$out/host.log" | head -24
fi

if want bench; then
  echo "== bench ($(since) s)"
  timeout 230 "$py" -m csra_triton bench --out "$out" --budget-s 120 "${shapes[@]}" \
      > "$out/bench.log" 2>&1
  bench_rc=$?
  tail -n 4 "$out/bench.log"
fi

if want e2e && [ "$dry" != 1 ]; then
  echo "== e2e ($(since) s)"
  # Eager models by default (compiling ResNet-101 takes minutes of a short lease):
  # E2E_COMPILE_BUDGET_S=600 adds the torch.compile'd rows.
  timeout $(( 120 + ${E2E_COMPILE_BUDGET_S:-0} * 3 )) "$py" -m csra_triton bench \
      --shapes latency-r101-224 --pass fwd --impls triton --e2e --e2e-classes 80,9605 \
      --budget-s "${E2E_COMPILE_BUDGET_S:-0}" --out "$out/e2e" > "$out/e2e.log" 2>&1
  e2e_rc=$?
fi

if want tests; then
echo "== tests ($(since) s)"

xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
tmo=()
"$py" -c "import pytest_timeout" 2>/dev/null && tmo=(--timeout 90)
# On a GPU every drawn shape of the property tests compiles new kernel variants: 25 examples here
# (the CPU CI runs 200), derandomized like CI.
tests=(tests)
[ "$dry" = 1 ] && tests=(tests/test_hostpath.py tests/test_layers.py)
HYPOTHESIS_PROFILE=gpu-check timeout 120 "$py" -m pytest -q "${tests[@]}" "${xdist[@]}" "${tmo[@]}" \
    -p no:cacheprovider -rfE > "$out/tests.log" 2>&1
test_rc=$?
tail -n 12 "$out/tests.log"
fi

if want extras && [ "$dry" != 1 ]; then
echo "== extras ($(since) s)"
cat > "$out/small_step.py" <<'EOF'
import torch, csra_triton
x = torch.randn(2, 64, 7, 7, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(4, 10, 64, device="cuda", requires_grad=True)
csra_triton.csra(x, w, [1.0, 2.0, 4.0, float("inf")], 0.1).sum().backward()
with torch.no_grad():
    csra_triton.csra(x, w, [1.0, 2.0, 4.0, float("inf")], 0.1)
torch.cuda.synchronize()
print("sanitizer run finished", float(x.grad.float().norm()), float(w.grad.norm()))
EOF
{
  timeout 40 "$py" -m csra_triton tune --shapes coco-r101-448 --budget-s 12
  for tool in memcheck racecheck initcheck; do
    echo "-- compute-sanitizer $tool"
    timeout 40 compute-sanitizer --tool "$tool" --print-limit 20 "$py" "$out/small_step.py"
  done
  echo "-- kept scores vs recomputed dS' (headline fwd+bwd; device µs per call, issue 20)"
  for keep in 1 0; do
    CSRA_TRITON_KEEP_SCORES=$keep timeout 45 "$py" -m csra_triton bench --shapes coco-r101-448 \
        --pass fwd+bwd --impls triton --budget-s 0 --out "$out/keep-scores-$keep" 2>&1 | tail -n 3
  done
  echo "-- ncu (headline forward)"
  timeout 45 ncu --clock-control none -k regex:csra_fwd_kernel -c 1 --section SpeedOfLight \
      --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,gpu__time_duration.sum \
      "$py" - <<'EOF'
import torch, csra_triton
from csra_triton.tools import benchmark as bm
b = bm.Bench(bm.SHAPES["coco-r101-448"], "triton", torch.device("cuda"), n_sets=1)
with torch.no_grad():
    b.module(b.xs[0])
torch.cuda.synchronize()
EOF
} > "$out/extras.log" 2>&1
grep -E "best|rejected|ERROR SUMMARY|sanitizer run|Duration|dram__bytes|lts__t_bytes|Throughput" \
    "$out/extras.log" | head -30
fi

echo "tests rc=$test_rc, bench rc=$bench_rc, e2e rc=$e2e_rc, total $(since) s (logs in $out)"
[ -f "$out/e2e.log" ] && grep -E "^\| e2e|^\| (eager|torch.compile)" "$out/e2e.log"
[ -f "$out/bench.log" ] && sed -n '/^| shape | pass/,$p' "$out/bench.log"   # the tables, last
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
