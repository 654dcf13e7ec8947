"""`mobilebert pretrain` end to end on tiny settings: files written, loss falls, exact resume after SIGKILL,
and a 2-process torchrun run that takes the same steps as one process."""

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
from conftest import padded_batch, randomize
from safetensors.torch import load_file

import mobilebert as mb
from mobilebert.train.pretraining import pretraining_sums
from mobilebert.train.rundir import read_metrics

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu",
         "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "red", "green",
         "blue", "cyan", "magenta", "yellow", "black", "white"]


def write_corpus(folder: Path, documents: int = 60) -> Path:
    """Documents of sentences with a learnable pattern: each sentence counts up through the word list."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for d in range(documents):
        sentences = []
        for s in range(6):
            start = (d * 7 + s * 3) % len(WORDS)
            words = [WORDS[(start + k) % len(WORDS)] for k in range(5 + (d + s) % 4)]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    (folder / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    return folder


def write_config(path: Path, corpus: Path, steps: int, dropout: bool = True, **train) -> Path:
    # A tiny IB-BERT-shaped teacher: what `pretrain` is for (NoNorm students learn poorly from scratch).
    overrides = {"num_hidden_layers": 2, "hidden_size": 64, "intra_bottleneck_size": 64, "intermediate_size": 128,
                 "embedding_size": 32, "max_position_embeddings": 64}
    if not dropout:
        overrides.update(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    config = {
        "model": {"preset": "ib-bert-demo", "overrides": overrides},
        "data": {"corpus": str(corpus), "vocab_size": 120, "max_seq_length": 32, "eval_examples": 64,
                 "eval_batch_size": 32, "max_predictions_per_seq": 5},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "log_every": 1,
                  "checkpoint_every": 5, "keep_checkpoints": 3, "tensorboard": False, **train},
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def pretrain(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mobilebert", "pretrain", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if kwargs.pop("background", False):
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full_env)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_pretrain_writes_the_run_folder_and_learns(tmp_path, corpus):
    config = write_config(tmp_path / "c.yaml", corpus, steps=40, eval_every=20)
    result = pretrain("--config", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "final/config.json", "final/model.safetensors",
                 "final/vocab.txt", "final/tokenizer.json", "checkpoints/step-40/optimizer.pt"):
        assert (run / name).is_file(), name
    metrics = read_metrics(run / "metrics.jsonl")
    train = [m for m in metrics if "split" not in m]
    assert [m["step"] for m in train] == list(range(1, 41))
    assert all(k in train[0] for k in ("loss", "mlm", "nsp", "lr", "grad_norm", "tokens_per_s"))
    first, last = sum(m["loss"] for m in train[:5]) / 5, sum(m["loss"] for m in train[-5:]) / 5
    assert last < first - 0.3
    evals = [m for m in metrics if m.get("split") == "validation"]
    assert [m["step"] for m in evals] == [20, 40]
    assert evals[1]["mlm_loss"] < evals[0]["mlm_loss"]
    assert evals[-1]["mlm_accuracy"] >= evals[-1]["mlm_majority_accuracy"]
    # The finished run refuses to be clobbered, and says how to proceed.
    again = pretrain("--config", str(config), "--out", str(run))
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert "Traceback" not in again.stderr


def test_sigkill_then_resume_gives_identical_weights(tmp_path, corpus):
    config = write_config(tmp_path / "c.yaml", corpus, steps=60)
    reference = pretrain("--config", str(config), "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr

    victim = pretrain("--config", str(config), "--out", str(tmp_path / "cut"), background=True)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step-10").is_dir():
        assert victim.poll() is None and time.time() < deadline, "run ended before a checkpoint was seen"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "cut" / "final").exists(), "killed too late to test anything"
    os.utime(corpus / "corpus.txt")  # the corpus looks changed: a resumed run still trains on its first data
    resumed = pretrain("--config", str(config), "--out", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(list((tmp_path / "cut" / "cache").glob("prepared-*/manifest.json"))) == 1

    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_losses = [m["loss"] for m in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "split" not in m]
    cut_losses = [m["loss"] for m in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "split" not in m]
    assert cut_losses == ref_losses  # every step logged once, with the same value


def test_torchrun_two_processes_match_one(tmp_path, corpus):
    config = write_config(tmp_path / "c.yaml", corpus, steps=8, dropout=False, checkpoint_every=100)
    single = pretrain("--config", str(config), "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mobilebert", "pretrain", "--config", str(config), "--out", str(tmp_path / "two")]
    double = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr[-3000:]
    one = [m for m in read_metrics(tmp_path / "one" / "metrics.jsonl") if "split" not in m]
    two = [m for m in read_metrics(tmp_path / "two" / "metrics.jsonl") if "split" not in m]
    assert len(one) == len(two) == 8
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("override, message", [
    (["--train.precision", "fp16"], "fp16 is refused"),
    (["--data.max_seq_length", "100"], "max_seq_length 100 exceeds the model's max_position_embeddings"),
    (["--train.lrate", "1"], "unknown config key 'train.lrate'"),
    (["--data.tokenizer", "/nonexistent/tok"], "no tokenizer.json or vocab.txt"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, corpus, override, message):
    config = write_config(tmp_path / "c.yaml", corpus, steps=2)
    result = pretrain("--config", str(config), "--out", str(tmp_path / "run"), *override)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "final").exists()


def test_empty_and_non_utf8_corpora_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n")
    result = pretrain("--config", str(write_config(tmp_path / "c.yaml", empty, 2)), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "empty" in result.stderr and "Traceback" not in result.stderr
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "b.txt").write_bytes(b"caf\xe9 au lait\n")
    result = pretrain("--config", str(write_config(tmp_path / "c.yaml", binary, 2)), "--out", str(tmp_path / "s"))
    assert result.returncode == 2 and "b.txt" in result.stderr and "UTF-8" in result.stderr.upper()


def test_pretraining_sums_are_summed_cross_entropies_and_zero_without_masks(tiny_cfg):
    model = randomize(mb.MobileBertForPreTraining(tiny_cfg)).eval()
    batch = padded_batch()
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, 2], labels[1, 5], labels[2, 1] = 7, 8, 9
    batch.update(labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
    sums = pretraining_sums(model, batch)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    mlm = -sum(out.prediction_logits[r, t].log_softmax(-1)[v] for r, t, v in ((0, 2, 7), (1, 5, 8), (2, 1, 9)))
    nsp = -sum(out.seq_relationship_logits[r].log_softmax(-1)[y] for r, y in enumerate((0, 1, 1)))
    torch.testing.assert_close(sums["mlm"].detach(), mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["nsp"].detach(), nsp, rtol=1e-5, atol=1e-5)
    batch["labels"] = torch.full_like(labels, -100)  # a micro-batch with nothing masked adds nothing
    empty = pretraining_sums(model, batch)["mlm"]
    assert empty.item() == 0 and empty.requires_grad
