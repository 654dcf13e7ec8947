"""Checkpoint format: round trips, legacy .bin, the IB-BERT teacher, and every kind of bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import padded_batch, randomize
from safetensors import safe_open

import mobilebert as mb


@pytest.fixture
def saved(tmp_path):
    model = randomize(mb.MobileBertForPreTraining(mb.preset("mobilebert-test"))).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_round_trip_is_exact_and_uses_transformers_names(saved):
    model, path = saved
    reloaded = mb.MobileBertForPreTraining.from_pretrained(path)
    batch = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).prediction_logits, reloaded(**batch).prediction_logits)
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "mobilebert.encoder.layer.0.bottleneck.attention.dense.weight" in keys
    assert "mobilebert.encoder.layer.1.ffn.0.intermediate.dense.weight" in keys
    assert "mobilebert.encoder.layer.1.output.bottleneck.LayerNorm.weight" in keys
    assert "cls.predictions.dense.weight" in keys and "cls.predictions.decoder.weight" not in keys
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mobilebert" and config["architectures"] == ["MobileBertForPreTraining"]
    assert not list(path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_ib_bert_teacher_round_trips_in_the_same_format(tmp_path):
    """transformers cannot run this structure (Q/K read the 512-wide input); our format still stores it."""
    cfg = mb.preset("ib-bert-demo", num_hidden_layers=2)
    model = randomize(mb.MobileBertForPreTraining(cfg), std=0.05).eval()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_slice("mobilebert.encoder.layer.0.attention.self.query.weight").get_shape() == [192, 128]
    reloaded = mb.MobileBertForPreTraining.from_pretrained(tmp_path)
    batch = padded_batch(8192)
    with torch.no_grad():
        assert torch.equal(model(**batch).prediction_logits, reloaded(**batch).prediction_logits)


def test_legacy_bin_is_read_with_weights_only(saved, tmp_path_factory):
    model, path = saved
    legacy = tmp_path_factory.mktemp("legacy")
    (legacy / "config.json").write_text((path / "config.json").read_text())
    from mobilebert.checkpoint import to_hf_state_dict

    torch.save(to_hf_state_dict(model), legacy / "pytorch_model.bin")
    reloaded = mb.MobileBertForPreTraining.from_pretrained(legacy)
    batch = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).prediction_logits, reloaded(**batch).prediction_logits)


def test_a_bin_holding_arbitrary_objects_is_refused(saved, tmp_path_factory):
    _, path = saved
    evil = tmp_path_factory.mktemp("evil")
    (evil / "config.json").write_text((path / "config.json").read_text())

    class Payload:  # a pickle that would run code on load without weights_only
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(mb.UserError, match="cannot read weights"):
        mb.MobileBertForPreTraining.from_pretrained(evil)


def test_directory_without_weights(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(mb.UserError, match="no weights"):
        mb.MobileBertForPreTraining.from_pretrained(path)


def test_truncated_weight_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(mb.UserError, match="corrupt or truncated weight file"):
        mb.MobileBertForPreTraining.from_pretrained(path)


def test_garbage_weight_file(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(mb.UserError, match="corrupt or truncated weight file"):
        mb.MobileBertForPreTraining.from_pretrained(path)


def test_config_of_another_model_type(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "bert"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mb.UserError, match="model_type is 'bert'"):
        mb.MobileBertForPreTraining.from_pretrained(path)


def test_config_with_missing_fields(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mb.UserError, match="missing required field.*hidden_size"):
        mb.MobileBertForPreTraining.from_pretrained(path)


def test_config_that_is_not_json(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(mb.UserError, match="not valid JSON"):
        mb.MobileBertForPreTraining.from_pretrained(path)


def test_weights_whose_shapes_do_not_fit_the_config(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mb.UserError, match=r"weights do not fit the config: .*has shape \(24, 16\), the config needs"):
        mb.MobileBertForPreTraining.from_pretrained(path)


def test_weights_with_fewer_layers_than_the_config(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(mb.UserError, match="missing mobilebert.encoder.layer.2"):
        mb.MobileBertForPreTraining.from_pretrained(path)


def test_missing_directory_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(mb.UserError, match="no such directory"):
        mb.MobileBertModel.from_pretrained(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(mb.UserError, match="google/mobilebert-uncased: not a local directory.*hub failed"):
        mb.MobileBertModel.from_pretrained("google/mobilebert-uncased")


def test_hub_id_is_served_from_the_local_hub_cache(tmp_path, monkeypatch):
    """The real hub code path, offline: a snapshot laid out in huggingface_hub's cache loads by its id."""
    model = randomize(mb.MobileBertModel(mb.preset("mobilebert-test"))).eval()
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-mobilebert" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    (cache / "models--someone--tiny-mobilebert" / "refs").mkdir()
    (cache / "models--someone--tiny-mobilebert" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reloaded = mb.MobileBertModel.from_pretrained("someone/tiny-mobilebert")
    batch = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, reloaded(**batch).last_hidden_state)


def test_task_model_from_pretraining_checkpoint_initialises_its_head(saved, caplog):
    _, path = saved
    model = mb.MobileBertForSequenceClassification.from_pretrained(path, num_labels=3)
    assert model.classifier.out_features == 3
    assert "newly initialised" in caplog.text and "classifier.weight" in caplog.text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    from mobilebert.files import atomic_write

    before = os.umask(umask)
    try:
        atomic_write(tmp_path / "results.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(before)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == mode


def test_json_text_is_strict_json():
    from mobilebert.files import json_text

    text = json_text({"pearson": float("nan"), "scores": [float("inf"), 1.5], "name": "stsb"}, indent=None)
    assert text == '{"pearson": null, "scores": [null, 1.5], "name": "stsb"}'
