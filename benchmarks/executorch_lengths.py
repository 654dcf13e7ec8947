"""Latency of ONE ExecuTorch program over input lengths, against transformers' MobileBertModel at each length.

An ExecuTorch program takes every length up to the one it was exported for, and a shorter input costs less (the
runner pads nothing). This exports MobileBERT once, fp32 and int8, at `--max-length`, then for each `--lengths`
value times both programs and the references (`mobilebert bench`'s backends, same weights, same inputs: batch 1,
no padding) interleaved, each after bench's settling pause. Prints a table (ms, and the ratio to transformers'
MobileBERT at that length), then one JSON line. Needs the `mobile` extra and transformers; lowering takes about
three minutes at full size.

    python benchmarks/executorch_lengths.py                       # mobilebert, one program of 128, 2 threads
    python benchmarks/executorch_lengths.py --lengths 16 64 128 384 --max-length 384
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import mobilebert as mb
from mobilebert.deploy.backends import Backend, build_backends, random_inputs
from mobilebert.deploy.bench import measure
from mobilebert.deploy.mobile import ExecutorchModel, export_executorch
from mobilebert.tables import format_table

REFERENCES = ["optimized", "hf-mobilebert"]


def programs(model: mb.MobileBertModel, workdir: Path, length: int, threads: int) -> list[Backend]:
    """The fp32 and int8 programs of `model` for lengths up to `length`, as bench backends."""
    backends = []
    for int8 in (False, True):
        name = "executorch-int8" if int8 else "executorch"
        print(f"{name}: lowering once, for every length up to {length}")
        program = ExecutorchModel(export_executorch(model, workdir / f"{name}.pte", length=length, int8=int8),
                                  threads if not backends else None)  # the thread pool is sized once per process
        backends.append(Backend(name, lambda b, p=program: p(**b)["last_hidden_state"]))
    return backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mobilebert")
    parser.add_argument("--max-length", type=int, default=128, help="the programs' longest input (default: 128)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if max(args.lengths) > args.max_length:
        parser.error(f"--lengths must not exceed --max-length ({args.max_length})")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mb.MobileBertModel(mb.preset(args.preset)).eval()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        workdir = Path(tmp)
        backends = programs(model, workdir, args.max_length, args.threads)
        backends += build_backends(model, REFERENCES, args.threads, workdir,
                                   random_inputs(model.config.vocab_size, 1, args.max_length))
        if backends[-1].name != "hf-mobilebert":
            raise SystemExit("transformers is not installed: pip install -e '.[dev]'")
        for length in args.lengths:
            for backend in backends:
                backend.times = []
            measure(backends, random_inputs(model.config.vocab_size, 1, length, seed=length), args.warmup,
                    args.repetitions)
            ms = {b.name: 1000 * statistics.median(b.times) for b in backends}
            results.append({"length": length, "median_ms": ms})
            rows.append([length, *(f"{ms[b.name]:.2f} ({ms['hf-mobilebert'] / ms[b.name]:.2f}×)"
                                   for b in backends)])
    print(format_table(["length", *(f"{b.name} ms (× hf)" for b in backends)], rows))
    print(json.dumps({"preset": args.preset, "max_length": args.max_length, "threads": args.threads,
                      "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
