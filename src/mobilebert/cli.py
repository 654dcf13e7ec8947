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

    pretrain = commands.add_parser(
        "pretrain", help="masked-LM + next-sentence pre-training of any preset (the IB-BERT teacher first)",
        description="Pre-train a model with masked-LM and next-sentence prediction. Options come from the "
                    "dataclass defaults, then --config FILE.yaml, then overrides such as --train.lr 1e-3 or "
                    "--model.preset ib-bert-large (a unique leaf name works too: --lr 1e-3).",
        epilog="Multi-GPU: torchrun --nproc_per_node 8 -m mobilebert pretrain --config configs/paper/"
               "ib-bert-large.yaml --out runs/teacher")
    _add_run_arguments(pretrain)

    distill = commands.add_parser(
        "distill", help="knowledge transfer teacher → MobileBERT student (PKT, JKT or AKT), then distillation",
        description="Transfer a pre-trained IB-BERT teacher into a MobileBERT student: layer-wise feature-map and "
                    "attention transfer (progressive, joint or auxiliary), then pre-training distillation. Options "
                    "as for pretrain, plus the distill section (see configs/demo/distill-pkt.yaml).")
    distill.add_argument("--teacher", help="teacher checkpoint folder (e.g. runs/teacher/final)")
    distill.add_argument("--student", help="student preset (default mobilebert-demo)")
    distill.add_argument("--strategy", choices=["pkt", "jkt", "akt"], help="progressive, joint or auxiliary")
    _add_run_arguments(distill)

    demo = commands.add_parser("demo", help="run the pipeline on the built-in corpus and write a report",
                               description="Run what the pipeline has so far: every preset built and measured, "
                                           "and a checkpoint round trip through transformers' format.")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    return parser


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of options (sections model, data, train)")
    parser.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints/, final/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier results in --out and start again")


TRAINING_COMMANDS = ("pretrain", "distill")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in TRAINING_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "presets":
            from mobilebert.recipes.presets import main as run
        elif args.command == "pretrain":
            from mobilebert.recipes.pretrain import main as run
        elif args.command == "distill":
            from mobilebert.recipes.distill import main as run
        else:
            from mobilebert.recipes.demo import main as run
        return run(args) or 0
    except UserError as e:
        print(f"mobilebert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobilebert {args.command}: interrupted", file=sys.stderr)
        return 130
