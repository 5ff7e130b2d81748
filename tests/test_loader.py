"""Samplers, token-budget packing and the epoch loader: property tests over random length distributions, resumes."""

import copy
import itertools
import multiprocessing

import datasets
import numpy as np
import pytest
import torch
from conftest import compose, read_fasta_sequences
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

from collator import BatchLayout, MLMMasker, THDCollator, build_collator
from dataset import DataConfigError
from distributed import DistributedContext
from loader import (
    EpochLoader,
    GlobalShuffleSampler,
    PackedBatchSampler,
    PackedStream,
    build_dataloaders,
    pack_by_token_budget,
)

lengths_strategy = st.lists(st.integers(min_value=3, max_value=300), min_size=1, max_size=120)


def make_masker(tokenizer, max_seq_length=128):
    return MLMMasker.from_tokenizer(tokenizer, max_seq_length=max_seq_length, seed=1)


def fake_tokens(length, index):
    """A distinct <cls> ... <eos> token list of `length` whose residues encode `index`."""
    rng = np.random.default_rng(index)
    return [0, *rng.integers(4, 24, size=length - 2).tolist(), 2]


lookaheads = st.sampled_from([1, 3, 256])  # in order, a narrow window, the default window


@settings(max_examples=60, deadline=None)
@given(
    lengths=lengths_strategy,
    world_size=st.integers(1, 4),
    budget=st.integers(128, 1024),
    epoch=st.integers(0, 3),
    lookahead=lookaheads,
)
def test_packed_sampler_uses_every_sequence_once_within_budget(lengths, world_size, budget, epoch, lookahead):
    max_len = 128
    per_rank = []
    for rank in range(world_size):
        sampler = PackedBatchSampler(np.array(lengths), budget, max_len, rank, world_size, seed=5, lookahead=lookahead)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    assert len({len(packs) for packs in per_rank}) == 1  # every rank does the same number of steps
    flat = [index for packs in per_rank for pack in packs for index in pack]
    assert sorted(flat) == list(range(len(lengths)))  # each sequence exactly once per epoch
    for packs in per_rank:
        for pack in packs:
            assert sum(min(lengths[i], max_len) for i in pack) <= budget
    empty = sum(1 for packs in per_rank for pack in packs if not pack)
    assert empty < world_size  # filler packs only pad the last round


@settings(max_examples=30, deadline=None)
@given(
    lengths=lengths_strategy,
    old_world=st.integers(1, 4),
    new_world=st.integers(1, 4),
    cut=st.integers(0, 40),
    lookahead=lookaheads,
)
def test_packed_sampler_resumes_on_another_world_size_without_repeats_or_gaps(
    lengths, old_world, new_world, cut, lookahead
):
    def run(world, start, steps=None):
        out = []
        for rank in range(world):
            sampler = PackedBatchSampler(np.array(lengths), 256, 128, rank, world, seed=2, lookahead=lookahead)
            sampler.set_epoch(0, start=start)
            out.append(list(sampler)[:steps])
        return out

    steps = min(cut, min(len(p) for p in run(old_world, 0)))
    before = run(old_world, 0, steps)
    after = run(new_world, steps * old_world)
    seen = [i for packs in before + after for pack in packs for i in pack]
    assert sorted(seen) == list(range(len(lengths)))


@settings(max_examples=20, deadline=None)
@given(lengths=lengths_strategy, budget=st.integers(100, 700))
def test_pack_by_token_budget_keeps_order_and_budget(lengths, budget):
    capped = [min(n, 100) for n in lengths]
    packs = list(pack_by_token_budget(enumerate(capped), budget))
    assert [i for pack in packs for i in pack] == list(range(len(lengths)))
    assert all(sum(capped[i] for i in pack) <= budget for pack in packs)
    # greedy: no pack could have taken the next pack's first sequence
    for pack, following in itertools.pairwise(packs):
        assert sum(capped[i] for i in pack) + capped[following[0]] > budget


