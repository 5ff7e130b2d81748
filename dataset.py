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
from datasets.distributed import split_dataset_by_node

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


def sequence_lengths(ds: datasets.Dataset) -> np.ndarray:
    """Token count of every record, read from the Arrow column without decoding the token lists."""
    return pc.list_value_length(ds.data.column("input_ids")).to_numpy(zero_copy_only=False)
