"""Corpus sources: the built-in corpus, the sentence splitter, text files, Hugging Face datasets, load_corpus."""

from __future__ import annotations

import sys

import pytest

from mobilebert.data import builtin_corpus as builtin
from mobilebert.data.builtin_corpus import (
    builtin_corpus,
    builtin_corpus_checksum,
    builtin_corpus_stats,
    docstring_sentences,
)
from mobilebert.data.corpus import (
    load_corpus,
    read_dataset,
    read_text_files,
    split_sentences,
)
from mobilebert.errors import UserError

datasets = pytest.importorskip("datasets")

# ---- the built-in corpus ----


def test_builtin_corpus_is_deterministic():
    fresh = builtin._builtin_splits.__wrapped__()  # a second extraction, bypassing the cache
    assert builtin_corpus("train") == [list(doc) for doc in fresh["train"]]
    assert builtin_corpus("validation") == [list(doc) for doc in fresh["validation"]]


def test_builtin_splits_are_disjoint_and_about_five_percent_validation():
    train, validation = builtin_corpus("train"), builtin_corpus("validation")
    assert not {tuple(doc) for doc in train} & {tuple(doc) for doc in validation}
    assert 0.03 < len(validation) / (len(train) + len(validation)) < 0.08


def test_builtin_corpus_is_prose_in_documents_of_sentences():
    stats = builtin_corpus_stats()
    assert stats["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    # ~207k words on 3.11; a wide band because the standard library changes between versions.
    assert 150_000 <= stats["train"]["words"] <= 400_000
    assert stats["validation"]["documents"] > 100
    for doc in builtin_corpus("validation"):
        assert len(doc) >= 2
        assert all(len(sentence.split()) >= 3 for sentence in doc)
        assert not any(sentence.startswith((">>>", "...")) or ":func:`" in sentence for sentence in doc)


@pytest.mark.skipif(builtin.python_version() not in builtin.BUILTIN_CHECKSUMS, reason="no checksum for this Python")
def test_builtin_corpus_checksum_matches_the_recorded_one():
    recorded = builtin.BUILTIN_CHECKSUMS[builtin.python_version()]
    assert {split: builtin_corpus_checksum(split) for split in recorded} == recorded


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="unknown split 'test'"):
        builtin_corpus("test")


def test_docstring_cleaning_drops_doctests_literal_blocks_and_markup():
    docstring = """Return the sum of :func:`len` calls over ``items``.

    For example::

        total = add(1, 2)
        print(total)

    >>> add(1, 2)
    3

    +-------+-------+
    | a = 1 | b = 2 |
    +-------+-------+
    See :meth:`~Adder.add` for the details. Short one.
    """
    # "For example:" and "Short one." are dropped as too short to be sentences.
    expected = ["Return the sum of len calls over items.", "See Adder.add for the details."]
    assert docstring_sentences(docstring) == expected


# ---- sentences ----


@pytest.mark.parametrize("text, sentences", [
    ("One sentence here. Another one follows! Is this a third? Yes.",
     ["One sentence here.", "Another one follows!", "Is this a third?", "Yes."]),
    ("Use a key, e.g. a string. Other types, i.e. numbers, work too etc. See Dr. Smith and Mr. Jones.",
     ["Use a key, e.g. a string.", "Other types, i.e. numbers, work too etc. See Dr. Smith and Mr. Jones."]),
    ('He said "Stop." Then he left. "Why?" she asked.', ['He said "Stop."', "Then he left.", '"Why?" she asked.']),
    ("Version 3.11 is out. 2024 was a year. Cats vs. dogs is old.",
     ["Version 3.11 is out.", "2024 was a year.", "Cats vs. dogs is old."]),
    ("No final stop\n\nNew paragraph\nwrapped over lines.", ["No final stop", "New paragraph wrapped over lines."]),
    ("lowercase after a stop. does not split. J. R. Smith wrote it.",
     ["lowercase after a stop. does not split.", "J. R. Smith wrote it."]),
    ("  \n\n ", []),
])
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


# ---- text files ----


