import gzip
import json
import logging

import datasets
import pandas as pd
import pytest
import torch
from conftest import SAMPLE_FASTA, compose, read_fasta_sequences

from dataset import (
    DataConfigError,
    EpochLoader,
    GlobalShuffleSampler,
    build_dataloaders,
    load_sequence_splits,
    read_fasta,
)
from distributed import DistributedContext

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


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


def test_global_shuffle_sampler_shards_disjointly_and_resumes_on_any_world_size():
    n = 103
    shards = [list(GlobalShuffleSampler(n, rank, 4, seed=3)) for rank in range(4)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 25
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat) == 100
    # an uninterrupted epoch on 1 rank, versus 24 samples on 2 ranks then the rest on 3 ranks
    order = GlobalShuffleSampler(n, 0, 1, seed=3).permutation().tolist()
    first = [list(GlobalShuffleSampler(n, r, 2, seed=3))[:12] for r in range(2)]
    resumed = []
    for r in range(3):
        sampler = GlobalShuffleSampler(n, r, 3, seed=3)
        sampler.set_epoch(0, start=24)
        resumed.append(list(sampler))
    seen = [i for s in first for i in s] + [i for s in resumed for i in s]
    assert len(seen) == len(set(seen)) == 24 + 3 * 26
    assert set(seen) == set(order[: 24 + 3 * 26])
    # a new epoch is a new permutation
    sampler = GlobalShuffleSampler(n, 0, 1, seed=3)
    sampler.set_epoch(1)
    assert sampler.permutation().tolist() != order


def test_training_stream_reshuffles_each_epoch_and_resumes_mid_epoch(tokenizer, tmp_path):
    fasta = tmp_path / "small.fasta"
    fasta.write_text("".join(f">s{i}\n{seq}\n" for i, seq in enumerate(read_fasta_sequences(40))))
    cfg = compose(
        "L0_sanity",
        [f"dataset.path={fasta}", "dataset.validation_size=0", "dataset.micro_batch_size=4", "dataset.num_workers=1"],
    )
    stream, validation = build_dataloaders(cfg, CPU, tokenizer)
    assert validation is None
    batches = iter(stream)
    epoch0 = [next(batches)["labels"] for _ in range(10)]
    assert stream.epoch == 0
    middle = stream.state_dict()
    epoch1 = [next(batches)["labels"] for _ in range(10)]
    assert stream.epoch == 1
    assert middle == {"epoch": 0, "world_size": 1, "consumed": 40}

    fresh, _ = build_dataloaders(cfg, CPU, tokenizer)
    fresh.load_state_dict({"epoch": 1, "world_size": 1, "consumed": 20})
    resumed = iter(fresh)
    for expected in epoch1[5:]:
        torch.testing.assert_close(next(resumed)["labels"], expected)
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))


def test_epoch_loader_refuses_streaming_resume_on_another_world_size():
    stream = EpochLoader(loader=None, collator=None, world_size=2)
    with pytest.raises(DataConfigError, match="same number of ranks"):
        stream.load_state_dict({"epoch": 0, "world_size": 4, "loader": {}})
