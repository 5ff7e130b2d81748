"""Protein sequence data: read (FASTA, Parquet, CSV, JSON or a hub dataset), clean, split, tokenize and shard.

Everything goes through Hugging Face `datasets`, so local files are memory-mapped and cached (map-style) or read
lazily (streaming). This module only produces datasets of tokenized sequences (`input_ids` lists with `<cls>`/`<eos>`);
masking, cropping and batching happen in `collator.py`, so one dataset serves BSHD and THD batches alike.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from collator import BSHDCollator, MLMMasker, PackedBatchSampler, PackedStream, THDCollator
from distributed import DistributedContext, main_process_first
from precision import token_multiple

logger = logging.getLogger(__name__)

RECIPE_DIR = Path(__file__).resolve().parent
FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".mpfa")
FORMAT_BY_SUFFIX = {
    **dict.fromkeys(FASTA_SUFFIXES, "fasta"),
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
}
SUPPORTED_FORMATS = ("auto", "fasta", "parquet", "csv", "json", "hub")


class DataConfigError(ValueError):
    """The data configuration or the data itself cannot be used; the message says how to fix it."""


def resolve_path(path: str) -> Path:
    """`path` as given if it exists from the working directory, else relative to the recipe (home of the sample)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or glob.glob(str(candidate)):
        return candidate
    return RECIPE_DIR / candidate


def _strip_compression(name: str) -> str:
    return name[: -len(".gz")] if name.endswith(".gz") else name


def detect_format(files: list[str]) -> str:
    """The one data format shared by `files`, from their extensions."""
    formats = {FORMAT_BY_SUFFIX.get(Path(_strip_compression(f)).suffix.lower()) for f in files}
    if None in formats or len(formats) != 1:
        raise DataConfigError(
            f"Cannot tell the data format of {files[:3]}{'...' if len(files) > 3 else ''}: expected one kind of file "
            f"among {sorted(FORMAT_BY_SUFFIX)} (optionally .gz). Set dataset.format=fasta|parquet|csv|json explicitly."
        )
    return formats.pop()


def list_data_files(path: str) -> list[str]:
    """The data files named by `path`: a file, a folder (its supported files) or a glob pattern."""
    resolved = resolve_path(path)
    if resolved.is_dir():
        files = sorted(
            str(p)
            for p in resolved.iterdir()
            if p.is_file() and Path(_strip_compression(p.name)).suffix.lower() in FORMAT_BY_SUFFIX
        )
    elif resolved.is_file():
        files = [str(resolved)]
    else:
        files = sorted(glob.glob(str(resolved)))
    return files


