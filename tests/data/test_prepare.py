"""`mobilebert prepare` and training on prepared folders: same bytes with any worker count, exact resume after
SIGKILL, ids equal to sentence-by-sentence encoding, memory-mapped reading, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_pretrain import pretrain, write_config, write_corpus

from mobilebert.data.corpus import split_sentences
from mobilebert.data.prepare import PrepareSettings, prepare
from mobilebert.data.prepared import open_prepared
from mobilebert.data.shard_work import encode_documents
from mobilebert.errors import UserError
from mobilebert.tokenizer import Tokenizer


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mobilebert", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "MOBILEBERT_PROGRESS": "0"})


def digest(folder: Path) -> str:
    """sha256 over every shard file, in name order: the prepared bytes."""
    h = hashlib.sha256()
    for path in sorted((folder / "shards").rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text files (one in a sub-folder), ~40 KB, so that small shards cut them many times."""
    folder = write_corpus(tmp_path_factory.mktemp("corpus"), documents=150)
    sub = folder / "sub"
    sub.mkdir()
    (sub / "more.txt").write_text((folder / "corpus.txt").read_text().replace("Alpha", "Omega"))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
    from mobilebert.data.corpus import read_text_files

    folder = tmp_path_factory.mktemp("tok")
    Tokenizer.train(read_text_files(corpus), vocab_size=120).save_pretrained(folder)
    return folder


def small(corpus: Path, **kwargs) -> PrepareSettings:
    return PrepareSettings((str(corpus),), max_seq_length=32, shard_mb=0.004, dupe_factor=2, **kwargs)


def test_any_worker_count_writes_the_same_bytes(tmp_path, corpus, tokenizer_dir):
    one = prepare(small(corpus), tmp_path / "one", str(tokenizer_dir), workers=1, show_progress=False)
    two = prepare(small(corpus), tmp_path / "two", str(tokenizer_dir), workers=2, show_progress=False)
    assert len(one["shards"]) >= 8 and one["totals"] == two["totals"]
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    totals = one["totals"]
    # 1 in 20 documents held out (pairs need two held-out documents in a shard: these shards are tiny)
    assert totals["train_pairs"] > 100 and totals["validation_documents"] > 0
    assert totals["validation_documents"] == pytest.approx(totals["train_documents"] / 19, rel=0.5)
    data = open_prepared(tmp_path / "one")
    assert len(data.train) == totals["train_pairs"] and len(data.validation) == totals["validation_pairs"]
    ids, first_length, label = data.train.pair(len(data.train) - 1)  # the last shard's last pair
    cls_id, sep_id = (data.tokenizer.cls_id, data.tokenizer.sep_id)
    assert ids[0] == cls_id and ids[first_length - 1] == sep_id and ids[-1] == sep_id and label in (0, 1)
    assert ids.dtype == np.int64 and len(ids) <= 32
    # Again with --resume: the finished folder is returned as it is.
    again = prepare(small(corpus), tmp_path / "one", str(tokenizer_dir), workers=1, resume=True,
                    show_progress=False)
    assert again == one


