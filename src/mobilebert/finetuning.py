"""Fine-tuning data in, scores out: the task model for a task, its training batches, its predictions and metrics.

Used by `mobilebert finetune` (training and model selection) and `mobilebert evaluate` (any checkpoint).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mobilebert.checkpoint import read_config, read_weights, resolve
from mobilebert.data.builtin_tasks import BuiltinSizes, write_builtin_tasks
from mobilebert.data.glue import TextExample
from mobilebert.data.squad import SquadExample, SquadFeatures, make_features, postprocess
from mobilebert.data.tasks import Task, load_squad_examples, load_text_examples, squad_dataset
from mobilebert.distill.losses import PAD_LOGIT
from mobilebert.errors import UserError
from mobilebert.files import atomic_write, read_json
from mobilebert.heads import MobileBertForQuestionAnswering, MobileBertForSequenceClassification
from mobilebert.metrics import compute_metrics, evaluate_v1, evaluate_v2
from mobilebert.tokenizer import Tokenizer

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TaskSettings:
    """How a task's text becomes model inputs and QA logits become answers (None: the task family's default)."""

    max_seq_length: int | None = None
    doc_stride: int | None = None
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0

    def seq_length(self, task: Task) -> int:
        return self.max_seq_length or task.family.max_seq_length

    def stride(self, task: Task) -> int:
        return self.doc_stride or task.family.doc_stride


def cache_dir() -> Path:
    return Path(os.environ.get("MOBILEBERT_CACHE", "~/.cache/mobilebert")).expanduser()


def task_data_dir(task: Task, data_dir: str | None) -> str | None:
    """Where a task's files are: `data_dir`, or for built-in tasks the generated folder (made on first use)."""
    if data_dir is not None or not task.builtin:
        return data_dir
    return str(write_builtin_tasks(cache_dir() / "builtin-tasks", BuiltinSizes()) / task.name)


FINETUNING_FILE = "finetuning.json"  # in a fine-tuned model's folder: the task and how its text was cut


def check_length(task: Task, settings: TaskSettings, checkpoint: str) -> None:
    """The task's sequence length must fit the checkpoint's position table (refused before anything is written)."""
    positions = read_config(resolve(checkpoint)).max_position_embeddings
    if settings.seq_length(task) > positions:
        raise UserError(f"{checkpoint}: its position table has {positions} positions, fewer than {task.name}'s "
                        f"max_seq_length {settings.seq_length(task)}; pass --task.max_seq_length {positions} or less")


def write_finetuning_record(model_dir: Path, task: Task, settings: TaskSettings) -> None:
    """Record the task and the text settings a model was fine-tuned with: `evaluate` takes them as its defaults."""
    record = {"task": task.name, "labels": list(task.labels or ()), "max_seq_length": settings.seq_length(task),
              "doc_stride": settings.stride(task), "max_query_length": settings.max_query_length}
    atomic_write(model_dir / FINETUNING_FILE, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))


def recorded_settings(checkpoint: str) -> dict[str, Any]:
    """What `write_finetuning_record` wrote in a checkpoint's folder, or {}."""
    path = resolve(checkpoint) / FINETUNING_FILE
    return read_json(path) if path.is_file() else {}


HEAD_WEIGHTS = {"qa": "qa_outputs.weight", "regression": "classifier.weight", "classification": "classifier.weight"}


def check_task_head(checkpoint: str, task: Task) -> None:
    """The checkpoint must hold a trained head for the task (`load_model` would give it a new, random one)."""
    state, source = read_weights(resolve(checkpoint))
    head = state.get(HEAD_WEIGHTS[task.kind])
    rows = 2 if task.kind == "qa" else task.num_labels
    if head is None or head.shape[0] != rows:
        raise UserError(f"{source} has no {task.name} head ({HEAD_WEIGHTS[task.kind]} with {rows} rows): fine-tune "
                        f"it on {task.name} first (mobilebert finetune --checkpoint {checkpoint} --task {task.name})")


def settings_from_record(record: dict[str, Any]) -> TaskSettings:
    """The text settings a model was fine-tuned with, from its `recorded_settings`; the family's defaults where none
    is recorded."""
    return TaskSettings(record.get("max_seq_length"), record.get("doc_stride"), record.get("max_query_length", 64))