def read_fasta(paths: list[str]) -> Iterator[dict[str, str]]:
    """Yield {"id", "sequence"} records from FASTA files (plain or gzip), joining wrapped sequence lines."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as handle:
            header, chunks = None, []
            for line in handle:
                line = line.strip()
                if line.startswith(">"):
                    if header is not None:
                        yield {"id": header, "sequence": "".join(chunks)}
                    header, chunks = (line[1:].split() or [""])[0], []
                elif line and not line.startswith(";"):
                    if header is None:
                        raise DataConfigError(f"{path} is not a FASTA file: sequence data before the first '>' header.")
                    chunks.append(line)
            if header is not None:
                yield {"id": header, "sequence": "".join(chunks)}


def _files_fingerprint(files: list[str]) -> str:
    """A cache key that changes when any file is modified, so an edited FASTA is never served from a stale cache."""
    digest = hashlib.sha256()
    for f in files:
        stat = os.stat(f)
        digest.update(f"{os.path.abspath(f)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def load_raw_dataset(data_cfg: Any, path: str) -> datasets.Dataset | datasets.IterableDataset:
    """Load `path` as a map-style or streaming dataset with at least the configured sequence column."""
    fmt = data_cfg.format
    if fmt not in SUPPORTED_FORMATS:
        raise DataConfigError(f"dataset.format={fmt!r} is not one of {SUPPORTED_FORMATS}.")
    streaming = bool(data_cfg.streaming)
    files = [] if fmt == "hub" else list_data_files(path)
    if not files and fmt != "hub":
        looks_like_hub_name = fmt == "auto" and path.count("/") == 1 and not Path(path).suffix
        if not looks_like_hub_name:
            raise DataConfigError(
                f"dataset.path={path!r} does not exist (looked in {Path.cwd()} and {RECIPE_DIR}). Point "
                "dataset.path at a FASTA/Parquet/CSV/JSON file, a folder or glob of them, or a hub dataset name."
            )
        fmt = "hub"
    if fmt == "hub":
        try:
            return datasets.load_dataset(path, name=data_cfg.hub_config, split=data_cfg.hub_split, streaming=streaming)
        except Exception as exc:
            raise DataConfigError(
                f"Could not load hub dataset {path!r} (split {data_cfg.hub_split!r}): {exc}. Without network access "
                "(HF_HUB_OFFLINE=1) only local files or a previously cached hub dataset can be used."
            ) from exc

    if fmt == "auto":
        fmt = detect_format(files)
    if fmt == "fasta":
        if streaming:
            return datasets.IterableDataset.from_generator(read_fasta, gen_kwargs={"paths": files})
        return datasets.Dataset.from_generator(
            read_fasta, gen_kwargs={"paths": files}, fingerprint=f"fasta-{_files_fingerprint(files)}"
        )
    extra = {"delimiter": "\t"} if fmt == "csv" and all(_strip_compression(f).endswith(".tsv") for f in files) else {}
    return datasets.load_dataset(fmt, data_files=files, split="train", streaming=streaming, **extra)


def clean_sequences(batch: dict[str, list], column: str) -> dict[str, list]:
    """Upper-case residues, drop white space and a trailing stop codon ('*'), as predicted proteomes often carry."""
    cleaned = []
    for seq in batch[column]:
        seq = "".join((seq or "").split()).upper()
        cleaned.append(seq[:-1] if seq.endswith("*") else seq)
    return {"sequence": cleaned}


def _check_sequence_column(ds: datasets.Dataset | datasets.IterableDataset, column: str, source: str) -> None:
    columns = ds.column_names
    if columns is None and isinstance(ds, datasets.IterableDataset):  # schema unknown until the first record
        columns = list(next(iter(ds)).keys())
    if column not in columns:
        raise DataConfigError(
            f"{source} has no {column!r} column (columns: {columns}). Set dataset.sequence_column to the column "
            "holding the amino-acid sequences."
        )


def prepare_sequences(data_cfg: Any, path: str) -> tuple[datasets.Dataset | datasets.IterableDataset, int | None]:
    """Load `path`, keep one clean, non-empty `sequence` column; returns the dataset and how many were empty."""
    raw = load_raw_dataset(data_cfg, path)
    column = data_cfg.sequence_column
    _check_sequence_column(raw, column, f"dataset {path!r}")
    drop = [c for c in raw.column_names or [] if c != "sequence"] or None
    cleaned = raw.map(clean_sequences, batched=True, fn_kwargs={"column": column}, remove_columns=drop)
    if isinstance(cleaned, datasets.IterableDataset):
        return cleaned.filter(lambda record: len(record["sequence"]) > 0), None
    kept = cleaned.filter(lambda record: len(record["sequence"]) > 0)
    num_empty = len(cleaned) - len(kept)
    if len(kept) == 0:
        raise DataConfigError(f"dataset {path!r} holds no non-empty sequences ({len(cleaned)} records read).")
    return kept, num_empty


def tokenize_sequences(batch: dict[str, list], tokenizer: Any) -> dict[str, list]:
    """Tokenize whole sequences (no truncation: the collator crops, so each epoch can see a new window)."""
    encoded = tokenizer(batch["sequence"], add_special_tokens=True, return_attention_mask=False, verbose=False)
    return {"input_ids": encoded["input_ids"]}


@dataclass
class SequenceSplits:
    """Tokenized training and validation data."""

    train: datasets.Dataset | datasets.IterableDataset
    validation: datasets.Dataset | None


def split_validation(
    ds: datasets.Dataset | datasets.IterableDataset, size: float, seed: int
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | None]:
    """Hold out `size` (a fraction for map-style data, a count of sequences for either) for validation."""
    if size == 0:
        return ds, None
    if isinstance(ds, datasets.IterableDataset):
        if size < 1 or size != int(size):
            raise DataConfigError(
                f"dataset.validation_size={size} is a fraction, but a streaming dataset has no known length: give a "
                "number of sequences (e.g. dataset.validation_size=2000) or a dataset.validation_path."
            )
        held_out = datasets.Dataset.from_list(list(ds.take(int(size))))
        if len(held_out) == 0:
            raise DataConfigError("The streaming dataset is empty: no sequences for validation or training.")
        return ds.skip(int(size)), held_out
    num_val = int(size) if size >= 1 else math.ceil(size * len(ds))
    if num_val >= len(ds):
        raise DataConfigError(
            f"dataset.validation_size={size} holds out {num_val} of {len(ds)} sequences, leaving none to train on. "
            "Use a smaller validation_size or more data."
        )
    parts = ds.train_test_split(test_size=num_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def load_sequence_splits(data_cfg: Any, tokenizer: Any, seed: int) -> SequenceSplits:
    """Read, clean, split and tokenize the configured data (call on every rank; map-style results are cached)."""
    train, num_empty = prepare_sequences(data_cfg, data_cfg.path)
    if data_cfg.validation_path:
        validation, _ = prepare_sequences(data_cfg, data_cfg.validation_path)
        if isinstance(validation, datasets.IterableDataset):
            validation = datasets.Dataset.from_list(list(validation))
    else:
        train, validation = split_validation(train, float(data_cfg.validation_size), seed)
    if num_empty:
        logger.warning("Skipped %d empty sequences in %s.", num_empty, data_cfg.path)
    tokenize = {"batched": True, "fn_kwargs": {"tokenizer": tokenizer}, "remove_columns": ["sequence"]}
    train = train.map(tokenize_sequences, **tokenize)
    if validation is not None:
        validation = validation.map(tokenize_sequences, **tokenize)
    if isinstance(train, datasets.Dataset):
        logger.info(
            "Data: %d training and %d validation sequences from %s.",
            len(train),
            0 if validation is None else len(validation),
            data_cfg.path,
        )
    return SequenceSplits(train=train, validation=validation)


def shard_streaming(
    ds: datasets.IterableDataset, rank: int, world_size: int, seed: int, buffer_size: int
) -> datasets.IterableDataset:
    """Give each rank a disjoint part of a streaming dataset, shuffled through a buffer that reseeds each epoch."""
    return split_dataset_by_node(ds, rank=rank, world_size=world_size).shuffle(seed=seed, buffer_size=buffer_size)


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


class EpochLoader:
    """An endless stream of training batches: reshuffles every epoch and knows where it is, for checkpoints.

    Map-style data keeps its position as (epoch, units of the epoch's permutation consumed by all ranks) through
    `GlobalShuffleSampler` (units = sequences) or `PackedBatchSampler` (units = packs); either resumes exactly on any
    number of ranks or workers. Streaming data keeps the `StatefulDataLoader` state (the datasets' shard and
    shuffle positions in each worker, plus the packing carry-over), which resumes on the same number of ranks.
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
                f"This checkpoint's streaming data position was saved with {state['world_size']} ranks; a streaming "
                f"dataset can only resume mid-epoch on the same number of ranks (now {self.world_size})."
            )
        else:
            self._pending_loader_state = state["loader"]


