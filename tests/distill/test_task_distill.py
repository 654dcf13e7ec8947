"""Task-specific distillation (`finetune --teacher`): the KD term by hand, β = 1 is plain fine-tuning, the cached
and per-step teachers agree, resume is exact, and a teacher that cannot teach is refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_finetune import FILES, kill_at_checkpoint, read_jsonl, run_cli, tiny_pretrained, write_task_data

from mobilebert.cli import main as cli
from mobilebert.config import preset
from mobilebert.distill.losses import task_distillation
from mobilebert.heads import MobileBertForPreTraining
from mobilebert.tokenizer import Tokenizer

FAST = ["--train.log_every", "1", "--task.max_seq_length", "32", "--search.epochs", "[2]", "--search.batch_size",
        "[2]", "--train.tensorboard", "false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny pre-trained student, and teachers fine-tuned from it on RTE and on SQuAD (same vocabulary)."""
    root = write_task_data(tmp_path_factory.mktemp("task-kd"))
    tiny_pretrained(root / "student")
    assert cli(["finetune", "--checkpoint", str(root / "student"), "--task", "rte", "--task.data_dir",
                str(root / "glue"), *FAST, "--out", str(root / "teacher-rte")]) == 0
    assert cli(["finetune", "--checkpoint", str(root / "student"), "--task", "squad1", "--task.data_dir",
                str(root / "squad"), "--task.max_seq_length", "32", "--task.doc_stride", "8",
                "--task.max_query_length", "8", "--search.epochs", "[2]", "--search.batch_size", "[2]",
                "--train.tensorboard", "false", "--out", str(root / "teacher-squad")]) == 0
    return root


def rte(root: Path, out: Path, *extra: str) -> int:
    return cli(["finetune", "--checkpoint", str(root / "student"), "--task", "rte", "--task.data_dir",
                str(root / "glue"), *FAST, "--out", str(out), *extra])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


# ---- the KD term ----

def test_classification_kd_is_the_soft_cross_entropy_summed_over_rows():
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p_T = (1/4, 3/4) and (1/2, 1/2)
    student = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # log p_S = (-ln 2, -ln 2) and (-ln 4, -ln 4/3)
    expected = math.log(2) + (math.log(4) + math.log(4 / 3)) / 2
    assert task_distillation(student, teacher, "classification").item() == pytest.approx(expected, rel=1e-6)
    # T = 2 divides both logits by 2 and multiplies the term by 4.
    halved = task_distillation(student / 2, teacher / 2, "classification").item() * 4
    assert task_distillation(student, teacher, "classification", temperature=2.0).item() == pytest.approx(halved)


def test_regression_kd_is_the_squared_error_to_the_teacher():
    value = task_distillation(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 4.0]), "regression")
    assert value.item() == pytest.approx(0.25 + 4.0)


def test_qa_kd_averages_start_and_end_and_ignores_padding():
    mask = torch.tensor([[1, 1, 0]])
    teacher = torch.tensor([[[0.0, math.log(3.0), 7.0], [0.0, 0.0, -3.0]]])  # (1, 2, 3): the last position pads
    student = torch.zeros(1, 2, 3)
    start, end = (0.25 + 0.75) * math.log(2), math.log(2)  # uniform student over the two real positions
    assert task_distillation(student, teacher, "qa", mask).item() == pytest.approx((start + end) / 2, rel=1e-6)
    student[..., 2] = 50.0  # a padding position: no say
    assert task_distillation(student, teacher, "qa", mask).item() == pytest.approx((start + end) / 2, rel=1e-6)
    unpadded = task_distillation(student[..., :2], teacher[..., :2], "qa", temperature=1000.0)
    padded = task_distillation(student, teacher, "qa", mask, temperature=1000.0)  # padding stays out at any T
    assert padded.item() == pytest.approx(unpadded.item(), rel=1e-6)


# ---- fine-tuning with a teacher ----

def test_beta_one_is_plain_finetuning_bit_for_bit(setup, tmp_path):
    assert rte(setup, tmp_path / "plain") == 0
    assert rte(setup, tmp_path / "kd", "--teacher", str(setup / "teacher-rte" / "final"), "--distill.beta", "1") == 0
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "kd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = read_jsonl(next((tmp_path / "kd").glob("trials/*/metrics.jsonl")))
    assert all(m["kd"] == 0 for m in logged if "kd" in m)


def test_kd_changes_training_and_the_cached_teacher_matches_the_per_step_one(setup, tmp_path):
    teacher = ["--teacher", str(setup / "teacher-rte" / "final"), "--distill.beta", "0.5"]
    assert rte(setup, tmp_path / "plain") == 0
    assert rte(setup, tmp_path / "cached", *teacher) == 0
    assert rte(setup, tmp_path / "every-step", *teacher, "--distill.cache", "false") == 0
    cached = np.load(tmp_path / "cached" / "teacher-outputs.npy")
    assert cached.shape == (len(FILES["RTE/train.tsv"]) - 1, 2) and not (tmp_path / "every-step" /
                                                                         "teacher-outputs.npy").exists()
    a, b = (read_jsonl(next((tmp_path / r).glob("trials/*/metrics.jsonl"))) for r in ("cached", "every-step"))
    kd_a, kd_b = ([m["kd"] for m in log if "kd" in m] for log in (a, b))
    assert kd_a[0] > 0 and kd_a == pytest.approx(kd_b, rel=1e-4)  # the same teacher outputs, up to batch padding
    plain, cached_weights = weights(tmp_path / "plain"), weights(tmp_path / "cached")
    assert not all(torch.equal(plain[k], cached_weights[k]) for k in plain)


