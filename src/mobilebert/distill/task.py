"""Task-specific distillation: fine-tune a student with a teacher already fine-tuned on the same task.

Beyond the paper (which distils once, task-agnostically; docs/finetuning.md): the fine-tuning loss becomes
β · task loss + (1 − β) · KD on the teacher's task outputs (`losses.task_distillation`), plus, optionally, the
layer-wise FMT and AT terms of pre-training distillation (teacher and student share block widths).

Without layer terms the teacher's outputs are computed once per training row and kept (in the run folder, so
trials and resumed runs share them): one teacher pass over the data instead of one per epoch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilebert.checkpoint import read_config, resolve
from mobilebert.data.tasks import Task
from mobilebert.distill.losses import FMTWeights, layer_losses, task_distillation
from mobilebert.distill.strategies import build_layer_map, check_pair
from mobilebert.errors import UserError
from mobilebert.files import atomic_write, read_json_or_none
from mobilebert.finetuning import (
    Batch,
    TaskData,
    TaskSettings,
    check_length,
    check_task_head,
    load_model,
    predict,
    recorded_settings,
    task_counts,
    task_outputs,
    task_sums,
)
from mobilebert.tokenizer import Tokenizer

CACHE_FILE = "teacher-outputs.npy"  # in the fine-tuning run folder, beside its record


@dataclass
class TaskDistillOptions:
    """Off unless `teacher` is set. The defaults are TinyBERT-style prediction distillation at T = 1."""

    teacher: str | None = None  # a checkpoint fine-tuned on the same task, e.g. runs/teacher-mrpc/final
    beta: float = 0.5  # loss = beta · task loss + (1 − beta) · KD on the teacher's outputs
    temperature: float = 1.0  # softens both distributions (classification and QA spans); the KD term is × T²
    # > 0 adds FMT + AT of every layer, averaged over the layers, times this weight; the teacher then runs at every
    # step (its hidden states cannot be kept), which costs about one teacher forward pass per student step.
    layer_weight: float = 0.0
    layer_map: str | list[int] = "same"  # same | uniform | [teacher layer per student layer]
    cache: bool = True  # without layer terms: the teacher's outputs computed once per training row, not every step

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"distill.beta must be in [0, 1], got {self.beta}")
        if self.temperature <= 0:
            raise UserError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.layer_weight < 0:
            raise UserError(f"distill.layer_weight must be >= 0, got {self.layer_weight}")


def check_teacher(options: TaskDistillOptions, task: Task, settings: TaskSettings, student: str,
                  tokenizer: Tokenizer) -> None:
    """Everything that stops `options.teacher` from teaching this student this task, said before anything runs."""
    teacher = str(options.teacher)
    check_length(task, settings, teacher)
    recorded = recorded_settings(teacher).get("task")
    if recorded is not None and recorded != task.name:
        raise UserError(f"the teacher {teacher} was fine-tuned on {recorded}, not {task.name}")
    check_task_head(teacher, task)
    if Tokenizer.from_pretrained(resolve(teacher)).fingerprint() != tokenizer.fingerprint():
        raise UserError(f"the teacher {teacher} and the student {student} have different vocabularies: token ids "
                        "would mean different words to them")
    if options.layer_weight > 0:
        layer_map_for(options, read_config(resolve(teacher)), read_config(resolve(student)))


def layer_map_for(options: TaskDistillOptions, teacher: Any, student: Any) -> list[int]:
    """Student layer → teacher layer for the layer terms, checked as `distill` checks its pair."""
    layer_map = build_layer_map(options.layer_map, teacher.num_hidden_layers, student.num_hidden_layers)
    check_pair(teacher, student, layer_map, copy_from_teacher=False)
    return layer_map


def data_fingerprint(data: TaskData) -> str:
    """sha256 (16 hex digits) of a split's model inputs as text: what the cached teacher outputs were computed on."""
    h = hashlib.sha256()
    if data.texts is not None:
        for ex in data.texts:
            h.update("\t".join(ex.texts).encode("utf-8") + b"\n")
    else:
        h.update(np.ascontiguousarray(data.features.input_ids).tobytes())
    return h.hexdigest()[:16]


