"""The GLUE benchmark: its nine tasks and the AX diagnostic, read from the hub or the original TSV download.

`load_task` gives a split as a list of `TextExample` (texts, label index or score) from either source:
the Hugging Face hub (`nyu-mll/glue`) or the folder written by the original `download_glue_data.py`, whose TSV
files each have their own layout (CoLA's train and dev files have no header, MNLI and STS-B carry many columns,
QQP's train file has malformed rows). `write_submission` writes test predictions in the leaderboard's format.

Label indices are the same in both sources: `TaskSpec.labels` lists the TSV label strings in the hub's order.
"""

from __future__ import annotations

import csv
import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobilebert.errors import UserError
from mobilebert.files import atomic_write

HUB_ID = "nyu-mll/glue"
METRICS = ("matthews", "accuracy", "f1", "pearson", "spearman")
_MNLI_LABELS = ("entailment", "neutral", "contradiction")
_QNLI_LABELS = ("entailment", "not_entailment")
_BINARY = ("0", "1")
_ID_COLUMNS = ("index", "id")  # the row id of a TSV file (QQP calls it "id"), used in the example's guid

# Rows in each leaderboard test file: the GLUE server rejects a submission of another length.
_LEADERBOARD_ROWS = {"CoLA.tsv": 1063, "SST-2.tsv": 1821, "MRPC.tsv": 1725, "STS-B.tsv": 1379, "QQP.tsv": 390965,
                     "MNLI-m.tsv": 9796, "MNLI-mm.tsv": 9847, "QNLI.tsv": 5463, "RTE.tsv": 3000, "WNLI.tsv": 146,
                     "AX.tsv": 1104}


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: its columns, labels, metrics, splits, leaderboard file names and original TSV layout.

    `labels` are the strings of the TSV files and the leaderboard, ordered as the hub's label indices; None marks
    regression (STS-B, a similarity score in [0, 5]). `metrics` lists the main metric first.
    """

    name: str  # canonical lower-case name, the hub config
    text_columns: tuple[str, ...]  # hub column names of the one or two texts
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...]
    test_splits: tuple[str, ...]
    submission_names: dict[str, str] = field(hash=False)  # test split -> leaderboard file name
    tsv_dir: str  # the task's folder in the original GLUE download
    tsv_text_columns: tuple[str, ...]  # header names of the texts in the TSV files
    tsv_label_column: str  # header name of the label (or score) in the labeled TSV files
    tsv_headerless_columns: tuple[str, ...] = ()  # column names of labeled TSV files without a header (CoLA)
    has_train: bool = True  # False for the AX diagnostic: a test set only

    def __post_init__(self) -> None:
        if not 1 <= len(self.text_columns) == len(self.tsv_text_columns) <= 2:
            raise ValueError(f"{self.name}: text_columns and tsv_text_columns must name the same one or two texts")
        if unknown := set(self.metrics) - set(METRICS):
            raise ValueError(f"{self.name}: unknown metrics {sorted(unknown)}; known: {', '.join(METRICS)}")
        if set(self.submission_names) != set(self.test_splits):
            raise ValueError(f"{self.name}: submission_names must have one file per test split {self.test_splits}")

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split of the task, training first."""
        return (("train",) if self.has_train else ()) + self.dev_splits + self.test_splits

    @property
    def is_regression(self) -> bool:
        """Whether the label is a score (STS-B) rather than a class."""
        return self.labels is None


@dataclass
class TextExample:
    """One example: one or two texts and a label index into `TaskSpec.labels`, a score (STS-B) or None (test)."""

    guid: str  # "<split>-<row id>"
    texts: tuple[str, ...]
    label: int | float | None


