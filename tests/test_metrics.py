"""Metrics: GLUE scores equal scikit-learn / scipy; SQuAD scoring matches the official scripts on hand-made cases."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, matthews_corrcoef
from sklearn.metrics import f1_score as sk_f1_score

from mobilebert.errors import UserError
from mobilebert.metrics import (
    GLUE_METRICS,
    accuracy,
    compute_metrics,
    evaluate_v1,
    evaluate_v2,
    exact_match,
    f1,
    f1_score,
    matthews,
    normalize_answer,
    pearson,
    spearman,
    squad_eval_file,
    squad_version,
)

# ----------------------------------------------------------------------------------------------------- GLUE


def _label_cases(n_classes: int, count: int = 200):
    """Seeded random (preds, labels) pairs, lengths 1..40, including runs where a class is rare or absent."""
    rng = np.random.default_rng(n_classes)
    for _ in range(count):
        n = int(rng.integers(1, 41))
        k = int(rng.integers(1, n_classes + 1))
        yield rng.integers(0, k, n), rng.integers(0, n_classes, n)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.filterwarnings("ignore:A single label was found")
def test_classification_metrics_equal_sklearn_on_random_cases():
    for preds, labels in _label_cases(2):
        assert accuracy(preds, labels) == pytest.approx(accuracy_score(labels, preds), abs=1e-15)
        assert f1(preds, labels) == pytest.approx(sk_f1_score(labels, preds), abs=1e-15)
        assert matthews(preds, labels) == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-12)


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_matthews_equals_sklearn_on_multiclass_cases():
    for preds, labels in _label_cases(4):
        assert matthews(preds, labels) == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@pytest.mark.filterwarnings("ignore:A single label was found")
def test_degenerate_classification_cases():
    ones, zeros = np.ones(6, dtype=int), np.zeros(6, dtype=int)
    mixed = np.array([0, 1, 0, 1, 1, 0])
    for preds, labels in [(ones, ones), (zeros, zeros), (ones, mixed), (mixed, zeros)]:
        assert matthews(preds, labels) == 0.0 == matthews_corrcoef(labels, preds)  # undefined -> 0.0, as sklearn
    assert f1(zeros, zeros) == 0.0 == sk_f1_score(zeros, zeros)  # no positive anywhere
    assert f1(ones, ones) == 1.0 and accuracy(ones, zeros) == 0.0
    assert matthews(mixed, mixed) == 1.0 and matthews(1 - mixed, mixed) == -1.0


def test_correlations_equal_scipy_on_random_cases_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 50))
        labels = rng.normal(size=n)
        preds = labels + rng.normal(scale=rng.uniform(0.1, 3.0), size=n)
        assert pearson(preds, labels) == pytest.approx(pearsonr(preds, labels)[0], rel=1e-10, abs=1e-12)
        tied_p, tied_y = rng.integers(0, 4, n).astype(float), np.round(labels * 2) / 2  # many ties on both sides
        if np.ptp(tied_p) == 0 or np.ptp(tied_y) == 0:
            continue
        assert spearman(tied_p, tied_y) == pytest.approx(spearmanr(tied_p, tied_y)[0], rel=1e-10, abs=1e-12)
        assert spearman(preds, labels) == pytest.approx(spearmanr(preds, labels)[0], rel=1e-10, abs=1e-12)


def test_correlations_by_hand_and_undefined():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(pearson([1, 1, 1], [1, 2, 3])) and np.isnan(pearsonr([1, 1, 1], [1, 2, 3])[0])
    assert np.isnan(spearman([2, 2, 2], [1, 2, 3]))


def test_compute_metrics_returns_plain_floats_in_order():
    out = compute_metrics(["matthews", "accuracy", "f1"], np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
    assert list(out) == ["matthews", "accuracy", "f1"] and all(type(v) is float for v in out.values())
    assert out["accuracy"] == 0.75 and out["f1"] == pytest.approx(0.8)  # TP 2, FP 1, FN 0: 4 / 5
    # MCC = (TP·TN - FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2·1 - 1·0) / sqrt(3·2·2·1) = 1/sqrt(3)
    assert out["matthews"] == pytest.approx(1 / np.sqrt(3))
    assert set(GLUE_METRICS) == {"accuracy", "f1", "matthews", "pearson", "spearman"}
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="equal length"):
        accuracy([1, 0], [1])


# ---------------------------------------------------------------------------------------------------- SQuAD


def _data(*qas: tuple[str, list[str]]) -> list:
    """A SQuAD "data" list of one article holding one paragraph with the given (id, gold answers) questions."""
    questions = [
        {"id": qid, "question": "?", "answers": [{"text": t, "answer_start": 0} for t in gold]} for qid, gold in qas
    ]
    return [{"title": "t", "paragraphs": [{"context": "c", "qas": questions}]}]


def test_normalize_answer_follows_the_official_order():
    assert normalize_answer("The Cat!") == "cat"
    assert normalize_answer("  An  apple,\ta day\n") == "apple day"
    assert normalize_answer("Theatre and anthem") == "theatre and anthem"  # articles only as whole words
    assert normalize_answer("the.cat") == "thecat"  # punctuation goes first, so "the" is no longer a word
    assert normalize_answer("A-B") == "ab" and normalize_answer("a the an") == ""


def test_exact_match_and_f1_by_hand():
    assert exact_match("The Eiffel Tower.", "eiffel  tower") == 1
    assert exact_match("Eiffel", "Eiffel Tower") == 0
    # pred tokens quick brown fox, gold quick red fox jumps: 2 shared, P 2/3, R 1/2, F1 = (2/3) / (7/6) = 4/7
    for version in ("1.1", "2.0"):
        assert f1_score("the quick brown fox", "A quick red fox jumps", version) == pytest.approx(4 / 7)
        assert f1_score("x x y", "x y y", version) == pytest.approx(2 / 3)  # bags: one x and one y shared of 3
        assert f1_score("Paris", "paris.", version) == 1.0 and f1_score("London", "Paris", version) == 0.0


def test_v1_and_v2_differ_on_empty_answers():
    assert f1_score("", "", "1.1") == 0.0 and f1_score("", "", "2.0") == 1.0
    assert f1_score("the", ".", "2.0") == 1.0  # both normalize to nothing
    assert f1_score("cat", "", "2.0") == 0.0 and f1_score("", "cat", "2.0") == 0.0
    assert exact_match("", "") == 1
    with pytest.raises(ValueError, match="version"):
        f1_score("a", "a", "3.0")
    data = _data(("q", ["."]))  # a gold answer that normalizes to nothing
    assert evaluate_v1(data, {"q": ""}) == {"exact_match": 100.0, "f1": 0.0}
    v2 = evaluate_v2(data, {"q": ""})  # dropped, leaving the gold "", which "" matches in full
    assert (v2["exact"], v2["f1"], v2["HasAns_total"]) == (100.0, 100.0, 1) and "NoAns_total" not in v2


def test_evaluate_v1_takes_the_max_over_gold_answers_and_scores_missing_as_zero():
    data = _data(
        ("q1", ["Denver Broncos", "The Broncos"]),  # EM 1 through the second; F1 1 (first alone: 2/3)
        ("q2", ["fox", "brown fox jumps"]),  # "brown fox": F1 2/3 with "fox", 4/5 with the second (P 1, R 2/3)
        ("q3", ["quick red fox jumps"]),  # "the quick brown fox": F1 4/7
        ("q4", ["anything"]),  # missing
    )
    preds = {"q1": "broncos", "q2": "brown fox", "q3": "the quick brown fox"}
    with pytest.warns(UserWarning, match="1 of 4 questions have no prediction"):
        out = evaluate_v1(data, preds)
    assert out["exact_match"] == pytest.approx(100 * 1 / 4)
    assert out["f1"] == pytest.approx(100 * (1 + 4 / 5 + 4 / 7) / 4)


TINY_V2 = _data(("q1", ["Paris"]), ("q2", ["quick red fox jumps"]), ("q3", []), ("q4", []))
TINY_PREDS = {"q1": "Paris", "q2": "the quick brown fox", "q3": "", "q4": "London"}
# Raw scores: q1 EM 1 F1 1; q2 EM 0 F1 4/7; q3 (abstains on an unanswerable question) 1, 1; q4 0, 0.


def test_evaluate_v2_scores_answerable_and_unanswerable_questions():
    out = evaluate_v2(TINY_V2, TINY_PREDS)
    expected = {
        "exact": 50.0,
        "f1": 100 * (2 + 4 / 7) / 4,
        "total": 4,
        "HasAns_exact": 50.0,
        "HasAns_f1": 100 * (1 + 4 / 7) / 2,
        "HasAns_total": 2,
        "NoAns_exact": 50.0,
        "NoAns_f1": 50.0,
        "NoAns_total": 2,
    }
    assert list(out) == list(expected)
    assert out == pytest.approx(expected)


def test_evaluate_v2_threshold_and_best_threshold_by_hand():
    na_probs = {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.7}
    out = evaluate_v2(TINY_V2, TINY_PREDS, na_probs, na_prob_thresh=0.5)
    # Above 0.5 (q2, q4, q3) abstain: q2 loses its answer (0), q4 and q3 are right (1): EM = F1 = 3/4.
    assert (out["exact"], out["f1"], out["HasAns_f1"], out["NoAns_exact"]) == (75.0, 75.0, 50.0, 100.0)
    # Sweep in order q1 .1, q2 .6, q4 .7, q3 .9 starting from "all abstain" = 2 (the two unanswerable ones):
    # EM: +1 -> 3 at 0.1 (best), +0 -> 3, -1 (q4 answers "London") -> 2, +0 -> 2.  best 3/4 at 0.1
    # F1: +1 -> 3 at 0.1, +4/7 -> 3 4/7 at 0.6 (best), -1, +0.                    best (3 + 4/7)/4 at 0.6
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == 0.1
    assert out["best_f1"] == pytest.approx(100 * (3 + 4 / 7) / 4) and out["best_f1_thresh"] == 0.6
    assert list(out)[-4:] == ["best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    # The default threshold 1.0 never abstains: the plain scores come back, plus the best thresholds.
    assert evaluate_v2(TINY_V2, TINY_PREDS, na_probs)["exact"] == 50.0


def test_evaluate_v2_missing_prediction_and_missing_probability():
    with pytest.warns(UserWarning, match="1 of 4"):
        out = evaluate_v2(TINY_V2, {k: v for k, v in TINY_PREDS.items() if k != "q3"})
    assert out["exact"] == 25.0 and out["NoAns_exact"] == 0.0
    with pytest.raises(UserError, match="lack 1 answered questions, e.g. 'q2'"):
        evaluate_v2(TINY_V2, TINY_PREDS, {"q1": 0.1, "q3": 0.2, "q4": 0.3})


def test_squad_version():
    assert squad_version({"version": "1.1", "data": []}) == "1.1"
    assert squad_version({"version": "v2.0", "data": []}) == "2.0"
    assert squad_version({"data": [{"paragraphs": [{"qas": [{"id": "q", "is_impossible": False}]}]}]}) == "2.0"
    assert squad_version({"data": _data(("q", ["a"]))}) == "1.1"


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_squad_eval_file_dispatches_by_version(tmp_path):
    v1 = _write(tmp_path / "v1.json", {"version": "1.1", "data": _data(("q", ["Denver Broncos"]))})
    preds = _write(tmp_path / "p.json", {"q": "Broncos"})
    assert squad_eval_file(v1, preds) == pytest.approx({"exact_match": 0.0, "f1": 100 * 2 / 3})
    v2 = _write(tmp_path / "v2.json", {"version": "v2.0", "data": TINY_V2})
    probs = _write(tmp_path / "na.json", {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.7})
    out = squad_eval_file(v2, _write(tmp_path / "p2.json", TINY_PREDS), probs, na_prob_thresh=0.5)
    assert out == evaluate_v2(TINY_V2, TINY_PREDS, json.loads((tmp_path / "na.json").read_text()), 0.5)
    assert out["best_f1_thresh"] == 0.6


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing data", "SQuAD data file not found"),
        ("missing predictions", "predictions file not found"),
        ("data not json", "is not valid JSON"),
        ("no data list", 'has no "data" list'),
        ("data is a dict", 'has no "data" list'),
        ("predictions a list", "must hold a JSON object of question id -> string"),
        ("prediction not a string", "the value for 'q' is int, not a string"),
        ("probability not a number", "the value for 'q' is str, not a number"),
        ("malformed question", "SQuAD data is malformed"),
        ("probabilities for v1 data", "given for SQuAD 1.1 data"),
    ],
)
def test_squad_eval_file_bad_input(tmp_path, case, match):
    data = _write(tmp_path / "data.json", {"version": "v2.0", "data": _data(("q", ["a"]))})
    preds = _write(tmp_path / "preds.json", {"q": "a"})
    na = None
    if case == "missing data":
        data = str(tmp_path / "absent.json")
    elif case == "missing predictions":
        preds = str(tmp_path / "absent.json")
    elif case == "data not json":
        (tmp_path / "data.json").write_text("{not json")
    elif case == "no data list":
        _write(tmp_path / "data.json", {"version": "1.1"})
    elif case == "data is a dict":
        _write(tmp_path / "data.json", {"data": {"paragraphs": []}})
    elif case == "predictions a list":
        _write(tmp_path / "preds.json", ["a"])
    elif case == "prediction not a string":
        _write(tmp_path / "preds.json", {"q": 3})
    elif case == "probability not a number":
        na = _write(tmp_path / "na.json", {"q": "high"})
    elif case == "malformed question":
        _write(tmp_path / "data.json", {"data": [{"paragraphs": [{"qas": [{"question": "no id"}]}]}]})
    elif case == "probabilities for v1 data":
        _write(tmp_path / "data.json", {"version": "1.1", "data": _data(("q", ["a"]))})
        na = _write(tmp_path / "na.json", {"q": 0.5})
    with pytest.raises(UserError, match=match) as info:
        squad_eval_file(data, preds, na)
    assert "\n" not in str(info.value)
