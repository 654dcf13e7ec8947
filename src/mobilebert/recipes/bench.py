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
    plots = {seq: _plot_path(args.plot, seq, len(args.seq) > 1, args.overwrite) for seq in args.seq} if args.plot \
        else {}
    reports = []
    with tempfile.TemporaryDirectory(prefix="mobilebert-bench-") as tmp:  # one for every length: files built once
        for seq in args.seq:
            report = run_bench(cfg, names, args.threads, args.batch, seq, args.warmup, args.repetitions,
                               args.checkpoint, memory=args.memory, workdir=Path(tmp))
            print(format_results(report))
            if seq in plots:
                print(f"plot: {plot(report, plots[seq])}")
            reports.append(report)
    print(json.dumps(reports[0] if len(reports) == 1 else reports))
    return 0


def _plot_path(plot_file: str, seq: int, per_length: bool, overwrite: bool) -> Path:
    """Where the chart of length `seq` goes, checked before the benchmark runs: a format matplotlib writes, a folder
    it can be made in, no earlier file replaced unless asked."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(plot_file)
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise UserError(f"--plot {plot_file}: name a .png, .svg or .pdf file (matplotlib writes {', '.join(formats)})")
    path = path.with_name(f"{path.stem}-{seq}{path.suffix}") if per_length else path
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists; pass --overwrite to replace it, or choose another --plot")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--plot {plot_file}: cannot make its folder ({e.strerror})") from None
    return path


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
    parser.add_argument("--plot", help="write a latency bar chart here (.png, .svg, .pdf; its folder is made); with "
                                       "several --seq, one file per length (NAME-LENGTH.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --plot files")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory column (one short extra process per backend)")
