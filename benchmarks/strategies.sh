#!/usr/bin/env bash
# The three strategies side by side on GPUs, with TE + THD packing + FP8 (delayed scaling):
#   1. each entrypoint for STEPS steps on NPROC GPUs and on one GPU with grad_acc_steps=NPROC (the same global
#      batch and samples), with the worst relative per-step loss difference between the two curves;
#   2. the 650M model for a few steps per strategy on NPROC GPUs: parameters stored per GPU, peak memory, tokens/s.
#     OUT=/tmp/out NPROC=2 bash benchmarks/strategies.sh
# STRATEGIES (default "ddp fsdp2 mfsdp") picks the entrypoints of part 1, BIG_STRATEGIES (default: the same) of part 2.
set -u
OUT=${OUT:?set OUT to a folder for the results}
NPROC=${NPROC:-2}
STEPS=${STEPS:-50}
STRATEGIES=${STRATEGIES:-ddp fsdp2 mfsdp}
BIG_STRATEGIES=${BIG_STRATEGIES:-$STRATEGIES}
PRECISION=${PRECISION:-fp8_delayed}
RUNS=$(mktemp -d)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
COMMON=(--config-name L0_sanity "precision=$PRECISION" use_sequence_packing=true logger.progress_bar=false validation.every_n_steps=0
  checkpoint.ckpt_dir=null)
ARCHIVE=strategies.tgz
source "$(dirname "$0")/launch.sh"

for strategy in $STRATEGIES; do
  for nproc in 1 "$NPROC"; do
    train "8M_${strategy}_${nproc}gpu" "$nproc" "train_$strategy.py" "num_train_steps=$STEPS" \
      "grad_acc_steps=$((NPROC / nproc))" logger.log_every_n_steps=1 "logger.metrics_file=$RUNS/8M_${strategy}_${nproc}gpu.jsonl"
  done
done
for strategy in $BIG_STRATEGIES; do
  RUN_LIMIT=240 train "650M_$strategy" "$NPROC" "train_$strategy.py" model_tag=esm2_t33_650M_UR50D num_train_steps=12 \
    logger.log_every_n_steps=6 "logger.metrics_file=$RUNS/650M_$strategy.jsonl"
done

python3 - "$RUNS" "$NPROC" <<'PY' | tee "$RUNS/summary.txt"
import json, pathlib, re, sys
runs, nproc = pathlib.Path(sys.argv[1]), sys.argv[2]
def rows(name):
    path = runs / f"{name}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r] if path.exists() else []
for strategy in ("ddp", "fsdp2", "mfsdp"):
    one, many = rows(f"8M_{strategy}_1gpu"), rows(f"8M_{strategy}_{nproc}gpu")
    if one and many:
        a, b = {r["step"]: r["train/loss"] for r in one}, {r["step"]: r["train/loss"] for r in many}
        steps = sorted(set(a) & set(b))
        worst = max(steps, key=lambda s: abs(b[s] / a[s] - 1))
        print(f"8M {strategy}: {nproc} GPUs vs 1 GPU, steps {steps[0]}-{steps[-1]}: loss {a[steps[0]]:.4f} -> "
              f"{a[steps[-1]]:.4f} (1 GPU) / {b[steps[-1]]:.4f}; worst relative difference "
              f"{abs(b[worst] / a[worst] - 1):.2e} at step {worst}; tokens/s per GPU {one[-1]['train/tokens_per_s_per_gpu']:.0f}"
              f" (1 GPU) / {many[-1]['train/tokens_per_s_per_gpu']:.0f} ({nproc} GPUs)")
    big = rows(f"650M_{strategy}")
    log = runs / f"650M_{strategy}.log"
    stored = re.search(r"Parameters stored on this rank: (\S+) GiB of the model's (\S+) GiB", log.read_text()) if log.exists() else None
    if big:
        print(f"650M {strategy} on {nproc} GPUs: parameters per GPU {stored[1] if stored else '?'} of {stored[2] if stored else '?'} GiB, "
              f"peak memory {big[-1]['train/peak_memory_gib']:.2f} GiB, tokens/s per GPU {big[-1]['train/tokens_per_s_per_gpu']:.0f}, "
              f"loss {big[-1]['train/loss']:.4f}")
PY
cat "$RUNS/status.txt"
pack
