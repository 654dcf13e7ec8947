"""BERT's next-sentence pairs (create_pretraining_data), cut from tokenized documents; no torch here, so data
preparation workers start fast.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from mobilebert.errors import UserError


@dataclass(frozen=True)
class PairSettings:
    """How sentence pairs are cut (BERT's create_pretraining_data)."""

    max_seq_length: int = 128
    short_seq_prob: float = 0.1  # sometimes use a shorter target length, so the model also sees short inputs
    dupe_factor: int = 1  # passes over the corpus, each with different pairs
    seed: int = 12345


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

    def pair(self, i: int) -> tuple[np.ndarray, int, int]:
        """(token ids as int64, length of [CLS] A [SEP], is_random_next) of example i."""
        return self.example(i).astype(np.int64), int(self.first_lengths[i]), int(self.is_random_next[i])


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
    tokens = array("i")  # 4 bytes a token, where a list of ints costs ~36
    offsets, first_lengths, labels = [0], [], []
    for _ in range(settings.dupe_factor):
        for d in range(len(documents)):
            for first, second, random_next in _document_pairs(documents, d, settings, rng):
                tokens.extend([cls_id, *first, sep_id, *second, sep_id])
                offsets.append(len(tokens))
                first_lengths.append(len(first) + 2)
                labels.append(int(random_next))
    order = np.random.default_rng(settings.seed).permutation(len(labels))  # pairs of one document are neighbours
    return _reorder(PairDataset(np.frombuffer(tokens, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
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
            first = list(chain.from_iterable(chunk[:a_end]))
            if len(chunk) == 1 or rng.random() < 0.5:
                second = _random_span(documents, d, target - len(first), rng)
                if not split:
                    i -= len(chunk) - a_end  # put the unused sentences back
                random_next = True
            else:
                second = list(chain.from_iterable(chunk[a_end:]))
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
    a, a_end, b, b_end = 0, len(first), 0, len(second)  # the kept parts: first[a:a_end], second[b:b_end]
    while (a_end - a) + (b_end - b) > max_tokens:  # one draw per token dropped, as BERT's loop
        front = rng.random() < 0.5
        if a_end - a > b_end - b:
            a, a_end = (a + 1, a_end) if front else (a, a_end - 1)
        else:
            b, b_end = (b + 1, b_end) if front else (b, b_end - 1)
    first[:], second[:] = first[a:a_end], second[b:b_end]


def _reorder(data: PairDataset, order: np.ndarray) -> PairDataset:
    lengths = np.diff(data.offsets)[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([data.example(i) for i in order]) if len(order) else data.tokens
    return PairDataset(tokens.astype(np.int32), offsets, data.first_lengths[order], data.is_random_next[order])