def load_model(task: Task, checkpoint: str) -> torch.nn.Module:
    """The task model from any MobileBERT checkpoint: a new head when the checkpoint has none for this task."""
    if task.kind == "qa":
        return MobileBertForQuestionAnswering.from_pretrained(checkpoint)
    if task.kind == "regression":
        return MobileBertForSequenceClassification.from_pretrained(
            checkpoint, id2label={0: "LABEL_0"}, problem_type="regression")
    return MobileBertForSequenceClassification.from_pretrained(
        checkpoint, id2label=dict(enumerate(task.labels)), problem_type="single_label_classification")


# ---- data ----

@dataclass
class TaskData:
    """One split of a task, ready for the model: text examples, or QA examples with their windows."""

    task: Task
    split: str
    texts: list[TextExample] | None = None
    squad: list[SquadExample] | None = None
    features: SquadFeatures | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.features.input_ids)


def load_split(task: Task, split: str, data_dir: str | None, tokenizer: Tokenizer, settings: TaskSettings,
               training: bool, limit: int | None = None) -> TaskData:
    data_dir = task_data_dir(task, data_dir)
    if task.kind != "qa":
        texts = load_text_examples(task, split, data_dir)
        if training and any(ex.label is None for ex in texts):
            raise UserError(f"{task.name} {split}: examples without labels cannot be trained on")
        return TaskData(task, split, texts=texts[:limit] if limit else texts)
    examples = load_squad_examples(task, split, data_dir, training=training)
    examples = examples[:limit] if limit else examples
    features = make_features(examples, tokenizer, settings.seq_length(task), settings.stride(task),
                             settings.max_query_length, training=training)
    return TaskData(task, split, squad=examples, features=features)


