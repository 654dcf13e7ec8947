"""What every deployment backend shares: the inputs it takes, the outputs it gives, the wrapper the exporters
trace, fixed-shape runtimes' padding and chunking, and how its results are compared with eager.

Inputs are `input_ids`, `attention_mask` and `token_type_ids` (int64, (B, T); (B, C, T) for multiple choice);
outputs are the model's inference fields by name (`last_hidden_state`, `logits`, `start_logits`, ...).
MobileBERT's activations reach 1e8, so every comparison here is relative: max |ours − reference| / max |reference|
per output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebert.errors import UserError
from mobilebert.heads import MobileBertForMaskedLM, MobileBertForMultipleChoice, MobileBertForTokenClassification
from mobilebert.model import check_same_shapes

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
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


def export_metadata(model: nn.Module, names: list[str], dtype: str) -> dict[str, Any]:
    """What an exported file records about its model so that its runner can return outputs by name and pad inputs:
    the architecture, output names, dtype, dynamic axes, [PAD] id and the transformers config."""
    return {"architecture": type(model).__name__, "outputs": names, "dtype": dtype,
            "axes": dynamic_axes(model, names), "pad_token_id": model.config.pad_token_id,
            "config": model.config.to_transformers_dict(type(model).__name__)}


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


def int64_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
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
    mask = int64_array(attention_mask).astype(bool)
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


class ExportedTaskModel:
    """Any exported model's runtime returning outputs by name (`deploy.backends.load_exported`) called like our
    task models, as `finetuning.predict` does: outputs as attributes holding torch tensors
    (`.logits`, `.start_logits`, ...)."""

    def __init__(self, session: Callable[..., dict[str, Any]]) -> None:
        self.session = session

    def eval(self) -> ExportedTaskModel:
        return self

    def __call__(self, input_ids, attention_mask, token_type_ids) -> SimpleNamespace:
        outputs = self.session(input_ids, attention_mask, token_type_ids)
        return SimpleNamespace(**{k: torch.as_tensor(v) for k, v in outputs.items()})


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence what ExecuTorch's C++ runtime and torchao write straight to stderr while loading (the runtime's CPU
    probing, optional CUDA kernels torchao cannot load here): notes, not errors; errors arrive as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
