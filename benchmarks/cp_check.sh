#!/usr/bin/env bash
# Context parallelism on 2 GPUs (issue 19's acceptance runs that need them). Run from the recipe folder:
#     OUT=/tmp/out bash benchmarks/cp_check.sh
# 1. the equivalence probe: logits, loss and gradients of cp_size=2 against one GPU (benchmarks/cp_equivalence.py);
# 2. 100 steps of L0_sanity_cp (cp_size=2, 2 GPUs) against cp_size=1 on 1 GPU with the same global batch (the same
#    packs: token_micro_batch_size is per CP group), BF16 and FP8 (delayed, current scaling), FSDP2 and DDP: loss
#    curves within 2%;
# 3. stop-and-go with CP: stopped at step 50 with a checkpoint and resumed, against the straight run: bit-identical;
#    then that checkpoint resumed on 1 GPU with cp_size=1 (elastic: the data position is one global count);
# 4. tokens/s and peak memory per GPU at 16k and 32k tokens per sequence (ESM-2 650M, long proteins made by
#    benchmarks/make_long_proteins.py), one GPU against cp_size=2 (an OOM on one GPU is a result too).
# Writes OUT/cp_check.tgz (logs, metrics) and prints OUT/summary.txt.
set -u
OUT=${OUT:?set OUT to a folder for the results}
STEPS=${STEPS:-100}
RUNS=$(mktemp -d)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
COMMON=(--config-name L0_sanity_cp "num_train_steps=$STEPS" logger.log_every_n_steps=1 logger.progress_bar=false
  validation.every_n_steps=0 checkpoint.save_every_n_steps=1000 checkpoint.save_final_model=false)
ARCHIVE=cp_check.tgz
mkdir -p "$OUT"
source "$(dirname "$0")/launch.sh"

NVIDIA_TF32_OVERRIDE=0 torchrun --standalone --nproc_per_node=2 benchmarks/cp_equivalence.py \
  --out "$RUNS/equivalence.json" > "$RUNS/equivalence.log" 2>&1
echo "equivalence: rc=$?" | tee -a "$RUNS/status.txt"

for entry in train_fsdp2 train_ddp; do
  for precision in bf16 fp8_delayed fp8_current; do
    name=${entry}_${precision}
    train "${name}_cp2" 2 "$entry.py" "precision=$precision" "logger.metrics_file=$RUNS/${name}_cp2.jsonl" \
      checkpoint.ckpt_dir=null
    train "${name}_1gpu" 1 "$entry.py" "precision=$precision" cp_size=1 "logger.metrics_file=$RUNS/${name}_1gpu.jsonl" \
      checkpoint.ckpt_dir=null
  done
done

# Stop-and-go (FSDP2, FP8 delayed scaling: its amax history is part of the checkpoint), then elastic cp 2 -> 1.
half=$((STEPS / 2))
train stop_first 2 train_fsdp2.py precision=fp8_delayed "logger.metrics_file=$RUNS/stop_resumed.jsonl" \
  "checkpoint.ckpt_dir=$RUNS/ckpt_stop" "checkpoint.exit_after_n_steps=$half"
mkdir -p "$RUNS/ckpt_elastic" && cp -r "$RUNS/ckpt_stop/step_$(printf %07d $half)" "$RUNS/ckpt_elastic/"
train stop_second 2 train_fsdp2.py precision=fp8_delayed "logger.metrics_file=$RUNS/stop_resumed.jsonl" \
  "checkpoint.ckpt_dir=$RUNS/ckpt_stop"
train elastic_1gpu 1 train_fsdp2.py precision=fp8_delayed cp_size=1 "logger.metrics_file=$RUNS/elastic_1gpu.jsonl" \
  "checkpoint.ckpt_dir=$RUNS/ckpt_elastic"

# Long sequences: ESM-2 650M, one sequence of 16k (32k) tokens per micro-batch per CP group, 20 steps.
python benchmarks/make_long_proteins.py --out "$RUNS/long.faa" --count 64 --min-length 33000 > /dev/null
for tokens in 16384 32768; do
  long=(model_tag=esm2_t33_650M_UR50D "dataset.path=$RUNS/long.faa" "dataset.max_seq_length=$tokens"
    "token_micro_batch_size=$tokens" num_train_steps=20 dataset.validation_size=0 checkpoint.ckpt_dir=null)
  RUN_LIMIT=600 train "long_${tokens}_cp2" 2 train_fsdp2.py "${long[@]}" "logger.metrics_file=$RUNS/long_${tokens}_cp2.jsonl"
  RUN_LIMIT=600 train "long_${tokens}_1gpu" 1 train_fsdp2.py "${long[@]}" cp_size=1 \
    "logger.metrics_file=$RUNS/long_${tokens}_1gpu.jsonl"
done

python3 - "$RUNS" "$STEPS" <<'PY' | tee "$RUNS/summary.txt"
import json, pathlib, sys
runs, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def rows(name):
    path = runs / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
def losses(name):
    return {r["step"]: r["train/loss"] for r in rows(name) if "train/loss" in r}
def track(a_name, b_name, limit=None):
    a, b = losses(a_name), losses(b_name)
    common = sorted(set(a) & set(b))
    if not common:
        return f"{b_name}: no common steps with {a_name}"
    worst = max(common, key=lambda s: abs(b[s] / a[s] - 1))
    same = sum(a[s] == b[s] for s in common)
    verdict = "" if limit is None else ("  OK" if abs(b[worst] / a[worst] - 1) < limit else "  FAIL")
    return (f"{b_name} vs {a_name}: {len(common)} steps, {same} bit-identical, worst rel diff "
            f"{abs(b[worst] / a[worst] - 1):.2e} at step {worst}{verdict}")
equivalence = runs / "equivalence.json"
for case in json.loads(equivalence.read_text()) if equivalence.exists() else []:
    print("equivalence", json.dumps(case))
for entry in ("train_fsdp2", "train_ddp"):
    for precision in ("bf16", "fp8_delayed", "fp8_current"):
        print(track(f"{entry}_{precision}_1gpu", f"{entry}_{precision}_cp2", limit=0.02))
print(track("train_fsdp2_fp8_delayed_cp2", "stop_resumed"), "(stop-and-go: expect all bit-identical)")
print(track("train_fsdp2_fp8_delayed_cp2", "elastic_1gpu", limit=0.02), "(elastic cp 2 -> 1, from step", steps // 2, ")")
for tokens in (16384, 32768):
    for layout in ("1gpu", "cp2"):
        last = [r for r in rows(f"long_{tokens}_{layout}") if "train/tokens_per_s_per_gpu" in r]
        if not last:
            print(f"long {tokens} {layout}: no metrics (see long_{tokens}_{layout}.log: out of memory?)")
            continue
        r = last[-1]
        print(f"long {tokens} {layout}: {r['train/tokens_per_s_per_gpu']:.0f} tokens/s per GPU, "
              f"peak {r.get('train/peak_memory_gib', float('nan')):.1f} GiB per GPU")
PY
pack
cp "$RUNS/summary.txt" "$OUT/summary.txt"
