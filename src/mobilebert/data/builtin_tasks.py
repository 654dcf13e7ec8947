"""Built-in downstream tasks, made deterministically from the built-in corpus and written in GLUE's and SQuAD's own
file formats, so that offline fine-tuning runs through the same loaders as the real benchmarks.

| task | format | input → target | constant baseline |
|---|---|---|---|
| builtin-order | CoLA TSV (no header) | sentence → 1 if its words are in order, 0 if they were shuffled | MCC 0 |
| builtin-next | MRPC TSV | sentence pair → 1 if the second follows the first in its document, else 0 | acc 0.5 |
| builtin-overlap | STS-B TSV | sentence pair → 5 × the share of words the second keeps from the first | Pearson 0 |
| builtin-qa | SQuAD v1.1 JSON | up to two sentences + "from X to Y" → the span from word X to word Y | EM 0 |

Training examples come from the corpus's train documents, dev examples from its validation documents (which the
pre-training never sees). Every label is computable from the text, so a good model beats the baselines widely.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mobilebert.data.corpus import load_corpus
from mobilebert.errors import UserError
from mobilebert.files import atomic_write

CONTEXT_SENTENCES = 2  # at most, in a builtin-qa context: the span's sentence and a neighbour
QUESTION = ("from", "to")  # a builtin-qa question: "from <first word of the span> to <its last word>"
VERSION = 4  # of the generators: a folder written by another version is rewritten


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    format: str  # the GLUE task whose file format (and metrics) it uses, or "squad"
    description: str
    metrics: tuple[str, ...] | None = None  # the main metric first; None: the format's


BUILTIN_TASKS = {t.name: t for t in (
    BuiltinTask("builtin-order", "cola", "is the sentence in its original word order? (Matthews correlation)"),
    # Balanced labels: accuracy leads (always answering "follows" already has F1 0.67).
    BuiltinTask("builtin-next", "mrpc", "does sentence 2 follow sentence 1 in its document? (accuracy, F1)",
                ("accuracy", "f1")),
    BuiltinTask("builtin-overlap", "stsb", "how much of sentence 1 does sentence 2 keep? (Pearson, Spearman)"),
    BuiltinTask("builtin-qa", "squad", "extract the span of the context from word X to word Y (EM, F1)"),
)}


@dataclass(frozen=True)
class BuiltinSizes:
    """Examples per split. builtin-qa's training set is `qa_train` questions, by default 8 × `train`: learning to
    match the question in the context takes many updates, and a small student learns it more reliably from many
    questions seen once than from few seen often (docs/finetuning.md)."""

    train: int = 2000
    dev: int = 400
    seed: int = 0
    qa_train: int | None = None

    def questions(self, split: str) -> int:
        if split == "dev":
            return self.dev
        return self.qa_train if self.qa_train is not None else 8 * self.train


def write_builtin_tasks(out_dir: str | Path, sizes: BuiltinSizes = BuiltinSizes()) -> Path:
    """Write every built-in task under `out_dir/<task>/` (train and dev files); returns `out_dir`.

    Idempotent: a folder holding a `done` marker for the same sizes is left as it is."""
    out = Path(out_dir)
    stamp = json.dumps({"train": sizes.train, "dev": sizes.dev, "seed": sizes.seed,
                        "qa_train": sizes.questions("train"), "version": VERSION})
    if (out / "done").is_file() and (out / "done").read_text() == stamp:
        return out
    docs = {split: [list(d) for d in load_corpus("builtin", split=split)] for split in ("train", "validation")}
    for split, size in (("train", sizes.train), ("dev", sizes.dev)):
        source = docs["train" if split == "train" else "validation"]
        rng = random.Random(f"{sizes.seed}-{split}")
        _write_tsv(out / "builtin-order" / f"{split}.tsv", None, _order_rows(source, size, rng))
        _write_tsv(out / "builtin-next" / f"{split}.tsv", MRPC_HEADER, _next_rows(source, size, rng))
        _write_tsv(out / "builtin-overlap" / f"{split}.tsv", STSB_HEADER, _overlap_rows(source, size, rng))
        squad = {"version": "1.1", "data": _qa_articles(source, sizes.questions(split), rng, split)}
        path = out / "builtin-qa" / f"{split}-v1.1.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda p, s=squad: p.write_text(json.dumps(s, ensure_ascii=False)))
    atomic_write(out / "done", lambda p: p.write_text(stamp))
    return out


def builtin_task(name: str) -> BuiltinTask:
    if name not in BUILTIN_TASKS:
        raise UserError(f"unknown built-in task {name!r}: choose one of {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]


# ---- the tasks ----

MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"]
_MIN_WORDS = 6


def _sentences(docs: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    """(document, sentence) indices of sentences long enough to corrupt meaningfully."""
    return [(d, s) for d, doc in enumerate(docs) for s, text in enumerate(doc) if len(text.split()) >= _MIN_WORDS]


def _order_rows(docs, size: int, rng: random.Random) -> list[list[str]]:
    """CoLA rows: source, label, original annotation (`*` when unacceptable), sentence. Half are shuffled."""
    pool, rows = _sentences(docs), []
    for i in range(size):
        d, s = rng.choice(pool)
        words = docs[d][s].split()
        label = i % 2
        if label == 0:
            words = _shuffled(words, rng)
        rows.append(["builtin", str(label), "" if label else "*", " ".join(words)])
    rng.shuffle(rows)
    return rows


def _shuffled(words: list[str], rng: random.Random) -> list[str]:
    """The words in a random order that differs from the original (sentences have at least 6 words)."""
    shuffled = words[:]
    while shuffled == words and len(set(words)) > 1:
        rng.shuffle(shuffled)
    return shuffled


def _next_rows(docs, size: int, rng: random.Random) -> list[list[str]]:
    """MRPC rows: label, two ids, two sentences. Label 1: the second sentence follows the first."""
    pool = [(d, s) for d, doc in enumerate(docs) for s in range(len(doc) - 1)]
    rows = []
    for i in range(size):
        d, s = rng.choice(pool)
        label = i % 2
        if label:
            d2, s2 = d, s + 1
        else:
            d2 = rng.choice([x for x in rng.sample(range(len(docs)), 2) if x != d])
            s2 = rng.randrange(len(docs[d2]))
        rows.append([str(label), f"{d}.{s}", f"{d2}.{s2}", docs[d][s], docs[d2][s2]])
    rng.shuffle(rows)
    return rows


def _overlap_rows(docs, size: int, rng: random.Random) -> list[list[str]]:
    """STS-B rows; sentence 2 is sentence 1 with k of its n words replaced by random corpus words, score 5(1-k/n)."""
    pool = _sentences(docs)
    vocabulary = sorted({w for doc in docs for text in doc for w in text.split()})
    rows = []
    for i in range(size):
        d, s = rng.choice(pool)
        words = docs[d][s].split()
        k = rng.randint(0, len(words))
        replaced = list(words)
        for j in rng.sample(range(len(words)), k):
            replaced[j] = rng.choice(vocabulary)
        score = 5.0 * (1 - k / len(words))
        rows.append([str(i), "builtin", "stdlib", "none", str(i), "builtin", "builtin", " ".join(words),
                     " ".join(replaced), f"{score:.3f}"])
    return rows


def _qa_articles(docs, size: int, rng: random.Random, split: str) -> list[dict]:
    """SQuAD articles, one question each: the context is a sentence of a document and the one before or after it
    (`CONTEXT_SENTENCES`); the question names the first and last word of a 2–5 word span of that sentence ("from X to
    Y"), each of which occurs once in the context; the answer is the span. Answering takes matching the question's
    words to the context and extracting what lies between them."""
    candidates = [(d, j) for d, doc in enumerate(docs) if len(doc) >= 2 for j, text in enumerate(doc)
                  if len(text.split()) >= 2]
    articles, draws = [], 0
    while len(articles) < size:
        draws += 1
        if draws > 100 * size + 1000:
            raise UserError(f"builtin-qa: the corpus has too few sentences with words that occur once in their "
                            f"context ({len(articles)} questions made, {size} wanted)")
        d, j = rng.choice(candidates)
        first = max(0, j - rng.randint(0, 1))
        sentences = list(docs[d][first:first + CONTEXT_SENTENCES])
        context = " ".join(sentences)
        s = j - first
        words = sentences[s].split()
        n = rng.randint(2, min(5, len(words)))
        start = rng.randrange(len(words) - n + 1)
        span = words[start:start + n]
        context_words = context.split()
        if context_words.count(span[0]) != 1 or context_words.count(span[-1]) != 1:
            continue  # a cue word that occurs twice would make the question ambiguous: draw again
        answer = " ".join(span)
        sentence_start = len(" ".join(sentences[:s])) + (1 if s else 0)
        answer_start = sentence_start + len(" ".join(words[:start])) + (1 if start else 0)
        assert context[answer_start:answer_start + len(answer)] == answer
        qa = {"id": f"{split}-{len(articles)}", "question": f"{QUESTION[0]} {span[0]} {QUESTION[1]} {span[-1]}",
              "answers": [{"text": answer, "answer_start": answer_start}]}
        articles.append({"title": f"doc-{d}", "paragraphs": [{"context": context, "qas": [qa]}]})
    return articles


def _write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    """GLUE's TSV: tab-separated, no quoting (corpus sentences hold no tabs or newlines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] if header else []
    text = "".join("\t".join(row) + "\n" for row in lines + rows)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
