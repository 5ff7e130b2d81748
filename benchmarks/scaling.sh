#!/usr/bin/env bash
# Issue 20 (b): weak scaling of the three strategies. Every model x strategy x GPU count trains WARMUP + TIMED steps
# at a fixed per-GPU budget of TOKENS tokens per micro-batch (packed: token_micro_batch_size; padded: TOKENS / SEQ
# sequences), logging every step to its own metrics JSONL; then the 15B model on BIG_NPROC GPUs with FSDP2 and
# Megatron-FSDP in each of BIG_PRECISIONS, built on the meta device (use_meta_device=true, the default: allocated only
# after sharding), trained WARMUP + TIMED steps, stopped with a checkpoint (checkpoint.exit_after_n_steps) and resumed
# for RESUME_STEPS more; the save and load times come from the logs. benchmarks/scaling_report.py writes the table
# (tokens/s per GPU: median over the timed steps with min-max; scaling efficiency against 1 GPU; peak memory) and a
# chart into OUT; logs and metrics go to OUT/scaling.tgz.
#     OUT=/tmp/out bash benchmarks/scaling.sh                                       # 8 GPUs: the whole sweep
#     OUT=/tmp/out NPROCS="1 2" MODELS=esm2_t6_8M_UR50D STRATEGIES="ddp fsdp2" PACKING=false TOKENS=2048 SEQ=256 \
#       TIMED=3 WARMUP=1 BIG_NPROC=0 bash benchmarks/scaling.sh                       # CPU (gloo): the plumbing only
# Env: MODELS (default "esm2_t33_650M_UR50D esm2_t36_3B_UR50D"), STRATEGIES ("ddp fsdp2 mfsdp"), NPROCS ("1 2 4 8"),
# TOKENS (16384 per GPU), SEQ (dataset.max_seq_length, 1024), PACKING (true; needs TE), PRECISION (bf16), WARMUP (5),
# TIMED (30), REPEAT (8: the sample proteome repeated this often, so that 8 GPUs meet few epoch restarts; DATA, a FASTA
# file, replaces it), RUN_LIMIT (seconds per run, 600), EXTRA (more overrides for every run),
# BIG_NPROC (8; 0 skips the 15B runs), BIG_MODEL (esm2_t48_15B_UR50D), BIG_STRATEGIES ("fsdp2 mfsdp"),
# BIG_PRECISIONS ("bf16 fp8_block"), BIG_ARGS ("activation_checkpointing.mode=full": 16k tokens of 15B activations do
# not fit otherwise, by estimate), RESUME_STEPS (5), CKPT (checkpoint folder, default in the scratch folder: a 15B
# checkpoint with FP32 master weights and AdamW state is about 15e9 x 16 B = 224 GiB, one per run at a time).
set -u
OUT=${OUT:?set OUT to a folder for the results}
MODELS=${MODELS:-esm2_t33_650M_UR50D esm2_t36_3B_UR50D}
STRATEGIES=${STRATEGIES:-ddp fsdp2 mfsdp}
NPROCS=${NPROCS:-1 2 4 8}
TOKENS=${TOKENS:-16384}
SEQ=${SEQ:-1024}
PACKING=${PACKING:-true}
PRECISION=${PRECISION:-bf16}
WARMUP=${WARMUP:-5}
TIMED=${TIMED:-30}
REPEAT=${REPEAT:-8}
EXTRA=${EXTRA:-}
BIG_NPROC=${BIG_NPROC:-8}
BIG_MODEL=${BIG_MODEL:-esm2_t48_15B_UR50D}
BIG_STRATEGIES=${BIG_STRATEGIES:-fsdp2 mfsdp}
BIG_PRECISIONS=${BIG_PRECISIONS:-bf16 fp8_block}
BIG_ARGS=${BIG_ARGS:-activation_checkpointing.mode=full}
RESUME_STEPS=${RESUME_STEPS:-5}
export RUN_LIMIT=${RUN_LIMIT:-600}
RUNS=$(mktemp -d)
CKPT=${CKPT:-$RUNS}
mkdir -p "$OUT"
if [[ -z ${DATA:-} ]]; then  # the shipped sample, REPEAT times (record names made unique)
  DATA=$RUNS/sample_x$REPEAT.faa
  for i in $(seq "$REPEAT"); do sed "s/^>/>r${i}_/" data/sample/938293.PRJEB85.HG003687.faa; done > "$DATA"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