def test_sigkill_mid_preparation_then_resume_gives_the_same_bytes(tmp_path, corpus, tokenizer_dir):
    reference = tmp_path / "reference"
    args = ["prepare", "--corpus", str(corpus), "--tokenizer", str(tokenizer_dir), "--workers", "1",
            "--data.max_seq_length", "32", "--data.shard_mb", "0.0005"]
    assert run_cli(*args, "--out", str(reference)).returncode == 0
    cut = tmp_path / "cut"
    victim = subprocess.Popen([sys.executable, "-m", "mobilebert", *args, "--out", str(cut)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MOBILEBERT_PROGRESS": "0"})
    deadline = time.time() + 120
    while len(list((cut / "shards").glob("0*"))) < 5:
        assert victim.poll() is None and time.time() < deadline, "preparation ended before it could be killed"
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (cut / "manifest.json").exists(), "killed too late to test anything"
    refused = run_cli(*args, "--out", str(cut))
    assert refused.returncode == 2 and "unfinished preparation; add --resume" in refused.stderr
    resumed = run_cli(*args, "--out", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert digest(cut) == digest(reference)
    assert not list((cut / "shards").glob(".*")), "temporary shard folders left behind"


def test_encoding_whole_documents_gives_the_ids_of_each_sentence(tokenizer_dir):
    backend = Tokenizer.from_pretrained(tokenizer_dir).backend
    documents = [split_sentences(text) for text in (
        "Alpha beta gamma. Delta [SEP] epsilon zeta! Eta theta?",  # a literal [SEP] inside a sentence
        "Café naïve façade. 東京 is big.  Spaces   collapse here. Dr. Smith arrived.",
        "One sentence only",
        "Red green.   Blue (cyan) \"magenta\". Yellow's black; white.")]
    encoded = encode_documents(backend, documents)
    for document, sentences in zip(documents, encoded, strict=True):
        assert [list(ids) for ids in sentences] == [backend.encode(s, add_special_tokens=False).ids for s in document]


def test_training_reads_the_prepared_folder_without_the_corpus(tmp_path, corpus, tokenizer_dir):
    """A 2-process torchrun on a prepared folder takes the steps one process takes, with the raw corpus gone."""
    text = tmp_path / "text"
    text.mkdir()
    (text / "corpus.txt").write_text((corpus / "corpus.txt").read_text())
    prepared = tmp_path / "prepared"
    made = run_cli("prepare", "--corpus", str(text), "--tokenizer", str(tokenizer_dir), "--data.max_seq_length", "32",
                   "--data.shard_mb", "0.005", "--out", str(prepared))
    assert made.returncode == 0, made.stderr
    assert "train + validation pairs" in made.stdout and "MB/s" in made.stdout
    (text / "corpus.txt").unlink()  # neither rank may open the raw corpus
    config = write_config(tmp_path / "c.yaml", text, steps=6, dropout=False, checkpoint_every=100)
    common = ["--config", str(config), "--data.prepared", str(prepared)]
    single = pretrain(*common, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mobilebert", "pretrain", *common, "--out", str(tmp_path / "two")]
    double = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr[-3000:]
    from mobilebert.train.rundir import read_metrics

    one = [m for m in read_metrics(tmp_path / "one" / "metrics.jsonl") if "split" not in m]
    two = [m for m in read_metrics(tmp_path / "two" / "metrics.jsonl") if "split" not in m]
    assert len(one) == len(two) == 6 and all("data_wait_s" in m for m in one)
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert not (tmp_path / "one" / "cache").exists()  # nothing prepared again
    record = json.loads((tmp_path / "one" / "final" / "prepared_data.json").read_text())
    assert Path(record["folder"]) == prepared.resolve()


def test_background_loader_gives_the_same_batches(tmp_path, corpus, tokenizer_dir):
    from mobilebert.data.pretraining import batch_stream
    from mobilebert.data.training import DataOptions, batches_for

    prepare(small(corpus), tmp_path / "p", str(tokenizer_dir), workers=1, show_progress=False)
    data = open_prepared(tmp_path / "p")
    batches = batches_for(data.train, data.tokenizer, DataOptions(), batch_size=8, seed=3)
    inline = list(batch_stream(batches, 2, 7, workers=0))
    background = list(batch_stream(batches, 2, 7, workers=2))
    assert len(inline) == len(background) == 5
    for a, b in zip(inline, background, strict=True):
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_datasets_files_and_max_documents(tmp_path, corpus, tokenizer_dir):
    records = [{"text": block} for block in (corpus / "corpus.txt").read_text().split("\n\n")]
    jsonl = tmp_path / "wiki.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = prepare(PrepareSettings((str(jsonl),), max_seq_length=32, shard_mb=0.003), tmp_path / "j",
                       str(tokenizer_dir), workers=1, show_progress=False)
    from_text = prepare(PrepareSettings((str(corpus / "corpus.txt"),), max_seq_length=32, shard_mb=0.003),
                        tmp_path / "t", str(tokenizer_dir), workers=1, show_progress=False)
    assert manifest["totals"]["train_documents"] == from_text["totals"]["train_documents"] == \
        len(records) - from_text["totals"]["validation_documents"]
    limited = prepare(PrepareSettings((str(corpus),), max_seq_length=32, max_documents=40), tmp_path / "m",
                      str(tokenizer_dir), workers=1, show_progress=False)
    assert limited["totals"]["train_documents"] + limited["totals"]["validation_documents"] == 40


def test_records_of_single_sentences_are_grouped_into_documents(tmp_path, tokenizer_dir):
    sentences = [f"Alpha beta gamma number {i}." for i in range(103)]
    jsonl = tmp_path / "books.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    settings = PrepareSettings((str(jsonl),), max_seq_length=32, group_size={str(jsonl): 10}, holdout_every=1000)
    manifest = prepare(settings, tmp_path / "g", str(tokenizer_dir), workers=1, show_progress=False)
    totals = manifest["totals"]
    assert totals["train_documents"] + totals["validation_documents"] == 11  # 10 groups of 10, one of 3
    assert totals["train_sentences"] + totals["validation_sentences"] == 103
    with pytest.raises(UserError, match="group_size"):
        PrepareSettings((str(jsonl),), group_size={"elsewhere": 10})


def test_a_trained_tokenizer_is_saved_and_the_builtin_corpus_keeps_its_splits(tmp_path):
    manifest = prepare(PrepareSettings(max_seq_length=32, max_documents=60), tmp_path / "b", vocab_size=300,
                       workers=1, show_progress=False)
    assert manifest["totals"]["train_documents"] == 60 and manifest["totals"]["validation_documents"] == 60
    assert Tokenizer.from_pretrained(tmp_path / "b" / "tokenizer").fingerprint() == manifest["tokenizer"]


# ---- bad input: one line, exit 2, nothing lost ----


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_corpora_are_one_line(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("Fine text here. More of it.\n\nAnother document. Two.\n")
    (bad / "b.txt").write_bytes(b"Good line.\n\nSecond line ok.\ncaf\xe9 au lait\n")
    one_line_error(run_cli("prepare", "--corpus", str(bad), "--tokenizer", str(tokenizer_dir), "--out",
                           str(tmp_path / "o1")), "b.txt", "UTF-8", "line 4")
    assert not (tmp_path / "o1").exists()  # refused before any shard was done: nothing left to --resume
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n\n\n")
    one_line_error(run_cli("prepare", "--corpus", str(empty), "--tokenizer", str(tokenizer_dir), "--out",
                           str(tmp_path / "o2")), "empty")
    one_line_error(run_cli("prepare", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o3")),
                   "missing.txt", "no such file")


def test_config_errors_come_before_any_corpus_is_read(tmp_path, corpus):
    config = write_config(tmp_path / "c.yaml", corpus, steps=2)
    began = time.time()
    result = pretrain("--config", str(config), "--out", str(tmp_path / "run"), "--train.warmup_steps", "50")
    one_line_error(result, "warmup_steps")
    assert time.time() - began < 60 and not (tmp_path / "run" / "cache").exists()


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared") / "p"
    prepare(small(corpus), folder, str(tokenizer_dir), workers=1, show_progress=False)
    return folder


def copy_of(prepared: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


@pytest.mark.parametrize("damage, needle", [(truncate, "cannot be read"), (flip_last_byte, "checksum mismatch"),
                                            (Path.unlink, "missing")])
def test_damaged_shards_are_refused(tmp_path, corpus, prepared, damage, needle):
    folder = copy_of(prepared, tmp_path)
    damage(folder / "shards" / "00003" / "train-tokens.npy")
    config = write_config(tmp_path / "c.yaml", corpus, steps=2)
    result = pretrain("--config", str(config), "--data.prepared", str(folder), "--out", str(tmp_path / "run"))
    one_line_error(result, "00003/train-tokens.npy", needle)


def test_truncation_is_caught_without_checksums(tmp_path, prepared):
    folder = copy_of(prepared, tmp_path)
    truncate(folder / "shards" / "00002" / "train-tokens.npy")
    with pytest.raises(UserError, match="00002/train-tokens.npy: cannot be read"):
        open_prepared(folder, verify=False)


def test_prepared_folders_that_do_not_fit_the_run_are_refused(tmp_path, corpus, prepared):
    config = write_config(tmp_path / "c.yaml", corpus, steps=2)
    longer = pretrain("--config", str(config), "--data.prepared", str(prepared), "--data.max_seq_length", "48",
                      "--out", str(tmp_path / "a"))
    one_line_error(longer, "prepared with max_seq_length 32, shorter than the data.max_seq_length 48")
    other = tmp_path / "other-tokenizer"
    Tokenizer.train([["Completely different words here.", "Nothing alike at all."]] * 4,
                    vocab_size=90).save_pretrained(other)
    teacher = tmp_path / "teacher"
    made = pretrain("--config", str(config), "--data.tokenizer", str(other), "--data.max_seq_length", "32",
                    "--out", str(teacher))
    assert made.returncode == 0, made.stderr
    result = run_cli("distill", "--teacher", str(teacher / "final"), "--data.prepared", str(prepared),
                     "--out", str(tmp_path / "d"))
    one_line_error(result, "prepared with another tokenizer than the teacher")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "request.json").write_text("{}")
    one_line_error(pretrain("--config", str(config), "--data.prepared", str(unfinished), "--out",
                            str(tmp_path / "b")), "did not finish")


def test_prepare_reads_the_data_section_of_a_training_config(tmp_path, corpus, tokenizer_dir, capsys):
    from mobilebert.cli import main

    config = write_config(tmp_path / "c.yaml", corpus, steps=2)  # model, data and train sections
    assert main(["prepare", "--config", str(config), "--tokenizer", str(tokenizer_dir), "--workers", "1",
                 "--out", str(tmp_path / "p")]) == 0
    assert open_prepared(tmp_path / "p").max_seq_length == 32  # the config's data.max_seq_length
    assert main(["prepare", "--config", str(config), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "p"),
                 "--resume"]) == 0
    assert "was already complete" in capsys.readouterr().out


def test_a_file_without_blank_lines_is_still_cut_into_bounded_shards(tmp_path):
    from mobilebert.data.sources import text_ranges

    text = tmp_path / "one-line-per-article.txt"
    text.write_text("".join(f"Article {i} has a sentence. And another one here.\n" for i in range(2000)))
    ranges = list(text_ranges(str(text), shard_bytes=10_000))
    assert len(ranges) >= 4 and ranges[-1].end == text.stat().st_size
    assert all(r.end - r.start <= 20_100 for r in ranges)  # at most a shard and a stretch, ending at a line end
    data = text.read_bytes()
    assert all(data[r.end - 1:r.end] == b"\n" for r in ranges)


def test_a_refused_resume_leaves_the_folder_as_it_was(tmp_path, corpus, tokenizer_dir):
    prepare(small(corpus), tmp_path / "p", str(tokenizer_dir), workers=1, show_progress=False)
    other = tmp_path / "other"
    Tokenizer.train([["Completely different words here.", "Nothing alike at all."]] * 4,
                    vocab_size=90).save_pretrained(other)
    with pytest.raises(UserError, match="prepared from another corpus, settings or tokenizer"):
        prepare(small(corpus), tmp_path / "p", str(other), workers=1, resume=True, show_progress=False)
    assert open_prepared(tmp_path / "p").tokenizer.fingerprint() == Tokenizer.from_pretrained(
        tokenizer_dir).fingerprint()


def test_one_preparation_at_a_time_per_folder(tmp_path, corpus, tokenizer_dir):
    import fcntl

    with open(tmp_path / ".p.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running preparation holds it
        with pytest.raises(UserError, match="another process is preparing into it"):
            prepare(small(corpus), tmp_path / "p", str(tokenizer_dir), workers=1, show_progress=False)


def test_training_runs_sharing_a_cache_wait_for_each_other(tmp_path, corpus, tokenizer_dir, capsys):
    """`wait=True` (what pretrain/distill use for their cache) waits for the other preparation, then goes on."""
    import fcntl
    import threading

    with open(tmp_path / ".p.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        threading.Timer(0.5, fcntl.flock, (lock, fcntl.LOCK_UN)).start()  # the other run finishes
        manifest = prepare(small(corpus), tmp_path / "p", str(tokenizer_dir), workers=1, resume=True,
                           show_progress=False, wait=True)
    assert "another run is preparing this data; waiting for it" in capsys.readouterr().out
    assert manifest["totals"]["train_pairs"] > 100


def test_a_worker_that_dies_is_one_line_and_the_run_can_resume(tmp_path, corpus, tokenizer_dir, monkeypatch):
    """A worker killed by the system (here: one that exits at start) is a clear error, not a BrokenProcessPool
    traceback; what was finished stays for --resume."""
    import concurrent.futures
    import multiprocessing

    import mobilebert.data.prepare as preparation

    def dying_pool(workers, tokenizer_json):
        return concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=os._exit, initargs=(1,))

    monkeypatch.setattr(preparation, "_pool", dying_pool)
    with pytest.raises(UserError, match="a preparation worker died .*rerun with --resume"):
        prepare(small(corpus), tmp_path / "out", str(tokenizer_dir), workers=2, show_progress=False)
    monkeypatch.undo()
    resumed = prepare(small(corpus), tmp_path / "out", str(tokenizer_dir), workers=1, resume=True,
                      show_progress=False)
    assert resumed["totals"]["train_pairs"] > 100