def _spec(name: str, texts: tuple[str, ...], labels: tuple[str, ...] | None, metrics: tuple[str, ...],
          tsv_dir: str, tsv_texts: tuple[str, ...], tsv_label: str, submission: str, **options: Any) -> TaskSpec:
    """A task with the usual splits (train, validation, test)."""
    return TaskSpec(name, texts, labels, metrics, ("validation",), ("test",), {"test": submission}, tsv_dir, tsv_texts,
                    tsv_label, **options)


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    _spec("cola", ("sentence",), _BINARY, ("matthews",), "CoLA", ("sentence",), "label", "CoLA.tsv",
          tsv_headerless_columns=("source", "label", "annotation", "sentence")),
    _spec("sst2", ("sentence",), _BINARY, ("accuracy",), "SST-2", ("sentence",), "label", "SST-2.tsv"),
    _spec("mrpc", ("sentence1", "sentence2"), _BINARY, ("f1", "accuracy"), "MRPC", ("#1 String", "#2 String"),
          "Quality", "MRPC.tsv"),
    _spec("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"), "STS-B", ("sentence1", "sentence2"),
          "score", "STS-B.tsv"),
    _spec("qqp", ("question1", "question2"), _BINARY, ("f1", "accuracy"), "QQP", ("question1", "question2"),
          "is_duplicate", "QQP.tsv"),
    TaskSpec("mnli", ("premise", "hypothesis"), _MNLI_LABELS, ("accuracy",),
             ("validation_matched", "validation_mismatched"), ("test_matched", "test_mismatched"),
             {"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"}, "MNLI", ("sentence1", "sentence2"),
             "gold_label"),
    _spec("qnli", ("question", "sentence"), _QNLI_LABELS, ("accuracy",), "QNLI", ("question", "sentence"), "label",
          "QNLI.tsv"),
    _spec("rte", ("sentence1", "sentence2"), _QNLI_LABELS, ("accuracy",), "RTE", ("sentence1", "sentence2"), "label",
          "RTE.tsv"),
    _spec("wnli", ("sentence1", "sentence2"), _BINARY, ("accuracy",), "WNLI", ("sentence1", "sentence2"), "label",
          "WNLI.tsv"),
    # The diagnostic is scored with R3, Matthews' correlation over MNLI's three classes.
    TaskSpec("ax", ("premise", "hypothesis"), _MNLI_LABELS, ("matthews",), (), ("test",), {"test": "AX.tsv"},
             "diagnostic", ("sentence1", "sentence2"), "label", has_train=False),
)}
_ALIASES = {"diagnostic": "ax"}


def task_spec(name: str) -> TaskSpec:
    """The task called `name`, case-insensitive, dashes and underscores ignored ("SST-2", "sts-b", "MNLI")."""
    key = name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise UserError(f"unknown GLUE task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.splits:
        raise UserError(f"{spec.name} has no split {split!r}: choose one of {', '.join(spec.splits)}")


def load_task(name: str, split: str, data_dir: str | Path | None = None) -> list[TextExample]:
    """The examples of one split of a GLUE task.

    `data_dir` is the original GLUE download: the folder holding CoLA/, SST-2/, ... or one task's folder itself.
    Without it the split comes from the Hugging Face hub (`nyu-mll/glue`, cached by `datasets`). Splits are "train",
    "validation" and "test"; MNLI has "validation_matched", "validation_mismatched", "test_matched" and
    "test_mismatched"; AX has only "test". Test examples have no label.
    """
    spec = task_spec(name)
    _check_split(spec, split)
    if data_dir is None:
        return _load_hub(spec, split)
    return _read_tsv(spec, split, _tsv_path(spec, split, Path(data_dir)))


# ---- the original TSV files ----

def _tsv_path(spec: TaskSpec, split: str, data_dir: Path) -> Path:
    """The TSV file of a split under the download's root folder or the task's own folder."""
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such folder (expected the GLUE download or its {spec.tsv_dir}/ folder)")
    file_name = "diagnostic.tsv" if spec.name == "ax" else split.replace("validation", "dev") + ".tsv"
    candidates = (data_dir / spec.tsv_dir / file_name, data_dir / file_name)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"no {spec.name} {split} file: neither {candidates[0]} nor {candidates[1]} exists")


def _read_tsv(spec: TaskSpec, split: str, path: Path) -> list[TextExample]:
    """The examples of one original GLUE TSV file, its columns found by name in the header.

    Fields are split at tabs only (QUOTE_NONE): GLUE texts hold unbalanced quotes. Rows with fewer fields than the
    header (a few in QQP's train file) are skipped with one warning. A label in the header's last column is read
    from the row's last field, as BERT's reference processors do for MNLI and STS-B.
    """
    labeled = split not in spec.test_splits
    rows = _tsv_rows(path)
    header = list(spec.tsv_headerless_columns) if labeled and spec.tsv_headerless_columns else rows.pop(0)[1]
    text_indices = [_column(header, column, path) for column in spec.tsv_text_columns]
    label_index = _column(header, spec.tsv_label_column, path) if labeled else None
    id_index = next((header.index(c) for c in _ID_COLUMNS if c in header), None)
    examples, malformed = [], []
    for line, row in rows:
        if len(row) < len(header):
            malformed.append(line)
            continue
        row_id = row[id_index] if id_index is not None else str(len(examples))
        label = None
        if label_index is not None:
            value = row[-1] if label_index == len(header) - 1 else row[label_index]
            label = _parse_label(spec, value, path, line)
        examples.append(TextExample(f"{split}-{row_id}", tuple(row[i] for i in text_indices), label))
    if not examples:
        what = f"all {len(malformed)} rows have fewer than the {len(header)} fields" if malformed else \
            "only a header, no rows; expected the fields"
        raise UserError(f"{path}: {what} of {spec.name}'s {split} file ({', '.join(header)}); is it the "
                        f"{spec.tsv_dir} file?")
    if malformed:
        warnings.warn(f"{path}: skipped {len(malformed)} malformed row(s) with fewer than {len(header)} fields "
                      f"(line {', '.join(map(str, malformed[:5]))}{', ...' if len(malformed) > 5 else ''})",
                      stacklevel=3)
    return examples


