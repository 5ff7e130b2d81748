"""From datasets to an endless, resumable stream of batches: samplers, token-budget packing and the epoch loader.

Map-style data is ordered by one global, per-epoch permutation that every rank walks (`GlobalShuffleSampler` for
padded batches, `PackedBatchSampler` for token-budget packs), so progress is one number for any world size.
Streaming data is packed on the fly (`PackedStream`) and resumes through `StatefulDataLoader`'s state.

Data is shared out by data-parallel rank: with context parallelism the ranks of a CP group build the same batches
(and keep the same position), and `context_parallel.ContextParallelCollator` leaves each rank its chunks of them.
"""

from __future__ import annotations

import atexit
import bisect
import itertools
import math
import multiprocessing
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from collator import BatchLayout, build_collator
from context_parallel import ContextParallelCollator
from dataset import DataConfigError, load_sequence_splits, sequence_lengths, shard_streaming
from distributed import DistributedContext, ignore_stop_signals, main_process_first


def pack_by_token_budget(
    items: Iterable[tuple[Any, int]], token_budget: int, max_items: int | None = None, lookahead: int = 1
) -> Iterator[list[Any]]:
    """Group (item, length) pairs into packs of at most `token_budget` tokens (and `max_items` items, if given).

    Packs are filled from a window of the next `lookahead` unpacked items: each pack opens with the oldest item of
    the window (so none waits for more than a window's worth of packs), then takes the longest item that still fits,
    again and again, refilling the window as it goes; it closes when nothing in the window fits. `lookahead=1` is
    greedy packing in order. A wider window fills packs almost completely even when lengths range from tens to tens
    of thousands of tokens, where in-order packing leaves a long sequence's pack part empty whenever the next one is
    too long. The result depends only on the items' order and lengths: every rank builds the same packs, and a
    resumed packer fed the unpacked window first continues exactly.
    """
    source = iter(items)
    window: dict[int, tuple[Any, int]] = {}  # arrival number -> (item, length); insertion order = arrival order
    by_length: list[tuple[int, int]] = []  # (length, arrival number), sorted
    arrivals = itertools.count()

    def refill() -> None:
        while len(window) < lookahead and (nxt := next(source, None)) is not None:
            number = next(arrivals)
            window[number] = nxt
            bisect.insort(by_length, (nxt[1], number))

    def take(number: int) -> tuple[Any, int]:
        entry = window.pop(number)
        del by_length[bisect.bisect_left(by_length, (entry[1], number))]
        return entry

    refill()
    while window:
        item, used = take(next(iter(window)))
        pack = [item]
        refill()
        while by_length and len(pack) != max_items:
            fit = bisect.bisect_right(by_length, (token_budget - used, math.inf)) - 1
            if fit < 0:
                break
            length = by_length[fit][0]
            item, _ = take(by_length[bisect.bisect_left(by_length, (length, -1))][1])  # the oldest of that length
            pack.append(item)
            used += length
            refill()
        yield pack


class PackedBatchSampler:
    """Batch sampler packing one global, per-epoch permutation of a map-style dataset into token-budget batches.

    Every rank walks the same permutation and builds the same sequence of packs; rank r takes packs r, r + W, ...
    So progress is one number for all ranks (packs consumed), a resume on another number of ranks continues with no
    sequence repeated or skipped, and no sequence is ever dropped: if the last round of packs is shorter than W, the
    ranks left without one get an empty pack (a batch of padding) so collective operations stay in step.
    Packing needs only the lengths, so it costs a pass over integers, done lazily as batches are drawn.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        token_budget: int,
        max_seq_length: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        max_sequences: int | None = None,
        lookahead: int = 1,
    ) -> None:
        if max_seq_length > token_budget:
            raise ValueError(f"token_budget={token_budget} is below max_seq_length={max_seq_length}.")
        self.lengths = np.minimum(np.asarray(lengths), max_seq_length)
        self.token_budget, self.rank, self.world_size = token_budget, rank, world_size
        self.max_sequences, self.lookahead = max_sequences, lookahead
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and how many of its packs all ranks together have consumed."""
        self.epoch, self.start = epoch, start

    def permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.lengths), generator=generator).numpy()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        items = zip(order.tolist(), self.lengths[order].tolist(), strict=True)
        packs = pack_by_token_budget(items, self.token_budget, self.max_sequences, self.lookahead)
        index = -1
        for index, pack in enumerate(packs):
            if index >= self.start and (index - self.start) % self.world_size == self.rank:
                yield pack
        remaining = index + 1 - self.start
        if remaining > 0 and self.rank >= remaining % self.world_size > 0:
            yield []


