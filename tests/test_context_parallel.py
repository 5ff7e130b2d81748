"""Context parallelism's data side on CPU: the split of a packed batch, its inverse, and the exact ESM-2 counts."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from context_parallel import (
    IGNORE_INDEX,
    gather_shards,
    masked_fraction,
    pad_sequences,
    rank_chunks,
    shard_collated_batch,
    shard_packed_batch,
)
from training import mlm_loss

PAD, MASK = 1, 32


def packed_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random residue ids (4..23), 15% masked with MASK and labelled, packed end to end with their cu_seqlens."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 24, (sum(lengths),), generator=generator)
    masked = torch.rand(tokens.shape, generator=generator) < 0.15
    labels = torch.where(masked, tokens, torch.full_like(tokens, IGNORE_INDEX))
    input_ids = torch.where(masked, torch.full_like(tokens, MASK), tokens)
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return input_ids, labels, cu_seqlens


BATCHES = st.tuples(
    st.lists(st.integers(1, 300), min_size=1, max_size=6), st.sampled_from([1, 2, 3, 4]), st.integers(0, 99)
)


@settings(max_examples=40, deadline=None)
@given(BATCHES)
def test_the_shards_of_all_ranks_reassemble_the_packed_batch(batch):
    lengths, cp_size, seed = batch
    input_ids, labels, cu_seqlens = packed_batch(lengths, seed)
    shards = [shard_packed_batch(input_ids, labels, cu_seqlens, cp_size, r, PAD) for r in range(cp_size)]
    whole = pad_sequences(input_ids, labels, cu_seqlens, cp_size, PAD)
    padded = whole["cu_seqlens_padded"]
    assert all(torch.equal(s["cu_seqlens_padded"], padded) and torch.equal(s["cu_seqlens"], cu_seqlens) for s in shards)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(gather_shards([s[key] for s in shards], padded), whole[key])
    # every sequence padded at its end to a multiple of 2 * cp_size; without the padding, the batch itself
    sizes = (padded[1:] - padded[:-1]).tolist()
    assert all(
        size % (2 * cp_size) == 0 and 0 <= size - n < 2 * cp_size for size, n in zip(sizes, lengths, strict=True)
    )
    real = whole["position_ids"] < torch.repeat_interleave(torch.tensor(lengths), torch.tensor(sizes))
    assert torch.equal(whole["input_ids"][real], input_ids) and torch.equal(whole["labels"][real], labels)
    assert (whole["input_ids"][~real] == PAD).all() and (whole["labels"][~real] == IGNORE_INDEX).all()
    # load balance: every rank holds the same number of tokens of every sequence
    for shard in shards:
        assert torch.equal(
            shard["local_cu_seqlens"][1:] - shard["local_cu_seqlens"][:-1], torch.tensor(sizes) // cp_size
        )


@settings(max_examples=25, deadline=None)
@given(BATCHES)
def test_positions_are_the_true_offsets_within_each_sequence(batch):
    lengths, cp_size, seed = batch
    input_ids, labels, cu_seqlens = packed_batch(lengths, seed)
    whole = pad_sequences(input_ids, labels, cu_seqlens, cp_size, PAD)
    padded = whole["cu_seqlens_padded"]
    expected = torch.cat([torch.arange(int(b - a)) for a, b in itertools.pairwise(padded.tolist())])
    assert torch.equal(whole["position_ids"], expected)
    for rank in range(cp_size):
        shard = shard_packed_batch(input_ids, labels, cu_seqlens, cp_size, rank, PAD)
        first, last = rank_chunks(cp_size, rank)
        local = shard["local_cu_seqlens"]
        for index, (start, end) in enumerate(itertools.pairwise(local.tolist())):
            chunk = int(padded[index + 1] - padded[index]) // (2 * cp_size)
            offsets = torch.cat(
                [torch.arange(first * chunk, (first + 1) * chunk), torch.arange(last * chunk, (last + 1) * chunk)]
            )
            assert torch.equal(shard["position_ids"][start:end], offsets)


def test_rank_r_holds_chunks_r_and_its_mirror():
    assert [rank_chunks(4, r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    input_ids, labels, cu_seqlens = packed_batch([8], seed=0)  # one sequence of 8: chunks of 2 tokens on cp=2
    shard = shard_packed_batch(input_ids, labels, cu_seqlens, 2, 1, PAD)
    assert torch.equal(shard["input_ids"], input_ids[[2, 3, 4, 5]])  # chunks 1 and 2 of 0..3
    with pytest.raises(ValueError, match=r"cp_rank=2 must lie in 0\.\.1"):
        rank_chunks(2, 2)


@settings(max_examples=25, deadline=None)
@given(BATCHES)
def test_token_dropout_fractions_from_summed_shard_counts_equal_the_unsplit_ones(batch):
    lengths, cp_size, seed = batch
    input_ids, labels, cu_seqlens = packed_batch(lengths, seed)
    # unsplit: each token's sequence's masked count over its real length, as ESM-2's token dropout takes it
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    counts = torch.zeros(len(lengths)).index_add_(0, segment, (input_ids == MASK).float())
    unsplit = (counts / torch.tensor(lengths))[segment]
    one_rank = masked_fraction(input_ids == MASK, cu_seqlens, cu_seqlens)
    assert torch.equal(one_rank, unsplit)

    shards = [shard_packed_batch(input_ids, labels, cu_seqlens, cp_size, r, PAD) for r in range(cp_size)]
    local_counts = []

    def keep(counts):  # first pass: record each shard's per-sequence counts
        local_counts.append(counts.clone())
        return counts

    for shard in shards:
        masked_fraction(shard["input_ids"] == MASK, shard["local_cu_seqlens"], cu_seqlens, reduce=keep)
    total = torch.stack(local_counts).sum(0)  # what the all-reduce over the CP group returns
    fractions = [
        masked_fraction(s["input_ids"] == MASK, s["local_cu_seqlens"], cu_seqlens, reduce=lambda c: total)
        for s in shards
    ]
    whole = gather_shards(fractions, shards[0]["cu_seqlens_padded"])
    residues = pad_sequences(input_ids, labels, cu_seqlens, cp_size, PAD)["input_ids"] != PAD  # padding excluded
    assert torch.equal(whole[residues], unsplit)


@settings(max_examples=20, deadline=None)
@given(BATCHES)
def test_the_loss_over_shards_with_the_global_masked_count_is_the_unsplit_loss(batch):
    lengths, cp_size, seed = batch
    input_ids, labels, cu_seqlens = packed_batch(lengths, seed)
    if (labels != IGNORE_INDEX).sum() == 0:
        return  # nothing masked: no loss to compare
    logits = torch.randn(len(input_ids), 33, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    unsplit = mlm_loss(logits, labels)
    whole = pad_sequences(logits, labels, cu_seqlens, cp_size, 0)  # logits follow their tokens (padding: zeros)
    shards = [shard_packed_batch(logits, labels, cu_seqlens, cp_size, r, 0) for r in range(cp_size)]
    count = sum((s["labels"] != IGNORE_INDEX).sum() for s in shards)  # the all-reduced normaliser
    assert count == (labels != IGNORE_INDEX).sum() == (whole["labels"] != IGNORE_INDEX).sum()
    split = sum(mlm_loss(s["input_ids"], s["labels"], reduction="sum") for s in shards) / count
    torch.testing.assert_close(split, unsplit, rtol=1e-6, atol=0)  # mlm_loss computes in FP32


@settings(max_examples=25, deadline=None)
@given(BATCHES, st.sampled_from([8, 16, 32, 128]))
def test_each_shard_meets_the_precisions_token_multiple_and_still_reassembles(batch, token_multiple):
    lengths, cp_size, seed = batch
    input_ids, labels, cu_seqlens = packed_batch(lengths, seed)
    collated = {"input_ids": input_ids[None], "labels": labels[None], "cu_seqlens": cu_seqlens, "max_seqlen": 0}
    shards = [shard_collated_batch(collated, cp_size, r, PAD, token_multiple) for r in range(cp_size)]
    padded = shards[0]["cu_seqlens_padded"]
    sizes = padded.diff()
    assert all(s["input_ids"].shape == (1, int(padded[-1]) // cp_size) for s in shards)
    assert shards[0]["input_ids"].shape[1] % token_multiple == 0 and (sizes % (2 * cp_size) == 0).all()
    assert (sizes[:-1] - cu_seqlens.diff()[:-1] < 2 * cp_size).all()  # only the last sequence takes the extra padding
    assert shards[0]["max_seqlen"] == int(sizes.max()) and padded.dtype == cu_seqlens.dtype == torch.int32
    assert all(s["local_cu_seqlens"].dtype == torch.int32 for s in shards)
    for key in ("input_ids", "labels"):
        whole = gather_shards([s[key][0] for s in shards], padded)
        real = pad_sequences(input_ids, labels, cu_seqlens, cp_size, PAD)[key]  # the same, up to the extra padding
        assert (
            torch.equal(whole[: len(real)], real)
            and (whole[len(real) :] == (PAD if key == "input_ids" else IGNORE_INDEX)).all()
        )
