"""Every exported format behind one call: `load_exported(format, path)` gives the runtime's model, and
`open_exported(format, path)` a function of a batch (input_ids, attention_mask, token_type_ids) that returns the
model's outputs by name as float32 numpy arrays.

`mobilebert export` checks its files through these runners, and `mobilebert predict` runs the models. The runtimes are
imported only for the format asked for (each is an optional, sizeable dependency).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Format name -> the file `mobilebert export --format NAME` writes.
FORMATS = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx", "onnx-int8-static": "model-int8-static.onnx",
           "torch-int8": "torch-int8.pt", "aoti": "model.pt2", "aoti-bf16": "model-bf16.pt2",
           "executorch": "model.pte", "executorch-int8": "model-int8.pte", "tflite": "model.tflite",
           "tflite-int8": "model-int8.tflite"}

Runner = Callable[[dict[str, torch.Tensor]], dict[str, np.ndarray]]  # a batch -> outputs by name


def load_exported(fmt: str, path: str | Path, threads: int | None = None,
                  torch_int8_model: Callable[[], torch.nn.Module] | None = None) -> Callable[..., Any]:
    """The runtime's model of an exported file, called as (input_ids, attention_mask, token_type_ids) and returning
    outputs by name; for torch-int8 (a state dict) the quantized PyTorch model: `torch_int8_model` builds the float
    model it was quantized from (its class and config), which is quantized the same way before loading it."""
    if fmt.startswith("onnx"):
        from mobilebert.deploy.export import OnnxModel

        return OnnxModel(path, threads)
    if fmt.startswith("aoti"):
        from mobilebert.deploy.aoti import AotiModel

        return AotiModel(path)
    if fmt.startswith("executorch"):
        from mobilebert.deploy.mobile import ExecutorchModel

        return ExecutorchModel(path, threads)
    if fmt.startswith("tflite"):
        from mobilebert.deploy.litert import TFLiteModel

        return TFLiteModel(path, threads)
    if fmt == "torch-int8" and torch_int8_model is not None:
        from mobilebert.deploy.quantize import quantize_torch_dynamic

        quantized = quantize_torch_dynamic(torch_int8_model())
        quantized.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return quantized.eval()
    raise ValueError(f"no runner for format {fmt!r}")


def open_exported(fmt: str, path: str | Path, threads: int | None = None,
                  torch_int8_model: Callable[[], torch.nn.Module] | None = None) -> Runner:
    """`load_exported`'s model as a runner of a batch: outputs by name as float32 numpy arrays."""
    model = load_exported(fmt, path, threads, torch_int8_model)
    if isinstance(model, torch.nn.Module):
        from mobilebert.deploy.export import eager_outputs

        return lambda batch: eager_outputs(model, batch)

    def run(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return {k: (v.float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32))
                for k, v in out.items()}

    return run