def _tsv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line; a byte-order mark (MRPC's header has one) is dropped."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not rows:
        raise UserError(f"{path}: empty file")
    return rows


def _column(header: list[str], column: str, path: Path) -> int:
    if column not in header:
        raise UserError(f"{path}: no column {column!r}; the header has {', '.join(header)}")
    return header.index(column)


def _parse_label(spec: TaskSpec, value: str, path: Path, line: int) -> int | float:
    """A label string as an index into `spec.labels`, or a score as a float for regression."""
    value = value.strip()
    if spec.labels is None:
        try:
            return float(value)
        except ValueError:
            raise UserError(f"{path}, line {line}: score {value!r} is not a number") from None
    if value not in spec.labels:
        raise UserError(f"{path}, line {line}: label {value!r} is not one of {spec.name}'s labels "
                        f"{', '.join(spec.labels)}")
    return spec.labels.index(value)


# ---- the Hugging Face hub ----

def _load_hub(spec: TaskSpec, split: str) -> list[TextExample]:
    """One split of `nyu-mll/glue`: label indices as they are, -1 (unlabeled test rows) as None."""
    import datasets  # imported here: it is slow to import and only the hub source needs it

    try:
        dataset = datasets.load_dataset(HUB_ID, spec.name, split=split)
    except Exception as e:  # the hub's errors have many types (connection, not found, gated); all mean "cannot load"
        lines = str(e).strip().splitlines()
        raise UserError(f"cannot load {HUB_ID} {spec.name} {split} from the Hugging Face hub (no network? pass "
                        f"data_dir, the GLUE TSV download): {lines[0] if lines else type(e).__name__}") from None
    for column in (*spec.text_columns, "label"):
        if column not in dataset.column_names:
            raise UserError(f"{HUB_ID} {spec.name} {split}: no column {column!r}; the columns are "
                            f"{', '.join(dataset.column_names)}")
    texts = list(zip(*(dataset[column] for column in spec.text_columns), strict=True))
    ids = dataset["idx"] if "idx" in dataset.column_names else range(len(texts))
    labels = [None if split in spec.test_splits else _hub_label(spec, split, label) for label in dataset["label"]]
    return [TextExample(f"{split}-{i}", tuple(t), label) for i, t, label in zip(ids, texts, labels, strict=True)]


def _hub_label(spec: TaskSpec, split: str, label: float) -> int | float | None:
    if label < 0:  # the hub's "no label"; no GLUE score or class index is negative
        return None
    if spec.labels is None:
        return float(label)
    if label >= len(spec.labels) or label != int(label):
        raise UserError(f"{HUB_ID} {spec.name} {split}: label {label!r} is not an index into {', '.join(spec.labels)}")
    return int(label)


# ---- leaderboard submissions ----

def write_submission(name: str, split: str, predictions: Sequence[int | float], out_dir: str | Path) -> Path:
    """Write test predictions as the leaderboard's file (e.g. `MNLI-m.tsv`) in `out_dir`; return its path.

    The file has the header "index\\tprediction" and one row per test example in order: the label string for a
    class index, or for STS-B the score clipped to [0, 5] with three decimals. It is written atomically. A count
    other than the leaderboard test set's warns (the GLUE server rejects it) but still writes.
    """
    spec = task_spec(name)
    if split not in spec.test_splits:
        raise UserError(f"submissions are for test splits: {spec.name} has {', '.join(spec.test_splits)}, "
                        f"not {split!r}")
    cells = [_prediction_cell(spec, p, i) for i, p in enumerate(predictions)]
    file_name = spec.submission_names[split]
    expected = _LEADERBOARD_ROWS[file_name]
    if len(cells) != expected:
        warnings.warn(f"{file_name}: {len(cells)} predictions, but the GLUE leaderboard expects {expected}",
                      stacklevel=2)
    path = Path(out_dir) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "index\tprediction\n" + "".join(f"{i}\t{cell}\n" for i, cell in enumerate(cells))
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _prediction_cell(spec: TaskSpec, prediction: int | float, position: int) -> str:
    """A prediction as the leaderboard writes it: a label string, or a score with three decimals."""
    if spec.labels is None:
        score = float(prediction)
        if math.isnan(score):
            raise UserError(f"{spec.name}: prediction {position} is NaN")
        return f"{min(max(score, 0.0), 5.0):.3f}"
    try:
        index = operator.index(prediction)
    except TypeError:
        raise UserError(f"{spec.name}: prediction {position} is {prediction!r}, not a label index") from None
    if not 0 <= index < len(spec.labels):
        raise UserError(f"{spec.name}: prediction {position} is {index}, not an index into {', '.join(spec.labels)}")
    return spec.labels[index]