def test_layer_terms_and_qa_distillation_train(setup, tmp_path):
    assert rte(setup, tmp_path / "layers", "--teacher", str(setup / "teacher-rte" / "final"),
               "--distill.layer_weight", "1") == 0
    logged = [m for m in read_jsonl(next((tmp_path / "layers").glob("trials/*/metrics.jsonl"))) if "layers" in m]
    assert logged and all(m["layers"] > 0 and m["kd"] > 0 for m in logged)
    assert not (tmp_path / "layers" / "teacher-outputs.npy").exists()  # hidden states cannot be cached
    out = tmp_path / "qa"
    assert cli(["finetune", "--checkpoint", str(setup / "student"), "--teacher", str(setup / "teacher-squad" / "final"),
                "--task", "squad1", "--task.data_dir", str(setup / "squad"), "--task.max_seq_length", "32",
                "--task.doc_stride", "8", "--task.max_query_length", "8", "--search.epochs", "[1]",
                "--search.batch_size", "[4]", "--train.log_every", "1", "--out", str(out)]) == 0
    assert np.load(out / "teacher-outputs.npy").shape[1:] == (2, 32)
    assert set(json.loads((out / "predictions.json").read_text())) == {"q1", "q2"}


def test_sigkill_then_resume_with_a_teacher_is_exact(setup, tmp_path):
    args = ["finetune", "--checkpoint", str(setup / "student"), "--teacher", str(setup / "teacher-rte" / "final"),
            "--task", "rte", "--task.data_dir", str(setup / "glue"), "--task.max_seq_length", "32",
            "--search.epochs", "[12]", "--search.batch_size", "[1]", "--train.tensorboard", "false",
            "--train.checkpoint_every", "2"]
    # Every run in a one-thread process, as the killed one: a thread count changes float reductions on some CPUs.
    assert run_cli(*args, "--out", str(tmp_path / "ref"), cwd=tmp_path).returncode == 0
    cut = tmp_path / "cut"
    kill_at_checkpoint(args, cut, "trials/*/checkpoints/step-6")
    resumed = run_cli(*args, "--out", str(cut), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(tmp_path / "ref"), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_that_cannot_teach_is_refused_in_one_line(setup, tmp_path, capsys):
    other = Tokenizer.train([["completely different words here"]], vocab_size=60, min_frequency=1)
    MobileBertForPreTraining(preset("mobilebert-test", vocab_size=other.vocab_size)).save_pretrained(
        tmp_path / "other-vocab", other)
    foreign = tmp_path / "foreign"
    shutil.copytree(setup / "teacher-rte" / "final", foreign)
    Tokenizer.from_pretrained(tmp_path / "other-vocab").save_pretrained(foreign)
    cases = [(setup / "teacher-squad" / "final", "was fine-tuned on squad1, not rte"),
             (setup / "student", "has no rte head"),
             (foreign, "different vocabularies"),
             (tmp_path / "missing", "missing")]
    for teacher, message in cases:
        assert rte(setup, tmp_path / "run", "--teacher", str(teacher)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
    assert rte(setup, tmp_path / "run", "--teacher", str(setup / "teacher-rte" / "final"),
               "--distill.beta", "1.5") == 2
    assert "distill.beta must be in [0, 1]" in capsys.readouterr().err
    # Layer terms between models of different depths: refused before the run folder exists.
    tokenizer = Tokenizer.from_pretrained(setup / "student")
    MobileBertForPreTraining(preset("mobilebert-test", vocab_size=tokenizer.vocab_size, num_hidden_layers=1)
                             ).save_pretrained(tmp_path / "shallow", tokenizer)
    assert cli(["finetune", "--checkpoint", str(tmp_path / "shallow"), "--teacher",
                str(setup / "teacher-rte" / "final"), "--distill.layer_weight", "1", "--task", "rte",
                "--task.data_dir", str(setup / "glue"), *FAST, "--out", str(tmp_path / "run")]) == 2
    assert "set distill.layer_map" in capsys.readouterr().err and not (tmp_path / "run").exists()
