#!/usr/bin/env bash
# One GPU: the recipe's RoPE kernel and the GELU-in-GEMM option against the TE kernels they replace.
#   PARTS="tests rope bench650" OUT=/tmp/out bash benchmarks/kernels_check.sh
# tests:    tests/test_rotary_gpu.py and the packed-batch checks of tests/test_modeling_te_gpu.py (metrics as JSON lines)
# rope:     benchmarks/rope_kernels.py (kernel times, graph-replayed, interleaved repeats)
# bench650: benchmark.py, 650M at 16k tokens, graphs, BF16: recipe kernels vs TE's RoPE, TE's bias-GELU, both TE's
#           (three sessions on an 80 GB card: the GELU-only one is left out)
# both650:  the same, recipe kernels vs both of TE's only (two sessions)
# fp8650:   the same for FP8 delayed scaling (recipe's RoPE vs TE's), and BF16, with kernel profiles
# amplify:  benchmark.py, AMPLIFY 350M: reference padded to 512, TE THD graphs with the recipe's and TE's RoPE
#           (AMPLIFY_VARIANTS and AMPLIFY_BUDGETS override the variants and the token budgets, default 16k;
#           AMPLIFY_ARGS: more benchmark.py overrides, default 10 copies of the data an epoch)
# bench3b:  benchmark.py, 3B at 16k tokens, graphs, BF16 weights: recipe kernels vs TE's
# norm650:  benchmark.py, 650M at 16k tokens, graphs, BF16: TE's LayerNorm kernels vs cuDNN's (norm_kernel)
# normtests: tests/test_norm_kernel_gpu.py (metrics as JSON lines)
# graphs:   CUDA-graphed vs eager per-step losses (benchmarks/cuda_graphs_check.sh, 35M, 50 steps, BF16 + FP8 delayed)
# Everything lands in $OUT/results.tgz; $OUT/summary.txt holds the tables.
set -u
OUT=${OUT:?set OUT to a folder for the results}
PARTS=${PARTS:-tests rope bench650}
REPEATS=${REPEATS:-3}
WORK=/tmp/kernels_check
mkdir -p "$WORK" "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
summary="$OUT/summary.txt"
bench() {  # name, then benchmark.py overrides
  local name=$1
  shift
  timeout 560 python3 benchmark.py --config-name benchmark benchmark.readme=null "benchmark.output_dir=$WORK/$name" \
    benchmark.warmup_steps=30 benchmark.timed_steps=30 "benchmark.repeats=$REPEATS" "$@" > "$WORK/$name.log" 2>&1
  echo "== $name rc=$?" >> "$summary"
  cat "$WORK/$name"/*.md >> "$summary" 2>/dev/null || tail -20 "$WORK/$name.log" >> "$summary"
}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv >> "$summary"
for part in $PARTS; do
  start=$SECONDS
  case $part in
    tests)
      GPU_METRICS_FILE="$WORK/gpu_metrics.jsonl" timeout 400 python3 -m pytest -q -s -p no:cacheprovider \
        tests/test_rotary_gpu.py tests/test_modeling_te_gpu.py -k "rotary or rope or gelu or thd or sync" \
        > "$WORK/tests.log" 2>&1
      echo "== tests rc=$?" >> "$summary"
      tail -3 "$WORK/tests.log" >> "$summary"
      cat "$WORK/gpu_metrics.jsonl" >> "$summary" 2>/dev/null ;;
    rope)
      timeout 200 python3 benchmarks/rope_kernels.py --out "$WORK/rope_kernels.json" > "$WORK/rope.log" 2>&1
      echo "== rope rc=$?" >> "$summary"
      grep -v -i warn "$WORK/rope.log" | tail -12 >> "$summary" ;;
    bench650)  # four graphed 650M sessions need ~72 GiB: on an 80 GB card leave out the GELU-only variant
      variants=te_thd_graphs,te_thd_graphs_te_rope,te_thd_graphs_bias_gelu,te_thd_graphs_te_kernels
      [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -lt 100000 ] \
        && variants=te_thd_graphs,te_thd_graphs_te_rope,te_thd_graphs_te_kernels
      bench bench650 "benchmark.models=[esm2_t33_650M_UR50D]" "benchmark.variants=[$variants]" ;;
    fp8650)  # profiled; the BF16 session only where three 650M sessions fit (not on an 80 GB card)
      variants=te_thd_graphs_fp8_delayed,te_thd_graphs_fp8_delayed_te_rope,te_thd_graphs
      [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -lt 100000 ] \
        && variants=te_thd_graphs_fp8_delayed,te_thd_graphs_fp8_delayed_te_rope
      bench fp8650 "benchmark.models=[esm2_t33_650M_UR50D]" "benchmark.variants=[$variants]" benchmark.profile=true ;;
    amplify)
      # shellcheck disable=SC2086  # AMPLIFY_ARGS holds several overrides
      bench amplify "benchmark.models=[amplify_350M]" tokenizer=tokenizers/amplify dataset.max_seq_length=512 \
        "benchmark.variants=[${AMPLIFY_VARIANTS:-hf_pad1024,te_thd_graphs,te_thd_graphs_te_rope}]" \
        "benchmark.token_budgets=[${AMPLIFY_BUDGETS:-16384}]" ${AMPLIFY_ARGS:-benchmark.epoch_copies=10} ;;
    norm650)  # cuDNN's LayerNorm kernels against TE's (two sessions: fits an 80 GB card)
      bench norm650 "benchmark.models=[esm2_t33_650M_UR50D]" "benchmark.variants=[te_thd_graphs,te_thd_graphs_cudnn_norm]" ;;
    normtests)
      GPU_METRICS_FILE="$WORK/gpu_metrics.jsonl" timeout 150 python3 -m pytest -q -s -p no:cacheprovider \
        tests/test_norm_kernel_gpu.py > "$WORK/normtests.log" 2>&1
      echo "== normtests rc=$?" >> "$summary"
      grep -E "metrics|passed|failed|Error" "$WORK/normtests.log" | tail -12 >> "$summary" ;;
    both650)  # all of the recipe's kernels against all of TE's, two sessions (fits an 80 GB card)
      bench both650 "benchmark.models=[esm2_t33_650M_UR50D]" "benchmark.variants=[te_thd_graphs,te_thd_graphs_te_kernels]" ;;
    bench3b)
      bench bench3b "benchmark.models=[esm2_t36_3B_UR50D]" use_fp32_master_weights=false \
        "benchmark.variants=[te_thd_graphs,te_thd_graphs_te_kernels]" ;;
    graphs)
      OUT="$WORK/graphs" PRECISIONS="bf16 fp8_delayed" MODES="static graphs" STEPS=50 \
        timeout 400 bash benchmarks/cuda_graphs_check.sh > "$WORK/graphs.log" 2>&1
      echo "== graphs rc=$?" >> "$summary"
      tail -12 "$WORK/graphs.log" >> "$summary" ;;
  esac
  echo "   ($part took $((SECONDS - start)) s)" >> "$summary"
done
tar -czf "$OUT/results.tgz" --exclude='*_trace.json.gz' -C "$WORK" .
cat "$summary"
