#!/usr/bin/env bash
# The GPU check (shared DESIGN.md §5). One command on a CUDA machine, no network, under 6 minutes:
#   1. the test suite on CUDA (real kernels, no interpreter; parallel when pytest-xdist is there);
#   2. every benchmark shape x pass x impl (eager, torch.compile, csra-triton), eager and triton
#      rows first, compile rows afterwards and skipped once the time budget is spent;
#   3. the results JSON (DESIGN.md §4) written into the folder given as $1 (default bench/results/),
#      and a short table printed last: shape, pass, ms per impl, speed-ups, % of floor, peak MB.
# Usage: bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')" || exit 2
"$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
# On a GPU every drawn shape of the property tests compiles new kernel variants: 25 examples here
# (the CPU CI runs 200).
HYPOTHESIS_PROFILE=gpu-check timeout 170 "$py" -m pytest -q tests "${xdist[@]}" \
    -p no:cacheprovider > "$out/tests.log" 2>&1
test_rc=$?
tail -n 15 "$out/tests.log"

elapsed=$(( $(date +%s) - start ))
budget=$(( 300 - elapsed ))        # compile rows start only while under this many seconds of bench
[ "$budget" -lt 30 ] && budget=30
timeout $(( 345 - elapsed )) "$py" -m csra_triton bench --out "$out" --budget-s "$budget" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$test_rc (log: $out/tests.log), bench rc=$bench_rc, total $(( $(date +%s) - start )) s"
sed -n '/^| shape | pass/,$p' "$out/bench.log"   # the table, last
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
