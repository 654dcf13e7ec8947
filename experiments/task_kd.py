"""Task distillation over seeds: does `finetune --teacher` raise the distilled student over plain fine-tuning?

From one finished `mobilebert demo` folder (its distilled student, its teacher's fine-tuned task models and its
built-in task files), the student is fine-tuned on every built-in task twice per seed: plain, and with task
distillation from the teacher fine-tuned on that task (β · task loss + (1 − β) · KD). The script writes
OUT/results.json, OUT/results.md (mean ± std over seeds, the teacher beside) and OUT/task_kd.png.

    make demo                                               # writes runs/demo
    python experiments/task_kd.py --demo runs/demo --out runs/task-kd --seeds 0 1 2

Every fine-tuning run is a stage with a `stage.json` marker, two side by side as in the demo: an interrupted run
resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from functools import partial
from pathlib import Path

from mobilebert.data.builtin_tasks import BUILTIN_TASKS
from mobilebert.recipes.demo import QUICK, DemoPlan, finetune_work, run_stages
from mobilebert.tables import format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--demo", default="runs/demo", help="a finished `mobilebert demo` folder")
    parser.add_argument("--out", default="runs/task-kd", help="folder for the runs and the results")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--beta", type=float, default=0.5, help="weight of the task loss (1 - beta: KD)")
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, as in `mobilebert demo`")
    parser.add_argument("--quick", action="store_true", help="for a `mobilebert demo --quick` folder")
    args = parser.parse_args(argv)
    demo, out = Path(args.demo), Path(args.out)
    teachers = {task: demo / "finetune-teacher" / task / "final" for task in args.tasks}
    missing = [str(p) for p in [demo / "student" / "final", *teachers.values()] if not (p / "config.json").is_file()]
    if missing:
        print(f"task_kd: error: {args.demo} is not a finished demo folder (missing {missing[0]}); run `make demo`",
              file=sys.stderr)
        return 2
    plan = QUICK if args.quick else DemoPlan()
    student = str(demo / "student" / "final")
    stages = []
    for seed in args.seeds:
        seeded = dataclasses.replace(plan, seed=seed)
        for task in args.tasks:
            kd = ("--teacher", str(teachers[task]), "--distill.beta", str(args.beta))
            stages += [(f"plain-seed{seed}/{task}", partial(finetune_work, seeded, student, demo / "tasks", task)),
                       (f"kd-seed{seed}/{task}", partial(finetune_work, seeded, student, demo / "tasks", task,
                                                         extra=kd))]
    out.mkdir(parents=True, exist_ok=True)
    records = run_stages(out, stages, args.workers)

    def main_metric(record: dict) -> float:
        return record["metrics"][record["main_metric"]]

    teacher = {t: json.loads((demo / "finetune-teacher" / t / "results.json").read_text()) for t in args.tasks}
    metric_of = {t: teacher[t]["main_metric"] for t in args.tasks}
    stats = {kind: {t: [main_metric(records[f"{kind}-seed{s}/{t}"]) for s in args.seeds] for t in args.tasks}
             for kind in ("plain", "kd")}
    rows = [[name, *[f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"
                     for v in stats[kind].values()]]
            for kind, name in (("plain", "plain fine-tuning"), ("kd", f"task KD (β {args.beta:g})"))]
    rows.append(["teacher (seed 0)", *[f"{teacher[t]['best']['metrics'][metric_of[t]]:.3f}" for t in args.tasks]])
    table = format_table(["distilled student", *[f"{t} ({metric_of[t]})" for t in args.tasks]], rows)
    gains = {t: statistics.mean(stats["kd"][t]) - statistics.mean(stats["plain"][t]) for t in args.tasks}
    verdict = ", ".join(f"{t} {'+' if g >= 0 else ''}{g:.3f}" for t, g in gains.items())
    conditions = f"student {student}; teachers {demo}/finetune-teacher/<task>/final; seeds {args.seeds}"
    (out / "results.md").write_text(f"# Task distillation over seeds\n\n{conditions}\n\n{table}\n\n"
                                    f"Mean gain of task KD: {verdict}.\n\n![](task_kd.png)\n")
    (out / "results.json").write_text(json.dumps({"conditions": conditions, "scores": stats, "gains": gains,
                                                  "teacher": {t: teacher[t]["best"]["metrics"] for t in args.tasks}},
                                                 indent=2) + "\n")
    plot(stats, metric_of, out / "task_kd.png")
    print(table)
    print(f"\nmean gain of task KD: {verdict}\nwritten: {out / 'results.md'}, {out / 'task_kd.png'}")
    return 0


def plot(stats: dict[str, dict[str, list[float]]], metric_of: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(metric_of)
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks), 3.2))
    for ax, task in zip(axes if len(tasks) > 1 else [axes], tasks, strict=True):
        for i, (kind, colour) in enumerate((("plain", "#8c8c8c"), ("kd", "#4c72b0"))):
            values = stats[kind][task]
            ax.bar(i, statistics.mean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0, capsize=3,
                   color=colour)
            ax.plot([i] * len(values), values, "k.", markersize=4)
        ax.set_xticks([0, 1], ["plain", "task KD"], fontsize=8)
        ax.set_title(f"{task} ({metric_of[task]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
