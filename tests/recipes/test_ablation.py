"""experiments/ablation.py's own code (the runs it drives are the demo's stages, tested in
tests/recipes/test_demo.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(mlm: float, order: float, qa_f1: float) -> dict:
    return {"pretraining": {"mlm_accuracy": mlm, "nsp_accuracy": 0.5},
            "tasks": {"builtin-order": {"main_metric": "mcc", "metrics": {"mcc": order}},
                      "builtin-qa": {"main_metric": "f1", "metrics": {"exact_match": 1.0, "f1": qa_f1}}}}


def test_summary_is_mean_and_std_over_seeds_per_strategy(ablation, tmp_path):
    runs = {"pkt": [_run(0.30, 0.6, 30.0), _run(0.34, 0.8, 20.0)], "none": [_run(0.10, 0.2, 5.0)]}
    header, rows, stats = ablation.summarise(runs, ["builtin-order", "builtin-qa"])
    assert header == ["student", "held-out MLM acc", "NSP acc", "builtin-order (mcc)", "builtin-qa (f1)"]
    assert rows[0] == ["PKT", "0.320 ± 0.028", "0.500 ± 0.000", "0.700 ± 0.141", "25.000 ± 7.071"]
    assert rows[1][0] == "no distillation" and stats["none"]["builtin-qa"] == (5.0, 0.0)  # one seed: no spread
    ablation.plot(stats, ["builtin-order", "builtin-qa"], tmp_path / "a.png", "title")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_without_a_teacher_it_says_what_to_run_and_exits_2(ablation, tmp_path, capsys):
    assert ablation.main(["--teacher", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert "no teacher checkpoint" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_budget_axis_rows_are_named_by_strategy_and_budget(ablation, tmp_path):
    runs = {"pkt": [_run(0.30, 0.6, 30.0)], "pkt@4x": [_run(0.34, 0.7, 40.0)], "none@4x": [_run(0.1, 0.2, 5.0)]}
    header, rows, stats = ablation.summarise(runs, ["builtin-order", "builtin-qa"])
    assert [r[0] for r in rows] == ["PKT", "PKT (4x layer-wise)", "no distillation (4x layer-wise)"]
    ablation.plot(stats, ["builtin-order", "builtin-qa"], tmp_path / "b.png", "title")
    assert (tmp_path / "b.png").stat().st_size > 0