class PackedStream(torch.utils.data.IterableDataset):
    """Token-budget packs from a streaming dataset (this rank's shard), resumable mid-epoch.

    Its state is the source dataset's position plus the samples drawn but not yet packed (the packer's window), so
    a `StatefulDataLoader` restores it exactly (up to the source's own guarantees: a shuffle buffer's contents are
    not saved by `datasets`).
    """

    def __init__(
        self,
        source: Any,
        token_budget: int,
        max_seq_length: int,
        max_sequences: int | None = None,
        lookahead: int = 1,
    ) -> None:
        if max_seq_length > token_budget:
            raise ValueError(f"token_budget={token_budget} is below max_seq_length={max_seq_length}.")
        self.source, self.token_budget, self.max_seq_length = source, token_budget, max_seq_length
        self.max_sequences, self.lookahead = max_sequences, lookahead
        self._carry: list[dict[str, Any]] = []

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        pending: dict[int, dict[str, Any]] = {}  # drawn from the source, not yet in a yielded pack, in draw order

        def drawn(samples: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], int]]:
            for sample in samples:
                pending[id(sample)] = sample
                yield sample, min(len(sample["input_ids"]), self.max_seq_length)

        samples = drawn(itertools.chain(self._carry, self.source))
        for pack in pack_by_token_budget(samples, self.token_budget, self.max_sequences, self.lookahead):
            for sample in pack:
                del pending[id(sample)]
            self._carry = list(pending.values())  # the packer's window: it opens the next packs
            yield pack
        self._carry = []

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "carry": list(self._carry)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self._carry = list(state["carry"])


class GlobalShuffleSampler(Sampler[int]):
    """Shard one global, per-epoch permutation across ranks, so progress is a single number for every world size.

    Rank r reads positions `start + r, start + r + W, ...` of the epoch's permutation. After k samples per rank the
    ranks together have consumed exactly the first `start + k * W` positions, whatever W is; a checkpoint therefore
    stores only (epoch, consumed), and a run resumed on a different number of ranks continues the same permutation
    with no sample repeated or skipped. Every rank yields the same count (the remainder is left to the next epoch's
    reshuffle), which keeps collective operations in step.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < world_size:
            raise DataConfigError(f"{num_samples} sequences cannot be split across {world_size} ranks.")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and the number of its positions already consumed by all ranks."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start={start} is outside the epoch's {self.num_samples} samples.")
        self.epoch, self.start = epoch, start

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __len__(self) -> int:
        return (self.num_samples - self.start) // self.world_size

    def __iter__(self) -> Iterator[int]:
        end = self.start + len(self) * self.world_size
        return iter(self.permutation()[self.start + self.rank : end : self.world_size].tolist())


class EpochTagged:
    """A sampler (or batch sampler) whose every index carries the epoch it was drawn in, as (epoch, index).

    The sampler runs in the main process, so its epoch is always current; the tag takes that epoch to the worker
    processes, which then need not be re-forked at every epoch to learn it (`persistent_workers`).
    """

    def __init__(self, sampler: GlobalShuffleSampler | PackedBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.sampler.epoch
        for item in self.sampler:
            yield [(epoch, index) for index in item] if isinstance(item, list) else (epoch, item)


class EpochTaggedDataset(torch.utils.data.Dataset):
    """A map-style dataset read with `EpochTagged` keys: each record comes back with its `epoch`."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return {**self.dataset[index], "epoch": epoch}

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        rows = self.dataset.__getitems__([index for _, index in keys]) if keys else []
        return [{**row, "epoch": epoch} for row, (epoch, _) in zip(rows, keys, strict=True)]


