"""Configuration flow: dataclass defaults → YAML → command-line overrides, with clear errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from mobilebert.errors import UserError
from mobilebert.recipes.config import check_resume, load_config, save_config


@dataclass
class Model:
    preset: str = "mobilebert"
    overrides: dict = field(default_factory=dict)


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10
    bf16: bool = False
    micro: int | None = None
    rates: list[float] = field(default_factory=list)


@dataclass
class Options:
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)


@dataclass
class Recipe:
    train: Train = field(default_factory=lambda: Train(lr=5e-5, bf16=True))  # the recipe's own section defaults


def test_a_section_override_keeps_the_recipes_section_defaults(tmp_path):
    """`--train.steps 3` changes one key of the recipe's train section, not the section class's defaults."""
    opts = load_config(Recipe, None, ["--train.steps", "3"])
    assert (opts.train.lr, opts.train.bf16, opts.train.steps) == (5e-5, True, 3)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n")
    opts = load_config(Recipe, path)
    assert (opts.train.lr, opts.train.bf16, opts.train.steps) == (1e-4, True, 10)


def test_finetune_keeps_adamw_when_a_train_key_is_given():
    from mobilebert.recipes.finetune import FinetuneOptions

    opts = load_config(FinetuneOptions, None, ["--train.tensorboard", "false"])
    assert (opts.train.optimizer, opts.train.eps, opts.train.tensorboard) == ("adamw", 1e-6, False)


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: ib-bert-demo\ntrain:\n  lr: 2.0e-3\n  steps: 5\n")
    opts = load_config(Options, path, ["--train.steps", "7", "--lr=1e-4", "--bf16", "true", "--micro", "none",
                                       "--model.overrides", "{num_hidden_layers: 2}"])
    assert opts.model.preset == "ib-bert-demo"
    assert opts.train.lr == 1e-4 and opts.train.steps == 7 and opts.train.bf16 is True and opts.train.micro is None
    assert opts.model.overrides == {"num_hidden_layers": 2}
    assert load_config(Options, None, ["--rates", "[1e-5, 3.0e-5, 2]"]).train.rates == [1e-5, 3e-5, 2.0]
    save_config(opts, tmp_path / "resolved.yaml")
    assert load_config(Options, tmp_path / "resolved.yaml") == opts


@pytest.mark.parametrize("text, overrides, message", [
    ("train:\n  lrr: 1\n", [], "unknown config key 'train.lrr' \\(did you mean 'train.lr'\\?\\)"),
    ("", ["--train.stepz", "3"], "unknown config key 'train.stepz'"),
    ("train:\n  steps: many\n", [], "train.steps must be int, got 'many'"),
    ("", ["--steps", "1.5"], "train.steps must be int"),
    ("train: [1, 2]\n", [], "'train' must be a mapping"),
    ("model: {preset: [x]}\n", [], "model.preset must be str"),
    ("a: [", [], "not valid YAML"),
    ("", ["--train.lr"], "needs a value"),
    ("", ["--rates", "[1e-5, abc]"], "train.rates must be list\\[float\\], got '\\[1e-5, abc\\]'"),
    ("", ["stray"], "unexpected argument 'stray'"),
])
def test_bad_configs_name_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(Options, path, overrides)


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\n")
    with pytest.raises(UserError, match=r"^command line: train.steps must be int, got 'abc'$"):
        load_config(Options, path, ["--train.steps", "abc"])
    path.write_text("train:\n  steps: abc\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: train.steps must be int, got 'abc'$"):
        load_config(Options, path, ["--lr", "1e-3"])


def test_resuming_with_other_options_is_refused_when_finished_and_named_when_not(tmp_path, capsys):
    opts = load_config(Options, None, ["--train.steps", "7"])
    save_config(opts, tmp_path / "config.yaml")
    check_resume(tmp_path, opts, finished=True)  # the same options: nothing to say
    more = load_config(Options, None, ["--train.steps", "9", "--lr", "1e-4"])
    with pytest.raises(UserError, match=r"finished with other options \(train.lr: 0.001 in it, 0.0001 now; "
                                        r"train.steps: 7 in it, 9 now\): pass --overwrite"):
        check_resume(tmp_path, more, finished=True)
    check_resume(tmp_path, more, finished=True, ignore=("train.steps", "train.lr"))
    check_resume(tmp_path, more, finished=False)
    assert "was started with other options (train.lr: 0.001 in it" in capsys.readouterr().err
    # A file from before an option existed: that option is not a change.
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text.replace("  steps: 7\n", ""))
    check_resume(tmp_path, load_config(Options, None, ["--train.steps", "9"]), finished=True)
    # Values compared as the options' types read them: 1e-3 written without a dot is the float 0.001.
    (tmp_path / "config.yaml").write_text("train:\n  lr: 1e-3\n  rates: [1e-5]\n")
    check_resume(tmp_path, load_config(Options, None, ["--rates", "[1.0e-5]"]), finished=True)
    # A path spelled another way (`--out ./runs/demo` after `--out runs/demo`) is the same path.
    save_config(load_config(Options, None, ["--preset", "runs/demo/teacher/final"]), tmp_path / "config.yaml")
    check_resume(tmp_path, load_config(Options, None, ["--preset", "./runs/demo//teacher/final"]), finished=True)


def test_missing_file():
    with pytest.raises(UserError, match="config file nope.yaml does not exist"):
        load_config(Options, "nope.yaml")