batch=("dataset.max_seq_length=$SEQ" "dataset.micro_batch_size=$((TOKENS / SEQ))" "use_sequence_packing=$PACKING")
[[ $PACKING == true ]] && batch+=("token_micro_batch_size=$TOKENS")
# shellcheck disable=SC2206  # EXTRA is a list of overrides
COMMON=(--config-name L0_sanity "dataset.path=$DATA" "${batch[@]}" dataset.num_workers=2 logger.progress_bar=false
  logger.log_every_n_steps=1 validation.every_n_steps=0 checkpoint.ckpt_dir=null optimizer.lr=4e-4
  lr_scheduler.warmup_steps=100 $EXTRA)
ARCHIVE=scaling.tgz
source "$(dirname "$0")/launch.sh"
printf 'name\tkind\tmodel\tstrategy\tprecision\tnproc\twarmup\trc\n' > "$RUNS/runs.tsv"

record() {  # record NAME KIND MODEL STRATEGY PRECISION NPROC RC: one line of the manifest the report reads
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$WARMUP" "$7" >> "$RUNS/runs.tsv"
}

for model in $MODELS; do
  for strategy in $STRATEGIES; do
    for nproc in $NPROCS; do
      name="${model}_${strategy}_${PRECISION}_${nproc}gpu"
      train "$name" "$nproc" "train_$strategy.py" "model_tag=$model" "precision=$PRECISION" \
        "num_train_steps=$((WARMUP + TIMED))" "logger.metrics_file=$RUNS/$name.jsonl"
      record "$name" sweep "$model" "$strategy" "$PRECISION" "$nproc" $?
    done
  done
done

if ((BIG_NPROC > 0)); then
  for strategy in $BIG_STRATEGIES; do
    for precision in $BIG_PRECISIONS; do
      name="${BIG_MODEL}_${strategy}_${precision}_${BIG_NPROC}gpu"
      # shellcheck disable=SC2206
      big=("model_tag=$BIG_MODEL" "precision=$precision" use_meta_device=true $BIG_ARGS
        "num_train_steps=$((WARMUP + TIMED + RESUME_STEPS))" "checkpoint.ckpt_dir=$CKPT/ckpt_$name"
        checkpoint.save_final_model=false checkpoint.max_checkpoints=1 checkpoint.save_every_n_steps=1000000)
      rm -rf "$CKPT/ckpt_$name"
      train "$name" "$BIG_NPROC" "train_$strategy.py" "${big[@]}" "checkpoint.exit_after_n_steps=$((WARMUP + TIMED))" \
        "logger.metrics_file=$RUNS/$name.jsonl"
      record "$name" big "$BIG_MODEL" "$strategy" "$precision" "$BIG_NPROC" $?
      train "${name}_resume" "$BIG_NPROC" "train_$strategy.py" "${big[@]}" \
        "logger.metrics_file=$RUNS/${name}_resume.jsonl"
      record "${name}_resume" resume "$BIG_MODEL" "$strategy" "$precision" "$BIG_NPROC" $?
      rm -rf "$CKPT/ckpt_$name"
    done
  done
fi

cp "$RUNS/runs.tsv" "$OUT/scaling_runs.tsv"
python3 benchmarks/scaling_report.py "$RUNS" --output "$OUT/scaling" --title "Weak scaling, $TOKENS tokens per GPU"
cat "$RUNS/status.txt"
pack
