#!/usr/bin/env bash
# Stop-and-go on GPUs with TE + FP8 (delayed scaling) + THD packing: for FSDP2 and Megatron-FSDP, an uninterrupted
# run against the same run stopped half-way (with a checkpoint) and resumed, on NPROC GPUs; then the FSDP2 checkpoint
# resumed on one GPU (elastic), and FSDP2 stopped by SIGTERM to its whole process group (torchrun, ranks, DataLoader
# workers: what `scancel` or a time limit does) and resumed. Prints the worst relative per-step loss difference.
#     OUT=/tmp/out NPROC=2 bash benchmarks/stop_and_go.sh
set -u
OUT=${OUT:?set OUT to a folder for the results}
NPROC=${NPROC:-2}
STEPS=${STEPS:-16}
RUNS=$(mktemp -d)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PRECISION=${PRECISION:-fp8_delayed}
COMMON=(--config-name L0_sanity "precision=$PRECISION" use_sequence_packing=true "num_train_steps=$STEPS" logger.log_every_n_steps=1
  logger.progress_bar=false validation.every_n_steps=0 checkpoint.save_every_n_steps=1000)

ARCHIVE=stop_and_go.tgz
source "$(dirname "$0")/launch.sh"

for entry in ${ENTRIES:-train_fsdp2 train_mfsdp}; do
  ckpt=$RUNS/ckpt_$entry
  train "${entry}_straight" "$NPROC" "$entry.py" "logger.metrics_file=$RUNS/${entry}_straight.jsonl" \
    checkpoint.ckpt_dir=null || continue  # no reference run, nothing to compare with
  train "${entry}_first" "$NPROC" "$entry.py" "logger.metrics_file=$RUNS/${entry}_resumed.jsonl" \
    "checkpoint.ckpt_dir=$ckpt" "checkpoint.exit_after_n_steps=$((STEPS / 2))"
  train "${entry}_second" "$NPROC" "$entry.py" "logger.metrics_file=$RUNS/${entry}_resumed.jsonl" \
    "checkpoint.ckpt_dir=$ckpt" checkpoint.save_final_model=false
done
# Elastic: the FSDP2 checkpoint of step STEPS/2, written by NPROC ranks, resumed by one (same global batch).
mkdir -p "$RUNS/ckpt_elastic" && cp -r "$RUNS/ckpt_train_fsdp2/step_$(printf %07d $((STEPS / 2)))" "$RUNS/ckpt_elastic/"
train train_fsdp2_elastic 1 train_fsdp2.py "logger.metrics_file=$RUNS/train_fsdp2_elastic.jsonl" "grad_acc_steps=$NPROC" \
  "checkpoint.ckpt_dir=$RUNS/ckpt_elastic" checkpoint.save_final_model=false

# SIGTERM to the whole process group once half the steps are logged; then resume to the end.
setsid torchrun --standalone --nproc_per_node="$NPROC" train_fsdp2.py "${COMMON[@]}" "hydra.run.dir=$RUNS/hydra/signal" \
  "logger.metrics_file=$RUNS/train_fsdp2_signalled.jsonl" "checkpoint.ckpt_dir=$RUNS/ckpt_signal" \
  > "$RUNS/train_fsdp2_signal_first.log" 2>&1 &
leader=$!
for _ in $(seq 600); do  # up to 120 s for half the steps
  [ "$(grep -c train/loss "$RUNS/train_fsdp2_signalled.jsonl" 2> /dev/null)" -ge $((STEPS / 2)) ] && break; sleep 0.2
done
kill -TERM -- "-$leader"; wait "$leader"; echo "train_fsdp2_signal_first: rc=$? (SIGTERM to the group)" | tee -a "$RUNS/status.txt"
train train_fsdp2_signal_second "$NPROC" train_fsdp2.py "logger.metrics_file=$RUNS/train_fsdp2_signalled.jsonl" \
  "checkpoint.ckpt_dir=$RUNS/ckpt_signal" checkpoint.save_final_model=false

python3 - "$RUNS" <<'PY' | tee "$RUNS/summary.txt"
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
def losses(name):
    path = runs / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}
for straight, other in [("train_fsdp2_straight", "train_fsdp2_resumed"), ("train_mfsdp_straight", "train_mfsdp_resumed"),
                        ("train_fsdp2_straight", "train_fsdp2_elastic"), ("train_fsdp2_straight", "train_fsdp2_signalled")]:
    a, b = losses(straight), losses(other)
    steps = sorted(set(a) & set(b))
    if not steps:
        print(f"{other}: no common steps with {straight}")
        continue
    worst = max(steps, key=lambda s: abs(b[s] / a[s] - 1))
    exact = sum(a[s] == b[s] for s in steps)
    print(f"{other} vs {straight}: steps {steps[0]}-{steps[-1]}, {exact}/{len(steps)} bit-identical, worst relative "
          f"difference {abs(b[worst] / a[worst] - 1):.2e} at step {worst} ({a[worst]:.6f} vs {b[worst]:.6f})")
PY
grep -h "Resumed\|published\|Stopping\|Received\|killed by signal\|Checksums" "$RUNS"/*.log | sed 's/^.*\] - //' | tee -a "$RUNS/summary.txt"
pack
