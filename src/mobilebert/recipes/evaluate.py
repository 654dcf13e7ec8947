"""`mobilebert evaluate` (dev-set metrics of any checkpoint) and `mobilebert squad-eval` (official SQuAD scoring)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from mobilebert.checkpoint import resolve
from mobilebert.data.tasks import get_task
from mobilebert.errors import UserError
from mobilebert.files import json_text
from mobilebert.finetuning import (
    TaskSettings,
    load_model,
    load_split,
    predict,
    recorded_settings,
    score,
    settings_from_record,
)
from mobilebert.metrics import squad_eval_file
from mobilebert.tables import format_table
from mobilebert.tokenizer import Tokenizer


def evaluate_checkpoint(checkpoint: str, task_name: str, split: str | None = None, data_dir: str | None = None,
                        settings: TaskSettings | None = None, batch_size: int = 64,
                        limit: int | None = None) -> dict[str, float]:
    """The task's official metrics of a fine-tuned checkpoint on a labelled split (default: the first dev split)."""
    task, settings = get_task(task_name), settings or TaskSettings()
    split = split or (task.dev_splits[0] if task.dev_splits else None)
    if split is None or split in task.test_splits:
        dev = f"score a dev split ({', '.join(task.dev_splits)})" if task.dev_splits else "it has no labelled split"
        raise UserError(f"{task.name} {split or 'test'}: a test split has no labels to score; {dev}; "
                        "`mobilebert finetune` writes test predictions in the leaderboard's format")
    tokenizer = Tokenizer.from_pretrained(resolve(checkpoint))
    data = load_split(task, split, data_dir, tokenizer, settings, training=False, limit=limit)
    model = load_model(task, checkpoint)
    return score(data, predict(model, data, tokenizer, settings, batch_size), settings)


def main(args: argparse.Namespace) -> int:
    # How the checkpoint was fine-tuned on this task gives the defaults (a record of another task gives none).
    recorded = recorded_settings(args.checkpoint)
    settings = settings_from_record(recorded if recorded.get("task") == get_task(args.task).name else {})
    settings = dataclasses.replace(settings, max_seq_length=args.max_seq_length or settings.max_seq_length,
                                   doc_stride=args.doc_stride or settings.doc_stride)
    began = time.perf_counter()
    metrics = evaluate_checkpoint(args.checkpoint, args.task, args.split, args.data_dir, settings, args.batch_size,
                                  args.max_examples)
    print(format_table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in metrics.items()]))
    print(f"{args.task} {args.split or 'dev'} scored in {time.perf_counter() - began:.1f}s")
    print(json_text({"task": args.task, "checkpoint": args.checkpoint, **metrics}, indent=None))
    return 0


def squad_eval_main(args: argparse.Namespace) -> int:
    print(json.dumps(squad_eval_file(args.data, args.predictions, args.na_prob_file, args.na_prob_thresh)))
    return 0
