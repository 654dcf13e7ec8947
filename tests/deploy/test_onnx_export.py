"""ONNX export, int8 quantization and the `export` command, on tiny random models (docs/deployment.md).

Parity is relative (max |ONNX − eager| / max |eager|) because MobileBERT's activations reach 1e8.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY, VARIANTS, padded_batch, randomize, relative_error, run_export
from torch import nn

import mobilebert as mb
from mobilebert.deploy.export import OnnxModel, check_parity, export_onnx
from mobilebert.deploy.interface import argmax_agreement, eager_outputs, example_batch, relative_errors
from mobilebert.deploy.quantize import (
    BatchReader,
    file_size,
    load_torch_int8,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    quantize_torch_dynamic,
    state_dict_size,
)
from mobilebert.heads import TASK_MODELS
from mobilebert.recipes import export as export_recipe
from mobilebert.train.qat import FakeQuantLinear, finish_qat, prepare_qat

FP32_TOL = 1e-4
EXPORT_LENGTH = 16  # the traced example is (2, 16); every check below runs other shapes
OUTPUTS = {
    "MobileBertModel": ["last_hidden_state", "pooler_output"],
    "MobileBertForPreTraining": ["prediction_logits", "seq_relationship_logits"],
    "MobileBertForQuestionAnswering": ["start_logits", "end_logits"],
}


def other_shapes(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Padded batches whose batch size and length both differ from the export example."""
    if isinstance(model, mb.MobileBertForMultipleChoice):
        return [example_batch(model, batch=3, length=9, seed=1), example_batch(model, batch=1, length=30, seed=2)]
    return [padded_batch(), padded_batch(batch=5, length=37, seed=1), padded_batch(batch=1, length=5, seed=2)]


def assert_onnx_parity(model: nn.Module, path) -> None:
    for batch in other_shapes(model):
        assert check_parity(model, path, batch) <= FP32_TOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cls", [mb.MobileBertModel, mb.MobileBertForPreTraining])
def test_onnx_matches_eager_for_every_variant(variant, cls, tmp_path):
    model = randomize(cls(mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}))).eval()
    path = export_onnx(model, tmp_path / "model.onnx", max_seq_length=EXPORT_LENGTH)
    assert OnnxModel(path).output_names == OUTPUTS[cls.__name__]
    assert_onnx_parity(model, path)


@pytest.mark.parametrize("variant", ["mobilebert", "ib-bert"])
def test_eager_graph_export_matches_too_and_is_the_larger_graph(variant, tmp_path):
    """optimize=False exports the eager model's own graph: same outputs, more nodes (NoNorm as Mul and Add, the
    projections separate)."""
    model = randomize(mb.MobileBertForPreTraining(mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}))).eval()
    eager = export_onnx(model, tmp_path / "eager.onnx", max_seq_length=EXPORT_LENGTH, optimize=False)
    fused = export_onnx(model, tmp_path / "fused.onnx", max_seq_length=EXPORT_LENGTH)
    assert_onnx_parity(model, eager)
    nodes = {path.stem: len(onnx.load(str(path)).graph.node) for path in (eager, fused)}
    assert nodes["fused"] < nodes["eager"]
    ops = {path.stem: [n.op_type for n in onnx.load(str(path)).graph.node] for path in (eager, fused)}
    assert ops["eager"].count("MatMul") + ops["eager"].count("Gemm") > ops["fused"].count("MatMul") + ops[
        "fused"].count("Gemm")


@pytest.mark.parametrize("name", sorted(TASK_MODELS))
def test_onnx_matches_eager_for_every_head(name, tmp_path):
    cfg = mb.MobileBertConfig(**TINY, id2label={0: "a", 1: "b", 2: "c"})
    model = randomize(TASK_MODELS[name](cfg), seed=1).eval()
    path = export_onnx(model, tmp_path / "model.onnx", max_seq_length=EXPORT_LENGTH)
    assert OnnxModel(path).output_names == OUTPUTS.get(name, ["logits"])
    assert_onnx_parity(model, path)


