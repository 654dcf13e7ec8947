"""`mobilebert demo --quick`: the whole pipeline at toy size, its report, and skipping finished stages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mobilebert.data.builtin_tasks import BUILTIN_TASKS
from mobilebert.recipes.demo import FINETUNED
from mobilebert.recipes.demo_report import final_validation

STAGES = ("teacher", "student", "scratch", *(f"finetune-{m}" for m in FINETUNED), "deploy", "bench")


def run_demo(out: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mobilebert", "demo", "--quick", "--out", str(out)], cwd=cwd,
                          capture_output=True, text=True, env={"MOBILEBERT_CACHE": str(cwd / "cache"),
                                                               "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})


def test_quick_demo_writes_a_report_from_the_run_and_resumes_without_redoing_stages(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
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

    # Killed during the benchmark: the next run redoes only that stage.
    stamps = {p: p.stat().st_mtime for p in out.glob("*/stage.json") if p.parent.name != "bench"}
    (out / "bench" / "stage.json").unlink()
    again = run_demo(out, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"[{stage}] done earlier" in again.stdout for stage in STAGES if stage != "bench")
    assert again.stdout.count("] running") == 1 and "[bench] running" in again.stdout
    assert all(p.stat().st_mtime == t for p, t in stamps.items())
