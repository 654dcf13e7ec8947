"""SQuAD data: reading the official JSON, windowed features, and decoding answers back from logits.

The round trip (gold spans fed back as logits → post-processing → the gold text) runs on made-up paragraphs long
enough for many windows, each shifted by 0..15 filler words so that answers meet every window edge.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
import warnings

import numpy as np
import pytest

from mobilebert.data.squad import (
    SquadExample,
    SquadFeatures,
    make_features,
    postprocess,
    read_squad,
    write_predictions,
)
from mobilebert.errors import UserError
from mobilebert.tokenizer import Tokenizer

# (question, answer, sentence holding the answer once, other gold answers for evaluation)
FACTS = [
    ("Who founded the Aldermoor observatory?", "Margarethe Voss",
     "The Aldermoor observatory was founded by Margarethe Voss, a clockmaker from the coast.", ["Voss"]),
    ("In which year did the iron bridge open?", "1887",
     "The iron bridge over the Tamsel river opened in 1887 after nine years of work.", []),
    ("How long is the northern railway?", "1,250 kilometres",
     "The northern railway is 1,250 kilometres long and crosses three valleys.", ["1,250"]),
    ("Where does the winter choir sing?", "St. Mary's",
     "Every December the winter choir sings at St. Mary's, near the old market.", ["at St. Mary's"]),
    ("Where do the engineers meet on Fridays?", "Café Müller",
     "The engineers meet on Fridays at Café Müller to argue about gears.", []),
    ("What did the museum buy last spring?", "a brass orrery",
     "Last spring the museum bought a brass orrery from a private collector.", ["brass orrery"]),
    ("Who repaired the tower clock?", "J. R. McAllister-Hughes",
     "The tower clock was repaired by J. R. McAllister-Hughes in a single week.", []),
    ("What is the motto of the guild?", '"Measure twice, cut once!"',
     'The motto of the guild is "Measure twice, cut once!" and it hangs above the door.', []),
    ("Which agency funded the survey of the crater lakes?", "NASA",
     "The survey of the crater lakes was funded by NASA and two universities.", []),
    ("How many lamps line the harbour?", "Forty-two",
     "Forty-two lamps line the harbour, and each one is lit by hand.", ["Forty-two lamps"]),
    ("Who was the first keeper of the lighthouse?", "Oskar Lind (1802–1871)",
     "The first keeper of the lighthouse was Oskar Lind (1802–1871), who kept a diary.", ["Oskar Lind"]),
    ("What colour is the ferry?", "deep green",
     "The ferry to the island is painted deep green every other summer.", []),
]
FILLER = ["The weather in the valley was mild and the rivers were calm for most of the year.",
          "Farmers brought apples, cheese and wool to the market on the first day of each month.",
          "Children played by the water while the old men talked about storms long past."]
UNANSWERABLE = ["Who demolished the Aldermoor observatory?", "How long is the southern railway?",
                "What did the museum sell last winter?"]
OPTS = dict(max_seq_length=64, doc_stride=16, max_query_length=16)


def long_context(facts: list[tuple], shift: int) -> str:
    """The facts' sentences with filler between them, after `shift` filler words: a context of many windows."""
    sentences = [sentence for i, fact in enumerate(facts) for sentence in (fact[2], FILLER[i % len(FILLER)])]
    return " ".join(["and"] * shift + sentences)


def answer(context: str, text: str) -> dict:
    assert text in context
    return {"text": text, "answer_start": context.index(text)}


def squad_file(path, paragraphs: list[dict], version: str = "1.1"):
    path.write_text(json.dumps({"version": version, "data": [{"title": "Made-up", "paragraphs": paragraphs}]}),
                    encoding="utf-8")
    return path


def shifted_paragraphs(shifts=range(16), with_alternatives: bool = False) -> list[dict]:
    """Two long paragraphs of six facts each, at every shift: every answer meets every window alignment."""
    paragraphs = []
    for shift in shifts:
        for half, facts in enumerate((FACTS[:6], FACTS[6:])):
            context = long_context(facts, shift)
            qas = [{"id": f"s{shift}-p{half}-q{i}", "question": q,
                    "answers": [answer(context, a)] + [answer(context, alt) for alt in alts if with_alternatives]}
                   for i, (q, a, _, alts) in enumerate(facts)]
            paragraphs.append({"context": context, "qas": qas})
    return paragraphs


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    documents = [[fact[2], fact[0]] for fact in FACTS] + [FILLER, UNANSWERABLE]
    return Tokenizer.train(documents, vocab_size=400)


