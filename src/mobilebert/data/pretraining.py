"""BERT-style pre-training examples: sentence pairs for next-sentence prediction, and masked-LM masking.

Pairs are prepared once per corpus, tokenizer and settings (`data/prepare.py`) and read through memory maps.
Masking is dynamic but deterministic: example i of epoch e is masked with a generator seeded by (seed, e, i), so
a batch is a pure function of (seed, step), whatever the batch split across processes or micro-batches. Resuming
at step N needs nothing but N.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mobilebert.errors import UserError

IGNORE_INDEX = -100  # label of positions that are not predicted


@dataclass(frozen=True)
class MaskSettings:
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word_masking: bool = False


def mask_tokens(ids: np.ndarray, special: np.ndarray, word_start: np.ndarray | None, vocab_size: int,
                mask_id: int, settings: MaskSettings, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one example: returns (masked input ids, labels with IGNORE_INDEX where not predicted).

    round(15%) of the non-special tokens (at most `max_predictions_per_seq`, at least one) are predicted;
    of those 80% become [MASK], 10% a random token, 10% stay. With whole-word masking, all pieces of a word are
    predicted together (`word_start` marks the first piece of each word).
    """
    candidates = np.flatnonzero(~special)
    if word_start is not None and settings.whole_word_masking:
        boundaries = np.flatnonzero(word_start[candidates])
        words = np.split(candidates, boundaries[boundaries > 0])  # a word: its first piece and the '##' pieces after
    else:
        words = [np.array([c]) for c in candidates]
    budget = min(settings.max_predictions_per_seq, max(1, int(round(len(candidates) * settings.masked_lm_prob))))
    chosen: list[int] = []
    for w in rng.permutation(len(words)):
        if len(chosen) + len(words[w]) > budget:
            continue
        chosen.extend(words[w].tolist())
        if len(chosen) >= budget:
            break
    chosen_arr = np.sort(np.asarray(chosen, dtype=np.int64))
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[chosen_arr] = ids[chosen_arr]
    masked = ids.astype(np.int64).copy()
    roll = rng.random(len(chosen_arr))
    masked[chosen_arr[roll < 0.8]] = mask_id
    randomized = chosen_arr[(roll >= 0.8) & (roll < 0.9)]
    masked[randomized] = rng.integers(0, vocab_size, len(randomized))
    return masked, labels


class PretrainingBatches:
    """Global batch `step` of an endless, epoch-wise shuffled stream of masked pairs; a pure function of step.

    `data` is any set of pairs with `len` and `pair(i)` (in memory, or memory-mapped shards). Each epoch visits the
    examples in the order of a keyed permutation (`shuffled`), computed for the positions asked only, so no
    per-example order array is held. With `world_size` processes each rank gets its contiguous share of every
    global batch, so the union of all ranks' batches is exactly the single-process batch.
    """

    def __init__(self, data: Any, batch_size: int, vocab_size: int, mask_id: int, pad_id: int,
                 special_ids: set[int], mask_settings: MaskSettings, seed: int,
                 word_start_table: np.ndarray | None = None, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise UserError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.vocab_size, self.mask_id, self.pad_id = vocab_size, mask_id, pad_id
        self.special_table = np.zeros(max(vocab_size, max(special_ids) + 1), dtype=bool)
        self.special_table[list(special_ids)] = True
        self.word_start_table = word_start_table  # per vocabulary id: True unless the piece starts with '##'
        self.mask_settings = mask_settings
        self.rank, self.world_size = rank, world_size

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(epoch, example index) of this rank's share of global batch `step`."""
        n = len(self.data)
        share = self.batch_size // self.world_size
        positions = np.arange(step * self.batch_size + self.rank * share,
                              step * self.batch_size + (self.rank + 1) * share, dtype=np.int64)
        epochs, local = positions // n, positions % n
        order = np.empty_like(local)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            order[chosen] = shuffled(local[chosen], n, self.seed, int(epoch))
        return [(int(e), int(i)) for e, i in zip(epochs, order, strict=True)]

    def example(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        ids, first_length, is_random_next = self.data.pair(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        word_start = None if self.word_start_table is None else self.word_start_table[ids]
        masked, labels = mask_tokens(ids, self.special_table[ids], word_start, self.vocab_size, self.mask_id,
                                     self.mask_settings, rng)
        types = np.zeros(len(ids), dtype=np.int64)
        types[first_length:] = 1
        return {"input_ids": masked, "token_type_ids": types, "labels": labels,
                "next_sentence_label": np.int64(is_random_next)}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return collate([self.example(e, i) for e, i in self.indices(step)], self.pad_id)

    def state(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "examples": len(self.data),
                "mask": asdict(self.mask_settings)}


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def shuffled(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """The images of `positions` (in [0, n)) under a permutation of [0, n) keyed by (seed, epoch).

    A 4-round Feistel network on the smallest even power of two >= n is a bijection of that range; walking the
    cycle (applying it again while the result is >= n) restricts it to a bijection of [0, n), fewer than 4 rounds
    on average. O(1) memory per position, where `rng.permutation(n)` holds 8 bytes per example of the corpus.
    """
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.default_rng([seed, epoch]).integers(0, 2**63, 4, dtype=np.uint64)
    out = np.asarray(positions, dtype=np.uint64).copy()
    todo = np.ones(len(out), dtype=bool)
    while todo.any():
        out[todo] = _feistel(out[todo], keys, half, mask)
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


def _feistel(x: np.ndarray, keys: np.ndarray, half: np.uint64, mask: np.uint64) -> np.ndarray:
    left, right = x >> half, x & mask
    for key in keys:
        h = (right + key) * _GOLDEN  # a splitmix64-style mix of the right half with the round key
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
        left, right = right, left ^ (h & mask)
    return (left << half) | right


class _Steps(torch.utils.data.Dataset):
    """Batches `start`.. as a map-style dataset: item i is global batch start + i of this rank."""

    def __init__(self, batches: PretrainingBatches, start: int, end: int) -> None:
        self.batches, self.start, self.end = batches, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches.batch(self.start + i)


def batch_stream(batches: PretrainingBatches, start: int, end: int, workers: int = 0) -> Iterator[dict]:
    """Batches `start` to `end - 1`, in order. With `workers` > 0, background processes mask and collate ahead of
    the training step (torch's DataLoader, 4 batches ahead per worker), so the accelerator does not wait."""
    if workers <= 0:
        return (batches.batch(step) for step in range(start, end))
    loader = torch.utils.data.DataLoader(_Steps(batches, start, end), batch_size=None, num_workers=workers,
                                         prefetch_factor=4)
    return iter(loader)


def collate(examples: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids with [PAD], labels with IGNORE_INDEX, attention_mask 0 there."""
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    batch = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(B, T, dtype=torch.long),
             "token_type_ids": torch.zeros(B, T, dtype=torch.long),
             "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long)}
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = torch.from_numpy(e["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["token_type_ids"][row, :n] = torch.from_numpy(e["token_type_ids"])
        batch["labels"][row, :n] = torch.from_numpy(e["labels"])
    batch["next_sentence_label"] = torch.tensor([int(e["next_sentence_label"]) for e in examples])
    return batch
