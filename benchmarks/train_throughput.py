"""Training throughput of the engine, and its overhead against a bare PyTorch loop doing the same steps.

Both sides train identical copies of one model on the same batches with the same LAMB optimizer, schedule and
gradient clipping; steps are interleaved (engine, bare, engine, bare, ...) so machine drift hits both alike
(docs/benchmarks.md). Prints a table, then one JSON line.

    python benchmarks/train_throughput.py --presets mobilebert-demo ib-bert-demo --threads 2
    python benchmarks/train_throughput.py --presets mobilebert ib-bert-large --batch 8 --steps 4
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import mobilebert as mb
from mobilebert.tables import format_table
from mobilebert.train.loop import Distributed, Engine, TrainOptions, micro_batches
from mobilebert.train.optim import build_optimizer, build_scheduler, clip_grad_norm, parameter_groups
from mobilebert.train.pretraining import pretraining_counts, pretraining_sums
from mobilebert.train.rundir import RunDir


def random_batch(cfg: mb.MobileBertConfig, batch: int, seq: int, generator: torch.Generator) -> dict:
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=generator)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(batch, seq, generator=generator) < 0.15
    labels[masked] = ids[masked]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": labels, "next_sentence_label": torch.randint(0, 2, (batch,), generator=generator)}


def bare_step(model, optimizer, scheduler, batch) -> float:
    """What a hand-written loop does: forward, loss, backward, clip, step."""
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"],
                masked_only=True)
    masked = batch["labels"][batch["labels"] != -100]
    loss = F.cross_entropy(out.prediction_logits, masked) + F.cross_entropy(out.seq_relationship_logits,
                                                                           batch["next_sentence_label"])
    loss.backward()
    clip_grad_norm(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(name: str, batch_size: int, seq: int, steps: int, warmup: int) -> dict:
    cfg = mb.preset(name)
    torch.manual_seed(0)
    model = mb.MobileBertForPreTraining(cfg)
    bare = copy.deepcopy(model)
    options = TrainOptions(steps=steps + warmup, batch_size=batch_size, lr=1e-3, tensorboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        run.prepare(resume=False, overwrite=False)
        engine = Engine(model, options, run, Distributed())
        optimizer = build_optimizer("lamb", parameter_groups(bare, 0.01), lr=1e-3, eps=1e-6)
        scheduler = build_scheduler(optimizer, steps + warmup)
        generator = torch.Generator().manual_seed(1)
        times: dict[str, list[float]] = {"engine": [], "bare": []}
        for i in range(steps + warmup):
            batch = random_batch(cfg, batch_size, seq, generator)
            for side in ("engine", "bare") if i % 2 == 0 else ("bare", "engine"):
                start = time.perf_counter()
                if side == "engine":
                    engine.step(micro_batches(batch, None), pretraining_counts, pretraining_sums)
                    run.log({"step": i + 1, **engine.last})
                else:
                    bare.train()
                    bare_step(bare, optimizer, scheduler, batch)
                if i >= warmup:
                    times[side].append(time.perf_counter() - start)
    tokens = batch_size * seq
    med = {side: statistics.median(t) for side, t in times.items()}
    return {"preset": name, "batch": batch_size, "seq": seq, "steps": steps,
            "engine_tokens_per_s": tokens / med["engine"], "bare_tokens_per_s": tokens / med["bare"],
            "engine_p90_s": sorted(times["engine"])[int(0.9 * (len(times["engine"]) - 1))],
            "overhead": med["engine"] / med["bare"] - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["mobilebert-demo", "ib-bert-demo"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(p, args.batch, args.seq, args.steps, args.warmup) for p in args.presets]
    cpu = platform.processor() or platform.machine()
    print(f"training throughput, fp32, {args.threads} threads, batch {args.batch} × seq {args.seq}, LAMB, "
          f"median of {args.steps} interleaved steps; torch {torch.__version__}, {cpu}")
    print(format_table(["preset", "engine tok/s", "bare tok/s", "engine overhead"],
                       [[r["preset"], f"{r['engine_tokens_per_s']:.0f}", f"{r['bare_tokens_per_s']:.0f}",
                         f"{100 * r['overhead']:+.1f}%"] for r in results]))
    print(json.dumps({"benchmark": "train_throughput", "threads": args.threads, "torch": torch.__version__,
                      "results": results}))


if __name__ == "__main__":
    main()