def test_export_leaves_the_model_alone_and_writes_atomically(tmp_path):
    model = randomize(mb.MobileBertForSequenceClassification(mb.MobileBertConfig(**TINY))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "sub" / "model.onnx", max_seq_length=EXPORT_LENGTH)
    assert model.training  # the exporter traces in eval mode; the caller's mode comes back
    assert check_parity(model, path, padded_batch()) <= FP32_TOL and model.training  # eval inside, mode restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["mobilebert.architecture"] == "MobileBertForSequenceClassification"
    assert json.loads(meta["mobilebert.config"])["max_position_embeddings"] == TINY["max_position_embeddings"]
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_onnx_model_takes_numpy_and_fills_in_defaults(tmp_path):
    model = randomize(mb.MobileBertModel(mb.MobileBertConfig(**TINY))).eval()
    session = OnnxModel(export_onnx(model, tmp_path / "m.onnx", max_seq_length=EXPORT_LENGTH), threads=1)
    ids = padded_batch()["input_ids"]
    implicit = session(ids.numpy())
    explicit = session(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert set(implicit) == {"last_hidden_state", "pooler_output"}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in implicit.values())
    np.testing.assert_array_equal(implicit["last_hidden_state"], explicit["last_hidden_state"])
    too_long = torch.ones(1, TINY["max_position_embeddings"] + 1, dtype=torch.long)
    with pytest.raises(mb.UserError, match="max_position_embeddings"):
        session(too_long)
    with pytest.raises(mb.UserError, match="no such ONNX file"):
        OnnxModel(tmp_path / "missing.onnx")


def test_agreement_counts_real_tokens_only():
    mask = np.array([[1, 1, 0]])
    reference = {"logits": np.array([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])}
    candidate = {"logits": np.array([[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])}  # wrong on one real token, and padding
    assert argmax_agreement(candidate, reference, mask) == {"logits": 0.5}
    assert relative_errors(candidate, reference) == {"logits": 1.0}


# ---- int8 ----

@pytest.fixture(scope="module")
def classifier_onnx(tmp_path_factory):
    model = randomize(mb.MobileBertForSequenceClassification(mb.MobileBertConfig(**TINY))).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("fp32") / "model.onnx", max_seq_length=EXPORT_LENGTH)
    return model, path


def int8_error(model: nn.Module, outputs: dict[str, np.ndarray], batch: dict[str, torch.Tensor]) -> float:
    return max(relative_errors(outputs, eager_outputs(model, batch)).values())


