"""Pre-training data for the recipes (`pretrain`, `distill`): options, the prepared folder every rank maps, batches.

Training never reads or tokenizes the raw corpus: it maps a folder written by `mobilebert prepare`. Without
`data.prepared`, the main process prepares `data.corpus` into the cache on first use (later runs with the same
corpus, settings and tokenizer find it there) while the other ranks wait; then every rank maps the same files.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobilebert.data.prepare import PrepareSettings, prepare, summary
from mobilebert.data.prepared import PreparedData, open_prepared
from mobilebert.data.pretraining import MaskSettings, PretrainingBatches
from mobilebert.errors import UserError
from mobilebert.files import atomic_write, read_json_or_none
from mobilebert.tokenizer import Tokenizer

RECORD = "prepared_data.json"  # in a trained model's folder: where its training data was prepared


@dataclass
class DataOptions:
    # A folder from `mobilebert prepare`: train on it as it is (the options below that shape pairs are then its own).
    # distill's default "teacher" takes the folder the teacher was trained on, when the teacher's folder records it.
    prepared: str | None = None
    # builtin | text file or folder | parquet/json/arrow file | datasets hub id; or a list of those, concatenated.
    # A hub id may carry its config after a colon: wikimedia/wikipedia:20231101.en
    corpus: str | list[str] = "builtin"
    train_split: str = "train"
    # Datasets with splits (hub ids, builtin) read this split for validation; null, or a one-split source (text
    # files, a parquet/json file), holds out 1 in holdout_every documents, chosen by a hash of their text.
    validation_split: str | None = "validation"
    holdout_every: int = 20
    text_field: str = "text"
    # Sources whose records are single sentences, with the records that make one document: {bookcorpus/bookcorpus: 64}
    group_size: dict[str, int] = field(default_factory=dict)
    max_documents: int | None = None  # read at most this many documents per source and split (quick trials)
    tokenizer: str | None = None  # folder with tokenizer.json or vocab.txt; None: train one on the corpus
    vocab_size: int = 8192  # for a trained tokenizer
    max_seq_length: int | None = None  # None: the prepared folder's, or 128 when preparing
    short_seq_prob: float = 0.1
    dupe_factor: int = 1
    shard_mb: float = 16.0  # text per preparation shard
    workers: int | None = None  # preparation processes; None: every core
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word_masking: bool = False
    eval_examples: int = 512  # validation pairs scored at each evaluation
    eval_batch_size: int = 64
    loader_workers: int | None = None  # background batch processes; None: 2 on CUDA, 0 (in the loop) on CPU
    verify: bool = True  # check every prepared file's sha256 on the main process before training
    cache_dir: str | None = None  # where prepared data is cached; default OUT/cache

    def __post_init__(self) -> None:
        if isinstance(self.corpus, list) and not self.corpus:
            raise UserError("data.corpus is an empty list: name at least one source")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"data.workers must be at least 1, got {self.workers}")

    def prepare_settings(self) -> PrepareSettings:
        corpus = (self.corpus,) if isinstance(self.corpus, str) else tuple(self.corpus)
        return PrepareSettings(corpus, train_split=self.train_split, validation_split=self.validation_split,
                               holdout_every=self.holdout_every, text_field=self.text_field,
                               group_size=dict(self.group_size), max_documents=self.max_documents,
                               max_seq_length=self.max_seq_length or 128, short_seq_prob=self.short_seq_prob,
                               dupe_factor=self.dupe_factor, shard_mb=self.shard_mb)


def check_options(options: DataOptions) -> None:
    """What can be checked before any corpus is read: settings, the prepared folder or tokenizer, sources."""
    if options.prepared and options.prepared != "teacher":
        open_prepared(options.prepared, verify=False)
    else:
        options.prepare_settings()
        if options.tokenizer:
            Tokenizer.from_pretrained(options.tokenizer)


def prepare_data(options: DataOptions, out: Path, dist: Any, teacher: str | None = None,
                 resume: bool = False) -> PreparedData:
    """The prepared folder to train on (prepared first when needed, by the main process), mapped on every rank.

    `teacher`: distill's teacher folder, whose record names the data it was trained on (see `DataOptions`). The
    other ranks wait for the main one by polling a file in the run folder, not in a collective: preparing a corpus
    can take hours, and collectives time out after minutes. They map the folder the main rank names there.
    """
    ready = Path(out) / ".prepared-data"
    pinned = _pinned(ready) if resume else None  # a resumed run trains on the data it started with
    if dist.is_main:
        ready.unlink(missing_ok=True)
    dist.barrier()
    if dist.is_main:
        folder = pinned or _resolve(options, out, teacher)
        data = open_prepared(folder, verify=options.verify)
        _check_length(options, data)
        atomic_write(ready, lambda p: p.write_text(str(Path(folder).resolve())))
    else:
        while not ready.is_file():  # the main rank is preparing (or failed: torchrun then stops every rank)
            time.sleep(1.0)
        data = open_prepared(ready.read_text(), verify=False)
    dist.barrier()
    return data


def _pinned(ready: Path) -> Path | None:
    """The folder an earlier start of this run trained on, while it is still complete."""
    if not ready.is_file():
        return None
    folder = Path(ready.read_text().strip())
    return folder if (folder / "manifest.json").is_file() else None


def _resolve(options: DataOptions, out: Path, teacher: str | None) -> Path:
    if options.prepared == "teacher":
        recorded = _teacher_record(teacher)
        if recorded is not None:
            print(f"using the teacher's prepared data: {recorded} (data.prepared: teacher; --data.prepared null "
                  "prepares data.corpus instead)")
            return recorded
    elif options.prepared:
        return Path(options.prepared)
    if options.prepared == "teacher":
        print(f"the teacher {teacher} records no prepared data (no {RECORD} beside its weights, or its folder is "
              f"gone): preparing data.corpus {options.corpus} with its tokenizer")
    settings = options.prepare_settings()
    tokenizer = options.tokenizer
    fingerprint = Tokenizer.from_pretrained(tokenizer).fingerprint() if tokenizer else None
    cache = Path(options.cache_dir) if options.cache_dir else out / "cache"
    identity = settings.identity()  # stats every corpus file: once
    request = {**identity, "tokenizer": fingerprint}
    for candidate in sorted(cache.glob("prepared-*/manifest.json")) if fingerprint else []:
        if (read_json_or_none(candidate) or {}).get("request") == request:  # same data, made by another run
            return candidate.parent
    wanted = {**identity, "tokenizer": fingerprint or {"train": options.vocab_size}}
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = cache / f"prepared-{key}"
    if not (folder / "manifest.json").is_file():
        manifest = prepare(settings, folder, tokenizer, options.vocab_size, options.workers, resume=True,
                           wait=True)  # another run sharing the cache may be preparing the same data
        print(f"prepared {summary(manifest)}: {folder}")
    return folder


def _teacher_record(teacher: str | None) -> Path | None:
    record = Path(teacher) / RECORD if teacher else None
    if record is None or not record.is_file():
        return None
    folder = Path((read_json_or_none(record) or {}).get("folder", record.parent / "missing"))
    return folder if (folder / "manifest.json").is_file() else None


def _check_length(options: DataOptions, data: PreparedData) -> None:
    asked = options.max_seq_length
    if asked is not None and asked != data.max_seq_length:
        shorter = "shorter than" if data.max_seq_length < asked else "longer than"
        raise UserError(f"{data.folder}: prepared with max_seq_length {data.max_seq_length}, {shorter} the "
                        f"data.max_seq_length {asked} asked; prepare the corpus again with that length")


def check_tokenizer(data: PreparedData, tokenizer: Tokenizer, owner: str) -> None:
    """The prepared ids must mean what the model's vocabulary means."""
    if tokenizer.fingerprint() != data.tokenizer_fingerprint:
        raise UserError(f"{data.folder}: prepared with another tokenizer than {owner}'s (vocabulary "
                        f"fingerprints {data.tokenizer_fingerprint} and {tokenizer.fingerprint()}); "
                        "prepare the corpus with --tokenizer pointing at it")


def write_record(model_folder: Path, data: PreparedData) -> None:
    """Note in a trained model's folder which prepared data it was trained on (distill reuses it)."""
    content = json.dumps({"folder": str(data.folder.resolve()), "tokenizer": data.tokenizer_fingerprint})
    atomic_write(Path(model_folder) / RECORD, lambda p: p.write_text(content + "\n"))


def batches_for(pairs: Any, tokenizer: Tokenizer, options: DataOptions, batch_size: int, seed: int,
                rank: int = 0, world_size: int = 1) -> PretrainingBatches:
    word_start = np.array(tokenizer.word_starts(range(tokenizer.vocab_size))) if options.whole_word_masking else None
    masking = MaskSettings(options.masked_lm_prob, options.max_predictions_per_seq, options.whole_word_masking)
    return PretrainingBatches(pairs, batch_size, tokenizer.vocab_size, tokenizer.mask_id, tokenizer.pad_id,
                              tokenizer.special_ids, masking, seed, word_start, rank, world_size)


def loader_workers(options: DataOptions, device_type: str) -> int:
    if options.loader_workers is not None:
        return options.loader_workers
    return 2 if device_type == "cuda" else 0
