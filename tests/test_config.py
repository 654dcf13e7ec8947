"""Config validation, presets and their sizes against docs/models.md."""

from __future__ import annotations

import pytest

import mobilebert as mb

# Backbone parameters (no heads) from the spec table, in millions as printed there; the teacher's includes its
# pooler. Equal when rounded to the table's digits.
SPEC_PARAMS = {"mobilebert": "24.58", "mobilebert-tiny": "15.49", "mobilebert-no-opt": "24.58",
               "ib-bert-large": "294.5"}


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_paper_presets_have_the_spec_parameter_counts(name):
    digits = len(SPEC_PARAMS[name].split(".")[1])
    assert f"{mb.count_parameters(mb.preset(name)) / 1e6:.{digits}f}" == SPEC_PARAMS[name]


@pytest.mark.parametrize("name", [n for n in mb.PRESETS if n != "ib-bert-large"])
def test_parameter_count_formula_matches_the_built_model(name):
    """The formula behind `presets` agrees with the real module (the teacher is built in test_full_size)."""
    cfg = mb.preset(name)
    model = mb.MobileBertModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == mb.count_parameters(cfg)


def test_flops_match_the_benchmarking_figure():
    # docs/benchmarks.md: MobileBERT at 1×128 is 5.39 GFLOP; MobileBERT-TINY in the paper ~3.1B.
    assert mb.count_flops(mb.preset("mobilebert"), 128) / 1e9 == pytest.approx(5.39, abs=0.005)
    assert mb.count_flops(mb.preset("mobilebert-tiny"), 128) / 1e9 == pytest.approx(3.1, abs=0.05)


def test_preset_overrides_and_unknown_names():
    cfg = mb.preset("mobilebert", num_hidden_layers=12)
    assert cfg.num_hidden_layers == 12 and cfg.intra_bottleneck_size == 128
    with pytest.raises(mb.UserError, match="unknown preset 'bert'"):
        mb.preset("bert")
    with pytest.raises(mb.UserError, match="unknown MobileBertConfig field.*hidden_sise"):
        mb.preset("mobilebert", hidden_sise=3)


def test_demo_teacher_and_student_line_up_for_layer_wise_transfer():
    teacher, student = mb.preset("ib-bert-demo"), mb.preset("mobilebert-demo")
    for field in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "embedding_size"):
        assert getattr(teacher, field) == getattr(student, field), field


@pytest.mark.parametrize("changes, message", [
    (dict(num_attention_heads=3), "divisible by num_attention_heads"),
    (dict(hidden_act="tanh"), "hidden_act must be one of"),
    (dict(normalization_type="batch_norm"), "normalization_type must be one of"),
    (dict(embedding_size=1024), "must not exceed hidden_size"),
    (dict(use_bottleneck=False), "use_bottleneck=False"),
    (dict(use_bottleneck_attention=True), "exclude each other"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob must be in"),
])
def test_invalid_configs_name_the_field(changes, message):
    with pytest.raises(mb.UserError, match=message):
        mb.preset("mobilebert", **changes)


def test_transformers_dict_round_trip_keeps_every_field():
    cfg = mb.preset("ib-bert-demo", id2label={0: "a", 1: "b", 2: "c"}, trigram_skip_padding=True)
    d = cfg.to_transformers_dict("MobileBertForPreTraining")
    assert d["model_type"] == "mobilebert" and d["true_hidden_size"] == 192
    assert d["label2id"] == {"a": 0, "b": 1, "c": 2}
    back = mb.MobileBertConfig.from_transformers_dict(d)
    assert back == cfg and back.num_labels == 3


def test_transformers_tiny_convention_is_normalised():
    """transformers ignores key_query_shared_bottleneck (default True) when use_bottleneck_attention is set."""
    d = mb.preset("mobilebert").to_transformers_dict()
    d.update(use_bottleneck_attention=True, key_query_shared_bottleneck=True)
    cfg = mb.MobileBertConfig.from_transformers_dict(d)
    assert cfg.use_bottleneck_attention and not cfg.key_query_shared_bottleneck


def test_config_json_of_another_model_or_missing_fields_is_refused():
    with pytest.raises(mb.UserError, match="model_type is 'bert', expected 'mobilebert'"):
        mb.MobileBertConfig.from_transformers_dict({"model_type": "bert", "hidden_size": 768})
    with pytest.raises(mb.UserError, match="missing required field.*num_hidden_layers"):
        mb.MobileBertConfig.from_transformers_dict({"model_type": "mobilebert", "vocab_size": 10, "hidden_size": 8,
                                                    "num_attention_heads": 2, "intermediate_size": 8})
