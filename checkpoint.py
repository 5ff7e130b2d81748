"""Checkpoints that never lose work: atomic, sharded, resumable on any number of ranks, preemption-aware.

Layout under `checkpoint.ckpt_dir`:

    step_0000100/            a complete checkpoint (published by an atomic rename once every rank has written)
        model_optim/         torch.distributed.checkpoint (DCP) shards of model and optimizer state
        train_state.pt       step, scheduler, data position (map-style data: one number for all ranks)
        rank_00000.pt ...    per-rank RNG states, streaming-data loader state, TransformerEngine FP8 scaling state
        manifest.json        written last: every file and its size, so a truncated checkpoint is recognised
    step_0000200.tmp/        being written (or left by a crash): never resumed from
    final_model/             the portable transformers export (save_final_model=true)

DCP reshards model and optimizer when the number of ranks changes, and the data position of map-style data is a
global count (see dataset.EpochLoader), so a run saved on N ranks resumes on M with no sample repeated or skipped.
Streaming data resumes mid-epoch only on the same number of ranks (its loader state is per rank), and the
`datasets` shuffle buffer's contents are not saved, so up to one buffer of records may be skipped on resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import xxhash
from torch import nn
from torch.distributed.tensor import DTensor

from convert import EXTRA_STATE_SUFFIX
from distributed import STOP_SIGNALS, DistributedContext, all_gather_object, any_rank
from errors import RecipeError
from parallel import plain_name
from precision import PrecisionPlan
from safe_pickle import safe_storage_reader, te_extra_state, te_pickle_allowed

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


def checkpoint_errors() -> tuple[type[BaseException], ...]:
    """What a failed save or load raises (DCP's CheckpointException derives from BaseException, not Exception).

    torch.distributed.checkpoint is imported when first needed: it slows every import of the recipe.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def short_reason(error: BaseException | None) -> str:
    """One line for a failed load: DCP's CheckpointException is every rank's traceback; this is each rank's error."""
    failures = getattr(error, "failures", None)  # DCP: {rank: (exception, traceback summary)}
    if not isinstance(failures, dict):
        return str(error)
    reasons = {f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}" for exc, *_ in failures.values()}
    return "; ".join(sorted(reasons))


class Stateful(Protocol):
    """What `torch.distributed.checkpoint` calls a Stateful: a part of the run that saves and restores itself."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class CheckpointError(RecipeError, RuntimeError):
    """A checkpoint cannot be written or read; the message says what to do."""


class NonFiniteStateError(CheckpointError):
    """The state to be saved holds NaN or infinite values: saving it would replace good checkpoints with poison."""


def _local_tensors(state: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in a nested state dict; this rank's shard of a DTensor."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _local_tensors(value, f"{prefix}{key}.")
    elif isinstance(state, list | tuple):
        for index, value in enumerate(state):
            yield from _local_tensors(value, f"{prefix}{index}.")
    elif isinstance(state, torch.Tensor):
        yield prefix.rstrip("."), state.to_local() if isinstance(state, DTensor) else state


def _state_bytes(state: Any) -> int:
    """Bytes of this rank's tensors of a state dict: what it writes to a checkpoint."""
    return sum(t.numel() * t.element_size() for _, t in _local_tensors(state))


def non_finite_entries(state: Any) -> list[str]:
    """Names of the floating-point tensors of `state` that hold NaN or infinity (one host sync in all)."""
    tensors = [(name, t) for name, t in _local_tensors(state) if t.is_floating_point() and t.numel() > 0]
    if not tensors:
        return []
    finite = torch.stack([t.isfinite().all() for _, t in tensors]).cpu()
    return [name for (name, _), ok in zip(tensors, finite.tolist(), strict=True) if not ok]


class StateDictFlavour(Protocol):
    """How a parallelism strategy exposes (sharded) model and optimizer state for DCP, and the full model."""

    def get(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]: ...

    def set(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None: ...

    def full_model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]: ...


class DistributedStateDict:
    """FSDP2 and DDP state through `torch.distributed.checkpoint.state_dict`.

    It unwraps the model and hands sharded (DTensor) or replicated state to DCP, which writes each shard once and
    reshards on load.
    """

    def get(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": _dequantized(_without_extra_state(model_state)), "optimizer": optim_state}

    def set(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=False),  # `_extra_state` entries travel in the per-rank files
        )

    def full_model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        quantized = any(_is_quantized(param) for param in model.parameters())  # dequantised on the GPU, then moved
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not quantized))
        return {name: value.cpu() for name, value in _dequantized(_without_extra_state(state)).items()}


