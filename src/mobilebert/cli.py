"""The `mobilebert` command line. Each command is a recipe's plain `main(args)`; this file only parses."""

from __future__ import annotations

import argparse
import logging
import sys

from mobilebert.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobilebert",
        description="MobileBERT (Sun et al., ACL 2020) end to end: models, training, distillation, deployment.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    presets = commands.add_parser("presets", help="list the model presets with parameter counts and FLOPs",
                                  description="List every preset: shape, backbone parameters and FLOPs.")
    presets.add_argument("--seq-len", type=int, default=128, help="sequence length for FLOPs (default: 128)")

    demo = commands.add_parser("demo", help="run the pipeline on the built-in corpus and write a report",
                               description="Run what the pipeline has so far: every preset built and measured, "
                                           "and a checkpoint round trip through transformers' format.")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "presets":
            from mobilebert.recipes.presets import main as run
        else:
            from mobilebert.recipes.demo import main as run
        return run(args) or 0
    except UserError as e:
        print(f"mobilebert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobilebert {args.command}: interrupted", file=sys.stderr)
        return 130
