"""int8 quantization: onnxruntime dynamic and static (calibrated) quantization, and PyTorch dynamic quantization.

Every function returns a new file or a new module; the input is never changed. MobileBERT's NoNorm activations
reach 1e7–1e8 in trained checkpoints, so per-tensor int8 activations can lose much (docs/deployment.md: published
int8 SQuAD models lose 1–2 F1): measure agreement with `deploy.interface.argmax_agreement` before shipping.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobilebert.deploy.interface import INPUT_NAMES
from mobilebert.errors import UserError
from mobilebert.files import atomic_write

# The weight-carrying ops: Linear layers (MatMul, Gemm for 2-D inputs) and the embedding tables (Gather).
# Element-wise ops stay float: NoNorm's huge activations would take the whole int8 range of an Add or Mul.
WEIGHT_OPS = ("MatMul", "Gemm", "Gather")


def quantize_onnx_dynamic(onnx_path: str | os.PathLike, out_path: str | os.PathLike, per_channel: bool = True,
                          reduce_range: bool = False) -> Path:
    """int8 weights, activations quantized on the fly per batch (onnxruntime `quantize_dynamic`).

    Per-channel weight scales: one scale per output channel, so a single large row does not coarsen the others.
    `reduce_range` (7-bit weights) avoids an overflow of u8×s8 products on x86 CPUs without VNNI; it costs accuracy.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, out = _existing(onnx_path), Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        prepared = _preprocess(source, Path(work))
        atomic_write(out, lambda tmp: quantize_dynamic(
            prepared, tmp, op_types_to_quantize=list(WEIGHT_OPS), per_channel=per_channel,
            reduce_range=reduce_range, weight_type=QuantType.QInt8))
    return out


def _preprocess(source: Path, work: Path) -> Path:
    """onnxruntime's recommended step before quantizing: graph optimizations and ONNX shape inference.

    Its symbolic shape inference is skipped: it stops with "Incomplete symbolic shape inference" on these graphs.
    """
    from onnxruntime.quantization import quant_pre_process

    prepared = work / "prepared.onnx"
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    return prepared


class BatchReader:
    """onnxruntime's CalibrationDataReader over batches of real inputs (dicts of (B, T) int64 tensors).

    onnxruntime accepts any object with `get_next` (its ABC has a subclass hook), so this needs no import of it.
    """

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        self._batches: Iterator[dict[str, torch.Tensor]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        return {name: np.asarray(batch[name], dtype=np.int64) for name in INPUT_NAMES}


def quantize_onnx_static(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                         calibration: Iterable[dict[str, torch.Tensor]], per_channel: bool = True,
                         method: str = "minmax") -> Path:
    """int8 weights and int8 activations with ranges calibrated on real inputs (QDQ format).

    `calibration`: batches of model inputs, ideally real text the model will see (random ids calibrate the wrong
    ranges). `method`: "minmax" (the extremes seen) or "percentile" (onnxruntime's histogram, 99.999th percentile:
    outliers clipped; slower and needs more memory). Only the inputs of the weight-carrying ops get
    quantize/dequantize pairs.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise UserError(f"unknown calibration method {method!r}; choose one of: {', '.join(methods)}")
    source, out = _existing(onnx_path), Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if method == "percentile":  # onnxruntime stacks the histogram's inputs, so every batch needs one shape
        calibration = _single_rows(calibration, _pad_id(source))
    reader = BatchReader(calibration)
    with tempfile.TemporaryDirectory() as work:
        prepared = _preprocess(source, Path(work))
        atomic_write(out, lambda tmp: quantize_static(
            str(prepared), str(tmp), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(WEIGHT_OPS),
            per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=methods[method], extra_options={"CalibTensorRangeSymmetric": False}))
    return out


def _single_rows(batches: Iterable[dict[str, torch.Tensor]], pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The rows of `batches`, one per batch, all padded to the longest (padding: `pad_id`, mask 0, type 0)."""
    batches = list(batches)
    length = max(b["input_ids"].shape[-1] for b in batches)
    rows = []
    for batch in batches:
        extra = length - batch["input_ids"].shape[-1]
        padded = {name: F.pad(torch.as_tensor(batch[name]), (0, extra), value=pad_id if name == "input_ids" else 0)
                  for name in INPUT_NAMES}
        rows += [{name: t[i:i + 1] for name, t in padded.items()} for i in range(padded["input_ids"].shape[0])]
    return rows


def _pad_id(path: Path) -> int:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return int(json.loads(props.get("mobilebert.config", "{}")).get("pad_token_id", 0))


def quantize_torch_dynamic(model: nn.Module) -> nn.Module:
    """A copy of `model` with every nn.Linear replaced by a dynamically quantized int8 Linear (CPU only).

    The masked-LM decoder (a matmul against the tied embedding table) stays float: it is not an nn.Linear, and
    neither are the embedding tables, so the saving is smaller than ONNX int8's. PyTorch deprecates its quantized
    tensors (from 2.13; pytorch/pytorch#184982): the ONNX int8 path is the durable one.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def load_torch_int8(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a `quantize_torch_dynamic` model saved with `torch.save(state_dict)`; `model` gives the shapes."""
    quantized = quantize_torch_dynamic(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # torch's own, for quantized tensors
        quantized.load_state_dict(torch.load(_existing(path), map_location="cpu", weights_only=True))
    return quantized


def file_size(path: str | os.PathLike) -> int:
    """Size of a file in bytes."""
    return _existing(path).stat().st_size


def state_dict_size(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`: what a checkpoint of the module takes on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path
