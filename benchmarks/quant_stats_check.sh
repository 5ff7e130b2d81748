#!/usr/bin/env bash
# One GPU (Hopper or newer): quantisation statistics (quant_stats, through nvdlfw-inspect) on the 35M model, packed
# 16k-token batches, and what they cost.
#   (a) statistics every 10 steps under precision=fp8_current and fp8_delayed (delayed also with overflows_pct):
#       metrics files with quant/layer_NN/... keys, and a health report PNG of each (health_report.py) with the loss
#       of a BF16 run of the same command beside it
#   (b) overhead: tokens/s of fp8_current without statistics and with quant_stats.every_n_steps = 1, 10, 100, each run
#       a fresh process (nvdlfw-inspect's state is global, so one process cannot switch it), REPEATS rounds
#       interleaved (off 1 10 100, off 1 10 100, ...); per run the tokens/s of steps LOG_EVERY+1..STEPS (the first
#       window, with start-up and warm-up, left out), median over the rounds -> quant_stats_overhead.{md,json}
# The fp8_current run of (a) is round 1's every_n_steps=10 run of (b). On one H200 (2026-12-02, 35M, start-up
# included) a run of 100-120 steps took about 35 s, 60 s with statistics at every step: (a) 167 s, the 12 runs of (b)
# with STEPS=100 about 9 minutes, more than one 10-minute device call holds with set-up, hence PARTS and ROUNDS.
#
#   OUT=/tmp/out bash benchmarks/quant_stats_check.sh
#   OUT=/tmp/out PARTS=overhead bash benchmarks/quant_stats_check.sh   # (b) only; PARTS=stats: (a) only
#   OUT=/tmp/out PARTS=overhead ROUNDS=3 bash ...  # only round 3 of (b) (rounds split over several sessions)
#   OUT=/tmp/out PARTS=summary bash ...            # only the table of (b), from the metrics files in $OUT
#   OUT=/tmp/out NVDLFW_WHEEL=wheels/nvdlfw_inspect-0.2.2-py3-none-any.whl bash benchmarks/quant_stats_check.sh
# nvdlfw-inspect must be importable (pip install nvdlfw-inspect); on a host without network pass a wheel fetched
# elsewhere with `pip download nvdlfw-inspect --no-deps -d wheels` as NVDLFW_WHEEL.
set -u
OUT=${OUT:?set OUT to a folder for the results}
MODEL=${MODEL:-esm2_t12_35M_UR50D}
STEPS=${STEPS:-120}
LOG_EVERY=${LOG_EVERY:-40}
REPEATS=${REPEATS:-3}
PARTS=${PARTS:-stats overhead}
ROUNDS=${ROUNDS:-$(seq 1 "$REPEATS")}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
if [[ $PARTS != summary ]] && ! python3 -c "import nvdlfw_inspect" 2>/dev/null; then
  if [[ -n ${NVDLFW_WHEEL:-} ]]; then
    python3 -m pip install -q --no-deps "$NVDLFW_WHEEL" || exit 1
  else
    echo "nvdlfw-inspect is not installed: pip install nvdlfw-inspect (or pass NVDLFW_WHEEL=<wheel file>)"
    exit 1
  fi
fi
if [[ $PARTS != summary ]]; then
  python3 -c "import nvdlfw_inspect, transformer_engine; print('TE', transformer_engine.__version__)" | tee "$OUT/versions.txt"
  python3 -m pip show nvdlfw-inspect 2>/dev/null | grep -i '^version' | sed 's/^/nvdlfw-inspect /' | tee -a "$OUT/versions.txt"
fi

run() {  # run NAME OVERRIDES...: one training process, its metrics file and log in $OUT
  local name=$1
  shift
  rm -rf "$OUT/$name.jsonl" "$OUT/${name}_quant_stats"
  timeout 300 python3 train_ddp.py --config-name L0_sanity "model_tag=$MODEL" use_sequence_packing=true \
    dataset.max_seq_length=1024 token_micro_batch_size=16384 "num_train_steps=$STEPS" lr_scheduler.warmup_steps=20 \
    "logger.log_every_n_steps=$LOG_EVERY" logger.progress_bar=false validation.every_n_steps=0 checkpoint.ckpt_dir=null \
    "logger.metrics_file=$OUT/$name.jsonl" "hydra.run.dir=$OUT/hydra/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? ($(grep -c 'Quantisation underflow above' "$OUT/$name.log") underflow warnings)"
}