def normalize(text: str) -> str:
    """The official SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(examples: list[SquadExample], predictions: dict[str, str]) -> float:
    golds = {e.qid: [text for text, _ in e.answers] or [""] for e in examples}
    return 100.0 * np.mean([max(normalize(predictions[qid]) == normalize(g) for g in gold)
                            for qid, gold in golds.items()])


def gold_logits(examples: list[SquadExample], features: SquadFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a perfect model: 10 at the first answer's first and last token in every window that holds it
    whole, else at [CLS] (no answer here)."""
    starts, ends = np.zeros(features.input_ids.shape), np.zeros(features.input_ids.shape)
    for f, index in enumerate(features.example_index):
        start, end = answer_positions(examples[index], features.offsets[f])
        starts[f, start], ends[f, end] = 10.0, 10.0
    return starts, ends


def answer_positions(example: SquadExample, offsets: list) -> tuple[int, int]:
    """Positions of the first answer's first and last token in a window, or (0, 0) when it is not wholly there."""
    if example.is_impossible:
        return 0, 0
    text, char = example.answers[0]
    inside = [p for p, o in enumerate(offsets) if o is not None and o[0] < char + len(text) and o[1] > char]
    if inside and offsets[inside[0]][0] <= char and offsets[inside[-1]][1] >= char + len(text):
        return inside[0], inside[-1]
    return 0, 0


def squash(text: str) -> str:
    """Lower case, no accents, no whitespace: how a decoded answer compares to the original text."""
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(ch for ch in text if not unicodedata.combining(ch) and not ch.isspace())


# ---- round trip ----

def test_round_trip_v1_reproduces_every_gold_answer(tmp_path, tokenizer):
    path = squad_file(tmp_path / "dev-v1.1.json", shifted_paragraphs(with_alternatives=True))
    examples = read_squad(path, training=False)
    features = make_features(examples, tokenizer, **OPTS)
    assert len(features) > 8 * len(examples) / 6  # long contexts: several windows per example
    out = postprocess(examples, features, *gold_logits(examples, features))
    assert all(out.predictions[e.qid] == e.answers[0][0] for e in examples)  # exact text: case, accents, marks
    assert exact_match(examples, out.predictions) == 100.0
    assert out.null_odds == {}
    best = out.nbest[examples[0].qid]
    assert best[0]["text"] == examples[0].answers[0][0] and best[0]["start_logit"] == best[0]["end_logit"] == 10.0
    assert sum(entry["probability"] for entry in best) == pytest.approx(1.0)


def test_a_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    plain = squad_file(tmp_path / "dev.json", shifted_paragraphs(shifts=[0]))
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # as Windows Notepad saves UTF-8
    assert read_squad(tmp_path / "bom.json", training=False) == read_squad(plain, training=False)


def test_round_trip_covers_window_edges(tmp_path, tokenizer):
    """The shifted paragraphs put answers at the first and last context token of windows, and across edges."""
    examples = read_squad(squad_file(tmp_path / "dev.json", shifted_paragraphs()), training=False)
    features = make_features(examples, tokenizer, **OPTS)
    at_first = at_last = cut = 0
    for f, index in enumerate(features.example_index):
        offsets, (start, end) = features.offsets[f], answer_positions(examples[index], features.offsets[f])
        context_positions = [p for p, o in enumerate(offsets) if o is not None]
        at_first += start == context_positions[0]
        at_last += end == context_positions[-1] and start > 0
        text, char = examples[index].answers[0]
        cut += start == 0 and any(o is not None and o[0] < char + len(text) and o[1] > char for o in offsets)
    assert at_first > 0 and at_last > 0 and cut > 0


