"""The ONNX backend: export of any MobileBERT model, an onnxruntime runner with our models' call signature, and
its parity check.

The graph takes `input_ids`, `attention_mask` and `token_type_ids` (int64, (B, T); (B, C, T) for multiple choice)
and returns the model's output fields by name (`last_hidden_state`, `logits`, `start_logits`, ...). Batch and
sequence axes are dynamic. What every backend shares (example batches, eager outputs, the export wrapper, the
relative-error measures) is in `deploy/interface.py`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mobilebert.deploy.interface import (
    INPUT_NAMES,
    Exportable,
    dynamic_axes,
    eager_outputs,
    eval_mode,
    example_batch,
    int64_array,
    relative_errors,
)
from mobilebert.deploy.optimize import optimize_for_inference
from mobilebert.errors import UserError
from mobilebert.files import atomic_write
from mobilebert.model import check_length

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime ≥ 1.14 runs it
def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET,
                max_seq_length: int = 128, optimize: bool = True) -> Path:
    """Write `model` (the backbone or any task model) to `path` as an ONNX graph with dynamic batch and sequence.

    `optimize` (default): the graph is `optimize_for_inference(model)`'s — NoNorm folded, projections fused, the
    residual steps as matmul-adds — the same outputs to float rounding in about 30% fewer nodes, which ONNX
    Runtime runs faster (and quantizes to fewer int8 matmuls); False exports the eager model's graph as it is.
    Uses the TorchScript-based exporter (`dynamo=False`): it traces the eval-mode forward once on an example of
    (2, `max_seq_length`), and needs nothing beyond torch and onnx. The model is left as it was (training flag
    included). The file is written atomically, with the model's config in its metadata.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        example = example_batch(model, length=max_seq_length)
        names = list(eager_outputs(model, example))
        traced = optimize_for_inference(model) if optimize else model
        # eval() matters: the exporter sets the wrapper's own mode back afterwards, recursively, so a wrapper left
        # in (default) training mode would switch the model's attention dropout on for every later call.
        wrapper = Exportable(traced, names).eval()
        args = tuple(example[name] for name in INPUT_NAMES)

        def write(tmp: Path) -> None:
            import onnx  # imported here: half a second (ml_dtypes), which every command would pay

            with warnings.catch_warnings():
                # The legacy exporter's deprecation notice, and tracer notes on our shape checks (constant by design).
                warnings.simplefilter("ignore")
                torch.onnx.export(wrapper, args, str(tmp), dynamo=False, opset_version=opset,
                                  input_names=list(INPUT_NAMES), output_names=names,
                                  dynamic_axes=dynamic_axes(model, names), do_constant_folding=True)
            graph = onnx.load(str(tmp))
            onnx.helper.set_model_props(graph, {
                "mobilebert.architecture": type(model).__name__,
                "mobilebert.config": json.dumps(model.config.to_transformers_dict(type(model).__name__)),
            })
            onnx.save(graph, str(tmp))

        atomic_write(path, write)
    return path


class OnnxModel:
    """An ONNX file run by onnxruntime (CPU, all graph optimizations), called like our models.

    `model(input_ids, attention_mask=None, token_type_ids=None)` takes torch tensors or numpy arrays and returns
    a dict of float32 numpy arrays by output name. `threads` sets onnxruntime's intra-op threads (default: its
    own choice, one per physical core).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort  # imported here: the rest of the package runs without it

        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Worker threads busy-wait between the parallel sections of a run (onnxruntime's default, as PyTorch's
        # OpenMP threads do) but stop when the run ends: spinning on would steal the CPU from whatever runs next
        # in the process (docs/benchmarks.md), while no spinning at all costs a thread wake-up per op (1.35x slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise UserError(f"{path}: cannot load ONNX model: {str(e).splitlines()[0]}") from None
        self.path, self.threads = path, threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        props = self.session.get_modelmeta().custom_metadata_map
        self.architecture = props.get("mobilebert.architecture")
        config = json.loads(props.get("mobilebert.config", "{}"))
        self.max_positions = config.get("max_position_embeddings")

    def __call__(self, input_ids: torch.Tensor | np.ndarray, attention_mask: torch.Tensor | np.ndarray | None = None,
                 token_type_ids: torch.Tensor | np.ndarray | None = None) -> dict[str, np.ndarray]:
        ids = int64_array(input_ids)
        if self.max_positions is not None:
            check_length(ids.shape[-1], self.max_positions)
        feed = {"input_ids": ids,
                "attention_mask": np.ones_like(ids) if attention_mask is None else int64_array(attention_mask),
                "token_type_ids": np.zeros_like(ids) if token_type_ids is None else int64_array(token_type_ids)}
        results = self.session.run(self.output_names, {k: v for k, v in feed.items() if k in self.input_names})
        return dict(zip(self.output_names, results, strict=True))


def check_parity(model: nn.Module, onnx_path: str | os.PathLike, batch: dict[str, torch.Tensor],
                 threads: int | None = None) -> float:
    """The largest relative error of any output of the ONNX file against eager `model` on `batch`."""
    reference = eager_outputs(model, batch)
    return max(relative_errors(OnnxModel(onnx_path, threads)(**batch), reference).values())


