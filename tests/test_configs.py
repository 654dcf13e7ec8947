"""Every shipped config file loads into its recipe's options (found by a recursive glob)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobilebert.config import preset
from mobilebert.recipes.config import load_config
from mobilebert.recipes.distill import DistillOptions
from mobilebert.recipes.pretrain import PretrainOptions

ROOT = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"teacher": PretrainOptions, "ib-bert-large": PretrainOptions, "distill-pkt": DistillOptions,
           "distill-jkt": DistillOptions, "distill-akt": DistillOptions, "mobilebert-pkt": DistillOptions}
CONFIGS = sorted(ROOT.rglob("*.yaml"))


def test_configs_are_found():
    assert len(CONFIGS) >= 2 and all(p.stem in RECIPES for p in CONFIGS), [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads_and_names_a_valid_model(path):
    options = load_config(RECIPES[path.stem], path)
    if isinstance(options, DistillOptions):
        cfg = preset(options.distill.student, **options.distill.student_overrides)
    else:
        cfg = preset(options.model.preset, **options.model.overrides)
    assert options.data.max_seq_length <= cfg.max_position_embeddings


def test_paper_teacher_recipe_is_the_papers():
    options = load_config(PretrainOptions, ROOT / "paper" / "ib-bert-large.yaml")
    assert options.model.preset == "ib-bert-large"
    assert (options.train.batch_size, options.train.steps, options.train.optimizer) == (4096, 500000, "lamb")
    assert options.data.max_seq_length == 512 and options.data.max_predictions_per_seq == 20


def test_paper_student_recipe_is_the_papers():
    options = load_config(DistillOptions, ROOT / "paper" / "mobilebert-pkt.yaml")
    d = options.distill
    assert (d.student, d.strategy, d.layerwise_steps, d.pd_steps) == ("mobilebert", "pkt", 240000, 500000)
    assert (d.current_layer_lr_scale, d.lower_layer_lr_scale) == (3.0, 0.3)
    assert (d.fmt_mse_weight, d.fmt_mean_weight, d.fmt_var_weight) == (100, 5000, 5)
    assert (options.train.optimizer, options.train.lr, options.train.batch_size) == ("lamb", 1.5e-3, 2048)
