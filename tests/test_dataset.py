import functools
import gzip
import json
import logging
import os

import datasets
import pandas as pd
import pytest
from conftest import RECIPE_DIR, SAMPLE_FASTA, compose, read_fasta_sequences

from dataset import DataConfigError, load_sequence_splits, read_fasta


def data_cfg(path, *overrides):
    return compose("L0_sanity", [f"dataset.path={path}", *overrides]).dataset


def decoded(tokenizer, split):
    return [tokenizer.decode(ids[1:-1]).replace(" ", "") for ids in split["input_ids"]]


def test_sample_fasta_loads_with_held_out_validation(tokenizer):
    splits = load_sequence_splits(data_cfg(SAMPLE_FASTA), tokenizer, seed=0)
    assert (len(splits.train), len(splits.validation)) == (1995, 105)
    train, validation = set(decoded(tokenizer, splits.train)), set(decoded(tokenizer, splits.validation))
    assert train.isdisjoint(validation)
    assert train | validation == set(read_fasta_sequences())
    assert all(ids[0] == 0 and ids[-1] == 2 for ids in splits.train["input_ids"][:50])


def test_fasta_cleaning_and_empty_records(tmp_path, tokenizer, caplog):
    fasta = tmp_path / "mixed.fasta.gz"
    with gzip.open(fasta, "wt") as handle:
        handle.write(">a desc\nmkv\nLL*\n>empty\n\n>b\nACD E\n>stop_only\n*\n>c\nWY\n")
    with caplog.at_level(logging.WARNING):
        splits = load_sequence_splits(data_cfg(fasta, "dataset.validation_size=0"), tokenizer, seed=0)
    assert splits.validation is None
    assert sorted(decoded(tokenizer, splits.train)) == ["ACDE", "MKVLL", "WY"]
    assert "Skipped 2 empty sequences" in caplog.text


def test_read_fasta_rejects_non_fasta(tmp_path):
    bad = tmp_path / "bad.fasta"
    bad.write_text("MKV\n>x\nAA\n")
    with pytest.raises(DataConfigError, match="not a FASTA file"):
        list(read_fasta([str(bad)]))


def load_error(tokenizer, path, *overrides):
    """The DataConfigError message loading `path` gives."""
    with pytest.raises(DataConfigError) as info:
        load_sequence_splits(data_cfg(path, *overrides), tokenizer, seed=0)
    return str(info.value)


@functools.cache
def sample_gzip():
    """6,300 records: a stream reads its first batch (1,000) while loading, so a cut at 2/3 is met only later."""
    return gzip.compress(SAMPLE_FASTA.read_bytes() * 3, mtime=0)


STREAM = ("dataset.streaming=true", "dataset.validation_size=1")


@pytest.mark.parametrize("suffix", ["parquet", "csv", "tsv", "jsonl"])
def test_tabular_formats_with_custom_column(tmp_path, tokenizer, suffix):
    frame = pd.DataFrame({"id": ["x", "y", "z"], "protein": ["MKV", "acd*", "WYHH"]})
    path = tmp_path / f"data.{suffix}"
    if suffix == "parquet":
        frame.to_parquet(path)
    elif suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == "tsv" else ",")
    cfg = data_cfg(path, "dataset.sequence_column=protein", "dataset.validation_size=1")
    splits = load_sequence_splits(cfg, tokenizer, seed=0)
    assert sorted(decoded(tokenizer, splits.train) + decoded(tokenizer, splits.validation)) == ["ACD", "MKV", "WYHH"]


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_missing_sequence_column_names_the_columns(tmp_path, tokenizer, suffix):
    path = tmp_path / f"data.{suffix}"
    frame = pd.DataFrame({"seq": ["MKV"]})
    frame.to_parquet(path) if suffix == "parquet" else frame.to_csv(path, index=False)
    with pytest.raises(DataConfigError, match=r"no 'sequence' column \(columns: \['seq'\]\).*sequence_column"):
        load_sequence_splits(data_cfg(path), tokenizer, seed=0)


def test_missing_path(tokenizer):
    with pytest.raises(DataConfigError, match="does not exist"):
        load_sequence_splits(data_cfg("no/such/file.fasta"), tokenizer, seed=0)


def test_unknown_extension(tmp_path, tokenizer):
    path = tmp_path / "data.txt"
    path.write_text("MKV\n")
    with pytest.raises(DataConfigError, match="Cannot tell the data format"):
        load_sequence_splits(data_cfg(path), tokenizer, seed=0)


def test_empty_dataset(tmp_path, tokenizer):
    path = tmp_path / "empty.fasta"
    path.write_text(">a\n\n>b\n*\n")
    with pytest.raises(DataConfigError, match="no non-empty sequences"):
        load_sequence_splits(data_cfg(path), tokenizer, seed=0)


