"""Sequence packing (THD) and precision-derived padding: property tests over random length distributions."""

import itertools

import datasets
import numpy as np
import pytest
import torch
from conftest import compose
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

from collator import IGNORE_INDEX, MLMMasker, PackedBatchSampler, PackedStream, THDCollator, pack_by_token_budget
from config_validation import ConfigError, validate_config
from dataset import DataConfigError, build_collator, build_dataloaders, token_budget
from distributed import DistributedContext
from model import load_model_config
from precision import FP8_RECIPES, PrecisionConfigError, check_gpu_supports, precision_problems, token_multiple

lengths_strategy = st.lists(st.integers(min_value=3, max_value=300), min_size=1, max_size=120)


def make_masker(tokenizer, max_seq_length=128):
    return MLMMasker.from_tokenizer(tokenizer, max_seq_length=max_seq_length, seed=1)


def fake_tokens(length, index):
    """A distinct <cls> ... <eos> token list of `length` whose residues encode `index`."""
    rng = np.random.default_rng(index)
    return [0, *rng.integers(4, 24, size=length - 2).tolist(), 2]


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_strategy, world_size=st.integers(1, 4), budget=st.integers(128, 1024), epoch=st.integers(0, 3))
def test_packed_sampler_uses_every_sequence_once_within_budget(lengths, world_size, budget, epoch):
    max_len = 128
    per_rank = []
    for rank in range(world_size):
        sampler = PackedBatchSampler(np.array(lengths), budget, max_len, rank, world_size, seed=5)
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
@given(lengths=lengths_strategy, old_world=st.integers(1, 4), new_world=st.integers(1, 4), cut=st.integers(0, 40))
def test_packed_sampler_resumes_on_another_world_size_without_repeats_or_gaps(lengths, old_world, new_world, cut):
    def run(world, start, steps=None):
        out = []
        for rank in range(world):
            sampler = PackedBatchSampler(np.array(lengths), 256, 128, rank, world, seed=2)
            sampler.set_epoch(0, start=start)
            out.append(list(sampler)[:steps])
        return out

    steps = min(cut, min(len(p) for p in run(old_world, 0)))
    before = run(old_world, 0, steps)
    after = run(new_world, steps * old_world)
    seen = [i for packs in before + after for pack in packs for i in pack]
    assert sorted(seen) == list(range(len(lengths)))


@pytest.mark.parametrize("recipe", [None, *FP8_RECIPES])
@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(3, 200), min_size=0, max_size=20))
def test_thd_collator_layout_and_padding(tokenizer, recipe, lengths):
    overrides = [] if recipe is None else ["fp8_config.enabled=true", f"fp8_config.recipe={recipe}"]
    multiple = token_multiple(compose("L0_sanity", overrides))
    assert multiple == (8 if recipe is None else max(16, FP8_RECIPES[recipe].token_multiple))
    collator = THDCollator(make_masker(tokenizer, max_seq_length=256), tokenizer.pad_token_id, multiple)
    samples = [{"input_ids": fake_tokens(n, i)} for i, n in enumerate(lengths)]
    batch = collator(samples)
    ids, labels, cu = batch["input_ids"][0], batch["labels"][0], batch["cu_seqlens"]
    total = sum(lengths)
    assert ids.shape == labels.shape and ids.numel() % multiple == 0
    assert ids.numel() - total < multiple or (total == 0 and ids.numel() == multiple)  # an empty pack: padding only
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == ids.numel()
    seqlens = torch.diff(cu).tolist()
    assert seqlens[: len(lengths)] == lengths
    assert batch["max_seqlen"] == max(seqlens)
    for index, (start, n) in enumerate(zip(cu.tolist(), lengths, strict=False)):
        original = torch.tensor(samples[index]["input_ids"])
        restored = torch.where(
            labels[start : start + n] != IGNORE_INDEX, labels[start : start + n], ids[start : start + n]
        )
        torch.testing.assert_close(restored, original)
    padding = slice(total, None)
    assert (ids[padding] == tokenizer.pad_token_id).all() and (labels[padding] == IGNORE_INDEX).all()
    if total % multiple:
        assert len(seqlens) == len(lengths) + 1  # the padding is its own segment


def test_packed_and_padded_batches_carry_the_same_tokens_and_labels(tokenizer):
    cfg_thd = compose("L0_sanity", ["use_sequence_packing=true", "dataset.max_seq_length=128"])
    cfg_bshd = compose("L0_sanity", ["dataset.max_seq_length=128"])
    samples = [{"input_ids": fake_tokens(n, i)} for i, n in enumerate([50, 128, 300, 7])]
    thd = build_collator(cfg_thd, tokenizer, seed=3)(samples)
    bshd = build_collator(cfg_bshd, tokenizer, seed=3)(samples)
    real = bshd["attention_mask"].bool()
    n = int(real.sum())
    torch.testing.assert_close(thd["input_ids"][0, :n], bshd["input_ids"][real])
    torch.testing.assert_close(thd["labels"][0, :n], bshd["labels"][real])


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


