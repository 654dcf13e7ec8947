"""`mobilebert predict` and `Predictor`: each task family, from a checkpoint and from an ONNX export, gives what
`evaluate`'s model gives on the same text; inputs from arguments, TSV, JSON lines and standard input; bad input."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_finetune import SQUAD, tiny_pretrained, write_task_data

from mobilebert.cli import main as cli
from mobilebert.data.tasks import get_task
from mobilebert.finetuning import TaskSettings, load_model, load_split, predict, qa_answers, recorded_settings
from mobilebert.predict import Predictor
from mobilebert.tokenizer import Tokenizer

TASKS = {"cola": "glue", "rte": "glue", "stsb": "glue", "squad1": "squad"}
TIE = 1e-3  # top-two probabilities closer than this may swap under another runtime's rounding: no label asserted


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny checkpoint fine-tuned on CoLA (one text), RTE (pairs), STS-B (regression) and SQuAD, each exported to
    ONNX, and the RTE model to torch int8."""
    root = write_task_data(tmp_path_factory.mktemp("predict"))
    tiny_pretrained(root / "pretrained")
    for task, data in TASKS.items():
        lengths = ["--task.doc_stride", "8", "--task.max_query_length", "8"] if data == "squad" else []
        assert cli(["finetune", "--checkpoint", str(root / "pretrained"), "--task", task, "--task.data_dir",
                    str(root / data), "--task.max_seq_length", "32", *lengths, "--search.epochs", "[1]",
                    "--search.batch_size", "[2]", "--train.tensorboard", "false", "--out", str(root / task)]) == 0
    (root / "calibration.txt").write_text("The cat sat.\tA cat was sitting.\nWho jumps?\tThe fox jumps.\n")
    assert cli(["export", str(root / "rte" / "final"), "--format", "torch-int8", "--out", str(root / "rte-int8"),
                "--max-seq-length", "32", "--calibration-text", str(root / "calibration.txt")]) == 0
    for task in TASKS:
        assert cli(["export", str(root / task / "final"), "--format", "onnx", "--out", str(root / f"{task}-onnx"),
                    "--max-seq-length", "32", "--calibration-text", str(root / "calibration.txt")]) == 0
    return root


def reference(root: Path, task_name: str, model_dir: Path):
    """What `evaluate` computes: the task's train split through `finetuning.predict` at the recorded settings."""
    task = get_task(task_name)
    record = recorded_settings(str(model_dir))
    settings = TaskSettings(record["max_seq_length"], record["doc_stride"], record["max_query_length"])
    tokenizer = Tokenizer.from_pretrained(model_dir)
    data = load_split(task, "train", str(root / TASKS[task_name]), tokenizer, settings, training=False)
    logits = predict(load_model(task, str(model_dir)), data, tokenizer, settings)
    return task, settings, data, logits


@pytest.mark.parametrize("model", ["final", "onnx"])
@pytest.mark.parametrize("task_name", ["cola", "rte", "stsb"])
def test_text_tasks_match_evaluate_from_a_checkpoint_and_from_onnx(models, task_name, model):
    task, _, data, logits = reference(models, task_name, models / task_name / "final")
    predictor = Predictor.from_pretrained(models / task_name / model if model == "final" else
                                          models / f"{task_name}-onnx")
    fields = ("text", "text_pair")
    examples = [dict(zip(fields, ex.texts, strict=False)) for ex in data.texts]
    out = predictor(examples)
    if task.kind == "regression":
        np.testing.assert_allclose([o["score"] for o in out], logits, rtol=1e-4, atol=1e-5)
        return
    probs = torch.tensor(logits).softmax(-1).numpy()
    np.testing.assert_allclose([[o["scores"][label] for label in task.labels] for o in out], probs, rtol=1e-4)
    for o, p in zip(out, probs, strict=True):  # the label is the argmax wherever rounding cannot tie the top two
        if np.diff(np.sort(p))[-1] > TIE:
            assert o["label"] == task.labels[int(p.argmax())]


def test_qa_answers_match_evaluate_and_long_contexts_are_windowed(models):
    task, settings, data, logits = reference(models, "squad1", models / "squad1" / "final")
    assert len(data.features.input_ids) > len(data.squad)  # the 32-token windows cut the context: several each
    expected = qa_answers(data, logits, settings).predictions
    questions = [{"question": ex.question, "context": ex.context} for ex in data.squad]
    answers = Predictor.from_pretrained(models / "squad1" / "final")(questions)  # the same computation as evaluate
    assert [a["answer"] for a in answers] == [expected[ex.qid] for ex in data.squad]
    # ONNX: the same logits within rounding, and its answers are what SQuAD's post-processing makes of them.
    onnx = Predictor.from_pretrained(models / "squad1-onnx")
    onnx_logits = predict(onnx.model, data, onnx.tokenizer, onnx.settings)
    np.testing.assert_allclose(onnx_logits, logits, rtol=1e-4, atol=1e-4)
    expected = qa_answers(data, onnx_logits, settings).predictions
    assert [a["answer"] for a in onnx(questions)] == [expected[ex.qid] for ex in data.squad]


def test_an_onnx_export_predicts_what_its_checkpoint_does(models):
    examples = [{"text": "Dana Reeve died.", "text_pair": "Reeve died."}, {"text": "The cat sat.",
                                                                         "text_pair": "A dog ran away quickly."}]
    eager = Predictor.from_pretrained(models / "rte" / "final")(examples)
    onnx = Predictor.from_pretrained(models / "rte-onnx")(examples)
    for a, b in zip(onnx, eager, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-4)
        if abs(b["scores"]["entailment"] - b["scores"]["not_entailment"]) > TIE:
            assert a["label"] == b["label"]


