"""Protein sequence data: read (FASTA, Parquet, CSV, JSON or a hub dataset), clean, split, tokenize and shard.

Everything goes through Hugging Face `datasets`, so local files are memory-mapped and cached (map-style) or read
lazily (streaming). This module only produces datasets of tokenized sequences (`input_ids` lists with `<cls>`/`<eos>`);
masking, cropping and batching happen in `collator.py`, so one dataset serves BSHD and THD batches alike.
A data file that cannot be read (empty, not text, truncated or corrupt .gz, not the format its extension says) stops
the run with a DataConfigError naming the file, before the model is built.
"""

from __future__ import annotations

import codecs
import errno
import glob
import gzip
import hashlib
import logging
import math
import os
import stat
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_writer import SchemaInferenceError
from datasets.distributed import split_dataset_by_node
from pandas.errors import EmptyDataError, ParserError

from errors import RecipeError

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
FORMAT_NAMES = {"fasta": "FASTA", "parquet": "Parquet", "csv": "CSV/TSV", "json": "JSON"}
PROBE_BYTES = 4096  # read up front from every data file: enough to tell text from binary, cheap for large folders
GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"
COPY_AGAIN = "Copy or download it again (`gzip -t FILE` checks a .gz file), or remove it from dataset.path."
REMOVE_OR_REPLACE = "Remove it from dataset.path or replace it with the complete file."
NO_FASTA_RECORDS = "it holds no sequences (no '>' header line)"
NOT_FASTA = "it is not a FASTA file: sequence data comes before the first '>' header"
FIX_FASTA = "Every FASTA record starts with a '>NAME' line; point dataset.path at FASTA files or set dataset.format."


class DataConfigError(RecipeError, ValueError):
    """The data configuration or the data itself cannot be used; the message says how to fix it."""


def resolve_path(path: str) -> Path:
    """`path` as given if it exists from the working directory, else relative to the recipe (home of the sample)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or glob.glob(str(candidate)):
        return candidate
    return RECIPE_DIR / candidate


def _strip_compression(name: str) -> str:
    return name[: -len(".gz")] if name.endswith(".gz") else name


def _named_format(file: str) -> str | None:
    """The format a file's extension names (`.fasta.gz`: fasta), or None for an extension this reader does not know."""
    return FORMAT_BY_SUFFIX.get(Path(_strip_compression(file)).suffix.lower())


def _data_suffix(file: str) -> str:
    """`.fasta`, or `.fasta.gz` for a compressed file: what a glob picking files like it ends with."""
    suffix = Path(_strip_compression(file)).suffix
    return f"{suffix}.gz" if file.endswith(".gz") else suffix


def resolve_format(files: list[str], fmt: str = "auto") -> str:
    """The format to read `files` as: `fmt` where given, else the one their extensions name.

    One run reads one format, so files whose extensions name different formats are refused with globs that pick
    each kind; so is a file whose extension contradicts an explicit `dataset.format`.
    """
    named = {file: _named_format(file) for file in files}
    kinds = sorted({kind for kind in named.values() if kind})
    if len(kinds) > 1:
        raise _mixed_formats_error(files, named)
    if fmt == "auto":
        if None in named.values() or not kinds:
            unknown = [file for file, kind in named.items() if kind is None]
            raise DataConfigError(
                f"Cannot tell the data format of {unknown[:3]}{'...' if len(unknown) > 3 else ''} from the "
                f"extension: expected one of {sorted(FORMAT_BY_SUFFIX)} (optionally .gz). Set "
                "dataset.format=fasta|parquet|csv|json to read them as that format."
            )
        return kinds[0]
    contradicting = next((file for file, kind in named.items() if kind not in (None, fmt)), None)
    if contradicting is not None:
        kind = FORMAT_NAMES[named[contradicting]]
        raise unreadable_file(
            contradicting,
            f"its name says {kind}, but dataset.format={fmt}",
            f"Set dataset.format=auto to read each file as its extension says, or point dataset.path at "
            f"{FORMAT_NAMES.get(fmt, fmt)} files.",
        )
    return fmt


