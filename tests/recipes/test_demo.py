"""`mobilebert demo --quick`: the whole pipeline at toy size, its report, and skipping finished stages."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mobilebert.data.builtin_tasks import BUILTIN_TASKS
from mobilebert.errors import UserError
from mobilebert.recipes.demo import FINETUNED
from mobilebert.recipes.demo_report import chance_band, final_validation, near_chance

STAGES = ("teacher", "student", "scratch", *(f"finetune-{m}" for m in FINETUNED), "deploy", "bench")


def run_demo(out: Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mobilebert", "demo", "--quick", "--task-kd", "--out", str(out)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={"MOBILEBERT_CACHE": str(cwd / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("demo")
    return cwd / "demo", run_demo(cwd / "demo", cwd)


def test_quick_demo_writes_a_report_from_the_run_and_resumes_without_redoing_stages(demo):
    out, result = demo
    tmp_path = out.parent
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "one fine-tuning run per model and task (seed 0)" in report
    for stage in STAGES:
        assert (out / stage / "stage.json").is_file(), stage
        assert f"| {stage} " in report
    for name in ("losses", "transfer", "tasks", "bench"):
        assert (out / "report" / f"{name}.png").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    # The report's numbers are the run's: held-out MLM accuracy, task scores, latency.
    for model in ("teacher", "student", "scratch"):
        assert f"{final_validation(out / model)['mlm_accuracy']:.4f}" in report
    for task in BUILTIN_TASKS:
        summary = json.loads((out / "finetune-student" / task / "results.json").read_text())
        assert f"{summary['best']['metrics'][summary['main_metric']]:.4f}" in report
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert f"{bench['results'][0]['median_ms']:.2f}" in report
    # Task distillation only where the plan asks for it (builtin-qa); the report marks the rest as not run.
    assert sorted(p.name for p in (out / "finetune-student-kd").iterdir() if p.is_dir()) == ["builtin-qa"]
    kd_row = next(line for line in report.splitlines() if line.startswith("| MobileBERT, distilled + task KD"))
    cells = [c.strip() for c in kd_row.strip("| ").split("|")][1:]
    assert [c == "-" for c in cells] == [task != "builtin-qa" for task in BUILTIN_TASKS]

    # Killed during the benchmark: the next run redoes only that stage.
    stamps = {p: p.stat().st_mtime for p in out.glob("*/stage.json") if p.parent.name != "bench"}
    (out / "bench" / "stage.json").unlink()
    again = run_demo(out, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"[{stage}] done earlier" in again.stdout for stage in STAGES if stage != "bench")
    assert again.stdout.count("] running") == 1 and "[bench] running" in again.stdout
    assert all(p.stat().st_mtime == t for p, t in stamps.items())


def test_task_distillation_experiment_compares_plain_and_kd_fine_tuning_of_the_demo_student(demo, tmp_path):
    """experiments/task_kd.py on the quick demo's folder: both fine-tunings per seed, and the table."""
    out, result = demo
    assert result.returncode == 0, result.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("task_kd", Path(__file__).parents[2] / "experiments" / "task_kd.py")
    task_kd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_kd)
    assert task_kd.main(["--demo", str(out), "--out", str(tmp_path / "kd"), "--quick", "--workers", "1",
                         "--seeds", "3", "--tasks", "builtin-qa"]) == 0
    results = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert set(results["scores"]) == {"plain", "kd"}
    assert all(len(v) == 1 for kind in results["scores"].values() for v in kind.values())
    assert (tmp_path / "kd" / "kd-seed3" / "builtin-qa" / "teacher-outputs.npy").is_file()
    assert [p.name.endswith("-seed3") for p in (tmp_path / "kd" / "plain-seed3" / "builtin-qa" / "trials").iterdir()] \
        == [True]  # the seed reaches the fine-tuning
    assert "task KD (β 0.5)" in (tmp_path / "kd" / "results.md").read_text()
    assert (tmp_path / "kd" / "task_kd.png").stat().st_size > 0
    assert task_kd.main(["--demo", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def _timed_stage(seconds: float, folder: Path) -> dict:
    import time

    began = time.time()
    time.sleep(seconds)
    return {"began": began, "ended": time.time()}


def test_stages_wait_for_the_stage_they_follow_and_a_wait_for_a_stage_that_never_runs_is_an_error(tmp_path):
    from functools import partial

    from mobilebert.recipes.demo import run_stages

    stages = [("long", partial(_timed_stage, 1.0)), ("follows-long", partial(_timed_stage, 0.0)),
              ("short", partial(_timed_stage, 0.0)), ("follows-both", partial(_timed_stage, 0.0))]
    records = run_stages(tmp_path, stages, workers=2,
                         after={"follows-long": "long", "follows-both": ("short", "follows-long")})
    assert records["follows-long"]["began"] >= records["long"]["ended"]
    assert records["follows-both"]["began"] >= max(records["short"]["ended"], records["follows-long"]["ended"])
    assert set(records) == {"long", "follows-long", "short", "follows-both"}
    # One at a time, a stage listed before the one it follows still runs after it.
    records = run_stages(tmp_path / "in-turn", [stages[1], stages[0]], workers=1, after={"follows-long": "long"})
    assert records["follows-long"]["began"] >= records["long"]["ended"]
    for workers in (1, 2):
        with pytest.raises(RuntimeError, match="never run: orphan"):
            run_stages(tmp_path / f"orphan-{workers}", [("orphan", partial(_timed_stage, 0.0)),
                                                        ("other", partial(_timed_stage, 0.0))],
                       workers=workers, after={"orphan": "missing"})


def test_a_demo_folder_made_with_another_plan_is_refused_before_any_stage_runs(tmp_path):
    from mobilebert.recipes.demo import QUICK, DemoPlan, check_plan

    out = tmp_path / "demo"
    out.mkdir()
    check_plan(out, QUICK, resuming=False)  # the first run records its plan
    assert json.loads((out / "plan.json").read_text())["teacher_steps"] == QUICK.teacher_steps
    check_plan(out, dataclasses.replace(QUICK, kd_tasks=("builtin-qa",)), resuming=True)  # KD only adds stages
    with pytest.raises(UserError, match=r"another plan \(teacher_steps: 30 in it, 800 now; layerwise_steps: 24 in it, "
                                         r"600 now; "):
        check_plan(out, DemoPlan(), resuming=True)

    # From the command line: one line, status 2, and nothing run in the folder.
    command = [sys.executable, "-m", "mobilebert", "demo", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert "another plan" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]

    other = tmp_path / "a-pretrain-run"  # a folder that is not a demo's: never written into
    other.mkdir()
    (other / "config.yaml").write_text("train: {}\n")
    with pytest.raises(UserError, match="is not a demo folder"):
        check_plan(other, QUICK, resuming=False)
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml"]


def test_a_demo_seed_is_part_of_its_plan_and_a_plan_from_before_seeds_was_seed_0(tmp_path):
    from mobilebert.recipes.demo import QUICK, check_plan

    out = tmp_path / "demo"
    out.mkdir()
    check_plan(out, QUICK, resuming=False)
    with pytest.raises(UserError, match=r"another plan \(seed: 0 in it, 1 now\)"):
        check_plan(out, dataclasses.replace(QUICK, seed=1), resuming=True)

    # A version that did not have seeds recorded no seed: its runs were seed 0, so seed 0 resumes them.
    recorded = json.loads((out / "plan.json").read_text())
    del recorded["seed"]
    (out / "plan.json").write_text(json.dumps(recorded))
    check_plan(out, QUICK, resuming=True)
    with pytest.raises(UserError, match=r"seed: 0 in it, 2 now"):
        check_plan(out, dataclasses.replace(QUICK, seed=2), resuming=True)


def test_the_demo_seed_reaches_every_training_run_and_fine_tuning(tmp_path, monkeypatch):
    from mobilebert.recipes import demo

    commands: dict[str, list[str]] = {}

    def run(command, out, config, overrides, **options):
        commands[command] = overrides
        if command == "finetune":
            (out / "results.json").write_text(json.dumps(
                {"best": {"metrics": {"em": 1.0}}, "baseline": {"em": 0.0}, "main_metric": "em"}))

    monkeypatch.setattr(demo, "_run", run)
    plan = dataclasses.replace(demo.QUICK, seed=7)
    demo.teacher_work(plan, tmp_path, "prepared", tmp_path)
    demo.student_work(plan, "teacher", tmp_path / "cache", tmp_path)
    for task in ("builtin-order", "builtin-qa"):
        demo.finetune_work(plan, "checkpoint", tmp_path / "tasks", task, tmp_path)
        assert commands["finetune"][commands["finetune"].index("--search.seeds") + 1] == "[7]", task
    for command in ("pretrain", "distill"):
        assert commands[command][commands[command].index("--train.seed") + 1] == "7", command


def test_the_report_names_the_models_whose_task_score_is_within_noise_of_the_constant_baseline():
    assert chance_band("accuracy", 400) == pytest.approx(0.05)  # 2 * sqrt(0.5 * 0.5 / 400)
    assert chance_band("matthews", 400) == pytest.approx(0.1)  # 2 / sqrt(400)
    assert chance_band("exact_match", 400) is None
    metric_of = {"builtin-next": "accuracy", "builtin-order": "matthews", "builtin-qa": "exact_match"}
    baseline = {"builtin-next": 0.5, "builtin-order": 0.0, "builtin-qa": 0.5}
    scores = {"teacher": {"builtin-next": 0.458, "builtin-order": 0.816, "builtin-qa": 0.6},
              "student": {"builtin-next": 0.549, "builtin-order": 0.09, "builtin-qa": 1.0},
              "scratch": {"builtin-next": 0.56, "builtin-order": 0.75, "builtin-qa": 0.5}}
    text = near_chance(scores, baseline, metric_of, 400)
    assert "builtin-next (accuracy 0.50 ± 0.050): teacher (IB-BERT), MobileBERT, distilled (PKT);" in text
    assert "builtin-order (matthews 0.00 ± 0.100): MobileBERT, distilled (PKT)." in text
    assert "no distillation" not in text and "builtin-qa" not in text  # 0.56 is outside; EM has no band
    assert near_chance({"teacher": {"builtin-next": 0.7}}, baseline, metric_of, 400) == ""
    assert near_chance(scores, baseline, metric_of, None) == ""  # a plan without its dev size