def test_validation_split_too_large(tmp_path, tokenizer):
    path = tmp_path / "two.fasta"
    path.write_text(">a\nMK\n>b\nVV\n")
    with pytest.raises(DataConfigError, match="leaving none to train on"):
        load_sequence_splits(data_cfg(path, "dataset.validation_size=2"), tokenizer, seed=0)


def test_streaming_fasta(tokenizer):
    cfg = data_cfg(SAMPLE_FASTA, "dataset.streaming=true", "dataset.validation_size=100")
    splits = load_sequence_splits(cfg, tokenizer, seed=0)
    assert isinstance(splits.train, datasets.IterableDataset)
    assert len(splits.validation) == 100
    train = decoded(tokenizer, {"input_ids": [r["input_ids"] for r in splits.train]})
    assert len(train) == 2000
    assert set(train).isdisjoint(decoded(tokenizer, splits.validation))


def test_streaming_refuses_a_fractional_validation_size(tokenizer):
    cfg = data_cfg(SAMPLE_FASTA, "dataset.streaming=true", "dataset.validation_size=0.1")
    with pytest.raises(DataConfigError, match="number of sequences"):
        load_sequence_splits(cfg, tokenizer, seed=0)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "it is empty (0 bytes)"), ("\n\n; comment only\n", "it holds no sequences (no '>' header line)")],
    ids=["zero-bytes", "no-records"],
)
def test_empty_fasta_is_named(tmp_path, tokenizer, content, problem, streaming):
    path = tmp_path / "empty.fasta"
    path.write_text(content)
    overrides = STREAM if streaming else ()
    assert load_error(tokenizer, path, *overrides).startswith(f"Cannot read data file {path}: {problem}. Remove it")


@pytest.mark.parametrize(
    ("offset", "binary", "problem"),
    [
        (0, bytes(range(256)), "it is not text (binary data: byte 0x00 at offset 0)"),
        (10_000, bytes(range(128, 256)), "it is not text (byte 0x80 is not UTF-8)"),  # past the up-front check
    ],
    ids=["at-start", "deep"],
)
def test_binary_fasta_is_named(tmp_path, tokenizer, offset, binary, problem):
    path = tmp_path / "binary.fasta"
    path.write_bytes(SAMPLE_FASTA.read_bytes()[:offset] + binary)
    message = load_error(tokenizer, path)
    assert message.startswith(f"Cannot read data file {path}: {problem}, so not the FASTA file its extension says.")


@pytest.mark.parametrize(
    ("keep", "overrides"),
    [(100, ()), (900_000, ()), (900_000, STREAM)],
    ids=["cut-early", "cut-deep", "cut-deep-streaming"],
)
def test_truncated_fasta_gz_is_named(tmp_path, tokenizer, keep, overrides):
    path = tmp_path / "cut.fasta.gz"
    path.write_bytes(sample_gzip()[:keep])
    if overrides:  # a stream reads lazily: it loads, and meets the cut only while training, with the same message
        splits = load_sequence_splits(data_cfg(path, *overrides), tokenizer, seed=0)
        with pytest.raises(DataConfigError) as info:
            list(splits.train)
        message = str(info.value)
    else:
        message = load_error(tokenizer, path)
    assert message.startswith(f"Cannot read data file {path}: its gzip stream ends early: the file is truncated")
    assert "gzip -t" in message
    assert path.read_bytes() == sample_gzip()[:keep]  # reported, never touched


def test_corrupt_fasta_gz_is_named(tmp_path, tokenizer):
    data = sample_gzip()
    path = tmp_path / "corrupt.fasta.gz"
    path.write_bytes(data[:100_000] + bytes(500) + data[100_500:])
    message = load_error(tokenizer, path)
    assert message.startswith(f"Cannot read data file {path}: its gzip data is corrupt (")


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("plain.fasta.gz", b">a\nMKV\n", "it is named .gz but is not gzip-compressed"),
        ("packed.fasta", gzip.compress(b">a\nMKV\n", mtime=0), "it is gzip-compressed but not named .gz"),
    ],
    ids=["named-gz-not-gzip", "gzip-not-named-gz"],
)
def test_compression_not_matching_the_name(tmp_path, tokenizer, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    assert load_error(tokenizer, path).startswith(f"Cannot read data file {path}: {problem}.")


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_that_is_not_parquet_is_named(tmp_path, tokenizer, streaming):
    path = tmp_path / "data.parquet"
    path.write_text("sequence\nMKV\n")
    message = load_error(tokenizer, path, *(STREAM if streaming else ()))
    assert message.startswith(f"Cannot read data file {path}: it is not a Parquet file (no b'PAR1' marker")


def test_corrupt_parquet_among_several_is_named(tmp_path, tokenizer):
    for name in ("a", "c"):
        pd.DataFrame({"sequence": ["MKV", "WYH"]}).to_parquet(tmp_path / f"{name}.parquet")
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"PAR1" + bytes(range(100)) + b"PAR1")  # right markers, broken inside: found while loading
    message = load_error(tokenizer, tmp_path)
    assert message.startswith(f"Cannot read data file {bad}: it is not a valid Parquet file (")


