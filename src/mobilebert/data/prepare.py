"""Corpus → tokenizer → tokenized documents → BERT NSP pairs, written as shards of flat token arrays on disk.

The folder a preparation writes (read back by `data/prepared.py`):

    request.json          what was asked (sources, settings, tokenizer fingerprint): a resume must ask the same
    tokenizer/            the tokenizer, in transformers' files
    shards/00012/         one shard: {train,validation}-{tokens,offsets,first_lengths,is_random_next}.npy, meta.json
    manifest.json         written last, so its presence means "complete": settings, counts, every file's sha256

Memory does not grow with the corpus: the main process plans shards (text files: by seeking to blank lines) and at
most two shards per worker are in flight; a worker holds one shard (~`shard_mb` of text) at a time. Each shard's
bytes depend only on its text, the tokenizer and (seed, shard index), so any number of workers writes the same
bytes, and a killed preparation resumes from its finished shards.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mobilebert.data import shard_work, sources
from mobilebert.data.corpus import _text_files
from mobilebert.data.pairs import PairSettings
from mobilebert.errors import UserError
from mobilebert.files import atomic_write, read_json, read_json_or_none, remove_output_folder

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PrepareSettings:
    """What to prepare. Pair settings as BERT's create_pretraining_data; the rest says where the text comes from."""

    corpus: tuple[str, ...] = ("builtin",)  # builtin | text files/folders | parquet/json/arrow | hub ids
    train_split: str = "train"
    # Datasets with splits of their own (hub ids, the built-in corpus) read this one; None, or a source with one
    # split (text files, a local data file), holds out 1 in `holdout_every` documents by a hash of their text.
    validation_split: str | None = "validation"
    holdout_every: int = 20
    text_field: str = "text"
    # Dataset sources whose records are single sentences (BookCorpus), with the records per document: {source: n}
    group_size: dict[str, int] = field(default_factory=dict)
    max_documents: int | None = None  # per source and split: quick trials on big corpora
    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    dupe_factor: int = 1
    seed: int = 12345
    # Text per shard at most: the unit of work (a worker holds ~10 MB per MB of it) and the pool of random next
    # sentences. Text files of known size are cut into at least 32 shards (of 1 MB or more) to keep workers busy.
    shard_mb: float = 16.0

    def __post_init__(self) -> None:
        if not self.corpus:
            raise UserError("data.corpus is empty: name at least one source")
        if self.max_seq_length < 8:
            raise UserError(f"data.max_seq_length must be at least 8, got {self.max_seq_length}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise UserError(f"data.short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        for name in ("dupe_factor", "holdout_every"):
            if getattr(self, name) < 1:
                raise UserError(f"data.{name} must be at least 1, got {getattr(self, name)}")
        for source, size in self.group_size.items():
            if source not in self.corpus or size < 1:
                raise UserError(f"data.group_size: {source!r}: {size} records per document; name a source of "
                                "data.corpus and a size of at least 1")
        if self.max_documents is not None and self.max_documents < 1:
            raise UserError(f"data.max_documents must be at least 1 (or null: all), got {self.max_documents}")
        if self.shard_mb <= 0:
            raise UserError(f"data.shard_mb must be positive, got {self.shard_mb}")
        for source in self.corpus:
            _check_source(source)

    def pair_settings(self, split: str, shard: int) -> PairSettings:
        """Each shard and split draws from its own generator, seeded by (seed, split, shard)."""
        digest = hashlib.sha256(f"{self.seed}/{split}/{shard}".encode()).digest()
        return PairSettings(self.max_seq_length, self.short_seq_prob, self.dupe_factor if split == "train" else 1,
                            seed=int.from_bytes(digest[:8], "little"))

    def identity(self) -> dict[str, Any]:
        """What decides the prepared bytes (not the worker count): compared on resume and on reuse."""
        return {"format": FORMAT_VERSION, **asdict(self), "corpus": list(self.corpus),
                "sources": [_signature(s) for s in self.corpus]}


def _check_source(source: str) -> None:
    path = Path(source)
    looks_local = source.startswith((".", "/", "~")) or path.suffix in (".txt", ".parquet", ".json", ".jsonl",
                                                                         ".csv", ".arrow")
    if source != "builtin" and looks_local and not path.exists():
        raise UserError(f"{source}: no such file or folder")


def _signature(source: str) -> Any:
    """Cheap identity of a source: files by size and modification time (like make), hub ids by name."""
    path = Path(source)
    if sources.is_text_source(source):
        return _file_stats(_text_files(source))
    if path.exists():  # a local data file or save_to_disk folder
        return [source, _file_stats([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()))]
    return source


def _file_stats(files: list[Path]) -> list[list]:
    return [[str(f), stat.st_size, stat.st_mtime_ns] for f in files for stat in [f.stat()]]


@dataclass
class Progress:
    """Counts of the work done, for the progress bar and the manifest's totals."""

    text_bytes: int = 0
    shards: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, meta: dict[str, Any]) -> None:
        self.text_bytes += meta["text_bytes"]
        self.shards += 1
        for key, value in meta["counts"].items():
            self.counts[key] = self.counts.get(key, 0) + value