# (b) overhead, interleaved rounds; round 1's every_n_steps=10 run is (a)'s fp8_current run
if [[ $PARTS == *overhead* ]]; then
  for round in $ROUNDS; do
    run "off_r$round" precision=fp8_current
    for every in 1 10 100; do
      run "every${every}_r$round" precision=fp8_current quant_stats.enabled=true "quant_stats.every_n_steps=$every"
    done
  done
fi
# (a) delayed scaling with its overflow statistic, and the BF16 baseline of the loss panel
if [[ $PARTS == *stats* ]]; then
  [[ -f $OUT/every10_r1.jsonl ]] || run every10_r1 precision=fp8_current quant_stats.enabled=true quant_stats.every_n_steps=10
  run fp8_delayed_stats precision=fp8_delayed quant_stats.enabled=true quant_stats.every_n_steps=10 \
    "quant_stats.stats=[underflows_pct,scale_inv_min,scale_inv_max,mse,overflows_pct]"
  run bf16 precision=bf16
  python3 health_report.py "$OUT/every10_r1.jsonl" --baseline "$OUT/bf16.jsonl" --out "$OUT/health_fp8_current.png"
  python3 health_report.py "$OUT/fp8_delayed_stats.jsonl" --baseline "$OUT/bf16.jsonl" --out "$OUT/health_fp8_delayed.png"
fi
[[ $PARTS == *overhead* || $PARTS == summary ]] || exit 0

OUT=$OUT REPEATS=$REPEATS python3 - <<'EOF'
"""Median tokens/s per setting over the rounds, from each run's metrics file (the windows after the first)."""
import json, os, statistics
from pathlib import Path

out, repeats = Path(os.environ["OUT"]), int(os.environ["REPEATS"])
RATE, STEP_TIME = "train/tokens_per_s_per_gpu", "train/step_time_s"


def measured(path):
    """tokens/s over the log windows after the first, the statistics steps, and the most quant keys of a step."""
    if not path.is_file():
        return None, [], 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if RATE in r]
    tokens = seconds = 0.0
    for before, window in zip(train, train[1:]):
        window_seconds = window[STEP_TIME] * (window["step"] - before["step"])
        tokens, seconds = tokens + window[RATE] * window_seconds, seconds + window_seconds
    quant = [sum(k.startswith("quant/") for k in r) for r in records]
    stat_steps = sorted({r["step"] for r, n in zip(records, quant) if n})
    return (tokens / seconds if seconds else None), stat_steps, max(quant, default=0)


rows = []
for label, prefix in (("off", "off"), ("every 1 step", "every1"), ("every 10 steps", "every10"),
                      ("every 100 steps", "every100")):
    runs = [measured(out / f"{prefix}_r{r}.jsonl") for r in range(1, repeats + 1)]
    rates = [rate for rate, _, _ in runs if rate]
    rows.append({"quant_stats": label, "runs": [f"{prefix}_r{r}" for r in range(1, repeats + 1)],
                 "tokens_per_s": rates, "median": statistics.median(rates) if rates else None,
                 "stat_steps": runs[0][1], "quant_keys_per_step": runs[0][2]})
base = rows[0]["median"]
lines = ["| quant_stats | tokens/s per GPU, median | each run | vs off | statistics steps (run 1) | quant keys a step |",
         "|---|---|---|---|---|---|"]
for row in rows:
    median, rates = row["median"], " / ".join(f"{rate:,.0f}" for rate in row["tokens_per_s"]) or "failed"
    change = f"{100 * (median / base - 1):+.1f}%" if median and base else "–"
    shown = f"{median:,.0f}" if median else "–"
    lines.append(f"| {row['quant_stats']} | {shown} | {rates} | {change} | {len(row['stat_steps'])} | "
                 f"{row['quant_keys_per_step']} |")
text = "\n".join(lines)
print(text)
(out / "quant_stats_overhead.md").write_text(text + "\n")
(out / "quant_stats_overhead.json").write_text(json.dumps(rows, indent=1) + "\n")
EOF
