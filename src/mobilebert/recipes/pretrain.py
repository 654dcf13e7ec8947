"""`mobilebert pretrain`: masked-LM + next-sentence pre-training of any preset (the IB-BERT teacher first of all).

The paper trains IB-BERT-large like BERT-large (MOBILEBERT.md §5): sentence pairs with 50% random next sentence,
15% masking, LAMB. This recipe does that on any corpus, at any scale, on one process or under torchrun.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilebert.config import preset
from mobilebert.data.corpus import load_corpus
from mobilebert.data.pretraining import (
    IGNORE_INDEX,
    MaskSettings,
    PairDataset,
    PairSettings,
    PretrainingBatches,
    cached_pairs,
    create_pairs,
)
from mobilebert.errors import UserError
from mobilebert.heads import MobileBertForPreTraining
from mobilebert.recipe_config import load_config, save_config
from mobilebert.tokenizer import Tokenizer
from mobilebert.train.loop import Distributed, Engine, TrainOptions, micro_batches, open_run


@dataclass
class ModelOptions:
    preset: str = "ib-bert-demo"
    overrides: dict[str, Any] = field(default_factory=dict)  # MobileBertConfig fields, e.g. num_hidden_layers
    init_from: str | None = None  # start from this checkpoint instead of random weights


@dataclass
class DataOptions:
    # builtin | text file or folder | parquet/json/arrow file | datasets hub id; or a list of those, concatenated.
    # A hub id may carry its config after a colon: wikimedia/wikipedia:20231101.en
    corpus: str | list[str] = "builtin"
    train_split: str = "train"
    validation_split: str = "validation"  # hub corpora with one split: e.g. train_split train[:99%], this train[99%:]
    text_field: str = "text"
    max_documents: int | None = None  # read at most this many documents (quick trials on big corpora)
    tokenizer: str | None = None  # folder with tokenizer.json or vocab.txt; None: train one on the corpus
    vocab_size: int = 8192  # for a trained tokenizer
    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    dupe_factor: int = 1
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word_masking: bool = False
    eval_examples: int = 512  # validation pairs scored at each evaluation
    eval_batch_size: int = 64
    cache_dir: str | None = None  # where tokenized pairs are cached; default OUT/cache


@dataclass
class PretrainOptions:
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainOptions = field(default_factory=TrainOptions)


@dataclass
class PretrainingData:
    tokenizer: Tokenizer
    train: PairDataset
    validation: PairDataset


def prepare_data(options: DataOptions, out: Path, dist: Distributed) -> PretrainingData:
    """Tokenizer (trained once, or loaded) and the cached train/validation pairs. The main process goes first."""
    data = None
    for turn in ("main", "others"):
        if (turn == "main") == dist.is_main:
            data = _prepare_data(options, out)
        dist.barrier()
    return data


def _prepare_data(options: DataOptions, out: Path) -> PretrainingData:
    corpus = {split: _read(options, split) for split in ("train", "validation")}
    tokenizer_dir = Path(options.tokenizer) if options.tokenizer else out / "tokenizer"
    if options.tokenizer or (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = Tokenizer.train(corpus["train"], vocab_size=options.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    cache = Path(options.cache_dir) if options.cache_dir else out / "cache"
    pairs = {}
    for split, documents in corpus.items():
        settings = PairSettings(options.max_seq_length, options.short_seq_prob,
                                options.dupe_factor if split == "train" else 1, seed=12345 + (split != "train"))
        key = {"corpus": _fingerprint(documents), "vocab": _fingerprint([tokenizer.convert_ids_to_tokens(
            list(range(tokenizer.vocab_size)))]), "settings": settings.__dict__, "split": split}
        pairs[split] = cached_pairs(cache, key, lambda d=documents, s=settings: create_pairs(
            _tokenize(tokenizer, d), tokenizer.cls_id, tokenizer.sep_id, s))
    return PretrainingData(tokenizer, pairs["train"], pairs["validation"])


def _read(options: DataOptions, split: str) -> list[list[str]]:
    split_name = options.train_split if split == "train" else options.validation_split
    documents: list[list[str]] = []
    for source in [options.corpus] if isinstance(options.corpus, str) else options.corpus:
        name, config = source, None
        if ":" in source and not Path(source).exists():
            name, config = source.rsplit(":", 1)
        documents.extend(load_corpus(name, split=split_name, config_name=config, text_field=options.text_field))
    return documents[: options.max_documents] if options.max_documents else documents


def _tokenize(tokenizer: Tokenizer, documents: list[list[str]]) -> list[list[list[int]]]:
    flat = tokenizer.encode_batch([s for doc in documents for s in doc])
    out, i = [], 0
    for doc in documents:
        out.append(flat[i:i + len(doc)])
        i += len(doc)
    return out


def _fingerprint(documents: list[list[str]]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        for sentence in doc:
            h.update(sentence.encode())
            h.update(b"\n")
        h.update(b"\n")
    return h.hexdigest()[:16]


def batches_for(pairs: PairDataset, tokenizer: Tokenizer, options: DataOptions, batch_size: int, seed: int,
                rank: int = 0, world_size: int = 1) -> PretrainingBatches:
    word_start = np.array(tokenizer.word_starts(range(tokenizer.vocab_size))) if options.whole_word_masking else None
    masking = MaskSettings(options.masked_lm_prob, options.max_predictions_per_seq, options.whole_word_masking)
    return PretrainingBatches(pairs, batch_size, tokenizer.vocab_size, tokenizer.mask_id, tokenizer.pad_id,
                              tokenizer.special_ids, masking, seed, word_start, rank, world_size)


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


def build_model(options: ModelOptions, vocab_size: int, max_seq_length: int) -> MobileBertForPreTraining:
    if options.init_from:
        return MobileBertForPreTraining.from_pretrained(options.init_from)
    cfg = preset(options.preset, **{"vocab_size": vocab_size, **options.overrides})
    if max_seq_length > cfg.max_position_embeddings:
        raise UserError(f"data.max_seq_length {max_seq_length} exceeds the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")
    return MobileBertForPreTraining(cfg)


def main(args: argparse.Namespace) -> int:
    options = load_config(PretrainOptions, args.config, args.overrides)
    opened = open_run(args.out, args.resume, args.overwrite, options.train.device)
    if opened is None:
        return 0
    dist, run = opened
    if dist.is_main:
        save_config(options, run.config)
    data = prepare_data(options.data, run.root, dist)
    torch.manual_seed(options.train.seed)
    model = build_model(options.model, data.tokenizer.vocab_size, options.data.max_seq_length)
    train = batches_for(data.train, data.tokenizer, options.data, options.train.batch_size, options.train.seed,
                        dist.rank, dist.world_size)
    validation = batches_for(data.validation, data.tokenizer, options.data, options.data.eval_batch_size, seed=1)
    eval_batches = max(1, math.ceil(min(options.data.eval_examples, len(data.validation))
                                    / options.data.eval_batch_size))
    engine = Engine(model, options.train, run, dist, tokenizer=data.tokenizer,
                    evaluate=lambda: evaluate_pretraining(model, validation, eval_batches, dist.device))
    if dist.is_main:
        print(f"pre-training {options.model.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters) on {len(data.train)} pairs, {dist.world_size} process(es), {dist.device}")
    for step in engine.steps(resume=args.resume):
        engine.step(micro_batches(train.batch(step), options.train.micro_batch_size), pretraining_counts,
                    pretraining_sums)
    engine.finish()
    if dist.is_main:
        print(f"done: {run.final}")
    return 0
