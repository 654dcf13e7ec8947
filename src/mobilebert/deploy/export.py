"""ONNX export of any MobileBERT model, an onnxruntime runner with our models' call signature, and parity checks.

The graph takes `input_ids`, `attention_mask` and `token_type_ids` (int64, (B, T); (B, C, T) for multiple choice)
and returns the model's output fields by name (`last_hidden_state`, `logits`, `start_logits`, ...). Batch and
sequence axes are dynamic. MobileBERT's activations reach 1e8, so every comparison here is relative:
max |ours − reference| / max |reference| per output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebert.deploy.optimize import optimize_for_inference
from mobilebert.errors import UserError
from mobilebert.files import atomic_write
from mobilebert.heads import MobileBertForMaskedLM, MobileBertForMultipleChoice, MobileBertForTokenClassification
from mobilebert.model import check_length, check_same_shapes

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime ≥ 1.14 runs it
# Output fields that are training-time extras, not inference results.
_NOT_EXPORTED = ("loss", "mlm_loss", "nsp_loss", "hidden_states", "attentions", "attention_scores")
_PER_TOKEN_OUTPUTS = ("last_hidden_state", "prediction_logits", "start_logits", "end_logits")
_TOKEN_LOGITS_MODELS = (MobileBertForMaskedLM, MobileBertForTokenClassification)  # their `logits` is (B, T, ...)
MOBILE_RUNTIMES = ("executorch", "litert-torch")  # optional installs: reported when present


def mobile_runtime_versions() -> dict[str, str]:
    """The installed mobile converters' versions, read from package metadata: importing them takes seconds."""
    found = {}
    for distribution in MOBILE_RUNTIMES:
        with contextlib.suppress(PackageNotFoundError):
            found[distribution] = version(distribution)
    return found


