"""`mobilebert export`: a checkpoint to ONNX (fp32, int8 dynamic, int8 static), to a PyTorch int8 module, to an
AOTInductor package (fp32, bf16), to an ExecuTorch program (fp32, int8), or to a LiteRT (TFLite) model (fp32, int8).

The algorithm: load the checkpoint, export (and quantize), run export and eager model on the same held-out real
text, record sizes and the agreement with eager in DIR/export.json. fp32 must match eager to 1e-4 relative error
or the command fails; int8 and bf16 are reported as measured, never failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebert.checkpoint import CONFIG_NAME, TOKENIZER_FILES, read_config, resolve
from mobilebert.deploy.backends import BACKENDS, FORMATS, Runner, open_exported
from mobilebert.deploy.export import DEFAULT_OPSET
from mobilebert.deploy.formats import ExportOptions
from mobilebert.deploy.interface import (
    argmax_agreement,
    eager_outputs,
    example_batch,
    mobile_runtime_versions,
    relative_errors,
)
from mobilebert.deploy.onednn import cpu_bf16
from mobilebert.deploy.quantize import (
    file_size,
    state_dict_size,
)
from mobilebert.errors import UserError
from mobilebert.files import atomic_write, check_overwritable, read_json_or_none, remove_output_folder
from mobilebert.finetuning import FINETUNING_FILE
from mobilebert.heads import TASK_MODELS
from mobilebert.model import MobileBertModel
from mobilebert.tables import format_table
from mobilebert.tokenizer import Tokenizer

TASKS = {"backbone": "MobileBertModel", "pretraining": "MobileBertForPreTraining", "masked-lm": "MobileBertForMaskedLM",
         "nsp": "MobileBertForNextSentencePrediction", "seq-classification": "MobileBertForSequenceClassification",
         "multiple-choice": "MobileBertForMultipleChoice", "token-classification": "MobileBertForTokenClassification",
         "qa": "MobileBertForQuestionAnswering"}
FP32_TOLERANCE = 1e-4
EVAL_EXAMPLES = 32  # held-out examples for the parity and agreement figures
CALIBRATION_BATCH = 16

Pair = tuple[str, "str | None"]  # one example of text: a single text, or a pair such as (question, context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder or hub id")
    parser.add_argument("--out", required=True, help="output folder: the exported file(s) and export.json")
    parser.add_argument("--format", default="onnx", choices=list(FORMATS),
                        help="onnx (fp32), onnx-int8 (dynamic), onnx-int8-static (calibrated, QDQ), torch-int8 "
                             "(dynamic nn.Linear; written as a state dict), aoti / aoti-bf16 (the optimized model "
                             "compiled ahead of time by AOTInductor into a .pt2 package for this machine's CPU: the "
                             "fastest; needs a C++ compiler, takes minutes at full size), executorch / "
                             "executorch-int8 (an ExecuTorch program for phones and small devices, XNNPACK-delegated, "
                             "batch 1, any length up to --max-seq-length; int8: dynamically quantized Linears and "
                             "word table; needs mobilebert[mobile]), tflite / tflite-int8 (a LiteRT flatbuffer for "
                             "Android and iOS, XNNPACK-delegated, one signature per --lengths; int8: dynamically "
                             "quantized weights; needs mobilebert[tflite])")
    parser.add_argument("--task", choices=list(TASKS),
                        help="which head to export (default: the architecture in the checkpoint's config.json)")
    parser.add_argument("--max-seq-length", type=int, default=128,
                        help="tokens per example (default: 128); the longest input an ExecuTorch program takes")
    parser.add_argument("--lengths", type=int, nargs="+", metavar="N",
                        help="tflite: one signature per sequence length N, sharing the weights; inputs are padded to "
                             "the shortest that fits (default: --max-seq-length; given, the longest of them is the "
                             "evaluation length)")
    parser.add_argument("--choices", type=int, default=2,
                        help="multiple choice: choices per example in the evaluation batch, and an ExecuTorch "
                             "program's fixed number of them (default: 2)")
    parser.add_argument("--calibration", type=int, default=128, metavar="N",
                        help="calibration examples for onnx-int8-static (default: 128)")
    parser.add_argument("--calibration-text", metavar="FILE",
                        help="text to calibrate on (static) and to measure agreement with eager on (all formats): "
                             "one example per line, a tab separates a pair (default: sentence pairs of the built-in "
                             "corpus' validation split)")
    parser.add_argument("--calibration-method", default="minmax", choices=["minmax", "percentile"])
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--threads", type=int,
                        help="onnxruntime intra-op threads (default: its own choice); for aoti, the thread count the "
                             "package's parallel loops are built for (default: torch's, one per core); for "
                             "executorch, XNNPACK's threads for the parity check (default: one per core); for tflite, "
                             "LiteRT's (default: its own choice)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --out (a folder holding export.json); without it, only "
                             "another format of the same checkpoint may be added there")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false",
                        help="export the eager model's graph instead of optimize_for_inference's (same outputs; the "
                             "optimized graph has NoNorm folded and the projections fused, and runs faster)")


# What only an export writes: export.json (last, when it finished) or a model file (an interrupted export).
EXPORT_MARKERS = ("export.json", *FORMATS.values())


def main(args: argparse.Namespace) -> int:
    _check_arguments(args)
    out = Path(args.out)
    overwrite = getattr(args, "overwrite", False)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if overwrite:
            check_overwritable(out, EXPORT_MARKERS, "an export folder")
        else:  # another format of the same checkpoint may join it (fp32 beside int8); anything else is refused
            record = out / "export.json"
            earlier = (read_json_or_none(record) if record.is_file() else None) or {}
            if earlier.get("checkpoint") != str(args.checkpoint) or (out / FORMATS[args.format]).exists():
                held = (f"holds an export of {earlier.get('checkpoint')} ({earlier.get('format')})" if earlier
                        else "holds an unfinished export" if any((out / m).exists() for m in EXPORT_MARKERS)
                        else "exists and is not empty")
                raise UserError(f"{out}: {held}; pass --overwrite to replace it, or choose another --out")
    checkpoint = resolve(args.checkpoint)
    cls = model_class(checkpoint, args.task)
    model = cls.from_pretrained(checkpoint)
    tokenizer = _tokenizer(checkpoint)
    if args.format == "onnx-int8-static" and tokenizer is None:
        raise UserError(f"{args.checkpoint}: no tokenizer files; static quantization calibrates on real text and "
                        "needs the checkpoint's tokenizer")
    # Real text: the first N examples calibrate (static only), the next EVAL_EXAMPLES measure agreement. Read
    # before OUT is made, so that a missing file leaves no empty folder behind.
    pairs = text_pairs(args.calibration_text) if tokenizer is not None else []
    n_cal = min(args.calibration, len(pairs)) if args.format == "onnx-int8-static" else 0
    calibration, held_out = pairs[:n_cal], pairs[n_cal:n_cal + EVAL_EXAMPLES] or pairs[-EVAL_EXAMPLES:]
    batch = evaluation_batch(model, tokenizer, held_out, args.max_seq_length, args.choices)
    if BACKENDS[args.format].runtime == "litert":  # eager on the padding the longest signature runs (see litert)
        from mobilebert.deploy.litert import padded_to

        batch = padded_to(batch, _length(model, args.max_seq_length), model.config.pad_token_id)

    if overwrite:
        remove_output_folder(out, EXPORT_MARKERS, "an export folder")
    out.mkdir(parents=True, exist_ok=True)
    files, fp32_bytes, runners = export(model, args, out, tokenizer, calibration)
    _copy_side_files(checkpoint, out)
    parity = compare(model, runners, batch)
    fp32_error = max(parity["fp32"]["relative_error"].values()) if "fp32" in parity else None
    report = {"checkpoint": str(args.checkpoint), "architecture": cls.__name__, "format": args.format,
              "files": files, "fp32_bytes": fp32_bytes,
              "size_ratio": round(fp32_bytes / files[FORMATS[args.format]], 2),  # fp32 size / this format's size
              "parity": parity, "fp32_ok": fp32_error is None or fp32_error <= FP32_TOLERANCE,
              "conditions": {"examples": int(batch["input_ids"].shape[0]),
                             "sequence": int(batch["input_ids"].shape[-1]),
                             "text": "random ids" if tokenizer is None else args.calibration_text or "builtin",
                             "calibration_examples": n_cal, "held_out": len(pairs) > n_cal, "opset": args.opset,
                             "threads": args.threads, "torch_threads": torch.get_num_threads()},
              "versions": versions()}
    atomic_write(out / "export.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    print(summary(report))
    print(json.dumps({k: report[k] for k in ("format", "architecture", "files", "size_ratio", "fp32_ok")}))
    if not report["fp32_ok"]:
        print(f"mobilebert export: fp32 ONNX differs from eager by {fp32_error:.2e} relative error "
              f"(more than {FP32_TOLERANCE:g}); details in {out / 'export.json'}")
        return 1
    return 0


def export(model: nn.Module, args: argparse.Namespace, out: Path, tokenizer: Tokenizer | None,
           calibration: list[Pair]) -> tuple[dict[str, int], int, dict[str, Runner]]:
    """Write the format's files. Returns their sizes, the fp32 size, and a runner for each exported model."""
    spec = BACKENDS[args.format]
    batches = [_text_batch(model, tokenizer, calibration[i:i + CALIBRATION_BATCH], args.max_seq_length, args.choices)
               for i in range(0, len(calibration), CALIBRATION_BATCH)] if spec.calibrated else []
    options = ExportOptions(length=_length(model, args.max_seq_length),
                            lengths=tuple(_length(model, n) for n in args.lengths or ()), choices=args.choices,
                            threads=args.threads, opset=args.opset, optimize=args.optimize, calibration=batches,
                            calibration_method=args.calibration_method)
    paths = spec.export(model, out, spec.file, options)
    runners = {precision: open_exported(args.format, path, args.threads, lambda: type(model)(model.config))
               for precision, path in paths.items()}
    fp32_bytes = file_size(paths["fp32"]) if spec.runtime == "onnxruntime" else state_dict_size(model)
    return {p.name: file_size(p) for p in paths.values()}, fp32_bytes, runners


