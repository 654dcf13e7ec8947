"""Accuracy of every reduced-precision backend against fp32, on a demo run's fine-tuned task models.

For each built-in task, the distilled student's fine-tuned model (`RUN/finetune-student/<task>/final`) is scored on
the task's validation split (`RUN/tasks/<task>`) by the official metric, run as eager fp32 and as each
reduced-precision backend of `deploy/backends.BACKENDS` asked for (`--paths`; by default bf16 optimized, bf16
compiled (compiles per new input shape: a minute or two per task), ONNX Runtime dynamic int8 of the optimized
graph, the ExecuTorch int8 program (one sequence of the task's length per call; needs the `mobile` extra) and the
LiteRT int8 model (one signature of the task's length; needs the `tflite` extra)). Prints a table of scores and
each backend's largest drop from eager fp32 in points (GLUE-style fractions × 100; SQuAD-style scores are
percentages already), then one JSON line.

    python benchmarks/reduced_precision_accuracy.py --run runs/demo
    python benchmarks/reduced_precision_accuracy.py --run runs/demo --paths compiled-bf16 --tasks builtin-order
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mobilebert.data.builtin_tasks import BUILTIN_TASKS
from mobilebert.data.tasks import get_task
from mobilebert.deploy.backends import BACKENDS, task_model
from mobilebert.finetuning import TaskSettings, load_model, load_split, predict, score
from mobilebert.tables import format_table
from mobilebert.tokenizer import Tokenizer

# Every backend of the table that computes in bf16 or int8 and scores a task model (deploy/backends.task_model).
REDUCED = [name for name, spec in BACKENDS.items()
           if spec.precision != "fp32" and not spec.calibrated and not spec.reference]
DEFAULT = ["bf16", "compiled-bf16", "onnx-int8", "executorch-int8", "tflite-int8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a `mobilebert demo` output folder")
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--paths", nargs="+", default=DEFAULT, choices=REDUCED,
                        help=f"reduced-precision backends (default: {' '.join(DEFAULT)}); eager fp32 always runs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, paths = Path(args.run), ["eager", *args.paths]
    scores: dict[str, dict[str, dict[str, float]]] = {}
    points: dict[str, float] = {}  # a metric's unit in points
    for name in args.tasks:
        model_dir = run / "finetune-student" / name / "final"
        if not model_dir.is_dir():
            raise SystemExit(f"{model_dir}: no fine-tuned model (run `mobilebert demo --out {run}` first)")
        task, settings = get_task(name), TaskSettings()
        model = load_model(task, str(model_dir)).eval()
        tokenizer = Tokenizer.from_pretrained(model_dir)
        dev = load_split(task, "validation", str(run / "tasks" / name), tokenizer, settings, training=False)
        scores[name], points[name] = {}, 1.0 if task.kind == "qa" else 100.0
        for path in paths:
            with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
                runnable = task_model(path, model, Path(tmp), settings.seq_length(task), torch.get_num_threads())
                scores[name][path] = score(dev, predict(runnable, dev, tokenizer, settings), settings)
            print(f"{name} {path}: {scores[name][path]}", flush=True)
    rows = []
    for name, by_path in scores.items():
        for metric in by_path["eager"]:
            rows.append([name, metric, *[f"{by_path[p][metric]:.4f}" for p in paths]])
    print(format_table(["task", "metric", *paths], rows))
    drops = {p: max(points[t] * (by_path["eager"][m] - by_path[p][m]) for t, by_path in scores.items()
                    for m in by_path["eager"]) for p in args.paths}
    print("largest drop from eager fp32, in points: " + ", ".join(f"{p} {d:.2f}" for p, d in drops.items()))
    print(json.dumps({"scores": scores, "largest_drop_points": drops}))


if __name__ == "__main__":
    main()