class TaskTeacher:
    """The fine-tuning loss with a teacher, as the engine wants it: per-term counts, then per-term sums.

    Terms: "task" (β · the plain fine-tuning loss), "kd" ((1 − β) · `task_distillation`), and with layer terms
    "layers" (layer_weight · mean over layers of FMT + AT, per token). With β = 1 and no layer terms the loss,
    and so training, is exactly plain fine-tuning's.
    """

    def __init__(self, options: TaskDistillOptions, task: Task, student_checkpoint: str,
                 device: torch.device | str = "cpu") -> None:
        self.options, self.task = options, task
        self.model = load_model(task, str(options.teacher)).to(device).eval().requires_grad_(False)
        self.outputs: np.ndarray | None = None  # cached per training row, when `cached`
        self.layer_map: list[int] = []
        if options.layer_weight > 0:
            self.layer_map = layer_map_for(options, self.model.config, read_config(resolve(student_checkpoint)))

    @property
    def cached(self) -> bool:
        return self.options.cache and not self.layer_map

    def cache_outputs(self, train: TaskData, tokenizer: Tokenizer, settings: TaskSettings, batch_size: int,
                      device: torch.device | str, folder: Path, write: bool) -> None:
        """The teacher's outputs of every training row, from `folder` when an earlier run of this teacher on this
        data left them there, else computed (one pass) and, if `write`, saved there for trials and resumes."""
        path, record_path = folder / CACHE_FILE, folder / (CACHE_FILE + ".json")
        weights = resolve(str(self.options.teacher)) / "model.safetensors"
        stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None
        record = {"teacher": str(Path(str(self.options.teacher)).resolve()), "weights": stamp, "task": self.task.name,
                  "rows": len(train), "data": data_fingerprint(train),
                  "lengths": [settings.seq_length(self.task), settings.stride(self.task), settings.max_query_length]}
        if path.is_file() and read_json_or_none(record_path) == record:
            self.outputs = np.load(path)
        else:
            print(f"computing the teacher's outputs on {len(train)} training rows (once)")
            self.outputs = predict(self.model, train, tokenizer, settings, batch_size, device)
            if write:
                atomic_write(path, self._save_outputs)
                atomic_write(record_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
        self.model = None  # not needed again: its memory goes back for the student's trials

    def _save_outputs(self, path: Path) -> None:
        with path.open("wb") as f:
            np.save(f, self.outputs)

    def add_outputs(self, batch: Batch, rows: np.ndarray) -> Batch:
        """The cached teacher outputs of these rows, cut to the batch's width (QA), as batch["teacher_outputs"]."""
        if self.outputs is not None:
            outputs = torch.from_numpy(self.outputs[rows])
            if self.task.kind == "qa":
                outputs = outputs[..., :batch["input_ids"].shape[1]]
            batch["teacher_outputs"] = outputs
        return batch

    def counts(self, batch: Batch) -> dict[str, int]:
        counts = {**task_counts(batch), "kd": len(batch["input_ids"])}
        if self.layer_map:
            counts["layers"] = int(batch["attention_mask"].sum())
        return counts

    def sums(self, student: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        layers = bool(self.layer_map)
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        s = student(*inputs, output_hidden_states=layers, output_attention_scores=layers)
        t = None
        if "teacher_outputs" in batch:
            teacher_outputs = batch["teacher_outputs"]
        else:
            with torch.no_grad():
                t = self.model(*inputs, output_hidden_states=layers, output_attention_scores=layers)
            teacher_outputs = task_outputs(t)
        beta = self.options.beta
        kd = task_distillation(task_outputs(s), teacher_outputs, self.task.kind, batch["attention_mask"],
                               self.options.temperature)
        sums = {"task": beta * task_sums(s, batch)["task"], "kd": (1 - beta) * kd}
        if layers:
            sums["layers"] = self._layer_sum(s, t, batch["attention_mask"])
        return sums

    def _layer_sum(self, s, t, mask: torch.Tensor) -> torch.Tensor:
        """layer_weight × the mean over layers of FMT (official weighting) + AT, times the token count (a sum)."""
        mapped = [t.hidden_states[0]] + [t.hidden_states[m + 1] for m in self.layer_map]
        t_scores = [t.attention_scores[m] for m in self.layer_map]
        losses = layer_losses(mapped, s.hidden_states, t_scores, s.attention_scores, mask,
                              range(len(self.layer_map)), FMTWeights())
        return losses.total * (self.options.layer_weight / len(self.layer_map) * mask.sum())
