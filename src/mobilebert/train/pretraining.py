"""The pre-training objective as the engine and the evaluations use it: masked-LM + next-sentence sums and counts,
and held-out masked-LM / NSP accuracy. Shared by `pretrain` and `distill` (the student is scored the same way)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch

from mobilebert.data.prepared import PreparedData
from mobilebert.data.pretraining import IGNORE_INDEX, PretrainingBatches
from mobilebert.data.training import DataOptions, batches_for
from mobilebert.heads import MobileBertForPreTraining


def pretraining_counts(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    return {"mlm": int((batch["labels"] != IGNORE_INDEX).sum()), "nsp": len(batch["next_sentence_label"])}


def pretraining_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Summed masked-LM and next-sentence cross-entropies of one micro-batch (the engine normalises): the model's
    mean losses (computed in fp32, also under autocast) times their counts."""
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"],
                next_sentence_label=batch["next_sentence_label"], masked_only=True)
    masked = len(out.prediction_logits)  # (N, V): one row per masked position
    mlm = out.mlm_loss * masked if masked else out.prediction_logits.sum()  # nothing masked: 0, not NaN
    return {"mlm": mlm, "nsp": out.nsp_loss * len(batch["next_sentence_label"])}


def evaluate_pretraining(model: MobileBertForPreTraining, batches: PretrainingBatches, num_batches: int,
                         device: torch.device) -> dict[str, float]:
    """Masked-LM accuracy and perplexity, NSP accuracy, and the accuracy of always guessing the commonest token."""
    correct = total = nsp_correct = nsp_total = 0
    loss_sum = 0.0
    label_counts: Counter = Counter()
    for step in range(num_batches):
        batch = {k: v.to(device) for k, v in batches.batch(step).items()}
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"],
                    masked_only=True)
        masked = batch["labels"][batch["labels"] != IGNORE_INDEX]
        if len(masked):  # the model's mean loss (fp32) times the count; nothing masked adds nothing
            loss_sum += out.mlm_loss.item() * len(masked)
        correct += int((out.prediction_logits.argmax(-1) == masked).sum())
        total += len(masked)
        label_counts.update(masked.tolist())
        nsp_correct += int((out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum())
        nsp_total += len(batch["next_sentence_label"])
    return {"mlm_accuracy": correct / max(total, 1), "mlm_loss": loss_sum / max(total, 1),
            "perplexity": math.exp(min(loss_sum / max(total, 1), 50.0)),
            "mlm_majority_accuracy": max(label_counts.values(), default=0) / max(total, 1),
            "nsp_accuracy": nsp_correct / max(nsp_total, 1)}


def validation_evaluator(model: MobileBertForPreTraining, data: PreparedData, options: DataOptions,
                         device: torch.device) -> Callable[[], dict[str, float]] | None:
    """The engine's `evaluate` for pre-training and distillation: `evaluate_pretraining` on up to
    `options.eval_examples` held-out pairs, always the same ones (seed 1); None when the data hold none."""
    if not len(data.validation):
        return None
    batches = batches_for(data.validation, data.tokenizer, options, options.eval_batch_size, seed=1)
    count = max(1, math.ceil(min(options.eval_examples, len(data.validation)) / options.eval_batch_size))
    return lambda: evaluate_pretraining(model, batches, count, device)
