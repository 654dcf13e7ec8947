"""BERT-style pre-training examples: sentence pairs for next-sentence prediction, and masked-LM masking.

Pairs are built once per corpus, tokenizer and settings, then cached as plain numpy arrays. Masking is dynamic
but deterministic: example i of epoch e is masked with a generator seeded by (seed, e, i), so a batch is a pure
function of (seed, step), whatever the batch split across processes or micro-batches. Resuming at step N needs
nothing but N.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mobilebert.errors import UserError

IGNORE_INDEX = -100  # label of positions that are not predicted


@dataclass(frozen=True)
class PairSettings:
    """How sentence pairs are cut (BERT's create_pretraining_data)."""

    max_seq_length: int = 128
    short_seq_prob: float = 0.1  # sometimes use a shorter target length, so the model also sees short inputs
    dupe_factor: int = 1  # passes over the corpus, each with different pairs
    seed: int = 12345


@dataclass(frozen=True)
class MaskSettings:
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word_masking: bool = False


@dataclass
class PairDataset:
    """Token pairs `[CLS] A [SEP] B [SEP]` stored flat: example i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # (N_tokens,) int32
    offsets: np.ndarray  # (N + 1,) int64
    first_lengths: np.ndarray  # (N,) int32: length of [CLS] A [SEP], where segment B starts
    is_random_next: np.ndarray  # (N,) int8: NSP label, 1 when B was taken from another document

    def __len__(self) -> int:
        return len(self.first_lengths)

    def example(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("tokens", "offsets", "first_lengths", "is_random_next"):
            np.save(directory / f"{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, directory: Path) -> PairDataset:
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False)
                  for name in ("tokens", "offsets", "first_lengths", "is_random_next")}
        return cls(**arrays)


def create_pairs(documents: Sequence[Sequence[list[int]]], cls_id: int, sep_id: int,
                 settings: PairSettings) -> PairDataset:
    """Cut tokenized documents (lists of sentences of token ids) into NSP pairs, BERT's algorithm.

    Sentences are gathered until a target length; a random split point makes segment A; segment B is the rest
    (is_random_next=0) or, half of the time, a random span of another document (1), in which case the unused
    sentences go back to be used again. A chunk of one sentence is cut inside the sentence (BERT would always
    pair it with a random span), so the two labels stay even on corpora of short documents. Pairs are trimmed
    to fit `max_seq_length` from the longer side.
    """
    documents = [doc for doc in (_nonempty(d) for d in documents) if doc]
    if len(documents) < 2:
        raise UserError("the corpus needs at least two non-empty documents to make next-sentence pairs")
    rng = random.Random(settings.seed)
    tokens: list[int] = []
    offsets, first_lengths, labels = [0], [], []
    for _ in range(settings.dupe_factor):
        for d in range(len(documents)):
            for first, second, random_next in _document_pairs(documents, d, settings, rng):
                tokens.extend([cls_id, *first, sep_id, *second, sep_id])
                offsets.append(len(tokens))
                first_lengths.append(len(first) + 2)
                labels.append(int(random_next))
    order = np.random.default_rng(settings.seed).permutation(len(labels))  # pairs of one document are neighbours
    return _reorder(PairDataset(np.asarray(tokens, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                                np.asarray(first_lengths, dtype=np.int32), np.asarray(labels, dtype=np.int8)), order)


def _nonempty(document: Sequence[list[int]]) -> list[list[int]]:
    return [s for s in document if len(s) > 0]


def _document_pairs(documents, d, settings, rng):
    """Yield (A tokens, B tokens, is_random_next) for document d."""
    max_tokens = settings.max_seq_length - 3  # [CLS], [SEP], [SEP]
    target = rng.randint(2, max_tokens) if rng.random() < settings.short_seq_prob else max_tokens
    document, chunk, length, i = documents[d], [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            split = len(chunk) == 1 and len(chunk[0]) >= 2
            if split:
                # BERT pairs a lone sentence with a random next one, which on corpora of short documents makes
                # most labels "random" (64% on the built-in corpus). Cutting the sentence in two keeps them 50/50.
                cut = rng.randint(1, len(chunk[0]) - 1)
                chunk = [chunk[0][:cut], chunk[0][cut:]]
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            first = [t for s in chunk[:a_end] for t in s]
            if len(chunk) == 1 or rng.random() < 0.5:
                second = _random_span(documents, d, target - len(first), rng)
                if not split:
                    i -= len(chunk) - a_end  # put the unused sentences back
                random_next = True
            else:
                second = [t for s in chunk[a_end:] for t in s]
                random_next = False
            _truncate_pair(first, second, max_tokens, rng)
            if first and second:
                yield first, second, random_next
            chunk, length = [], 0
        i += 1


def _random_span(documents, d, target, rng) -> list[int]:
    other = rng.randrange(len(documents) - 1)
    other += other >= d  # any document but d
    doc = documents[other]
    start, span = rng.randrange(len(doc)), []
    for sentence in doc[start:]:
        span.extend(sentence)
        if len(span) >= target:
            break
    return span


def _truncate_pair(first: list[int], second: list[int], max_tokens: int, rng: random.Random) -> None:
    """Trim the longer segment, from the front or the back at random, until the pair fits (in place)."""
    while len(first) + len(second) > max_tokens:
        longer = first if len(first) > len(second) else second
        del longer[0 if rng.random() < 0.5 else -1]


def _reorder(data: PairDataset, order: np.ndarray) -> PairDataset:
    lengths = np.diff(data.offsets)[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([data.example(i) for i in order]) if len(order) else data.tokens
    return PairDataset(tokens.astype(np.int32), offsets, data.first_lengths[order], data.is_random_next[order])


def cached_pairs(cache_root: Path, key: dict, build) -> PairDataset:
    """Load the pairs cached under a hash of `key`, or build them once with `build()` and cache them."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    directory = cache_root / f"pairs-{digest}"
    if (directory / "done").is_file():
        return PairDataset.load(directory)
    data = build()
    tmp = cache_root / f".pairs-{digest}.{os.getpid()}.tmp"  # per process: concurrent ranks may all build
    shutil.rmtree(tmp, ignore_errors=True)
    data.save(tmp)
    (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
    (tmp / "done").write_text("")
    try:
        tmp.replace(directory)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return data


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

    With `world_size` processes each rank gets its contiguous share of every global batch, so the union of all
    ranks' batches is exactly the single-process batch.
    """

    def __init__(self, data: PairDataset, batch_size: int, vocab_size: int, mask_id: int, pad_id: int,
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
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.data))}
        return self._orders[epoch]

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(epoch, example index) of this rank's share of global batch `step`."""
        share = self.batch_size // self.world_size
        first = step * self.batch_size + self.rank * share
        return [(p // len(self.data), int(self._order(p // len(self.data))[p % len(self.data)]))
                for p in range(first, first + share)]

    def example(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        ids = self.data.example(index)
        rng = np.random.default_rng([self.seed, epoch, index])
        word_start = None if self.word_start_table is None else self.word_start_table[ids]
        masked, labels = mask_tokens(ids, self.special_table[ids], word_start, self.vocab_size, self.mask_id,
                                     self.mask_settings, rng)
        types = np.zeros(len(ids), dtype=np.int64)
        types[self.data.first_lengths[index]:] = 1
        return {"input_ids": masked, "token_type_ids": types, "labels": labels,
                "next_sentence_label": np.int64(self.data.is_random_next[index])}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return collate([self.example(e, i) for e, i in self.indices(step)], self.pad_id)

    def state(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "examples": len(self.data),
                "mask": asdict(self.mask_settings)}


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
