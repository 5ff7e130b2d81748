#!/usr/bin/env bash
# One GPU: do the low-precision modes train like BF16? 35M, packed 16k-token batches, the same data and seed, 200
# steps; each run's per-step losses compared with BF16's over 20-step windows (benchmarks/compare_losses.py --track):
#   bf16_optimizer_masters   BF16 parameters, FP32 master weights in TE's FusedAdam (master_weights=optimizer)
#   fp8_delayed              FP8 delayed scaling, FP32 master weights in the model
#   fp8_delayed_fp8_weights  FP8 primary weights (fp8_config.quantized_model_init=true), masters in FusedAdam
#   fp8_current_plan         a per-layer plan: the first and last 2 of 12 layers BF16, layers 3-10 FP8 current scaling
#
#   OUT=/tmp/out bash benchmarks/low_precision_check.sh          # STEPS=200 MODEL=esm2_t12_35M_UR50D by default
#   OUT=/tmp/out RUN_NAMES="bf16 fp8_current_plan" bash benchmarks/low_precision_check.sh
#   OUT=/tmp/out CONFIG=L0_sanity_amplify MODEL=amplify_120M RUN_NAMES="bf16 fp8_delayed fp8_current fp8_block" \
#     bash benchmarks/low_precision_check.sh                     # AMPLIFY 120M, every FP8 recipe against BF16
set -u
OUT=${OUT:?set OUT to a folder for the results}
CONFIG=${CONFIG:-L0_sanity}
MODEL=${MODEL:-esm2_t12_35M_UR50D}
STEPS=${STEPS:-200}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
declare -A RUNS=(
  [bf16]="precision=bf16"
  [bf16_optimizer_masters]="precision=bf16 master_weights=optimizer"
  [fp8_delayed]="precision=fp8_delayed"
  [fp8_current]="precision=fp8_current"
  [fp8_block]="precision=fp8_block"
  [fp8_delayed_fp8_weights]="precision=fp8_delayed master_weights=optimizer fp8_config.quantized_model_init=true"
  [fp8_current_plan]="precision=fp8_current fp8_layers=3-10"
)
RUN_NAMES=${RUN_NAMES:-bf16 bf16_optimizer_masters fp8_delayed fp8_delayed_fp8_weights fp8_current_plan}
for name in $RUN_NAMES; do
  rm -f "$OUT/${MODEL}_$name.jsonl"
  # shellcheck disable=SC2086  # the run's overrides
  timeout 300 python3 train_ddp.py --config-name "$CONFIG" "model_tag=$MODEL" ${RUNS[$name]} \
    use_sequence_packing=true dataset.max_seq_length=1024 token_micro_batch_size=16384 "num_train_steps=$STEPS" \
    lr_scheduler.warmup_steps=20 logger.log_every_n_steps=1 logger.progress_bar=false validation.every_n_steps=0 \
    checkpoint.ckpt_dir=null "logger.metrics_file=$OUT/${MODEL}_$name.jsonl" "hydra.run.dir=$OUT/hydra/$name" \
    > "$OUT/${MODEL}_$name.log" 2>&1
  echo "$name rc=$?"
done
for name in $RUN_NAMES; do
  [[ $name == bf16 ]] && continue
  python3 "$(dirname "$0")/compare_losses.py" "$OUT" --model "$MODEL" --track "$name" bf16
done
