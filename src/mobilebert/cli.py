"""The `mobilebert` command line. Each command is a recipe's plain `main(args)`; this file only parses."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from mobilebert.errors import UserError


def positive_int(text: str) -> int:
    """An argparse type: a count or size, 1 or more (0 and negatives would fail deep inside, or mean nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobilebert",
        description="MobileBERT (Sun et al., ACL 2020) end to end: models, training, distillation, deployment.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    presets = commands.add_parser("presets", help="list the model presets with parameter counts and FLOPs",
                                  description="List every preset: shape, backbone parameters and FLOPs.")
    presets.add_argument("--seq-len", type=positive_int, default=128, help="sequence length for FLOPs (default: 128)")

    pretrain = commands.add_parser(
        "pretrain", help="masked-LM + next-sentence pre-training of any preset (the IB-BERT teacher first)",
        description="Pre-train a model with masked-LM and next-sentence prediction. Options come from the "
                    "dataclass defaults, then --config FILE.yaml, then overrides such as --train.lr 1e-3 or "
                    "--model.preset ib-bert-large (a unique leaf name works too: --lr 1e-3).",
        epilog="Multi-GPU: torchrun --nproc_per_node 8 -m mobilebert pretrain --config configs/paper/"
               "ib-bert-large.yaml --out runs/teacher")
    _add_run_arguments(pretrain)

    prep = commands.add_parser(
        "prepare", help="corpus -> tokenizer -> sharded NSP pairs on disk, in parallel, for pretrain and distill",
        description="Prepare a corpus once for pre-training and distillation: train a WordPiece tokenizer on it (or "
                    "load --tokenizer), tokenize it and cut BERT's next-sentence pairs in worker processes, and "
                    "write shards of flat token arrays with a manifest (counts, sha256 of every file). Memory does "
                    "not grow with the corpus; the bytes written do not depend on the number of workers; an "
                    "interrupted preparation continues with --resume. Options: the data section of a pretrain "
                    "config (--config FILE) and --data.KEY overrides, e.g. --data.max_seq_length 512 "
                    "--data.dupe_factor 5 --data.shard_mb 16 --data.holdout_every 1000.",
        epilog="Example: mobilebert prepare --corpus corpus/ --tokenizer google-vocab/ --data.max_seq_length 512 "
               "--out prepared/ ; then: mobilebert pretrain --data.prepared prepared/ --out runs/teacher")
    prep.add_argument("--config", help="YAML file whose data section says what to prepare")
    prep.add_argument("--out", required=True, help="the prepared-data folder to write")
    prep.add_argument("--corpus", help="a source: builtin, a text file or folder, a parquet/json/arrow file, a hub id")
    prep.add_argument("--tokenizer", help="folder with tokenizer.json or vocab.txt (default: train one)")
    prep.add_argument("--workers", type=positive_int, help="worker processes (default: every core)")
    prep.add_argument("--resume", action="store_true", help="continue an interrupted preparation")
    prep.add_argument("--overwrite", action="store_true", help="delete --out and start again")

    distill = commands.add_parser(
        "distill", help="knowledge transfer teacher → MobileBERT student (PKT, JKT or AKT), then distillation",
        description="Transfer a pre-trained IB-BERT teacher into a MobileBERT student: layer-wise feature-map and "
                    "attention transfer (progressive, joint or auxiliary), then pre-training distillation. Options "
                    "as for pretrain, plus the distill section (see configs/demo/distill-pkt.yaml).")
    distill.add_argument("--teacher", help="teacher checkpoint folder (e.g. runs/teacher/final)")
    distill.add_argument("--student", help="student preset (default mobilebert-demo)")
    distill.add_argument("--strategy", choices=["pkt", "jkt", "akt"], help="progressive, joint or auxiliary")
    _add_run_arguments(distill)

    finetune = commands.add_parser(
        "finetune", help="fine-tune a checkpoint on a GLUE task, SQuAD or a built-in task (with a small search)",
        description="Fine-tune any MobileBERT checkpoint (ours, or a transformers-format one such as "
                    "google/mobilebert-uncased) on a task: cola sst2 mrpc stsb qqp mnli qnli rte wnli, squad1, "
                    "squad2, or builtin-order builtin-next builtin-overlap builtin-qa. Every combination of "
                    "search.lr x search.batch_size x search.epochs runs with every seed in search.seeds (empty "
                    "lists: the paper's defaults for the task family); the best trial by dev metric becomes "
                    "OUT/final, results go to OUT/results.json and OUT/results.md.",
        epilog="Example: mobilebert finetune --checkpoint runs/student/final --task mrpc --task.data_dir "
               "glue_data --search.lr '[1e-5, 3e-5, 5e-5]' --search.seeds '[0, 1, 2]' --out runs/mrpc")
    finetune.add_argument("--checkpoint", help="checkpoint folder or hub id (or model.checkpoint in the config)")
    finetune.add_argument("--task", help="task name (or task.name in the config)")
    finetune.add_argument("--teacher", help="task distillation: a checkpoint already fine-tuned on this task; the "
                                            "loss becomes distill.beta x task loss + (1 - beta) x KD on its outputs "
                                            "(or distill.teacher in the config)")
    _add_run_arguments(finetune, "run folder: config.yaml, results.json and results.md (every trial's scores), "
                                 "final/ (the best trial's model), trials/NAME/ (each trial a run folder)")

    evaluate = commands.add_parser(
        "evaluate", help="dev-set metrics of a fine-tuned checkpoint",
        description="Score a fine-tuned checkpoint on a labelled split with the task's official metrics; prints a "
                    "table, then one JSON line.")
    evaluate.add_argument("checkpoint", help="checkpoint folder or hub id")
    evaluate.add_argument("--task", required=True, help="task name, as for finetune")
    evaluate.add_argument("--data-dir", help="GLUE TSV / SQuAD JSON folder (default: the hub; built-in: generated)")
    evaluate.add_argument("--split", help="split to score (default: the task's first dev split)")
    evaluate.add_argument("--max-seq-length", type=positive_int,
                          help="default: what the checkpoint was fine-tuned with on this task, else the task family's")
    evaluate.add_argument("--doc-stride", type=positive_int,
                          help="QA window stride (default: the fine-tuning's, else the task family's)")
    evaluate.add_argument("--batch-size", type=positive_int, default=64)
    evaluate.add_argument("--max-examples", type=positive_int, help="score only the first N examples")

    predict = commands.add_parser(
        "predict", help="a fine-tuned model (checkpoint or export) on your own text; JSON lines out",
        description="Run a fine-tuned checkpoint folder, or a folder written by `mobilebert export` from one, on new "
                    "text. The task, label names and sequence settings come from the model's finetuning.json. Input: "
                    "the texts of one example as arguments (one text, two for sentence-pair tasks, or question and "
                    "context for QA), or many examples from --input (or standard input): TSV lines with those "
                    "columns, or JSON lines with the keys text/text_pair or question/context. Output: one JSON line "
                    "per example (input, then label and scores, score, or answer). Long contexts are read in "
                    "overlapping windows, as in SQuAD evaluation.",
        epilog="Examples: mobilebert predict runs/sst2/final 'a gripping, funny film'; mobilebert predict "
               "runs/squad/final 'Who wrote it?' 'It was written by Ann.'; mobilebert predict runs/mrpc-onnx "
               "--input pairs.tsv --out predictions.jsonl")
    predict.add_argument("model", help="fine-tuned checkpoint folder, or export folder (mobilebert export)")
    predict.add_argument("texts", nargs="*", help="one example: its one or two texts")
    predict.add_argument("--input", help="TSV or JSON-lines file of examples ('-': standard input)")
    predict.add_argument("--out", help="write the JSON lines here instead of standard output")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.add_argument("--task", help="only for a checkpoint without finetuning.json: the task of its head")
    predict.add_argument("--batch-size", type=positive_int, default=32)
    predict.add_argument("--threads", type=positive_int, help="CPU threads (default: the runtime's choice)")

    squad_eval = commands.add_parser(
        "squad-eval", help="official SQuAD v1.1/v2.0 scoring of a predictions file; prints JSON",
        description="Score predictions (a JSON object question id -> answer text) against a SQuAD v1.1 or v2.0 "
                    "data file, exactly as the official evaluation scripts do.")
    squad_eval.add_argument("data", help="the SQuAD JSON file (e.g. dev-v2.0.json)")
    squad_eval.add_argument("predictions", help="predictions JSON: {question id: answer text}")
    squad_eval.add_argument("--na-prob-file", help="v2.0: JSON {question id: probability of no answer}")
    squad_eval.add_argument("--na-prob-thresh", type=float, default=1.0,
                            help="v2.0: predict no answer above this probability (default 1.0)")

    from mobilebert.recipes.bench import add_arguments as add_bench_arguments
    from mobilebert.recipes.export import add_arguments as add_export_arguments

    export = commands.add_parser(
        "export", help="ONNX fp32 / int8 (dynamic or static), torch int8, AOTInductor, ExecuTorch and LiteRT files, "
                       "with a parity check against eager",
        description="Export a checkpoint to ONNX (dynamic batch and sequence axes), int8, an AOTInductor .pt2 "
                    "package (fp32 or bf16), an ExecuTorch program or a LiteRT (TFLite) model for phones (--format), "
                    "check it against the eager model, and write OUT/export.json with sizes, parity and versions.")
    add_export_arguments(export)

    bench = commands.add_parser(
        "bench", help="latency and throughput of every backend against transformers' references",
        description="Time eager, optimized, bf16 (optimized, compiled, AOTInductor), ONNX fp32/int8 and torch int8 "
                    "MobileBERT against transformers' MobileBertModel and BERT-base in one process (same weights, "
                    "interleaved repetitions, threads pinned). compiled-bf16 and aoti-bf16 compile first (one to two "
                    "minutes each at full size). Prints a table, then one JSON line.")
    add_bench_arguments(bench)

    demo = commands.add_parser(
        "demo", help="the whole pipeline on the built-in corpus, ending in a report",
        description="Built-in corpus -> tokenizer -> IB-BERT-shaped teacher -> PKT knowledge transfer and "
                    "distillation -> fine-tuning of teacher, distilled and undistilled students on the built-in "
                    "tasks -> int8 ONNX export -> benchmark -> OUT/report.md and OUT/report.html. Finished stages "
                    "are skipped, so an interrupted demo resumes where it stopped; a folder made with another plan "
                    "(--quick, another version's) is refused.")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="the same pipeline at toy size (about a minute)")
    demo.add_argument("--task-kd", action="store_true",
                      help="also fine-tune the distilled student on builtin-qa with task distillation from the "
                           "fine-tuned teacher (about 4 ½ more minutes of one worker; off by default for time)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of every training run and fine-tuning (default: 0); the data stay the same, so "
                           "another seed shows how much the results move with training randomness alone")
    demo.add_argument("--workers", type=positive_int, default=2,
                      help="independent stages run side by side, each with its share of the threads (default: 2; "
                           "1 runs everything in turn)")
    return parser


