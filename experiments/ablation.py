"""The paper's knowledge-transfer ablation (Table 6: AKT, JKT, PKT), reproduced in miniature.

From one pre-trained demo teacher and one compute budget, students of the same shape are trained with PKT, JKT and
AKT and, as the baseline, with no distillation at all (plain MLM + NSP from scratch for the same number of steps);
each is fine-tuned on the built-in tasks; every (strategy, seed) pair is one run. The script writes
OUT/results.json, OUT/results.md (mean ± std over seeds) and OUT/ablation.png. The paper found
PKT ≥ JKT ≥ AKT, all above no distillation; this reports what we find.

    make demo                                              # (or any `mobilebert pretrain` teacher)
    python experiments/ablation.py --teacher runs/demo/teacher/final --out runs/ablation --seeds 0 1 2

Every run is a stage with a `stage.json` marker, run side by side as in `mobilebert demo` (`--workers`): an
interrupted ablation resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from functools import partial
from pathlib import Path

from mobilebert.data.builtin_tasks import BUILTIN_TASKS, BuiltinSizes, write_builtin_tasks
from mobilebert.recipes.demo import DemoPlan, finetune_work, run_stages, scratch_work, student_work
from mobilebert.recipes.demo_report import final_validation

STRATEGIES = ("pkt", "jkt", "akt", "none")
LABELS = {"pkt": "PKT", "jkt": "JKT", "akt": "AKT", "none": "no distillation"}


def label(key: str) -> str:
    """A results key, `strategy` or `strategy@Nx` (N times the layer-wise budget), as a table row name."""
    strategy, _, budget = key.partition("@")
    return LABELS[strategy] + (f" ({budget} layer-wise)" if budget else "")


def summarise(runs: dict[str, list[dict]], tasks: list[str]) -> tuple[list[str], list[list[str]], dict]:
    """Mean ± std over seeds of every column, per strategy (and budget)."""
    columns = ["mlm_accuracy", "nsp_accuracy", *tasks]
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    for strategy, seeds in runs.items():
        stats[strategy] = {}
        for column in columns:
            values = [r["pretraining"][column] if column in r["pretraining"] else
                      r["tasks"][column]["metrics"][r["tasks"][column]["main_metric"]] for r in seeds]
            stats[strategy][column] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    metric_of = {t: runs[next(iter(runs))][0]["tasks"][t]["main_metric"] for t in tasks}
    header = ["student", "held-out MLM acc", "NSP acc", *[f"{t} ({metric_of[t]})" for t in tasks]]
    rows = [[label(s), *[f"{m:.3f} ± {sd:.3f}" for m, sd in (stats[s][c] for c in columns)]] for s in stats]
    return header, rows, stats


def plot(stats: dict, tasks: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["mlm_accuracy", *tasks]
    names = ["held-out MLM acc", *tasks]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.0 * len(columns) + 0.4 * len(stats), 3.6))
    colours = {"pkt": "#4c72b0", "jkt": "#55a868", "akt": "#dd8452", "none": "#8c8c8c"}
    for ax, column, name in zip(axes, columns, names, strict=True):
        strategies = list(stats)
        means = [stats[s][column][0] for s in strategies]
        errors = [stats[s][column][1] for s in strategies]
        ax.bar(range(len(strategies)), means, yerr=errors, capsize=3,
               color=[colours[s.partition("@")[0]] for s in strategies],
               hatch=[("//" if "@" in s else "") for s in strategies])
        ax.set_xticks(range(len(strategies)), [label(s).replace("no distillation", "none").replace(" layer-wise", "")
                                               for s in strategies], rotation=45, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    plan = DemoPlan()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--teacher", default="runs/demo/teacher/final", help="pre-trained teacher checkpoint")
    parser.add_argument("--out", default="runs/ablation", help="folder for the runs and the results")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", type=int, default=[1],
                        help="multiples of the layer-wise steps to run (the undistilled student gets the same total)")
    parser.add_argument("--student", default=plan.student_preset, help="student preset")
    parser.add_argument("--layerwise-steps", type=int, default=plan.layerwise_steps)
    parser.add_argument("--pd-steps", type=int, default=plan.pd_steps)
    parser.add_argument("--max-seq-length", type=int, default=plan.max_seq_length)
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--task-train", type=int, default=plan.task_train, help="training examples per task")
    parser.add_argument("--task-dev", type=int, default=plan.task_dev, help="dev examples per task")
    parser.add_argument("--epochs", type=float, default=plan.epochs,
                        help="fine-tuning epochs (builtin-qa: its family's)")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, as in `mobilebert demo`")
    args = parser.parse_args(argv)
    if not (Path(args.teacher) / "config.json").is_file():
        print(f"ablation: error: no teacher checkpoint at {args.teacher} (run `make demo` or `mobilebert "
              "pretrain` first)", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = dataclasses.replace(plan, student_preset=args.student, layerwise_steps=args.layerwise_steps,
                               pd_steps=args.pd_steps, max_seq_length=args.max_seq_length, task_train=args.task_train,
                               task_dev=args.task_dev, epochs=args.epochs)
    tasks = write_builtin_tasks(out / "tasks", BuiltinSizes(plan.task_train, plan.task_dev, qa_train=plan.qa_train))
    # (results key, seed, run name, budget): budget 1 keeps the names of earlier single-budget ablations.
    runs = [(strategy if b == 1 else f"{strategy}@{b}x", seed, f"{strategy}-seed{seed}" if b == 1 else
             f"{strategy}-x{b}-seed{seed}", b) for b in args.budgets for strategy in args.strategies
            for seed in args.seeds]

    def student(key: str, seed: int, budget: int):
        sized = dataclasses.replace(plan, layerwise_steps=plan.layerwise_steps * budget, seed=seed)
        if key.startswith("none"):
            return partial(scratch_work, sized, args.teacher, out / "cache")
        return partial(student_work, sized, args.teacher, out / "cache", strategy=key.partition("@")[0])

    students = run_stages(out, [(name, student(key, seed, b)) for key, seed, name, b in runs], args.workers)
    tuned = run_stages(out, [(f"{name}-finetune/{task}", partial(finetune_work, dataclasses.replace(plan, seed=seed),
                                                                 students[name]["model"], tasks, task))
                             for _, seed, name, _ in runs for task in args.tasks], args.workers)
    results: dict[str, list[dict]] = {}
    for key, _, name, _ in runs:
        results.setdefault(key, []).append({
            "model": students[name]["model"], "pretraining": final_validation(out / name),
            "tasks": {task: tuned[f"{name}-finetune/{task}"] for task in args.tasks}})

    header, rows, stats = summarise(results, args.tasks)
    from mobilebert.tables import format_table

    steps = f"{args.layerwise_steps} layer-wise + {args.pd_steps} PD steps (no distillation: " \
            f"{args.layerwise_steps + args.pd_steps} MLM+NSP steps)" + \
        "".join(f"; {b}x: {b * args.layerwise_steps} layer-wise steps" for b in args.budgets if b != 1)
    conditions = (f"teacher {args.teacher}; student {args.student}; {steps}; seeds {args.seeds}; fine-tuning "
                  f"{args.epochs:g} epochs on {args.task_train} examples per task, dev {args.task_dev}")
    table = format_table(header, rows)
    (out / "results.md").write_text(f"# Knowledge-transfer ablation\n\n{conditions}\n\n{table}\n\n![](ablation.png)\n")
    (out / "results.json").write_text(json.dumps({"conditions": conditions, "runs": results, "stats": stats},
                                                 indent=2) + "\n")
    plot(stats, args.tasks, out / "ablation.png", f"{args.student}: mean ± std over seeds {args.seeds}")
    print(table)
    print(f"\nwritten: {out / 'results.md'}, {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
