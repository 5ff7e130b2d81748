"""Masking statistics, cropping, padded (BSHD) and packed (THD) batches, and the batch layout they follow."""

import math

import numpy as np
import pytest
import torch
from conftest import compose, read_fasta_sequences
from hypothesis import given, settings
from hypothesis import strategies as st

from collator import (
    CANONICAL_AMINO_ACIDS,
    IGNORE_INDEX,
    BatchLayout,
    BatchLayoutError,
    BSHDCollator,
    MLMMasker,
    StaticPacking,
    THDCollator,
    build_collator,
)
from precision import FP8_RECIPES, token_multiple


@pytest.fixture(scope="module")
def sample_ids(tokenizer):
    return tokenizer(read_fasta_sequences(400))["input_ids"]


def fake_tokens(length, index):
    """A distinct <cls> ... <eos> token list of `length` whose residues encode `index`."""
    rng = np.random.default_rng(index)
    return [0, *rng.integers(4, 24, size=length - 2).tolist(), 2]


def make_masker(tokenizer, **kwargs):
    options = {"max_seq_length": 1024, "seed": 7} | kwargs
    return MLMMasker.from_tokenizer(tokenizer, **options)


# Masking shares are binomial: with n draws at rate p the observed share has standard error sqrt(p(1-p)/n). Each is
# checked to within SIGMAS standard errors (two-sided; the real code is outside that once in ~150,000 samplings, and
# the seeds are fixed, so it never flakes). MASKING_EPOCHS passes over 400 sample sequences select ~148,000 of ~990,000
# residues: one standard error of the 80% <mask> share is 0.0010, the tolerance 0.0047, so a 79% or 81% share (8-11
# standard errors away) fails; the 10% shares and the 15% selection rate are resolved even more finely.
SIGMAS = 4.5
MASKING_EPOCHS = 8


def binomial_tolerance(p, trials):
    return SIGMAS * math.sqrt(p * (1 - p) / trials)


def assert_share(hits, trials, p, what):
    tolerance = binomial_tolerance(p, trials)
    share = hits / trials
    assert abs(share - p) <= tolerance, f"{what}: {share:.5f} of {trials} draws, expected {p:.5f} ± {tolerance:.5f}"


def test_masking_rates_match_bert_recipe(tokenizer, sample_ids):
    masker = make_masker(tokenizer, crop="head")
    rate = masker.mlm_probability
    canonical_ids = tokenizer.convert_tokens_to_ids(list(CANONICAL_AMINO_ACIDS))
    originals = [np.asarray(ids[:1023] + ids[-1:] if len(ids) > 1024 else ids) for ids in sample_ids]
    residues = np.asarray([(~np.isin(ids, tokenizer.all_special_ids)).sum() for ids in originals])
    original = np.concatenate(originals)
    canonical = np.isin(original, canonical_ids)  # residues a random replacement could draw again
    maskable = MASKING_EPOCHS * int(residues.sum())
    # E[max(Binomial(n, p), 1)] = np + (1 - p)^n: each sequence gets one selected residue at least
    expected_selected = MASKING_EPOCHS * float((residues * rate + (1 - rate) ** residues).sum())
    selected = masked = canonical_selected = randomised = kept = 0
    for epoch in range(MASKING_EPOCHS):
        rows = [masker(ids, epoch) for ids in sample_ids]
        inputs, labels = (np.concatenate([row[part] for row in rows]) for part in (0, 1))
        chosen = labels != IGNORE_INDEX
        np.testing.assert_array_equal(labels[chosen], original[chosen])
        changed = chosen & (inputs != original) & (inputs != tokenizer.mask_token_id)
        assert np.isin(inputs[changed], canonical_ids).all()
        selected += int(chosen.sum())
        masked += int((chosen & (inputs == tokenizer.mask_token_id)).sum())
        canonical_selected += int((chosen & canonical).sum())
        randomised += int((changed & canonical).sum())
        kept += int((chosen & canonical & (inputs == original)).sum())
    assert binomial_tolerance(0.8, selected) < 0.005  # the sample is large enough to tell 79% from 80%
    assert_share(selected, maskable, expected_selected / maskable, "selected residues")
    assert_share(masked, selected, 0.80, "<mask> share")
    # a random replacement draws the original residue 1 time in 20: it then counts as kept
    assert_share(randomised, canonical_selected, 0.10 * 19 / 20, "random-residue share")
    assert_share(kept, canonical_selected, 0.10 + 0.10 / 20, "unchanged share")


