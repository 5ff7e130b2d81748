"""Turn tokenized sequences into masked-language-model batches.

`MLMMasker` crops and masks one sequence at a time, with randomness drawn from (seed, epoch, sequence content) alone:
the same sequence gets the same crop and mask in an epoch whichever rank, worker, batch or packing it lands in. That
makes runs reproducible under a seed, resumes exact, and lets padded (BSHD) and packed (THD) batches of the same
sequences be compared token for token.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100
CANONICAL_AMINO_ACIDS = "LAGVSERTIDPKQNFYMHWC"  # the 20 standard residues: what a random replacement draws from


class MLMMasker:
    """Crop a tokenized sequence to `max_seq_length` and apply BERT-style masking to its residues.

    Of the non-special tokens, `mlm_probability` are selected (at least one per sequence, so no batch has an empty
    loss); selected tokens become `<mask>` 80% of the time, a random amino acid 10% and stay unchanged 10%. Labels
    hold the original id at selected positions and -100 elsewhere. Special tokens (`<cls>`, `<eos>`, `<pad>`,
    `<unk>`, `<mask>`) are never selected.
    """

    def __init__(
        self,
        *,
        mask_token_id: int,
        special_token_ids: Sequence[int],
        random_token_ids: Sequence[int],
        max_seq_length: int,
        mlm_probability: float = 0.15,
        crop: str = "random",
        seed: int = 0,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={mlm_probability} must lie strictly between 0 and 1.")
        if crop not in ("random", "head"):
            raise ValueError(f"crop={crop!r} must be 'random' (ESM-2's random window) or 'head'.")
        if max_seq_length < 3:
            raise ValueError(f"max_seq_length={max_seq_length} leaves no room for a residue between <cls> and <eos>.")
        self.mask_token_id = mask_token_id
        self.special_token_ids = np.asarray(sorted(set(special_token_ids)), dtype=np.int64)
        self.random_token_ids = np.asarray(random_token_ids, dtype=np.int64)
        self.max_seq_length = max_seq_length
        self.mlm_probability = mlm_probability
        self.crop = crop
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> MLMMasker:
        """A masker using the tokenizer's special tokens and its ids for the 20 canonical amino acids."""
        return cls(
            mask_token_id=tokenizer.mask_token_id,
            special_token_ids=tokenizer.all_special_ids,
            random_token_ids=tokenizer.convert_tokens_to_ids(list(CANONICAL_AMINO_ACIDS)),
            **kwargs,
        )

    def rng_for(self, tokens: np.ndarray) -> np.random.Generator:
        """The random stream of one sequence in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, zlib.crc32(tokens.astype(np.int32).tobytes())])

    def crop_tokens(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Keep `<cls>`/`<eos>` and a window of at most `max_seq_length - 2` residues (random or leading)."""
        if len(tokens) <= self.max_seq_length:
            return tokens
        window = self.max_seq_length - 2
        start = 1 + (int(rng.integers(0, len(tokens) - 2 - window + 1)) if self.crop == "random" else 0)
        return np.concatenate([tokens[:1], tokens[start : start + window], tokens[-1:]])

    def __call__(self, input_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Return (masked input ids, labels) for one sequence, both int64 of the cropped length."""
        tokens = np.asarray(input_ids, dtype=np.int64)
        rng = self.rng_for(tokens)
        tokens = self.crop_tokens(tokens, rng)
        maskable = ~np.isin(tokens, self.special_token_ids)
        draws = rng.random((2, len(tokens)))
        selected = maskable & (draws[0] < self.mlm_probability)
        if maskable.any() and not selected.any():
            selected[rng.choice(np.flatnonzero(maskable))] = True
        labels = np.where(selected, tokens, IGNORE_INDEX)
        masked = tokens.copy()
        masked[selected & (draws[1] < 0.8)] = self.mask_token_id
        replace = selected & (draws[1] >= 0.8) & (draws[1] < 0.9)
        masked[replace] = rng.choice(self.random_token_ids, size=int(replace.sum()))
        return masked, labels


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class BSHDCollator:
    """Padded [batch, sequence] batches: pad to the longest sequence rounded up to `pad_to_multiple_of`.

    With `pad_to_length` set, every batch is padded to that length instead (what the reference recipe does with
    `max_seq_length`; it wastes compute but keeps shapes static).
    """

    def __init__(
        self, masker: MLMMasker, pad_token_id: int, pad_to_multiple_of: int = 8, pad_to_length: int | None = None
    ) -> None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be at least 1.")
        self.masker = masker
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to_length = pad_to_length

    def set_epoch(self, epoch: int) -> None:
        self.masker.epoch = epoch

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        masked = [self.masker(sample["input_ids"]) for sample in samples]
        longest = max(len(ids) for ids, _ in masked)
        length = self.pad_to_length or round_up(longest, self.pad_to_multiple_of)
        input_ids = np.full((len(masked), length), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(masked), length), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((len(masked), length), dtype=np.int64)
        for row, (ids, lab) in enumerate(masked):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = lab
            attention_mask[row, : len(ids)] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }


class THDCollator:
    """Packed batches: sequences concatenated into one [1, T] row with `cu_seqlens` marking where each starts.

    T is padded to `token_multiple` (what the precision recipe needs, see precision.py) with pad tokens that form
    their own final segment: they attend only to each other and carry label -100, so they never touch real tokens
    or the loss. An empty list of samples (a rank's filler batch at the end of an epoch) gives a batch of padding
    only, which contributes nothing to the loss or the gradients.
    """

    def __init__(self, masker: MLMMasker, pad_token_id: int, token_multiple: int = 8) -> None:
        if token_multiple < 1:
            raise ValueError(f"token_multiple={token_multiple} must be at least 1.")
        self.masker = masker
        self.pad_token_id = pad_token_id
        self.token_multiple = token_multiple

    def set_epoch(self, epoch: int) -> None:
        self.masker.epoch = epoch

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        masked = [self.masker(sample["input_ids"]) for sample in samples]
        lengths = [len(ids) for ids, _ in masked]
        total = sum(lengths)
        padding = round_up(max(total, 1), self.token_multiple) - total
        if padding:
            lengths.append(padding)
            masked.append(
                (np.full(padding, self.pad_token_id, dtype=np.int64), np.full(padding, IGNORE_INDEX, dtype=np.int64))
            )
        cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        return {
            "input_ids": torch.from_numpy(np.concatenate([ids for ids, _ in masked])).unsqueeze(0),
            "labels": torch.from_numpy(np.concatenate([labels for _, labels in masked])).unsqueeze(0),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": max(lengths),
        }


def pack_by_token_budget(items: Iterable[tuple[Any, int]], token_budget: int) -> Iterator[list[Any]]:
    """Greedily group (item, length) pairs, in order, into packs whose lengths sum to at most `token_budget`."""
    pack: list[Any] = []
    used = 0
    for item, length in items:
        if pack and used + length > token_budget:
            yield pack
            pack, used = [], 0
        pack.append(item)
        used += length
    if pack:
        yield pack


class PackedBatchSampler:
    """Batch sampler packing one global, per-epoch permutation of a map-style dataset into token-budget batches.

    Every rank walks the same permutation and builds the same sequence of packs; rank r takes packs r, r + W, ...
    So progress is one number for all ranks (packs consumed), a resume on another number of ranks continues with no
    sequence repeated or skipped, and no sequence is ever dropped: if the last round of packs is shorter than W, the
    ranks left without one get an empty pack (a batch of padding) so collective operations stay in step.
    Packing needs only the lengths, so it costs a pass over integers, done lazily as batches are drawn.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        token_budget: int,
        max_seq_length: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if max_seq_length > token_budget:
            raise ValueError(f"token_budget={token_budget} is below max_seq_length={max_seq_length}.")
        self.lengths = np.minimum(np.asarray(lengths), max_seq_length)
        self.token_budget, self.rank, self.world_size = token_budget, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation and how many of its packs all ranks together have consumed."""
        self.epoch, self.start = epoch, start

    def permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.lengths), generator=generator).numpy()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        packs = pack_by_token_budget(zip(order.tolist(), self.lengths[order].tolist(), strict=True), self.token_budget)
        index = -1
        for index, pack in enumerate(packs):
            if index >= self.start and (index - self.start) % self.world_size == self.rank:
                yield pack
        remaining = index + 1 - self.start
        if remaining > 0 and self.rank >= remaining % self.world_size > 0:
            yield []


class PackedStream(torch.utils.data.IterableDataset):
    """Token-budget packs from a streaming dataset (this rank's shard), resumable mid-epoch.

    Its state is the source dataset's position plus the sequence that overflowed the last pack and opens the next
    one, so a `StatefulDataLoader` restores it exactly (up to the source's own guarantees: a shuffle buffer's
    contents are not saved by `datasets`).
    """

    def __init__(self, source: Any, token_budget: int, max_seq_length: int) -> None:
        if max_seq_length > token_budget:
            raise ValueError(f"token_budget={token_budget} is below max_seq_length={max_seq_length}.")
        self.source, self.token_budget, self.max_seq_length = source, token_budget, max_seq_length
        self._carry: list[dict[str, Any]] = []

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        pack, used = self._carry, sum(min(len(s["input_ids"]), self.max_seq_length) for s in self._carry)
        for sample in self.source:
            length = min(len(sample["input_ids"]), self.max_seq_length)
            if pack and used + length > self.token_budget:
                self._carry = [sample]
                yield pack
                pack, used = self._carry, length
            else:
                pack.append(sample)
                used += length
        self._carry = []
        if pack:
            yield pack

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "carry": list(self._carry)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self._carry = list(state["carry"])
