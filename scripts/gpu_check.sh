#!/usr/bin/env bash
# Builds slattn on a GPU machine (offline), runs the GPU tests, the
# compute-sanitizer checks and the benchmark; logs go to $OUT (or ./gpu-logs).
# Usage: bash scripts/gpu_check.sh [tests|cuda-tests|sanitize|stress|profile|ncu|stalls|bench|bench14b|ab|all]...   (default: all;
# cuda-tests: the kernel tests alone, ~15 s; stress: 1000 forward+backward steps per block size at the 1.3B
# shape, failing on a step that stalls (a deadlock), ~40 s; ncu: Nsight Compute sections of the SLA kernels at the 1.3B shape,
# not part of all; stalls: warp-stall samples per stretch of SASS of the kernels in $STALL_KERNELS (default the
# Hopper linear backward's two; scripts/ncu_stalls.py), not part of all; ab: this tree against ab-baseline/ (scripts/ab_baseline.sh REV, carried to the GPU machine)
# in one machine session, profile and bench at the 1.3B shape, not part of all). Any other word (say, build)
# only builds.
# The bench steps print their whole table (the JSON files may not all come back: logs count too).
# Optional Python packages the GPU machine lacks (diffusers) may be put as
# wheels in .whl/; they are installed to /tmp/site for this run.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-gpu-logs}"
mkdir -p "$LOGS"
STEPS="${*:-all}"
want() { [[ " $STEPS " == *" $1 "* || " $STEPS " == *" all "* ]]; }
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

echo "== build"
# From scratch: the copied tree's file times may predate a kept build folder's outputs.
rm -rf build
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-index --no-deps . >"$LOGS/build.log" 2>&1 \
  || { tail -40 "$LOGS/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

if want tests; then
  echo "== Python tests (GPU and CPU)"
  (cd tests/python && timeout 420 python3 -m pytest -q -rs -p no:cacheprovider . 2>&1 | tee "$LOGS/tests.log" | tail -25) \
    || status=1
fi
if [[ " $STEPS " == *" cuda-tests "* ]]; then
  echo "== CUDA kernel tests"
  (cd tests/python && timeout 300 python3 -m pytest -q -p no:cacheprovider test_cuda.py test_cuda_mainloops.py test_hedgehog.py \
    test_sla2_cuda.py test_quantized.py test_quantized_cuda.py 2>&1 | tee "$LOGS/cuda-tests.log" | tail -15) || status=1
fi
if want sanitize; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool"
    # racecheck fails inside cuBLAS's Hopper kernels (the linear branch's sums): its cases leave them out.
    cases=""; [ "$tool" = racecheck ] && cases="--without-cublas"
    timeout 300 compute-sanitizer --tool "$tool" --kernel-name kns=slattn --error-exitcode 3 \
      python3 scripts/sanitize_cases.py $cases >"$LOGS/sanitize-$tool.log" 2>&1
    code=$?
    tail -4 "$LOGS/sanitize-$tool.log"
    [ "$code" -eq 0 ] || status=1
  done
fi
if want stress; then
  echo "== stress: forward+backward steps back to back, a stalled step fails"
  for blocks in 128 64; do
    timeout 150 python3 scripts/stress_sla.py 1,12,32760,128 "$blocks" 1000 10 >"$LOGS/stress-$blocks.log" 2>&1
    code=$?
    grep -v -i warn "$LOGS/stress-$blocks.log" | tail -2
    [ "$code" -eq 0 ] || status=1
  done
fi
if want profile; then
  echo "== profile"
  for blocks in 64 128; do
    timeout 200 python3 scripts/profile_sla.py 1,12,32760,128 0.05 "$blocks" 2>&1 | tee "$LOGS/profile-$blocks.log" \
      | grep -v -i warn || status=1
  done
  echo "== profile, low-bit forward (quantized=True), blocks 128: its kernels"
  timeout 200 python3 scripts/profile_sla.py 1,12,32760,128 0.05 128 quantized 2>&1 \
    | tee "$LOGS/profile-128-quantized.log" | grep -E "quantized|int8|e4m3|column_stats|busy" \
    || status=1
fi
if [[ " $STEPS " == *" ncu "* ]]; then
  echo "== Nsight Compute (speed of light, occupancy, warp states), blocks 128"
  timeout 400 ncu -k regex:"sparse_|linear_|key_block_states" -c 8 --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section LaunchStats python3 scripts/profile_sla.py 1,12,32760,128 0.05 128 \
    >"$LOGS/ncu.txt" 2>&1 || status=1
  grep -E "^  [a-z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per" \
    "$LOGS/ncu.txt" | cut -c1-110
fi
if [[ " $STEPS " == *" stalls "* ]]; then
  kernels="${STALL_KERNELS:-linear_query_grads_wgmma|linear_key_grads_wgmma}"
  echo "== warp stalls by stretch of machine code: $kernels (the first ${STALL_COUNT:-2} launches)"
  timeout 300 ncu -k regex:"$kernels" -c "${STALL_COUNT:-2}" --section WarpStateStats --section SourceCounters \
    --import-source no --page source --print-source sass --csv python3 scripts/profile_sla.py 1,12,32760,128 0.05 128 \
    >"$LOGS/sass.csv" 2>"$LOGS/sass.err"
  python3 scripts/ncu_stalls.py "$LOGS/sass.csv" | tee "$LOGS/stalls.txt" || status=1
fi
if want bench; then
  echo "== bench"
  for blocks in 64 128; do
    timeout 300 slattn bench --device cuda --shape 1,12,32760,128 --block-q "$blocks" --block-k "$blocks" \
      --out-dir "$LOGS/bench-$blocks" --repeats 20 2>&1 | grep -v -i warn | tail -12 || status=1
  done
fi
if want bench14b; then
  echo "== bench, Wan2.1-14B 720p shape"
  timeout 400 slattn bench --device cuda --shape 1,40,75600,128 --block-q 128 --block-k 128 \
    --out-dir "$LOGS/bench-14b" --repeats 3 2>&1 | grep -v -i warn | tail -12 || status=1
fi
if [[ " $STEPS " == *" ab "* ]]; then
  # Machine instances differ by 10-20%: a change is measured against its baseline on the same one.
  ab_run() {
    echo "== $1: profile (fwd+bwd kernels, 128-blocks) and bench"
    timeout 200 python3 scripts/profile_sla.py 1,12,32760,128 0.05 128 2>&1 | tee "$LOGS/ab-$1-profile.log" \
      | grep -v -i warn || status=1
    timeout 300 slattn bench --device cuda --shape 1,12,32760,128 --block-q 128 --block-k 128 \
      --out-dir "$LOGS/ab-$1-bench" --repeats 20 2>&1 | grep -A1 "^shape" || status=1
  }
  if [ "$status" -ne 0 ]; then
    echo "ab: skipped, an earlier step failed"
  elif [ -f ab-baseline/pyproject.toml ]; then
    ab_run "this-tree"
    (cd ab-baseline && rm -rf build && python3 -m pip install -q --no-build-isolation --no-index --no-deps . \
      >"$LOGS/ab-build.log" 2>&1) || { tail -20 "$LOGS/ab-build.log"; exit 1; }
    ab_run "baseline-$(cat ab-baseline/REV 2>/dev/null)"
  else
    echo "ab: no ab-baseline/ (make one with scripts/ab_baseline.sh REV and carry it)"; status=1
  fi
fi
exit $status