def test_special_tokens_are_never_masked_or_labelled(tokenizer):
    masker = make_masker(tokenizer, mlm_probability=0.9)
    ids = tokenizer("MK<unk>TAY<mask>IAK")["input_ids"]
    specials = np.isin(ids, tokenizer.all_special_ids)
    for epoch in range(50):
        masker.epoch = epoch
        inputs, labels = masker(ids)
        assert (labels[specials] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(inputs[specials], np.asarray(ids)[specials])


def test_every_sequence_gets_at_least_one_label(tokenizer):
    masker = make_masker(tokenizer, mlm_probability=0.01)
    for seq in ["M", "MK", "ACDE"]:
        _, labels = masker(tokenizer(seq)["input_ids"])
        assert (labels != IGNORE_INDEX).sum() >= 1


def test_masking_is_reproducible_and_changes_each_epoch(tokenizer, sample_ids):
    ids = sample_ids[0]
    first = make_masker(tokenizer)(ids)
    again = make_masker(tokenizer)(ids)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    next_epoch = make_masker(tokenizer)
    next_epoch.epoch = 1
    assert not np.array_equal(next_epoch(ids)[1], first[1])
    other_seed = make_masker(tokenizer, seed=8)
    assert not np.array_equal(other_seed(ids)[1], first[1])


def test_crop_keeps_cls_and_eos_and_a_contiguous_window(tokenizer):
    sequence = "".join(np.random.default_rng(0).choice(list(CANONICAL_AMINO_ACIDS), 300))
    ids = tokenizer(sequence)["input_ids"]
    for crop in ("random", "head"):
        masker = make_masker(tokenizer, max_seq_length=50, crop=crop, mlm_probability=0.01)
        starts = set()
        for epoch in range(20):
            masker.epoch = epoch
            inputs, labels = masker(ids)
            original = np.where(labels != IGNORE_INDEX, labels, inputs)
            assert len(inputs) == 50 and original[0] == 0 and original[-1] == 2
            window = tokenizer.decode(original[1:-1]).replace(" ", "")
            assert window in sequence
            starts.add(sequence.index(window))
        assert starts == {0} if crop == "head" else len(starts) > 10


def test_bshd_batch_padding_and_masks(tokenizer, sample_ids):
    collator = BSHDCollator(make_masker(tokenizer), tokenizer.pad_token_id, pad_to_multiple_of=16)
    samples = [{"input_ids": ids} for ids in sample_ids[:5]]
    batch = collator(samples)
    longest = max(len(ids) for ids in sample_ids[:5])
    assert batch["input_ids"].shape == (5, -(-longest // 16) * 16)
    assert batch["input_ids"].dtype == torch.long
    lengths = torch.tensor([len(ids) for ids in sample_ids[:5]])
    torch.testing.assert_close(batch["attention_mask"].sum(1), lengths)
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    # masking is per sequence: the same sequence in another batch gets the same inputs and labels
    alone = collator(samples[2:3])
    row = slice(0, len(sample_ids[2]))
    torch.testing.assert_close(alone["labels"][0, row], batch["labels"][2, row])


def test_pad_to_fixed_length(tokenizer, sample_ids):
    collator = BSHDCollator(make_masker(tokenizer, max_seq_length=128), tokenizer.pad_token_id, pad_to_length=128)
    assert collator([{"input_ids": sample_ids[0]}])["input_ids"].shape == (1, 128)


def test_bad_masker_arguments(tokenizer):
    with pytest.raises(ValueError, match="mlm_probability"):
        make_masker(tokenizer, mlm_probability=0.0)
    with pytest.raises(ValueError, match="crop"):
        make_masker(tokenizer, crop="tail")
    with pytest.raises(ValueError, match="max_seq_length"):
        make_masker(tokenizer, max_seq_length=2)


@pytest.mark.parametrize("recipe", [None, *FP8_RECIPES])
@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(3, 200), min_size=0, max_size=20))
def test_thd_collator_layout_and_padding(tokenizer, recipe, lengths):
    overrides = [] if recipe is None else ["fp8_config.enabled=true", f"fp8_config.recipe={recipe}"]
    multiple = token_multiple(compose("L0_sanity", overrides))
    assert multiple == (8 if recipe is None else max(16, FP8_RECIPES[recipe].token_multiple))
    collator = THDCollator(make_masker(tokenizer, max_seq_length=256, seed=1), tokenizer.pad_token_id, multiple)
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


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(3, 256), min_size=0, max_size=12),
    max_seqlen=st.sampled_from([64, 128, 256]),
    spare_slots=st.integers(0, 5),
)
def test_static_packing_carries_todays_sequences_labels_and_loss_weights(tokenizer, lengths, max_seqlen, spare_slots):
    """A static batch holds exactly the dynamic batch's sequences and labels, in fixed shapes TE can attend over."""
    lengths = [min(n, max_seqlen) for n in lengths]
    tokens = round_up_to(max(sum(lengths), 1), 16) + 16 * spare_slots
    static = StaticPacking(tokens=tokens, max_sequences=len(lengths) + spare_slots, max_seqlen=max_seqlen)
    samples = [{"input_ids": fake_tokens(n, i)} for i, n in enumerate(lengths)]
    masker = make_masker(tokenizer, max_seq_length=max_seqlen, seed=4)
    dynamic = THDCollator(masker, tokenizer.pad_token_id, 16)(samples)
    fixed = THDCollator(masker, tokenizer.pad_token_id, 16, static)(samples)

    assert fixed["input_ids"].shape == fixed["labels"].shape == (1, tokens)
    assert fixed["cu_seqlens"].shape == (static.segments + 1,) and fixed["cu_seqlens"].dtype == torch.int32
    assert fixed["max_seqlen"] == max_seqlen
    seqlens = torch.diff(fixed["cu_seqlens"]).tolist()
    assert seqlens[: len(lengths)] == lengths and all(0 <= n <= max_seqlen for n in seqlens)
    assert fixed["cu_seqlens"][-1] == tokens and sum(seqlens) == tokens
    total = sum(lengths)
    torch.testing.assert_close(fixed["input_ids"][0, :total], dynamic["input_ids"][0, :total])
    torch.testing.assert_close(fixed["labels"][0, :total], dynamic["labels"][0, :total])
    assert (fixed["input_ids"][0, total:] == tokenizer.pad_token_id).all()
    assert (fixed["labels"][0, total:] == IGNORE_INDEX).all()  # padding weighs nothing in the loss
    assert int((fixed["labels"] != IGNORE_INDEX).sum()) == int((dynamic["labels"] != IGNORE_INDEX).sum())
    assert seqlens[len(lengths) :] == sorted(seqlens[len(lengths) :], reverse=True)  # padding, then empty slots