def test_read_text_files_reads_folders_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("Second file. Two sentences.\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("First doc. It has two.\n\n\n\nSecond doc here.\nSame doc.\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("Nested file text.", encoding="utf-8")
    (tmp_path / "notes.md").write_text("Not read.", encoding="utf-8")
    assert read_text_files(tmp_path) == [["First doc.", "It has two."], ["Second doc here.", "Same doc."],
                                         ["Second file.", "Two sentences."], ["Nested file text."]]
    assert read_text_files([tmp_path / "b.txt", str(tmp_path / "sub")]) == [["Second file.", "Two sentences."],
                                                                          ["Nested file text."]]


def test_non_utf8_file_names_the_file_and_offset(tmp_path):
    (tmp_path / "latin.txt").write_bytes("Caf\u00e9 au lait.".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.txt: not UTF-8 text \(invalid byte at offset 3\)"):
        read_text_files(tmp_path)


def test_a_folder_is_read_for_its_text_files_and_says_which_data_files_it_leaves(tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "records.jsonl").write_text('{"text": "One doc."}\n')
    with pytest.raises(UserError, match=r"has none; name its data files themselves as sources \(e.g. --corpus "):
        read_text_files(tmp_path / "only")
    (tmp_path / "only" / "notes.txt").write_text("Some notes here.\n")
    with pytest.warns(UserWarning, match=r"reading its 1 .txt file\(s\) only; its 1 data file\(s\) \(records.jsonl\)"):
        assert read_text_files(tmp_path / "only") == [["Some notes here."]]


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_text_files(tmp_path / "missing.txt")


def test_empty_corpus_is_a_user_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(UserError, match="corpus '.*' is empty"):
        load_corpus(str(tmp_path))


def test_load_corpus_holds_out_the_last_five_percent_of_text_documents(tmp_path):
    text = "\n\n".join(f"Document {i} starts. It ends here." for i in range(40))
    (tmp_path / "docs.txt").write_text(text, encoding="utf-8")
    train, validation = load_corpus(str(tmp_path / "docs.txt")), load_corpus(str(tmp_path), split="validation")
    assert len(train) == 38 and validation == [[f"Document {i} starts.", "It ends here."] for i in (38, 39)]
    assert load_corpus("builtin", split="validation") == builtin_corpus("validation")


# ---- Hugging Face datasets ----

RECORDS = {"text": ["First article. It has two sentences.\n\nA second document.", "", "Another article here."],
           "id": [1, 2, 3]}
DOCUMENTS = [["First article.", "It has two sentences."], ["A second document."], ["Another article here."]]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (converted local files) inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_read_dataset_reads_local_parquet_jsonl_and_arrow(tmp_path):
    dataset = datasets.Dataset.from_dict(RECORDS)
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    dataset.to_json(str(tmp_path / "data.jsonl"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    for source in (tmp_path / "data.parquet", tmp_path / "data.jsonl", arrow_file, tmp_path / "saved"):
        assert list(read_dataset(str(source))) == DOCUMENTS, source
        # load_corpus holds out the last 5% of documents (rounded up) of a local file, as for text files.
        assert load_corpus(str(source)) == DOCUMENTS[:2], source
        assert load_corpus(str(source), split="validation") == DOCUMENTS[2:], source
    streamed = load_corpus(str(tmp_path / "data.parquet"), streaming=True)
    assert not isinstance(streamed, list) and list(streamed) == DOCUMENTS
    assert list(read_dataset(str(tmp_path / "data.parquet"), split="train[2:]")) == DOCUMENTS[2:]


def test_a_saved_dataset_dict_keeps_its_own_splits(tmp_path):
    splits = {"train": datasets.Dataset.from_dict(RECORDS),
              "validation": datasets.Dataset.from_dict({"text": ["Held out text. Two sentences."]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    assert load_corpus(str(tmp_path / "saved")) == DOCUMENTS
    assert load_corpus(str(tmp_path / "saved"), split="validation") == [["Held out text.", "Two sentences."]]
    with pytest.raises(UserError, match=r"^\S*saved: no split 'test'; the splits are train, validation$"):
        read_dataset(str(tmp_path / "saved"), split="test")


def test_read_dataset_groups_single_sentence_records(tmp_path):
    sentences = [f"Sentence number {i}." for i in range(7)]
    datasets.Dataset.from_dict({"sentence": sentences}).to_parquet(str(tmp_path / "books.parquet"))
    documents = list(read_dataset(str(tmp_path / "books.parquet"), text_field="sentence", group_size=3))
    assert documents == [sentences[0:3], sentences[3:6], sentences[6:]]


def test_missing_text_field_names_the_field_and_columns(tmp_path):
    datasets.Dataset.from_dict({"body": ["Some text."], "id": [1]}).to_parquet(str(tmp_path / "data.parquet"))
    with pytest.raises(UserError, match=r"no text field 'text'; the columns are body, id \(choose one with "
                                        r"--data.text_field NAME\)"):
        read_dataset(str(tmp_path / "data.parquet"))


def test_bad_local_sources_are_user_errors(tmp_path):
    datasets.Dataset.from_dict(RECORDS).to_parquet(str(tmp_path / "data.parquet"))
    with pytest.raises(UserError, match="data.parquet: .*validation"):
        read_dataset(str(tmp_path / "data.parquet"), split="validation")
    datasets.Dataset.from_dict(RECORDS).save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow")).rename(tmp_path / "data.arrow")
    with pytest.raises(UserError, match=r"^\S*data.arrow: an .arrow file holds one split"):
        read_dataset(str(arrow_file), split="validation")
    with pytest.raises(UserError, match="missing.parquet: no such file"):
        read_dataset(str(tmp_path / "missing.parquet"))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{broken\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken\.jsonl: cannot read it: .*JSON"):
        read_dataset(str(tmp_path / "broken.jsonl"))
    (tmp_path / "notes.md").write_text("Some notes.", encoding="utf-8")
    with pytest.raises(UserError, match=r"notes\.md: not a dataset"):
        read_dataset(str(tmp_path / "notes.md"))


def test_unreachable_hub_dataset_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets and huggingface_hub read the variables when imported, which has happened already.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as error:
        load_corpus("no-such-user/no-such-dataset", config_name="en")
    message = str(error.value)
    assert message.startswith("cannot load dataset 'no-such-user/no-such-dataset' from the Hugging Face hub")
    assert "\n" not in message
