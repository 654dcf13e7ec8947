"""Evaluation metrics: the GLUE scores (as fractions, like scikit-learn) and the official SQuAD scoring.

GLUE: accuracy, binary F1 (positive class 1), Matthews correlation (CoLA), Pearson and Spearman (STS-B),
all numpy, equal to `sklearn.metrics` / `scipy.stats` (tests/test_metrics.py checks this on random cases).

SQuAD: the behaviour of the official `evaluate-v1.1.py` and `evaluate-v2.0.py`, number for number (percentages,
0..100). The two differ in F1 on empty answers: v1.1 scores 0 whenever no token is shared, v2.0 scores 1 when
both answers normalize to nothing (an abstention on an unanswerable question is right).
"""

from __future__ import annotations

import json
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from mobilebert.errors import UserError

# ----------------------------------------------------------------------------------------------------- GLUE


def _as_pair(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds).ravel(), np.asarray(labels).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"preds and labels must be non-empty and of equal length, got {p.size} and {y.size}")
    return p, y


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to their label."""
    p, y = _as_pair(preds, labels)
    return float(np.mean(p == y))


def f1(preds: ArrayLike, labels: ArrayLike) -> float:
    """Binary F1 of class 1 (MRPC, QQP): 2TP / (2TP + FP + FN); 0.0 when there is no positive at all."""
    p, y = _as_pair(preds, labels)
    tp = np.sum((p == 1) & (y == 1))
    wrong = np.sum((p == 1) & (y != 1)) + np.sum((p != 1) & (y == 1))  # FP + FN
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def matthews(preds: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation (CoLA), multiclass form as in sklearn; 0.0 when undefined (one class only)."""
    p, y = _as_pair(preds, labels)
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    k, n = len(classes), len(y)
    confusion = np.zeros((k, k), dtype=np.float64)  # (true, predicted)
    np.add.at(confusion, (codes[:n], codes[n:]), 1)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    cov_ytyp = np.trace(confusion) * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(preds: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation (STS-B); NaN when either side is constant, as scipy."""
    p, y = _as_pair(preds, labels)
    pm, ym = p.astype(np.float64) - p.mean(), y.astype(np.float64) - y.mean()
    p_norm, y_norm = np.linalg.norm(pm), np.linalg.norm(ym)
    if p_norm == 0 or y_norm == 0:
        return float("nan")
    return float(np.clip((pm / p_norm) @ (ym / y_norm), -1.0, 1.0))  # normalise first, as scipy, for the same digits


def spearman(preds: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation (STS-B): Pearson of the ranks, ties sharing their average rank."""
    from scipy.stats import rankdata  # imported here: scipy.stats takes half a second, every command would pay it

    p, y = _as_pair(preds, labels)
    return pearson(rankdata(p), rankdata(y))


GLUE_METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(names: Sequence[str], preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The metrics named (keys of `GLUE_METRICS`), in order, as plain Python floats."""
    unknown = [name for name in names if name not in GLUE_METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; choose from {', '.join(GLUE_METRICS)}")
    return {name: float(GLUE_METRICS[name](preds, labels)) for name in names}


# ---------------------------------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (official order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, ground_truth: str) -> int:
    """1 when both strings normalize to the same text, else 0 (same in v1.1 and v2.0)."""
    return int(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str, version: str = "2.0") -> float:
    """Token-bag F1 of the normalized answers.

    version "2.0": if either side has no tokens, 1 when both have none, else 0 (so "" matches an unanswerable
    question's gold ""). version "1.1": 0 whenever no token is shared, empty answers included.
    """
    if version not in ("1.1", "2.0"):
        raise ValueError(f"version must be '1.1' or '2.0', got {version!r}")
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    if version == "2.0" and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _questions(dataset: list) -> Iterator[tuple[str, list[str]]]:
    """(question id, gold answer texts) for every question of a SQuAD "data" list, checking its structure."""
    try:
        for article in dataset:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    yield qa["id"], [answer["text"] for answer in qa["answers"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"SQuAD data is malformed: an entry lacks {e} (expected data/paragraphs/qas/answers)") from e


def _warn_missing(missing: int, total: int) -> None:
    if missing:
        warnings.warn(f"{missing} of {total} questions have no prediction and score 0", stacklevel=3)


def evaluate_v1(dataset: list, predictions: dict[str, str]) -> dict[str, float]:
    """SQuAD v1.1 scores (official `evaluate-v1.1.py`): exact_match and f1 in percent, max over gold answers.

    `dataset` is the JSON's "data" list; a question missing from `predictions` scores 0 (one warning in all).
    """
    exact = f1_total = 0.0
    total = missing = 0
    for qid, gold in _questions(dataset):
        total += 1
        if qid not in predictions:
            missing += 1
            continue
        if not gold:
            raise UserError(f"question {qid!r} has no gold answer; a SQuAD 2.0 file needs evaluate_v2")
        prediction = predictions[qid]
        exact += max(exact_match(prediction, answer) for answer in gold)
        f1_total += max(f1_score(prediction, answer, version="1.1") for answer in gold)
    if total == 0:
        raise UserError("SQuAD data has no questions")
    _warn_missing(missing, total)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1_total / total}


def _mean_scores(exact: dict[str, float], f1s: dict[str, float], qids: list[str]) -> dict[str, Any]:
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact[q] for q in qids) / total,
        "f1": 100.0 * sum(f1s[q] for q in qids) / total,
        "total": total,
    }


def _best_thresh(
    predictions: dict[str, str], scores: dict[str, float], na_probs: dict[str, float], has_ans: dict[str, bool]
) -> tuple[float, float]:
    """Official find_best_thresh: sweep the threshold up through the sorted no-answer probabilities.

    Below every probability all questions abstain (every unanswerable one is right); passing a question's
    probability makes it answer: +score if it has an answer, -1 if it is unanswerable and the answer is non-empty.
    """
    cur_score = sum(1 for q, has in has_ans.items() if not has and q in predictions)
    best_score, best_thresh = cur_score, 0.0
    for qid in sorted(na_probs, key=lambda q: na_probs[q]):  # stable: ties keep the na_probs order
        if qid not in scores or qid not in predictions:
            continue
        if has_ans[qid]:
            cur_score += scores[qid]
        elif predictions[qid]:
            cur_score -= 1
        if cur_score > best_score:
            best_score, best_thresh = cur_score, float(na_probs[qid])
    return 100.0 * best_score / len(scores), best_thresh


def evaluate_v2(
    dataset: list,
    predictions: dict[str, str],
    na_probs: dict[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, Any]:
    """SQuAD v2.0 scores (official `evaluate-v2.0.py`), percentages, keys in the official order.

    exact, f1, total, then HasAns_* and NoAns_* (each only if such questions exist), then, when `na_probs`
    (question id -> probability of no answer) is given, best_exact(_thresh) and best_f1(_thresh).
    A question whose probability exceeds `na_prob_thresh` is scored as an abstention. Gold answers that
    normalize to nothing are dropped; a question left with none has the single gold answer "".
    A question missing from `predictions` scores 0 whatever its probability (one warning in all); the official
    script stops with a KeyError there, and agrees with this everywhere else.
    """
    has_ans: dict[str, bool] = {}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, answers in _questions(dataset):
        has_ans[qid] = bool(answers)
        gold = [a for a in answers if normalize_answer(a)] or [""]
        prediction = predictions.get(qid)
        exact_raw[qid] = 0 if prediction is None else max(exact_match(prediction, a) for a in gold)
        f1_raw[qid] = 0 if prediction is None else max(f1_score(prediction, a, version="2.0") for a in gold)
    if not has_ans:
        raise UserError("SQuAD data has no questions")
    _warn_missing(sum(q not in predictions for q in has_ans), len(has_ans))
    probs = {q: 0.0 for q in predictions} if na_probs is None else na_probs
    no_prob = [q for q in has_ans if q in predictions and q not in probs]
    if no_prob:
        raise UserError(f"no-answer probabilities lack {len(no_prob)} answered questions, e.g. {no_prob[0]!r}")

    def thresholded(raw: dict[str, float]) -> dict[str, float]:
        abstains = {q for q in raw if q in predictions and probs[q] > na_prob_thresh}
        return {q: float(not has_ans[q]) if q in abstains else s for q, s in raw.items()}

    exact, f1s = thresholded(exact_raw), thresholded(f1_raw)
    result = _mean_scores(exact, f1s, list(has_ans))
    for prefix, answerable in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, has in has_ans.items() if has == answerable]
        if qids:
            result.update({f"{prefix}_{k}": v for k, v in _mean_scores(exact, f1s, qids).items()})
    if na_probs is not None:
        result["best_exact"], result["best_exact_thresh"] = _best_thresh(predictions, exact_raw, na_probs, has_ans)
        result["best_f1"], result["best_f1_thresh"] = _best_thresh(predictions, f1_raw, na_probs, has_ans)
    return result


def squad_version(dataset_json: dict) -> str:
    """Return "2.0" when the "version" field says 2 (e.g. "v2.0") or any question has "is_impossible"; else "1.1"."""
    if str(dataset_json.get("version", "")).lstrip("vV").startswith("2"):
        return "2.0"
    try:
        qas = (qa for article in dataset_json["data"] for p in article["paragraphs"] for qa in p["qas"])
        return "2.0" if any("is_impossible" in qa for qa in qas) else "1.1"
    except (KeyError, TypeError):
        return "1.1"  # malformed: the v1.1 evaluation reports what is wrong


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} file {path} is not valid JSON: {e}") from e


def _check_mapping(obj: Any, path: str | Path, what: str, value_ok: Callable[[Any], bool], kind: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{what} file {path} must hold a JSON object of question id -> {kind}")
    bad = next((k for k, v in obj.items() if not value_ok(v)), None)
    if bad is not None:
        raise UserError(f"{what} file {path}: the value for {bad!r} is {type(obj[bad]).__name__}, not a {kind}")
    return obj


def squad_eval_file(
    data_path: str | Path,
    predictions_path: str | Path,
    na_prob_path: str | Path | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, Any]:
    """Score a predictions JSON (question id -> answer text) against a SQuAD dataset JSON of either version.

    v1.1 data gives {"exact_match", "f1"}; v2.0 data gives `evaluate_v2`'s dict, using the optional no-answer
    probabilities JSON (question id -> probability). Unreadable or malformed files raise `UserError`.
    """
    dataset_json = _read_json(data_path, "SQuAD data")
    if not isinstance(dataset_json, dict) or not isinstance(dataset_json.get("data"), list):
        raise UserError(f'SQuAD data file {data_path} has no "data" list')
    predictions = _check_mapping(
        _read_json(predictions_path, "predictions"), predictions_path, "predictions", _is_str, "string"
    )
    na_probs = None
    if na_prob_path is not None:
        na_probs = _check_mapping(_read_json(na_prob_path, "no-answer"), na_prob_path, "no-answer", _is_num, "number")
    if squad_version(dataset_json) == "1.1":
        if na_probs is not None:
            raise UserError(f"no-answer probabilities {na_prob_path} given for SQuAD 1.1 data {data_path}")
        return evaluate_v1(dataset_json["data"], predictions)
    return evaluate_v2(dataset_json["data"], predictions, na_probs, na_prob_thresh)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