@settings(max_examples=30, deadline=None)
@given(
    lengths=lengths_strategy,
    budget=st.integers(128, 1024),
    cap=st.integers(1, 12),
    world_size=st.integers(1, 3),
    lookahead=lookaheads,
)
def test_packs_respect_a_sequence_cap_and_still_use_every_sequence_once(lengths, budget, cap, world_size, lookahead):
    per_rank = []
    for rank in range(world_size):
        sampler = PackedBatchSampler(
            np.array(lengths), budget, 128, rank, world_size, seed=3, max_sequences=cap, lookahead=lookahead
        )
        per_rank.append(list(sampler))
    packs = [pack for packs in per_rank for pack in packs]
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(len(pack) <= cap and sum(min(lengths[i], 128) for i in pack) <= budget for pack in packs)
    # greedy under both limits: a pack closed below the cap could not take the next sequence
    flat = list(pack_by_token_budget(((i, min(n, 128)) for i, n in enumerate(lengths)), budget, cap))
    for pack, following in itertools.pairwise(flat):
        used = sum(min(lengths[i], 128) for i in pack)
        assert len(pack) == cap or used + min(lengths[following[0]], 128) > budget


def streaming_source(lengths):
    records = [{"input_ids": fake_tokens(n, i)} for i, n in enumerate(lengths)]
    return datasets.Dataset.from_list(records).to_iterable_dataset(num_shards=1)


@pytest.mark.parametrize(("num_workers", "lookahead"), [(0, 1), (1, 1), (0, 32), (1, 32)])
def test_packed_stream_resumes_mid_epoch_with_the_same_batches(tokenizer, num_workers, lookahead):
    lengths = np.random.default_rng(0).integers(10, 200, size=150).tolist()
    collator = THDCollator(make_masker(tokenizer), tokenizer.pad_token_id, 16)

    def loader():
        stream = PackedStream(streaming_source(lengths), token_budget=512, max_seq_length=128, lookahead=lookahead)
        return StatefulDataLoader(stream, batch_size=None, collate_fn=collator, num_workers=num_workers)

    uninterrupted = list(loader())
    assert len(uninterrupted) > 10
    first = loader()
    iterator = iter(first)
    for _ in range(7):
        next(iterator)
    state = first.state_dict()
    resumed_loader = loader()
    resumed_loader.load_state_dict(state)
    resumed = list(resumed_loader)
    assert len(resumed) == len(uninterrupted) - 7
    for expected, actual in zip(uninterrupted[7:], resumed, strict=True):
        torch.testing.assert_close(actual["input_ids"], expected["input_ids"])
        torch.testing.assert_close(actual["cu_seqlens"], expected["cu_seqlens"])


@pytest.mark.parametrize("lookahead", [1, 8])
def test_packed_stream_never_drops_or_duplicates(tokenizer, lookahead):
    lengths = np.random.default_rng(1).integers(10, 300, size=90).tolist()
    stream = PackedStream(streaming_source(lengths), token_budget=400, max_seq_length=128, lookahead=lookahead)
    packs = list(stream)
    seen = [tuple(s["input_ids"]) for pack in packs for s in pack]
    assert sorted(seen) == sorted(tuple(fake_tokens(n, i)) for i, n in enumerate(lengths))
    assert all(sum(min(len(s["input_ids"]), 128) for s in pack) <= 400 for pack in packs)


CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_packed_training_stream_resumes_mid_epoch(tokenizer):
    cfg = compose(
        "L0_sanity",
        [
            "use_sequence_packing=true",
            "dataset.validation_size=0",
            "dataset.num_workers=1",
            "token_micro_batch_size=1024",
        ],
    )
    stream, _ = build_dataloaders(cfg, BatchLayout.from_config(cfg), CPU, tokenizer)
    batches = iter(stream)
    head = [next(batches) for _ in range(5)]
    state = stream.state_dict()
    tail = [next(batches) for _ in range(5)]
    assert all(b["input_ids"].shape[1] <= 1024 and b["input_ids"].shape[1] % 8 == 0 for b in head + tail)
    fresh, _ = build_dataloaders(cfg, BatchLayout.from_config(cfg), CPU, tokenizer)
    fresh.load_state_dict(state)
    resumed = iter(fresh)
    for expected in tail:
        actual = next(resumed)
        torch.testing.assert_close(actual["input_ids"], expected["input_ids"])
        torch.testing.assert_close(actual["labels"], expected["labels"])


