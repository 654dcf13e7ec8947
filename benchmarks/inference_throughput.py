"""Eager inference throughput in fp32 and bf16, on CPU or CUDA, with bf16's error against fp32.

The candidates hold the same weights and get the same inputs: `fp32`, `bf16-autocast` (fp32 weights under
`torch.autocast`, what `--train.precision bf16` evaluates with), `bf16` (the weights cast to bf16) and, with
`--compile`, `bf16-compiled` (the bf16 model through `torch.compile`). Repetitions are interleaved, the order
rotating each time, so drift hits every candidate alike (docs/benchmarks.md); on CUDA each timed call ends with
`torch.cuda.synchronize()`. Errors are max |candidate − fp32| / max |fp32| per output of a question-answering head
on random weights (MobileBERT's activations reach 1e8, so absolute errors mean nothing), and the share of start
and end positions (argmax) that agree. Prints a table, then one JSON line.

    python benchmarks/inference_throughput.py --device cuda --preset mobilebert --batch 1 256
    python benchmarks/inference_throughput.py --preset mobilebert-tiny --batch 1 8 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from devices import add_device_option, chosen_device, describe, synchronize

import mobilebert as mb
from mobilebert.tables import format_table


def candidates(model: torch.nn.Module, compile_: bool) -> dict[str, Callable[[dict], dict]]:
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    device = next(model.parameters()).device.type

    def run(module: Callable, autocast: bool = False) -> Callable[[dict], dict]:
        def call(batch: dict) -> dict:
            with torch.inference_mode(), torch.autocast(device, torch.bfloat16) if autocast else \
                    contextlib.nullcontext():
                out = module(**batch)
            return {"start_logits": out.start_logits.float(), "end_logits": out.end_logits.float()}
        return call

    found = {"fp32": run(model), "bf16-autocast": run(model, autocast=True), "bf16": run(bf16)}
    if compile_:
        found["bf16-compiled"] = run(torch.compile(bf16))
    return found


def random_batch(cfg: mb.MobileBertConfig, batch: int, seq: int, device: torch.device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "token_type_ids": torch.zeros_like(ids).to(device)}


def errors(out: dict, ref: dict) -> dict[str, float]:
    worst = max(float((out[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in ref)
    agree = statistics.mean(float((out[k].argmax(-1) == ref[k].argmax(-1)).float().mean()) for k in ref)
    return {"relative_error": worst, "argmax_agreement": agree}


def measure(runs: dict[str, Callable], cfg: mb.MobileBertConfig, batch: int, seq: int, reps: int, warmup: int,
            device: torch.device) -> list[dict]:
    inputs = random_batch(cfg, batch, seq, device, seed=batch)
    reference = runs["fp32"](inputs)
    quality = {name: errors(run(inputs), reference) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(reps + warmup):
        for name in names[i % len(names):] + names[:i % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            runs[name](inputs)
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return [{"candidate": name, "batch": batch, "seq": seq, "median_ms": 1e3 * statistics.median(times[name]),
             "sequences_per_s": batch / statistics.median(times[name]), **quality[name]} for name in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mobilebert")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30, help="timed calls per candidate and batch size")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    add_device_option(parser)
    parser.add_argument("--compile", action="store_true", help="add the bf16 model through torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = chosen_device(args)
    cfg = mb.preset(args.preset)
    torch.manual_seed(0)
    model = mb.MobileBertForQuestionAnswering(cfg).eval().to(device)
    runs = candidates(model, args.compile)
    results = [r for b in args.batch for r in measure(runs, cfg, b, args.seq, args.reps, args.warmup, device)]
    where = describe(device, args.threads)
    print(f"eager inference, {args.preset} + question-answering head (random weights), seq {args.seq}, median of "
          f"{args.reps} interleaved calls; torch {torch.__version__}, {where}")
    print(format_table(["candidate", "batch", "ms / call", "sequences / s", "max rel. error", "argmax agree"],
                       [[r["candidate"], r["batch"], f"{r['median_ms']:.2f}", f"{r['sequences_per_s']:.0f}",
                         f"{r['relative_error']:.1e}", f"{r['argmax_agreement']:.3f}"] for r in results]))
    print(json.dumps({"benchmark": "inference_throughput", "device": where, "preset": args.preset,
                      "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
