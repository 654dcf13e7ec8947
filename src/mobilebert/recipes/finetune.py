"""`mobilebert finetune`: fine-tune any MobileBERT checkpoint on a GLUE task, SQuAD or a built-in task.

The paper fine-tunes like BERT with a small search (docs/finetuning.md): every combination of the `search` lists
(learning rate × batch size × epochs) is trained with every seed, each trial in its own run folder; the best
trial by the task's main dev metric becomes OUT/final, and its test-set predictions become leaderboard files.
Small tasks vary by a few points across seeds, so the table reports the mean and spread of each combination.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mobilebert.checkpoint import resolve
from mobilebert.data.glue import write_submission
from mobilebert.data.squad import write_predictions
from mobilebert.data.tasks import Task, get_task
from mobilebert.distill.task import TaskDistillOptions, TaskTeacher, check_teacher
from mobilebert.errors import UserError
from mobilebert.files import atomic_write, check_overwritable, json_text, remove_output_folder
from mobilebert.finetuning import (
    TaskData,
    TaskSettings,
    check_length,
    constant_baseline,
    load_model,
    load_split,
    make_batch,
    predict,
    qa_answers,
    score,
    task_counts,
    task_loss_sums,
    write_finetuning_record,
)
from mobilebert.recipes.config import check_resume, load_config, save_config
from mobilebert.tables import format_table
from mobilebert.tokenizer import Tokenizer
from mobilebert.train.loop import Distributed, Engine, TrainOptions, micro_batches, setup_distributed
from mobilebert.train.rundir import RunDir


@dataclass
class ModelOptions:
    checkpoint: str | None = None  # a checkpoint folder (e.g. runs/student/final) or a hub id
    # Quantization-aware fine-tuning: every Linear trains through int8 rounding and ReLU becomes ReLU6 (the official
    # int8 recipe); OUT/final is a plain checkpoint with hidden_act relu6, for `mobilebert export --format onnx-int8`.
    qat: bool = False


@dataclass
class TaskOptions:
    name: str = "builtin-order"
    data_dir: str | None = None  # GLUE TSV folder / SQuAD JSON folder; None: the hub (built-in: generated)
    max_seq_length: int | None = None  # None: the family's (GLUE 128, SQuAD 384)
    doc_stride: int | None = None
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    max_train_examples: int | None = None  # quick trials
    max_eval_examples: int | None = None
    eval_batch_size: int = 64

    def settings(self) -> TaskSettings:
        return TaskSettings(self.max_seq_length, self.doc_stride, self.max_query_length, self.n_best_size,
                            self.max_answer_length, self.null_score_diff_threshold)


@dataclass
class SearchOptions:
    """Every combination is trained with every seed. Empty lists: the task family's default (one value)."""

    lr: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    warmup_ratio: float = 0.1


def _finetune_train() -> TrainOptions:
    return TrainOptions(optimizer="adamw", weight_decay=0.01, eps=1e-6, checkpoint_every=1000, log_every=10)