@pytest.mark.parametrize("streaming", [False, True])
def test_static_shape_stream_gives_one_shape_for_a_whole_epoch_of_real_data(tokenizer, streaming):
    """Every batch of the sample proteome, the last and a rank's filler included, has the same three shapes."""
    cfg = compose(
        "L0_sanity",
        [
            "use_sequence_packing=true",
            "static_shapes=true",
            "max_sequences_per_pack=24",
            "token_micro_batch_size=8192",
            "dataset.max_seq_length=1024",
            "dataset.num_workers=0",
            f"dataset.streaming={str(streaming).lower()}",
            f"dataset.validation_size={50 if streaming else 0}",
        ],
    )
    layout = BatchLayout.from_config(cfg)
    stream, _ = build_dataloaders(cfg, layout, CPU, tokenizer)
    batches = iter(stream)
    shapes, sequences = set(), []
    while stream.epoch == 0:
        batch = next(batches)
        shapes.add((tuple(batch["input_ids"].shape), tuple(batch["cu_seqlens"].shape), batch["max_seqlen"]))
        real = torch.diff(batch["cu_seqlens"])
        sequences.append(int(((real > 0) & (real != 1024)).sum()))  # padding segments are at most 1024 long
    assert shapes == {((1, 8192), (24 + 8 + 1,), 1024)}
    assert max(sequences) <= 24 + 8 and len(sequences) > 10


def test_padding_fraction_of_packed_batches_is_small(tokenizer):
    """On the real sample proteome (median ~280 residues), packs of 8k tokens waste well under 1%."""
    cfg = compose("L0_sanity", ["use_sequence_packing=true", "dataset.max_seq_length=1024", "dataset.num_workers=0"])
    stream, _ = build_dataloaders(cfg, BatchLayout.from_config(cfg), CPU, tokenizer)
    batches = iter(stream)
    real = padded = 0
    for _ in range(60):
        batch = next(batches)
        real += int((batch["input_ids"] != tokenizer.pad_token_id).sum())
        padded += batch["input_ids"].numel()
    budget = BatchLayout.from_config(cfg).token_budget
    assert budget == 8 * 1024
    assert 1 - real / padded < 0.01  # padding to the precision multiple
    assert real / (60 * budget) > 0.95  # and the budget itself is well used


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
    stream, validation = build_dataloaders(cfg, BatchLayout.from_config(cfg), CPU, tokenizer)
    assert validation is None
    batches = iter(stream)
    epoch0 = [next(batches)["labels"] for _ in range(10)]
    assert stream.epoch == 0
    middle = stream.state_dict()
    epoch1 = [next(batches)["labels"] for _ in range(10)]
    assert stream.epoch == 1
    assert middle == {"epoch": 0, "world_size": 1, "consumed": 40}

    fresh, _ = build_dataloaders(cfg, BatchLayout.from_config(cfg), CPU, tokenizer)
    fresh.load_state_dict({"epoch": 1, "world_size": 1, "consumed": 20})
    resumed = iter(fresh)
    for expected in epoch1[5:]:
        torch.testing.assert_close(next(resumed)["labels"], expected)
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))


@pytest.mark.parametrize("packed", [False, True])
def test_workers_outlive_epochs_and_mask_each_epoch_as_a_fresh_worker_would(tokenizer, tmp_path, packed):
    """One worker process serves three epochs, and its batches equal those built in the main process."""
    fasta = tmp_path / "small.fasta"
    fasta.write_text("".join(f">s{i}\n{seq}\n" for i, seq in enumerate(read_fasta_sequences(40))))
    base = [f"dataset.path={fasta}", "dataset.validation_size=0", "dataset.micro_batch_size=4"]
    base += ["use_sequence_packing=true", "token_micro_batch_size=2048"] if packed else []

    def draw(workers):
        cfg = compose("L0_sanity", [*base, f"dataset.num_workers={workers}"])
        stream, _ = build_dataloaders(cfg, BatchLayout.from_config(cfg), CPU, tokenizer)
        batches, drawn, pids = iter(stream), [], set()
        while stream.epoch < 3:
            batch = next(batches)
            drawn.append((stream.epoch, batch))
            pids |= {child.pid for child in multiprocessing.active_children()}
        return drawn, pids

    in_workers, pids = draw(1)
    in_main, _ = draw(0)
    assert len(pids) == 1  # the same worker process across the epoch boundaries
    assert [epoch for epoch, _ in in_workers] == [epoch for epoch, _ in in_main]
    for (_, a), (_, b) in zip(in_workers, in_main, strict=True):
        torch.testing.assert_close(a["input_ids"], b["input_ids"])
        torch.testing.assert_close(a["labels"], b["labels"])
    cfg = compose("L0_sanity", base)
    masker = build_collator(cfg.dataset, BatchLayout.from_config(cfg), tokenizer, cfg.seed).masker
    checked = 0
    for epoch, batch in in_workers if not packed else []:  # each row is one sequence: re-mask it as of its epoch
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            original = torch.where(labels != -100, labels, ids)[ids != tokenizer.pad_token_id]
            if len(original) == 256:  # maybe cropped: the crop's window is not in the batch
                continue
            checked += 1
            expected_ids, expected_labels = masker(original.tolist(), epoch)
            assert ids[: len(expected_ids)].tolist() == expected_ids.tolist()
            assert labels[: len(expected_labels)].tolist() == expected_labels.tolist()
    assert packed or checked > 50  # of the 120 rows, those of uncropped sequences


