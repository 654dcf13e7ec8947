"""`mobilebert prepare`: a corpus made into sharded, memory-mappable NSP pairs once, for every rank and recipe.

It reads the `data` section of a pretrain/distill config (or defaults plus `--data.KEY value` overrides), so the same
file that trains also prepares: `mobilebert prepare --config configs/paper/ib-bert-large.yaml --out data/wiki-books`,
then `mobilebert pretrain --config configs/paper/ib-bert-large.yaml --data.prepared data/wiki-books ...`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobilebert.data.prepare import prepare, summary
from mobilebert.data.training import DataOptions
from mobilebert.recipes.config import load_config


@dataclass
class PrepareOptions:
    """A pretrain or distill config: its data section says what to prepare; the other sections are read and ignored."""

    data: DataOptions = field(default_factory=DataOptions)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)


def main(args: argparse.Namespace) -> int:
    shorthand = [(key, getattr(args, key)) for key in ("corpus", "tokenizer", "workers") if getattr(args, key)]
    options = load_config(PrepareOptions, args.config,
                          args.overrides + [a for k, v in shorthand for a in (f"--data.{k}", str(v))]).data
    settings = options.prepare_settings()
    finished_before = args.resume and (Path(args.out) / "manifest.json").is_file()
    began = time.perf_counter()
    manifest = prepare(settings, Path(args.out), options.tokenizer, options.vocab_size, options.workers,
                       resume=args.resume, overwrite=args.overwrite)
    seconds = time.perf_counter() - began
    if finished_before:
        print(f"{args.out} was already complete: {summary(manifest)}")
        return 0
    print(f"prepared {summary(manifest)}")
    print(f"{manifest['text_bytes'] / 1e6 / max(seconds, 1e-9):.2f} MB/s over {seconds:.1f} s; train with "
          f"--data.prepared {args.out}")
    return 0