def test_round_trip_v2_predicts_no_answer_for_unanswerable(tmp_path, tokenizer):
    paragraphs = shifted_paragraphs(shifts=[0, 7])
    for n, paragraph in enumerate(paragraphs):
        paragraph["qas"] += [{"id": f"none-{n}-{i}", "question": q, "answers": [], "is_impossible": True,
                              "plausible_answers": [answer(paragraph["context"], "1887")] if "1887" in
                              paragraph["context"] else []} for i, q in enumerate(UNANSWERABLE)]
    examples = read_squad(squad_file(tmp_path / "dev-v2.0.json", paragraphs, "v2.0"), training=False)
    features = make_features(examples, tokenizer, **OPTS)
    out = postprocess(examples, features, *gold_logits(examples, features), version_2=True)
    for example in examples:
        if example.is_impossible:
            assert out.predictions[example.qid] == "" and out.null_odds[example.qid] > 0
        else:
            assert out.predictions[example.qid] == example.answers[0][0] and out.null_odds[example.qid] < 0
        assert "" in [entry["text"] for entry in out.nbest[example.qid]]
    assert exact_match(examples, out.predictions) == 100.0
    # A threshold above every null-odds value answers everything.
    lenient = postprocess(examples, features, *gold_logits(examples, features), version_2=True,
                          null_score_diff_threshold=1e6)
    assert all(text != "" for text in lenient.predictions.values())


def test_round_trip_with_unknown_words(tmp_path):
    """A tiny vocab.txt: most words are [UNK], yet the answer comes back as the original characters."""
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "who",
                                                   "built", "was", "by", ".", "?", "it"]) + "\n")
    tok = Tokenizer.from_pretrained(tmp_path)
    context = "It was built by Ærønsen-Ødegaard Vänskä. The end."
    path = squad_file(tmp_path / "dev.json", [{"context": context, "qas": [
        {"id": "q", "question": "Who built it?", "answers": [answer(context, "Ærønsen-Ødegaard Vänskä")]}]}])
    examples = read_squad(path, training=False)
    features = make_features(examples, tok, max_seq_length=16, doc_stride=4, max_query_length=5)
    assert len(features) > 1
    assert postprocess(examples, features, *gold_logits(examples, features)).predictions == \
        {"q": "Ærønsen-Ødegaard Vänskä"}


# ---- features ----

def test_training_positions_point_at_the_answer(tmp_path, tokenizer):
    paragraphs = shifted_paragraphs(shifts=[0, 5, 11])
    paragraphs[0]["qas"].append({"id": "none", "question": UNANSWERABLE[0], "answers": [], "is_impossible": True})
    path = squad_file(tmp_path / "train.json", paragraphs)
    train = make_features(read_squad(path, training=True), tokenizer, training=True, **OPTS)
    examples = read_squad(path, training=False)
    evaluation = make_features(examples, tokenizer, **OPTS)  # the same windows, with offsets
    assert train.offsets is None and evaluation.start_positions is None
    np.testing.assert_array_equal(train.input_ids, evaluation.input_ids)
    positive = 0
    for f, index in enumerate(train.example_index):
        start, end = int(train.start_positions[f]), int(train.end_positions[f])
        assert (start, end) == answer_positions(examples[index], evaluation.offsets[f])
        if start:
            positive += 1
            decoded = tokenizer.decode(train.input_ids[f, start:end + 1])
            assert squash(decoded) == squash(examples[index].answers[0][0])
    impossible = [f for f, index in enumerate(train.example_index) if examples[index].qid == "none"]
    assert len(impossible) > 1 and not train.start_positions[impossible].any()
    assert 0 < positive < len(train)  # some windows hold the answer, some do not


def test_feature_layout_and_shapes(tmp_path, tokenizer):
    examples = read_squad(squad_file(tmp_path / "dev.json", shifted_paragraphs(shifts=[3])), training=False)
    features = make_features(examples, tokenizer, **OPTS)
    n, length = len(features), OPTS["max_seq_length"]
    for name in ("input_ids", "attention_mask", "token_type_ids", "token_is_max_context"):
        assert getattr(features, name).shape == (n, length)
    assert features.example_index.shape == (n,) and len(features.offsets) == n
    assert all(len(row) == length for row in features.offsets)
    for f in range(n):
        ids, mask, types = features.input_ids[f], features.attention_mask[f], features.token_type_ids[f]
        used = int(mask.sum())
        assert not mask[used:].any() and (ids[used:] == tokenizer.pad_id).all()
        seps = np.flatnonzero(ids == tokenizer.sep_id)
        assert ids[0] == tokenizer.cls_id and seps.tolist() == [seps[0], used - 1]
        question = tokenizer.encode(examples[features.example_index[f]].question)[:OPTS["max_query_length"]]
        assert ids[1:seps[0]].tolist() == question
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:used] == 1).all() and not types[used:].any()
        context = [p for p, o in enumerate(features.offsets[f]) if o is not None]
        assert context == list(range(seps[0] + 1, used - 1))
    empty = make_features([], tokenizer, training=True, **OPTS)
    assert empty.input_ids.shape == (0, length) and empty.start_positions.shape == (0,) and len(empty) == 0


