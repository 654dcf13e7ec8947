"""Corpus sources cut into shards of about `shard_bytes` of text, and each shard's documents read back.

A shard is the unit of parallel preparation (`data/prepare.py`): one worker reads it, tokenizes it and cuts its
NSP pairs, so what a shard holds must be fixed by the corpus and the shard size alone, never by the number of
workers. Plain text files are cut at blank lines (document boundaries) near every `shard_bytes`, found by seeking,
so the main process never reads the text: a worker reads its own byte ranges. Datasets (local parquet/JSON/Arrow
or hub ids, streamed) and the built-in corpus are read by the main process and handed over as texts.

Nothing here imports torch: preparation workers import this module and start in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobilebert.data.builtin_corpus import builtin_corpus
from mobilebert.data.corpus import (
    _BLANK_LINE,
    _text_files,
    dataset_texts,
    is_single_split_dataset,
    is_text_source,
    split_sentences,
)
from mobilebert.errors import UserError

if TYPE_CHECKING:
    from mobilebert.data.prepare import PrepareSettings

TRAIN, VALIDATION, BOTH = "train", "validation", "both"  # BOTH: the hold-out decides per document


@dataclass(frozen=True)
class Range:
    """Bytes [start, end) of a text file: whole documents (cut at blank lines)."""

    path: str
    start: int
    end: int


@dataclass
class Shard:
    """The text of one shard: byte ranges of text files, or documents given whole.

    `documents` are lists of texts, read according to `form`: "records" (each text is a dataset record, split
    into documents at blank lines and into sentences), "groups" (the texts together are one document: consecutive
    records of a corpus of single sentences, such as BookCorpus) or "sentences" (the texts are the document's
    sentences already: the built-in corpus). `split` says whether a document goes to train, validation, or (BOTH)
    to validation when its hash says so (`held_out`).
    """

    index: int
    split: str
    ranges: list[Range] = field(default_factory=list)
    documents: list[list[str]] = field(default_factory=list)
    form: str = "records"

    @property
    def text_bytes(self) -> int:
        if self.ranges:
            return sum(r.end - r.start for r in self.ranges)
        return sum(len(t.encode("utf-8")) + 1 for doc in self.documents for t in doc)

    def key(self) -> str:
        """A digest of what the shard holds: a finished shard is reused only when its key is unchanged."""
        h = hashlib.sha256(f"{self.split}/{self.form}".encode())
        for r in self.ranges:
            stat = os.stat(r.path)
            h.update(f"{r.path}:{r.start}:{r.end}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        for doc in self.documents:
            h.update("\x1f".join(doc).encode("utf-8", "surrogatepass"))
            h.update(b"\x1e")
        return h.hexdigest()[:16]


def held_out(sentences: list[str], every: int) -> bool:
    """Whether a document belongs to the validation split: 1 in `every` documents, chosen by a hash of its text
    (stable across runs and shard sizes; repeated documents fall on the same side)."""
    return every > 0 and zlib.crc32("\n".join(sentences).encode("utf-8", "surrogatepass")) % every == 0


# ---- planning ----


def text_ranges(paths: str | list[str], shard_bytes: int) -> Iterator[Range]:
    """Byte ranges of ~`shard_bytes` of the text files under `paths`, each ending after a blank line (or at the
    file's end), so no document is cut. Costs a seek and a few lines read per range."""
    for file in _text_files(paths):
        size = file.stat().st_size
        with open(file, "rb") as f:
            start = 0
            while start < size:
                end = _document_boundary(f, start + shard_bytes, size, shard_bytes)
                yield Range(str(file), start, end)
                start = end


def _document_boundary(f: Any, target: int, size: int, stretch: int) -> int:
    """The first position at or after `target` that follows a blank line (or the file's end).

    A file without blank lines (one long document, or another format) is cut at a line end after another
    `stretch` bytes at the most, so no shard grows with the file (its documents are then cut there)."""
    if target >= size:
        return size
    limit = target + stretch
    f.seek(target - 1)
    if f.read(1) != b"\n":
        f.readline(1 << 20)  # `target` is inside a line: that line is not a blank one
    while line := f.readline(1 << 20):  # lines read 1 MB at a time at most: a file may have no line ends
        if not line.strip():
            return f.tell()
        if f.tell() >= limit and line.endswith(b"\n"):
            return f.tell()
    return size


def pack_ranges(ranges: Iterator[Range], shard_bytes: int, first_index: int, split: str) -> Iterator[Shard]:
    """Ranges gathered into shards of at least `shard_bytes` (many small files share a shard)."""
    shard, size = Shard(first_index, split), 0
    for r in ranges:
        shard.ranges.append(r)
        size += r.end - r.start  # a running total: folders of millions of small files
        if size >= shard_bytes:
            yield shard
            shard, size = Shard(shard.index + 1, split), 0
    if shard.ranges:
        yield shard


def pack_documents(documents: Iterator[list[str]], shard_bytes: int, first_index: int, split: str,
                   form: str = "records") -> Iterator[Shard]:
    """Documents (lists of texts) gathered into shards of at least `shard_bytes` of text."""
    shard, size = Shard(first_index, split, form=form), 0
    for doc in documents:
        shard.documents.append(doc)
        size += sum(len(t) + 1 for t in doc)
        if size >= shard_bytes:
            yield shard
            shard, size = Shard(shard.index + 1, split, form=form), 0
    if shard.documents:
        yield shard


def dataset_records(source: str, split: str, text_field: str, group_size: int | None = None) -> Iterator[list[str]]:
    """The records of a dataset source (local file or hub id, streamed): one text each, or `group_size` texts
    (consecutive records that form one document, form "groups")."""
    name, config = source, None
    if ":" in source and not Path(source).exists():  # a hub id may carry its config: wikimedia/wikipedia:20231101.en
        name, config = source.rsplit(":", 1)
    texts = dataset_texts(name, split, text_field, streaming=True, config_name=config)
    if not group_size:
        yield from ([text] for text in texts)
        return
    group: list[str] = []
    for text in texts:
        group.append(text)
        if len(group) == group_size:
            yield group
            group = []
    if group:
        yield group


def builtin_documents(split: str) -> Iterator[list[str]]:
    return iter(builtin_corpus(split))


# ---- reading a shard ----


def shard_documents(shard: Shard) -> Iterator[list[str]]:
    """The shard's documents as lists of sentences (empty documents skipped)."""
    if shard.ranges:
        for r in shard.ranges:
            for block in _BLANK_LINE.split(read_range(r)):
                if sentences := split_sentences(block):
                    yield sentences
        return
    for doc in shard.documents:
        if shard.form == "sentences":
            yield list(doc)
            continue
        if shard.form == "groups":
            if sentences := [s for text in doc for s in split_sentences(text)]:
                yield sentences
            continue
        for text in doc:  # a record's text may hold several documents, separated by blank lines
            for block in _BLANK_LINE.split(text):
                if sentences := split_sentences(block):
                    yield sentences


def read_range(r: Range) -> str:
    with open(r.path, "rb") as f:
        f.seek(r.start)
        data = f.read(r.end - r.start)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = _lines_before(r.path, r.start) + data[:e.start].count(b"\n") + 1
        raise UserError(f"{r.path}: not UTF-8 text (invalid byte on line {line})") from None


def _lines_before(path: str, offset: int) -> int:
    lines = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 24))
            lines += block.count(b"\n")
            offset -= len(block)
    return lines


