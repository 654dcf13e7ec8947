"""LiteRT (TFLite) models (`export_tflite`, `TFLiteModel`, `mobilebert export --format tflite`) on tiny random
models.

A file holds one fixed-shape signature per length asked for (here mostly batch 2, 8 and 16 tokens); the runner pads
each input to the shortest signature that fits and runs larger batches in chunks. Where the word table's [PAD] row
is zero (as `padding_idx` keeps it in a trained model), that padding changes nothing, so checks compare with eager
on the unpadded input.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    TINY,
    VARIANTS,
    assert_runner_matches,
    build,
    export_report,
    padded_batch,
    relative_error,
    run_export,
)

import mobilebert as mb

pytest.importorskip("litert_torch", reason="LiteRT is not installed (pip install 'mobilebert[tflite]')")

from mobilebert.deploy.litert import TFLiteModel, export_tflite, read_metadata, with_metadata  # noqa: E402
from mobilebert.deploy.quantize import state_dict_size  # noqa: E402

FP32_TOL = 1e-4
LENGTHS = (8, 16)


def with_zero_pad_row(eager: torch.nn.Module) -> torch.nn.Module:
    """`eager` with its [PAD] embedding zero, as training with `padding_idx` leaves it (`build` randomizes it)."""
    word = next(m for m in eager.modules() if isinstance(m, mb.model.Embeddings)).word
    with torch.no_grad():
        word.weight[word.padding_idx].zero_()
    return eager


@pytest.fixture(scope="module")
def pretraining_model(tmp_path_factory):
    """MobileBERT (the default variant) with the pretraining heads, as signatures of batch 2 x 8 and 2 x 16."""
    eager = with_zero_pad_row(build("PreTraining", mb.MobileBertConfig(**TINY)))
    path = export_tflite(eager, tmp_path_factory.mktemp("tflite") / "model.tflite", lengths=LENGTHS[::-1], batch=2)
    return eager, TFLiteModel(path)


def test_model_matches_eager_on_any_batch_and_length_and_records_the_model(pretraining_model):
    eager, model = pretraining_model
    for batch in (padded_batch(batch=2, length=16), padded_batch(batch=1, length=5, seed=1),  # 5 runs as 8
                  padded_batch(batch=5, length=11, seed=2), padded_batch(batch=1, length=1, seed=3)):
        assert_runner_matches(model, eager, batch)
    assert model.output_names == ["prediction_logits", "seq_relationship_logits"]
    assert model.architecture == "MobileBertForPreTraining" and model.dtype == "float32"
    assert model.shapes == {"length_8": (2, 8), "length_16": (2, 16)}  # shortest first
    assert model.config["hidden_size"] == TINY["hidden_size"]
    assert [p.name for p in model.path.parent.iterdir()] == ["model.tflite"]  # no temporary file left
    assert sorted(model.interpreter.get_signature_list()) == ["length_16", "length_8"]


def test_a_nonzero_pad_row_gives_eager_on_the_padded_input(tmp_path):
    """Without a zero [PAD] row the last real token's trigram sees it: the runner then returns what eager gives on
    the input padded to the signature's length, as for any padded batch."""
    eager = build("Model", mb.MobileBertConfig(**TINY))
    model = TFLiteModel(export_tflite(eager, tmp_path / "model.tflite", lengths=[12]))
    batch = padded_batch(batch=1, length=9)
    padded = {k: torch.cat([v, v.new_zeros(1, 3)], dim=1) for k, v in batch.items()}  # [PAD] is 0, mask 0, type 0
    with torch.no_grad():
        expected = eager(**padded).last_hidden_state[:, :9]
        unpadded = eager(**batch).last_hidden_state
    got = model(**batch)["last_hidden_state"]
    assert relative_error(got, expected) <= FP32_TOL < relative_error(got, unpadded)


@pytest.mark.parametrize("variant", ["mobilebert-tiny", "mobilebert-no-opt"])  # IB-BERT's forward: as no-opt's
def test_other_variants_match_eager_and_are_left_untouched(variant, tmp_path):
    eager = with_zero_pad_row(build("Model", mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]})))
    eager.train()
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    model = TFLiteModel(export_tflite(eager, tmp_path / "model.tflite", lengths=[12]))
    assert eager.training and all(torch.equal(before[k], v) for k, v in eager.state_dict().items())
    assert_runner_matches(model, eager.eval(), padded_batch(batch=3, length=9))