def example_batch(model: nn.Module, batch: int = 2, length: int = 128, seed: int = 0, choices: int = 2
                  ) -> dict[str, torch.Tensor]:
    """Random ids of the model's vocabulary, the last row padded: a batch that exercises every input.

    Multiple-choice models get (B, choices, T) inputs.
    """
    cfg = model.config
    length = min(length, cfg.max_position_embeddings)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, choices, length) if isinstance(model, MobileBertForMultipleChoice) else (batch, length)
    ids = torch.randint(1, cfg.vocab_size, shape, generator=g)
    mask = torch.ones_like(ids)
    mask[-1, ..., length - length // 3:] = 0  # the last row ends in padding
    ids[mask == 0] = cfg.pad_token_id
    types = torch.zeros_like(ids)
    types[..., length // 2:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def output_fields(output: Any) -> dict[str, torch.Tensor]:
    """The inference results of one of our models' output dataclasses, by field name."""
    return {f.name: getattr(output, f.name) for f in dataclasses.fields(output)
            if f.name not in _NOT_EXPORTED and getattr(output, f.name) is not None}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout) for the block; its own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def eager_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The model's inference results (eval mode) on `batch` as float32 numpy arrays, keyed as the ONNX graph names
    them."""
    with eval_mode(model):
        return {name: t.float().numpy() for name, t in output_fields(model(**batch)).items()}


class Exportable(nn.Module):
    """Our model with positional inputs and a tuple of tensors out: what the exporters (ONNX, torch.export) need."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids, attention_mask, token_type_ids)
        return tuple(getattr(out, name) for name in self.names)


def dynamic_axes(model: nn.Module, names: list[str]) -> dict[str, dict[int, str]]:
    """Batch and sequence (and choices) axes of every input and output, by name."""
    choices = isinstance(model, MobileBertForMultipleChoice)
    axes: dict[str, dict[int, str]] = {
        name: {0: "batch", 1: "choices", 2: "sequence"} if choices else {0: "batch", 1: "sequence"}
        for name in INPUT_NAMES
    }
    for name in names:
        axes[name] = {0: "batch"}
        if choices:
            axes[name][1] = "choices"
        elif name in _PER_TOKEN_OUTPUTS or (name == "logits" and isinstance(model, _TOKEN_LOGITS_MODELS)):
            axes[name][1] = "sequence"
    return axes


def export_shapes(axes: dict[str, dict[int, str]], dims: dict[str, Any]) -> dict[str, dict[int, Any]]:
    """`torch.export`'s dynamic shapes of the inputs: each input axis of `axes` (`dynamic_axes`) whose label has a
    `torch.export.Dim` in `dims`; the other axes stay static."""
    return {name: {axis: dims[label] for axis, label in axes[name].items() if label in dims} for name in INPUT_NAMES}


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
        ids = _int64(input_ids)
        if self.max_positions is not None:
            check_length(ids.shape[-1], self.max_positions)
        feed = {"input_ids": ids,
                "attention_mask": np.ones_like(ids) if attention_mask is None else _int64(attention_mask),
                "token_type_ids": np.zeros_like(ids) if token_type_ids is None else _int64(token_type_ids)}
        results = self.session.run(self.output_names, {k: v for k, v in feed.items() if k in self.input_names})
        return dict(zip(self.output_names, results, strict=True))


def runner_inputs(input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of a compiled-model runner (`AotiModel`, `ExecutorchModel`) as int64 torch tensors from torch
    tensors or numpy arrays: the mask all ones and the token types zeros where not given, both of the ids' shape."""
    ids = torch.as_tensor(input_ids, dtype=torch.int64)
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.int64)
    types = torch.zeros_like(ids) if token_type_ids is None else torch.as_tensor(token_type_ids, dtype=torch.int64)
    check_same_shapes(ids, mask, types)
    return ids, mask, types


def check_runner_shape(ids: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """A UserError unless `ids` fits a runner built for inputs of `shape` ((batch, [choices,] length)): the same
    number of axes, the same middle sizes and at least one token; `what` names the runner ("this X program")."""
    if ids.dim() != len(shape) or ids.shape[1:-1] != shape[1:-1] or ids.shape[-1] == 0:
        expected = "(batch, " + "".join(f"{c}, " for c in shape[1:-1]) + "tokens)"
        raise UserError(f"input_ids must be {expected} for {what}, got shape {tuple(ids.shape)}")


def padded_inputs(inputs: tuple[torch.Tensor, ...], pad_token_id: int, rows: int = 0, tokens: int = 0
                  ) -> list[torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids) with `rows` more rows and `tokens` more tokens at the end of each
    row, all padding: [PAD] ids, mask 0, token type 0."""
    return [_padded(t, rows, tokens, value) for t, value in zip(inputs, (pad_token_id, 0, 0), strict=True)]


def run_in_chunks(inputs: tuple[torch.Tensor, ...], pad_token_id: int, per_call: int,
                  call: Callable[[list[torch.Tensor]], Sequence[Any]], tokens: int = 0) -> list[torch.Tensor]:
    """Run a fixed-shape runtime on any number of rows: pad the rows to a multiple of `per_call` (and each row by
    `tokens` more [PAD] tokens), `call` each chunk of `per_call` rows (it returns the outputs in order), concatenate
    every output over the chunks and drop the padding rows. ExecuTorch's and LiteRT's runners share it."""
    rows = inputs[0].shape[0]
    extra_rows = -rows % per_call
    padded = padded_inputs(inputs, pad_token_id, rows=extra_rows, tokens=tokens)
    chunks = [call([t[i:i + per_call].contiguous() for t in padded]) for i in range(0, rows + extra_rows, per_call)]
    return [torch.cat([torch.as_tensor(chunk[k]) for chunk in chunks])[:rows] for k in range(len(chunks[0]))]


def _padded(t: torch.Tensor, rows: int, tokens: int, value: int) -> torch.Tensor:
    if tokens:
        t = torch.cat([t, t.new_full((*t.shape[:-1], tokens), value)], dim=-1)
    return torch.cat([t, t.new_full((rows, *t.shape[1:]), value)]) if rows else t


def _int64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64, copy=False)


def relative_errors(candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output: max |candidate − reference| / max |reference| (MobileBERT's activations reach 1e8)."""
    if set(candidate) != set(reference):
        raise ValueError(f"outputs differ: {sorted(candidate)} vs {sorted(reference)}")
    errors = {}
    for name, ref in reference.items():
        ref64, got64 = ref.astype(np.float64), candidate[name].astype(np.float64)
        errors[name] = float(np.abs(got64 - ref64).max() / max(np.abs(ref64).max(), 1e-30))
    return errors


def argmax_agreement(candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                     attention_mask: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Per `*logits` output: the fraction of predictions (argmax over the last axis) that agree.

    Per-token outputs count real tokens only (padding positions predict nothing anyone reads).
    """
    mask = _int64(attention_mask).astype(bool)
    agreement = {}
    for name, ref in reference.items():
        if not name.endswith("logits"):
            continue
        same = candidate[name].argmax(-1) == ref.argmax(-1)
        if name in ("start_logits", "end_logits"):  # (B, T): one prediction per row, over the tokens
            same = np.where(mask, candidate[name], -np.inf).argmax(-1) == np.where(mask, ref, -np.inf).argmax(-1)
        elif same.shape == mask.shape:  # (B, T, ...) per-token logits
            same = same[mask]
        agreement[name] = float(same.mean())
    return agreement


def check_parity(model: nn.Module, onnx_path: str | os.PathLike, batch: dict[str, torch.Tensor],
                 threads: int | None = None) -> float:
    """The largest relative error of any output of the ONNX file against eager `model` on `batch`."""
    reference = eager_outputs(model, batch)
    return max(relative_errors(OnnxModel(onnx_path, threads)(**batch), reference).values())


class OnnxTaskModel:
    """An `OnnxModel` (or any exported model's runtime returning outputs by name: `deploy.runners.load_exported`)
    called like our task models, as `finetuning.predict` does: outputs as attributes holding torch tensors
    (`.logits`, `.start_logits`, ...)."""

    def __init__(self, session: Callable[..., dict[str, Any]]) -> None:
        self.session = session

    def eval(self) -> OnnxTaskModel:
        return self

    def __call__(self, input_ids, attention_mask, token_type_ids) -> SimpleNamespace:
        outputs = self.session(input_ids, attention_mask, token_type_ids)
        return SimpleNamespace(**{k: torch.as_tensor(v) for k, v in outputs.items()})