# ---- the whole preparation ----


def prepare(settings: PrepareSettings, out: Path, tokenizer_dir: str | None = None, vocab_size: int = 8192,
            workers: int | None = None, resume: bool = False, overwrite: bool = False,
            show_progress: bool = True, wait: bool = False) -> dict[str, Any]:
    """Prepare `settings.corpus` into `out` (see the module docstring); returns the manifest.

    `tokenizer_dir`: a tokenizer to load; None trains a WordPiece vocabulary of `vocab_size` on the train split,
    streamed twice. `workers`: processes that tokenize and cut pairs (default: every core). A complete `out` is
    returned as it is when `resume` is set and it was prepared from the same request; an unfinished one continues
    from its finished shards. `wait`: when another process is preparing into `out`, wait for it (then continue or
    return its result, as `resume` says) instead of refusing — what training runs sharing a cache want.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; --out names the folder to prepare into")
    with _exclusive(out, wait):
        fresh = not out.exists() or not any(out.iterdir())
        _claim(out, resume, overwrite)
        try:
            return _prepare(settings, out, tokenizer_dir, vocab_size, workers, show_progress)
        except UserError:
            if fresh and not any((out / "shards").glob("0*")):  # refused before any work was done: leave nothing
                shutil.rmtree(out, ignore_errors=True)
            raise


@contextlib.contextmanager
def _exclusive(out: Path, wait: bool = False):
    """One preparation at a time into `out` (two runs sharing a cache, a resume beside a running pretrain): a lock
    file beside the folder, released by the system however the process ends. `wait` blocks until it is free."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise UserError(f"{out}: another process is preparing into it; wait for it to finish, or choose "
                                "another --out") from None
            print(f"{out}: another run is preparing this data; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prepare(settings: PrepareSettings, out: Path, tokenizer_dir: str | None, vocab_size: int, workers: int | None,
             show_progress: bool) -> dict[str, Any]:
    tokenizer = _tokenizer(settings, out, tokenizer_dir, vocab_size)
    request = {**settings.identity(), "tokenizer": tokenizer.fingerprint()}
    request_file = out / "request.json"
    if request_file.is_file():
        # checked before anything in the folder changes
        if read_json(request_file, "; prepare again with --overwrite") != request:
            raise UserError(f"{out}: was prepared from another corpus, settings or tokenizer; use --overwrite to "
                            "start again or another --out")
        if (out / "manifest.json").is_file():
            return read_manifest(out)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        tokenizer.save_pretrained(out / "tokenizer")  # the folder carries the tokenizer its ids mean
    if not request_file.is_file():
        atomic_write(request_file, lambda p: p.write_text(json.dumps(request, indent=1) + "\n"))
    done = _run_shards(settings, out, tokenizer, workers or os.cpu_count() or 1, show_progress)
    return _write_manifest(out, settings, tokenizer, request, done)