def test_multiple_choice_and_question_answering_models(tmp_path):
    cfg = mb.MobileBertConfig(**TINY, classifier_activation=True)
    eager = with_zero_pad_row(build("MultipleChoice", cfg))
    model = TFLiteModel(export_tflite(eager, tmp_path / "mc.tflite", lengths=[16], choices=3))
    batch = {k: v.view(2, 3, -1) for k, v in padded_batch(batch=6, length=16).items()}  # every row has a token
    assert_runner_matches(model, eager, batch)
    with pytest.raises(mb.UserError, match=r"must be \(batch, 3, tokens\)"):
        model(batch["input_ids"][:, :2])
    eager = with_zero_pad_row(build("QuestionAnswering", cfg))
    model = TFLiteModel(export_tflite(eager, tmp_path / "qa.tflite", lengths=[16]))
    batch = padded_batch(length=12)
    assert_runner_matches(model, eager, batch)
    ids = batch["input_ids"][:1].numpy()  # numpy in, mask and types filled in
    assert model(ids)["start_logits"].shape == (1, 12)


def test_int8_model_is_smaller_and_close_to_eager(tmp_path):
    cfg = mb.MobileBertConfig(**TINY)
    torch.manual_seed(0)
    eager = mb.MobileBertModel(cfg).eval()  # the model's own init: `build`'s noise everywhere is no int8 case
    int8 = TFLiteModel(export_tflite(eager, tmp_path / "int8.tflite", lengths=[16], int8=True))
    linear_weights = sum(m.weight.numel() for m in eager.modules() if isinstance(m, torch.nn.Linear))
    saved = state_dict_size(eager) - int8.path.stat().st_size  # fp32 weights; an fp32 file is about that size
    assert int8.dtype == "int8" and saved > 1.5 * linear_weights  # 3 of 4 bytes, less per-channel scales
    batch = padded_batch(length=16)
    with torch.no_grad():
        expected = eager(**batch).last_hidden_state
    error = relative_error(int8(**batch)["last_hidden_state"], expected)
    assert 1e-5 < error < 5e-2  # quantized (not fp32's 1e-7), and close


def test_metadata_is_one_entry_that_a_second_write_replaces(pretraining_model, tmp_path):
    content = pretraining_model[1].path.read_bytes()
    path = tmp_path / "again.tflite"
    path.write_bytes(with_metadata(with_metadata(content, {"a": 1}), {"b": 2}))
    assert read_metadata(path) == {"b": 2}
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    assert [model.Metadata(i).Name() for i in range(model.MetadataLength())].count(b"mobilebert") == 1


@pytest.mark.filterwarnings("ignore::FutureWarning")  # litert-torch converting the ReLU
def test_tflite_model_refuses_what_it_cannot_run(pretraining_model, tmp_path):
    eager, model = pretraining_model
    with pytest.raises(mb.UserError, match="no such LiteRT model"):
        TFLiteModel(tmp_path / "missing.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"not a model at all")
    (tmp_path / "empty.tflite").write_bytes(b"")
    import litert_torch

    other = litert_torch.convert(torch.nn.ReLU().eval(), (torch.ones(2),))
    (tmp_path / "other.tflite").write_bytes(other.model_content())
    for name in ("junk", "empty", "other"):
        with pytest.raises(mb.UserError, match="not a mobilebert LiteRT model"):
            TFLiteModel(tmp_path / f"{name}.tflite")
    too_long = torch.ones(1, 17, dtype=torch.long)
    with pytest.raises(mb.UserError, match="exceeds the model's longest signature, 16"):
        model(too_long)
    with pytest.raises(mb.UserError, match="attention_mask has shape"):
        model(too_long[:, :8], attention_mask=too_long[:, :9])
    with pytest.raises(mb.UserError, match=r"must be \(batch, tokens\)"):
        model(too_long[0])
    with pytest.raises(mb.UserError, match="exceeds the model's maximum"):
        export_tflite(eager, tmp_path / "long.tflite", lengths=[TINY["max_position_embeddings"] + 1])
    with pytest.raises(mb.UserError, match="must be positive"):
        export_tflite(eager, tmp_path / "none.tflite", lengths=[])


def test_export_command_writes_models_that_match_eager(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    report = export_report(checkpoint, out, "tflite", "--lengths", "16", "32")
    assert list(report["files"]) == ["model.tflite"] and report["fp32_ok"]
    assert report["parity"]["fp32"]["relative_error"]["logits"] <= FP32_TOL
    assert report["parity"]["fp32"]["argmax_agreement"]["logits"] == 1.0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert TFLiteModel(out / "model.tflite").shapes == {"length_16": (1, 16), "length_32": (1, 32)}
    assert "litert-torch" in report["versions"]
    printed = capsys.readouterr().out
    assert "LiteRT threads default" in printed and json.loads(printed.splitlines()[-1])["format"] == "tflite"
    report = export_report(checkpoint, out, "tflite-int8")
    assert list(report["files"]) == ["model-int8.tflite"] and report["parity"]["int8"]["relative_error"]["logits"] > 0
    with pytest.raises(mb.UserError, match="--no-optimize applies to the ONNX formats"):
        run_export([str(checkpoint[0]), "--out", str(out), "--format", "tflite", "--no-optimize"])
    with pytest.raises(mb.UserError, match="--lengths applies to the tflite formats"):
        run_export([str(checkpoint[0]), "--out", str(out), "--format", "onnx", "--lengths", "16"])