def round_up_to(value, multiple):
    return -(-value // multiple) * multiple


def test_static_packing_refuses_a_pack_beyond_its_shape(tokenizer):
    static = StaticPacking(tokens=64, max_sequences=2, max_seqlen=32)
    collator = THDCollator(make_masker(tokenizer, max_seq_length=32), tokenizer.pad_token_id, 16, static)
    with pytest.raises(ValueError, match="3 sequences and 30 tokens exceeds the static shape"):
        collator([{"input_ids": fake_tokens(10, i)} for i in range(3)])


def test_static_layout_comes_from_static_shapes_or_cuda_graphs():
    base = ["use_sequence_packing=true", "token_micro_batch_size=4096", "dataset.max_seq_length=512"]
    assert BatchLayout.from_config(compose("L0_sanity", base)).static is None
    layout = BatchLayout.from_config(compose("L0_sanity", [*base, "static_shapes=true"]))
    assert layout.static == StaticPacking(tokens=4096, max_sequences=4096 // 256, max_seqlen=512)
    assert layout.static.segments == 16 + 8 and layout.max_sequences == 16
    graphs = BatchLayout.from_config(compose("L0_sanity", [*base, "cuda_graphs=true", "max_sequences_per_pack=20"]))
    assert graphs.static == StaticPacking(tokens=4096, max_sequences=20, max_seqlen=512)
    assert BatchLayout.from_config(compose("L0_sanity", [*base, "max_sequences_per_pack=5"])).max_sequences == 5


def test_packed_and_padded_batches_carry_the_same_tokens_and_labels(tokenizer):
    cfg_thd = compose("L0_sanity", ["use_sequence_packing=true", "dataset.max_seq_length=128"])
    cfg_bshd = compose("L0_sanity", ["dataset.max_seq_length=128"])
    samples = [{"input_ids": fake_tokens(n, i)} for i, n in enumerate([50, 128, 300, 7])]
    thd = build_collator(cfg_thd.dataset, BatchLayout.from_config(cfg_thd), tokenizer, seed=3)(samples)
    bshd = build_collator(cfg_bshd.dataset, BatchLayout.from_config(cfg_bshd), tokenizer, seed=3)(samples)
    real = bshd["attention_mask"].bool()
    n = int(real.sum())
    torch.testing.assert_close(thd["input_ids"][0, :n], bshd["input_ids"][real])
    torch.testing.assert_close(thd["labels"][0, :n], bshd["labels"][real])


def test_budget_smaller_than_a_sequence_is_refused():
    cfg = compose("L0_sanity", ["use_sequence_packing=true", "token_micro_batch_size=100"])
    with pytest.raises(BatchLayoutError, match=r"cannot hold one sequence of dataset\.max_seq_length=256"):
        BatchLayout.from_config(cfg)


def test_budget_is_rounded_to_the_recipe_multiple():
    cfg = compose(
        "L0_sanity",
        [
            "precision=fp8_block",
            "use_sequence_packing=true",
            "token_micro_batch_size=1000",
            "dataset.max_seq_length=512",
        ],
    )
    layout = BatchLayout.from_config(cfg)
    assert layout.token_budget == 896 and layout.packed and layout.attn_input_format == "thd"  # multiple of 128