def test_epoch_loader_refuses_streaming_resume_on_another_world_size():
    stream = EpochLoader(loader=None, collator=None, world_size=2)
    with pytest.raises(DataConfigError, match="same number of data-parallel ranks"):
        stream.load_state_dict({"epoch": 0, "world_size": 4, "loader": {}})


def short_sequences(count):
    """`count` distinct sample sequences that fit dataset.max_seq_length=256 whole (no crop)."""
    sequences = list(dict.fromkeys(seq for seq in read_fasta_sequences(400) if len(seq) <= 254))
    assert len(sequences) >= count
    return sequences[:count]


def write_fasta(path, sequences):
    path.write_text("".join(f">s{i}\n{seq}\n" for i, seq in enumerate(sequences)))
    return path


def restored_rows(batch, pad_token_id):
    """Each padded row's token ids with the masked positions' original tokens put back."""
    original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    return [row[row != pad_token_id].tolist() for row in original]


def test_a_validation_file_is_what_validation_reads_and_training_keeps_all_of_its_own(tokenizer, tmp_path):
    sequences = short_sequences(60)
    train = write_fasta(tmp_path / "train.fasta", sequences[:48])
    held = write_fasta(tmp_path / "held.fasta", sequences[48:])
    overrides = [f"dataset.path={train}", f"dataset.validation_path={held}", "dataset.validation_size=0.5"]
    cfg = compose("L0_sanity", [*overrides, "dataset.num_workers=0", "dataset.micro_batch_size=4"])
    stream, validation = build_dataloaders(cfg, BatchLayout.from_config(cfg), CPU, tokenizer)
    rows = [row for batch in validation for row in restored_rows(batch, tokenizer.pad_token_id)]
    assert rows == tokenizer(sequences[48:])["input_ids"]  # every validation batch, all of the file, in its order
    assert stream.num_sequences == 48  # validation_size holds nothing out of the training file


def test_the_shuffle_buffer_size_bounds_how_far_a_stream_reads_ahead_with_one_order_per_seed(tokenizer, tmp_path):
    sequences = short_sequences(120)
    fasta = write_fasta(tmp_path / "stream.fasta", sequences)
    position = {tuple(ids): index for index, ids in enumerate(tokenizer(sequences)["input_ids"])}
    overrides = [f"dataset.path={fasta}", "dataset.streaming=true", "dataset.validation_size=0"]
    streaming = compose("L0_sanity", [*overrides, "dataset.num_workers=0"])
    orders = {}

    def order(buffer_size, seed=42):
        """File positions of the first epoch's records, in the order the training stream gives them."""
        if (buffer_size, seed) not in orders:
            cfg = copy.deepcopy(streaming)
            cfg.dataset.shuffle_buffer_size, cfg.seed = buffer_size, seed
            stream, _ = build_dataloaders(cfg, BatchLayout.from_config(cfg), CPU, tokenizer)
            batches, drawn = iter(stream), []
            while len(drawn) < len(sequences):
                drawn += [position[tuple(row)] for row in restored_rows(next(batches), tokenizer.pad_token_id)]
            orders[buffer_size, seed] = drawn
        return orders[buffer_size, seed]

    assert order(1) == list(range(120))  # a buffer of one record: the file's order
    for buffer_size in (8, 64):
        drawn = order(buffer_size)
        assert sorted(drawn) == list(range(120))
        assert all(index < buffer_size + k for k, index in enumerate(drawn))  # the k-th record: from the first B + k
    assert any(index >= 8 + k for k, index in enumerate(order(64)))  # the larger buffer reaches further ahead
    drawn = orders.pop((8, 42))
    assert order(8) == drawn  # rebuilt: the same order for the same seed
    assert order(8, seed=7) != drawn
