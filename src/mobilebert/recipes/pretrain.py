"""`mobilebert pretrain`: masked-LM + next-sentence pre-training of any preset (the IB-BERT teacher first of all).

The paper trains IB-BERT-large like BERT-large (docs/training.md): sentence pairs with 50% random next sentence,
15% masking, LAMB. This recipe does that on any corpus, at any scale, on one process or under torchrun.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilebert.checkpoint import has_tokenizer
from mobilebert.config import preset
from mobilebert.data.prepare import read_manifest
from mobilebert.data.pretraining import batch_stream
from mobilebert.data.training import (
    DataOptions,
    batches_for,
    check_options,
    check_tokenizer,
    loader_workers,
    prepare_data,
    write_record,
)
from mobilebert.errors import UserError
from mobilebert.heads import MobileBertForPreTraining
from mobilebert.recipes.config import check_resume, load_config, save_config
from mobilebert.tokenizer import Tokenizer
from mobilebert.train.loop import Engine, TrainOptions, micro_batches, open_run
from mobilebert.train.optim import check_schedule
from mobilebert.train.pretraining import pretraining_counts, pretraining_sums, validation_evaluator


@dataclass
class ModelOptions:
    preset: str = "ib-bert-demo"
    overrides: dict[str, Any] = field(default_factory=dict)  # MobileBertConfig fields, e.g. num_hidden_layers
    init_from: str | None = None  # start from this checkpoint instead of random weights


@dataclass
class PretrainOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainOptions = field(default_factory=TrainOptions)


def build_model(options: ModelOptions, vocab_size: int) -> MobileBertForPreTraining:
    if options.init_from:
        return MobileBertForPreTraining.from_pretrained(options.init_from)
    return MobileBertForPreTraining(preset(options.preset, **{"vocab_size": vocab_size, **options.overrides}))


def check_before_data(options: PretrainOptions) -> None:
    """Everything that can be refused before any corpus is read (seconds, whatever the corpus size)."""
    train = options.train
    check_schedule(train.steps, train.warmup_steps, train.decay, train.decay_power, train.end_factor)
    check_options(options.data)
    if options.model.init_from:
        if options.data.tokenizer and has_tokenizer(options.model.init_from):
            mine = Tokenizer.from_pretrained(options.model.init_from).fingerprint()
            if Tokenizer.from_pretrained(options.data.tokenizer).fingerprint() != mine:
                raise UserError(f"data.tokenizer {options.data.tokenizer} is not the tokenizer of model.init_from "
                                f"{options.model.init_from}: its ids would mean other tokens")
        return
    cfg = preset(options.model.preset, **{k: v for k, v in options.model.overrides.items() if k != "vocab_size"})
    length = options.data.max_seq_length
    if options.data.prepared and options.data.prepared != "teacher":
        length = read_manifest(options.data.prepared)["max_seq_length"]  # opened by check_options just above
    if (length or 128) > cfg.max_position_embeddings:
        raise UserError(f"data.max_seq_length {length or 128} exceeds the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")


def main(args: argparse.Namespace) -> int:
    options = load_config(PretrainOptions, args.config, args.overrides)
    check_before_data(options)
    if args.resume:
        check_resume(args.out, options, finished=(Path(args.out) / "final").exists())
    opened = open_run(args.out, args.resume, args.overwrite, options.train.device)
    if opened is None:
        return 0
    dist, run = opened
    if dist.is_main:
        save_config(options, run.config)
    data = prepare_data(options.data, run.root, dist, resume=args.resume)
    if options.model.init_from and has_tokenizer(options.model.init_from):
        check_tokenizer(data, Tokenizer.from_pretrained(options.model.init_from), options.model.init_from)
    torch.manual_seed(options.train.seed)
    model = build_model(options.model, data.tokenizer.vocab_size)
    if data.max_seq_length > model.config.max_position_embeddings:
        raise UserError(f"{data.folder}: pairs of up to {data.max_seq_length} tokens exceed the "
                        f"model's max_position_embeddings ({model.config.max_position_embeddings})")
    train = batches_for(data.train, data.tokenizer, options.data, options.train.batch_size, options.train.seed,
                        dist.rank, dist.world_size)
    engine = Engine(model, options.train, run, dist, tokenizer=data.tokenizer,
                    evaluate=validation_evaluator(model, data, options.data, dist.device))
    if dist.is_main:
        print(f"pre-training {options.model.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters) on {len(data.train)} pairs, {dist.world_size} process(es), {dist.device}")
    workers = loader_workers(options.data, dist.device.type)
    for _, batch in engine.batches(lambda start: batch_stream(train, start, options.train.steps, workers),
                                   resume=args.resume):
        engine.step(micro_batches(batch, options.train.micro_batch_size), pretraining_counts, pretraining_sums)
    engine.finish()
    if dist.is_main:
        write_record(run.final, data)
        print(f"done: {run.final}")
    return 0
