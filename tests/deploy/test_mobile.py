"""ExecuTorch programs (`export_executorch`, `ExecutorchModel`, `mobilebert export --format executorch`) on tiny
random models, and the portable forward they are captured from.

A program has a fixed batch and takes any length up to its own (here mostly 2 x up to 16); the runner runs larger
batches in chunks, padding the last with [PAD] rows, so every check compares with eager on the same input.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    HEADS,
    TINY,
    VARIANTS,
    assert_runner_matches,
    assert_same_outputs,
    build,
    export_report,
    padded_batch,
    run_export,
)

import mobilebert as mb
from mobilebert.deploy.optimize import portable

LENGTH = 16


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_portable_forward_matches_eager_for_every_variant(variant):
    """What ExecuTorch captures, run as plain PyTorch: every variant, padding included."""
    eager = build("PreTraining", mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}))
    fast = portable(mb.optimize_for_inference(eager))
    assert_same_outputs(fast, eager, padded_batch())
    assert_same_outputs(fast, eager, padded_batch(batch=1, length=1), hidden_states=False)


@pytest.mark.parametrize("head", HEADS)
def test_the_portable_forward_matches_eager_for_every_head(head):
    eager = build(head, mb.MobileBertConfig(**TINY, classifier_activation=True))
    batch = padded_batch()
    if head == "MultipleChoice":
        batch = {k: v.unsqueeze(0) for k, v in batch.items()}
    assert_same_outputs(portable(mb.optimize_for_inference(eager)), eager, batch, hidden_states=False)


# ---- ExecuTorch itself (the `mobile` extra) ----

executorch = pytest.importorskip("executorch", reason="ExecuTorch is not installed (pip install 'mobilebert[mobile]')")

from mobilebert.deploy.mobile import ExecutorchModel, Int8Embedding, export_executorch  # noqa: E402
from mobilebert.deploy.quantize import state_dict_size  # noqa: E402


@pytest.fixture(scope="module")
def mobilebert_program(tmp_path_factory):
    """MobileBERT (the default variant) with the pretraining heads, as a program of batch 2 and up to 16 tokens;
    and the lowered graph it was written from."""
    from executorch.exir import to_edge_transform_and_lower

    from mobilebert.deploy import mobile

    captured = {}

    def spy(program, **kwargs):
        captured["lowered"] = to_edge_transform_and_lower(program, **kwargs)
        return captured["lowered"]

    eager = build("PreTraining", mb.MobileBertConfig(**TINY))
    original = mobile.executorch_lowering
    mobile.executorch_lowering = lambda: (spy, *original()[1:])
    try:
        path = export_executorch(eager, tmp_path_factory.mktemp("executorch") / "model.pte", batch=2, length=LENGTH)
    finally:
        mobile.executorch_lowering = original
    return eager, ExecutorchModel(path), captured["lowered"].exported_program().graph


def test_program_matches_eager_on_any_batch_and_length_and_records_the_model(mobilebert_program):
    eager, program, _ = mobilebert_program
    for batch in (padded_batch(batch=2, length=LENGTH), padded_batch(batch=1, length=5, seed=1),
                  padded_batch(batch=5, length=11, seed=2), padded_batch(batch=1, length=1, seed=3)):
        assert_runner_matches(program, eager, batch)
    assert program.output_names == ["prediction_logits", "seq_relationship_logits"]
    assert program.architecture == "MobileBertForPreTraining" and program.dtype == "float32"
    assert program.shape == (2, LENGTH) and program.config["hidden_size"] == TINY["hidden_size"]
    assert [p.name for p in program.path.parent.iterdir()] == ["model.pte"]  # no temporary file left


def test_the_whole_encoder_is_one_xnnpack_call(mobilebert_program):
    """What makes the program fast: no matmul, attention or elementwise op of the encoder left to the portable
    kernels (checked to fail with `addmm` into the residual, which XNNPACK does not take, and with reshapes whose
    length is symbolic rather than inferred)."""
    targets = [str(node.target) for node in mobilebert_program[2].nodes if node.op == "call_function"]
    assert sum("executorch_call_delegate" in t for t in targets) == 2  # the encoder, then the pretraining heads
    left = [t for t in targets if any(op in t for op in ("mm", "bmm", "softmax", "linear", "_scaled_dot", "mul.",
                                                         "relu", "add.Tensor"))]
    assert left == []


def test_multiple_choice_and_question_answering_programs_of_the_other_variants(tmp_path):
    """Multiple choice on MobileBERT-TINY, QA on MobileBERT w/o OPT (IB-BERT's forward is as no-opt's): each
    program matches eager, and lowering leaves the model as it was (training flag, weights)."""
    eager = build("MultipleChoice", mb.MobileBertConfig(**TINY, **VARIANTS["mobilebert-tiny"],
                                                         classifier_activation=True))
    eager.train()
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    program = ExecutorchModel(export_executorch(eager, tmp_path / "mc.pte", length=LENGTH + 4, choices=3))
    assert eager.training and all(torch.equal(before[k], v) for k, v in eager.state_dict().items())
    batch = {k: v.view(2, 3, -1) for k, v in padded_batch(batch=6, length=LENGTH).items()}  # every row has a token
    assert_runner_matches(program, eager.eval(), batch)
    with pytest.raises(mb.UserError, match=r"must be \(batch, 3, tokens\)"):
        program(batch["input_ids"][:, :2])
    eager = build("QuestionAnswering", mb.MobileBertConfig(**TINY, **VARIANTS["mobilebert-no-opt"]))
    program = ExecutorchModel(export_executorch(eager, tmp_path / "qa.pte", length=LENGTH))
    batch = padded_batch(length=12)
    assert_runner_matches(program, eager, batch)
    ids = batch["input_ids"][:1].numpy()  # numpy in, mask and types filled in
    assert program(ids)["start_logits"].shape == (1, 12)


def test_int8_embedding_rounds_each_row_to_its_own_scale():
    weight = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 3.0]])
    table = Int8Embedding(weight)
    assert table.weight.dtype == torch.int8 and torch.equal(table.scale, torch.tensor([1 / 127, 1.0, 2.0]))
    assert torch.equal(table.weight[2], torch.tensor([-127, 64, 2], dtype=torch.int8))  # 63.5 and 1.5 round to even
    rows = table(torch.tensor([[2, 1], [0, 2]]))  # ExecuTorch's kernel, dequantized
    assert rows.shape == (2, 2, 3) and torch.equal(rows[0, 1], torch.zeros(3))  # a zero row stays exactly zero
    assert torch.equal(rows[0, 0], torch.tensor([-254.0, 128.0, 4.0]))
    assert (rows[1, 0] - weight[0]).abs().max() <= 0.5 / 127


def test_executorch_model_refuses_what_it_cannot_run(mobilebert_program, tmp_path):
    from executorch.exir import to_edge

    with pytest.raises(mb.UserError, match="no such ExecuTorch program"):
        ExecutorchModel(tmp_path / "missing.pte")
    (tmp_path / "junk.pte").write_bytes(b"not a program")
    with pytest.raises(mb.UserError, match="cannot load ExecuTorch program"):
        ExecutorchModel(tmp_path / "junk.pte")
    other = to_edge(torch.export.export(torch.nn.ReLU(), (torch.ones(2),))).to_executorch()
    (tmp_path / "other.pte").write_bytes(other.buffer)
    with pytest.raises(mb.UserError, match="not a mobilebert program"):
        ExecutorchModel(tmp_path / "other.pte")
    program = mobilebert_program[1]
    too_long = torch.ones(1, LENGTH + 1, dtype=torch.long)
    with pytest.raises(mb.UserError, match="exceeds the program's maximum 16"):
        program(too_long)
    with pytest.raises(mb.UserError, match="attention_mask has shape"):
        program(too_long[:, :8], attention_mask=too_long[:, :9])
    with pytest.raises(mb.UserError, match=r"must be \(batch, tokens\)"):
        program(too_long[0])
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    threads = _threadpool_get_thread_count()
    assert ExecutorchModel(program.path, threads=threads).shape == program.shape  # the pool's size: nothing changes
    with pytest.raises(mb.UserError, match="can be resized only before the first program"):
        ExecutorchModel(program.path, threads=threads + 1)  # would leave the loaded programs on a freed pool
    with pytest.raises(mb.UserError, match="exceeds the model's maximum"):
        export_executorch(mobilebert_program[0], tmp_path / "long.pte", length=TINY["max_position_embeddings"] + 1)


def test_export_command_writes_a_program_and_its_parity(checkpoint, tmp_path, capsys):
    """The command's path for either dtype (the fp32 program's parity: the tests above), shown with int8: the
    program is int8, about a quarter of the fp32 weights' size, and close to eager."""
    out = tmp_path / "out"
    report = export_report(checkpoint, out, "executorch-int8")
    assert list(report["files"]) == ["model-int8.pte"] and report["fp32_ok"] and report["size_ratio"] > 1
    assert 0 < report["parity"]["int8"]["relative_error"]["logits"] < 5e-2
    assert report["parity"]["int8"]["argmax_agreement"]["logits"] >= 0.5
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    program = ExecutorchModel(out / "model-int8.pte")
    assert program.shape == (1, 32) and program.dtype == "int8" and "executorch" in report["versions"]
    eager = mb.MobileBertForSequenceClassification.from_pretrained(checkpoint[0])
    int8_weights = eager.mobilebert.embeddings.word.weight.numel() + sum(  # the word table and every Linear
        m.weight.numel() for m in eager.modules() if isinstance(m, torch.nn.Linear))
    saved = state_dict_size(eager) - program.path.stat().st_size  # fp32 weights; an fp32 program is about that size
    assert saved > 1.5 * int8_weights  # 3 of 4 bytes, less per-channel scales (many here)
    printed = capsys.readouterr().out
    assert "XNNPACK threads default" in printed
    assert json.loads(printed.splitlines()[-1])["format"] == "executorch-int8"
    with pytest.raises(mb.UserError, match="--no-optimize applies to the ONNX formats"):
        run_export([str(checkpoint[0]), "--out", str(out), "--format", "executorch", "--no-optimize"])