def test_truncated_csv_gz_among_several_is_named(tmp_path, tokenizer):
    for name in ("a", "b"):
        with gzip.open(tmp_path / f"{name}.csv.gz", "wt") as handle:
            pd.DataFrame({"sequence": ["MKVLAW"] * 20_000}).to_csv(handle, index=False)
    bad = tmp_path / "b.csv.gz"
    bad.write_bytes(bad.read_bytes()[:-40])
    message = load_error(tokenizer, tmp_path)
    assert message.startswith(f"Cannot read data file {bad}: its gzip stream ends early: the file is truncated")


@pytest.mark.parametrize(
    ("held", "content"),
    [([], "it is empty"), (["notes.txt"], "it holds only ['notes.txt']")],
    ids=["empty", "no-data-files"],
)
def test_empty_directory_says_it_is_empty(tmp_path, tokenizer, held, content):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in held:
        (folder / name).write_text("MKV\n")
    message = load_error(tokenizer, folder)
    assert message.startswith(f"dataset.path='{folder}' is the folder {folder}, which holds no data files ({content};")
    assert "looked for *.fasta, *.fa, *.faa, *.fas, *.mpfa, *.parquet, *.csv, *.tsv, *.json, *.jsonl" in message
    assert "does not exist" not in message


def test_missing_path_lists_each_location_once(tmp_path, tokenizer, monkeypatch):
    in_recipe, elsewhere = RECIPE_DIR / "no/such/file.fasta", tmp_path / "no/such/file.fasta"
    monkeypatch.chdir(RECIPE_DIR)  # the usual case: run from the recipe folder, both places are one
    message = load_error(tokenizer, "no/such/file.fasta")
    assert f"does not exist (looked for {in_recipe}). Point" in message
    monkeypatch.chdir(tmp_path)
    message = load_error(tokenizer, "no/such/file.fasta")
    assert f"does not exist (looked for {os.path.realpath(elsewhere)}, {in_recipe}). Point" in message


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ([1, 2], "int64 values"),
        ([["M", "K"], ["A"]], "lists"),
        ([{"residues": "MK"}, {"residues": "A"}], "records (fields: residues)"),
        ([b"MK", b"A"], "bytes (binary)"),
    ],
)
def test_a_sequence_column_that_is_not_text_is_named_with_its_file(tmp_path, tokenizer, values, kind, streaming):
    pd.DataFrame({"sequence": ["MKV", "AAW"]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"sequence": values}).to_parquet(tmp_path / "b.parquet")
    pd.DataFrame({"sequence": values}).to_parquet(tmp_path / "single.parquet")
    message = load_error(tokenizer, tmp_path / "single.parquet", f"dataset.streaming={streaming}")
    assert message == (
        f"Data file {tmp_path / 'single.parquet'}: its column 'sequence' holds {kind}, not amino-acid sequences as "
        "text. Set dataset.sequence_column to the column of sequences (columns: ['sequence']), or store them as "
        "strings."
    )
    (tmp_path / "single.parquet").unlink()
    assert load_error(tokenizer, tmp_path, f"dataset.streaming={streaming}").startswith(
        f"Data file {tmp_path / 'b.parquet'} (of 2 in dataset.path): its column 'sequence' holds {kind}"
    )  # `datasets` would cast b.parquet's values to a.parquet's strings


def test_a_csv_column_of_numbers_is_refused(tmp_path, tokenizer):
    (tmp_path / "ids.csv").write_text("sequence,name\n123,a\n456,b\n")
    assert "its column 'sequence' holds int64 values" in load_error(tokenizer, tmp_path / "ids.csv")


