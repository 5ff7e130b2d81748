#!/usr/bin/env bash
# The GPU acceptance checks of one device session, in priority order, each bounded in time so that one slow
# section cannot starve the rest. Run from the recipe root on a GPU host with TransformerEngine:
#     OUT=/tmp/out bash benchmarks/device_session.sh
# Results go to $OUT: the benchmark table/chart (bench/), per-run metrics and logs (runs.tgz), summary.txt.
set -u
OUT=${OUT:?set OUT to a folder for the results}
RUNS=$(mktemp -d)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

pack() { tar czf "$OUT/runs.tgz" --exclude="./ckpt_*" --exclude=./hydra -C "$RUNS" . ; }  # logs and metrics only
train() {  # train NAME LIMIT_S ENTRYPOINT OVERRIDES...
  local name=$1 limit=$2 entry=$3; shift 3
  local start=$SECONDS
  timeout "$limit" python3 "$entry" --config-name L0_sanity logger.progress_bar=false \
    "logger.metrics_file=$RUNS/$name.jsonl" "hydra.run.dir=$RUNS/hydra/$name" "$@" > "$RUNS/$name.log" 2>&1
  echo "$name rc=$? ${entry} $((SECONDS - start))s" | tee -a "$RUNS/status.txt"
  pack
}

# 1. Throughput of every variant on the 650M model (issues 2, 4, 7).
timeout 300 python3 benchmark.py --config-name benchmark "benchmark.models=[esm2_t33_650M_UR50D]" \
  benchmark.warmup_steps=8 benchmark.timed_steps=8 "benchmark.output_dir=$OUT/bench" benchmark.readme=null \
  hydra.run.dir="$RUNS/hydra/bench" > "$RUNS/benchmark.log" 2>&1
echo "benchmark rc=$?" | tee -a "$RUNS/status.txt"; pack

# 2. FP8 recipes track BF16 over 200 steps of the 35M model with packed batches (issue 4).
for preset in bf16 fp8_delayed fp8_current fp8_block; do
  train "35M_$preset" 90 train_fsdp2.py model_tag=esm2_t12_35M_UR50D "precision=$preset" use_sequence_packing=true num_train_steps=200 \
    dataset.max_seq_length=1024 lr_scheduler.warmup_steps=20 optimizer.lr=4e-4 logger.log_every_n_steps=20 \
    validation.every_n_steps=0
done

# 3. The TE 8M model learns like the reference (same seed, 50 steps); the reference runs on GPU too (issues 2, 3).
for te in false true; do
  train "8M_use_te_$te" 60 train_fsdp2.py "use_te=$te" num_train_steps=50 validation.every_n_steps=50
done

# 4. Stop-and-go with TE + FP8 + packing on FSDP2 and Megatron-FSDP, on every GPU of the host (issue 6).
OUT="$OUT" NPROC="$(nvidia-smi -L | wc -l)" STEPS=16 bash benchmarks/stop_and_go.sh > "$RUNS/stop_and_go.log" 2>&1
pack

python3 - "$RUNS" > "$OUT/summary.txt" 2>&1 <<'PY'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
def metrics(name):
    path = runs / f"{name}.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
def train_losses(name):
    return {m["step"]: m["train/loss"] for m in metrics(name) if "train/loss" in m}
for name in ["35M_bf16_thd", "35M_fp8_thd", "35M_fp8_current_thd", "35M_fp8_block_thd", "8M_use_te_false", "8M_use_te_true"]:
    ms = [m for m in metrics(name) if "train/loss" in m]
    if ms:
        last = ms[-1]
        print(f"{name}: losses {[round(m['train/loss'], 4) for m in ms]} tok/s {last['train/tokens_per_s_per_gpu']:.0f} "
              f"peak {last['train/peak_memory_gib']:.2f} GiB padding {last['train/padding_fraction']:.4f}")
base = train_losses("35M_bf16_thd")
for name in ["35M_fp8_thd", "35M_fp8_current_thd", "35M_fp8_block_thd"]:
    other = train_losses(name)
    if base and other:
        step = max(set(base) & set(other))
        print(f"{name} vs bf16 at step {step}: {other[step] / base[step] - 1:+.4%}")
ref, te = train_losses("8M_use_te_false"), train_losses("8M_use_te_true")
if ref and te:
    print("8M TE vs reference per log step:", {s: f"{te[s] / ref[s] - 1:+.3%}" for s in sorted(set(ref) & set(te))})
PY
cat "$RUNS/status.txt" "$OUT/summary.txt" "$RUNS/stop_and_go.log"
tail -25 "$RUNS/benchmark.log"
