"""Corpus sources for pre-training: a built-in offline corpus, plain text files and Hugging Face datasets.

A corpus is a list (or, when streaming, an iterator) of documents; a document is a `list[str]` of sentences. This is
BERT's create_pretraining_data format: next-sentence pairs are cut at sentence boundaries inside one document.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mobilebert.errors import UserError

Document = list[str]
SPLITS = ("train", "validation")

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


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return split


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


_WARNED: set[Path] = set()


def _text_files(paths: str | Path | list[str | Path]) -> list[Path]:
    files = []
    for path in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if path.is_dir():
            found = sorted(path.rglob("*"), key=lambda p: p.relative_to(path).as_posix())  # one walk of the tree
            texts = [p for p in found if p.name.endswith(".txt")]
            data = [p.relative_to(path).as_posix() for p in found if p.suffix in _DATA_FILE_BUILDERS]
            if data and not texts:
                raise UserError(f"{path}: a folder is read for its .txt files and has none; name its data files "
                                f"themselves as sources (e.g. --corpus {path / data[0]})")
            if data and path not in _WARNED:  # the folder is listed several times in a preparation: said once
                _WARNED.add(path)
                warnings.warn(f"{path}: reading its {len(texts)} .txt file(s) only; its {len(data)} data file(s) "
                              f"({', '.join(data[:3])}{', ...' if len(data) > 3 else ''}) are not read: name them "
                              "as sources themselves", stacklevel=2)
            files.extend(texts)
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
        raise UserError(f"{source}: no text field {text_field!r}; the columns are {', '.join(columns)} (choose one "
                        "with --data.text_field NAME)")
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
        from mobilebert.data.builtin_corpus import builtin_corpus  # parsing the standard library: seconds

        documents = builtin_corpus(split)
    elif is_text_source(source):
        documents = _hold_out(read_text_files(path), check_split(split))
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