PREPARED_MARKERS = ("request.json", "manifest.json", "shards", "tokenizer")  # what a preparation writes first


def _claim(out: Path, resume: bool, overwrite: bool) -> None:
    if overwrite:
        remove_output_folder(out, PREPARED_MARKERS, "a prepared-data folder")
    if out.exists() and any(out.iterdir()) and not resume:
        state = "a finished" if (out / "manifest.json").is_file() else "an unfinished"
        if not (out / "request.json").is_file():
            raise UserError(f"{out}: exists and is not a prepared-data folder; choose another --out")
        raise UserError(f"{out}: holds {state} preparation; add --resume to continue it (or use it as it is), "
                        "--overwrite to start again")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for stale in (out / "shards").glob(".*.tmp"):  # shards a killed preparation was writing
        shutil.rmtree(stale, ignore_errors=True)


def _tokenizer(settings: PrepareSettings, out: Path, tokenizer_dir: str | None, vocab_size: int):
    from mobilebert.tokenizer import Tokenizer  # imported here: it imports torch, which workers never need

    saved = out / "tokenizer"
    if tokenizer_dir:
        return Tokenizer.from_pretrained(tokenizer_dir)
    if (saved / "tokenizer.json").is_file():  # trained by an earlier, interrupted run
        return Tokenizer.from_pretrained(saved)
    print(f"training a WordPiece vocabulary of {vocab_size} on {', '.join(settings.corpus)} (two passes)")
    tokenizer = Tokenizer.train_from_stream(lambda: sources.train_sentences(settings), vocab_size=vocab_size)
    tokenizer.save_pretrained(saved)  # before the shards: a resumed run must not train another one
    return tokenizer


# ---- shards, in worker processes ----


def _run_shards(settings: PrepareSettings, out: Path, tokenizer, workers: int, show_progress: bool) -> list[dict]:
    """Prepare every shard not already finished; returns every shard's meta, in shard order."""
    done: dict[int, dict] = {}
    total = sources.total_text_mb(settings)
    bar = _bar(total, show_progress)
    progress = Progress()
    job = {"tokenizer": tokenizer.backend.to_str(), "settings": settings, "out": str(out)}

    def finished(meta: dict) -> None:
        done[meta["index"]] = meta
        progress.add(meta)
        if bar is not None:
            bar.update(meta["text_bytes"] / 1e6)
            bar.set_postfix({"shards": progress.shards, "pairs": progress.counts.get("train_pairs", 0)},
                            refresh=False)

    pending: set[futures.Future] = set()
    try:
        with _pool(workers, job["tokenizer"]) as pool:
            try:
                for shard in sources.plan(settings):
                    meta = _finished_meta(out, shard)
                    if meta is not None:
                        finished(meta)
                        continue
                    pending.add(pool.submit(shard_work.prepare_shard, shard, job))
                    while len(pending) >= 2 * workers:  # bounded: the plan never runs far ahead of the workers
                        ready, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                        for f in ready:
                            finished(f.result())
                for f in futures.as_completed(pending):
                    finished(f.result())
            except BaseException:
                for f in pending:  # an error (a bad file) or an interrupt: start nothing more, then wait
                    f.cancel()
                raise
    except BrokenProcessPool:
        raise UserError(f"a preparation worker died (killed, or out of memory: try fewer --workers or a smaller "
                        f"data.shard_mb); the finished shards are kept: rerun with --resume to go on into {out}") \
            from None
    finally:
        if bar is not None:
            bar.close()
    return [done[i] for i in sorted(done)]


