#!/usr/bin/env bash
# One device call: the launch/barrier latency microbenchmark, then build the package with the CUDA
# backend, run the CUDA tests (and the parity and prefill suites on device="cuda"), then the
# benchmarks. Everything lands in $OUT; the table prints last. `trace` builds with the in-graph
# timeline (csrc/cuda/trace.cuh) and summarises one resident decode token. `ab` times resident
# decode of the source trees AB_TREES ("name=dir ...", e.g. `git archive main` unpacked; the first
# is the reference) and this tree in alternation (bench/ab_decode.py), then, with AB_TRACE=1,
# traces this tree. `footprint` profiles one decode token's launches for the code each runs
# (bench/code_footprint.py).
#   bash bench/run_device.sh [chain|tests|probe|footprint|bench|all|trace|ab]
set -uo pipefail
OUT=${OUT:-/tmp/flashmoe-device-out}
WHAT=${1:-all}
mkdir -p "$OUT"
# build logs stay on the device machine (at most 8 files come back from $OUT); a failed build
# prints its log's tail
LOGS=/tmp/flashmoe-build-logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if [[ $WHAT == all || $WHAT == chain ]]; then
  # what one dependency costs with no work in it (launch chains, grid barriers)
  nvcc -O3 -std=c++17 -arch=sm_90 bench/chain_latency.cu -o /tmp/chain_latency && /tmp/chain_latency | tee "$OUT/chain_latency.txt"
  # what holds a block's row loop: the loads in flight or the arithmetic
  nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc bench/stream_pattern.cu -o /tmp/stream_pattern && /tmp/stream_pattern | tee "$OUT/stream_pattern.txt"
  # what every block of a launch reading the same input vector costs
  nvcc -O3 -std=c++17 -arch=sm_90 bench/broadcast_read.cu -o /tmp/broadcast_read && /tmp/broadcast_read \
    | tee "$OUT/broadcast_read.txt"
  # whether a slice read from L2 is slower when another SM pulled it in (the L2's two partitions)
  nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc bench/l2_locality.cu -o /tmp/l2_locality && /tmp/l2_locality \
    | tee "$OUT/l2_locality.txt"
  # the instruction cache: its size, and what cold straight-line code costs
  nvcc -O3 -std=c++17 -arch=sm_90 -Ibench bench/icache_fetch.cu -o /tmp/icache_fetch && /tmp/icache_fetch \
    | tee "$OUT/icache_fetch.txt"
  # what a q4 row loop and a prologue cost by themselves, warm and with their code evicted
  nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc -Ibench bench/row_loop.cu -o /tmp/row_loop && /tmp/row_loop \
    | tee "$OUT/row_loop.txt"
  [[ $WHAT == chain ]] && exit "${PIPESTATUS[0]}"
fi
t0=$(date +%s)
# sm_90 only: the H200 is the one GPU here, and it keeps the build short
# (explicit either way: the build folder is kept between calls, and with it the cached option)
TRACE_ARG=-DFLASHMOE_CUDA_TRACE=$([[ $WHAT == trace ]] && echo ON || echo OFF)
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 $TRACE_ARG" python3 -m pip install --no-build-isolation --no-deps -q . \
  > "$LOGS/build.log" 2>&1 || { tail -60 "$LOGS/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import flashmoe_native._core as c; r = c.cuda_unavailable_reason(); print('cuda:', r or 'available')"

status=0
if [[ $WHAT == all || $WHAT == tests ]]; then
  t0=$(date +%s)
  # test_parity's first-token read count is the CPU's (the CUDA resident cache reads nothing per
  # token); test_cuda checks the CUDA accounting instead
  FLASHMOE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_parity.py tests/test_prefill.py -k "not first_token_reads" -rs 2>&1 | tee "$OUT/tests.log" | tail -40
  status=${PIPESTATUS[0]}
  echo "tests: exit $status, $(( $(date +%s) - t0 )) s"