def _mixed_formats_error(files: list[str], named: dict[str, str | None]) -> DataConfigError:
    by_kind: dict[str, list[str]] = {}
    for file, kind in named.items():
        by_kind.setdefault(FORMAT_NAMES[kind] if kind else "unknown", []).append(Path(file).name)
    held = "; ".join(
        f"{kind}: {', '.join(names[:3])}{'...' if len(names) > 3 else ''}" for kind, names in by_kind.items()
    )
    folders = {str(Path(file).parent) for file in files}
    suffixes = sorted({_data_suffix(file) for file, kind in named.items() if kind})
    where = folders.pop() if len(folders) == 1 else "FOLDER"
    globs = " or ".join(f"dataset.path='{where}/*{suffix}'" for suffix in suffixes)
    return DataConfigError(
        f"The data files hold more than one format ({held}), and one run reads one format. Point dataset.path at "
        f"one kind, e.g. {globs} (a glob), or move the others away."
    )


def list_data_files(path: str) -> list[str]:
    """The data files named by `path`: a file, a folder (its files with a data extension) or a glob pattern.

    Each one must be readable: a link that loops or leads nowhere, a folder named like a data file or a file without
    read permission is refused by name, since leaving it out would train on less data than the user asked for.
    """
    resolved = resolve_path(path)
    if resolved.is_dir():
        files = sorted(str(p) for p in resolved.iterdir() if _named_format(p.name))
    elif os.path.lexists(resolved):  # a file, or a link that `resolve_path` could not follow
        files = [str(resolved)]
    else:
        files = sorted(glob.glob(str(resolved)))
    for file in files:
        problem = _entry_problem(file)
        if problem is not None:
            raise unreadable_file(file, *problem)
    return files


def _entry_problem(file: str) -> tuple[str, str] | None:
    """(problem, fix) when `file` is not a regular file this process can read, else None."""
    try:
        status = os.stat(file)  # follows links
    except OSError as exc:
        target = os.readlink(file) if os.path.islink(file) else None
        if exc.errno == errno.ELOOP:
            return f"it is a symbolic link that loops (-> {target})", "Point the link at the real file, or remove it."
        if target is not None:
            return f"it is a symbolic link to {target}, which does not exist", (
                "Point the link at the real file, or remove it."
            )
        return f"it cannot be opened ({exc.strerror})", "Check the path, or remove it from dataset.path."
    if stat.S_ISDIR(status.st_mode):
        return "it is a folder, not a data file", "Point dataset.path at the files inside it, or move it away."
    if not os.access(file, os.R_OK):
        return "it is not readable (permission denied)", "Make it readable (chmod +r), or remove it from dataset.path."
    return None


