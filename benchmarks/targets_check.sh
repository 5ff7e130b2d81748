#!/usr/bin/env bash
# One GPU: every row of the throughput targets in ONE benchmark run (hydra_config/benchmark_targets.yaml;
# benchmark_targets_80gb.yaml on an 80 GB card: 7 min 55 s on an H100, 2026-12-07),
# longer than one device call allows, so the run is started as its own process session and outlives the call:
#   PHASE=start OUT=/tmp/out bash benchmarks/targets_check.sh   # GPU tests (and graphed-vs-eager losses), then starts
#                                                               # the benchmark; returns at $DEADLINE s with what
#                                                               # has finished so far
#   PHASE=wait  OUT=/tmp/out bash benchmarks/targets_check.sh   # (next call, on the same warm machine) waits for the
#                                                               # run, at most until $DEADLINE s, and returns it
# start: the GPU tests named by $TESTS (default: the failed-capture test of
#        tests/test_modeling_te_gpu.py and tests/test_norm_kernel_gpu.py, metrics as JSON lines; TESTS= runs none),
#        then, with GRAPHS=1, benchmarks/cuda_graphs_check.sh (35M, 50 steps, BF16 and FP8 delayed, static-shape
#        eager vs graphed); AMPLIFY=1 adds an AMPLIFY 350M benchmark after the targets (benchmark.rc: both exit codes).
# Everything lands in $OUT/results.tgz (kernel traces left out: too large to come back); $OUT/summary.txt says how far
# the run got. The report itself: /tmp/targets/results/benchmark_*.{md,json,png}.
set -u
OUT=${OUT:?set OUT to a folder for the results}
PHASE=${PHASE:-start}
DEADLINE=${DEADLINE:-560}
WORK=/tmp/targets
mkdir -p "$WORK" "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
summary="$OUT/summary.txt"
if [ "$PHASE" = start ]; then
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv >> "$summary"
  tests=${TESTS-"tests/test_modeling_te_gpu.py::test_a_failed_capture_does_not_switch_fp8_off_for_later_ones
    tests/test_norm_kernel_gpu.py"}
  if [ -n "$tests" ]; then
    # shellcheck disable=SC2086  # $tests is a pytest argument list
    GPU_METRICS_FILE="$WORK/gpu_metrics.jsonl" timeout 200 python3 -m pytest -q -s -p no:cacheprovider $tests \
      > "$WORK/tests.log" 2>&1
    echo "== tests rc=$? ($SECONDS s)" >> "$summary"
    tail -3 "$WORK/tests.log" >> "$summary"
  fi
  if [ "${GRAPHS:-0}" = 1 ]; then
    OUT="$WORK/graphs" PRECISIONS="bf16 fp8_delayed" MODES="static graphs" STEPS=50 \
      timeout 200 bash benchmarks/cuda_graphs_check.sh > "$WORK/graphs.log" 2>&1
    echo "== graphs rc=$? ($SECONDS s)" >> "$summary"
    tail -12 "$WORK/graphs.log" >> "$summary"
  fi
  config=benchmark_targets amplify_budget=32768  # an 80 GB card holds fewer sessions per group
  if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -lt 100000 ]; then
    config=benchmark_targets_80gb amplify_budget=16384
  fi
  targets="python3 benchmark.py --config-name $config benchmark.readme=null benchmark.output_dir=$WORK/results"
  # AMPLIFY=1: then AMPLIFY 350M, the reference padded to 512 against TE THD graphs + FP8 (issue 15's ratio)
  amplify="python3 benchmark.py --config-name benchmark benchmark.readme=null benchmark.output_dir=$WORK/amplify \
    benchmark.models=[amplify_350M] tokenizer=tokenizers/amplify dataset.max_seq_length=512 \
    benchmark.variants=[hf_pad1024,te_thd_graphs_fp8_delayed,te_thd_graphs_fp8_delayed_cudnn_norm] \
    benchmark.token_budgets=[$amplify_budget] benchmark.warmup_steps=30 benchmark.epoch_copies=10"
  [ "${AMPLIFY:-0}" = 1 ] || amplify=true
  # its own process session: the device tool ends the call's processes, not this one
  setsid bash -c "$targets > $WORK/benchmark.log 2>&1; rc=\$?; $amplify >> $WORK/benchmark.log 2>&1; \
    echo \$rc \$? > $WORK/benchmark.rc" < /dev/null &
  echo "== benchmark started at $SECONDS s" >> "$summary"
fi
while [ ! -f "$WORK/benchmark.rc" ] && [ "$SECONDS" -lt "$DEADLINE" ]; do sleep 5; done
if [ -f "$WORK/benchmark.rc" ]; then
  echo "== benchmark rc=$(cat "$WORK/benchmark.rc") ($SECONDS s into this call)" >> "$summary"
else
  echo "== benchmark still running at $SECONDS s: $(grep -c '^\[benchmark\]' "$WORK/benchmark.log") lines so far" >> "$summary"
fi
grep '^\[benchmark\]' "$WORK/benchmark.log" | tail -40 >> "$summary"
tar -czf "$OUT/results.tgz" --exclude='*_trace.json.gz' -C "$WORK" .
cat "$summary"