class EpochLoader:
    """An endless stream of training batches: reshuffles every epoch and knows where it is, for checkpoints.

    Map-style data keeps its position as (epoch, units of the epoch's permutation consumed by all ranks) through
    `GlobalShuffleSampler` (units = sequences) or `PackedBatchSampler` (units = packs); either resumes exactly on any
    number of ranks or workers. Streaming data keeps the `StatefulDataLoader` state (the datasets' shard and
    shuffle positions in each worker, plus the packing carry-over), which resumes on the same number of ranks.
    `world_size` is the number of data-parallel ranks (the world size over `cp_size`): the ranks of a CP group read
    the same batches, so they count once.
    """

    def __init__(
        self,
        loader: StatefulDataLoader,
        collator: Any,
        world_size: int,
        sampler: GlobalShuffleSampler | PackedBatchSampler | None = None,
        units_per_batch: int = 1,
        streaming_dataset: Any = None,
    ) -> None:
        self.loader, self.collator, self.world_size = loader, collator, world_size
        self.sampler, self.units_per_batch, self.streaming_dataset = sampler, units_per_batch, streaming_dataset
        self.epoch, self.batches_in_epoch, self._start = 0, 0, 0
        self._pending_loader_state: dict | None = None

    def _begin_epoch(self) -> bool:
        """Prepare the epoch's data order; True when the epoch starts from its beginning."""
        resuming = self._start > 0 or self._pending_loader_state is not None
        self.collator.set_epoch(self.epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, start=self._start)
        if self.streaming_dataset is not None:
            self.streaming_dataset.set_epoch(self.epoch)
        if self._pending_loader_state is not None:
            self.loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        return not resuming

    def __iter__(self) -> Iterator[Any]:
        while True:
            from_start = self._begin_epoch()
            for batch in self.loader:
                self.batches_in_epoch += 1
                yield batch
            if from_start and self.batches_in_epoch == 0:
                raise DataConfigError(
                    "An epoch produced no batch on this rank: the training split is smaller than one micro-batch per "
                    "rank. Lower dataset.micro_batch_size, use fewer ranks, or add data."
                )
            self.epoch, self.batches_in_epoch, self._start = self.epoch + 1, 0, 0

    @property
    def num_sequences(self) -> int | None:
        """Training sequences in an epoch (map-style data), None for a stream of unknown length."""
        if isinstance(self.sampler, PackedBatchSampler):
            return len(self.sampler.lengths)
        return self.sampler.num_samples if self.sampler is not None else None

    def consumed(self) -> int:
        """Units of the current epoch's permutation consumed by all ranks together (map-style data)."""
        return self._start + self.batches_in_epoch * self.units_per_batch * self.world_size

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "world_size": self.world_size}
        if self.sampler is not None:
            state["consumed"] = self.consumed()
        else:
            state["loader"] = self.loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], 0
        if self.sampler is not None:
            self._start = state["consumed"]
        elif state["world_size"] != self.world_size:
            raise DataConfigError(
                f"This checkpoint's streaming data position was saved with {state['world_size']} data-parallel ranks; "
                "a streaming dataset can only resume mid-epoch on the same number of data-parallel ranks (now "
                f"{self.world_size}; world size / cp_size)."
            )
        else:
            self._pending_loader_state = state["loader"]


_LOADERS: weakref.WeakSet[StatefulDataLoader] = weakref.WeakSet()


def shutdown_workers() -> None:
    """Stop the worker processes of every loader built here (they ignore stop signals: see `ignore_stop_signals`).

    The workers leave on the loader's own shutdown message. Python's exit would otherwise send them SIGTERM and wait
    for them forever, so this also runs at exit (registered after multiprocessing's handler, so it runs first).
    """
    for loader in list(_LOADERS):
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
    # A worker that has not left after the shutdown message (e.g. blocked flushing a batch nobody reads) ignores the
    # SIGTERM the DataLoader sends next; Python's exit would then wait for it forever. Workers are daemonic children.
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


atexit.register(shutdown_workers)
# torchdata's StatefulDataLoader warns on every rank about a torch call of its own; nothing a user can act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def _stateful_loader(*args: Any, **kwargs: Any) -> StatefulDataLoader:
    loader = StatefulDataLoader(*args, **kwargs)
    _LOADERS.add(loader)
    return loader


def _init_worker(worker_id: int) -> None:
    """Set up a DataLoader worker: one intra-op thread, and stop signals left to the main process.

    A worker inherits the main process's thread count; a few such workers would take every core that the training
    step's own Python thread needs. See `ignore_stop_signals` for the signals.
    """
    torch.set_num_threads(1)
    ignore_stop_signals(worker_id)


