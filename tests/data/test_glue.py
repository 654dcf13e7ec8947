"""GLUE tasks: tiny files in the original download's layout (each quirk reproduced), the hub, submissions."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest

from mobilebert.data.glue import HUB_ID, TASKS, TextExample, load_task, task_spec, write_submission
from mobilebert.errors import UserError

MNLI_HEAD = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t" \
            "sentence2_parse\tsentence1\tsentence2"
STSB_HEAD = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
MRPC_COLUMNS = "#1 ID\t#2 ID\t#1 String\t#2 String"


def mnli_row(index: int, premise: str, hypothesis: str, *labels: str) -> str:
    parses = "( ( a ) )\t( b )\t(ROOT (S a))\t(ROOT (S b))"
    return "\t".join([str(index), "31193", f"{index}n", "government", parses, premise, hypothesis, *labels])


# Path under the download's root -> lines, in each file's real layout. Quotes are unbalanced on purpose.
FILES = {
    # CoLA: train and dev have no header (source, label, original annotation, sentence); test has one.
    "CoLA/train.tsv": ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tOne more \"pseudo and I quit."],
    "CoLA/dev.tsv": ["clc95\t1\t\tThe sailors rode the breeze clear of the rocks."],
    "CoLA/test.tsv": ["index\tsentence", "0\tBill whistled past the house.", "1\tHe said \"hi."],
    "SST-2/train.tsv": ["sentence\tlabel", "hide new secretions from the parental units \t0", "it 's a \" gem \t1"],
    "SST-2/dev.tsv": ["sentence\tlabel", "it 's a charming journey . \t1"],
    "SST-2/test.tsv": ["index\tsentence", "0\tuneasy mishmash of styles . "],
    # MRPC's header keeps the byte-order mark of Microsoft's source file.
    "MRPC/train.tsv": [f"\ufeffQuality\t{MRPC_COLUMNS}", "1\t702876\t702977\tAmrozi accused his brother .\t"
                       "Referring to him as \" the witness \" ."],
    "MRPC/dev.tsv": [f"\ufeffQuality\t{MRPC_COLUMNS}", "0\t1\t2\tYucaipa owned Dominick 's .\tIt sold it ."],
    "MRPC/test.tsv": [f"index\t{MRPC_COLUMNS}", "0\t1089874\t1089925\tPCCW 's chief .\tCurrent Chief ."],
    "STS-B/train.tsv": [f"{STSB_HEAD}\tscore", "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\t"
                        "A plane is taking off.\tAn air plane is taking off.\t5.000"],
    "STS-B/dev.tsv": [f"{STSB_HEAD}\tscore", "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\t"
                      "A man with a hard hat.\tA man wearing a \"hard hat.\t3.800"],
    "STS-B/test.tsv": [STSB_HEAD, "0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl sings.\tA girl sings."],
    # QQP's train file has rows with too few fields: skipped with one warning.
    "QQP/train.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "133273\t213221\t213222\tHow is "
                      "the life of a math student?\tWhich level of prepration is enough?\t0",
                      "201841\t303345\t303346\tHow can I \"truncated", "402555\t536040\t536041\tHow do I?",
                      "7\t15\t16\tWhat is 5\"?\tHow tall is 5\"?\t1"],
    "QQP/dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tWhy?\tWhy not?\t1"],
    "QQP/test.tsv": ["id\tquestion1\tquestion2", "0\tHow does the Surface Pro?\tWhy did Microsoft?"],
    # MNLI: train has one annotator label, dev five; the gold label is last; test has none.
    "MNLI/train.tsv": [f"{MNLI_HEAD}\tlabel1\tgold_label",
                       mnli_row(0, "Conceptually cream skimming.", "Product and geography.", "neutral", "neutral"),
                       mnli_row(1, "you know \"during the season", "You lose the things.", "entailment", "entailment")],
    "MNLI/dev_matched.tsv": [f"{MNLI_HEAD}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
                             mnli_row(0, "The new rights.", "Everyone hates.", *["contradiction"] * 6)],
    "MNLI/dev_mismatched.tsv": [f"{MNLI_HEAD}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
                                mnli_row(0, "Your gift.", "Hundreds of students.", *["neutral"] * 6)],
    "MNLI/test_matched.tsv": [MNLI_HEAD, mnli_row(0, "Hierbas, ans seco.", "Hierbas is a name.")],
    "MNLI/test_mismatched.tsv": [MNLI_HEAD, mnli_row(0, "What have you decided?", "Have you decided.")],
    "QNLI/train.tsv": ["index\tquestion\tsentence\tlabel", "0\tWhen?\tIn 1917.\tentailment"],
    "QNLI/dev.tsv": ["index\tquestion\tsentence\tlabel", "0\tWho?\tNobody \"said.\tnot_entailment"],
    "QNLI/test.tsv": ["index\tquestion\tsentence", "0\tWhat?\tThis."],
    "RTE/train.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tNo weapons.\tWeapons found.\tnot_entailment"],
    "RTE/dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tDana Reeve died.\tReeve died.\tentailment"],
    "RTE/test.tsv": ["index\tsentence1\tsentence2", "0\tMangla was.\tMangla is."],
    "WNLI/train.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tI stuck a pin.\tI stuck a hole.\t1"],
    "WNLI/dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tThe drain is clogged.\tThe hair is clogged.\t0"],
    "WNLI/test.tsv": ["index\tsentence1\tsentence2", "0\tMaude and Dora.\tHorses were."],
    "diagnostic/diagnostic.tsv": ["index\tsentence1\tsentence2", "0\tThe cat sat.\tThe cat did not sit.",
                                  "1\tA \"dog.\tA dog."],
}

# (task, split) -> the examples expected from FILES.
EXPECTED = {
    ("cola", "train"): [("train-0", ("Our friends won't buy this analysis.",), 1),
                        ("train-1", ("One more \"pseudo and I quit.",), 0)],
    ("cola", "validation"): [("validation-0", ("The sailors rode the breeze clear of the rocks.",), 1)],
    ("cola", "test"): [("test-0", ("Bill whistled past the house.",), None), ("test-1", ("He said \"hi.",), None)],
    ("sst2", "train"): [("train-0", ("hide new secretions from the parental units ",), 0),
                        ("train-1", ("it 's a \" gem ",), 1)],
    ("sst2", "validation"): [("validation-0", ("it 's a charming journey . ",), 1)],
    ("sst2", "test"): [("test-0", ("uneasy mishmash of styles . ",), None)],
    ("mrpc", "train"): [("train-0", ("Amrozi accused his brother .", "Referring to him as \" the witness \" ."), 1)],
    ("mrpc", "validation"): [("validation-0", ("Yucaipa owned Dominick 's .", "It sold it ."), 0)],
    ("mrpc", "test"): [("test-0", ("PCCW 's chief .", "Current Chief ."), None)],
    ("stsb", "train"): [("train-0", ("A plane is taking off.", "An air plane is taking off."), 5.0)],
    ("stsb", "validation"): [("validation-0", ("A man with a hard hat.", "A man wearing a \"hard hat."), 3.8)],
    ("stsb", "test"): [("test-0", ("A girl sings.", "A girl sings."), None)],
    ("qqp", "train"): [("train-133273", ("How is the life of a math student?", "Which level of prepration is enough?"),
                        0), ("train-7", ("What is 5\"?", "How tall is 5\"?"), 1)],
    ("qqp", "validation"): [("validation-0", ("Why?", "Why not?"), 1)],
    ("qqp", "test"): [("test-0", ("How does the Surface Pro?", "Why did Microsoft?"), None)],
    ("mnli", "train"): [("train-0", ("Conceptually cream skimming.", "Product and geography."), 1),
                        ("train-1", ("you know \"during the season", "You lose the things."), 0)],
    ("mnli", "validation_matched"): [("validation_matched-0", ("The new rights.", "Everyone hates."), 2)],
    ("mnli", "validation_mismatched"): [("validation_mismatched-0", ("Your gift.", "Hundreds of students."), 1)],
    ("mnli", "test_matched"): [("test_matched-0", ("Hierbas, ans seco.", "Hierbas is a name."), None)],
    ("mnli", "test_mismatched"): [("test_mismatched-0", ("What have you decided?", "Have you decided."), None)],
    ("qnli", "train"): [("train-0", ("When?", "In 1917."), 0)],
    ("qnli", "validation"): [("validation-0", ("Who?", "Nobody \"said."), 1)],
    ("qnli", "test"): [("test-0", ("What?", "This."), None)],
    ("rte", "train"): [("train-0", ("No weapons.", "Weapons found."), 1)],
    ("rte", "validation"): [("validation-0", ("Dana Reeve died.", "Reeve died."), 0)],
    ("rte", "test"): [("test-0", ("Mangla was.", "Mangla is."), None)],
    ("wnli", "train"): [("train-0", ("I stuck a pin.", "I stuck a hole."), 1)],
    ("wnli", "validation"): [("validation-0", ("The drain is clogged.", "The hair is clogged."), 0)],
    ("wnli", "test"): [("test-0", ("Maude and Dora.", "Horses were."), None)],
    ("ax", "test"): [("test-0", ("The cat sat.", "The cat did not sit."), None),
                     ("test-1", ("A \"dog.", "A dog."), None)],
}

SUBMISSIONS = {("cola", "test"): "CoLA.tsv", ("sst2", "test"): "SST-2.tsv", ("mrpc", "test"): "MRPC.tsv",
               ("stsb", "test"): "STS-B.tsv", ("qqp", "test"): "QQP.tsv", ("mnli", "test_matched"): "MNLI-m.tsv",
               ("mnli", "test_mismatched"): "MNLI-mm.tsv", ("qnli", "test"): "QNLI.tsv", ("rte", "test"): "RTE.tsv",
               ("wnli", "test"): "WNLI.tsv", ("ax", "test"): "AX.tsv"}
LEADERBOARD_SIZE = "ignore:.*the GLUE leaderboard expects"


def write_files(root: Path, files: dict[str, list[str]]) -> Path:
    for name, lines in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_files(tmp_path_factory.mktemp("glue"), FILES)


def as_tuples(examples: list[TextExample]) -> list[tuple]:
    return [(e.guid, e.texts, e.label) for e in examples]


# ---- task specs ----

def test_task_spec_accepts_case_and_dashes_and_lists_tasks_when_unknown():
    assert task_spec("SST-2") is TASKS["sst2"]
    assert task_spec("sts-b").name == "stsb" and task_spec("MNLI").name == "mnli" and task_spec("AX").name == "ax"
    with pytest.raises(UserError, match="unknown GLUE task 'squad': choose one of cola, sst2, mrpc, stsb, qqp, mnli, "
                                        "qnli, rte, wnli, ax"):
        task_spec("squad")


def test_every_split_of_every_task_is_covered_and_has_its_submission_name():
    assert {(name, split) for name, spec in TASKS.items() for split in spec.splits} == set(EXPECTED)
    assert {(n, s): spec.submission_names[s] for n, spec in TASKS.items() for s in spec.test_splits} == SUBMISSIONS
    assert TASKS["stsb"].is_regression and TASKS["stsb"].metrics[0] == "pearson"
    assert TASKS["ax"].labels == TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert TASKS["cola"].metrics[0] == "matthews" and TASKS["mrpc"].metrics == ("f1", "accuracy")


# ---- the original TSV files ----

@pytest.mark.parametrize("task, split", sorted(EXPECTED))
def test_every_split_of_every_task_reads_from_the_original_tsv_files(glue_dir, task, split):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # QQP's malformed rows: tested below
        examples = load_task(task, split, glue_dir)
    assert as_tuples(examples) == EXPECTED[task, split]


def test_the_task_folder_itself_is_accepted(glue_dir):
    assert as_tuples(load_task("MNLI", "test_mismatched", glue_dir / "MNLI")) == EXPECTED["mnli", "test_mismatched"]
    assert as_tuples(load_task("ax", "test", glue_dir / "diagnostic")) == EXPECTED["ax", "test"]


def test_malformed_qqp_rows_are_skipped_with_one_warning_giving_the_count(glue_dir):
    with pytest.warns(UserWarning) as record:
        load_task("qqp", "train", glue_dir)
    assert len(record) == 1
    assert "skipped 2 malformed row(s) with fewer than 6 fields (line 3, 4)" in str(record[0].message)
    assert str(glue_dir / "QQP" / "train.tsv") in str(record[0].message)


def test_windows_line_endings_are_read(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_bytes(b"index\tsentence1\tsentence2\tlabel\r\n0\tA.\tB.\tentailment\r\n")
    assert as_tuples(load_task("rte", "validation", tmp_path)) == [("validation-0", ("A.", "B."), 0)]


@pytest.mark.parametrize("task, split, message", [
    ("cola", "validation_matched", "cola has no split 'validation_matched': choose one of train, validation, test"),
    ("mnli", "validation", "mnli has no split 'validation': choose one of train, validation_matched, "
                           "validation_mismatched, test_matched, test_mismatched"),
    ("ax", "train", "ax has no split 'train': choose one of test"),
])
def test_an_unknown_split_names_the_splits(glue_dir, task, split, message):
    with pytest.raises(UserError, match=message):
        load_task(task, split, glue_dir)


def test_a_missing_file_or_folder_is_named(tmp_path):
    expected = f"no rte train file: neither {tmp_path / 'RTE' / 'train.tsv'} nor {tmp_path / 'train.tsv'} exists"
    with pytest.raises(UserError, match=re.escape(expected)):
        load_task("rte", "train", tmp_path)
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'nowhere'}: no such folder")):
        load_task("rte", "train", tmp_path / "nowhere")


@pytest.mark.parametrize("task, file, lines, message", [
    ("mnli", "MNLI/train.tsv", [MNLI_HEAD.removesuffix("sentence2") + "hypothesis\tgold_label"],
     r"MNLI/train.tsv: no column 'sentence2'; the header has index, promptID"),
    ("mnli", "MNLI/train.tsv", [MNLI_HEAD], r"MNLI/train.tsv: no column 'gold_label'"),
    ("mrpc", "MRPC/train.tsv", ["Quality\t#1 ID\t#2 ID\t#1 String\t#3 String"], "no column '#2 String'"),
    ("mnli", "MNLI/train.tsv", [f"{MNLI_HEAD}\tlabel1\tgold_label", mnli_row(0, "a", "b", "-", "-")],
     r"MNLI/train.tsv, line 2: label '-' is not one of mnli's labels entailment, neutral, contradiction"),
    ("cola", "CoLA/train.tsv", ["source\tlabel\tannotation\tsentence"],  # a header where none is expected
     r"CoLA/train.tsv, line 1: label 'label' is not one of cola's labels 0, 1"),
    ("rte", "RTE/train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb\t1"],
     r"RTE/train.tsv, line 3: label '1' is not one of rte's labels entailment, not_entailment"),
    ("stsb", "STS-B/train.tsv", [f"{STSB_HEAD}\tscore", "0\tg\tf\ty\to\ts\ts\ta\tb\thigh"],
     r"STS-B/train.tsv, line 2: score 'high' is not a number"),
    ("sst2", "SST-2/train.tsv", [], r"SST-2/train.tsv: empty file"),
    ("sst2", "SST-2/train.tsv", ["sentence\tlabel"], r"SST-2/train.tsv: only a header, no rows"),
    ("cola", "CoLA/train.tsv", ["gj04\t1\tOur friends won't buy this."] * 3,  # 3 columns of 4
     r"CoLA/train.tsv: all 3 rows have fewer than the 4 fields of cola's train file .*is it the CoLA file"),
    ("cola", "train.tsv", ["sentence\tlabel", "a fine film\t1", "dull\t0"],  # pointed at the SST-2 folder
     r"train.tsv: all 3 rows have fewer than the 4 fields"),
])
def test_bad_files_raise_one_line_naming_the_file_and_column_or_label(tmp_path, task, file, lines, message):
    write_files(tmp_path, {file: lines})
    with pytest.raises(UserError, match=message):
        load_task(task, "train", tmp_path)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "WNLI").mkdir()
    (tmp_path / "WNLI" / "train.tsv").write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\t\xff\tb\t1\n")
    with pytest.raises(UserError, match=r"WNLI/train.tsv: not UTF-8 text"):
        load_task("wnli", "train", tmp_path)


# ---- the hub ----

@pytest.fixture
def fake_hub(monkeypatch):
    """`datasets.load_dataset` answering from in-memory tables; records the calls."""
    tables, calls = {}, []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(tables[name, split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def test_hub_splits_convert_labels_and_unlabeled_test_rows(fake_hub):
    tables, calls = fake_hub
    tables["mnli", "validation_mismatched"] = dict(premise=["p0", "p1"], hypothesis=["h0", "h1"], label=[2, 0],
                                                   idx=[0, 1])
    tables["mnli", "test_matched"] = dict(premise=["p"], hypothesis=["h"], label=[-1], idx=[7])
    tables["stsb", "train"] = dict(sentence1=["a", "b"], sentence2=["c", "d"], label=[4.25, 0.0], idx=[0, 1])
    tables["stsb", "test"] = dict(sentence1=["a"], sentence2=["c"], label=[-1.0], idx=[0])
    tables["sst2", "train"] = dict(sentence=["good ", "bad "], label=[1, 0], idx=[0, 1])

    assert as_tuples(load_task("MNLI", "validation_mismatched")) == [
        ("validation_mismatched-0", ("p0", "h0"), 2), ("validation_mismatched-1", ("p1", "h1"), 0)]
    assert as_tuples(load_task("mnli", "test_matched")) == [("test_matched-7", ("p", "h"), None)]
    stsb = load_task("STS-B", "train")
    assert as_tuples(stsb) == [("train-0", ("a", "c"), 4.25), ("train-1", ("b", "d"), 0.0)]
    assert all(isinstance(e.label, float) for e in stsb)
    assert load_task("stsb", "test")[0].label is None
    assert as_tuples(load_task("sst2", "train")) == [("train-0", ("good ",), 1), ("train-1", ("bad ",), 0)]
    assert calls[0] == (HUB_ID, "mnli", "validation_mismatched") and calls[2] == (HUB_ID, "stsb", "train")


def test_hub_problems_are_user_errors(fake_hub, monkeypatch):
    tables, _ = fake_hub
    tables["rte", "train"] = dict(sentence1=["a"], label=[0], idx=[0])
    with pytest.raises(UserError, match="nyu-mll/glue rte train: no column 'sentence2'; the columns are sentence1"):
        load_task("rte", "train")
    tables["cola", "train"] = dict(sentence=["a"], label=[2], idx=[0])
    with pytest.raises(UserError, match="label 2 is not an index into 0, 1"):
        load_task("cola", "train")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"cannot load nyu-mll/glue qnli test from the Hugging Face hub \(no network\? "
                                        r"pass data_dir.*\): Couldn't reach 'nyu-mll/glue' on the Hub") as error:
        load_task("qnli", "test")
    assert "\n" not in str(error.value)


# ---- leaderboard submissions ----

@pytest.mark.filterwarnings(LEADERBOARD_SIZE)
@pytest.mark.parametrize("task, split", sorted(SUBMISSIONS))
def test_every_test_split_writes_its_leaderboard_file(tmp_path, task, split):
    spec = TASKS[task]
    predictions = [4.2, 0.5, 3.0] if spec.is_regression else list(range(len(spec.labels))) * 2
    path = write_submission(task, split, predictions, tmp_path / "out")
    assert path == tmp_path / "out" / SUBMISSIONS[task, split]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "index\tprediction"
    expected = [f"{p:.3f}" for p in predictions] if spec.is_regression else [spec.labels[p] for p in predictions]
    assert lines[1:] == [f"{i}\t{value}" for i, value in enumerate(expected)]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind


@pytest.mark.filterwarnings(LEADERBOARD_SIZE)
def test_submission_label_strings_and_clipped_scores(tmp_path):
    rows = write_submission("MNLI", "test_mismatched", np.array([2, 0, 1]), tmp_path).read_text().splitlines()
    assert rows[1:] == ["0\tcontradiction", "1\tentailment", "2\tneutral"]
    assert write_submission("ax", "test", [1], tmp_path).read_text().splitlines()[1:] == ["0\tneutral"]
    assert write_submission("qnli", "test", [1], tmp_path).read_text().splitlines()[1:] == ["0\tnot_entailment"]
    assert write_submission("cola", "test", [np.int64(1)], tmp_path).read_text().splitlines()[1:] == ["0\t1"]
    scores = write_submission("sts-b", "test", np.array([-0.3, 5.7, 2.34567]), tmp_path).read_text().splitlines()
    assert scores[1:] == ["0\t0.000", "1\t5.000", "2\t2.346"]
    write_submission("rte", "test", [0, 1], tmp_path)
    assert write_submission("rte", "test", [1], tmp_path).read_text().splitlines() == ["index\tprediction",
                                                                                      "0\tnot_entailment"]


def test_a_submission_of_the_wrong_length_warns_but_is_written(tmp_path):
    with pytest.warns(UserWarning, match="WNLI.tsv: 2 predictions, but the GLUE leaderboard expects 146"):
        path = write_submission("wnli", "test", [0, 1], tmp_path)
    assert path.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_submission("wnli", "test", [0] * 146, tmp_path)


@pytest.mark.filterwarnings(LEADERBOARD_SIZE)
@pytest.mark.parametrize("task, split, predictions, message", [
    ("mnli", "test", [0], "submissions are for test splits: mnli has test_matched, test_mismatched, not 'test'"),
    ("sst2", "validation", [0], "submissions are for test splits: sst2 has test, not 'validation'"),
    ("mnli", "test_matched", [0, 3], "mnli: prediction 1 is 3, not an index into entailment, neutral, contradiction"),
    ("rte", "test", [0, -1], "rte: prediction 1 is -1, not an index"),
    ("cola", "test", [0.7], "cola: prediction 0 is 0.7, not a label index"),
    ("stsb", "test", [1.0, float("nan")], "stsb: prediction 1 is NaN"),
])
def test_bad_submissions_raise_user_errors(tmp_path, task, split, predictions, message):
    with pytest.raises(UserError, match=message):
        write_submission(task, split, predictions, tmp_path)
    assert not any(tmp_path.iterdir())