def streaming_source(lengths):
    records = [{"input_ids": fake_tokens(n, i)} for i, n in enumerate(lengths)]
    return datasets.Dataset.from_list(records).to_iterable_dataset(num_shards=1)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_packed_stream_resumes_mid_epoch_with_the_same_batches(tokenizer, num_workers):
    lengths = np.random.default_rng(0).integers(10, 200, size=150).tolist()
    collator = THDCollator(make_masker(tokenizer), tokenizer.pad_token_id, 16)

    def loader():
        stream = PackedStream(streaming_source(lengths), token_budget=512, max_seq_length=128)
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


def test_packed_stream_never_drops_or_duplicates(tokenizer):
    lengths = np.random.default_rng(1).integers(10, 300, size=90).tolist()
    stream = PackedStream(streaming_source(lengths), token_budget=400, max_seq_length=128)
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
    stream, _ = build_dataloaders(cfg, CPU, tokenizer)
    batches = iter(stream)
    head = [next(batches) for _ in range(5)]
    state = stream.state_dict()
    tail = [next(batches) for _ in range(5)]
    assert all(b["input_ids"].shape[1] <= 1024 and b["input_ids"].shape[1] % 8 == 0 for b in head + tail)
    fresh, _ = build_dataloaders(cfg, CPU, tokenizer)
    fresh.load_state_dict(state)
    resumed = iter(fresh)
    for expected in tail:
        actual = next(resumed)
        torch.testing.assert_close(actual["input_ids"], expected["input_ids"])
        torch.testing.assert_close(actual["labels"], expected["labels"])


def test_padding_fraction_of_packed_batches_is_small(tokenizer):
    """On the real sample proteome (median ~280 residues), packs of 8k tokens waste well under 1%."""
    cfg = compose("L0_sanity", ["use_sequence_packing=true", "dataset.max_seq_length=1024", "dataset.num_workers=0"])
    stream, _ = build_dataloaders(cfg, CPU, tokenizer)
    batches = iter(stream)
    real = padded = 0
    for _ in range(60):
        batch = next(batches)
        real += int((batch["input_ids"] != tokenizer.pad_token_id).sum())
        padded += batch["input_ids"].numel()
    budget = token_budget(cfg)
    assert budget == 8 * 1024
    assert 1 - real / padded < 0.01  # padding to the precision multiple
    assert real / (60 * budget) > 0.95  # and the budget itself is well used


def test_budget_smaller_than_a_sequence_is_refused():
    cfg = compose("L0_sanity", ["use_sequence_packing=true", "token_micro_batch_size=100"])
    with pytest.raises(DataConfigError, match=r"cannot hold one sequence of dataset\.max_seq_length=256"):
        token_budget(cfg)
    with pytest.raises(ConfigError, match="token_micro_batch_size=100: must be a token count of at least"):
        validate_config(cfg, load_model_config(cfg.model_tag), use_te=True)


def test_budget_is_rounded_to_the_recipe_multiple():
    cfg = compose(
        "L0_sanity",
        ["precision=fp8_block_thd", "token_micro_batch_size=1000", "dataset.max_seq_length=512"],
    )
    assert token_budget(cfg) == 896  # multiple of 128


def test_unknown_recipe_and_reference_model_packing_are_refused():
    cfg = compose(
        "L0_sanity", ["fp8_config.enabled=true", "fp8_config.recipe=Float4Magic", "use_sequence_packing=true"]
    )
    problems = precision_problems(cfg, use_te=False)
    assert any("use_sequence_packing=true needs the TransformerEngine model" in p and "use_te" in p for p in problems)
    assert any("fp8_config.recipe='Float4Magic' is not one of" in p for p in problems)
    with pytest.raises(ConfigError, match="Float4Magic"):
        validate_config(cfg, load_model_config(cfg.model_tag), use_te=True)


def test_mxfp8_on_hopper_is_refused_with_the_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    with pytest.raises(
        PrecisionConfigError, match=r"Blackwell.*10\.0 or newer.*H100 80GB HBM3 has compute capability 9\.0"
    ):
        check_gpu_supports("MXFP8BlockScaling", torch.device("cuda", 0))
    check_gpu_supports("Float8BlockScaling", torch.device("cuda", 0))  # Hopper runs block scaling