def test_dynamic_int8_onnx_is_int8_and_close_to_fp32(classifier_onnx, tmp_path):
    model, fp32 = classifier_onnx
    path = quantize_onnx_dynamic(fp32, tmp_path / "model-int8.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    batch = padded_batch(batch=8, length=20)
    error = int8_error(model, OnnxModel(path)(**batch), batch)
    assert 0 < error < 0.05  # measured ~0.01; a wrong scale or a skipped layer gives errors near 1


def test_static_int8_onnx_calibrates_on_a_reader(classifier_onnx, tmp_path):
    model, fp32 = classifier_onnx
    batches = [padded_batch(batch=4, length=12 + i, seed=10 + i) for i in range(3)]
    reader = BatchReader(batches)
    assert [set(reader.get_next()) for _ in range(3)] == [{"input_ids", "attention_mask", "token_type_ids"}] * 3
    assert reader.get_next() is None
    path = quantize_onnx_static(fp32, tmp_path / "model-int8-static.onnx", batches)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    batch = padded_batch(batch=8, length=20)
    assert 0 < int8_error(model, OnnxModel(path)(**batch), batch) < 0.1  # measured ~0.01
    # Percentile calibration stacks activations: batches of different shapes must still work.
    percentile = quantize_onnx_static(fp32, tmp_path / "percentile.onnx", batches, method="percentile")
    assert 0 < int8_error(model, OnnxModel(percentile)(**batch), batch) < 0.1
    with pytest.raises(mb.UserError, match="calibration method"):
        quantize_onnx_static(fp32, tmp_path / "x.onnx", batches, method="entropy-ish")


def test_torch_int8_is_a_new_module_close_to_fp32(classifier_onnx, tmp_path):
    model, _ = classifier_onnx
    quantized = quantize_torch_dynamic(model)
    assert type(model.classifier) is nn.Linear  # the original is untouched
    assert type(quantized.classifier) is not nn.Linear and "quantized" in type(quantized.classifier).__module__
    batch = padded_batch(batch=8, length=20)
    assert 0 < int8_error(model, eager_outputs(quantized, batch), batch) < 0.05  # measured ~0.01
    torch.save(quantized.state_dict(), tmp_path / "torch-int8.pt")
    reloaded = load_torch_int8(model, tmp_path / "torch-int8.pt")
    np.testing.assert_array_equal(eager_outputs(reloaded, batch)["logits"], eager_outputs(quantized, batch)["logits"])
    assert state_dict_size(quantized) < state_dict_size(model)


def test_int8_onnx_is_about_four_times_smaller_where_weights_dominate(tmp_path):
    model = mb.MobileBertModel(mb.preset("mobilebert-demo")).eval()  # 3.5 MB of weights
    fp32 = export_onnx(model, tmp_path / "model.onnx", max_seq_length=EXPORT_LENGTH)
    int8 = quantize_onnx_dynamic(fp32, tmp_path / "model-int8.onnx")
    assert file_size(fp32) / file_size(int8) >= 3.0  # weights alone: ~3.9x; the graph's own bytes are not shrunk
    batch = padded_batch(vocab=8192, batch=4, length=24)
    assert check_parity(model, fp32, batch) <= FP32_TOL
    assert int8_error(model, OnnxModel(int8)(**batch), batch) < 0.05


def test_quantization_aware_fine_tuning_round_trip():
    model = randomize(mb.MobileBertForSequenceClassification(mb.preset("mobilebert-test")), std=0.1)
    qat = prepare_qat(model)
    assert type(model.classifier) is nn.Linear and isinstance(qat.classifier, FakeQuantLinear)
    assert qat.config.hidden_act == "relu6" and qat.mobilebert.config.hidden_act == "relu6"
    assert not any(type(m) is nn.ReLU for m in qat.modules())
    batch = padded_batch()
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3)
    qat.train()
    for _ in range(2):
        loss = qat(**batch, labels=torch.tensor([0, 1, 0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    plain = finish_qat(qat.eval())
    assert not any(isinstance(m, FakeQuantLinear) for m in plain.modules())
    with torch.no_grad():
        fake, real = qat(**batch).logits, plain(**batch).logits
    assert relative_error(fake, real) < 0.05  # the same weights, with and without int8 rounding


def test_a_qat_model_saves_and_loads_as_a_plain_checkpoint(tmp_path):
    """The fake-quantizers' range statistics stay out of state dicts: same keys as the plain model, strict loads."""
    model = randomize(mb.MobileBertForSequenceClassification(mb.preset("mobilebert-test")), std=0.1)
    qat = prepare_qat(model)
    assert list(qat.state_dict()) == list(model.state_dict())
    qat.load_state_dict(model.state_dict(), strict=True)
    qat.save_pretrained(tmp_path / "qat")
    loaded = mb.MobileBertForSequenceClassification.from_pretrained(tmp_path / "qat")
    assert loaded.config.hidden_act == "relu6" and any(type(m) is nn.ReLU6 for m in loaded.modules())
    batch = padded_batch()
    with torch.no_grad():
        expected = finish_qat(qat.eval())(**batch).logits
        np.testing.assert_allclose(loaded.eval()(**batch).logits.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


# ---- the export command ----

@pytest.mark.parametrize("fmt, written", [
    ("onnx", ["model.onnx"]),
    ("onnx-int8", ["model.onnx", "model-int8.onnx"]),
    ("onnx-int8-static", ["model.onnx", "model-int8-static.onnx"]),
    ("torch-int8", ["torch-int8.pt"]),
])
def test_export_command_writes_model_and_report(checkpoint, tmp_path, capsys, fmt, written):
    path, text = checkpoint
    out = tmp_path / "out"
    code = run_export([str(path), "--out", str(out), "--format", fmt, "--calibration", "16",
                       "--calibration-text", str(text), "--max-seq-length", "32"])
    assert code == 0
    report = json.loads((out / "export.json").read_text())
    assert list(report["files"]) == written
    assert all((out / name).stat().st_size == size for name, size in report["files"].items())
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert report["architecture"] == "MobileBertForSequenceClassification" and report["fp32_ok"]
    assert set(report["versions"]) >= {"torch", "onnx", "onnxruntime", "mobilebert"}
    if "fp32" in report["parity"]:
        assert report["parity"]["fp32"]["relative_error"]["logits"] <= FP32_TOL
    if fmt != "onnx":
        assert report["parity"]["int8"]["relative_error"]["logits"] < 0.2
        assert report["conditions"]["held_out"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1])["format"] == fmt
    if written[-1].endswith(".onnx"):
        assert OnnxModel(out / written[-1])(torch.tensor([[2, 7, 9, 3]]))["logits"].shape == (1, 2)


def test_export_command_task_and_builtin_calibration_text(checkpoint, tmp_path):
    """--task overrides the recorded architecture; without --calibration-text the built-in corpus calibrates."""
    path, _ = checkpoint
    out = tmp_path / "qa"
    assert run_export([str(path), "--out", str(out), "--format", "onnx-int8-static", "--task", "qa",
                       "--calibration", "16", "--max-seq-length", "24"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["architecture"] == "MobileBertForQuestionAnswering" and report["conditions"]["text"] == "builtin"
    assert report["conditions"]["calibration_examples"] == 16 and report["conditions"]["held_out"]
    assert OnnxModel(out / "model-int8-static.onnx").output_names == ["start_logits", "end_logits"]


def test_an_earlier_export_is_replaced_only_when_asked(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "out"
    assert run_export([str(path), "--out", str(out), "--format", "onnx", "--max-seq-length", "16"]) == 0
    with pytest.raises(mb.UserError, match=r"holds an export of .* \(onnx\); pass --overwrite"):
        run_export([str(path), "--out", str(out), "--format", "onnx", "--max-seq-length", "16"])
    assert run_export([str(path), "--out", str(out), "--format", "onnx-int8", "--max-seq-length", "16"]) == 0
    assert {"model.onnx", "model-int8.onnx"} <= {p.name for p in out.iterdir()}  # another format joins it
    with pytest.raises(mb.UserError, match="pass --overwrite"):  # onnx is there, though not the last export
        run_export([str(path), "--out", str(out), "--format", "onnx", "--max-seq-length", "16"])
    (out / "export.json").unlink()  # as an interrupted export leaves it: its model files, no export.json
    assert run_export([str(path), "--out", str(out), "--format", "onnx", "--max-seq-length", "16",
                       "--overwrite"]) == 0
    assert not (out / "model-int8.onnx").exists() and json.loads((out / "export.json").read_text())["format"] == "onnx"


def test_export_command_rejects_bad_input(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(mb.UserError, match="no such directory"):
        run_export([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(mb.UserError, match="no config.json"):
        run_export([str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(mb.UserError, match="no such calibration text file"):
        run_export([str(path), "--out", str(tmp_path / "o"), "--calibration-text", str(tmp_path / "none.txt")])
    assert not (tmp_path / "o").exists()  # a refused export leaves no empty folder behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for flags in ([], ["--overwrite"]):  # not an export folder: refused, and never deleted
        with pytest.raises(mb.UserError, match="not empty|not an export folder"):
            run_export([str(path), "--out", str(tmp_path / "mine"), *flags])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    namespace = argparse.Namespace(checkpoint=str(path), out=str(tmp_path / "o"), format="coreml", task=None,
                                   max_seq_length=128, lengths=None, calibration=8, calibration_text=None,
                                   calibration_method="minmax", opset=17, threads=None, optimize=True)
    with pytest.raises(mb.UserError, match="unknown format 'coreml'"):
        export_recipe.main(namespace)
    with pytest.raises(SystemExit):  # the command line refuses it before main runs
        run_export([str(path), "--out", str(tmp_path / "o"), "--format", "coreml"])
    bare = tmp_path / "no-tokenizer"
    mb.MobileBertModel(mb.MobileBertConfig(**TINY)).save_pretrained(bare)
    with pytest.raises(mb.UserError, match="tokenizer"):
        run_export([str(bare), "--out", str(tmp_path / "o"), "--format", "onnx-int8-static"])
