"""`mobilebert bench`: the command around `mobilebert.deploy.bench` (every backend, one process, interleaved)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mobilebert.cli import positive_int
from mobilebert.config import preset
from mobilebert.deploy.backends import BUILDERS, DEFAULT_BACKENDS
from mobilebert.deploy.bench import format_results, plot, run_bench
from mobilebert.errors import UserError


def main(args: argparse.Namespace) -> int:
    names = args.backends or list(DEFAULT_BACKENDS)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise UserError(f"unknown backend {unknown[0]!r}: choose from {', '.join(BUILDERS)}")
    cfg = preset(args.preset)
    reports = []
    with tempfile.TemporaryDirectory(prefix="mobilebert-bench-") as tmp:  # one for every length: files built once
        for seq in args.seq:
            report = run_bench(cfg, names, args.threads, args.batch, seq, args.warmup, args.repetitions,
                               args.checkpoint, memory=args.memory, workdir=Path(tmp))
            print(format_results(report))
            if args.plot:
                path = Path(args.plot)
                path = path.with_name(f"{path.stem}-{seq}{path.suffix}") if len(args.seq) > 1 else path
                print(f"plot: {plot(report, path)}")
            reports.append(report)
    print(json.dumps(reports[0] if len(reports) == 1 else reports))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mobilebert", help="model shape with random weights (default mobilebert)")
    parser.add_argument("--checkpoint", help="time this checkpoint's backbone instead of a random preset")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help=f"from {', '.join(BUILDERS)} (default: {' '.join(DEFAULT_BACKENDS)})")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads for every runtime (default 2)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--seq", type=positive_int, nargs="+", default=[128], help="sequence lengths, e.g. 128 384")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repetitions", type=positive_int, default=20, help="timed calls per backend, interleaved")
    parser.add_argument("--plot", help="write a latency bar chart (PNG) here")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory column (one short extra process per backend)")