def _loader_kwargs(data_cfg: Any, context: DistributedContext) -> dict[str, Any]:
    workers = int(data_cfg.num_workers)
    return {
        "num_workers": workers,
        "pin_memory": context.uses_cuda,
        "prefetch_factor": int(data_cfg.prefetch_factor) if workers > 0 else None,
        "persistent_workers": False,  # workers must be re-forked each epoch to pick up the epoch's masking seed
    }


def token_budget(cfg: Any) -> int:
    """Tokens per packed micro-batch, rounded down to the precision's token multiple.

    `token_micro_batch_size` defaults to micro_batch_size x max_seq_length; it must hold one full-length sequence.
    """
    data_cfg = cfg.dataset
    requested = cfg.get("token_micro_batch_size") or int(data_cfg.micro_batch_size) * int(data_cfg.max_seq_length)
    multiple = token_multiple(cfg)
    budget = int(requested) // multiple * multiple
    if budget < int(data_cfg.max_seq_length):
        raise DataConfigError(
            f"token_micro_batch_size={requested} (rounded down to {budget}, a multiple of {multiple} for this "
            f"precision) cannot hold one sequence of dataset.max_seq_length={data_cfg.max_seq_length}. Raise "
            "token_micro_batch_size or lower dataset.max_seq_length."
        )
    return budget


