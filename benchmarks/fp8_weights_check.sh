#!/usr/bin/env bash
# One GPU: does FP8 with FP8 primary weights (fp8_config.quantized_model_init=true, FP32 master weights in TE's
# FusedAdam) train like BF16? 35M, packed 16k-token batches, the same data and seed, per-step losses compared over
# 20-step windows, next to FP8 with FP32 master weights in the model and BF16 with master weights in the optimizer.
#
#   OUT=/tmp/out bash benchmarks/fp8_weights_check.sh            # STEPS=200 MODEL=esm2_t12_35M_UR50D by default
set -u
OUT=${OUT:?set OUT to a folder for the results}
MODEL=${MODEL:-esm2_t12_35M_UR50D}
STEPS=${STEPS:-200}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
declare -A RUNS=(
  [bf16]="precision=bf16"
  [bf16_optimizer_masters]="precision=bf16 master_weights=optimizer"
  [fp8_delayed]="precision=fp8_delayed"
  [fp8_delayed_fp8_weights]="precision=fp8_delayed master_weights=optimizer fp8_config.quantized_model_init=true"
)
for name in bf16 bf16_optimizer_masters fp8_delayed fp8_delayed_fp8_weights; do
  rm -f "$OUT/${MODEL}_$name.jsonl"
  # shellcheck disable=SC2086  # the run's overrides
  timeout 300 python3 train_ddp.py --config-name L0_sanity "model_tag=$MODEL" ${RUNS[$name]} \
    use_sequence_packing=true dataset.max_seq_length=1024 token_micro_batch_size=16384 "num_train_steps=$STEPS" \
    lr_scheduler.warmup_steps=20 logger.log_every_n_steps=1 logger.progress_bar=false validation.every_n_steps=0 \
    checkpoint.ckpt_dir=null "logger.metrics_file=$OUT/${MODEL}_$name.jsonl" "hydra.run.dir=$OUT/hydra/$name" \
    > "$OUT/${MODEL}_$name.log" 2>&1
  echo "$name rc=$?"
done
for name in bf16_optimizer_masters fp8_delayed fp8_delayed_fp8_weights; do
  python3 "$(dirname "$0")/compare_losses.py" "$OUT" --model "$MODEL" --track "$name" bf16
done
