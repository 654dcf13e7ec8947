"""The built-in corpus: the running interpreter's standard-library docstrings, offline and deterministic.

`load_corpus("builtin")` reads it; the demo, the tests and the quick starts pre-train on it. Each docstring with at
least two prose sentences is a document; about 5% of them (by a stable hash of their name) are the validation split.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mobilebert.data.corpus import SPLITS, Document, check_split, split_sentences

# sha256 (first 16 hex digits) of each split of the built-in corpus, per Python minor version: the standard library's
# docstrings change between versions. Measured on CPython 3.11.7; see `builtin_corpus_checksum`.
BUILTIN_CHECKSUMS = {
    "3.11": {"train": "0041a459fbf0fadd", "validation": "1184dcac4a8bdc42"},
}


# Folders of the standard library that hold tests, third-party packages or no Python sources.
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                           "lib-dynload"})
_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`~?([^`<]*?)\s*(?:<[^>]*>)?`")  # :func:`~os.path.join` -> os.path.join
_LITERAL = re.compile(r"``?([^`]*)``?")  # ``literal`` and `literal` -> literal
_MIN_WORDS = 3


def builtin_corpus(split: str = "train") -> list[Document]:
    """The built-in English corpus: docstrings of the running interpreter's standard library, one per document.

    Works offline on any machine and is deterministic for a Python version (the library's sources are parsed with
    `ast`, never imported). Repeated docstrings are kept once. About 5% of documents, chosen by a hash of their
    module and qualified name, form the "validation" split. The extraction takes seconds and is cached in memory.
    """
    return [list(doc) for doc in _builtin_splits()[check_split(split)]]


def builtin_corpus_checksum(split: str = "train") -> str:
    """sha256 (first 16 hex digits) of a split's text; compare with `BUILTIN_CHECKSUMS` for this Python version."""
    docs = _builtin_splits()[check_split(split)]
    text = "\n\n".join("\n".join(doc) for doc in docs)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def builtin_corpus_stats() -> dict[str, Any]:
    """Documents, sentences and words of each split of the built-in corpus, and the Python version it came from."""
    stats: dict[str, Any] = {"python": python_version()}
    for split, docs in _builtin_splits().items():
        sentences = [s for doc in docs for s in doc]
        stats[split] = {"documents": len(docs), "sentences": len(sentences),
                        "words": sum(len(s.split()) for s in sentences)}
    return stats


def python_version() -> str:
    """The running Python's minor version, the key of `BUILTIN_CHECKSUMS`, e.g. "3.11"."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@functools.lru_cache(maxsize=1)
def _builtin_splits() -> dict[str, tuple[tuple[str, ...], ...]]:
    splits: dict[str, list[tuple[str, ...]]] = {split: [] for split in SPLITS}
    seen: set[tuple[str, ...]] = set()  # overriding methods repeat docstrings; a repeat could cross the split
    for name, path in _stdlib_files():
        tree = _parse(path)
        if tree is None:
            continue
        for qualname, docstring in _docstrings(tree):
            sentences = tuple(docstring_sentences(docstring))
            if len(sentences) < 2 or sentences in seen:  # under 2 sentences: nothing to pair for next-sentence
                continue
            seen.add(sentences)
            # A stable hash (unlike hash(), which is salted per process) keeps the split fixed across runs.
            split = "validation" if zlib.crc32(f"{name}:{qualname}".encode()) % 20 == 0 else "train"
            splits[split].append(sentences)
    return {split: tuple(docs) for split, docs in splits.items()}


def _stdlib_files() -> list[tuple[str, Path]]:
    """(path relative to the standard library, absolute path) of its Python sources, sorted, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("config-")]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(folder, filename)
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def _parse(path: Path) -> ast.Module | None:
    """The syntax tree of a source file, or None when it is not UTF-8 or not valid Python for this interpreter."""
    try:
        source = path.read_bytes().decode("utf-8")
        with warnings.catch_warnings():  # invalid escape sequences in old sources warn; they are not our concern
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None


def _docstrings(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) of the module and of every class and function in it, in source order."""
    if isinstance(node, ast.Module) and (doc := ast.get_docstring(node, clean=True)):
        yield "", doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + child.name
            if doc := ast.get_docstring(child, clean=True):
                yield name, doc
            yield from _docstrings(child, name + ".")
        else:
            yield from _docstrings(child, prefix)


def docstring_sentences(docstring: str) -> list[str]:
    """The prose sentences of a docstring: doctests, literal blocks and symbol-heavy lines dropped, reST roles
    unwrapped (:func:`x` -> x), sentences under three words dropped."""
    text = "\n".join(_prose_lines(docstring))
    text = _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))
    return [s for s in split_sentences(text) if len(s.split()) >= _MIN_WORDS]


def _prose_lines(docstring: str) -> Iterator[str]:
    literal_indent = None  # indentation of the line that opened a literal block with '::'
    in_doctest = False
    for line in docstring.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped:
            in_doctest = False  # a doctest's expected output runs to the next blank line
            yield ""
            continue
        if literal_indent is not None and indent > literal_indent:
            continue
        literal_indent = None
        if stripped.startswith((">>>", "...")) or in_doctest:
            in_doctest = True
            continue
        if stripped.endswith("::"):
            literal_indent = indent
            stripped = stripped[:-1]  # "For example::" reads "For example:"
        if stripped.startswith(".. ") or _is_symbolic(stripped):  # reST directives, tables, rules, code
            continue
        yield stripped


def _is_symbolic(line: str) -> bool:
    chars = line.replace(" ", "")
    return sum(c.isalpha() for c in chars) < 0.5 * len(chars)