def build_collator(cfg: Any, tokenizer: Any, seed: int) -> BSHDCollator | THDCollator:
    """The padded (BSHD) or packed (THD) collator the configuration asks for, padded as its precision needs."""
    data_cfg = cfg.dataset
    masker = MLMMasker.from_tokenizer(
        tokenizer,
        max_seq_length=int(data_cfg.max_seq_length),
        mlm_probability=float(data_cfg.mlm_probability),
        crop=data_cfg.crop,
        seed=seed,
    )
    if cfg.get("use_sequence_packing"):
        return THDCollator(masker, tokenizer.pad_token_id, token_multiple(cfg))
    pad_to_length = int(data_cfg.max_seq_length) if data_cfg.pad_to_max_length else None
    pad_multiple = math.lcm(int(data_cfg.pad_to_multiple_of), token_multiple(cfg))
    return BSHDCollator(masker, tokenizer.pad_token_id, pad_multiple, pad_to_length)


def sequence_lengths(ds: datasets.Dataset) -> np.ndarray:
    """Token count of every record, read from the Arrow column without decoding the token lists."""
    return pc.list_value_length(ds.data.column("input_ids")).to_numpy(zero_copy_only=False)


def _map_style_loader(
    cfg: Any, ds: datasets.Dataset, context: DistributedContext, collator: Any, shuffle: bool
) -> tuple[StatefulDataLoader, GlobalShuffleSampler | PackedBatchSampler, int]:
    """A loader over this rank's share of `ds`: padded batches of micro_batch_size, or token-budget packs."""
    data_cfg, kwargs = cfg.dataset, _loader_kwargs(cfg.dataset, context)
    if cfg.get("use_sequence_packing"):
        sampler = PackedBatchSampler(
            sequence_lengths(ds),
            token_budget(cfg),
            int(data_cfg.max_seq_length),
            context.rank,
            context.world_size,
            cfg.seed,
            shuffle=shuffle,
        )
        return StatefulDataLoader(ds, batch_sampler=sampler, collate_fn=collator, **kwargs), sampler, 1
    sampler = GlobalShuffleSampler(len(ds), context.rank, context.world_size, cfg.seed, shuffle=shuffle)
    batch_size = int(data_cfg.micro_batch_size)
    loader = StatefulDataLoader(
        ds, batch_size=batch_size, sampler=sampler, drop_last=shuffle, collate_fn=collator, **kwargs
    )
    return loader, sampler, batch_size


def build_dataloaders(cfg: Any, context: DistributedContext, tokenizer: Any) -> tuple[EpochLoader, Any]:
    """The endless training stream and the (finite, identical on every run) validation loader of this rank."""
    with main_process_first(context):
        splits = load_sequence_splits(cfg.dataset, tokenizer, cfg.seed)
    data_cfg = cfg.dataset
    collator = build_collator(cfg, tokenizer, cfg.seed)
    if isinstance(splits.train, datasets.IterableDataset):
        train = shard_streaming(
            splits.train, context.rank, context.world_size, cfg.seed, int(data_cfg.shuffle_buffer_size)
        ).with_format("python")
        kwargs = _loader_kwargs(data_cfg, context)
        if cfg.get("use_sequence_packing"):
            train = PackedStream(train, token_budget(cfg), int(data_cfg.max_seq_length))
            loader = StatefulDataLoader(train, batch_size=None, collate_fn=collator, **kwargs)
        else:
            loader = StatefulDataLoader(train, batch_size=int(data_cfg.micro_batch_size), collate_fn=collator, **kwargs)
        train_stream = EpochLoader(loader, collator, context.world_size, streaming_dataset=train)
    else:
        loader, sampler, units = _map_style_loader(cfg, splits.train, context, collator, shuffle=True)
        train_stream = EpochLoader(loader, collator, context.world_size, sampler=sampler, units_per_batch=units)

    validation_loader = None
    if splits.validation is not None:
        val_collator = build_collator(cfg, tokenizer, cfg.seed)  # epoch stays 0: the same masks at every evaluation
        validation_loader, _, _ = _map_style_loader(cfg, splits.validation, context, val_collator, shuffle=False)
    return train_stream, validation_loader