def compare(model: nn.Module, runners: dict[str, Runner], batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each exported model against eager `model` on `batch`: relative errors and argmax agreement per output."""
    reference = eager_outputs(model, batch)
    parity = {}
    for name, run in runners.items():
        candidate = run(batch)
        parity[name] = {"relative_error": relative_errors(candidate, reference),
                        "argmax_agreement": argmax_agreement(candidate, reference, batch["attention_mask"])}
    return parity


# ---- inputs ----

def model_class(checkpoint: Path, task: str | None) -> type[nn.Module]:
    """The class for `--task`, else the first of config.json's "architectures" we know, else the backbone."""
    if task is not None:
        return _class_by_name(TASKS[task])
    read_config(checkpoint)  # a UserError that names the problem when config.json is missing or wrong
    recorded = json.loads((checkpoint / CONFIG_NAME).read_text(encoding="utf-8")).get("architectures") or []
    known = [name for name in recorded if name in TASK_MODELS or name == "MobileBertModel"]
    return _class_by_name(known[0] if known else "MobileBertModel")


def _class_by_name(name: str) -> type[nn.Module]:
    return MobileBertModel if name == "MobileBertModel" else TASK_MODELS[name]


def _tokenizer(checkpoint: Path) -> Tokenizer | None:
    has_files = (checkpoint / "tokenizer.json").is_file() or (checkpoint / "vocab.txt").is_file()
    return Tokenizer.from_pretrained(checkpoint) if has_files else None


def text_pairs(path: str | None) -> list[Pair]:
    """Examples of real text: lines of `path` (a tab separates a pair), or consecutive sentences of the built-in
    corpus' validation documents."""
    if path is None:
        from mobilebert.data.corpus import load_corpus  # imported here: extracting the corpus takes seconds

        return [(doc[i], doc[i + 1]) for doc in load_corpus("builtin", split="validation")
                for i in range(0, len(doc) - 1, 2)]
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: no such calibration text file")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{file}: the calibration text file has no text")
    return [(first, second or None) for first, _, second in (line.partition("\t") for line in lines)]