@pytest.fixture
def run_predict(capsys, monkeypatch):
    """`mobilebert predict ARGS` in this process (standard input from `stdin`): returncode, stdout, stderr."""
    def run(*args: str, stdin: str | None = None) -> SimpleNamespace:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        code = cli(["predict", *args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def test_command_reads_arguments_tsv_json_lines_and_standard_input(models, tmp_path, run_predict):
    rte = str(models / "rte" / "final")
    single = run_predict(rte, "Dana Reeve died.", "Reeve died.")
    assert single.returncode == 0, single.stderr
    line = json.loads(single.stdout)
    assert line["input"] == {"text": "Dana Reeve died.", "text_pair": "Reeve died."}
    assert line["label"] in ("entailment", "not_entailment") and sum(line["scores"].values()) == pytest.approx(1)
    (tmp_path / "pairs.tsv").write_text("Dana Reeve died.\tReeve died.\n\nThe cat sat.\tA cat sat.\n")
    (tmp_path / "pairs.jsonl").write_text('{"sentence1": "Dana Reeve died.", "sentence2": "Reeve died."}\n'
                                          '{"text": "The cat sat.", "text_pair": "A cat sat."}\n')
    from_tsv = run_predict(rte, "--input", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "out.jsonl"))
    assert from_tsv.returncode == 0, from_tsv.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    from_json = run_predict(rte, "--input", str(tmp_path / "pairs.jsonl"))
    from_stdin = run_predict(rte, stdin=(tmp_path / "pairs.tsv").read_text())
    assert rows == [json.loads(x) for x in from_json.stdout.splitlines()] == [
        json.loads(x) for x in from_stdin.stdout.splitlines()]
    assert len(rows) == 2 and rows[0]["label"] == line["label"]
    qa = run_predict(str(models / "squad1" / "final"), "Who jumps?", SQUAD["data"][0]["paragraphs"][0]["context"])
    assert qa.returncode == 0 and isinstance(json.loads(qa.stdout)["answer"], str), qa.stderr


@pytest.mark.parametrize("args, stdin, message", [
    (["{rte}", "only one text"], None, "rte needs 2 text(s) per example (text, text_pair); got 1"),
    (["{rte}", "", "Reeve died."], None, "arguments: empty text"),
    (["{rte}"], "one column only\n", "standard input line 1: 1 tab-separated column(s); this task needs 2"),
    (["{rte}"], "a\t\n", "standard input line 1: empty text_pair"),
    (["{rte}"], '{"text": "a", "text_pair": \n', "standard input line 1: not valid JSON"),
    (["{rte}", "--input", "{missing}"], None, "no such input file"),
    (["{pretrained}", "a", "b"], None, "no finetuning.json"),
    (["{pretrained}", "--task", "rte", "a", "b"], None, "has no rte head"),
])
def test_bad_input_is_one_line(models, tmp_path, run_predict, args, stdin, message):
    names = {"rte": models / "rte" / "final", "pretrained": models / "pretrained", "missing": tmp_path / "nope.tsv"}
    result = run_predict(*[a.format(**names) for a in args], stdin=stdin)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_an_existing_out_file_is_kept_unless_asked_and_the_input_is_never_the_output(models, tmp_path, run_predict):
    rte, out, tsv = str(models / "rte" / "final"), tmp_path / "out.jsonl", tmp_path / "pairs.tsv"
    tsv.write_text("Dana Reeve died.\tReeve died.\n")
    out.write_text("earlier results\n")
    refused = run_predict(rte, "--input", str(tsv), "--out", str(out))
    assert refused.returncode == 2 and "exists; pass --overwrite" in refused.stderr
    assert out.read_text() == "earlier results\n"
    assert run_predict(rte, "--input", str(tsv), "--out", str(tsv), "--overwrite").returncode == 2
    assert tsv.read_text() == "Dana Reeve died.\tReeve died.\n"
    assert run_predict(rte, "--input", str(tsv), "--out", str(out), "--overwrite").returncode == 0
    assert json.loads(out.read_text())["input"]["text"] == "Dana Reeve died."


def test_a_torch_int8_export_runs_the_quantized_model(models):
    from mobilebert.deploy.quantize import quantize_torch_dynamic

    examples = [{"text": "Dana Reeve died.", "text_pair": "Reeve died."}]
    predictor = Predictor.from_pretrained(models / "rte-int8")
    batch = predictor.tokenizer.encode_pairs(["Dana Reeve died."], ["Reeve died."], max_length=32)
    quantized = quantize_torch_dynamic(load_model(get_task("rte"), str(models / "rte" / "final")).eval())
    with torch.no_grad():
        expected = quantized(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits.softmax(-1)
    scores = predictor(examples)[0]["scores"]
    assert [scores[label] for label in ("entailment", "not_entailment")] == pytest.approx(expected[0].tolist(),
                                                                                         rel=1e-5)


def test_qa_windows_run_at_the_length_of_the_longest_in_the_batch(models):
    """As `evaluate` does: a short question and context are not run at the full window length (an export of
    fixed, shorter length could not run them otherwise)."""
    predictor = Predictor.from_pretrained(models / "squad1" / "final")
    widths, model = [], predictor.model
    predictor.model = lambda ids, *rest: widths.append(ids.shape[1]) or model(ids, *rest)
    predictor.model.eval = model.eval
    answer = predictor([{"question": "Who?", "context": "Ann wrote it."}])[0]["answer"]
    assert widths and max(widths) < 32 and answer in "Ann wrote it."
