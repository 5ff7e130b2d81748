# Shared by the GPU session scripts (source it): torchrun launches with a hang watchdog, and result packing.
# Needs OUT (results folder), RUNS (scratch folder), ARCHIVE (tarball name under OUT) and the array COMMON
# (overrides every run gets).

pack() { tar czf "$OUT/$ARCHIVE" --exclude="./ckpt_*" --exclude=./hydra -C "$RUNS" . ; }  # logs and metrics only

train() {  # train NAME NPROC ENTRYPOINT OVERRIDES...   (returns the run's exit status; logs go to RUNS/NAME.log)
  local name=$1 nproc=$2 entry=$3; shift 3
  local start=$SECONDS
  PYTHONFAULTHANDLER=1 torchrun --standalone --nproc_per_node="$nproc" "$entry" "${COMMON[@]}" \
    "hydra.run.dir=$RUNS/hydra/$name" "$@" > "$RUNS/$name.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2> /dev/null && ((SECONDS - start < ${RUN_LIMIT:-120})); do sleep 1; done
  if kill -0 "$pid" 2> /dev/null; then  # hung: every rank prints its Python stacks (faulthandler), then all stop
    echo "=== no progress after ${RUN_LIMIT:-120} s: stacks of every rank follow ===" >> "$RUNS/$name.log"
    pkill -ABRT -f "$entry --config-name"; sleep 5; pkill -KILL -f "$entry --config-name"; pkill -KILL -f torchrun
  fi
  wait "$pid"
  local rc=$?
  echo "$name: rc=$rc ${nproc} GPU(s) $entry $((SECONDS - start)) s" | tee -a "$RUNS/status.txt"
  pack
  return $rc
}
