"""Context parallelism, data side: each CP rank's share of a packed batch, and the counts that keep ESM-2 exact.

With context parallelism (CP) the ranks of a CP group split every sequence of one packed (THD) batch between them
and TE's ring attention exchanges keys and values. Each sequence is padded to a multiple of 2 * cp_size and cut into
2 * cp_size equal chunks; rank r keeps chunks r and 2 * cp_size - 1 - r ("dual chunk" load balancing: attention cost
grows along a sequence, so pairing an early with a late chunk gives every rank the same work). The layout is TE's
THD context-parallel one (that of `thd_get_partitioned_indices`): per sequence, the rank's two chunks one after the
other, with the batch's global `cu_seqlens` (real lengths) and `cu_seqlens_padded` (padded lengths) shared by all
ranks of the group.

Batches here are a function of (seed, epoch, index) and the data-parallel rank, so the ranks of a CP group, given
one data-parallel rank, can each build the same packed batch and keep their own chunks: no scatter from one loader
rank, and the data position is the same on every rank. `ContextParallelCollator` does that in the loader's workers:
the loader shards by data-parallel rank (loader.py), the collator packs, and each rank keeps its share.

What a shard cannot compute alone, it gets from a sum over the group:
- ESM-2's token-dropout rescaling needs each sequence's masked fraction: `masked_fraction` sums the per-sequence
  mask counts of the shards (`reduce`, an all-reduce over the CP group in training) and divides by the real length.
- The loss normaliser is the global count of masked tokens over data- and context-parallel ranks together, which
  `training.global_loss_scale` already all-reduces over the world; CP ranks add their token losses like DP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

IGNORE_INDEX = -100


def padded_lengths(lengths: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Each length rounded up to a multiple of 2 * cp_size, so every sequence splits into 2 * cp_size equal chunks."""
    multiple = 2 * cp_size
    return (lengths + multiple - 1) // multiple * multiple


def rank_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of 2 * cp_size per sequence) that rank `cp_rank` holds."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must lie in 0..{cp_size - 1}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _shard_index(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices into the padded packed batch of the tokens rank `cp_rank` keeps, in TE's THD CP order."""
    starts, padded = cu_seqlens_padded[:-1], cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]
    chunk = padded // (2 * cp_size)
    pieces = []
    for start, size in zip(starts.tolist(), chunk.tolist(), strict=True):
        for index in rank_chunks(cp_size, cp_rank):
            pieces.append(torch.arange(start + index * size, start + (index + 1) * size))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _fit_shard_multiple(padded: torch.Tensor, cp_size: int, token_multiple: int) -> torch.Tensor:
    """Lengthen the last sequence's padding so each rank's share is a multiple of `token_multiple` tokens.

    FP8 GEMMs need the token count of what they multiply (the shard, under CP) to be a multiple of 16 (32, 128 for
    block scaling); the extra padding is a multiple of 2 * cp_size, so the chunks stay equal.
    """
    multiple = cp_size * math.lcm(2, token_multiple)
    extra = -int(padded.sum()) % multiple
    if extra and len(padded):
        padded = padded.clone()
        padded[-1] += extra
    return padded