@dataclass
class FinetuneOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    task: TaskOptions = field(default_factory=TaskOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    distill: TaskDistillOptions = field(default_factory=TaskDistillOptions)  # with a fine-tuned teacher
    train: TrainOptions = field(default_factory=_finetune_train)  # lr, batch_size, steps: set by `search`


@dataclass(frozen=True)
class Trial:
    lr: float
    batch_size: int
    epochs: float
    seed: int

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-bs{self.batch_size}-ep{self.epochs:g}-seed{self.seed}"


def trials(search: SearchOptions, task: Task) -> list[Trial]:
    family = task.family
    grid = itertools.product(search.lr or [family.lr], search.batch_size or [family.batch_size],
                             search.epochs or [family.epochs], search.seeds or [0])
    return [Trial(float(lr), int(bs), float(ep), int(seed)) for lr, bs, ep, seed in grid]


def _check_train_section(train: TrainOptions) -> None:
    default = _finetune_train()
    for name in ("lr", "batch_size", "steps"):
        if getattr(train, name) != getattr(default, name):
            key = {"steps": "epochs"}.get(name, name)
            raise UserError(f"finetune sets train.{name} itself: use search.{key} (a list: the values to try)")


class EpochOrder:
    """Rows of step s: epochs are seeded permutations laid end to end, so a batch is a pure function of
    (seed, step) and a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self._epoch, self._perm = -1, np.arange(n)

    def rows(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)[self.rank::self.world_size]
        out = np.empty(len(positions), dtype=np.int64)
        for i, p in enumerate(positions):
            epoch = int(p // self.n)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out[i] = self._perm[p % self.n]
        return out


def run_trial(trial: Trial, options: FinetuneOptions, task: Task, tokenizer: Tokenizer, train: TaskData,
              dev: list[TaskData], run: RunDir, dist: Distributed, resume: bool,
              teacher: TaskTeacher | None = None) -> dict[str, float]:
    """Train one trial into `run` and return its dev metrics (also in run/results.json); with `teacher`, the loss
    is task distillation's."""
    settings = options.task.settings()
    steps = max(1, math.ceil(trial.epochs * len(train) / trial.batch_size))
    train_options = dataclasses.replace(options.train, lr=trial.lr, batch_size=trial.batch_size, steps=steps,
                                        warmup_steps=round(options.search.warmup_ratio * steps), seed=trial.seed)
    torch.manual_seed(trial.seed)
    model = load_model(task, options.model.checkpoint)
    if task.kind == "regression":
        start_at_label_mean(model, train)
    if options.model.qat:
        from mobilebert.train.qat import prepare_qat

        model = prepare_qat(model)
    engine = Engine(model, train_options, run, dist, tokenizer=tokenizer,
                    evaluate=lambda: dev_scores(model, dev, tokenizer, settings, options.task.eval_batch_size,
                                                dist.device))
    order = EpochOrder(len(train), trial.batch_size, trial.seed, dist.rank, dist.world_size)
    counts, sums = (teacher.counts, teacher.sums) if teacher else (task_counts, task_loss_sums)
    for step in engine.steps(resume=resume):
        rows = order.rows(step)
        batch = make_batch(train, rows, tokenizer, settings)
        if teacher:
            batch = teacher.add_outputs(batch, rows)
        engine.step(micro_batches(batch, train_options.micro_batch_size), counts, sums)
    engine.finish()
    results = engine.last_evaluation
    if dist.is_main:
        atomic_write(run.root / "results.json", lambda p: p.write_text(json_text(results) + "\n"))
    return results


@torch.no_grad()
def start_at_label_mean(model: torch.nn.Module, train: TaskData) -> None:
    """A new regression head starts at the training labels' mean instead of 0: with 0..5 targets (STS-B) a head
    starting at 0 spends its first hundreds of steps learning the offset. A trained head is left alone."""
    head = model.classifier
    if torch.count_nonzero(head.bias) == 0:  # freshly initialised (biases start at exactly zero)
        head.bias.fill_(sum(ex.label for ex in train.texts) / len(train.texts))


def dev_scores(model: torch.nn.Module, dev: list[TaskData], tokenizer: Tokenizer, settings: TaskSettings,
               batch_size: int, device: torch.device) -> dict[str, float]:
    """Metrics of every dev split; the first split's keep plain names, others are prefixed `split/`."""
    results = {}
    for i, data in enumerate(dev):
        metrics = score(data, predict(model, data, tokenizer, settings, batch_size, device), settings)
        results.update({(k if i == 0 else f"{data.split}/{k}"): v for k, v in metrics.items()})
    return results


RUN_MARKERS = ("config.yaml", "results.json", "trials")  # what a fine-tuning run folder holds


def main(args: argparse.Namespace) -> int:
    shorthand = [(key, getattr(args, name, None)) for name, key in (("checkpoint", "model.checkpoint"),
                                                                   ("task", "task.name"),
                                                                   ("teacher", "distill.teacher"))]
    options = load_config(FinetuneOptions, args.config,
                          args.overrides + [a for key, value in shorthand if value for a in (f"--{key}", value)])
    if not options.model.checkpoint:
        raise UserError("no model: pass --checkpoint DIR (or a hub id such as google/mobilebert-uncased)")
    _check_train_section(options.train)
    task = get_task(options.task.name)
    if task.name == "ax":
        raise UserError("ax is a diagnostic test set without training data: fine-tune mnli, whose run writes "
                        "AX.tsv predictions too")
    out = Path(args.out)
    if args.overwrite:  # checked before any work; deleted once everything has been read
        check_overwritable(out, RUN_MARKERS, "a fine-tuning run folder")
    if args.resume:
        check_resume(out, options, finished=(out / "results.json").is_file())
    if (out / "results.json").is_file() and not args.overwrite:
        if args.resume:
            print(f"{out / 'results.json'} is already complete; nothing to do")
            return 0
        raise UserError(f"{out} holds a finished fine-tuning run: pass --overwrite to replace it "
                        f"or --resume to continue it")
    if (out / "trials").is_dir() and not (args.resume or args.overwrite):
        raise UserError(f"{out} holds an unfinished fine-tuning run: pass --resume to continue it or --overwrite "
                        f"to start again")
    settings, limit = options.task.settings(), options.task.max_eval_examples
    check_length(task, settings, options.model.checkpoint)  # everything is checked and read before writing
    tokenizer = Tokenizer.from_pretrained(resolve(options.model.checkpoint))
    train = load_split(task, "train", options.task.data_dir, tokenizer, settings, training=True,
                       limit=options.task.max_train_examples)
    dev = [load_split(task, split, options.task.data_dir, tokenizer, settings, training=False, limit=limit)
           for split in task.dev_splits]
    if options.distill.teacher:
        check_teacher(options.distill, task, settings, options.model.checkpoint, tokenizer)
    dist = setup_distributed(options.train.device)
    if dist.is_main:
        if args.overwrite:
            remove_output_folder(out, RUN_MARKERS, "a fine-tuning run folder")
        out.mkdir(parents=True, exist_ok=True)
        save_config(options, out / "config.yaml")
    dist.barrier()
    if dist.is_main:
        print(f"fine-tuning {options.model.checkpoint} on {task.name}: {len(train)} training rows, "
              f"{', '.join(f'{len(d)} {d.split}' for d in dev)}")
    teacher = None
    if options.distill.teacher:
        teacher = TaskTeacher(options.distill, task, options.model.checkpoint, dist.device)
        if teacher.cached:
            teacher.cache_outputs(train, tokenizer, settings, options.task.eval_batch_size, dist.device, out,
                                  write=dist.is_main)
    results = []
    for trial in trials(options.search, task):
        run = RunDir(out / "trials" / trial.name, dist.is_main)
        done = run.root / "results.json"
        if done.is_file():
            metrics = {k: math.nan if v is None else v for k, v in json.loads(done.read_text()).items()}
        else:
            run.prepare(resume=True, overwrite=False)
            metrics = run_trial(trial, options, task, tokenizer, train, dev, run, dist, resume=True, teacher=teacher)
        results.append({**dataclasses.asdict(trial), "metrics": metrics})
        if dist.is_main:
            print(f"{trial.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if dist.is_main:
        summary = summarise(task, results, constant_baseline(train, dev[0]))
        best_dir = out / "trials" / summary["best"]["name"] / "final"
        write_finetuning_record(best_dir, task, settings)
        _publish(best_dir, out / "final")
        summary["test_predictions"] = _predict_test(task, options, best_dir, tokenizer, dev[0], out)
        _write_results(out, summary)
        print(summary["table"])
        print(f"best: {summary['best']['name']} ({task.metrics[0]} {summary['best']['metrics'][task.metrics[0]]:.4g})"
              f"; model in {out / 'final'}")
    dist.barrier()
    return 0


def summarise(task: Task, results: list[dict], baseline: dict[str, float]) -> dict:
    """Best trial by the main metric; mean and spread over seeds of each (lr, batch size, epochs)."""
    main_metric = task.metrics[0]
    best = max(results, key=lambda r: r["metrics"][main_metric])
    best = {**best, "name": Trial(best["lr"], best["batch_size"], best["epochs"], best["seed"]).name}
    rows, groups = [], itertools.groupby(results, key=lambda r: (r["lr"], r["batch_size"], r["epochs"]))
    for (lr, bs, ep), group in groups:
        group = list(group)
        row = [f"{lr:g}", str(bs), f"{ep:g}", str(len(group))]
        for metric in task.metrics:
            values = [r["metrics"][metric] for r in group if metric in r["metrics"]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row.append(f"{statistics.mean(values):.4f} ± {spread:.4f}" if values else "-")
        rows.append(row)
    if baseline:
        rows.append(["constant baseline", "", "", "", *(f"{baseline.get(m, float('nan')):.4f}" for m in task.metrics)])
    table = format_table(["lr", "batch", "epochs", "seeds", *task.metrics], rows)
    return {"task": task.name, "main_metric": main_metric, "trials": results, "best": best,
            "baseline": baseline, "table": table}


def _publish(best_dir: Path, final: Path) -> None:
    tmp = final.with_name(".final.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best_dir, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)


def _predict_test(task: Task, options: FinetuneOptions, model_dir: Path, tokenizer: Tokenizer, dev: TaskData,
                  out: Path) -> list:
    """Leaderboard files of the best model for every test split that has data; dev answers for SQuAD."""
    settings, written = options.task.settings(), []
    model = load_model(task, str(model_dir))
    if task.kind == "qa":
        answers = qa_answers(dev, predict(model, dev, tokenizer, settings, options.task.eval_batch_size), settings)
        write_predictions(out / "predictions.json", answers.predictions)
        written.append(str(out / "predictions.json"))
        if task.squad_version == "2.0":
            write_predictions(out / "null_odds.json", answers.null_odds)
            written.append(str(out / "null_odds.json"))
        return written
    # The leaderboard's AX diagnostic is predicted by the MNLI model.
    targets = [(task, split) for split in task.test_splits] + ([(get_task("ax"), "test")] if task.name == "mnli"
                                                               else [])
    for target, split in targets:
        try:
            data = load_split(target, split, options.task.data_dir, tokenizer, settings, training=False)
        except UserError as e:
            print(f"no {target.name} {split} predictions: {e}")
            continue
        logits = predict(model, data, tokenizer, settings, options.task.eval_batch_size)
        preds = logits if task.kind == "regression" else logits.argmax(-1)
        written.append(str(write_submission(target.glue.name, split, preds.tolist(), out / "submission")))
    return written


def _write_results(out: Path, summary: dict) -> None:
    text = json_text({k: v for k, v in summary.items() if k != "table"}) + "\n"
    atomic_write(out / "results.md", lambda p: p.write_text(f"# {summary['task']}\n\n{summary['table']}\n"))
    atomic_write(out / "results.json", lambda p: p.write_text(text))