def _loader_kwargs(data_cfg: Any, context: DistributedContext, persistent: bool) -> dict[str, Any]:
    """DataLoader settings; `persistent` workers outlive an epoch (map-style data: its samples carry their epoch).

    Streaming data is read inside the workers, which must be re-forked at each epoch to see its new shuffle.
    """
    workers = int(data_cfg.num_workers)
    return {
        "num_workers": workers,
        "pin_memory": context.uses_cuda,
        "prefetch_factor": int(data_cfg.prefetch_factor) if workers > 0 else None,
        "persistent_workers": persistent and workers > 0,
        "worker_init_fn": _init_worker if workers > 0 else None,
    }


def _map_style_loader(
    cfg: Any, layout: BatchLayout, ds: datasets.Dataset, context: DistributedContext, collator: Any, shuffle: bool
) -> tuple[StatefulDataLoader, GlobalShuffleSampler | PackedBatchSampler, int]:
    """A loader over this rank's share of `ds`: padded batches of micro_batch_size, or token-budget packs.

    Its workers persist across epochs: every index is drawn with its epoch (`EpochTagged`), for the masking seed.
    """
    kwargs = _loader_kwargs(cfg.dataset, context, persistent=True)
    tagged = EpochTaggedDataset(ds)
    if layout.packed:
        sampler = PackedBatchSampler(
            sequence_lengths(ds),
            layout.token_budget,
            layout.max_seq_length,
            context.dp_rank,
            context.dp_size,
            cfg.seed,
            shuffle=shuffle,
            max_sequences=layout.max_sequences,
            lookahead=layout.packing_lookahead,
        )
        loader = _stateful_loader(tagged, batch_sampler=EpochTagged(sampler), collate_fn=collator, **kwargs)
        return loader, sampler, 1
    sampler = GlobalShuffleSampler(len(ds), context.dp_rank, context.dp_size, cfg.seed, shuffle=shuffle)
    batch_size = int(cfg.dataset.micro_batch_size)
    loader = _stateful_loader(
        tagged, batch_size=batch_size, sampler=EpochTagged(sampler), drop_last=shuffle, collate_fn=collator, **kwargs
    )
    return loader, sampler, batch_size


def _streaming_stream(
    cfg: Any, layout: BatchLayout, train: datasets.IterableDataset, context: DistributedContext, collator: Any
) -> EpochLoader:
    data_cfg = cfg.dataset
    source = shard_streaming(train, context.dp_rank, context.dp_size, cfg.seed, int(data_cfg.shuffle_buffer_size))
    source = source.with_format("python")
    kwargs = _loader_kwargs(data_cfg, context, persistent=False)
    if layout.packed:
        source = PackedStream(
            source, layout.token_budget, layout.max_seq_length, layout.max_sequences, layout.packing_lookahead
        )
        loader = _stateful_loader(source, batch_size=None, collate_fn=collator, **kwargs)
    else:
        loader = _stateful_loader(source, batch_size=int(data_cfg.micro_batch_size), collate_fn=collator, **kwargs)
    return EpochLoader(loader, collator, context.dp_size, streaming_dataset=source)


def _rank_collator(cfg: Any, layout: BatchLayout, tokenizer: Any, context: DistributedContext) -> Any:
    """The batch collator of `layout`; with context parallelism, one that keeps this rank's chunks of each batch."""
    collator = build_collator(cfg.dataset, layout, tokenizer, cfg.seed)
    if context.cp_size == 1:
        return collator
    return ContextParallelCollator(
        collator, context.cp_size, context.cp_rank, tokenizer.pad_token_id, layout.token_multiple
    )


def build_dataloaders(
    cfg: Any, layout: BatchLayout, context: DistributedContext, tokenizer: Any
) -> tuple[EpochLoader, StatefulDataLoader | None]:
    """The endless training stream and the (finite, identical on every run) validation loader of this rank."""
    with main_process_first(context):
        splits = load_sequence_splits(cfg.dataset, tokenizer, cfg.seed)
    collator = _rank_collator(cfg, layout, tokenizer, context)
    if isinstance(splits.train, datasets.IterableDataset):
        train_stream = _streaming_stream(cfg, layout, splits.train, context, collator)
    else:
        loader, sampler, units = _map_style_loader(cfg, layout, splits.train, context, collator, shuffle=True)
        train_stream = EpochLoader(loader, collator, context.dp_size, sampler=sampler, units_per_batch=units)
    validation_loader = None
    if splits.validation is not None:
        val_collator = _rank_collator(cfg, layout, tokenizer, context)  # epoch 0: the same masks every time
        validation_loader, _, _ = _map_style_loader(cfg, layout, splits.validation, context, val_collator, False)
    return train_stream, validation_loader
