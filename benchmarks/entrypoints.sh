#!/usr/bin/env bash
# One GPU: every entrypoint trains the 8M model for STEPS steps with TE + sequence packing + FP8 (delayed scaling),
# logging the loss every step, so two versions of the recipe (or two settings) can be compared step by step.
#
#   OUT=/tmp/out bash benchmarks/entrypoints.sh                       # this checkout
#   OUT=/tmp/out RECIPE=/path/to/other/checkout TAG=before ARGS="precision=fp8_thd" bash benchmarks/entrypoints.sh
#   OUT=/tmp/out CONFIG=L0_sanity_amplify ARGS="model_tag=amplify_120M use_te=true precision=fp8_delayed \
#     use_sequence_packing=true" bash benchmarks/entrypoints.sh      # AMPLIFY 120M
#
# Writes $OUT/<TAG>_<strategy>.jsonl (the metrics file) and .log for ddp, fsdp2 and mfsdp.
set -u
OUT=${OUT:?set OUT to a folder for the results}
RECIPE=${RECIPE:-$(cd "$(dirname "$0")/.." && pwd)}
TAG=${TAG:-after}
CONFIG=${CONFIG:-L0_sanity}
STEPS=${STEPS:-50}
ARGS=${ARGS:-precision=fp8_delayed use_sequence_packing=true}
STRATEGIES=${STRATEGIES:-ddp fsdp2 mfsdp}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
for strategy in $STRATEGIES; do
  metrics="$OUT/${TAG}_${strategy}.jsonl"
  rm -f "$metrics"
  # shellcheck disable=SC2086  # ARGS holds several overrides
  (cd "$RECIPE" && timeout 300 python3 "train_$strategy.py" --config-name "$CONFIG" $ARGS "num_train_steps=$STEPS" \
    logger.log_every_n_steps=1 logger.progress_bar=false validation.every_n_steps=0 checkpoint.ckpt_dir=null \
    "logger.metrics_file=$metrics" "hydra.run.dir=$OUT/hydra_${TAG}_${strategy}") > "$OUT/${TAG}_${strategy}.log" 2>&1
  echo "$TAG $strategy rc=$?"
done