fi
if [[ $WHAT == all || $WHAT == probe ]]; then
  # one decode step's kernels under Nsight Compute (skipping the first token's 28 launches: embed,
  # 3 DeltaNet layers of 6, one attention layer of 8, lm_head)
  t0=$(date +%s)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout 240 "$NCU" --clock-control none --launch-skip 28 --launch-count 28 \
    --metrics "$(python3 bench/kernel_probe.py --metrics)" -f -o "$OUT/probe" \
    python3 bench/kernel_probe.py --work /tmp/fmprobe > "$OUT/ncu.log" 2>&1
  "$NCU" --import "$OUT/probe.ncu-rep" --csv --page raw > "$OUT/ncu.csv" 2>> "$OUT/ncu.log"
  python3 bench/kernel_probe.py --summarize "$OUT/ncu.csv" 2>&1 | tee "$OUT/probe.txt" || tail -20 "$OUT/ncu.log"
  echo "probe: $(( $(date +%s) - t0 )) s"
fi
if [[ $WHAT == footprint ]]; then
  # the code each launch of the second decode token runs (the first token's 28 launches skipped)
  t0=$(date +%s)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout 240 "$NCU" --clock-control none --kernel-name regex:"matvec|deltanet|expert|attn|qk_prep|embed" \
    --launch-skip 28 --launch-count 28 --section SourceCounters -f -o /tmp/footprint \
    python3 bench/kernel_probe.py --work /tmp/fmprobe > "$OUT/ncu.log" 2>&1
  "$NCU" --import /tmp/footprint.ncu-rep --page source --csv --print-source sass > /tmp/footprint.csv 2>> "$OUT/ncu.log"
  python3 bench/code_footprint.py /tmp/footprint.csv 2>&1 | tee "$OUT/footprint.txt" || tail -20 "$OUT/ncu.log"
  echo "footprint: $(( $(date +%s) - t0 )) s"
fi
if [[ $WHAT == all || $WHAT == bench ]]; then
  t0=$(date +%s)
  # BENCH_ARGS=--resident-only skips the disk ceilings and the streaming regime
  timeout 540 python3 bench/cuda_bench.py --work /tmp/fmbench --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
    | grep -v "^synthetic" | tail -80
  echo "bench: exit ${PIPESTATUS[0]}, $(( $(date +%s) - t0 )) s"
fi
if [[ $WHAT == ab ]]; then
  VARIANTS=()
  for tree in ${AB_TREES:?AB_TREES=\"name=source-dir ...\"}; do
    t0=$(date +%s)
    name=${tree%%=*}
    (cd "${tree#*=}" && CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" python3 -m pip install --no-build-isolation \
      --no-deps -q --target "/tmp/v_$name" .) > "$LOGS/build_$name.log" 2>&1 || { tail -60 "$LOGS/build_$name.log"; exit 1; }
    echo "$name build: $(( $(date +%s) - t0 )) s"
    VARIANTS+=("$name=/tmp/v_$name")
  done
  python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from synthetic import qwen35_35b_a3b, write_synthetic_model as w; w(Path('/tmp/fmbench/qwen35-35b-a3b-q4'), qwen35_35b_a3b(None))"
  SITE=$(python3 -c "import flashmoe_native, pathlib; print(pathlib.Path(flashmoe_native.__file__).parents[1])")
  timeout 420 python3 bench/ab_decode.py --model /tmp/fmbench/qwen35-35b-a3b-q4 "${VARIANTS[@]}" "new=$SITE" \
    2>&1 | tee "$OUT/ab.txt"
  status=${PIPESTATUS[0]}
  if [[ ${AB_TRACE:-0} == 1 ]]; then
    CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90 -DFLASHMOE_CUDA_TRACE=ON" python3 -m pip install --no-build-isolation \
      --no-deps -q . > "$LOGS/build_trace.log" 2>&1 || { tail -60 "$LOGS/build_trace.log"; exit 1; }
    WHAT=trace
  fi
fi
if [[ $WHAT == trace ]]; then
  FLASHMOE_CUDA_TRACE="$OUT/trace.bin" timeout 300 python3 bench/cuda_bench.py --work /tmp/fmbench \
    --out "$OUT" --resident-only 2>&1 | grep "^resident"
  python3 bench/trace_summary.py "$OUT/trace.bin" --first 47 --count 12 | tee "$OUT/trace.txt"
  status=${PIPESTATUS[0]}
fi
exit $status
