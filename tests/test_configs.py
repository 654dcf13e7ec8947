"""Every shipped config file loads into its recipe's options (found by a recursive glob)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mobilebert.config import preset
from mobilebert.recipe_config import load_config
from mobilebert.recipes.pretrain import PretrainOptions

ROOT = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"teacher": PretrainOptions, "ib-bert-large": PretrainOptions}
CONFIGS = sorted(ROOT.rglob("*.yaml"))


def test_configs_are_found():
    assert len(CONFIGS) >= 2 and all(p.stem in RECIPES for p in CONFIGS), [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_loads_and_names_a_valid_model(path):
    options = load_config(RECIPES[path.stem], path)
    cfg = preset(options.model.preset, **options.model.overrides)
    assert options.data.max_seq_length <= cfg.max_position_embeddings


def test_paper_teacher_recipe_is_the_papers():
    options = load_config(PretrainOptions, ROOT / "paper" / "ib-bert-large.yaml")
    assert options.model.preset == "ib-bert-large"
    assert (options.train.batch_size, options.train.steps, options.train.optimizer) == (4096, 500000, "lamb")
    assert options.data.max_seq_length == 512 and options.data.max_predictions_per_seq == 20
