"""The WordPiece tokenizer: training, BERT vocab files, transformers-compatible files and batch encoding."""

from __future__ import annotations

import json
import random

import pytest

from mobilebert.errors import UserError
from mobilebert.tokenizer import SPECIAL_TOKENS, Tokenizer

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "while", "running", "jumping", "jumped",
         "tokenizer", "tokenization", "token", "unhappy", "happily", "happiness", "model", "models", "modeling",
         "café", "naïve", "über", "résumé", "attention", "bottleneck")
TEXTS = ["Héllo, World! The quick brown fox's café.", "Tokenization of unhappily jumping models",
         "A much longer text that goes on and on about attention, bottlenecks and the distillation of models " * 3,
         "[MASK] stays whole; 東京 splits."]
SECOND = ["Short.", "Another text about running dogs, modeling and résumés.", "x", "Über naïve jumps"]


def made_up_corpus(n: int = 400, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."  # noqa: E731
    return [[sentence(), sentence()] for _ in range(n // 2)]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(made_up_corpus(), vocab_size=300)


def bert_vocab() -> list[str]:
    """A BERT-style vocabulary: [PAD]=0, [unusedN], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then pieces."""
    pieces = ["the", "quick", "brown", "fox", "cafe", "naive", "hello", "world", ",", ".", "!", "'", "s", "un",
              "##aff", "##able", "jump", "##ed", "##ing", "token", "##ization", "a", "##b", "over", "Hello"]
    return ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]


def write_bert_vocab(directory, do_lower_case: bool | None = True) -> list[str]:
    vocab = bert_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
    if do_lower_case is not None:
        config = {"tokenizer_class": "MobileBertTokenizer", "do_lower_case": do_lower_case}
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return vocab


# ---- training ----


def test_training_puts_the_special_tokens_first_and_respects_the_size(trained):
    assert [trained.pad_id, trained.unk_id, trained.cls_id, trained.sep_id, trained.mask_id] == [0, 1, 2, 3, 4]
    assert trained.convert_ids_to_tokens(range(5)) == list(SPECIAL_TOKENS)
    assert trained.special_ids == {0, 1, 2, 3, 4}
    assert 100 < trained.vocab_size <= 300
    assert trained.convert_ids_to_tokens(trained.encode("jumping")) == ["jumping"]  # frequent words are whole


def test_training_is_deterministic(trained):
    again = Tokenizer.train(made_up_corpus(), vocab_size=300)
    assert again.backend.get_vocab() == trained.backend.get_vocab()


def test_training_on_an_empty_corpus_is_a_user_error():
    with pytest.raises(UserError, match="empty corpus"):
        Tokenizer.train([[]])


# ---- files ----


def test_save_and_load_give_the_same_ids(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.txt", "tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "MobileBertTokenizer" and config["do_lower_case"] is True
    assert config["model_max_length"] == 512 and config["mask_token"] == "[MASK]"
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.encode_batch(TEXTS) == trained.encode_batch(TEXTS)
    (tmp_path / "tokenizer.json").unlink()  # now built from vocab.txt and tokenizer_config.json
    from_vocab = Tokenizer.from_pretrained(tmp_path)
    assert from_vocab.encode_batch(TEXTS) == trained.encode_batch(TEXTS)
    assert from_vocab.vocab_size == trained.vocab_size


def test_bert_vocab_ids(tmp_path):
    vocab = write_bert_vocab(tmp_path, do_lower_case=None)  # BERT uncased's defaults without a config
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.vocab_size == len(vocab)
    cases = {"Héllo, WORLD!": ["hello", ",", "world", "!"],  # lowercase, strip accents, split punctuation
             "Café naïve fox's": ["cafe", "naive", "fox", "'", "s"],
             "unaffable jumped jumping": ["un", "##aff", "##able", "jump", "##ed", "jump", "##ing"],
             "tokenization xyz [MASK]": ["token", "##ization", "[UNK]", "[MASK]"]}
    for text, tokens in cases.items():
        ids = tok.encode(text)
        assert ids == [vocab.index(token) for token in tokens], text
    ids = tok.encode("unaffable jumped")
    assert tok.word_starts(ids) == [True, False, False, True, False]
    assert tok.decode(ids) == "unaffable jumped"
    pair = tok.encode_pairs(["hello world"], ["the fox"])
    assert pair["input_ids"].tolist() == [[101, *tok.encode("hello world"), 102, *tok.encode("the fox"), 102]]
    assert pair["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]


def test_do_lower_case_false_keeps_case_and_accents(tmp_path):
    vocab = write_bert_vocab(tmp_path, do_lower_case=False)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("Hello hello") == [vocab.index("Hello"), vocab.index("hello")]
    assert tok.encode("Café") == [tok.unk_id]
    tok.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["do_lower_case"] is False
    assert (tmp_path / "saved" / "vocab.txt").read_text(encoding="utf-8") == (tmp_path / "vocab.txt").read_text()


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab\.txt: the vocabulary has no \[MASK\] token"):
        Tokenizer.from_pretrained(tmp_path)


# ---- encoding ----


def test_encode_batch_matches_encode(trained):
    assert trained.encode_batch(TEXTS) == [trained.encode(text) for text in TEXTS]
    added = trained.special_ids - {trained.unk_id}  # [UNK] is a lookup result; the others are never added here
    assert added.isdisjoint(i for ids in trained.encode_batch(TEXTS[:3]) for i in ids)


def test_encode_pairs_shapes_and_padding(trained):
    batch = trained.encode_pairs(TEXTS, SECOND, max_length=24)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(t.shape == (4, 24) and t.dtype.is_signed and t.element_size() == 8 for t in batch.values())
    single = trained.encode_pairs(["short", "a bit longer text"], max_length=64)
    assert single["attention_mask"].tolist()[0][-1] == 0 and single["input_ids"][0, -1].item() == trained.pad_id
    assert trained.encode_pairs(TEXTS)["input_ids"].shape[1] == 128  # truncated to the default max_length
    assert trained.encode_pairs(TEXTS, max_length=512)["input_ids"].shape[1] == len(trained.encode(TEXTS[2])) + 2
    with pytest.raises(ValueError, match="first texts"):
        trained.encode_pairs(TEXTS, SECOND[:2])


@pytest.mark.parametrize("source", ["trained", "bert-vocab"])
def test_encode_pairs_matches_transformers(source, trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    if source == "trained":
        trained.save_pretrained(tmp_path)
    else:
        write_bert_vocab(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode_batch(TEXTS) == [theirs.encode(text, add_special_tokens=False) for text in TEXTS]
    for second in (None, SECOND):
        for max_length in (8, 16, 128):
            batch = ours.encode_pairs(TEXTS, second, max_length=max_length)
            expected = theirs(TEXTS, second, truncation=True, max_length=max_length, padding=True)
            for key, value in batch.items():
                assert value.tolist() == expected[key], (key, second is not None, max_length)
