import gzip
import json
import logging

import datasets
import pandas as pd
import pytest
from conftest import SAMPLE_FASTA, compose, read_fasta_sequences

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


def test_missing_sequence_column_names_the_columns(tmp_path, tokenizer):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"seq": ["MKV"]}).to_parquet(path)
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
