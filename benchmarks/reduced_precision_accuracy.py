"""Accuracy of every reduced-precision path against fp32, on a demo run's fine-tuned task models.

For each built-in task, the distilled student's fine-tuned model (`RUN/finetune-student/<task>/final`) is scored on
the task's validation split (`RUN/tasks/<task>`) by the official metric, run as: fp32 eager, bf16 optimized
(`optimize_for_inference(dtype=torch.bfloat16)`), bf16 compiled (`compile_for_inference(dtype=torch.bfloat16)`,
which compiles per new input shape: a minute or two per task), ONNX Runtime dynamic int8 (of the optimized
graph), the ExecuTorch int8 program (XNNPACK, dynamic int8, one sequence of the task's length per call; needs
the `mobile` extra) and the LiteRT int8 model (XNNPACK, dynamic int8, one signature of the task's length; needs the
`tflite` extra). Prints a table of scores and each path's largest drop from fp32 in points (GLUE-style
fractions × 100; SQuAD-style scores are percentages already), then one JSON line.

    python benchmarks/reduced_precision_accuracy.py --run runs/demo
    python benchmarks/reduced_precision_accuracy.py --run runs/demo --paths compiled-bf16 --tasks builtin-order
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from mobilebert.data.builtin_tasks import BUILTIN_TASKS
from mobilebert.data.tasks import get_task
from mobilebert.finetuning import TaskSettings, load_model, load_split, predict, score
from mobilebert.tables import format_table
from mobilebert.tokenizer import Tokenizer


def _fp32(model, tmp: Path, length: int):
    return model


def _bf16(model, tmp: Path, length: int):
    from mobilebert.deploy.optimize import optimize_for_inference

    return optimize_for_inference(model, dtype=torch.bfloat16)


def _bf16_compiled(model, tmp: Path, length: int):
    from mobilebert.deploy.compiled import compile_for_inference

    return compile_for_inference(model, dtype=torch.bfloat16)


def _onnx_int8(model, tmp: Path, length: int):
    from mobilebert.deploy.export import OnnxModel, OnnxTaskModel, export_onnx
    from mobilebert.deploy.quantize import quantize_onnx_dynamic

    int8 = quantize_onnx_dynamic(export_onnx(model, tmp / "model.onnx"), tmp / "model-int8.onnx")
    return OnnxTaskModel(OnnxModel(int8, threads=torch.get_num_threads()))


def _executorch_int8(model, tmp: Path, length: int):
    from mobilebert.deploy.export import OnnxTaskModel
    from mobilebert.deploy.mobile import ExecutorchModel, export_executorch

    program = ExecutorchModel(export_executorch(model, tmp / "model-int8.pte", length=length, int8=True))
    return OnnxTaskModel(program)  # any exported model returning outputs by name


def _tflite_int8(model, tmp: Path, length: int):
    from mobilebert.deploy.export import OnnxTaskModel
    from mobilebert.deploy.litert import TFLiteModel, export_tflite

    return OnnxTaskModel(TFLiteModel(export_tflite(model, tmp / "model-int8.tflite", lengths=[length], int8=True)))


PATHS: dict[str, Callable] = {"fp32": _fp32, "bf16": _bf16, "compiled-bf16": _bf16_compiled,
                              "onnx-int8": _onnx_int8, "executorch-int8": _executorch_int8,
                              "tflite-int8": _tflite_int8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a `mobilebert demo` output folder")
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS), choices=list(BUILTIN_TASKS))
    parser.add_argument("--paths", nargs="+", default=[p for p in PATHS if p != "fp32"],
                        choices=[p for p in PATHS if p != "fp32"], help="reduced-precision paths (fp32 always runs)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, paths = Path(args.run), ["fp32", *args.paths]
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
                runnable = PATHS[path](model, Path(tmp), settings.seq_length(task))
                scores[name][path] = score(dev, predict(runnable, dev, tokenizer, settings), settings)
            print(f"{name} {path}: {scores[name][path]}", flush=True)
    rows = []
    for name, by_path in scores.items():
        for metric in by_path["fp32"]:
            rows.append([name, metric, *[f"{by_path[p][metric]:.4f}" for p in paths]])
    print(format_table(["task", "metric", *paths], rows))
    drops = {p: max(points[t] * (by_path["fp32"][m] - by_path[p][m]) for t, by_path in scores.items()
                    for m in by_path["fp32"]) for p in args.paths}
    print("largest drop from fp32, in points: " + ", ".join(f"{p} {d:.2f}" for p, d in drops.items()))
    print(json.dumps({"scores": scores, "largest_drop_points": drops}))


if __name__ == "__main__":
    main()
