"""The paper's knowledge-transfer ablation (Table 6: AKT, JKT, PKT), reproduced in miniature.

From one pre-trained demo teacher and one compute budget, students of the same shape are trained with PKT, JKT and
AKT and, as the baseline, with no distillation at all (plain MLM + NSP from scratch for the same number of steps);
each is fine-tuned on the built-in tasks; every (strategy, seed) pair is one run. The script writes
OUT/results.json, OUT/results.md (mean ± std over seeds) and OUT/ablation.png. The paper found
PKT ≥ JKT ≥ AKT, all above no distillation; this reports what we find.

    make demo                                              # (or any `mobilebert pretrain` teacher)
    python experiments/ablation.py --teacher runs/demo/teacher/final --out runs/ablation --seeds 0 1 2

Every run is a stage with a `stage.json` marker (as in `mobilebert demo`): an interrupted ablation resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mobilebert.data.builtin_tasks import BUILTIN_TASKS, BuiltinSizes, write_builtin_tasks
from mobilebert.recipes.demo import DemoPlan, _config, _run, run_stage

STRATEGIES = ("pkt", "jkt", "akt", "none")
LABELS = {"pkt": "PKT", "jkt": "JKT", "akt": "AKT", "none": "no distillation"}


def train_student(strategy: str, seed: int, args: argparse.Namespace, cache: Path):
    """The stage that trains one student: `mobilebert distill` or, for "none", `mobilebert pretrain`."""
    common = ["--train.seed", str(seed), "--data.cache_dir", str(cache), "--data.max_seq_length",
              str(args.max_seq_length), "--train.tensorboard", "false", "--train.log_every", "10"]
    steps = args.layerwise_steps + args.pd_steps

    def work(folder: Path) -> dict:
        if strategy == "none":
            from mobilebert.recipes.pretrain import main
            _run(main, folder, _config("teacher.yaml"), [
                "--model.preset", args.student, "--train.steps", str(steps), "--train.warmup_steps",
                str(min(50, steps // 10)), "--data.tokenizer", args.teacher, "--train.eval_every", str(steps),
                *common])
        else:
            from mobilebert.recipes.distill import main
            _run(main, folder, _config(f"distill-{strategy}.yaml"), [
                "--distill.layerwise_steps", str(args.layerwise_steps), "--distill.pd_steps", str(args.pd_steps),
                "--distill.pd_warmup_steps", str(max(args.pd_steps // 10, 1)), "--train.eval_every", str(steps),
                *common], teacher=args.teacher, student=args.student, strategy=strategy)
        return {"model": str(folder / "final"), "pretraining": last_evaluation(folder / "metrics.jsonl")}

    return work


def finetune(model: Path, seed: int, tasks: Path, args: argparse.Namespace):
    from mobilebert.recipes.finetune import main

    def work(folder: Path) -> dict:
        results = {}
        for task in args.tasks:
            _run(main, folder / task, None, [
                "--task.data_dir", str(tasks / task), "--search.epochs", f"[{args.epochs}]",
                "--search.seeds", f"[{seed}]", "--train.tensorboard", "false"], checkpoint=str(model), task=task)
            summary = json.loads((folder / task / "results.json").read_text())
            metric = summary["main_metric"]
            results[task] = {"metric": metric, "value": summary["best"]["metrics"][metric],
                             "baseline": (summary["baseline"] or {}).get(metric, 0.0)}  # QA: none computed
        return {"tasks": results}

    return work


def last_evaluation(metrics: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluations = [r for r in rows if r.get("split") == "validation"]
    return {k: v for k, v in evaluations[-1].items() if k not in ("step", "split")} if evaluations else {}


def summarise(runs: dict[str, list[dict]], tasks: list[str]) -> tuple[list[str], list[list[str]], dict]:
    """Mean ± std over seeds of every column, per strategy."""
    columns = ["mlm_accuracy", "nsp_accuracy", *tasks]
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    for strategy, seeds in runs.items():
        stats[strategy] = {}
        for column in columns:
            values = [r["pretraining"][column] if column in r["pretraining"] else r["tasks"][column]["value"]
                      for r in seeds]
            stats[strategy][column] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    metric_of = {t: runs[next(iter(runs))][0]["tasks"][t]["metric"] for t in tasks}
    header = ["student", "held-out MLM acc", "NSP acc", *[f"{t} ({metric_of[t]})" for t in tasks]]
    rows = [[LABELS[s], *[f"{m:.3f} ± {sd:.3f}" for m, sd in (stats[s][c] for c in columns)]] for s in stats]
    return header, rows, stats


def plot(stats: dict, tasks: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["mlm_accuracy", *tasks]
    names = ["held-out MLM acc", *tasks]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.0 * len(columns), 3.4))
    colours = {"pkt": "#4c72b0", "jkt": "#55a868", "akt": "#dd8452", "none": "#8c8c8c"}
    for ax, column, name in zip(axes, columns, names, strict=True):
        strategies = list(stats)
        means = [stats[s][column][0] for s in strategies]
        errors = [stats[s][column][1] for s in strategies]
        ax.bar(range(len(strategies)), means, yerr=errors, capsize=3, color=[colours[s] for s in strategies])
        ax.set_xticks(range(len(strategies)), [LABELS[s].replace("no distillation", "none") for s in strategies])
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
    parser.add_argument("--student", default=plan.student_preset, help="student preset")
    parser.add_argument("--layerwise-steps", type=int, default=plan.layerwise_steps)
    parser.add_argument("--pd-steps", type=int, default=plan.pd_steps)
    parser.add_argument("--max-seq-length", type=int, default=plan.max_seq_length)
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--task-train", type=int, default=plan.task_train, help="training examples per task")
    parser.add_argument("--task-dev", type=int, default=plan.task_dev, help="dev examples per task")
    parser.add_argument("--epochs", type=float, default=plan.epochs, help="fine-tuning epochs")
    args = parser.parse_args(argv)
    if not (Path(args.teacher) / "config.json").is_file():
        print(f"ablation: error: no teacher checkpoint at {args.teacher} (run `make demo` or `mobilebert "
              "pretrain` first)", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = write_builtin_tasks(out / "tasks", BuiltinSizes(args.task_train, args.task_dev))
    runs: dict[str, list[dict]] = {}
    for strategy in args.strategies:
        for seed in args.seeds:
            name = f"{strategy}-seed{seed}"
            student = run_stage(out, name, train_student(strategy, seed, args, out / "cache"))
            tuned = run_stage(out, f"{name}-finetune", finetune(Path(student["model"]), seed, tasks, args))
            runs.setdefault(strategy, []).append({**student, **tuned})

    header, rows, stats = summarise(runs, args.tasks)
    from mobilebert.report import format_table

    steps = f"{args.layerwise_steps} layer-wise + {args.pd_steps} PD steps (no distillation: " \
            f"{args.layerwise_steps + args.pd_steps} MLM+NSP steps)"
    conditions = (f"teacher {args.teacher}; student {args.student}; {steps}; seeds {args.seeds}; fine-tuning "
                  f"{args.epochs:g} epochs on {args.task_train} examples per task, dev {args.task_dev}")
    table = format_table(header, rows)
    (out / "results.md").write_text(f"# Knowledge-transfer ablation\n\n{conditions}\n\n{table}\n\n![](ablation.png)\n")
    (out / "results.json").write_text(json.dumps({"conditions": conditions, "runs": runs, "stats": stats},
                                                 indent=2) + "\n")
    plot(stats, args.tasks, out / "ablation.png", f"{args.student}: mean ± std over seeds {args.seeds}")
    print(table)
    print(f"\nwritten: {out / 'results.md'}, {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
