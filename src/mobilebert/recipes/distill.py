"""`mobilebert distill`: knowledge transfer from a pre-trained IB-BERT teacher to a MobileBERT student.

The algorithm (paper §3–§4; docs/distillation.md): layer-wise transfer of feature maps and attention maps
(all layers jointly, or progressively one layer per phase), then pre-training distillation of the MLM head —
or all at once (auxiliary). The student ends task-agnostic: fine-tune it like BERT.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilebert.config import preset
from mobilebert.data.pretraining import IGNORE_INDEX, batch_stream
from mobilebert.data.training import (
    DataOptions,
    batches_for,
    check_options,
    check_tokenizer,
    loader_workers,
    prepare_data,
    write_record,
)
from mobilebert.distill.losses import FMTWeights, layer_losses, pretraining_distillation
from mobilebert.distill.strategies import (
    Rates,
    Stage,
    build_layer_map,
    check_pair,
    copy_embeddings_and_heads,
    layer_groups,
    lr_factor,
    plan,
    set_trainable,
    stage_at,
)
from mobilebert.errors import UserError
from mobilebert.heads import MobileBertForPreTraining
from mobilebert.recipes.config import check_resume, load_config, save_config
from mobilebert.tokenizer import Tokenizer
from mobilebert.train.loop import Engine, TrainOptions, micro_batches, open_run
from mobilebert.train.optim import parameter_groups
from mobilebert.train.pretraining import validation_evaluator


@dataclass
class TransferOptions:
    """What to transfer and how; the defaults are the official code's recipe (docs/distillation.md)."""

    teacher: str | None = None  # pre-trained teacher checkpoint folder (transformers format, with tokenizer)
    student: str = "mobilebert-demo"  # student preset
    student_overrides: dict[str, Any] = field(default_factory=dict)
    strategy: str = "pkt"  # pkt | jkt | akt
    layer_map: str | list[int] = "same"  # same | uniform | [teacher layer per student layer]
    layerwise_steps: int = 600  # stage 1 in all (PKT: split evenly over the layers)
    pd_steps: int = 300  # stage 2: pre-training distillation
    current_layer_lr_scale: float = 3.0  # PKT/JKT: rate of the layer(s) being transferred, times train.lr
    lower_layer_lr_scale: float = 0.3  # PKT: rate of the layers below (official 3 × 1/10); 0 freezes them
    phase_warmup: float = 0.1  # warm-up over this fraction of each layer-wise phase ...
    phase_end_factor: float = 0.9  # ... then decay (power phase_decay_power) to this factor; 1.0 keeps it flat
    phase_decay_power: float = 0.5
    pd_warmup_steps: int = 30
    freeze_embedding_norm: bool = True  # the student's embedding norm stays at its initial value in stage 1
    reset_optimizer: bool = True  # PD starts from empty optimizer state, as a new run would
    student_dropout: bool = False  # dropout in the student during transfer (the official code has none)
    layer_weight: float | None = None  # weight of the layer-wise terms (FMT + AT); None: 1 / student layers
    fmt: str = "official"  # official (normalised MSE + mean + variance terms) | mse
    fmt_mse_weight: float = 100.0
    fmt_mean_weight: float = 5000.0
    fmt_var_weight: float = 5.0
    at_weight: float = 1.0  # 0 turns attention transfer off
    alpha: float = 0.5  # PD: alpha · MLM + (1 − alpha) · KD + NSP
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.fmt not in ("official", "mse"):
            raise UserError(f"distill.fmt must be 'official' or 'mse', got {self.fmt!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.layer_weight is not None and self.layer_weight < 0:
            raise UserError(f"distill.layer_weight must be >= 0, got {self.layer_weight}")
        self.rates()  # checks the schedule's options

    def rates(self) -> Rates:
        return Rates(self.current_layer_lr_scale, self.lower_layer_lr_scale, self.phase_warmup,
                     self.phase_end_factor, self.phase_decay_power, self.pd_warmup_steps, self.freeze_embedding_norm)


@dataclass
class DistillOptions:
    distill: TransferOptions = field(default_factory=TransferOptions)
    # By default the data the teacher was trained on (its folder records where it was prepared).
    data: DataOptions = field(default_factory=lambda: DataOptions(prepared="teacher"))
    train: TrainOptions = field(default_factory=lambda: TrainOptions(optimizer="lamb", lr=1e-3))


class Transfer:
    """The loss terms of one stage, as the engine wants them: per-term counts, then per-term sums.

    The layer-wise terms (FMT and AT of each transferred layer) are weighted by `layer_weight`, by default
    1 / number of student layers as in the official code (its layer-wise loss is the mean over layers, and the
    one layer of a PKT phase counts 1/L). That weight is also AKT's balance between the layer terms and PD.
    """

    def __init__(self, teacher: MobileBertForPreTraining, options: TransferOptions, layer_map: list[int]) -> None:
        self.teacher, self.options, self.layer_map = teacher, options, layer_map
        self.fmt_weights = FMTWeights(options.fmt_mse_weight, options.fmt_mean_weight, options.fmt_var_weight)
        self.layer_weight = 1 / len(layer_map) if options.layer_weight is None else options.layer_weight

    def counts(self, stage: Stage, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        tokens = int(batch["attention_mask"].sum())
        counts = {f"{kind}/{l}": tokens for l in stage.transfer_layers for kind in self._kinds()}
        if stage.pd:
            masked = int((batch["labels"] != IGNORE_INDEX).sum())
            counts.update(mlm=masked, kd=masked, nsp=len(batch["next_sentence_label"]))
        return counts

    def _kinds(self) -> tuple[str, ...]:
        return ("fmt", "at") if self.options.at_weight > 0 else ("fmt",)

    def sums(self, stage: Stage, student: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layerwise, maps = bool(stage.transfer_layers), self.options.at_weight > 0 and bool(stage.transfer_layers)
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        heads = {"labels": batch["labels"], "masked_only": True} if stage.pd else {}
        student_layers = None if stage.pd else stage.run_layers or len(self.layer_map)  # a number skips the heads
        teacher_layers = None if stage.pd else max(self.layer_map[:student_layers]) + 1
        s = student(*inputs, output_hidden_states=layerwise, output_attention_scores=maps, num_layers=student_layers,
                    **heads)
        with torch.no_grad():
            t = self.teacher(*inputs, output_hidden_states=layerwise, output_attention_scores=maps,
                             num_layers=teacher_layers, **heads)
        sums: dict[str, torch.Tensor] = {}
        if layerwise:
            sums.update(self._layerwise(stage, s, t, batch["attention_mask"]))
        if stage.pd:
            sums.update(self._pd(s, t, batch))
        return sums

    def _layerwise(self, stage, s, t, mask) -> dict[str, torch.Tensor]:
        mapped = [t.hidden_states[0]] + [t.hidden_states[m + 1] for m in self.layer_map[: len(s.hidden_states) - 1]]
        t_scores = None if s.attention_scores is None else [t.attention_scores[m] for m in
                                                           self.layer_map[: len(s.attention_scores)]]
        losses = layer_losses(mapped, s.hidden_states, t_scores, s.attention_scores, mask, stage.transfer_layers,
                              self.fmt_weights, self.options.at_weight, plain_mse=self.options.fmt == "mse")
        tokens = mask.sum()
        return {name: value * (self.layer_weight * tokens) for name, value in losses.terms.items()}  # means → sums

    def _pd(self, s, t, batch) -> dict[str, torch.Tensor]:
        """`pretraining_distillation`'s three terms as sums (its means times their counts), weighted as in its total."""
        masked = batch["labels"][batch["labels"] != IGNORE_INDEX]  # (N,): the logits are the masked rows only
        a = self.options.alpha
        pd = pretraining_distillation(s.prediction_logits, t.prediction_logits, masked, s.seq_relationship_logits,
                                      batch["next_sentence_label"], alpha=a, temperature=self.options.temperature)
        return {"mlm": a * pd.mlm * len(masked), "kd": (1 - a) * pd.kd * len(masked),
                "nsp": pd.nsp * len(batch["next_sentence_label"])}


def main(args: argparse.Namespace) -> int:
    shorthand = [(k, getattr(args, k)) for k in ("teacher", "student", "strategy") if getattr(args, k)]
    options = load_config(DistillOptions, args.config, args.overrides + [a for k, v in shorthand
                                                                          for a in (f"--distill.{k}", v)])
    transfer = options.distill
    if not transfer.teacher:
        raise UserError("no teacher: pass --teacher DIR (a checkpoint from `mobilebert pretrain`)")
    if options.data.tokenizer is None:  # the teacher's vocabulary, so ids mean the same to both
        options.data = dataclasses.replace(options.data, tokenizer=str(transfer.teacher))
    check_options(options.data)
    if args.resume:  # train.steps: set below from the transfer's plan
        check_resume(args.out, options, finished=(Path(args.out) / "final").exists(), ignore=("train.steps",))
    opened = open_run(args.out, args.resume, args.overwrite, options.train.device)
    if opened is None:
        return 0
    dist, run = opened
    teacher = MobileBertForPreTraining.from_pretrained(transfer.teacher)
    data = prepare_data(options.data, run.root, dist, teacher=transfer.teacher, resume=args.resume)
    check_tokenizer(data, Tokenizer.from_pretrained(transfer.teacher), f"the teacher {transfer.teacher}")
    student_cfg = preset(transfer.student, **{"vocab_size": data.tokenizer.vocab_size, **transfer.student_overrides})
    layer_map = build_layer_map(transfer.layer_map, teacher.config.num_hidden_layers, student_cfg.num_hidden_layers)
    copy = transfer.strategy in ("pkt", "jkt")
    check_pair(teacher.config, student_cfg, layer_map, copy_from_teacher=copy)
    stages = plan(transfer.strategy, student_cfg.num_hidden_layers, transfer.layerwise_steps, transfer.pd_steps)
    options.train = dataclasses.replace(options.train, steps=stages[-1].end)
    if dist.is_main:
        save_config(options, run.config)

    torch.manual_seed(options.train.seed)
    student = MobileBertForPreTraining(student_cfg)
    if copy:
        copy_embeddings_and_heads(teacher, student)
    teacher.to(dist.device).eval().requires_grad_(False)

    rates = transfer.rates()

    def schedule(step: int, group: dict) -> float:
        return lr_factor(stage_at(stages, step), step, group["key"], rates)

    train = batches_for(data.train, data.tokenizer, options.data, options.train.batch_size, options.train.seed,
                        dist.rank, dist.world_size)
    engine = Engine(student, options.train, run, dist, tokenizer=data.tokenizer, lr_lambda=schedule,
                    groups=layer_groups(parameter_groups(student, options.train.weight_decay)), partial_graph=True,
                    dropout=transfer.student_dropout,
                    evaluate=validation_evaluator(student, data, options.data, dist.device))
    losses = Transfer(teacher, transfer, layer_map)
    if dist.is_main:
        print(f"distilling {Path(transfer.teacher).name} → {transfer.student} with {transfer.strategy.upper()}: "
              f"{', '.join(f'{s.name} ({s.steps} steps)' for s in _summarise(stages))}")
    current = None
    workers = loader_workers(options.data, dist.device.type)
    for step, batch in engine.batches(lambda start: batch_stream(train, start, options.train.steps, workers),
                                      resume=args.resume):
        stage = stage_at(stages, step)
        if stage != current:
            set_trainable(student, stage, rates)
            if transfer.reset_optimizer and stage.pd and step == stage.start:  # (AKT: step 0, nothing to forget)
                engine.reset_optimizer_state()  # the official codes start PD as a new run: no moments, step 1
            current = stage
        engine.step(micro_batches(batch, options.train.micro_batch_size),
                    lambda b, s=stage: losses.counts(s, b), lambda m, b, s=stage: losses.sums(s, m, b))
    student.requires_grad_(True)
    engine.finish()
    if dist.is_main:
        write_record(run.final, data)
        print(f"done: {run.final}")
    return 0


def _summarise(stages: list[Stage]) -> list[Stage]:
    """For printing: PKT's phases as one entry."""
    phases = [s for s in stages if s.name.startswith("phase-")]
    rest = [s for s in stages if not s.name.startswith("phase-")]
    if not phases:
        return rest
    merged = dataclasses.replace(phases[0], name=f"{len(phases)} phases", steps=sum(p.steps for p in phases))
    return [merged, *rest]