def test_windows_cover_every_context_token_once_at_max_context(tmp_path, tokenizer):
    examples = read_squad(squad_file(tmp_path / "dev.json", shifted_paragraphs(shifts=[0, 9])), training=False)
    for stride in (16, 5, 100):  # a stride longer than a window must not leave gaps
        features = make_features(examples, tokenizer, **{**OPTS, "doc_stride": stride})
        for index in (0, 1, 2, len(examples) - 2, len(examples) - 1):
            example = examples[index]
            covered: dict[tuple, int] = {}
            max_context: dict[tuple, int] = {}
            for f in np.flatnonzero(features.example_index == index):
                for offset, is_max in zip(features.offsets[f], features.token_is_max_context[f], strict=True):
                    assert offset is not None or not is_max
                    if offset is not None:
                        covered[offset] = covered.get(offset, 0) + 1
                        max_context[offset] = max_context.get(offset, 0) + int(is_max)
            all_tokens = tokenizer.backend.encode(example.context, add_special_tokens=False).offsets
            assert sorted(covered) == sorted(all_tokens)
            assert set(max_context.values()) == {1}
            assert max(covered.values()) > 1 or stride == 100  # windows overlap


def test_short_and_empty_contexts_give_one_window(tokenizer):
    examples = [SquadExample("a", "", "Who?", "Oskar Lind.", [("Oskar Lind", 0)]),
                SquadExample("b", "", "Who?", "", [], is_impossible=True)]
    features = make_features(examples, tokenizer, **OPTS)
    assert features.example_index.tolist() == [0, 1]
    out = postprocess(examples, features, np.zeros((2, 64)), np.zeros((2, 64)), version_2=True)
    assert out.predictions["b"] == "" and out.null_odds["b"] == float("inf")


def test_make_features_rejects_a_window_with_no_room(tokenizer):
    with pytest.raises(UserError, match="max_seq_length 20"):
        make_features([], tokenizer, max_seq_length=20, max_query_length=17)
    with pytest.raises(UserError, match="doc_stride"):
        make_features([], tokenizer, doc_stride=0)


# ---- post-processing ----

@pytest.mark.parametrize("trap", ["question token", "end before start", "too long"])
def test_postprocess_skips_invalid_spans(tokenizer, trap):
    """The highest-scoring pair is invalid; the answer is the best valid span (context tokens 3..4)."""
    context = "Oskar Lind kept the lighthouse for forty years and wrote a diary."
    examples = [SquadExample("q", "", "Who kept the lighthouse?", context, [("Oskar Lind", 0)])]
    features = make_features(examples, tokenizer, **OPTS)
    first = int(np.flatnonzero(features.token_type_ids[0])[0])  # the first context position
    starts, ends = np.full((1, 64), -100.0), np.full((1, 64), -100.0)
    starts[0, first + 3], ends[0, first + 4] = 10.0, 10.0
    start, end = {"question token": (1, 1), "end before start": (first + 5, first + 2),
                  "too long": (first, first + 4)}[trap]  # too long: 5 tokens, max_answer_length=4
    starts[0, start], ends[0, end] = 40.0, 40.0
    out = postprocess(examples, features, starts, ends, max_answer_length=4)
    offsets = features.offsets[0]
    assert out.predictions["q"] == context[offsets[first + 3][0]:offsets[first + 4][1]]
    assert len({entry["text"] for entry in out.nbest["q"]}) == len(out.nbest["q"]) <= 20


def test_postprocess_starts_only_where_a_token_has_max_context(tmp_path, tokenizer):
    examples = read_squad(squad_file(tmp_path / "dev.json", shifted_paragraphs(shifts=[0])), training=False)[:1]
    features = make_features(examples, tokenizer, **OPTS)
    starts, ends = np.full((len(features), 64), -100.0), np.full((len(features), 64), -100.0)
    def text(f: int, p: int) -> str:
        a, b = features.offsets[f][p]
        return examples[0].context[a:b]

    # The highest logits on a token in a window where it lacks max context; lower ones on another token elsewhere.
    f, p = next((f, p) for f in range(len(features)) for p in range(64)
                if features.offsets[f][p] is not None and not features.token_is_max_context[f, p])
    g, q = next((g, q) for g in range(len(features)) for q in range(64) if g != f and
                features.token_is_max_context[g, q] and text(g, q) != text(f, p))
    starts[f, p] = ends[f, p] = 40.0
    starts[g, q] = ends[g, q] = 10.0
    assert postprocess(examples, features, starts, ends).predictions == {examples[0].qid: text(g, q)}


