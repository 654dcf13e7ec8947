"""Training throughput of the engine, and its overhead against a bare PyTorch loop doing the same steps.

Both sides train identical copies of one model on the same batches with the same LAMB optimizer, schedule and
gradient clipping; steps are interleaved (engine, bare, engine, bare, ...) so machine drift hits both alike
(docs/benchmarks.md). Prints a table, then one JSON line.

    python benchmarks/train_throughput.py --presets mobilebert-demo ib-bert-demo --threads 2
    python benchmarks/train_throughput.py --presets mobilebert ib-bert-large --batch 8 --steps 4
    python benchmarks/train_throughput.py --device cuda --presets mobilebert ib-bert-large --batch 64 \
        --precision fp32 bf16

On CUDA every timed step ends with `torch.cuda.synchronize()`, so a step's time is its GPU work, not its launch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from devices import add_device_option, chosen_device, describe, synchronize

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


def bare_step(model, optimizer, scheduler, batch, precision: str) -> float:
    """What a hand-written loop does: forward, loss, backward, clip, step."""
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"],
                    masked_only=True)
    masked = batch["labels"][batch["labels"] != -100]
    # fp32 losses, as the engine's (bf16 logits under autocast)
    loss = F.cross_entropy(out.prediction_logits.float(), masked) + F.cross_entropy(
        out.seq_relationship_logits.float(), batch["next_sentence_label"])
    loss.backward()
    clip_grad_norm(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure(name: str, batch_size: int, seq: int, steps: int, warmup: int, device: torch.device,
            precision: str) -> dict:
    cfg = mb.preset(name)
    torch.manual_seed(0)
    model = mb.MobileBertForPreTraining(cfg)
    bare = copy.deepcopy(model).to(device)
    options = TrainOptions(steps=steps + warmup, batch_size=batch_size, lr=1e-3, tensorboard=False,
                           precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        run.prepare(resume=False, overwrite=False)
        engine = Engine(model, options, run, Distributed(device=device))
        optimizer = build_optimizer("lamb", parameter_groups(bare, 0.01), lr=1e-3, eps=1e-6)
        scheduler = build_scheduler(optimizer, steps + warmup)
        generator = torch.Generator().manual_seed(1)
        times: dict[str, list[float]] = {"engine": [], "bare": []}
        for i in range(steps + warmup):
            batch = {k: v.to(device) for k, v in random_batch(cfg, batch_size, seq, generator).items()}
            for side in ("engine", "bare") if i % 2 == 0 else ("bare", "engine"):
                synchronize(device)
                start = time.perf_counter()
                if side == "engine":
                    engine.step(micro_batches(batch, None), pretraining_counts, pretraining_sums)
                    run.log({"step": i + 1, **engine.last})
                else:
                    bare.train()
                    bare_step(bare, optimizer, scheduler, batch, precision)
                synchronize(device)
                if i >= warmup:
                    times[side].append(time.perf_counter() - start)
    tokens = batch_size * seq
    med = {side: statistics.median(t) for side, t in times.items()}
    return {"preset": name, "precision": precision, "batch": batch_size, "seq": seq, "steps": steps,
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
    add_device_option(parser)
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                        help="bf16: autocast on both sides, as `--train.precision bf16`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = chosen_device(args)
    results = [measure(p, args.batch, args.seq, args.steps, args.warmup, device, precision)
               for p in args.presets for precision in args.precision]
    where = describe(device, args.threads)
    print(f"training throughput, batch {args.batch} × seq {args.seq}, LAMB, median of {args.steps} interleaved "
          f"steps; torch {torch.__version__}, {where}")
    print(format_table(["preset", "precision", "engine tok/s", "bare tok/s", "engine overhead"],
                       [[r["preset"], r["precision"], f"{r['engine_tokens_per_s']:.0f}",
                         f"{r['bare_tokens_per_s']:.0f}", f"{100 * r['overhead']:+.1f}%"] for r in results]))
    print(json.dumps({"benchmark": "train_throughput", "device": where, "threads": args.threads,
                      "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
