"""`mobilebert predict`: a fine-tuned model on the user's own text, one JSON line per example (see `Predictor`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mobilebert.errors import UserError
from mobilebert.files import atomic_write
from mobilebert.predict import Example, Predictor, check_example


def main(args: argparse.Namespace) -> int:
    if args.out:  # checked before any work
        out = Path(args.out)
        if not out.parent.is_dir():
            raise UserError(f"{args.out}: its folder does not exist")
        if args.input and args.input != "-" and out.resolve() == Path(args.input).resolve():
            raise UserError(f"{args.out}: is the --input file; write the predictions elsewhere")
        if out.exists() and not getattr(args, "overwrite", False):
            raise UserError(f"{args.out}: exists; pass --overwrite to replace it, or choose another --out")
    predictor = Predictor.from_pretrained(args.model, task=args.task, threads=args.threads,
                                          batch_size=args.batch_size)
    fields = predictor.fields
    if args.texts and args.input:
        raise UserError("give the example's texts as arguments or --input FILE, not both")
    if args.texts:
        if len(args.texts) != len(fields):
            raise UserError(f"{predictor.task.name} needs {len(fields)} text(s) per example ({', '.join(fields)}); "
                            f"got {len(args.texts)}")
        examples = [dict(zip(fields, args.texts, strict=True))]
        check_example(examples[0], fields, "arguments")
    else:
        source = args.input or "-"
        if source == "-" and sys.stdin.isatty():
            raise UserError("no input: give an example's texts as arguments, --input FILE, or pipe lines in")
        lines = sys.stdin.read().splitlines() if source == "-" else _read_lines(Path(source))
        columns = predictor.task.glue.text_columns if predictor.task.glue else ()  # the hub's names, e.g. sentence1
        aliases = dict(zip(columns, fields, strict=False))
        examples = read_examples(lines, fields, "standard input" if source == "-" else source, aliases)
    predictions = predictor(examples, progress=len(examples) > predictor.batch_size)
    text = "".join(json.dumps({"input": ex, **p}, ensure_ascii=False) + "\n"
                   for ex, p in zip(examples, predictions, strict=True))
    if args.out:
        atomic_write(Path(args.out), lambda p: p.write_text(text, encoding="utf-8"))
        print(f"{len(examples)} predictions written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: no such input file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of line 1
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_examples(lines: Sequence[str], fields: Sequence[str], where: str,
                  aliases: dict[str, str] | None = None) -> list[Example]:
    """Examples from JSON lines (objects with the task's keys, or their `aliases`, e.g. the hub's column names) or
    TSV lines (one column per key); blank lines are skipped. A line that is neither names its number and what was
    expected."""
    aliases = aliases or {}
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where} line {number}: a JSON line must be an object with {', '.join(fields)}")
            example = {aliases.get(k, k): v for k, v in record.items() if aliases.get(k, k) in fields}
        else:
            columns = line.split("\t")
            if len(columns) != len(fields):
                raise UserError(f"{where} line {number}: {len(columns)} tab-separated column(s); this task needs "
                                f"{len(fields)} ({', '.join(fields)})")
            example = dict(zip(fields, columns, strict=True))
        check_example(example, fields, f"{where} line {number}")
        examples.append(example)
    if not examples:
        raise UserError(f"{where}: no examples")
    return examples