def _bar(total_mb: float | None, show: bool):
    if not show or os.environ.get("MOBILEBERT_PROGRESS") == "0":
        return None
    import sys

    from tqdm.auto import tqdm

    # tqdm prints a float count as it is (1.3635659999999998MB): one decimal instead.
    shape = "{desc}: {n:.1f} MB [{elapsed}, {rate_fmt}{postfix}]" if total_mb is None else \
        "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} MB [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    return tqdm(total=total_mb, desc="prepare", unit="MB", dynamic_ncols=True, bar_format=shape,
                mininterval=0.5 if sys.stderr.isatty() else 30.0)


class _Inline:
    """The pool's interface in this process (one worker): no start-up cost, the same bytes."""

    def __init__(self, tokenizer_json: str) -> None:
        shard_work.init_worker(tokenizer_json, set_env=False)

    def submit(self, fn, *args) -> futures.Future:
        f: futures.Future = futures.Future()
        with _serial_tokenizer():
            f.set_result(fn(*args))
        return f

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


@contextlib.contextmanager
def _serial_tokenizer():
    """tokenizers reads TOKENIZERS_PARALLELISM at every call: one worker means one core, as in a worker process."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _pool(workers: int, tokenizer_json: str):
    if workers == 1:
        return _Inline(tokenizer_json)
    # spawn: a clean interpreter per worker (no forked torch threads or tokenizers state); it imports no torch.
    return futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=shard_work.init_worker, initargs=(tokenizer_json,))


def _finished_meta(out: Path, shard: sources.Shard) -> dict | None:
    meta_file = out / "shards" / f"{shard.index:05d}" / "meta.json"
    if not meta_file.is_file():
        return None
    meta = read_json_or_none(meta_file)
    if meta is None:
        return None  # damaged: the shard is prepared again
    files_there = all((meta_file.parent / name).is_file() for name in meta.get("files", {}))
    return meta if meta.get("key") == shard.key() and files_there else None


# ---- the manifest ----


def _write_manifest(out: Path, settings: PrepareSettings, tokenizer, request: dict, shards: list[dict]) -> dict:
    progress = Progress()
    for meta in shards:
        progress.add(meta)
    totals = progress.counts
    if not totals.get("train_pairs"):
        raise UserError(f"corpus {', '.join(settings.corpus)} is empty: no sentence pairs in its train split "
                        "(it needs at least two documents with text)")
    manifest = {"format": FORMAT_VERSION, "request": request, "tokenizer": tokenizer.fingerprint(),
                "vocab_size": tokenizer.vocab_size, "max_seq_length": settings.max_seq_length,
                "text_bytes": progress.text_bytes, "totals": totals,
                "disk_bytes": sum((out / "shards" / f"{m['index']:05d}" / name).stat().st_size
                                  for m in shards for name in m["files"]),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shards": shards}
    atomic_write(out / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        if (Path(folder) / "request.json").is_file():
            raise UserError(f"{folder}: the preparation did not finish; run `mobilebert prepare` again with "
                            "--resume")
        raise UserError(f"{folder}: not a prepared-data folder (no manifest.json); make one with "
                        "`mobilebert prepare`")
    manifest = read_json(path, "; prepare the data again")
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: prepared-data format {manifest.get('format')}, this version reads "
                        f"{FORMAT_VERSION}; prepare again")
    return manifest


def summary(manifest: dict[str, Any]) -> str:
    t = manifest["totals"]
    shards = len(manifest["shards"])
    return (f"{manifest['text_bytes'] / 1e6:.1f} MB of text in {shards} shard{'s' * (shards != 1)}: "
            f"{t.get('train_documents', 0):,} + {t.get('validation_documents', 0):,} documents, "
            f"{t.get('train_sentences', 0):,} + {t.get('validation_sentences', 0):,} sentences, "
            f"{t.get('train_tokens', 0):,} + {t.get('validation_tokens', 0):,} tokens in "
            f"{t.get('train_pairs', 0):,} + {t.get('validation_pairs', 0):,} train + validation pairs; "
            f"{manifest['disk_bytes'] / 1e6:.1f} MB on disk")