RUN_FOLDER = "run folder: config.yaml, metrics.jsonl, checkpoints/, final/"


def _add_run_arguments(parser: argparse.ArgumentParser, out_help: str = RUN_FOLDER) -> None:
    parser.add_argument("--config", help="YAML file of options: sections model, data, train (pretrain); distill, "
                                          "data, train (distill); model, task, search, distill, train (finetune). "
                                          "Any key can also be given as --section.key VALUE")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier results in --out and start again")


TRAINING_COMMANDS = ("prepare", "pretrain", "distill", "finetune")


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as one line naming its kind: Python's default adds the source line of the library that warned."""
    return f"warning: {message} ({category.__name__})\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "predict" and not any(r.startswith("--") for r in rest):
        args.texts, rest = args.texts + rest, []  # argparse leaves texts after an option (MODEL --task X A B) over
    if rest and args.command not in TRAINING_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        parser.error("--resume and --overwrite exclude each other")
    args.overrides = rest
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.formatwarning = _one_line_warning
    try:
        if args.command == "presets":
            from mobilebert.recipes.presets import main as run
        elif args.command == "prepare":
            from mobilebert.recipes.prepare import main as run
        elif args.command == "pretrain":
            from mobilebert.recipes.pretrain import main as run
        elif args.command == "distill":
            from mobilebert.recipes.distill import main as run
        elif args.command == "finetune":
            from mobilebert.recipes.finetune import main as run
        elif args.command == "evaluate":
            from mobilebert.recipes.evaluate import main as run
        elif args.command == "export":
            from mobilebert.recipes.export import main as run
        elif args.command == "bench":
            from mobilebert.recipes.bench import main as run
        elif args.command == "predict":
            from mobilebert.recipes.predict import main as run
        elif args.command == "squad-eval":
            from mobilebert.recipes.evaluate import squad_eval_main as run
        else:
            from mobilebert.recipes.demo import main as run
        return run(args) or 0
    except UserError as e:
        print(f"mobilebert {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobilebert {args.command}: interrupted", file=sys.stderr)
        return 130