def evaluation_batch(model: nn.Module, tokenizer: Tokenizer | None, pairs: list[Pair],
                     max_length: int, choices: int = 2) -> dict[str, torch.Tensor]:
    """Tokenized `pairs`, or (without a tokenizer) random ids with padding; multiple choice: `choices` per row."""
    if tokenizer is None or not pairs:
        return example_batch(model, batch=8, length=max_length, seed=1, choices=choices)
    return _text_batch(model, tokenizer, pairs, max_length, choices)


def _length(model: nn.Module, max_length: int) -> int:
    return min(max_length, model.config.max_position_embeddings)


def _text_batch(model: nn.Module, tokenizer: Tokenizer, pairs: list[Pair], max_length: int, choices: int = 2
                ) -> dict[str, torch.Tensor]:
    max_length = _length(model, max_length)
    if all(second is not None for _, second in pairs):
        batch = tokenizer.encode_pairs([a for a, _ in pairs], [b for _, b in pairs], max_length=max_length)
    else:
        batch = tokenizer.encode_pairs([" ".join(filter(None, pair)) for pair in pairs], max_length=max_length)
    if isinstance(model, TASK_MODELS["MobileBertForMultipleChoice"]):  # (B, T) -> (B/C, C, T): C choices per row
        rows = batch["input_ids"].shape[0]
        per_row = choices if rows >= choices else rows  # too little text for one full row: one shorter row
        batch = {k: v[:rows // per_row * per_row].view(-1, per_row, v.shape[-1]) for k, v in batch.items()}
    return batch


def _copy_side_files(checkpoint: Path, out: Path) -> None:
    """config.json, the tokenizer's files and a fine-tuned model's record: what inference next to the exported
    model needs."""
    for name in (CONFIG_NAME, *TOKENIZER_FILES, FINETUNING_FILE):  # the last: the task, for `mobilebert predict`
        if (checkpoint / name).is_file() and checkpoint.resolve() != out.resolve():
            shutil.copyfile(checkpoint / name, out / name)


def _check_arguments(args: argparse.Namespace) -> None:
    if args.format not in FORMATS:
        raise UserError(f"unknown format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    if args.task is not None and args.task not in TASKS:
        raise UserError(f"unknown task {args.task!r}; choose one of: {', '.join(TASKS)}")
    if args.lengths is not None:
        if BACKENDS[args.format].runtime != "litert":
            raise UserError("--lengths applies to the tflite formats (one signature per length)")
        if min(args.lengths) < 1:
            raise UserError(f"--lengths must be positive, got {min(args.lengths)}")
        args.max_seq_length = max(args.lengths)
    if args.max_seq_length < 4:
        raise UserError(f"--max-seq-length must be at least 4, got {args.max_seq_length}")
    if args.choices < 1:
        raise UserError(f"--choices must be a positive number, got {args.choices}")
    if args.calibration < 1:
        raise UserError(f"--calibration must be a positive number of examples, got {args.calibration}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    if BACKENDS[args.format].runtime in ("aoti", "executorch", "litert") and not args.optimize:
        raise UserError("--no-optimize applies to the ONNX formats; AOTInductor packages, ExecuTorch programs and "
                        "LiteRT models are always made from the optimized model")
    if BACKENDS[args.format].precision == "bf16" and not cpu_bf16():
        raise UserError("this CPU has no native bf16 (AVX512-BF16/AMX): a bf16 package built here would emulate it, "
                        f"slower than fp32; use --format {args.format.removesuffix('-bf16')}")


# ---- reporting ----

def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from mobilebert import __version__

    found = {"mobilebert": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
             "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version()}
    return found | mobile_runtime_versions()


def summary(report: dict[str, Any]) -> str:
    """A table of each exported model's size and agreement with eager, and the conditions they were measured in."""
    rows = []
    for name, result in report["parity"].items():
        error = max(result["relative_error"].values())
        agreement = result["argmax_agreement"]
        rows.append([name, f"{error:.2e}", f"{min(agreement.values()):.3f}" if agreement else "-"])
    sizes = ", ".join(f"{file} {size / 1e6:.2f} MB" for file, size in report["files"].items())
    if report["format"] != "onnx":
        sizes += f"; fp32 ({report['fp32_bytes'] / 1e6:.2f} MB) is {report['size_ratio']}x that"
    c, v = report["conditions"], report["versions"]
    calibrated = ""
    if c["calibration_examples"]:
        calibrated = (f" ({'held out from' if c['held_out'] else 'overlapping'} the {c['calibration_examples']} "
                      "calibration examples)")
    spec = BACKENDS[report["format"]]
    runtime_threads = {"aoti": f"package built for {c['threads'] or c['torch_threads']} threads",
                       "executorch": f"XNNPACK threads {c['threads'] or 'default'}",
                       "litert": f"LiteRT threads {c['threads'] or 'default'}",
                       "onnxruntime": f"onnxruntime threads {c['threads'] or 'default'}"}.get(spec.runtime, "")
    return "\n".join([
        format_table(["model", "max relative error vs eager", "argmax agreement"], rows),
        f"{report['architecture']} as {report['format']}: {sizes}",
        f"measured against eager float32 PyTorch on {c['examples']} examples x {c['sequence']} tokens of "
        f"{c['text']} text{calibrated}; {runtime_threads + ', ' if runtime_threads else ''}torch threads "
        f"{c['torch_threads']}; torch {v['torch']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}",
    ])
