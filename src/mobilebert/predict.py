"""A fine-tuned model on new text: `Predictor` (and `mobilebert predict`, which wraps it).

The model is a fine-tuned checkpoint folder (`finetune`'s OUT/final) or a folder written by `mobilebert export`
from one. Its `finetuning.json` names the task, the label names and the sequence settings it was fine-tuned with,
so no option is needed. Examples are dicts: {"text": ..., "text_pair": ...} (the pair only for two-text tasks), or
{"question": ..., "context": ...} for extractive QA, where a long context is cut into the same overlapping windows
and answered by the same post-processing as SQuAD evaluation.

    predictor = Predictor.from_pretrained("runs/mrpc/final")
    predictor([{"text": "The cat sat.", "text_pair": "A cat was sitting."}])
    # [{"label": "1", "scores": {"0": 0.08, "1": 0.92}}]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilebert.checkpoint import read_config, resolve
from mobilebert.data.glue import TextExample
from mobilebert.data.squad import SquadExample, make_features
from mobilebert.data.tasks import Task, get_task
from mobilebert.deploy.backends import BACKENDS, FORMATS, load_exported
from mobilebert.errors import UserError
from mobilebert.finetuning import (
    FINETUNING_FILE,
    TaskData,
    TaskSettings,
    check_task_head,
    load_model,
    predict,
    qa_answers,
    recorded_settings,
    settings_from_record,
)
from mobilebert.tokenizer import Tokenizer

Example = dict[str, str]

EXPORT_RECORD = "export.json"  # written by `mobilebert export` beside the exported model


@dataclass
class Predictor:
    model: Any  # a task model, or an exported model's runtime wrapped to be called like one (`ExportedTaskModel`)
    tokenizer: Tokenizer
    task: Task
    settings: TaskSettings
    labels: list[str]
    batch_size: int = 32

    @classmethod
    def from_pretrained(cls, path: str | Path, task: str | None = None, threads: int | None = None,
                        batch_size: int = 32) -> Predictor:
        """A fine-tuned checkpoint folder or an exported model's folder; `task` only for a checkpoint without a
        fine-tuning record (e.g. one fine-tuned by transformers)."""
        folder = resolve(path)
        record = recorded_settings(str(folder))
        name = task or record.get("task")
        if not name:
            raise UserError(f"{path}: no {FINETUNING_FILE}: this is not a model fine-tuned by `mobilebert finetune` "
                            "(or exported from one); name the task of its head (`--task`, or task= in Python)")
        spec = get_task(name)
        if spec.glue is None and spec.kind != "qa":
            raise UserError(f"{name}: not a task with text inputs")
        settings = settings_from_record(record)
        labels = list(record.get("labels") or spec.labels or ())
        return cls(_task_model(folder, spec, threads), Tokenizer.from_pretrained(folder), spec, settings, labels,
                   batch_size)

    @property
    def fields(self) -> tuple[str, ...]:
        """The keys every example needs."""
        if self.task.kind == "qa":
            return ("question", "context")
        return ("text", "text_pair")[: len(self.task.glue.text_columns)]

    def __call__(self, examples: Sequence[Example], progress: bool = False) -> list[dict]:
        """One prediction per example, in order: {"label", "scores"} (classification), {"score"} (regression),
        {"answer"} (QA; SQuAD 2.0 models also "null_odds": above the threshold means no answer, ""). The model runs
        through `finetuning.predict`, as in `evaluate`: the same batches, and QA's windows and post-processing."""
        for i, example in enumerate(examples):
            check_example(example, self.fields, f"example {i + 1}")
        data = self._task_data(examples)
        logits = predict(self.model, data, self.tokenizer, self.settings, self.batch_size, progress=progress)
        if self.task.kind == "qa":
            answers = qa_answers(data, logits, self.settings)
            version_2 = self.task.squad_version == "2.0"
            return [{"answer": answers.predictions[ex.qid],
                     **({"null_odds": _finite(answers.null_odds[ex.qid])} if version_2 else {})} for ex in data.squad]
        if self.task.kind == "regression":
            return [{"score": float(v)} for v in logits]
        logits = logits.astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return [{"label": self.labels[int(p.argmax())], "scores": dict(zip(self.labels, map(float, p), strict=True))}
                for p in probs]

    def _task_data(self, examples: Sequence[Example]) -> TaskData:
        if self.task.kind != "qa":
            texts = [TextExample(f"predict-{i}", tuple(ex[f] for f in self.fields), None)
                     for i, ex in enumerate(examples)]
            return TaskData(self.task, "predict", texts=texts)
        squad = [SquadExample(str(i), "", ex["question"], ex["context"], []) for i, ex in enumerate(examples)]
        s = self.settings
        features = make_features(squad, self.tokenizer, s.seq_length(self.task), s.stride(self.task),
                                 s.max_query_length, training=False)
        return TaskData(self.task, "predict", squad=squad, features=features)


def _finite(value: float) -> float | None:
    """JSON has no infinity: a question with no valid span at all has null odds of inf, written as null."""
    return float(value) if np.isfinite(value) else None


def check_example(example: Example, fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if not isinstance(example.get(f), str)]
    if missing:
        raise UserError(f"{where}: needs {' and '.join(fields)}; missing {', '.join(missing)}")
    empty = [f for f in fields if not example[f].strip()]
    if empty:
        raise UserError(f"{where}: empty {', '.join(empty)}")


# ---- the model behind a predictor ----

def _task_model(folder: Path, task: Task, threads: int | None) -> Any:
    """The fine-tuned model, called like our task models: the PyTorch model of a checkpoint, or the exported format's
    runtime (named in the folder's export.json) behind `ExportedTaskModel`."""
    record_path = folder / EXPORT_RECORD
    if not record_path.is_file():
        check_task_head(str(folder), task)
        if threads:
            torch.set_num_threads(threads)
        return load_model(task, str(folder))
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        fmt, files = record["format"], record["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{record_path}: not an export record ({e})") from None
    if fmt not in FORMATS:
        raise UserError(f"{record_path}: unknown format {fmt!r}")
    path = folder / FORMATS[fmt]
    if not path.is_file():
        raise UserError(f"{path}: missing (the export record lists {', '.join(files)})")

    def float_model() -> torch.nn.Module:  # what a torch-int8 state dict was quantized from
        from mobilebert.recipes.export import model_class

        return model_class(folder, None)(read_config(folder))

    if threads and BACKENDS[fmt].runtime in ("torch", "aoti"):  # run on PyTorch's own threads
        torch.set_num_threads(threads)
    model = load_exported(fmt, path, threads, float_model=float_model)
    if isinstance(model, torch.nn.Module):
        return model
    from mobilebert.deploy.interface import ExportedTaskModel

    return ExportedTaskModel(model)