def _search_locations(path: str) -> list[Path]:
    """Where `resolve_path` looks for a relative `path`, once each: the working directory is often the recipe."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return [candidate]
    return list(dict.fromkeys(p.resolve() for p in (Path.cwd() / candidate, RECIPE_DIR / candidate)))


def _no_data_files_error(path: str) -> DataConfigError:
    """Tell an existing folder without data files (and what was looked for) from a path that is not there."""
    resolved = resolve_path(path).resolve()
    if resolved.is_dir():
        held = sorted(p.name for p in resolved.iterdir())
        content = f"it holds only {held[:5]}{'...' if len(held) > 5 else ''}" if held else "it is empty"
        wanted = ", ".join(f"*{suffix}" for suffix in FORMAT_BY_SUFFIX)
        return DataConfigError(
            f"dataset.path={path!r} is the folder {resolved}, which holds no data files ({content}; looked for "
            f"{wanted}, each optionally .gz). Put the data files there, or point dataset.path at them."
        )
    looked = ", ".join(str(p) for p in _search_locations(path))
    missing = "matches no files" if any(c in path for c in "*?[") else "does not exist"
    return DataConfigError(
        f"dataset.path={path!r} {missing} (looked for {looked}). Point dataset.path at a FASTA/Parquet/CSV/JSON "
        "file, a folder or glob of them, or a hub dataset name."
    )


def unreadable_file(where: str, problem: str, fix: str) -> DataConfigError:
    """One message shape for every file the reader cannot use: which file, what is wrong with it, what to do."""
    return DataConfigError(f"Cannot read data file {where}: {problem}. {fix}")


def read_fasta(paths: list[str]) -> Iterator[dict[str, str]]:
    """Yield {"id", "sequence"} records from FASTA files (plain or gzip), joining wrapped sequence lines.

    A file that cannot be decoded or decompressed raises a DataConfigError naming it, even deep into a large file
    (where the up-front check does not look) and inside a streaming dataset, which reads it only while training.
    """
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8-sig") as handle:
                yield from _parse_fasta(handle, path)
        except DataConfigError:
            raise
        except Exception as exc:
            problem = _problem_from_exception(exc, path, "fasta")
            if problem is None:
                raise
            raise unreadable_file(path, *problem) from exc


def _parse_fasta(lines: Iterable[str], path: str) -> Iterator[dict[str, str]]:
    """Records of one FASTA file; a file without any record is refused, as it is an empty or wrong file."""
    header, chunks = None, []
    for line in lines:
        line = line.strip()
        if line.startswith(">"):
            if header is not None:
                yield {"id": header, "sequence": "".join(chunks)}
            header, chunks = (line[1:].split() or [""])[0], []
        elif line and not line.startswith(";"):
            if header is None:
                raise unreadable_file(path, NOT_FASTA, FIX_FASTA)
            chunks.append(line)
    if header is None:
        raise unreadable_file(path, NO_FASTA_RECORDS, REMOVE_OR_REPLACE)
    yield {"id": header, "sequence": "".join(chunks)}


def _problem_from_exception(exc: BaseException, path: str, fmt: str) -> tuple[str, str] | None:
    """(problem, fix) for an error raised while reading `path`; None when it says nothing about the file's content.

    Only content errors are mapped, so a full disk or a permission problem keeps its own, more accurate error.
    """
    kind = FORMAT_NAMES.get(fmt, fmt)
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if isinstance(exc, EOFError):
        stream = "its gzip stream" if path.endswith(".gz") else "its data"
        return f"{stream} ends early: the file is truncated (an interrupted download or copy?)", COPY_AGAIN
    if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        return f"its gzip data is corrupt ({detail})", COPY_AGAIN
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"it is not text (byte {exc.object[exc.start]:#04x} is not UTF-8), so not the {kind} file its extension "
            "says",
            f"Point dataset.path at {kind} files, or name this file after its real format.",
        )
    if isinstance(exc, (SchemaInferenceError, EmptyDataError)) or "corresponds to no data" in str(exc):
        return "it holds no records", REMOVE_OR_REPLACE
    if isinstance(exc, pa.ArrowInvalid) and detail.startswith("Schema at index"):
        return f"its columns differ from those of the other files ({' '.join(str(exc).split())})", (
            "Give all data files the same columns, or point dataset.path at the files you mean."
        )
    if fmt == "parquet" and (isinstance(exc, pa.ArrowException) or (isinstance(exc, OSError) and exc.errno is None)):
        return f"it is not a valid Parquet file ({detail})", (
            "Write it again (e.g. pandas.DataFrame.to_parquet), or name it after its real format."
        )
    if isinstance(exc, (pa.ArrowException, ParserError)):
        return f"it cannot be read as {kind} ({detail})", (
            f"Check that it is {kind} text (CSV/TSV: a header row; JSON: one object per line), or set dataset.format."
        )
    return None


def check_data_files(files: list[str], fmt: str) -> None:
    """Refuse unreadable files before anything is built; reads only the first few KiB of each, so big data stays cheap.

    Damage further into a file (a .gz cut short after its first few KiB) shows when it is read: for map-style data
    while loading (still before the model is built, with the same kind of message), for a stream when the stream
    reaches it during training: a FASTA stream then raises the same DataConfigError, a Parquet/CSV/JSON stream the
    `datasets` error (its reader runs inside `datasets`, where nothing of this module sees the exception).
    """
    for path in files:
        problem = _file_problem(path, fmt)
        if problem is not None:
            raise unreadable_file(path, *problem)


def _file_problem(path: str, fmt: str) -> tuple[str, str] | None:
    """(problem, fix) for what the first bytes of `path` show, or None when they look like `fmt`."""
    if os.path.getsize(path) == 0:
        return "it is empty (0 bytes)", REMOVE_OR_REPLACE
    with open(path, "rb") as handle:
        magic = handle.read(len(PARQUET_MAGIC))
    compressed = path.endswith(".gz")
    if compressed and not magic.startswith(GZIP_MAGIC):
        return "it is named .gz but is not gzip-compressed", "Remove the .gz from its name (or compress it with gzip)."
    if not compressed and magic.startswith(GZIP_MAGIC):
        return "it is gzip-compressed but not named .gz", "Add .gz to its name, e.g. data.fasta.gz."
    if fmt == "parquet":
        return None if compressed else _parquet_problem(path)
    try:
        head, whole = _read_head(path)
    except Exception as exc:
        problem = _problem_from_exception(exc, path, fmt)
        if problem is None:
            raise
        return problem
    return _text_problem(head, whole, fmt)


def _read_head(path: str) -> tuple[bytes, bool]:
    """The first PROBE_BYTES of the (decompressed) file, and whether that is all of it."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        head = handle.read(PROBE_BYTES + 1)
    return head[:PROBE_BYTES], len(head) <= PROBE_BYTES


