"""`mobilebert distill` end to end on a tiny teacher: per-phase losses fall, copied weights stay the teacher's
through layer-wise transfer, a mid-phase resume is exact, and mismatched pairs are refused clearly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pretrain import write_corpus

import mobilebert as mb
from mobilebert.data.corpus import load_corpus
from mobilebert.data.prepare import PrepareSettings, prepare
from mobilebert.tokenizer import Tokenizer
from mobilebert.train.rundir import read_metrics

LAYERS = 3


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random tiny IB-BERT with a tokenizer trained on the corpus: enough for the mechanics of transfer."""
    root = tmp_path_factory.mktemp("distill")
    corpus = write_corpus(root / "corpus")
    tokenizer = Tokenizer.train(load_corpus(str(corpus)), vocab_size=120)
    cfg = mb.preset("ib-bert-demo", num_hidden_layers=LAYERS, hidden_size=32, intra_bottleneck_size=64,
                    intermediate_size=64, embedding_size=16, num_attention_heads=2, max_position_embeddings=64,
                    vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    mb.MobileBertForPreTraining(cfg).save_pretrained(root / "teacher", tokenizer)
    # The teacher's training data, recorded in its folder as `pretrain` records it: distill reuses it.
    prepare(PrepareSettings((str(corpus),), max_seq_length=32), root / "prepared", str(root / "teacher"), workers=1,
            show_progress=False)
    (root / "teacher" / "prepared_data.json").write_text(json.dumps({"folder": str(root / "prepared")}))
    return root


def distill_command(root: Path, out: str, strategy: str, *extra: str) -> list[str]:
    config = {
        "distill": {"student": "mobilebert-test", "strategy": strategy, "layerwise_steps": 30, "pd_steps": 6,
                    "pd_warmup_steps": 2,
                    "student_overrides": {"num_hidden_layers": LAYERS, "hidden_size": 32, "embedding_size": 16,
                                          "max_position_embeddings": 64, "num_attention_heads": 2}},
        "data": {"corpus": str(root / "corpus"), "max_seq_length": 32, "eval_examples": 32, "eval_batch_size": 16,
                 "max_predictions_per_seq": 5},
        "train": {"batch_size": 8, "lr": 3e-3, "optimizer": "adamw", "log_every": 1, "checkpoint_every": 5,
                  "keep_checkpoints": 20, "tensorboard": False},
    }
    (root / f"{out}.yaml").write_text(json.dumps(config))
    return [sys.executable, "-m", "mobilebert", "distill", "--config", str(root / f"{out}.yaml"),
            "--teacher", str(root / "teacher"), "--out", str(root / out), *extra]


def distill(root: Path, out: str, strategy: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(distill_command(root, out, strategy, *extra), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_pkt_transfers_layer_by_layer_and_resumes_mid_phase(teacher):
    result = distill(teacher, "pkt", "pkt")
    assert result.returncode == 0, result.stderr
    assert f"using the teacher's prepared data: {teacher / 'prepared'}" in result.stdout
    assert not (teacher / "pkt" / "cache").exists()  # nothing prepared
    rows = [m for m in read_metrics(teacher / "pkt" / "metrics.jsonl") if "split" not in m]
    assert [m["step"] for m in rows] == list(range(1, 37))
    for layer in range(LAYERS):
        phase = rows[layer * 10:(layer + 1) * 10]
        assert all(set(m) >= {f"fmt/{layer}", f"at/{layer}"} for m in phase)
        assert not any(f"fmt/{other}" in m for m in phase for other in range(LAYERS) if other != layer)
        assert sum(m[f"fmt/{layer}"] for m in phase[-3:]) / 3 < phase[0][f"fmt/{layer}"]  # falls in every phase
    assert all({"mlm", "kd", "nsp"} <= set(m) for m in rows[30:])

    # Through layer-wise transfer (step 30 = end of stage 1) the copied weights are still the teacher's.
    end_of_stage1 = load_file(teacher / "pkt" / "checkpoints" / "step-30" / "model.safetensors")
    original = load_file(teacher / "teacher" / "model.safetensors")
    for name in ("mobilebert.embeddings.word_embeddings.weight", "cls.predictions.dense.weight",
                 "mobilebert.embeddings.embedding_transformation.weight", "cls.seq_relationship.weight"):
        assert torch.equal(end_of_stage1[name], original[name]), name
    # The student's own embedding norm (NoNorm, not copied) stays at its initial identity through stage 1 ...
    norm = "mobilebert.embeddings.LayerNorm"
    assert torch.equal(end_of_stage1[f"{norm}.weight"], torch.ones_like(end_of_stage1[f"{norm}.weight"]))
    assert torch.equal(end_of_stage1[f"{norm}.bias"], torch.zeros_like(end_of_stage1[f"{norm}.bias"]))
    # ... and trains from PD on, which starts from empty optimizer state: 5 steps into PD, every moment has 5 steps.
    in_pd = teacher / "pkt" / "checkpoints" / "step-35"
    assert not torch.equal(load_file(in_pd / "model.safetensors")[f"{norm}.weight"], end_of_stage1[f"{norm}.weight"])
    state = torch.load(in_pd / "optimizer.pt", weights_only=True)["state"]
    assert state and {int(s["step"]) for s in state.values()} == {5}
    # Without the reset, the layers trained in stage 1 carry their step counts (and moments) into PD.
    carried = distill(teacher, "pkt-carry", "pkt", "--distill.reset_optimizer", "false")
    assert carried.returncode == 0, carried.stderr
    state = torch.load(teacher / "pkt-carry" / "checkpoints" / "step-35" / "optimizer.pt", weights_only=True)
    assert max(int(s["step"]) for s in state["state"].values()) > 5


def test_student_trains_without_dropout_unless_asked(tmp_path):
    """The official student has no dropout during transfer: the engine runs it in eval mode (no other difference)."""
    from mobilebert.train.loop import Distributed, Engine, TrainOptions
    from mobilebert.train.rundir import RunDir

    model = mb.MobileBertForPreTraining(mb.preset("mobilebert-test", attention_probs_dropout_prob=0.5))
    batch = {"input_ids": torch.randint(5, 99, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    for dropout in (False, True):
        run = RunDir(tmp_path / str(dropout))
        run.prepare(resume=False, overwrite=False)
        engine = Engine(model, TrainOptions(steps=2, tensorboard=False), run, Distributed(), dropout=dropout)
        seen = []

        def loss(m, b, seen=seen):
            seen.append(m.training)
            runs = [m(b["input_ids"], b["attention_mask"], output_hidden_states=True).hidden_states[-1]
                    for _ in range(2)]
            seen.append(torch.equal(runs[0], runs[1]))  # deterministic without dropout
            return {"x": runs[0].pow(2).sum()}

        engine.step([batch], lambda b: {"x": 1}, loss)
        assert seen == [dropout, not dropout]


def test_recipe_pd_loss_is_the_tested_pretraining_distillation():
    """The loss that trains the student in PD is `pretraining_distillation` on the same batch, term for term."""
    from mobilebert.distill.losses import pretraining_distillation
    from mobilebert.distill.strategies import plan
    from mobilebert.recipes.distill import Transfer, TransferOptions

    torch.manual_seed(0)
    teacher = mb.MobileBertForPreTraining(mb.preset("ib-bert-demo", num_hidden_layers=2, vocab_size=99)).eval()
    student = mb.MobileBertForPreTraining(mb.preset("mobilebert-demo", num_hidden_layers=2, vocab_size=99)).eval()
    ids = torch.randint(5, 99, (3, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[1, 7], labels[2, 1] = 7, 8, 9, 10
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": labels, "next_sentence_label": torch.tensor([0, 1, 1])}
    transfer = Transfer(teacher, TransferOptions(alpha=0.3, temperature=2.0), [0, 1])
    stage = plan("pkt", 2, 2, 1)[-1]
    counts, sums = transfer.counts(stage, batch), transfer.sums(stage, student, batch)
    recipe = sum(sums[k] / counts[k] for k in sums)
    s, t = (m(ids, batch["attention_mask"], batch["token_type_ids"]) for m in (student, teacher))
    reference = pretraining_distillation(s.prediction_logits, t.prediction_logits, labels, s.seq_relationship_logits,
                                         batch["next_sentence_label"], alpha=0.3, temperature=2.0)
    assert torch.allclose(recipe, reference.total, rtol=1e-5)



def kill_after_checkpoint(cmd: list[str], run: Path, step: int) -> None:
    """Start `cmd`, SIGKILL it as soon as checkpoint `step` is complete (its folder renamed into place)."""
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (run / "checkpoints" / f"step-{step}").is_dir():
        assert victim.poll() is None and time.time() < deadline, f"ended before checkpoint {step} was seen"
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (run / "final").exists(), "killed too late to test anything"


def test_sigkill_in_each_stage_then_resume_is_exact(teacher):
    """Killed mid-phase in layer-wise transfer, resumed, killed again in pre-training distillation, resumed: the
    same weights and the same logged losses as a run never stopped."""
    longer_pd = ("--distill.pd_steps", "16")
    reference = distill(teacher, "pkt-ref", "pkt", *longer_pd)
    assert reference.returncode == 0, reference.stderr
    cmd = distill_command(teacher, "pkt-cut", "pkt", *longer_pd)
    cut = teacher / "pkt-cut"
    kill_after_checkpoint(cmd, cut, 15)  # phase 2 of 3, stage 1
    kill_after_checkpoint([*cmd, "--resume"], cut, 35)  # stage 2 (pre-training distillation: steps 31-46)
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(teacher / "pkt-ref" / "final" / "model.safetensors")
    b = load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[m["loss"] for m in read_metrics(run / "metrics.jsonl") if "split" not in m]
              for run in (teacher / "pkt-ref", cut)]
    assert len(losses[0]) == 46 and losses[1] == losses[0]


@pytest.mark.parametrize("strategy", ["jkt", "akt"])
def test_joint_and_auxiliary_strategies_run(teacher, strategy):
    result = distill(teacher, strategy, strategy)
    assert result.returncode == 0, result.stderr
    rows = [m for m in read_metrics(teacher / strategy / "metrics.jsonl") if "split" not in m]
    assert len(rows) == 36
    first = rows[0]
    assert {f"fmt/{l}" for l in range(LAYERS)} <= set(first)
    assert ({"mlm", "kd"} <= set(first)) == (strategy == "akt")
    student = mb.MobileBertForPreTraining.from_pretrained(teacher / strategy / "final")
    assert student.config.normalization_type == "no_norm" and (teacher / strategy / "final" / "vocab.txt").is_file()


def test_mismatched_teacher_and_student_are_refused(teacher):
    result = distill(teacher, "bad", "pkt", "--student_overrides", "{hidden_size: 64, num_hidden_layers: 3}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "block width (hidden_size) teacher 32 vs student 64" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "mobilebert", "distill", "--out", str(teacher / "x")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no teacher: pass --teacher DIR" in missing.stderr