# ---- the plan: every shard of every source ----


def train_sentences(settings: PrepareSettings) -> Iterator[str]:
    for shard in plan(settings):
        if shard.split == VALIDATION:
            continue
        for document in shard_documents(shard):
            if shard.split == TRAIN or not held_out(document, settings.holdout_every):
                yield from document


def plan(settings: PrepareSettings) -> Iterator[Shard]:
    """Every shard of every source, numbered in order: the same list for the same corpus and settings."""
    shard_bytes = max(1, int(settings.shard_mb * 1e6))
    known = total_text_mb(settings)
    if known:  # at least 32 shards (of 1 MB or more): work for every worker, whatever the corpus's size
        shard_bytes = min(shard_bytes, max(1_000_000, int(known * 1e6 / 32)))
    index = 0
    for source in settings.corpus:
        for shard in _source_shards(source, settings, shard_bytes, index):
            index = shard.index + 1
            yield shard


def _source_shards(source: str, settings: PrepareSettings, shard_bytes: int, first: int) -> Iterator[Shard]:
    limit = settings.max_documents
    if source == "builtin":
        train = pack_documents(_first(builtin_documents(settings.train_split), limit), shard_bytes,
                                       first, TRAIN, form="sentences")
        yield from _then(train, lambda i: pack_documents(
            _first(builtin_documents(settings.validation_split or "validation"), limit), shard_bytes, i,
            VALIDATION, form="sentences"), first)
    elif is_text_source(source):
        if limit:  # quick trials: the first documents, read here
            documents = _first((d for s in pack_ranges(text_ranges(source, shard_bytes), shard_bytes,
                                                               0, BOTH) for d in shard_documents(s)),
                               limit)
            yield from pack_documents(documents, shard_bytes, first, BOTH, form="sentences")
        else:
            yield from pack_ranges(text_ranges(source, shard_bytes), shard_bytes, first, BOTH)
    else:
        group = settings.group_size.get(source)
        form = "groups" if group else "records"

        def records(split: str) -> Iterator[list[str]]:
            return _first(dataset_records(source, split, settings.text_field, group), limit)

        if settings.validation_split is None or is_single_split_dataset(Path(source)):
            yield from pack_documents(records(settings.train_split), shard_bytes, first, BOTH, form)
        else:
            train = pack_documents(records(settings.train_split), shard_bytes, first, TRAIN, form)
            yield from _then(train, lambda i: pack_documents(records(settings.validation_split), shard_bytes,
                                                                      i, VALIDATION, form), first)


def _then(shards: Iterator[Shard], rest, first: int) -> Iterator[Shard]:
    """`shards`, then the shards `rest(next index)` makes."""
    index = first
    for shard in shards:
        index = shard.index + 1
        yield shard
    yield from rest(index)


def _first(documents: Iterator[list[str]], limit: int | None) -> Iterator[list[str]]:
    for i, document in enumerate(documents):
        if limit is not None and i >= limit:
            return
        yield document


def total_text_mb(settings: PrepareSettings) -> float | None:
    """MB of text to prepare, when known without reading (text files only), for the time left."""
    if settings.max_documents or not all(is_text_source(s) for s in settings.corpus):
        return None
    from mobilebert.data.corpus import _text_files

    return sum(f.stat().st_size for s in settings.corpus for f in _text_files(s)) / 1e6
