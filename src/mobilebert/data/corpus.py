"""Corpus sources for pre-training: a built-in offline corpus, plain text files and Hugging Face datasets.

A corpus is a list (or, when streaming, an iterator) of documents; a document is a `list[str]` of sentences. This is
BERT's create_pretraining_data format: next-sentence pairs are cut at sentence boundaries inside one document.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import os
import re
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mobilebert.errors import UserError

Document = list[str]
SPLITS = ("train", "validation")

# sha256 (first 16 hex digits) of each split of the built-in corpus, per Python minor version: the standard library's
# docstrings change between versions. Measured on CPython 3.11.7; see `builtin_corpus_checksum`.
BUILTIN_CHECKSUMS = {
    "3.11": {"train": "0041a459fbf0fadd", "validation": "1184dcac4a8bdc42"},
}

# ---- sentences ----

_ABBREVIATIONS = frozenset({"e.g.", "i.e.", "etc.", "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.", "vs.",
                            "cf.", "al.", "no.", "fig.", "approx."})
# A boundary: end punctuation (and closing quotes or brackets), then a space and a sentence start. Applied to text
# whose whitespace is collapsed, so the space is exactly one.
_BOUNDARY = re.compile(r"""[.!?]+["'”’)\]]*(?= ["'“‘(\[]?[A-Z0-9])""")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences with a small rule set (whitespace collapsed inside each sentence).

    A sentence ends at `.`, `!` or `?` (possibly followed by closing quotes or brackets) when whitespace and an
    uppercase letter, digit, quote or bracket follow, unless the last word is a common abbreviation (e.g., i.e.,
    etc., Mr., Dr., vs., ...) or an initial ("J. Smith"). A blank line always ends a sentence.
    """
    sentences = []
    for paragraph in _BLANK_LINE.split(text):
        sentences.extend(_split_paragraph(" ".join(paragraph.split())))
    return sentences


def _split_paragraph(text: str) -> list[str]:
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        space = text.rfind(" ", start, end)  # the candidate's last word, found without copying the candidate
        if _ends_with_abbreviation(text[space + 1 if space >= 0 else start:end]):
            continue
        sentences.append(text[start:end].strip())
        start = end
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _ends_with_abbreviation(word: str) -> bool:
    word = word.lstrip("\"'“‘([").lower()
    # An initial ("J."): written out, not as a regular expression, since this runs at every candidate boundary.
    return word in _ABBREVIATIONS or (len(word) == 2 and word[1] == "." and "a" <= word[0] <= "z")


# ---- the built-in corpus: the standard library's docstrings ----

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
    return [list(doc) for doc in _builtin_splits()[_check_split(split)]]


def builtin_corpus_checksum(split: str = "train") -> str:
    """sha256 (first 16 hex digits) of a split's text; compare with `BUILTIN_CHECKSUMS` for this Python version."""
    docs = _builtin_splits()[_check_split(split)]
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


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return split


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


# ---- plain text files ----


def read_text_files(paths: str | Path | list[str | Path]) -> list[Document]:
    """Documents from UTF-8 text files or folders of them (`*.txt`, recursively, in sorted order).

    Documents are separated by one or more blank lines and split into sentences with `split_sentences`.
    """
    documents = []
    for file in _text_files(paths):
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{file}: not UTF-8 text (invalid byte at offset {e.start})") from None
        for block in _BLANK_LINE.split(text):
            if sentences := split_sentences(block):
                documents.append(sentences)
    return documents


def _text_files(paths: str | Path | list[str | Path]) -> list[Path]:
    files = []
    for path in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if path.is_dir():
            files.extend(sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix()))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


# ---- Hugging Face datasets ----

_DATA_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def read_dataset(source: str, split: str = "train", text_field: str = "text", streaming: bool = False,
                 config_name: str | None = None, group_size: int | None = None) -> Iterator[Document]:
    """Documents from a Hugging Face dataset: a local data file or a hub id.

    A local `.parquet`, `.json`/`.jsonl`, `.csv` or `.arrow` file, or a folder written by `Dataset.save_to_disk`,
    holds the one split "train"; slices such as "train[:95%]" select part of it (not of an .arrow file, nor when
    streaming). A folder written by `DatasetDict.save_to_disk` has its own splits. Any other `source` is a hub id,
    e.g. "wikimedia/wikipedia" with config "20231101.en", or "bookcorpus".

    Each record's `text_field` is split into documents at blank lines (a Wikipedia article is one record and one
    document). Datasets whose records are single sentences (bookcorpus) need `group_size`: consecutive records are
    then grouped into documents of that many sentences. The dataset is opened (and checked) at once; documents are
    read lazily.
    """
    texts = dataset_texts(source, split, text_field, streaming, config_name)
    return _grouped_documents(texts, group_size) if group_size else _blank_line_documents(texts)


def dataset_texts(source: str, split: str = "train", text_field: str = "text", streaming: bool = False,
                  config_name: str | None = None) -> Iterator[str]:
    """The non-empty `text_field` of each record of a dataset (see `read_dataset`), unsplit. The dataset is opened
    and its columns checked at once; records are read lazily."""
    dataset = _open_dataset(source, split, streaming, config_name)
    columns = dataset.column_names  # None for some streamed datasets, whose columns are only known when read
    if columns is not None and text_field not in columns:
        raise UserError(f"{source}: no text field {text_field!r}; the columns are {', '.join(columns)}")
    return _record_texts(dataset, source, text_field)