def _parquet_problem(path: str) -> tuple[str, str] | None:
    """A Parquet file starts and ends with b'PAR1'; anything else fails deep inside pyarrow without a file name."""
    with open(path, "rb") as handle:
        start = handle.read(len(PARQUET_MAGIC))
        handle.seek(max(0, os.path.getsize(path) - len(PARQUET_MAGIC)))
        end = handle.read()
    if start == end == PARQUET_MAGIC and os.path.getsize(path) > 2 * len(PARQUET_MAGIC):
        return None
    return "it is not a Parquet file (no b'PAR1' marker at its start and end), though its extension says so", (
        "Write it again (e.g. pandas.DataFrame.to_parquet), or name it after its real format."
    )


def _text_problem(head: bytes, whole: bool, fmt: str) -> tuple[str, str] | None:
    """(problem, fix) when a FASTA/CSV/JSON file's start is not UTF-8 text of that format."""
    kind = FORMAT_NAMES.get(fmt, fmt)
    if head.startswith(PARQUET_MAGIC):
        return f"it is a Parquet file, not the {kind} file its extension says", "Name it .parquet."
    if b"\x00" in head:
        return (
            f"it is not text (binary data: byte 0x00 at offset {head.index(0)}), so not the {kind} file its "
            "extension says",
            f"Point dataset.path at {kind} files, or name this file after its real format.",
        )
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head, final=whole)
    except UnicodeDecodeError as exc:
        return _problem_from_exception(exc, "", fmt)
    if whole and not text.strip():
        return "it holds no records (nothing but white space)", REMOVE_OR_REPLACE
    return _fasta_head_problem(text, whole) if fmt == "fasta" else None


def _fasta_head_problem(text: str, whole: bool) -> tuple[str, str] | None:
    """The start of a FASTA file must be blank, ';' comments or a '>' header; same rules as `_parse_fasta`."""
    lines = text.splitlines() if whole else text.splitlines()[:-1]  # the last line of a partial head may be cut
    first = next((line.strip() for line in lines if line.strip() and not line.startswith(";")), None)
    if first is None:
        return (NO_FASTA_RECORDS, REMOVE_OR_REPLACE) if whole else None
    return None if first.startswith(">") else (NOT_FASTA, FIX_FASTA)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first: `datasets` wraps the real reading error in its own."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _file_in_traceback(chain: list[BaseException], files: list[str]) -> str | None:
    """The data file being read where the error was raised, from the reader's local variables.

    `datasets` logs the file but its exceptions do not carry it; its reading frames hold it as a string (a
    compressed file as 'gzip://NAME::PATH'). The innermost frame naming one of `files` wins.
    """
    by_abspath = {os.path.abspath(f): f for f in files}
    found = None
    for exc in chain:
        tb = exc.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, str) and len(value) < 4096:
                    found = by_abspath.get(os.path.abspath(value.rsplit("::", 1)[-1]), found)
            tb = tb.tb_next
    return found


def reading_error(exc: BaseException, path: str, fmt: str) -> DataConfigError | None:
    """The DataConfigError an error raised while reading `path` stands for, or None when it is no file problem."""
    chain = _exception_chain(exc)
    own = next((e for e in chain if isinstance(e, DataConfigError)), None)
    if own is not None:  # raised by read_fasta, wrapped by datasets
        return own
    files = [] if fmt == "hub" else list_data_files(path)
    if not files:
        return None
    culprit = files[0] if len(files) == 1 else _file_in_traceback(chain, files)
    fmt = resolve_format(files, fmt)
    problem = next(filter(None, (_problem_from_exception(e, culprit or "", fmt) for e in chain)), None)
    if problem is None:
        return None
    return unreadable_file(culprit or f"(one of the {len(files)} files of dataset.path={path!r})", *problem)