def pad_sequences(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cp_size: int,
    pad_token_id: int,
    token_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """The packed batch with each sequence padded at its end to a multiple of 2 * cp_size.

    Padding gets `pad_token_id` and the ignored label, so it adds no loss; TE's attention leaves it out through the
    real `cu_seqlens`. `position_ids` are the offsets within each sequence, the rotary positions of the unsplit batch.
    The last sequence gets more padding where each rank's share would not be a multiple of `token_multiple`.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    padded = _fit_shard_multiple(padded_lengths(lengths, cp_size), cp_size, token_multiple)
    cu_seqlens_padded = torch.cat([cu_seqlens.new_zeros(1), padded.cumsum(0).to(cu_seqlens.dtype)])
    total = int(cu_seqlens_padded[-1])
    segment = torch.repeat_interleave(torch.arange(len(lengths)), padded)
    position_ids = torch.arange(total) - cu_seqlens_padded[:-1].long()[segment]
    real = position_ids < lengths.long()[segment]
    source = (cu_seqlens[:-1].long()[segment] + position_ids)[real]
    padded_ids = input_ids.new_full((total, *input_ids.shape[1:]), pad_token_id)  # ids, or per-token rows
    padded_labels = labels.new_full((total,), IGNORE_INDEX)
    padded_ids[real], padded_labels[real] = input_ids[source], labels[source]
    return {
        "input_ids": padded_ids,
        "labels": padded_labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "cu_seqlens_padded": cu_seqlens_padded,
    }


def shard_packed_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cp_size: int,
    cp_rank: int,
    pad_token_id: int,
    token_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Rank `cp_rank`'s share of a packed batch: ids, labels and true positions of its chunks, and both cu_seqlens.

    `local_cu_seqlens` delimits the rank's tokens of each sequence (two chunks each) for per-sequence sums on the
    shard, such as `masked_fraction`'s counts. The share is a multiple of `token_multiple` tokens.
    """
    if cp_size < 1:
        raise ValueError(f"cp_size={cp_size} must be a positive integer")
    whole = pad_sequences(input_ids, labels, cu_seqlens, cp_size, pad_token_id, token_multiple)
    index = _shard_index(whole["cu_seqlens_padded"], cp_size, cp_rank)
    local = (whole["cu_seqlens_padded"][1:] - whole["cu_seqlens_padded"][:-1]) // cp_size
    return {
        "input_ids": whole["input_ids"][index],
        "labels": whole["labels"][index],
        "position_ids": whole["position_ids"][index],
        "cu_seqlens": cu_seqlens,
        "cu_seqlens_padded": whole["cu_seqlens_padded"],
        "local_cu_seqlens": torch.cat([cu_seqlens.new_zeros(1), local.cumsum(0).to(cu_seqlens.dtype)]),
    }


def shard_collated_batch(
    batch: dict[str, Any], cp_size: int, cp_rank: int, pad_token_id: int, token_multiple: int
) -> dict[str, Any]:
    """A packed (THD) collator's batch turned into rank `cp_rank`'s model inputs and labels.

    `cu_seqlens` (real lengths), `cu_seqlens_padded` and `max_seqlen` (the longest padded sequence, a Python int)
    describe the whole batch, as TE's context-parallel attention and rotary embedding expect them; `input_ids` and
    `labels` ([1, T / cp_size]) and `local_cu_seqlens` are the rank's own. Positions are not passed: TE derives each
    chunk's true offsets from `cu_seqlens_padded` and the CP rank.
    """
    shard = shard_packed_batch(
        batch["input_ids"].reshape(-1),
        batch["labels"].reshape(-1),
        batch["cu_seqlens"],
        cp_size,
        cp_rank,
        pad_token_id,
        token_multiple,
    )
    padded = shard["cu_seqlens_padded"]
    return {
        "input_ids": shard["input_ids"].unsqueeze(0),
        "labels": shard["labels"].unsqueeze(0),
        "cu_seqlens": batch["cu_seqlens"],
        "cu_seqlens_padded": padded,
        "local_cu_seqlens": shard["local_cu_seqlens"],
        "max_seqlen": int((padded[1:] - padded[:-1]).max()),
    }


class ContextParallelCollator:
    """A packed collator whose batches are this CP rank's share: every rank of the group packs alike, keeps its own.

    It runs where the wrapped collator runs (the loader's workers), so the training step gets its shard ready-made.
    """

    def __init__(self, collator: Any, cp_size: int, cp_rank: int, pad_token_id: int, token_multiple: int) -> None:
        rank_chunks(cp_size, cp_rank)  # refuses a rank outside the group
        self.collator, self.cp_size, self.cp_rank = collator, cp_size, cp_rank
        self.pad_token_id, self.token_multiple = pad_token_id, token_multiple

    def set_epoch(self, epoch: int) -> None:
        self.collator.set_epoch(epoch)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(samples)
        return shard_collated_batch(batch, self.cp_size, self.cp_rank, self.pad_token_id, self.token_multiple)


def gather_shards(shards: list[torch.Tensor], cu_seqlens_padded: torch.Tensor) -> torch.Tensor:
    """The padded packed tensor from every rank's shard of it (in rank order): the inverse of the split."""
    cp_size = len(shards)
    whole = shards[0].new_empty((int(cu_seqlens_padded[-1]), *shards[0].shape[1:]))
    for rank, shard in enumerate(shards):
        whole[_shard_index(cu_seqlens_padded, cp_size, rank)] = shard
    return whole


def masked_fraction(
    is_mask: torch.Tensor,
    local_cu_seqlens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda counts: counts,
) -> torch.Tensor:
    """Per token of the shard: the masked fraction of its whole sequence, as the unsplit batch gives it.

    The shard counts its masked tokens per sequence, `reduce` sums those counts over the CP group (an all-reduce in
    training; the identity for one rank), and each count is divided by the sequence's real length. ESM-2's
    token-dropout rescaling, (1 - 0.15 * 0.8) / (1 - fraction), then matches one GPU holding the whole sequence.
    """
    positions = torch.arange(is_mask.shape[0], device=is_mask.device, dtype=local_cu_seqlens.dtype)
    segment = torch.searchsorted(local_cu_seqlens[1:], positions, right=True)
    counts = torch.zeros(local_cu_seqlens.shape[0] - 1, device=is_mask.device, dtype=torch.float32)
    counts.index_add_(0, segment, is_mask.float())
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).clamp(min=1).to(is_mask.device)
    return (reduce(counts) / lengths)[segment]