def make_batch(data: TaskData, rows: np.ndarray, tokenizer: Tokenizer, settings: TaskSettings) -> Batch:
    """Model inputs (and labels, when known) of the given rows, padded to the longest row."""
    if data.texts is not None:
        examples = [data.texts[i] for i in rows]
        second = [ex.texts[1] for ex in examples] if len(examples[0].texts) > 1 else None
        batch = tokenizer.encode_pairs([ex.texts[0] for ex in examples], second,
                                       max_length=settings.seq_length(data.task))
        if all(ex.label is not None for ex in examples):
            dtype = torch.float32 if data.task.kind == "regression" else torch.int64
            batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=dtype)
        return batch
    f = data.features
    batch = {k: torch.as_tensor(getattr(f, k)[rows]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    if f.start_positions is not None:
        batch["start_positions"] = torch.as_tensor(f.start_positions[rows])
        batch["end_positions"] = torch.as_tensor(f.end_positions[rows])
    width = int(batch["attention_mask"].sum(1).max())  # drop columns that are padding in every row
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        batch[k] = batch[k][:, :width].long()
    return batch


# ---- loss ----

def task_counts(batch: Batch) -> dict[str, int]:
    return {"task": len(batch["input_ids"])}


def task_loss_sums(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Summed task loss of a micro-batch: cross-entropy, squared error (regression) or the mean of the start and
    end cross-entropies (QA, docs/models.md). The engine divides by the global example count."""
    return task_sums(model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]), batch)


def task_sums(out: Any, batch: Batch) -> dict[str, torch.Tensor]:
    """`task_loss_sums` of model outputs already computed."""
    if "start_positions" in batch:
        start = F.cross_entropy(out.start_logits.float(), batch["start_positions"], reduction="sum")
        end = F.cross_entropy(out.end_logits.float(), batch["end_positions"], reduction="sum")
        return {"task": (start + end) / 2}
    logits = out.logits.float()
    if logits.shape[-1] == 1:
        return {"task": F.mse_loss(logits.squeeze(-1), batch["labels"], reduction="sum")}
    return {"task": F.cross_entropy(logits, batch["labels"], reduction="sum")}


# ---- prediction and scores ----

@torch.no_grad()
def predict(model: torch.nn.Module, data: TaskData, tokenizer: Tokenizer, settings: TaskSettings,
            batch_size: int = 64, device: torch.device | str = "cpu", progress: bool = False) -> np.ndarray:
    """Logits of every row: (N, labels) for classification, (N,) for regression, (N, 2, T) start/end for QA.
    `model` is one of our task models or anything called like one (e.g. `deploy.interface.ExportedTaskModel`)."""
    model.eval()
    outputs = []
    starts = range(0, len(data), batch_size)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predict", unit="batch", dynamic_ncols=True)
    for begin in starts:
        rows = np.arange(begin, min(begin + batch_size, len(data)))
        batch = make_batch(data, rows, tokenizer, settings)
        out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                    batch["token_type_ids"].to(device))
        rows_out = task_outputs(out).float().cpu()
        if data.features is not None:  # (B, 2, T'): padded to the features' width
            rows_out = F.pad(rows_out, (0, data.features.input_ids.shape[1] - rows_out.shape[-1]), value=PAD_LOGIT)
        outputs.append(rows_out.numpy())
    return np.concatenate(outputs)


def task_outputs(out: Any) -> torch.Tensor:
    """A task model's outputs as `predict` lays them out: (B, labels), (B,) for regression, (B, 2, T) for QA."""
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], 1)
    return out.logits[:, 0] if out.logits.shape[-1] == 1 else out.logits


def score(data: TaskData, logits: np.ndarray, settings: TaskSettings) -> dict[str, float]:
    """The task's official metrics of `logits` on labelled data (in percent for SQuAD, fractions for GLUE)."""
    task = data.task
    if data.features is None:
        labels = np.array([ex.label for ex in data.texts])
        preds = logits if task.kind == "regression" else logits.argmax(-1)
        return compute_metrics(task.metrics, preds, labels)
    answers = qa_answers(data, logits, settings)
    dataset = squad_dataset(data.squad)
    if task.squad_version == "2.0":
        return evaluate_v2(dataset, answers.predictions, na_probs=answers.null_odds)
    return evaluate_v1(dataset, answers.predictions)


def qa_answers(data: TaskData, logits: np.ndarray, settings: TaskSettings):
    return postprocess(data.squad, data.features, logits[:, 0], logits[:, 1], settings.n_best_size,
                       settings.max_answer_length, version_2=data.task.squad_version == "2.0",
                       null_score_diff_threshold=settings.null_score_diff_threshold)


QA_BASELINE_CANDIDATES = 30  # commonest training answers, and commonest words in them, tried as constant answers


def constant_baseline(train: TaskData, dev: TaskData) -> dict[str, float]:
    """What a model that ignores its input scores: per metric, the best of always predicting one label (so F1 is
    that of always answering the positive class), or the training mean for regression (correlations 0). QA: the
    best of giving one answer to every question, among the training set's commonest answers and commonest answer
    words (SQuAD 2.0 also: always no answer)."""
    if dev.texts is None:
        return _constant_answer_baseline(train, dev)
    if train.task.kind == "regression":
        labels = np.array([ex.label for ex in train.texts])
        return score(dev, np.full(len(dev.texts), labels.mean()), TaskSettings())
    best: dict[str, float] = {}
    for label in range(train.task.num_labels):
        logits = np.zeros((len(dev.texts), train.task.num_labels))
        logits[:, label] = 1
        for name, value in score(dev, logits, TaskSettings()).items():
            best[name] = max(best.get(name, value), value)
    return best


def _constant_answer_baseline(train: TaskData, dev: TaskData) -> dict[str, float]:
    """The best official scores of one answer given to every dev question (see `constant_baseline`)."""
    from collections import Counter

    answers = [text for ex in train.squad for text, _ in ex.answers if text]
    words = Counter(w for text in answers for w in text.lower().split())
    candidates = {text for text, _ in Counter(answers).most_common(QA_BASELINE_CANDIDATES)}
    candidates |= {w for w, _ in words.most_common(QA_BASELINE_CANDIDATES)}
    version_2 = dev.task.squad_version == "2.0"
    if version_2:
        candidates.add("")  # no answer
    dataset = squad_dataset(dev.squad)
    best: dict[str, float] = {}
    for answer in sorted(candidates):
        predictions = {ex.qid: answer for ex in dev.squad}
        scores = evaluate_v2(dataset, predictions) if version_2 else evaluate_v1(dataset, predictions)
        for name in ("exact", "f1") if version_2 else ("exact_match", "f1"):
            best[name] = max(best.get(name, scores[name]), scores[name])
    return best