@contextmanager
def naming_unreadable_files(data_cfg: Any, path: str) -> Iterator[None]:
    """Turn a `datasets` reading error into the recipe's DataConfigError naming the file; others pass unchanged.

    `datasets` reads lazily (all of it while loading map-style data, the first records of a stream here), so this
    wraps every step that reads records, not just the load call.
    """
    try:
        yield
    except DataConfigError:
        raise
    except Exception as exc:
        error = reading_error(exc, path, data_cfg.format)
        if error is None:
            raise
        if error in _exception_chain(exc):  # a copy: re-raising the wrapped one would make a cycle of causes
            raise DataConfigError(*error.args).with_traceback(error.__traceback__) from None
        raise error from exc


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
        if not looks_like_hub_name or resolve_path(path).is_dir():
            raise _no_data_files_error(path)
        fmt = "hub"
    if fmt == "hub":
        try:
            return datasets.load_dataset(path, name=data_cfg.hub_config, split=data_cfg.hub_split, streaming=streaming)
        except Exception as exc:
            raise DataConfigError(
                f"Could not load hub dataset {path!r} (split {data_cfg.hub_split!r}): {exc}. Without network access "
                "(HF_HUB_OFFLINE=1) only local files or a previously cached hub dataset can be used."
            ) from exc

    fmt = resolve_format(files, fmt)
    check_data_files(files, fmt)
    if fmt == "parquet":
        check_parquet_columns(files, data_cfg.sequence_column)
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


def _check_sequence_column(ds: datasets.Dataset | datasets.IterableDataset, column: str, path: str) -> None:
    """Fail before training when the sequence column is missing or holds no text (numbers, lists, records, bytes).

    A stream without a schema is asked for its first record.
    """
    columns, first = ds.column_names, None
    if columns is None and isinstance(ds, datasets.IterableDataset):  # schema unknown until the first record
        first = next(iter(ds), None)
        if first is None:
            raise DataConfigError(f"dataset {path!r} holds no records. Point dataset.path at files holding sequences.")
        columns = list(first.keys())
    if column not in columns:
        raise DataConfigError(
            f"dataset {path!r} has no {column!r} column (columns: {columns}). Set dataset.sequence_column to the "
            "column holding the amino-acid sequences."
        )
    feature = ds.features[column] if ds.features is not None else None
    if feature is not None and not _is_text(feature):
        raise _non_text_column_error(_source_name(path), column, _feature_kind(feature), columns)
    value = first[column] if first is not None else None
    if value is not None and not isinstance(value, str):
        raise _non_text_column_error(_source_name(path), column, f"{type(value).__name__} values", columns)


def _source_name(path: str) -> str:
    files = list_data_files(path) if _is_local(path) else []  # a hub dataset is named by its name
    return f"Data file {files[0]}" if len(files) == 1 else f"dataset {path!r}"


def _non_text_column_error(where: str, column: str, kind: str, columns: list[str]) -> DataConfigError:
    return DataConfigError(
        f"{where}: its column {column!r} holds {kind}, not amino-acid sequences as text. Set "
        f"dataset.sequence_column to the column of sequences (columns: {columns}), or store them as strings."
    )


def _is_local(path: str) -> bool:
    resolved = resolve_path(path)
    return os.path.lexists(resolved) or bool(glob.glob(str(resolved)))


def _is_text(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _feature_kind(feature: Any) -> str:
    """What a non-text column holds, in words: `int64 values`, `lists`, `records (fields: a, b)`, `bytes (binary)`."""
    if isinstance(feature, datasets.Value):
        return "bytes (binary)" if "binary" in feature.dtype else f"{feature.dtype} values"
    if isinstance(feature, dict):
        return f"records (fields: {', '.join(feature)})"
    if isinstance(feature, datasets.List | datasets.LargeList | datasets.Sequence | list):
        return "lists"
    return f"{type(feature).__name__} values"


def check_parquet_columns(files: list[str], column: str) -> None:
    """Refuse, by file, a Parquet file whose sequence column is not text, reading only the files' footers.

    Before `datasets` loads them: it would cast one file's numbers to another's text type and train on them, or fail
    on lists without naming the file.
    """
    for file in files:
        if file.endswith(".gz"):
            continue
        schema = pq.read_schema(file)
        if column in schema.names:
            feature = datasets.Features.from_arrow_schema(schema)[column]
            if not _is_text(feature):
                where = f"Data file {file}" + (f" (of {len(files)} in dataset.path)" if len(files) > 1 else "")
                raise _non_text_column_error(where, column, _feature_kind(feature), schema.names)


def prepare_sequences(data_cfg: Any, path: str) -> tuple[datasets.Dataset | datasets.IterableDataset, int | None]:
    """Load `path`, keep one clean, non-empty `sequence` column; returns the dataset and how many were empty."""
    column = data_cfg.sequence_column
    with naming_unreadable_files(data_cfg, path):
        raw = load_raw_dataset(data_cfg, path)
        _check_sequence_column(raw, column, path)
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
            with naming_unreadable_files(data_cfg, data_cfg.validation_path):
                validation = datasets.Dataset.from_list(list(validation))
    else:
        with naming_unreadable_files(data_cfg, data_cfg.path):  # a stream reads its first records here
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
