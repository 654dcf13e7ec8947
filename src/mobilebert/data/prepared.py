"""A prepared-data folder (written by `data/prepare.py`) read through memory maps.

Every rank maps the same files and touches only the pages of the examples it reads: opening costs a few KB per
shard, whatever the corpus size. Integrity is checked on open: array shapes always (a truncated file is caught),
every file's sha256 against the manifest when `verify` is set (about a second per GB).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobilebert.data.prepare import read_manifest
from mobilebert.data.shard_work import ARRAYS, sha256_file
from mobilebert.errors import UserError


@dataclass
class _Shard:
    tokens: np.ndarray  # (N_tokens,) uint16 or int32, memory-mapped
    offsets: np.ndarray  # (N + 1,) int64: pair i is tokens[offsets[i]:offsets[i + 1]]
    first_lengths: np.ndarray  # (N,) int32: length of [CLS] A [SEP]
    is_random_next: np.ndarray  # (N,) int8: the NSP label


class PreparedPairs:
    """The NSP pairs of one split over all shards, indexed 0..len-1 in shard order.

    Every shard file's header and size are checked when the folder is opened (a truncated file is caught), but a
    shard is mapped only when an example of it is read, and at most `OPEN_SHARDS` stay mapped: each map holds a file
    descriptor, and the paper's corpus has thousands of shard files (the usual limit is 1024 per process).
    """

    OPEN_SHARDS = 64

    def __init__(self, folder: Path, manifest: dict[str, Any], split: str) -> None:
        self.folder, self.split = Path(folder), split
        self._folders: list[Path] = []
        counts = []
        for meta in manifest["shards"]:
            n = meta["counts"][f"{split}_pairs"]
            if n:
                shard = self.folder / "shards" / f"{meta['index']:05d}"
                _check_shard(shard, split, n)
                self._folders.append(shard)
                counts.append(n)
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # first example of each shard
        self._open: OrderedDict[int, _Shard] = OrderedDict()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def pair(self, i: int) -> tuple[np.ndarray, int, int]:
        """(token ids as int64, length of [CLS] A [SEP], is_random_next) of example i."""
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        shard, j = self._shard(s), i - int(self._starts[s])
        ids = shard.tokens[shard.offsets[j]:shard.offsets[j + 1]].astype(np.int64)
        return ids, int(shard.first_lengths[j]), int(shard.is_random_next[j])

    def _shard(self, s: int) -> _Shard:
        if s in self._open:
            self._open.move_to_end(s)
        else:
            self._open[s] = _Shard(**{name: np.load(self._folders[s] / f"{self.split}-{name}.npy", mmap_mode="r",
                                                    allow_pickle=False) for name in ARRAYS})
            if len(self._open) > self.OPEN_SHARDS:
                self._open.popitem(last=False)  # the least recently read: its maps close with it
        return self._open[s]

    def __getstate__(self) -> dict[str, Any]:
        # Background loader workers started with spawn get the folder, not copies of mapped arrays.
        return {"folder": self.folder, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], read_manifest(state["folder"]), state["split"])


def _check_shard(folder: Path, split: str, pairs: int) -> None:
    """Each array file's header, shape and size, read without mapping it."""
    expected = {"offsets": (pairs + 1,), "first_lengths": (pairs,), "is_random_next": (pairs,)}
    for name in ARRAYS:
        path = folder / f"{split}-{name}.npy"
        try:
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                data_start = f.tell()
        except FileNotFoundError:
            raise UserError(f"{path}: missing; the prepared folder is incomplete") from None
        except ValueError as e:  # a garbled header
            raise UserError(f"{path}: cannot be read ({e}); prepare the data again") from None
        size = data_start + int(np.prod(shape)) * dtype.itemsize
        if path.stat().st_size < size:
            raise UserError(f"{path}: cannot be read (truncated: {path.stat().st_size} of {size} bytes); prepare "
                            "the data again")
        if name in expected and shape != expected[name]:
            raise UserError(f"{folder}: {split} arrays do not match the manifest's {pairs} pairs; prepare again")


@dataclass
class PreparedData:
    """An opened prepared-data folder: the manifest, the tokenizer and both splits."""

    folder: Path
    manifest: dict[str, Any]
    tokenizer: Any  # mobilebert.tokenizer.Tokenizer: the ids of the shards mean its tokens
    train: PreparedPairs
    validation: PreparedPairs

    @property
    def max_seq_length(self) -> int:
        return int(self.manifest["max_seq_length"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]


def open_prepared(folder: str | Path, verify: bool = True) -> PreparedData:
    """Open a prepared folder; with `verify`, every file's sha256 is checked against the manifest first."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_checksums(folder, manifest)
    if not (folder / "tokenizer" / "tokenizer.json").is_file() and not (folder / "tokenizer" / "vocab.txt").is_file():
        raise UserError(f"{folder}: no tokenizer/ folder; the prepared folder is incomplete")
    from mobilebert.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(folder / "tokenizer")
    if tokenizer.fingerprint() != manifest["tokenizer"]:
        raise UserError(f"{folder}: its tokenizer/ is not the tokenizer the shards were made with (fingerprint "
                        f"{manifest['tokenizer']}); prepare again")
    return PreparedData(folder, manifest, tokenizer, PreparedPairs(folder, manifest, "train"),
                        PreparedPairs(folder, manifest, "validation"))


def verify_checksums(folder: Path, manifest: dict[str, Any]) -> None:
    for meta in manifest["shards"]:
        shard = folder / "shards" / f"{meta['index']:05d}"
        for name, expected in meta["files"].items():
            path = shard / name
            if not path.is_file():
                raise UserError(f"{path}: missing; the prepared folder is incomplete")
            if sha256_file(path) != expected:
                raise UserError(f"{path}: checksum mismatch (the file is corrupted or was changed); prepare again")
