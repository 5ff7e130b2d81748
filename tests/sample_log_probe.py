"""Run a real training entrypoint with test instrumentation (for subprocess and torchrun tests).

    [torchrun --nproc_per_node=2] tests/sample_log_probe.py OUT_DIR ENTRYPOINT [hydra overrides...]

Writes OUT_DIR/rank{RANK}.json with the CRC32 of every training sequence the rank's collator received, in order.
Validation and data-loader workers are off unless overridden later on the command line, so every collated batch is
a training batch of this process. Fault injection, through environment variables:
  PROBE_KILL_AT_PUBLISH=N   SIGKILL this process while the checkpoint of step N is written but not yet published
  PROBE_FAIL_SAVE=N         make writing the checkpoint of step N fail as a full disk would (ENOSPC)
  PROBE_NAN_AT_STEP=N       make one gradient NaN in step N, as a diverging run would
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import signal
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import compose

import checkpoint
import training
from collator import BSHDCollator, THDCollator


def record_samples(seen: list[int]) -> None:
    for collator_class in (BSHDCollator, THDCollator):
        collate = collator_class.__call__

        def recording_collate(self, samples, collate=collate):
            seen.extend(zlib.crc32(bytes(sample["input_ids"])) for sample in samples)
            return collate(self, samples)

        collator_class.__call__ = recording_collate


def inject_faults() -> None:
    kill_step = int(os.environ.get("PROBE_KILL_AT_PUBLISH", -1))
    fail_step = int(os.environ.get("PROBE_FAIL_SAVE", -1))
    write_manifest, write = checkpoint._write_manifest, checkpoint.Checkpointer._write

    def killing_write_manifest(path, step, world_size, digests):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return write_manifest(path, step, world_size, digests)

    def failing_write(self, step, tmp_dir, state, use_async):
        if step == fail_step:
            (tmp_dir / "partial.bin").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, step, tmp_dir, state, use_async)

    checkpoint._write_manifest = killing_write_manifest
    checkpoint.Checkpointer._write = failing_write

    nan_step, forward_backward, calls = int(os.environ.get("PROBE_NAN_AT_STEP", -1)), training.forward_backward, [0]

    def diverging_forward_backward(model, strategy, micro_batches, world_size):
        loss = forward_backward(model, strategy, micro_batches, world_size)
        calls[0] += 1
        if calls[0] == nan_step:
            grad = next(p for p in model.parameters() if p.grad is not None).grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")
        return loss

    training.forward_backward = diverging_forward_backward


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)  # what Hydra's job logging would show
    out_dir, entrypoint, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    seen: list[int] = []
    record_samples(seen)
    inject_faults()
    overrides = ["dataset.num_workers=0", "validation.every_n_steps=0", "logger.progress_bar=false", *overrides]
    importlib.import_module(entrypoint).main(compose("L0_sanity", overrides))
    (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
