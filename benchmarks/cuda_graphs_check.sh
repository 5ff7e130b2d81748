#!/usr/bin/env bash
# One GPU: per-step losses of CUDA-graphed training against eager training of the same static-shape batches, and of
# static against today's (dynamic) packing, for each precision; then the 650M step in each mode.
#
#   OUT=/tmp/out bash benchmarks/cuda_graphs_check.sh
#   OUT=/tmp/out MODEL=esm2_t30_150M_UR50D PRECISIONS="bf16 fp8_delayed" STEPS=50 bash benchmarks/cuda_graphs_check.sh
#   OUT=/tmp/out CONFIG=L0_sanity_amplify MODEL=amplify_120M ARGS="dataset.max_seq_length=512" bash benchmarks/cuda_graphs_check.sh
#
# Writes $OUT/<model>_<precision>_<mode>.jsonl / .log and prints a comparison table (benchmarks/compare_losses.py).
set -u
OUT=${OUT:?set OUT to a folder for the results}
CONFIG=${CONFIG:-L0_sanity}
MODEL=${MODEL:-esm2_t12_35M_UR50D}
STEPS=${STEPS:-50}
PRECISIONS=${PRECISIONS:-bf16 fp8_delayed fp8_current fp8_block}
MODES=${MODES:-dynamic static graphs}
ARGS=${ARGS:-}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
for precision in $PRECISIONS; do
  for mode in $MODES; do
    case $mode in
      dynamic) extra="" ;;
      static) extra="static_shapes=true" ;;
      graphs) extra="cuda_graphs=true" ;;
    esac
    name="${MODEL}_${precision}_${mode}"
    rm -f "$OUT/$name.jsonl"
    # shellcheck disable=SC2086  # extra and ARGS hold overrides
    timeout 300 python3 train_ddp.py --config-name "$CONFIG" "model_tag=$MODEL" "precision=$precision" \
      use_sequence_packing=true $extra dataset.max_seq_length=1024 token_micro_batch_size=16384 \
      "num_train_steps=$STEPS" logger.log_every_n_steps=1 logger.progress_bar=false validation.every_n_steps=0 \
      checkpoint.ckpt_dir=null "logger.metrics_file=$OUT/$name.jsonl" "hydra.run.dir=$OUT/hydra/$name" $ARGS \
      > "$OUT/$name.log" 2>&1
    echo "$name rc=$?"
  done
done
python3 "$(dirname "$0")/compare_losses.py" "$OUT" --model "$MODEL"