def _open_dataset(source: str, split: str, streaming: bool, config_name: str | None) -> Any:
    import datasets  # imported here: it is slow to import and only this source needs it

    path = Path(source)
    if path.exists() or path.suffix in _DATA_FILE_BUILDERS:
        return _open_local(datasets, path, split, streaming)
    try:
        return datasets.load_dataset(source, config_name, split=split, streaming=streaming)
    except Exception as e:  # the hub's errors have many types (connection, not found, gated); all mean "cannot load"
        raise UserError(f"cannot load dataset {source!r} from the Hugging Face hub (no network?): "
                        f"{_first_line(e)}") from None


def _open_local(datasets: Any, path: Path, split: str, streaming: bool) -> Any:
    """A local data file or `save_to_disk` folder as a Dataset (an IterableDataset when streaming)."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    try:
        if _is_saved_dataset(path):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise UserError(f"{path}: no split {split!r}; the splits are {', '.join(dataset)}")
                dataset = dataset[split]
        elif path.suffix == ".arrow":
            if split != "train":
                raise UserError(f"{path}: an .arrow file holds one split, 'train'; got {split!r}")
            dataset = datasets.Dataset.from_file(str(path))  # memory-mapped in place, not copied into the cache
        elif path.suffix in _DATA_FILE_BUILDERS:
            return datasets.load_dataset(_DATA_FILE_BUILDERS[path.suffix], data_files=str(path), split=split,
                                         streaming=streaming)
        else:
            raise UserError(f"{path}: not a dataset ({', '.join(_DATA_FILE_BUILDERS)} file or save_to_disk folder)")
    except UserError:
        raise
    except ValueError as e:  # an unknown split, a malformed file (UserError is a ValueError too, hence the above)
        raise UserError(f"{path}: {_first_line(e)}") from None
    except datasets.exceptions.DatasetsError as e:  # a malformed file found while converting it; the cause says how
        raise UserError(f"{path}: cannot read it: {_first_line(e.__cause__ or e)}") from None
    return dataset.to_iterable_dataset() if streaming else dataset


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _record_texts(dataset: Iterable[dict[str, Any]], source: str, text_field: str) -> Iterator[str]:
    for record in dataset:
        if text_field not in record:
            raise UserError(f"{source}: no text field {text_field!r}; the columns are {', '.join(record)}")
        if record[text_field]:
            yield record[text_field]


def _blank_line_documents(texts: Iterable[str]) -> Iterator[Document]:
    for text in texts:
        for block in _BLANK_LINE.split(text):
            if sentences := split_sentences(block):
                yield sentences


def _grouped_documents(texts: Iterable[str], group_size: int) -> Iterator[Document]:
    document: Document = []
    for text in texts:
        document.extend(split_sentences(text))
        while len(document) >= group_size:
            yield document[:group_size]
            document = document[group_size:]
    if document:
        yield document


# ---- one entry point ----


def load_corpus(source: str, split: str = "train", **dataset_options: Any) -> list[Document] | Iterator[Document]:
    """The documents of a corpus source, by name: "builtin", text files, a data file or a hub dataset.

    - "builtin": `builtin_corpus(split)`.
    - an existing folder, or a `.txt` file: `read_text_files`; the last 5% of documents (rounded up) are the
      "validation" split and the rest "train", so the split is fixed for fixed files.
    - a local `.parquet`/`.json`/`.jsonl`/`.csv`/`.arrow` file or a folder from `Dataset.save_to_disk`:
      `read_dataset`, with the same 5% hold-out for "train" and "validation" (such a source has no other split).
      Other splits (slices such as "train[:10%]"), streaming, and `DatasetDict` folders (which have their own
      splits) go to `read_dataset` as they are.
    - anything else is a hub id: `read_dataset(source, split, **dataset_options)`.

    Datasets are read into a list, or returned as an iterator when `streaming=True`. `dataset_options`
    (text_field, streaming, config_name, group_size) only apply to datasets.
    """
    path = Path(source)
    if source == "builtin":
        documents = builtin_corpus(split)
    elif is_text_source(source):
        documents = _hold_out(read_text_files(path), _check_split(split))
    elif is_single_split_dataset(path) and split in SPLITS and not dataset_options.get("streaming"):
        documents = _hold_out(list(read_dataset(source, "train", **dataset_options)), split)
    else:
        stream = read_dataset(source, split, **dataset_options)
        if dataset_options.get("streaming"):
            return stream
        documents = list(stream)
    if not documents:
        raise UserError(f"corpus {source!r} is empty: no documents with text in split {split!r}")
    return documents


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def is_text_source(source: str) -> bool:
    """A `.txt` file or a folder of text files (not a folder written by `datasets`' save_to_disk)."""
    path = Path(source)
    return (path.is_dir() and not _is_saved_dataset(path)) or (path.suffix == ".txt" and path.exists())


def is_single_split_dataset(path: Path) -> bool:
    """A local data file or a saved Dataset: one split, unlike a saved DatasetDict."""
    return (path.suffix in _DATA_FILE_BUILDERS and path.is_file()) or (path / "state.json").is_file()


def _hold_out(documents: list[Document], split: str) -> list[Document]:
    cut = len(documents) - math.ceil(len(documents) / 20)
    return documents[cut:] if split == "validation" else documents[:cut]