def test_postprocess_checks_its_inputs(tmp_path, tokenizer):
    examples = [SquadExample("q", "", "Who?", "Oskar Lind.", [("Oskar Lind", 0)])]
    features = make_features(examples, tokenizer, **OPTS)
    with pytest.raises(ValueError, match="shapes"):
        postprocess(examples, features, np.zeros((2, 64)), np.zeros((2, 64)))
    training = make_features(examples, tokenizer, training=True, **OPTS)
    with pytest.raises(ValueError, match="evaluation features"):
        postprocess(examples, training, np.zeros((1, 64)), np.zeros((1, 64)))


def test_write_predictions_is_atomic_json(tmp_path):
    path = write_predictions(tmp_path / "out" / "predictions.json", {"q1": "Café Müller", "q2": ""})
    assert json.loads(path.read_text(encoding="utf-8")) == {"q1": "Café Müller", "q2": ""}
    assert [p.name for p in path.parent.iterdir()] == ["predictions.json"]  # no temporary file left


# ---- reading ----

def test_read_squad_fields(tmp_path):
    context = "The ferry is painted deep green."
    path = squad_file(tmp_path / "dev.json", [{"context": context, "qas": [
        {"id": "q1", "question": "What colour?", "answers": [answer(context, "deep green"), answer(context, "green")]},
        {"id": "q2", "question": "Who paints it?", "answers": [], "is_impossible": True,
         "plausible_answers": [answer(context, "ferry")]}]}], "v2.0")
    dev = read_squad(path, training=False)
    assert dev == [SquadExample("q1", "Made-up", "What colour?", context, [("deep green", 21), ("green", 26)]),
                   SquadExample("q2", "Made-up", "Who paints it?", context, [], is_impossible=True)]
    train = read_squad(path, training=True)
    assert [e.answers for e in train] == [[("deep green", 21)], []]  # training keeps the first answer


def test_read_squad_skips_defective_training_answers_with_one_warning(tmp_path):
    context = "It costs $5 and the Denver Broncos won."
    qas = [{"id": "good", "question": "?", "answers": [answer(context, "Denver Broncos")]},
           {"id": "inside-a-word", "question": "?", "answers": [answer(context, "5")]},  # "$5": kept, as BERT does
           {"id": "spaces", "question": "?", "answers": [{"text": "Denver  Broncos", "answer_start": 20}]},
           {"id": "moved", "question": "?", "answers": [{"text": "Denver Broncos", "answer_start": 3}]},
           {"id": "outside", "question": "?", "answers": [{"text": "Broncos", "answer_start": 400}]},
           {"id": "none", "question": "?", "answers": []}]
    path = squad_file(tmp_path / "train.json", [{"context": context, "qas": qas}])
    with pytest.warns(UserWarning, match=r"skipped 3 training question") as record:
        train = read_squad(path, training=True)
    assert len(record) == 1 and str(path) in str(record[0].message)
    assert [e.qid for e in train] == ["good", "inside-a-word", "spaces"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_squad(path, training=False)) == len(qas)  # evaluation keeps everything


@pytest.mark.parametrize("content, message", [
    (None, "no such SQuAD file"),
    ("{not json", "not a JSON file"),
    ('{"version": "1.1"}', 'no "data" list'),
    ('{"data": {"paragraphs": []}}', 'no "data" list'),
    ('[1, 2]', 'no "data" list'),
    ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"question": "q?"}]}]}]}',
     "question 1 of a paragraph of article 'T' has no id"),
    ('{"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}', "has no 'context'"),
    ('{"data": [{"title": "T"}]}', "article 'T' has no 'paragraphs'"),
    ('{"version": "1.1", "data": []}', "no questions"),
])
def test_read_squad_errors(tmp_path, content, message):
    path = tmp_path / "squad.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(message)) as error:
        read_squad(path, training=True)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
