"""The demo's last stages (int8 + ONNX export of the distilled student's task models, the benchmark) and its report.

Every number in the report is read back from the files the run wrote (metrics.jsonl, results.json, stage.json,
deploy.json, bench.json), so the report can be rebuilt at any time and a test can check it against them.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mobilebert.checkpoint import read_config
from mobilebert.data.builtin_tasks import BUILTIN_TASKS
from mobilebert.files import atomic_write
from mobilebert.stats import count_flops, count_parameters
from mobilebert.tables import format_table
from mobilebert.train.rundir import read_metrics

LABELS = {"teacher": "teacher (IB-BERT)", "student": "MobileBERT, distilled (PKT)",
          "student-kd": "MobileBERT, distilled + task KD", "scratch": "MobileBERT, no distillation",
          "int8": "MobileBERT distilled, ONNX int8", "bf16": "MobileBERT distilled, optimized bf16"}
FINETUNED_MODELS = ("teacher", "student", "student-kd", "scratch")  # fine-tuned from pre-training, in row order


# ---- stages ----

def deploy_stage(plan, out: Path) -> Callable[[Path], dict]:
    """Export each of the distilled student's task models to ONNX fp32 and int8; score the int8 model and the
    optimized model in bf16."""

    def work(folder: Path) -> dict:
        from mobilebert.data.tasks import get_task
        from mobilebert.deploy.backends import task_model
        from mobilebert.finetuning import (
            load_model,
            load_split,
            predict,
            recorded_settings,
            score,
            settings_from_record,
        )
        from mobilebert.tokenizer import Tokenizer

        results = {}
        for name in BUILTIN_TASKS:
            model_dir = out / "finetune-student" / name / "final"
            task = get_task(name)
            settings = settings_from_record(recorded_settings(str(model_dir)))  # the lengths it was fine-tuned with
            model = load_model(task, str(model_dir))
            tokenizer = Tokenizer.from_pretrained(model_dir)
            dev = load_split(task, "validation", str(out / "tasks" / name), tokenizer, settings, training=False)
            int8 = task_model("onnx-int8", model, folder / name, settings.seq_length(task), torch.get_num_threads())
            bf16 = task_model("bf16", model, folder / name, settings.seq_length(task))
            results[name] = {"metrics": score(dev, predict(int8, dev, tokenizer, settings), settings),
                             "fp32_bytes": (folder / name / "model.onnx").stat().st_size,
                             "int8_bytes": (folder / name / "model-int8.onnx").stat().st_size,
                             "bf16_metrics": score(dev, predict(bf16, dev, tokenizer, settings), settings)}
        return {"tasks": results}

    return work


def bench_stage(plan, out: Path) -> Callable[[Path], dict]:
    def work(folder: Path) -> dict:
        from mobilebert.config import preset
        from mobilebert.deploy.bench import plot, run_bench

        report = run_bench(preset(plan.bench_preset), list(plan.bench_backends), threads=2, batch=1,
                           seq=min(128, preset(plan.bench_preset).max_position_embeddings), warmup=2,
                           repetitions=plan.bench_repetitions, memory=plan.bench_memory)
        atomic_write(folder / "bench.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
        plot(report, folder / "bench.png")
        return {"preset": plan.bench_preset}

    return work


# ---- report ----

def write_report(out: Path, records: dict[str, Any]) -> Path:
    """report.md, report.html (self-contained: plots inlined) and the PNG plots under out/report/."""
    import matplotlib

    matplotlib.use("Agg")
    plots = out / "report"
    plots.mkdir(exist_ok=True)
    sections = [
        "# MobileBERT demo report",
        _stages(records),
        _sizes(out),
        _pretraining(out, plots),
        _transfer(out, plots),
        _tasks(out, records, plots),
        _speed(out, plots),
        _machine(out),
    ]
    markdown = "\n\n".join(s for s in sections if s) + "\n"
    atomic_write(out / "report.md", lambda p: p.write_text(markdown))
    atomic_write(out / "report.html", lambda p: p.write_text(to_html(markdown, out)))
    return out / "report.md"


def _stages(records: dict[str, Any]) -> str:
    """Seconds per stage (a model's fine-tuning: the sum of its four task runs) and the wall clock."""
    rows = [[name, f"{r.get('task_seconds', r['seconds']):.0f}"] for name, r in records.items()
            if isinstance(r, dict) and "seconds" in r and name != "run"]
    total = sum(float(r[1]) for r in rows)
    table = format_table(["stage", "seconds"], [*rows, ["sum of stages", f"{total:.0f}"]])
    run = records.get("run", {})
    note = ""
    if run:
        parallel = f"{run['workers']} stages at a time, each as soon as what it needs is done, so the wall clock " \
                   f"is below the sum" if run["workers"] > 1 else "one stage at a time"
        skipped = f"; {run['skipped']} stage(s) finished earlier were skipped" if run["skipped"] else ""
        note = f"\n\nWall clock of this invocation: {run['seconds']:.0f} s ({parallel}{skipped})."
    seed = records.get("plan", {}).get("seed", 0)
    note += f"\n\nSeed {seed} of every training run and fine-tuning (`mobilebert demo --seed`)."
    return "## What ran\n\n" + table + note


def _sizes(out: Path) -> str:
    rows = []
    for model in ("teacher", "student"):
        folder = out / model / "final"
        cfg = read_config(folder)
        rows.append([LABELS[model], f"{count_parameters(cfg) / 1e6:.2f}M", f"{count_flops(cfg, 128) / 1e9:.2f}G",
                     f"{(folder / 'model.safetensors').stat().st_size / 1e6:.1f}"])
    return "## Models\n\nBackbone parameters, FLOPs of one 128-token sequence, and the checkpoint's size.\n\n" + \
        format_table(["model", "parameters", "FLOPs", "MB on disk"], rows)


def final_validation(run: Path) -> dict[str, float]:
    """The last validation record of a run's metrics.jsonl."""
    records = [r for r in read_metrics(run / "metrics.jsonl") if r.get("split") == "validation"]
    return records[-1] if records else {}


def _pretraining(out: Path, plots: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for model, key in (("teacher", "mlm"), ("scratch", "mlm"), ("student", "mlm")):
        records = [r for r in read_metrics(out / model / "metrics.jsonl") if key in r and "split" not in r]
        if records:
            ax.plot([r["step"] for r in records], [r[key] for r in records], label=f"{LABELS[model]}: {key} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-LM cross-entropy (train)")
    ax.legend(fontsize=8)
    _save(fig, plots / "losses.png")
    rows = []
    for model in ("teacher", "student", "scratch"):
        v = final_validation(out / model)
        rows.append([LABELS[model], v.get("step", "-"), f"{v.get('mlm_accuracy', float('nan')):.4f}",
                     f"{v.get('mlm_majority_accuracy', float('nan')):.4f}",
                     f"{v.get('nsp_accuracy', float('nan')):.4f}"])
    return ("## Pre-training\n\nHeld-out masked-LM accuracy at the end of each run (the student's steps are "
            "distillation steps; the undistilled student trained as many).\n\n"
            + format_table(["model", "step", "MLM accuracy", "commonest-token accuracy", "NSP accuracy"], rows)
            + "\n\n![losses](report/losses.png)")


def _transfer(out: Path, plots: Path) -> str:
    import matplotlib.pyplot as plt

    records = read_metrics(out / "student" / "metrics.jsonl")
    layers = sorted({int(k.split("/")[1]) for r in records for k in r if k.startswith("fmt/")})
    if not layers:
        return ""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for layer in layers:
        points = [(r["step"], r[f"fmt/{layer}"]) for r in records if f"fmt/{layer}" in r]
        ax.plot(*zip(*points, strict=True), label=f"layer {layer}")
    ax.set_yscale("log")
    ax.set_xlabel("step (one PKT phase per layer)")
    ax.set_ylabel("feature-map transfer loss")
    ax.legend(fontsize=8, ncol=3)
    _save(fig, plots / "transfer.png")
    rows = []
    for layer in layers:
        points = [r[f"fmt/{layer}"] for r in records if f"fmt/{layer}" in r]
        rows.append([str(layer), f"{points[0]:.4g}", f"{points[-1]:.4g}"])
    return ("## Progressive knowledge transfer\n\nFeature-map loss of each layer during its phase (first and last "
            "logged value).\n\n" + format_table(["layer", "first", "last"], rows)
            + "\n\n![transfer](report/transfer.png)")


def _tasks(out: Path, records: dict[str, Any], plots: Path) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    scores: dict[str, dict[str, float]] = {}
    baseline: dict[str, float] = {}
    metric_of: dict[str, str] = {}
    for model in FINETUNED_MODELS:
        for task in BUILTIN_TASKS:
            # Task KD runs on the tasks the plan names, if any (and runs from before it have no folder for it).
            if not (out / f"finetune-{model}" / task / "results.json").is_file():
                continue
            summary = json.loads((out / f"finetune-{model}" / task / "results.json").read_text())
            metric = metric_of.setdefault(task, summary["main_metric"])
            scores.setdefault(model, {})[task] = summary["best"]["metrics"][metric]
            value = summary["baseline"].get(metric, 0.0) if summary["baseline"] else 0.0
            baseline[task] = float("nan") if value is None else value  # null in results.json: undefined
    deploy = json.loads((out / "deploy" / "stage.json").read_text())["tasks"]
    scores["int8"] = {task: deploy[task]["metrics"][metric_of[task]] for task in BUILTIN_TASKS}
    if all("bf16_metrics" in deploy[task] for task in BUILTIN_TASKS):  # runs before bf16 was scored lack it
        scores["bf16"] = {task: deploy[task]["bf16_metrics"][metric_of[task]] for task in BUILTIN_TASKS}
    header = ["model", *[f"{t} ({metric_of[t]})" for t in BUILTIN_TASKS]]
    rows = [[LABELS[m], *[f"{scores[m][t]:.4f}" if t in scores[m] else "-" for t in BUILTIN_TASKS]] for m in scores]
    rows.append(["constant baseline", *[f"{baseline[t]:.4f}" if baseline[t] == baseline[t] else "undefined"
                                        for t in BUILTIN_TASKS]])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = np.arange(len(BUILTIN_TASKS))
    for i, model in enumerate(scores):
        width = 0.8 / len(scores)
        ax.bar(x + (i - (len(scores) - 1) / 2) * width,
               [_unit(scores[model].get(t, float("nan")), metric_of[t]) for t in BUILTIN_TASKS], width,
               label=LABELS[model])
    ax.set_xticks(x, [f"{t}\n({metric_of[t]})" for t in BUILTIN_TASKS], fontsize=8)
    ax.set_ylabel("dev score (0-1)")
    ax.legend(fontsize=7)
    _save(fig, plots / "tasks.png")
    noise = near_chance(scores, baseline, metric_of, records.get("plan", {}).get("task_dev"))
    seed = records.get("plan", {}).get("seed", 0)
    return ("## Built-in tasks\n\nDev scores after fine-tuning (SQuAD-style scores in percent, others as "
            f"fractions), one fine-tuning run per model and task (seed {seed}): a gap between two models smaller "
            "than the spread between seeds is not a finding (`mobilebert demo --seed N` is another draw; "
            "docs/finetuning.md, \"Other seeds\", has three). Task KD: the distilled student fine-tuned with the "
            "fine-tuned teacher's outputs as soft targets (`finetune --teacher`, β 0.5), on the tasks the plan "
            "names (-: not run). The int8 row is the distilled student's task models run by ONNX Runtime after "
            "dynamic int8 quantization, the bf16 row the same models through `optimize_for_inference` in bfloat16.\n\n"
            + format_table(header, rows) + noise + "\n\n![tasks](report/tasks.png)")


def chance_band(metric: str, n: int) -> float | None:
    """Two standard errors of `metric` over n balanced dev examples for answers that ignore the input: accuracy
    2·√(0.25/n); a correlation (Matthews, Pearson, Spearman) 2/√n. None for the others (SQuAD's scores)."""
    if metric == "accuracy":
        return 2 * (0.25 / n) ** 0.5
    if metric in ("matthews", "pearson", "spearman"):
        return 2 / n ** 0.5
    return None


def near_chance(scores: dict[str, dict[str, float]], baseline: dict[str, float], metric_of: dict[str, str],
                n: int | None) -> str:
    """A paragraph naming the pre-trained models whose fine-tuned score on a task is within `chance_band` of the
    constant baseline: nothing tells them from input-blind answers there (empty when there are none)."""
    found = []
    for task, metric in metric_of.items():
        band = chance_band(metric, n) if n else None
        if band is None or baseline[task] != baseline[task]:
            continue
        near = [LABELS[m] for m in FINETUNED_MODELS
                if task in scores.get(m, {}) and abs(scores[m][task] - baseline[task]) <= band]
        if near:
            found.append(f"{task} ({metric} {baseline[task]:.2f} ± {band:.3f}): {', '.join(near)}")
    if not found:
        return ""
    return (f"\n\nWithin two standard errors of the constant baseline on the {n} dev examples, so not told apart "
            f"from answers that ignore the input: {'; '.join(found)}. Where the teacher is among them, how a "
            "student compares with it on that task is noise.")


def _unit(value: float, metric: str) -> float:
    return value / 100 if metric in ("exact_match", "f1", "exact") else value


def _speed(out: Path, plots: Path) -> str:
    from mobilebert.deploy.bench import format_results, plot

    report = json.loads((out / "bench" / "bench.json").read_text())
    plot(report, plots / "bench.png")
    deploy = json.loads((out / "deploy" / "stage.json").read_text())["tasks"]
    sizes = [[t, f"{d['fp32_bytes'] / 1e6:.2f}", f"{d['int8_bytes'] / 1e6:.2f}",
              f"{d['fp32_bytes'] / d['int8_bytes']:.1f}×"] for t, d in deploy.items()]
    return ("## Speed\n\nLatency of one sequence, a few backends on the same weights, interleaved repetitions "
            f"(preset `{json.loads((out / 'bench' / 'stage.json').read_text())['preset']}`; every backend: "
            "`mobilebert bench`).\n\n"
            + format_results(report) + "\n\n![bench](report/bench.png)\n\nONNX model sizes of the distilled "
            "student's task models:\n\n" + format_table(["task", "fp32 MB", "int8 MB", "smaller"], sizes))


def _machine(out: Path) -> str:
    report = json.loads((out / "bench" / "bench.json").read_text())
    c = report["conditions"]
    return (f"## Machine\n\n{c['cpu']}; native bf16: {c['native_bf16']}; {c['threads']} threads; Python "
            f"{platform.python_version()}; torch {c['torch']}; onnxruntime {c.get('onnxruntime', '-')}; "
            f"transformers {c.get('transformers', '-')}.")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_html(markdown: str, root: Path) -> str:
    """The report's Markdown (headings, paragraphs, tables, images) as one HTML file with images inlined."""
    parts, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                table.append(lines[i])
                i += 1
            parts.append(_html_table(table))
            continue
        if m := re.fullmatch(r"(#+) (.*)", line):
            parts.append(f"<h{len(m.group(1))}>{html.escape(m.group(2))}</h{len(m.group(1))}>")
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            data = base64.b64encode((root / m.group(2)).read_bytes()).decode()
            parts.append(f'<img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}">')
        elif line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>MobileBERT demo</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def _html_table(lines: list[str]) -> str:
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if not set(line) <= set("|-: ")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"
