"""How each exported format is written and read back: the adapters the backend table (`deploy/backends.py`) names.

An exporter is `(model, folder, file, options) -> {precision: path}`: it writes `folder/file` (the ONNX formats
also write, or are, `folder/model.onnx`: the fp32 graph the int8 ones are quantized from) and returns every model
it wrote by precision ("fp32", "bf16", "int8"). A loader is `(path, threads, float_model) -> model`: the
runtime's model of the file, called as (input_ids, attention_mask, token_type_ids) and returning the outputs by
name (for torch-int8, a state dict, the quantized PyTorch module: `float_model()` builds the float model it was
quantized from). The runtimes are imported inside the adapters: each is an optional, sizeable dependency, loaded
only for the format asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebert.files import atomic_write


@dataclass(frozen=True)
class ExportOptions:
    """What shapes and settings an export is made for; each format reads the fields that apply to it."""

    length: int = 128  # tokens per example: ONNX's tracing example; ExecuTorch's longest input
    lengths: tuple[int, ...] = ()  # LiteRT: one signature per length (empty: `length` alone)
    batch: int = 1  # ExecuTorch and LiteRT: the program's fixed batch
    choices: int = 2  # multiple choice: choices per example (ExecuTorch, LiteRT: fixed)
    threads: int | None = None  # AOTInductor: the thread count its parallel loops are built for
    opset: int | None = None  # ONNX: the opset (default: export_onnx's)
    optimize: bool = True  # ONNX: the optimized graph (False: the eager model's)
    calibration: list[dict[str, torch.Tensor]] = field(default_factory=list)  # static int8: batches of real text
    calibration_method: str = "minmax"
    reuse: bool = False  # ONNX int8: quantize the folder's model.onnx if it is there (bench); export writes anew


Exporter = Callable[[nn.Module, Path, str, ExportOptions], dict[str, Path]]
Loader = Callable[[Path, "int | None", "Callable[[], nn.Module] | None"], Any]


# ---- exporters ----

def _onnx_fp32(model: nn.Module, folder: Path, options: ExportOptions) -> Path:
    """folder/model.onnx, the fp32 graph every ONNX format writes (the int8 ones quantize it)."""
    from mobilebert.deploy.export import export_onnx

    if options.reuse and (folder / "model.onnx").is_file():
        return folder / "model.onnx"

    opset = {} if options.opset is None else {"opset": options.opset}
    return export_onnx(model, folder / "model.onnx", max_seq_length=options.length, optimize=options.optimize,
                       **opset)


def onnx(model: nn.Module, folder: Path, file: str, options: ExportOptions) -> dict[str, Path]:
    return {"fp32": _onnx_fp32(model, folder, options)}


def onnx_int8(model: nn.Module, folder: Path, file: str, options: ExportOptions) -> dict[str, Path]:
    """The fp32 graph and its dynamically quantized int8 copy (weights int8, activations quantized per call)."""
    from mobilebert.deploy.quantize import quantize_onnx_dynamic

    fp32 = _onnx_fp32(model, folder, options)
    return {"fp32": fp32, "int8": quantize_onnx_dynamic(fp32, folder / file)}


def onnx_int8_static(model: nn.Module, folder: Path, file: str, options: ExportOptions) -> dict[str, Path]:
    """The fp32 graph and its statically quantized copy (QDQ), calibrated on `options.calibration`."""
    from mobilebert.deploy.quantize import quantize_onnx_static

    fp32 = _onnx_fp32(model, folder, options)
    return {"fp32": fp32, "int8": quantize_onnx_static(fp32, folder / file, options.calibration,
                                                       method=options.calibration_method)}


def torch_int8(model: nn.Module, folder: Path, file: str, options: ExportOptions) -> dict[str, Path]:
    """The dynamically quantized PyTorch module's state dict (nn.Linear weights int8)."""
    from mobilebert.deploy.quantize import quantize_torch_dynamic

    quantized = quantize_torch_dynamic(model)
    path = folder / file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: torch.save(quantized.state_dict(), p))
    return {"int8": path}


def aoti(model: nn.Module, folder: Path, file: str, options: ExportOptions,
         dtype: torch.dtype | None = None) -> dict[str, Path]:
    from mobilebert.deploy.aoti import export_aoti

    print("compiling with AOTInductor (seconds for the small presets; MobileBERT: about a minute in fp32, two in "
          "bf16)", flush=True)
    return {"bf16" if dtype == torch.bfloat16 else "fp32": export_aoti(model, folder / file, dtype, options.threads)}


def aoti_bf16(model: nn.Module, folder: Path, file: str, options: ExportOptions) -> dict[str, Path]:
    return aoti(model, folder, file, options, torch.bfloat16)


def executorch(model: nn.Module, folder: Path, file: str, options: ExportOptions,
               int8: bool = False) -> dict[str, Path]:
    from mobilebert.deploy.mobile import export_executorch

    print("lowering to ExecuTorch with XNNPACK (seconds for the small presets; MobileBERT: about a minute, two "
          "with int8)", flush=True)
    path = export_executorch(model, folder / file, batch=options.batch, length=options.length,
                             choices=options.choices, int8=int8)
    return {"int8" if int8 else "fp32": path}


def executorch_int8(model: nn.Module, folder: Path, file: str, options: ExportOptions) -> dict[str, Path]:
    return executorch(model, folder, file, options, int8=True)


def tflite(model: nn.Module, folder: Path, file: str, options: ExportOptions, int8: bool = False) -> dict[str, Path]:
    from mobilebert.deploy.litert import export_tflite

    lengths = sorted(set(options.lengths or (options.length,)))
    print(f"converting to LiteRT, signatures of {', '.join(map(str, lengths))} tokens (seconds for the small "
          "presets; MobileBERT: about 20 s each)", flush=True)
    path = export_tflite(model, folder / file, lengths=lengths, batch=options.batch, choices=options.choices,
                         int8=int8)
    return {"int8" if int8 else "fp32": path}


def tflite_int8(model: nn.Module, folder: Path, file: str, options: ExportOptions) -> dict[str, Path]:
    return tflite(model, folder, file, options, int8=True)


# ---- loaders ----

def load_onnx(path: Path, threads: int | None, float_model: Callable[[], nn.Module] | None) -> Any:
    from mobilebert.deploy.export import OnnxModel

    return OnnxModel(path, threads)


def load_aoti(path: Path, threads: int | None, float_model: Callable[[], nn.Module] | None) -> Any:
    from mobilebert.deploy.aoti import AotiModel

    return AotiModel(path)  # its thread count was fixed when it was built


def load_executorch(path: Path, threads: int | None, float_model: Callable[[], nn.Module] | None) -> Any:
    from mobilebert.deploy.mobile import ExecutorchModel

    return ExecutorchModel(path, threads)


def load_tflite(path: Path, threads: int | None, float_model: Callable[[], nn.Module] | None) -> Any:
    from mobilebert.deploy.litert import TFLiteModel

    return TFLiteModel(path, threads)


def load_torch_int8(path: Path, threads: int | None, float_model: Callable[[], nn.Module] | None) -> nn.Module:
    from mobilebert.deploy import quantize

    if float_model is None:
        raise ValueError("a torch-int8 state dict loads into the quantized float model: pass float_model")
    return quantize.load_torch_int8(float_model(), path).eval()