def test_a_looping_or_dangling_link_is_refused_by_name(tmp_path, tokenizer):
    (tmp_path / "loop.fasta").symlink_to("loop.fasta")
    assert load_error(tokenizer, tmp_path / "loop.fasta") == (
        f"Cannot read data file {tmp_path / 'loop.fasta'}: it is a symbolic link that loops (-> loop.fasta). Point "
        "the link at the real file, or remove it."
    )
    folder = tmp_path / "proteomes"
    folder.mkdir()
    (folder / "a.fasta").write_text(">a\nMKV\n")
    (folder / "b.fasta").symlink_to(tmp_path / "gone.fasta")
    assert load_error(tokenizer, folder) == (
        f"Cannot read data file {folder / 'b.fasta'}: it is a symbolic link to {tmp_path / 'gone.fasta'}, which does "
        "not exist. Point the link at the real file, or remove it."
    )
    assert "b.fasta: it is a symbolic link to" in load_error(tokenizer, f"{folder}/*.fasta")  # a glob too
    (folder / "b.fasta").unlink()
    (folder / "c.fasta").mkdir()
    assert "c.fasta: it is a folder, not a data file" in load_error(tokenizer, folder)


def test_a_folder_of_mixed_formats_gets_a_fix_that_works(tmp_path, tokenizer):
    (tmp_path / "a.fasta").write_text(">a\nMKV\n>b\nAAW\n")
    pd.DataFrame({"sequence": ["MKVW", "AAWW", "CCC"]}).to_parquet(tmp_path / "b.parquet")
    for fmt in ("auto", "fasta", "parquet"):
        message = load_error(tokenizer, tmp_path, f"dataset.format={fmt}")
        assert message.startswith("The data files hold more than one format (FASTA: a.fasta; Parquet: b.parquet)")
        assert f"dataset.path='{tmp_path}/*.fasta' or dataset.path='{tmp_path}/*.parquet' (a glob)" in message
    for glob_path, expected in (
        (f"{tmp_path}/*.fasta", ["AAW", "MKV"]),
        (f"{tmp_path}/*.parquet", ["AAWW", "CCC", "MKVW"]),
    ):
        splits = load_sequence_splits(data_cfg(glob_path, "dataset.validation_size=0"), tokenizer, seed=0)
        assert sorted(decoded(tokenizer, splits.train)) == expected  # the fix the message gives works
    assert "its name says Parquet, but dataset.format=fasta" in load_error(
        tokenizer, tmp_path / "b.parquet", "dataset.format=fasta"
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_a_validation_file_is_the_validation_split_and_nothing_is_held_out(tmp_path, tokenizer, streaming):
    sequences = read_fasta_sequences(30)
    (tmp_path / "train.fasta").write_text("".join(f">t{i}\n{seq}\n" for i, seq in enumerate(sequences[:24])))
    pd.DataFrame({"sequence": sequences[24:]}).to_csv(tmp_path / "held.csv", index=False)  # its own format
    cfg = data_cfg(tmp_path / "train.fasta", f"dataset.validation_path={tmp_path / 'held.csv'}",
                   f"dataset.streaming={str(streaming).lower()}", "dataset.validation_size=3")  # fmt: skip
    splits = load_sequence_splits(cfg, tokenizer, seed=0)
    assert decoded(tokenizer, splits.validation) == sequences[24:]
    train = splits.train if not streaming else {"input_ids": [record["input_ids"] for record in splits.train]}
    assert sorted(decoded(tokenizer, train)) == sorted(sequences[:24])  # validation_size=3 holds nothing out


def write_hub_repository(folder, sequences):
    """A dataset repository as the hub serves it: a README whose `configs` name each configuration's split files.

    `datasets` reads a local folder of this layout exactly as a downloaded hub repository (offline here).
    """
    files = {"reviewed/train.csv": sequences[:6], "reviewed/test.csv": sequences[6:8], "all/train.csv": sequences[8:]}
    for name, part in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"protein": part}).to_csv(folder / name, index=False)
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: reviewed\n  data_files:\n  - split: train\n    path: reviewed/train.csv\n"
        "  - split: test\n    path: reviewed/test.csv\n"
        "- config_name: all\n  data_files:\n  - split: train\n    path: all/train.csv\n---\n"
    )
    return folder


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("hub_config", "hub_split", "part"), [("reviewed", "test", slice(6, 8)), ("all", None, slice(8, 12))]
)
def test_a_hub_dataset_reads_the_configured_configuration_and_split(
    tmp_path, tokenizer, streaming, hub_config, hub_split, part
):
    sequences = read_fasta_sequences(12)
    repository = write_hub_repository(tmp_path / "proteins", sequences)
    overrides = ["dataset.format=hub", f"dataset.hub_config={hub_config}", "dataset.sequence_column=protein"]
    overrides += [f"dataset.hub_split={hub_split}"] if hub_split else []  # default: train
    cfg = data_cfg(repository, *overrides, f"dataset.streaming={str(streaming).lower()}", "dataset.validation_size=0")
    train = load_sequence_splits(cfg, tokenizer, seed=0).train
    train = train if not streaming else {"input_ids": [record["input_ids"] for record in train]}
    assert decoded(tokenizer, train) == sequences[part]
