#!/usr/bin/env bash
# What a checkpoint costs: ESM-2 650M (FSDP2, packed BF16, FP32 master weights + AdamW) saved synchronously and with
# checkpoint.async_save=true, each twice; the log lines give the training stall, the checksum time and the time to
# publish. One GPU.      OUT=/tmp/out bash benchmarks/checkpoint_cost.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
CKPT=${CKPT:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
for mode in false true; do
  rm -rf "$CKPT/650M"
  timeout 400 python3 train_fsdp2.py --config-name L1_650M dataset.path=data/sample/938293.PRJEB85.HG003687.faa \
    use_sequence_packing=true num_train_steps=6 checkpoint.save_every_n_steps=2 "checkpoint.async_save=$mode" \
    checkpoint.save_final_model=false "checkpoint.ckpt_dir=$CKPT/650M" lr_scheduler.warmup_steps=2 \
    logger.log_every_n_steps=2 logger.progress_bar=false validation.every_n_steps=0 "hydra.run.dir=$OUT/hydra_$mode" \
    > "$OUT/checkpoint_async_$mode.log" 2>&1
  echo "async_save=$mode rc=$?"
  grep -h "Checkpoint of step\|Checksums of\|published" "$OUT/checkpoint_async_$mode.log" | sed 's/^.*\] - //'
done
rm -rf "$CKPT/650M"
