"""Turn tokenized sequences into masked-language-model batches: masking, padded (BSHD) and packed (THD) collators.

`MLMMasker` crops and masks one sequence at a time, with randomness drawn from (seed, epoch, sequence content) alone:
the same sequence gets the same crop and mask in an epoch whichever rank, worker, batch or packing it lands in. That
makes runs reproducible under a seed, resumes exact, and lets padded (BSHD) and packed (THD) batches of the same
sequences be compared token for token.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from errors import RecipeError
from precision import round_up, token_multiple

IGNORE_INDEX = -100
# Static packed batches cap a pack at token_budget // this many sequences unless max_sequences_per_pack says otherwise:
# attention kernels launch work per segment slot, used or not, so every batch pays for the cap (at 650M, 16k tokens,
# one H200 run with a cap of 128 was 12% slower than dynamic packing); 256 still fits the sample proteome's packs.
STATIC_TOKENS_PER_SEQUENCE = 256
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

    def rng_for(self, tokens: np.ndarray, epoch: int | None = None) -> np.random.Generator:
        """The random stream of one sequence in `epoch` (default: the masker's current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        return np.random.default_rng([self.seed, epoch, zlib.crc32(tokens.astype(np.int32).tobytes())])

    def crop_tokens(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Keep `<cls>`/`<eos>` and a window of at most `max_seq_length - 2` residues (random or leading)."""
        if len(tokens) <= self.max_seq_length:
            return tokens
        window = self.max_seq_length - 2
        start = 1 + (int(rng.integers(0, len(tokens) - 2 - window + 1)) if self.crop == "random" else 0)
        return np.concatenate([tokens[:1], tokens[start : start + window], tokens[-1:]])

    def __call__(self, input_ids: Sequence[int], epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (masked input ids, labels) for one sequence in `epoch`, both int64 of the cropped length.

        `epoch` defaults to the masker's own (`set_epoch` of its collator); a sample drawn by the loader carries the
        epoch it was drawn in, so worker processes that outlive an epoch still mask it as that epoch's.
        """
        tokens = np.asarray(input_ids, dtype=np.int64)
        rng = self.rng_for(tokens, epoch)
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
        masked = [self.masker(sample["input_ids"], sample.get("epoch")) for sample in samples]
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

    With `static` set, every batch has the same shapes whatever its sequences, as CUDA graphs need (and as fused
    attention likes, since its plans are cached per shape): T is always `static.tokens`, the padding is split into
    segments of at most `static.max_seqlen` tokens, `cu_seqlens` always has `static.segments + 1` entries (the unused
    ones repeat T: zero-length segments) and `max_seqlen` is always `static.max_seqlen`.
    """

    def __init__(
        self, masker: MLMMasker, pad_token_id: int, token_multiple: int = 8, static: StaticPacking | None = None
    ) -> None:
        if token_multiple < 1:
            raise ValueError(f"token_multiple={token_multiple} must be at least 1.")
        self.masker = masker
        self.pad_token_id = pad_token_id
        self.token_multiple = token_multiple
        self.static = static

    def set_epoch(self, epoch: int) -> None:
        self.masker.epoch = epoch

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        masked = [self.masker(sample["input_ids"], sample.get("epoch")) for sample in samples]
        lengths = [len(ids) for ids, _ in masked]
        total = sum(lengths)
        if self.static is None:
            padding = [round_up(max(total, 1), self.token_multiple) - total]
        else:
            padding = self.static.padding_segments(len(lengths), total)
        for size in (size for size in padding if size):
            lengths.append(size)
            masked.append(
                (np.full(size, self.pad_token_id, dtype=np.int64), np.full(size, IGNORE_INDEX, dtype=np.int64))
            )
        entries = len(lengths) + 1 if self.static is None else self.static.segments + 1
        cu_seqlens = np.full(entries, sum(lengths), dtype=np.int32)
        cu_seqlens[0] = 0
        np.cumsum(lengths, out=cu_seqlens[1 : len(lengths) + 1])
        return {
            "input_ids": torch.from_numpy(np.concatenate([ids for ids, _ in masked])).unsqueeze(0),
            "labels": torch.from_numpy(np.concatenate([labels for _, labels in masked])).unsqueeze(0),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": max(lengths) if self.static is None else self.static.max_seqlen,
        }


@dataclass(frozen=True)
class StaticPacking:
    """The fixed shapes of static packed batches.

    `tokens` per batch, at most `max_sequences` real sequences and segments of at most `max_seqlen` tokens, so
    `segments` bounds the real plus the padding segments.
    """

    tokens: int
    max_sequences: int
    max_seqlen: int

    @property
    def segments(self) -> int:
        return self.max_sequences + -(-self.tokens // self.max_seqlen)

    def padding_segments(self, sequences: int, total: int) -> list[int]:
        """Sizes of the padding segments that fill a pack of `sequences` sequences and `total` tokens."""
        if sequences > self.max_sequences or total > self.tokens:
            raise ValueError(
                f"A pack of {sequences} sequences and {total} tokens exceeds the static shape ({self.max_sequences} "
                f"sequences, {self.tokens} tokens): the packer and the collator disagree."
            )
        padding = self.tokens - total
        full, rest = divmod(padding, self.max_seqlen)
        return [self.max_seqlen] * full + ([rest] if rest else [])


class BatchLayoutError(RecipeError, ValueError):
    """The batch settings cannot work together; the message says what to change."""


@dataclass(frozen=True)
class BatchLayout:
    """How a micro-batch is laid out, derived once from the configuration for the collator, loader and model.

    `packed`: THD token streams of `token_budget` tokens (`use_sequence_packing`), else padded BSHD rows.
    `token_multiple`: what the precision needs of a micro-batch's token count (precision.py); padded rows are padded
    to `pad_multiple` (that and `dataset.pad_to_multiple_of`), or to `pad_to_length` when set. `static`: the fixed
    shapes of packed batches (`static_shapes`, or `cuda_graphs`), else None; `max_sequences` caps the sequences of a
    pack (None: no cap); `packing_lookahead`: how many upcoming sequences the packer chooses from to fill each pack.
    """

    packed: bool
    max_seq_length: int
    token_multiple: int
    token_budget: int
    pad_multiple: int
    pad_to_length: int | None
    static: StaticPacking | None = None
    max_sequences: int | None = None
    packing_lookahead: int = 1

    def packing_facts(self) -> dict[str, Any] | None:
        """What decides which sequences form each pack (kept with checkpoints: a resume mid-epoch needs the same)."""
        if not self.packed:
            return None
        return {
            "token_budget": self.token_budget,
            "max_sequences": self.max_sequences,
            "lookahead": self.packing_lookahead,
        }

    @property
    def attn_input_format(self) -> str:
        return "thd" if self.packed else "bshd"

    @classmethod
    def from_config(cls, cfg: Any) -> BatchLayout:
        """The layout `cfg` asks for; a token budget that cannot hold one full-length sequence is refused."""
        data = cfg.dataset
        multiple = token_multiple(cfg)
        requested = cfg.token_micro_batch_size or data.micro_batch_size * data.max_seq_length
        budget = int(requested) // multiple * multiple
        if cfg.use_sequence_packing and budget < data.max_seq_length:
            raise BatchLayoutError(
                f"token_micro_batch_size={requested} (rounded down to {budget}, a multiple of {multiple} for this "
                f"precision) cannot hold one sequence of dataset.max_seq_length={data.max_seq_length}. Raise "
                "token_micro_batch_size or lower dataset.max_seq_length."
            )
        packed, static = bool(cfg.use_sequence_packing), None
        max_sequences = int(cfg.max_sequences_per_pack) if cfg.max_sequences_per_pack else None
        if packed and (cfg.static_shapes or cfg.cuda_graphs):
            max_sequences = max_sequences or max(1, budget // STATIC_TOKENS_PER_SEQUENCE)
            static = StaticPacking(tokens=budget, max_sequences=max_sequences, max_seqlen=int(data.max_seq_length))
        return cls(
            packed=packed,
            max_seq_length=int(data.max_seq_length),
            token_multiple=multiple,
            token_budget=budget,
            pad_multiple=math.lcm(int(data.pad_to_multiple_of), multiple),
            pad_to_length=int(data.max_seq_length) if data.pad_to_max_length else None,
            static=static,
            max_sequences=max_sequences if packed else None,
            packing_lookahead=int(cfg.packing_lookahead),
        )


def build_collator(data_cfg: Any, layout: BatchLayout, tokenizer: Any, seed: int) -> BSHDCollator | THDCollator:
    """The padded (BSHD) or packed (THD) collator of `layout`, masking as `data_cfg` says."""
    masker = MLMMasker.from_tokenizer(
        tokenizer,
        max_seq_length=layout.max_seq_length,
        mlm_probability=float(data_cfg.mlm_probability),
        crop=data_cfg.crop,
        seed=seed,
    )
    if layout.packed:
        return THDCollator(masker, tokenizer.pad_token_id, layout.token_multiple, layout.static)
    return BSHDCollator(masker, tokenizer.pad_token_id, layout.pad_multiple, layout.pad_to_length)