class MegatronFSDPStateDict:
    """Megatron-FSDP state: its state-dict hooks present the flat shard buffers as (uneven) DTensors for DCP."""

    def get(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": _without_extra_state(model.state_dict()), "optimizer": optimizer.state_dict()}

    def set(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"], strict=False)  # `_extra_state` entries travel in the per-rank files
        optimizer.load_state_dict(state["optimizer"])

    def full_model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from megatron_fsdp.uneven_dtensor import uneven_dtensor_to_full_tensor  # shards may differ in size

        full = {}
        for name, value in _without_extra_state(model.state_dict()).items():
            tensor = uneven_dtensor_to_full_tensor(value) if isinstance(value, DTensor) else value
            full[plain_name(name)] = tensor.detach().cpu()
        return full


def _dequantized(state: dict[str, Any]) -> dict[str, Any]:
    """FP8 primary weights (TE quantized tensors) as plain tensors of their nominal dtype.

    Checkpoints and exports then hold ordinary tensors; loading copies them back into the quantized parameters.
    """
    return {name: value.dequantize() if _is_quantized(value) else value for name, value in state.items()}


def _is_quantized(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and hasattr(value, "_quantizer")  # TE's QuantizedTensor, without TE


def _without_extra_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.endswith(EXTRA_STATE_SUFFIX)}


def _te_extra_states(model: nn.Module) -> dict[str, Any]:
    """FP8 scaling factors and amax histories of TransformerEngine modules (opaque, per module)."""
    return {
        name: module.get_extra_state()
        for name, module in model.named_modules()
        if type(module).get_extra_state is not nn.Module.get_extra_state
    }


def _restore_te_extra_states(model: nn.Module, states: dict[str, Any]) -> None:
    """Give TE modules back their FP8 scaling state (scales and amax histories of delayed scaling).

    `states` come through `_checked_te_states`: each pickle was decoded with `safe_pickle`'s allow-list and written
    again from what it rebuilt. TE unpickles delayed-scaling state only with NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1,
    granted for this call alone.
    """
    modules = dict(model.named_modules())
    with te_pickle_allowed():
        for name, extra in states.items():
            modules[name].set_extra_state(extra)


def _checked_te_states(states: dict[str, Any], source: Path) -> dict[str, Any]:
    """The FP8 states of a per-rank file, each pickle decoded with the allow-list (a hostile one raises, naming it)."""
    return {
        name: te_extra_state(extra, f"{source} (FP8 state of {name})") if torch.is_tensor(extra) else extra
        for name, extra in states.items()
    }


def _rng_state() -> dict[str, Any]:
    """The generators' states as plain values and tensors, so the file loads with `torch.load(weights_only=True)`."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (numpy_state["name"], keys, numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_small_file(path: Path) -> Any:
    """Read a checkpoint's train_state.pt or rank file without running code from it (a copied folder may be hostile).

    `weights_only=True` unpickles tensors and plain Python values only; anything else is refused with an error.
    TransformerEngine's FP8 scaling state inside is a pickle of its own, read by `_checked_te_states`.
    """
    # NumPy arrays (the RNG state of checkpoints written before it was stored as a tensor) rebuild without code.
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # NumPy 2 renamed it
    numpy_types = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray._reconstruct]
    with torch.serialization.safe_globals(numpy_types):
        return torch.load(path, weights_only=True, map_location="cpu")


class ModelAndOptimizer:
    """Model and optimizer state as the strategy's flavour presents it: sharded (DTensor) state for DCP."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, flavour: StateDictFlavour) -> None:
        self.model, self.optimizer, self.flavour = model, optimizer, flavour

    def state_dict(self) -> dict[str, Any]:
        return self.flavour.get(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flavour.set(self.model, self.optimizer, state_dict)


class TEExtraState:
    """TransformerEngine's FP8 scaling state of every module of `model` (per rank; empty without TE)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return _te_extra_states(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _restore_te_extra_states(self.model, state_dict)


class RNGState:
    """The Python, NumPy, torch and CUDA random generators of this process."""

    def state_dict(self) -> dict[str, Any]:
        return _rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _set_rng_state(state_dict)


@dataclass
class CheckpointParts:
    """The `Stateful` pieces of a training run that a checkpoint holds, and where each goes.

    `model_optim`: sharded through DCP (reshards on load). `scheduler`: the same on every rank, saved once.
    `data`: the loader position, saved once (map-style data: one number for all ranks) and per rank (streaming).
    `fp8` and `rng`: per rank; `rng` is restored only on the same number of ranks.
    """

    model_optim: Stateful
    scheduler: Stateful
    data: Stateful
    fp8: Stateful
    rng: Stateful = field(default_factory=RNGState)
    facts: dict[str, Any] = field(default_factory=dict)  # what the run is: compared with a checkpoint's on resume


class Preemption:
    """SIGTERM or SIGUSR1 (a batch system's notice before a time limit) asks for a checkpoint and a clean stop."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> Preemption:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        logger.warning("Received %s: will save a checkpoint and exit after this step.", signal.Signals(signum).name)
        self.requested = True

    def any_rank(self) -> bool:
        """Whether any rank received a stop signal (a batch system may signal ranks at different moments)."""
        return any_rank(self.requested)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints, newest first."""
    found = []
    if ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            match = STEP_DIR.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def file_digest(path: Path, chunk_bytes: int = 16 << 20) -> str:
    """A fast 64-bit checksum (xxHash XXH3) of a file, streamed: catches bytes changed in place, not only truncation."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _share(items: list[str], rank: int, world_size: int) -> list[str]:
    """The part of a list (the same on every rank) that `rank` works on: hashing is split between the ranks."""
    return items[rank::world_size]


def verify_manifest(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Why checkpoint `path` is unusable (no manifest, a missing, truncated or changed file), or None if it is whole.

    Sizes are checked for every file; checksums for this rank's share of the files (all of them on one rank), so
    the ranks of a job verify a large checkpoint together. Checkpoints written before checksums were recorded are
    checked by size only.
    """
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return "no manifest.json (written last, so the checkpoint was never completed)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable manifest.json ({exc})"
    digests = manifest.get("xxh3_64", {})
    for relative, size in manifest["files"].items():
        file = path / relative
        if not file.is_file():
            return f"{relative} is missing"
        if file.stat().st_size != size:
            return f"{relative} has {file.stat().st_size} bytes, the manifest says {size}"
    for relative in _share(sorted(digests), rank, world_size):
        if file_digest(path / relative) != digests[relative]:
            return f"{relative} does not match its checksum (changed or corrupted since it was written)"
    return None


def _checkpoint_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(path: Path, step: int, world_size: int, digests: dict[str, str]) -> int:
    """Record every file, its size and checksum (written last, atomically); returns the checkpoint's total bytes."""
    files = {relative: (path / relative).stat().st_size for relative in _checkpoint_files(path)}
    manifest = {"step": step, "world_size": world_size, "written": time.time(), "files": files, "xxh3_64": digests}
    tmp = path / f"{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST)
    return sum(files.values())


def check_writable(ckpt_dir: Path) -> None:
    """Fail at start-up, not at the first save, when checkpoints cannot be written."""
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint.ckpt_dir={str(ckpt_dir)!r} is not writable ({exc}). Point checkpoint.ckpt_dir at a "
            "writable folder, or set checkpoint.ckpt_dir=null to train without checkpoints."
        ) from exc


@dataclass
class _PendingSave:
    """An asynchronous save whose files are still being written; published once it completes on every rank."""

    step: int
    tmp_dir: Path
    final_dir: Path
    future: Any
    started: float  # time.perf_counter() when the save began


class Checkpointer:
    """Saves, prunes and resumes the `CheckpointParts` of one training run; the same object serves every strategy."""

    def __init__(self, checkpoint_cfg: Any, context: DistributedContext, parts: CheckpointParts) -> None:
        ckpt = checkpoint_cfg
        self.context, self.parts = context, parts
        self.ckpt_dir = Path(ckpt.ckpt_dir) if ckpt.ckpt_dir else None
        self.save_every = int(ckpt.save_every_n_steps or 0)
        self.max_checkpoints = ckpt.max_checkpoints
        self.async_save = bool(ckpt.async_save)
        self.exit_after = int(ckpt.exit_after_n_steps or 0)
        self.resume_setting = ckpt.resume_from_checkpoint
        self._start_step = 0
        self._pending: _PendingSave | None = None
        self._last_saved_step: int | None = None

    def after_step(self, step: int, signalled: bool) -> bool:
        """Save when due, when `signalled` (preemption) or at `exit_after_n_steps`; True when training must stop."""
        stopping = signalled or bool(self.exit_after and step - self._start_step >= self.exit_after)
        due = self.ckpt_dir is not None and (stopping or (self.save_every and step % self.save_every == 0))
        if due and not self.save(step, blocking=stopping) and stopping:
            raise CheckpointError(f"Stopping at step {step}, but its checkpoint could not be saved (see above).")
        if stopping:
            reason = "a stop signal" if signalled else f"exit_after_n_steps={self.exit_after}"
            logger.warning("Stopping at step %d after %s; resume with the same command.", step, reason)
        return stopping

    # --- saving -------------------------------------------------------------------------------------------------
    def save(self, step: int, blocking: bool = False) -> bool:
        """Write a checkpoint of `step` atomically; returns False (previous checkpoints intact) if writing failed."""
        assert self.ckpt_dir is not None
        self._finish_pending()
        if self._last_saved_step == step:
            return True
        state = self.parts.model_optim.state_dict()  # gathered once: checked, then written
        self._refuse_non_finite(step, state)
        final_dir = self.ckpt_dir / step_dir_name(step)
        tmp_dir = self.ckpt_dir / f"{final_dir.name}.tmp"
        started = time.perf_counter()
        future, error = None, None
        # Every failure (disk full, quota, I/O) is agreed on by all ranks before anyone moves on, so no rank waits
        # in a collective the others have left; training then continues from the last good checkpoint.
        try:
            if self.context.is_main:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                tmp_dir.mkdir(parents=True)
        except OSError as exc:
            error = exc
        if self._all_ranks_ok(error is None):
            try:
                future = self._write(step, tmp_dir, state, use_async=self.async_save and not blocking)
            except checkpoint_errors() as exc:
                error = exc
        if not self._all_ranks_ok(error is None):
            self._abandon(tmp_dir, step, error, state)
            return False
        self._pending = _PendingSave(step, tmp_dir, final_dir, future, started)
        if (future is None or blocking) and not self._finish_pending():
            return False
        logger.info(
            "Checkpoint of step %d %s in %.1f s.",
            step,
            "written" if future is None else "staged (writing in the background)",
            time.perf_counter() - started,
        )
        self._last_saved_step = step
        return True

    def _refuse_non_finite(self, step: int, state: dict[str, Any]) -> None:
        """Stop the run rather than save NaN or infinite weights or optimizer state (agreed on by every rank)."""
        bad = non_finite_entries(state)
        if any_rank(bool(bad)):
            previous = list_checkpoints(self.ckpt_dir)
            kept = f"{previous[0][1].name} stays the newest checkpoint" if previous else "no checkpoint was written"
            raise NonFiniteStateError(
                f"Not saving the checkpoint of step {step}: the model or optimizer state holds NaN or infinite values"
                f"{' (this rank: ' + ', '.join(bad[:5]) + (', ...' if len(bad) > 5 else '') + ')' if bad else ''}; "
                f"{kept}. Training diverged: resume from that checkpoint with a lower optimizer.lr or a smaller "
                "optimizer.max_grad_norm."
            )

    def _write(self, step: int, tmp_dir: Path, state: dict[str, Any], use_async: bool) -> Any:
        """DCP first (its collectives raise on every rank if one rank fails), then the small per-rank files."""
        parts = self.parts
        shards = str(tmp_dir / "model_optim")
        import torch.distributed.checkpoint as dcp

        future = dcp.async_save(state, checkpoint_id=shards) if use_async else dcp.save(state, checkpoint_id=shards)
        data_state = parts.data.state_dict()
        per_rank = {"rng": parts.rng.state_dict(), "te_extra_state": parts.fp8.state_dict(), "data": data_state}
        torch.save(per_rank, tmp_dir / f"rank_{self.context.rank:05d}.pt")
        if self.context.is_main:
            train_state = {
                "step": step,
                "scheduler": parts.scheduler.state_dict(),
                "world_size": self.context.world_size,
                "data": data_state,
                "facts": parts.facts,
            }
            torch.save(train_state, tmp_dir / "train_state.pt")
        return future if use_async else None

    def _all_ranks_ok(self, ok: bool) -> bool:
        return not any_rank(not ok)

    def _abandon(
        self, tmp_dir: Path, step: int, error: BaseException | None, state: dict[str, Any] | None = None
    ) -> None:
        """Remove a failed save and say why; every rank calls it (the space estimate is a collective)."""
        if self.context.is_main:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        previous = list_checkpoints(self.ckpt_dir)
        kept = f"the previous checkpoint {previous[0][1].name} is intact" if previous else "no earlier checkpoint"
        state = self.parts.model_optim.state_dict() if state is None else state
        needed = sum(all_gather_object(_state_bytes(state)))
        free = shutil.disk_usage(self.ckpt_dir).free
        disk_full = free < needed or "no space left" in str(error).lower() or getattr(error, "errno", None) == 28
        cause = (
            f"no space left on device: the checkpoint needs about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB are free in {self.ckpt_dir}"
            if disk_full
            else f"{'this rank' if error is not None else 'another rank'}: {error}"
        )
        logger.error(
            "Saving the checkpoint of step %d failed (%s); %s. Free space or fix the storage before the next save.",
            step,
            cause,
            kept,
        )

    def _finish_pending(self) -> bool:
        """Wait for an in-flight save, then publish it on every rank's word (checksums, manifest, rename) and prune.

        Returns False when it failed (the previous checkpoints are intact); True when published or nothing pending.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return True
        error, digests = None, {}
        try:
            if pending.future is not None:
                completion = getattr(pending.future, "upload_completion", pending.future)
                completion.result()
            files = _checkpoint_files(pending.tmp_dir)  # every rank sees the same folder: each hashes its share
            hashing = time.perf_counter()
            mine = _share(files, self.context.rank, self.context.world_size)
            digests = {f: file_digest(pending.tmp_dir / f) for f in mine}
            hashed = sum((pending.tmp_dir / f).stat().st_size for f in mine)
            logger.info("Checksums of %.2f GiB in %.1f s.", hashed / 2**30, time.perf_counter() - hashing)
        except checkpoint_errors() as exc:
            error = exc
        if not self._all_ranks_ok(error is None):
            self._abandon(pending.tmp_dir, pending.step, error)
            return False
        digests = {name: digest for part in all_gather_object(digests) for name, digest in part.items()}
        if self.context.is_main:
            size = _write_manifest(pending.tmp_dir, pending.step, self.context.world_size, digests)
            if pending.final_dir.exists():  # a re-save of the same step (e.g. after resuming): replace it
                shutil.rmtree(pending.final_dir)
            os.replace(pending.tmp_dir, pending.final_dir)
            logger.info(
                "Checkpoint %s published: %.2f GiB, %.1f s after the save began.",
                pending.final_dir,
                size / 2**30,
                time.perf_counter() - pending.started,
            )
            self._prune()
        self.context.barrier()
        return True

    def _prune(self) -> None:
        if not self.max_checkpoints:
            return
        for step, path in list_checkpoints(self.ckpt_dir)[int(self.max_checkpoints) :]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("Pruned checkpoint of step %d (max_checkpoints=%d).", step, self.max_checkpoints)

    # --- resuming -----------------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest complete checkpoint (or the one named) and return the step to continue from."""
        setting = self.resume_setting
        if self.ckpt_dir is None:
            return 0
        if setting in (False, None):
            if list_checkpoints(self.ckpt_dir):
                raise CheckpointError(
                    f"checkpoint.resume_from_checkpoint=false, but {self.ckpt_dir} holds checkpoints of an earlier "
                    "run, which this run would mix with and prune. Use another checkpoint.ckpt_dir (or move those "
                    "away) to start fresh, or resume_from_checkpoint=true to continue that run."
                )
            return 0
        explicit = isinstance(setting, str) and setting.lower() not in ("true", "latest")
        if explicit:
            match = STEP_DIR.match(Path(setting).name)
            if match is None:
                raise CheckpointError(
                    f"checkpoint.resume_from_checkpoint={setting!r} is not a step_NNNNNNN checkpoint folder; use true "
                    "(the newest complete checkpoint in ckpt_dir) or the path of one such folder."
                )
            candidates = [(int(match.group(1)), Path(setting))]
        else:
            candidates = list_checkpoints(self.ckpt_dir)
        failures: list[str] = []
        for step, path in candidates:
            # Every rank checksums its share of the files; the first problem any rank found counts for all.
            found = all_gather_object(verify_manifest(path, self.context.rank, self.context.world_size))
            problem = next((p for p in found if p is not None), None)
            if problem is None:
                started = time.perf_counter()
                try:
                    self._load(path)
                    error = None
                except checkpoint_errors() as exc:
                    error = exc
                if self._all_ranks_ok(error is None):
                    logger.info("Resumed from %s (step %d) in %.1f s.", path, step, time.perf_counter() - started)
                    self._last_saved_step = self._start_step = step
                    return step
                problem = f"loading failed ({short_reason(error)})"
            if explicit:
                raise CheckpointError(f"checkpoint.resume_from_checkpoint={setting!r} cannot be used: {problem}.")
            logger.warning("Skipping checkpoint %s: %s.", path, problem)
            failures.append(f"{path.name}: {problem}")
        if failures:
            # Starting over would train from scratch next to (and soon prune) the user's checkpoints: refuse instead.
            raise CheckpointError(
                f"No checkpoint in {self.ckpt_dir} could be loaded ({'; '.join(failures)}). Nothing was changed on "
                "disk. Fix the cause, point checkpoint.ckpt_dir elsewhere to start fresh, or name a checkpoint with "
                "checkpoint.resume_from_checkpoint=<path>."
            )
        return 0

    def _load(self, path: Path) -> None:
        """Read the small files first, so that most failures happen before any model or optimizer state changes."""
        train_state = load_small_file(path / "train_state.pt")
        self._compare_facts(train_state)
        same_world = train_state["world_size"] == self.context.world_size
        rank_file = path / f"rank_{self.context.rank:05d}.pt"
        rank_file = rank_file if rank_file.is_file() else path / "rank_00000.pt"
        per_rank = load_small_file(rank_file)
        te_states = _checked_te_states(per_rank["te_extra_state"], rank_file)
        parts = self.parts
        state = parts.model_optim.state_dict()
        import torch.distributed.checkpoint as dcp

        dcp.load(state, storage_reader=safe_storage_reader(str(path / "model_optim")))
        parts.model_optim.load_state_dict(state)
        parts.scheduler.load_state_dict(train_state["scheduler"])
        parts.fp8.load_state_dict(te_states)
        if same_world:
            parts.rng.load_state_dict(per_rank["rng"])
        parts.data.load_state_dict(per_rank["data"] if same_world else train_state["data"])

    def _compare_facts(self, train_state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model in one line; say what else differs (ranks, workers) and goes on."""
        saved, now = train_state.get("facts", {}), self.parts.facts
        if "parameters" in saved and saved["parameters"] != now.get("parameters"):
            raise CheckpointError(
                f"checkpoint is of a {saved.get('model', '?')} model ({saved['parameters']:,} parameters), config asks "
                f"for {now.get('model', '?')} ({now.get('parameters', 0):,} parameters)"
            )
        if "precision_plan" in saved and saved["precision_plan"] != now.get("precision_plan"):
            before, after = (PrecisionPlan.from_dict(facts["precision_plan"]).describe() for facts in (saved, now))
            raise CheckpointError(
                f"checkpoint was trained with the precision plan '{before}', this run asks for '{after}'. Resume with "
                "the same precision, fp8_layers and fp4_layers, or start the new plan in another checkpoint.ckpt_dir"
            )
        if train_state["world_size"] != self.context.world_size:
            logger.info(
                "The checkpoint was saved on %d ranks, this run has %d: model and optimizer state are resharded, "
                "map-style data continues at the same global position, RNG states start afresh.",
                train_state["world_size"],
                self.context.world_size,
            )
        if saved.get("packing") and now.get("packing") and saved["packing"] != now["packing"]:
            logger.warning(
                "The checkpoint packed its batches with %s, this run packs with %s: the rest of this epoch is packed "
                "anew from the same position, so a few of its sequences may be seen twice or not at all; from the "
                "next epoch on every sequence is seen once per epoch again.",
                saved["packing"],
                now["packing"],
            )
        if "num_workers" in saved and saved["num_workers"] != now.get("num_workers"):
            logger.info(
                "The checkpoint was saved with dataset.num_workers=%s, this run has %s: map-style data resumes as is, "
                "streaming data needs the same number.",
                saved["num_workers"],
                now.get("num_workers"),
            )

    # --- end of training ---------------------------------------------------------------------------------------
    def finish(self, step: int, completed: bool) -> None:
        """Publish any in-flight save; at the end of training, save the last step."""
        if self.ckpt_dir is None:
            return
        saved = self.save(step, blocking=True) if completed and self._last_saved_step != step else True
        if not (self._finish_pending() and saved):
            raise CheckpointError(
                f"The checkpoint of step {step} could not be saved (see above): this run's last steps are not on disk."
            )
