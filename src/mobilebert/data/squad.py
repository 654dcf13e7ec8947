"""SQuAD v1.1 / v2.0 for extractive question answering: read the official JSON, cut features, decode answers.

The steps are BERT's run_squad.py (Devlin et al., 2019), with one change: token positions map to character spans of
the context through the tokenizer's offsets, so an answer is always an exact substring of the original context
(original case, accents and punctuation), without BERT's whitespace-token bookkeeping.

    read_squad → [SquadExample] → make_features → SquadFeatures → model → start/end logits
               → postprocess → SquadPredictions → write_predictions (the official evaluation script's input)

A feature is one window of the context: `[CLS] question [SEP] context-window [SEP] [PAD]...`. Long contexts give
several windows that overlap (a new window every `doc_stride` tokens); a token is scored in the window where it has
the most context on both sides ("max context").
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mobilebert.errors import UserError
from mobilebert.files import atomic_write
from mobilebert.tokenizer import Tokenizer

Span = tuple[int, int]  # [start, end) character offsets into the context
Candidate = tuple[str, float, float, float]  # an answer: text, start logit, end logit, score (their sum)


@dataclass
class SquadExample:
    """One question about one paragraph. `answers` holds (text, answer_start) pairs: in training the one answer
    trained on (none when impossible), in evaluation every gold answer (only the scorer reads them)."""

    qid: str
    title: str
    question: str
    context: str
    answers: list[tuple[str, int]]
    is_impossible: bool = False


# ---- reading ----

def read_squad(path: str | Path, training: bool) -> list[SquadExample]:
    """Read a SQuAD v1.1 or v2.0 file (data → paragraphs → context, qas → id, question, answers, is_impossible).

    v2's `plausible_answers` are ignored. In training, each answerable question keeps its first answer, and a
    question whose answer text is not at its `answer_start` in the context (compared like BERT's preprocessing: the
    whitespace-separated words covering the span must contain the answer, whitespace normalised) is skipped, with
    one warning giving the count. In evaluation every question is kept with all its answers.
    """
    path = Path(path)
    data = _load_json(path)
    examples: list[SquadExample] = []
    skipped = 0
    for article in data:
        title = str(article.get("title", "")) if isinstance(article, dict) else ""
        for paragraph in _field(path, article, "paragraphs", list, f"article {title!r}"):
            where = f"a paragraph of article {title!r}"
            context = _field(path, paragraph, "context", str, where)
            for n, qa in enumerate(_field(path, paragraph, "qas", list, where)):
                example = _read_question(path, qa, title, context, where=f"question {n + 1} of {where}")
                example = _for_training(example) if training else example
                if example is None:
                    skipped += 1
                    continue
                examples.append(example)
    if not examples:
        why = f"all {skipped} training questions have answers not at their answer_start" if skipped else \
            "no questions (its data list holds no articles with paragraphs and qas)"
        raise UserError(f"{path}: {why}")
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} training question(s) whose answer is not at its answer_start "
                      "in the context", stacklevel=2)
    return examples


def _load_json(path: Path) -> list[Any]:
    if not path.is_file():
        raise UserError(f"{path}: no such SQuAD file")
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark, as Notepad writes
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        raise UserError(f'{path}: not a SQuAD file (no "data" list at the top level)')
    return content["data"]


def _field(path: Path, obj: Any, key: str, kind: type, where: str) -> Any:
    """obj[key], which must be of type `kind`; a UserError naming the file and place otherwise."""
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        raise UserError(f"{path}: {where} has no {key!r} ({kind.__name__})")
    return obj[key]


def _read_question(path: Path, qa: Any, title: str, context: str, where: str) -> SquadExample:
    if not isinstance(qa, dict) or qa.get("id") in (None, ""):
        raise UserError(f"{path}: {where} has no id")
    qid = str(qa["id"])
    question = _field(path, qa, "question", str, f"question {qid!r}")
    answers = []
    for answer in qa.get("answers") or []:
        text = _field(path, answer, "text", str, f"an answer of question {qid!r}")
        start = _field(path, answer, "answer_start", int, f"an answer of question {qid!r}")
        answers.append((text, start))
    return SquadExample(qid, title, question, context, answers, bool(qa.get("is_impossible", False)))


def _for_training(example: SquadExample) -> SquadExample | None:
    """`example` with the one answer trained on (none when impossible), or None when that answer is not found."""
    if example.is_impossible:
        return replace(example, answers=[])
    if not example.answers or not _answer_found(example.context, *example.answers[0]):
        return None
    return replace(example, answers=example.answers[:1])


def _answer_found(context: str, text: str, start: int) -> bool:
    """Whether `text` is at `start` in `context`, compared as BERT's preprocessing does: the whitespace-separated
    words covering the span, whitespace normalised, contain the whitespace-normalised text."""
    end = start + len(text)
    if not text.strip() or start < 0 or end > len(context):
        return False
    while start > 0 and not context[start - 1].isspace():  # widen to whole words, as BERT's doc_tokens are
        start -= 1
    while end < len(context) and not context[end].isspace():
        end += 1
    return " ".join(text.split()) in " ".join(context[start:end].split())


# ---- features ----

@dataclass
class SquadFeatures:
    """Model inputs for every window of every example, as arrays of N rows of `max_seq_length` (L) tokens.

    `start_positions`/`end_positions` (training only) index the answer's first and last token, or 0 ([CLS]) when
    the question is impossible or the answer is not wholly inside the window. `offsets` and `token_is_max_context`
    (evaluation only) give, per token, its [start, end) characters in the context (None for the question, special
    tokens and padding) and whether this window is the one where the token has the most context.
    """

    input_ids: np.ndarray  # (N, L) int64
    attention_mask: np.ndarray  # (N, L) int64, 1 = token, 0 = padding
    token_type_ids: np.ndarray  # (N, L) int64, 0 = [CLS] question [SEP], 1 = context [SEP]
    example_index: np.ndarray  # (N,) int64, index into the examples list
    start_positions: np.ndarray | None = None  # (N,) int64
    end_positions: np.ndarray | None = None  # (N,) int64
    offsets: list[list[Span | None]] | None = None  # N lists of L
    token_is_max_context: np.ndarray | None = None  # (N, L) bool

    def __len__(self) -> int:
        return len(self.input_ids)


def make_features(examples: list[SquadExample], tokenizer: Tokenizer, max_seq_length: int = 384,
                  doc_stride: int = 128, max_query_length: int = 64, training: bool = False) -> SquadFeatures:
    """Tokenize each example and cut its context into overlapping windows (BERT's convert_examples_to_features).

    The question is cut to `max_query_length` tokens; each window holds up to `max_seq_length - 3 - max_query_length`
    context tokens or more when the question is shorter, and a new window starts every `doc_stride` tokens. Every
    example gets at least one window (an empty context gives one with no context tokens).
    """
    if max_seq_length - 3 - max_query_length < 1:
        raise UserError(f"max_seq_length {max_seq_length} leaves no room for context after a question of "
                        f"max_query_length {max_query_length} and 3 special tokens")
    if doc_stride < 1:
        raise UserError(f"doc_stride must be at least 1, got {doc_stride}")
    rows: list[dict[str, Any]] = []
    backend = tokenizer.backend
    questions = backend.encode_batch([e.question for e in examples], add_special_tokens=False)
    contexts = backend.encode_batch([e.context for e in examples], add_special_tokens=False)
    for index, (example, question, context) in enumerate(zip(examples, questions, contexts, strict=True)):
        query = question.ids[:max_query_length]
        first = len(query) + 2  # position of a window's first context token, after [CLS] query [SEP]
        windows = _windows(len(context.ids), max_seq_length - 3 - len(query), doc_stride)
        answer = _answer_tokens(example, context.offsets) if training else None
        for w, window in enumerate(windows):
            row = _inputs(tokenizer, query, context.ids, window, max_seq_length)
            row["example_index"] = index
            if training:
                row.update(_positions(answer, window, first))
            else:
                row.update(_context_map(context.offsets, windows, w, first, max_seq_length))
            rows.append(row)
    return _stack(rows, training, max_seq_length)


def _windows(num_tokens: int, room: int, doc_stride: int) -> list[Span]:
    """(start, length) of each window over `num_tokens` context tokens, `room` tokens at most per window."""
    windows, start = [], 0
    while True:
        length = min(num_tokens - start, room)
        windows.append((start, length))
        if start + length >= num_tokens:
            return windows
        start += min(length, doc_stride)


def _answer_tokens(example: SquadExample, offsets: list[Span]) -> Span | None:
    """First and last context token overlapping the (first) answer's characters; None when impossible."""
    if example.is_impossible or not example.answers:
        return None
    text, start = example.answers[0]
    end = start + len(text)
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return (inside[0], inside[-1]) if inside else None


def _is_max_context(windows: list[Span], current: int, position: int) -> bool:
    """Whether window `current` gives context token `position` its most context (BERT's _check_is_max_context):
    the score is min(tokens left, tokens right) + 0.01 × window length; the first best window wins ties."""
    best_score, best = -1.0, -1
    for w, (start, length) in enumerate(windows):
        end = start + length - 1
        if start <= position <= end:
            score = min(position - start, end - position) + 0.01 * length
            if score > best_score:
                best_score, best = score, w
    return best == current


def _inputs(tokenizer: Tokenizer, query: list[int], context_ids: list[int], window: Span,
           max_seq_length: int) -> dict[str, Any]:
    """Model inputs of one window: `[CLS] query [SEP] context[start:start+length] [SEP]`, padded to max_seq_length."""
    start, length = window
    ids = [tokenizer.cls_id, *query, tokenizer.sep_id, *context_ids[start:start + length], tokenizer.sep_id]
    pad = max_seq_length - len(ids)
    return {"input_ids": ids + [tokenizer.pad_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
            "token_type_ids": [0] * (len(query) + 2) + [1] * (length + 1) + [0] * pad}


def _positions(answer: Span | None, window: Span, first: int) -> dict[str, int]:
    """Training targets of one window: the answer's token positions, or 0 ([CLS]) if it is not wholly inside."""
    start, length = window
    if answer is None or answer[0] < start or answer[1] >= start + length:
        return {"start_positions": 0, "end_positions": 0}
    return {"start_positions": answer[0] - start + first, "end_positions": answer[1] - start + first}


def _context_map(context_offsets: list[Span], windows: list[Span], w: int, first: int,
                 max_seq_length: int) -> dict[str, Any]:
    """Evaluation map of window `w`: each position's characters in the context and whether it has max context."""
    start, length = windows[w]
    offsets: list[Span | None] = [None] * max_seq_length
    max_context = [False] * max_seq_length
    for i in range(length):
        offsets[first + i] = context_offsets[start + i]
        max_context[first + i] = _is_max_context(windows, w, start + i)
    return {"offsets": offsets, "token_is_max_context": max_context}


def _stack(rows: list[dict[str, Any]], training: bool, max_seq_length: int) -> SquadFeatures:
    def array(key: str, dtype: Any = np.int64, shape: tuple[int, ...] = (len(rows), max_seq_length)) -> np.ndarray:
        return np.array([row[key] for row in rows], dtype=dtype).reshape(shape)  # shaped even with no rows

    features = SquadFeatures(array("input_ids"), array("attention_mask"), array("token_type_ids"),
                             array("example_index", shape=(len(rows),)))
    if training:
        features.start_positions = array("start_positions", shape=(len(rows),))
        features.end_positions = array("end_positions", shape=(len(rows),))
    else:
        features.offsets = [row["offsets"] for row in rows]
        features.token_is_max_context = array("token_is_max_context", bool)
    return features


# ---- predictions ----

@dataclass
class SquadPredictions:
    """Decoded answers. `predictions` maps question id → answer text ("" = no answer, v2), the official script's
    prediction file; `null_odds` (v2) maps id → score_null − best non-null score, its na_probs file (+inf when no
    span was valid); `nbest` maps id → up to n_best candidates {text, probability, start_logit, end_logit}."""

    predictions: dict[str, str]
    null_odds: dict[str, float]
    nbest: dict[str, list[dict[str, Any]]]


def postprocess(examples: list[SquadExample], features: SquadFeatures, start_logits: Any, end_logits: Any,
                n_best_size: int = 20, max_answer_length: int = 30, version_2: bool = False,
                null_score_diff_threshold: float = 0.0) -> SquadPredictions:
    """Answer text per question from the model's logits (BERT's write_predictions).

    `start_logits`/`end_logits` are array-likes (N, L) (numpy arrays or CPU tensors), one row per feature. For each
    example, across its features, the n_best highest start and end logits are paired; a pair is kept when both are
    context tokens, the start has max context in that window, start ≤ end and the span is at most
    `max_answer_length` tokens. The answer is the context from the start token's first to the end token's last
    character. With `version_2`, the null score is the least start_logits[0] + end_logits[0] over the features,
    and "" is predicted when score_null − best non-null score > `null_score_diff_threshold`.
    """
    if features.offsets is None or features.token_is_max_context is None:
        raise ValueError("postprocess needs evaluation features (make_features with training=False)")
    starts, ends = np.asarray(start_logits, dtype=np.float64), np.asarray(end_logits, dtype=np.float64)
    if starts.shape != features.input_ids.shape or ends.shape != features.input_ids.shape:
        raise ValueError(f"logits of shapes {starts.shape} and {ends.shape} for features of shape "
                         f"{features.input_ids.shape}")
    by_example: dict[int, list[int]] = {}
    for f, index in enumerate(features.example_index.tolist()):
        by_example.setdefault(index, []).append(f)
    result = SquadPredictions({}, {}, {})
    for index, example in enumerate(examples):
        candidates: list[Candidate] = []
        null: Candidate | None = None  # BERT's null answer: [CLS] as start and end, in its least-scoring feature
        for f in by_example.get(index, []):
            if null is None or starts[f, 0] + ends[f, 0] < null[3]:
                null = ("", float(starts[f, 0]), float(ends[f, 0]), float(starts[f, 0] + ends[f, 0]))
            candidates += _spans(example.context, features.offsets[f], features.token_is_max_context[f],
                                 starts[f], ends[f], n_best_size, max_answer_length)
        null = null if version_2 else None
        nbest = _nbest(candidates, n_best_size, null)
        result.nbest[example.qid] = nbest
        non_null = next((c for c in nbest if c["text"]), None)
        if not version_2:
            result.predictions[example.qid] = nbest[0]["text"]
            continue
        odds = math.inf if non_null is None or null is None else \
            null[3] - (non_null["start_logit"] + non_null["end_logit"])
        result.null_odds[example.qid] = odds
        result.predictions[example.qid] = "" if non_null is None or odds > null_score_diff_threshold \
            else non_null["text"]
    return result


def _spans(context: str, offsets: list[Span | None], max_context: np.ndarray, starts: np.ndarray,
           ends: np.ndarray, n_best_size: int, max_answer_length: int) -> list[Candidate]:
    """The valid (text, start_logit, end_logit, score) candidates of one feature."""
    candidates = []
    top_starts = np.argsort(-starts, kind="stable")[:n_best_size].tolist()
    top_ends = np.argsort(-ends, kind="stable")[:n_best_size].tolist()
    for s in top_starts:
        if offsets[s] is None or not max_context[s]:
            continue
        for e in top_ends:
            if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            text = context[offsets[s][0]:offsets[e][1]]
            candidates.append((text, float(starts[s]), float(ends[e]), float(starts[s] + ends[e])))
    return candidates


def _nbest(candidates: list[Candidate], n_best_size: int, null: Candidate | None) -> list[dict[str, Any]]:
    """The best-scoring candidate of each distinct text, n_best_size at most, and the null answer (v2) if it is not
    among them, best first, with softmax probabilities over the list (one empty answer when there is nothing)."""
    nbest: dict[str, Candidate] = {}
    for candidate in sorted(candidates + ([null] if null else []), key=lambda c: c[3], reverse=True):
        if len(nbest) == n_best_size:
            break
        nbest.setdefault(candidate[0], candidate)
    if null is not None:
        nbest.setdefault("", null)  # as BERT does: v2's n-best list always holds the null answer
    kept = list(nbest.values()) or [("", 0.0, 0.0, 0.0)]
    scores = np.array([c[3] for c in kept])
    weights = np.exp(scores - scores.max())
    return [{"text": text, "probability": float(p), "start_logit": start, "end_logit": end}
            for (text, start, end, _), p in zip(kept, weights / weights.sum(), strict=True)]


def write_predictions(path: str | Path, predictions: dict[str, Any]) -> Path:
    """Write `predictions` (or null odds, or n-best lists) as JSON, atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(predictions, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path
