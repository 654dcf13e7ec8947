"""One shard's work, in a preparation worker: read its text, tokenize it, cut NSP pairs, write the arrays.

Imports no torch (workers start in a fraction of a second). A shard's bytes depend only on its text, the tokenizer
and (seed, shard index): any number of workers writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from bisect import bisect_left
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from mobilebert.data import sources
from mobilebert.data.pairs import create_pairs

ARRAYS = ("tokens", "offsets", "first_lengths", "is_random_next")
SPLITS = (sources.TRAIN, sources.VALIDATION)

_WORKER: dict[str, Any] = {}


def init_worker(tokenizer_json: str, set_env: bool = True) -> None:
    if set_env:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # each worker is one core; the pool is the parallelism
    _WORKER["tokenizer"] = tokenizers.Tokenizer.from_str(tokenizer_json)
    _WORKER["json"] = tokenizer_json


def prepare_shard(shard: sources.Shard, job: dict[str, Any]) -> dict[str, Any]:
    """Read, tokenize and pair one shard; write its arrays into a temporary folder and rename it into place."""
    if _WORKER.get("json") != job["tokenizer"]:
        init_worker(job["tokenizer"], set_env=False)
    settings = job["settings"]  # a PrepareSettings
    backend: tokenizers.Tokenizer = _WORKER["tokenizer"]
    documents: dict[str, list[list[str]]] = {split: [] for split in SPLITS}
    for document in sources.shard_documents(shard):
        split = shard.split
        if split == sources.BOTH:
            split = sources.VALIDATION if sources.held_out(document, settings.holdout_every) else sources.TRAIN
        documents[split].append(document)
    final = Path(job["out"]) / "shards" / f"{shard.index:05d}"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    token_dtype = np.uint16 if backend.get_vocab_size(with_added_tokens=True) <= 1 << 16 else np.int32
    meta: dict[str, Any] = {"index": shard.index, "key": shard.key(), "text_bytes": shard.text_bytes,
                            "counts": {}, "files": {}}
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    for split, docs in documents.items():
        tokenized = encode_documents(backend, docs)
        pairs = create_pairs(tokenized, cls_id, sep_id, settings.pair_settings(split, shard.index)) \
            if sum(1 for d in tokenized if any(d)) >= 2 else None
        arrays = _arrays(pairs, token_dtype)
        meta["counts"].update({f"{split}_documents": len(docs), f"{split}_sentences": sum(map(len, docs)),
                               f"{split}_pairs": len(arrays["first_lengths"]),
                               f"{split}_tokens": int(arrays["tokens"].size)})
        for name, values in arrays.items():
            path = tmp / f"{split}-{name}.npy"
            np.save(path, values, allow_pickle=False)
            meta["files"][path.name] = sha256_file(path)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)  # a shard from an older request
    tmp.replace(final)
    return meta


SENTENCE_MARK = "[SEP]"  # joins a document's sentences for encoding; the tokenizer keeps it whole (a special token)


def encode_documents(backend: tokenizers.Tokenizer, documents: list[list[str]],
                     chunk_chars: int = 1 << 20) -> list[list[array]]:
    """Token ids of every sentence of every document (int32 arrays), without special tokens: the ids of the
    sentences encoded one by one, computed faster.

    Each document is encoded as one text, its sentences joined by " [SEP] ", and cut back into sentences at the
    [SEP] ids: BERT's pre-tokenizer splits at whitespace and keeps special tokens whole, so nothing else changes,
    and one long text per document (without character offsets) is ~20% faster than many short ones. A document
    whose text holds "[SEP]" itself is cut at its sentences' character offsets instead. Documents are encoded
    ~`chunk_chars` at a time: tokenizers' encodings hold ~100 bytes a token, the arrays kept 4.
    """
    mark = backend.token_to_id(SENTENCE_MARK)
    out: list[list[array]] = []
    start = 0
    while start < len(documents):
        end, size = start, 0
        while end < len(documents) and (size < chunk_chars or end == start):
            size += sum(map(len, documents[end]))
            end += 1
        out.extend(_encode_chunk(backend, documents[start:end], mark))
        start = end
    return out


def _encode_chunk(backend: tokenizers.Tokenizer, documents: list[list[str]], mark: int | None) -> list[list[array]]:
    texts = [f" {SENTENCE_MARK} ".join(doc) for doc in documents]
    out = []
    for doc, text, encoding in zip(documents, texts, _encode_fast(backend, texts), strict=True):
        ids = encoding.ids
        if mark is None or text.count(SENTENCE_MARK) != len(doc) - 1 or ids.count(mark) != len(doc) - 1:
            # "[SEP]" in the text itself, or a tokenizer that does not keep [SEP] whole: cut at character offsets
            out.append([array("i", ids) for ids in _cut_at_offsets(backend, doc)])
            continue
        sentences, begin = [], 0
        for _ in range(len(doc) - 1):
            end = ids.index(mark, begin)
            sentences.append(array("i", ids[begin:end]))
            begin = end + 1
        sentences.append(array("i", ids[begin:]))
        out.append(sentences)
    return out


def _encode_fast(backend: tokenizers.Tokenizer, texts: list[str]) -> list[tokenizers.Encoding]:
    fast = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.20: no character offsets computed
    return (fast or backend.encode_batch)(texts, add_special_tokens=False)


def _cut_at_offsets(backend: tokenizers.Tokenizer, doc: list[str]) -> list[list[int]]:
    encoding = backend.encode(" ".join(doc), add_special_tokens=False)
    ids, starts = encoding.ids, [start for start, _ in encoding.offsets]
    sentences, begin, position = [], 0, 0
    for sentence in doc[:-1]:
        position += len(sentence) + 1  # where the next sentence starts, in characters
        end = bisect_left(starts, position, lo=begin)
        sentences.append(ids[begin:end])
        begin = end
    sentences.append(ids[begin:])
    return sentences


def _arrays(pairs, token_dtype) -> dict[str, np.ndarray]:
    if pairs is None:
        return {"tokens": np.zeros(0, token_dtype), "offsets": np.zeros(1, np.int64),
                "first_lengths": np.zeros(0, np.int32), "is_random_next": np.zeros(0, np.int8)}
    return {"tokens": pairs.tokens.astype(token_dtype), "offsets": pairs.offsets,
            "first_lengths": pairs.first_lengths, "is_random_next": pairs.is_random_next}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
