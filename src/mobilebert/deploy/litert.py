"""LiteRT (TensorFlow Lite) models: the optimized model as one `.tflite` flatbuffer, the format of Android's and
iOS's on-device runtime (the paper measured MobileBERT in it, on a Pixel 4), run here by LiteRT's interpreter
with its XNNPACK delegate.

`export_tflite` converts `optimize_for_inference(model)` in its portable form (`mobilebert.deploy.optimize.portable`:
`F.linear` on constant weights, attention as bmm, softmax, bmm) with litert-torch (torch.export, then StableHLO,
then TFLite). LiteRT's converter lowers static shapes only (a symbolic length fails in its slicing), so one file
holds one signature per sequence length asked for, `length_<T>`, all of them reading one shared copy of the
weights; `TFLiteModel` pads each input with [PAD] to the shortest signature that fits and cuts the outputs back.
Where the word table's [PAD] row is zero (ours: `padding_idx`), padding changes no real token's outputs beyond
float rounding; otherwise the last real token's trigram sees the [PAD] row, as eager does on a padded batch.

`int8=True`: the float32 flatbuffer quantized by AI Edge Quantizer's dynamic recipe: every fully connected
layer's weights int8 per output channel, its input int8 per tensor, quantized on each call (XNNPACK's dynamically
quantized kernels), the word table int8 as well.

Our metadata (architecture, output names, config, signature shapes) is JSON in the flatbuffer's own metadata
table under the name "mobilebert"; LiteRT's runtimes ignore it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import mmap
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebert.deploy.interface import (
    INPUT_NAMES,
    Exportable,
    check_runner_shape,
    eager_outputs,
    eval_mode,
    example_batch,
    export_metadata,
    padded_inputs,
    quiet_stderr,
    run_in_chunks,
    runner_inputs,
)
from mobilebert.deploy.optimize import optimize_for_inference, portable
from mobilebert.errors import UserError
from mobilebert.files import atomic_write
from mobilebert.model import check_length

METADATA_NAME = "mobilebert"  # the flatbuffer metadata entry holding our JSON
INSTALL_HINT = "LiteRT is not installed: pip install 'mobilebert[tflite]' (litert-torch)"
SIGNATURE_PREFIX = "length_"


def export_tflite(model: nn.Module, path: str | os.PathLike, lengths: tuple[int, ...] | list[int] = (128,),
                  batch: int = 1, choices: int = 2, int8: bool = False) -> Path:
    """Write `model` (the backbone or any task model) as the LiteRT flatbuffer `path` (.tflite) with one signature
    `length_<T>` per T in `lengths`, each for inputs of shape (batch, T), or (batch, choices, T) for multiple choice.

    Inputs are int32 `input_ids`, `attention_mask` and `token_type_ids` (LiteRT has no int64 inputs), outputs the
    model's inference fields as `output_0`, `output_1`, ... in the order of the metadata's "outputs" (`TFLiteModel`
    returns them by name). Converting takes seconds per signature for the tiny presets and about 20 s for
    MobileBERT. Written atomically; `model` is left as it was.
    """
    litert_torch, recipes = litert_conversion()
    path = Path(path)
    lengths = sorted(set(lengths))
    if not lengths or min(batch, choices, *lengths) < 1:
        raise UserError(f"batch, choices and every length must be positive, got {batch}, {choices}, {lengths}")
    for length in lengths:
        check_length(length, model.config.max_position_embeddings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        examples = {T: example_batch(model, batch=batch, length=T, choices=choices) for T in lengths}
        names = list(eager_outputs(model, examples[lengths[0]]))
        wrapper = Exportable(portable(optimize_for_inference(model)), names).eval()
        converter = litert_torch.Converter()
        for T, example in examples.items():
            converter.signature(f"{SIGNATURE_PREFIX}{T}", wrapper,  # int32 inputs: LiteRT has no int64 ones
                                sample_kwargs={name: example[name].int() for name in INPUT_NAMES})
        metadata = export_metadata(model, names, "int8" if int8 else "float32")
        metadata["shapes"] = {f"{SIGNATURE_PREFIX}{T}": list(example["input_ids"].shape)
                              for T, example in examples.items()}
        with torch.no_grad(), warnings.catch_warnings(), quiet_stderr(), _no_progress(litert_torch):
            warnings.simplefilter("ignore")  # torch.export's notes on internals
            content = with_metadata(converter.convert().model_content(), metadata)
            if int8:  # the quantizer keeps the metadata table (and moves every buffer past the flatbuffer)
                content = _quantized(content, recipes)
    atomic_write(path, lambda tmp: tmp.write_bytes(content))
    return path


def litert_conversion() -> tuple[Any, Any]:
    """litert-torch and AI Edge Quantizer's recipes; a UserError that says how to install them where missing."""
    return _installed("litert_torch"), _installed("ai_edge_quantizer.recipe")


def _installed(module: str) -> Any:
    """`module`, imported without the notes LiteRT's libraries print; a UserError with INSTALL_HINT where missing."""
    try:
        with quiet_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError:
        raise UserError(INSTALL_HINT) from None


@contextlib.contextmanager
def _no_progress(litert_torch: Any) -> Iterator[None]:
    """litert-torch's progress lines (printed to stdout) off for the block; the caller prints its own."""
    shown = litert_torch.config.show_progress
    litert_torch.config.show_progress = False
    try:
        yield
    finally:
        litert_torch.config.show_progress = shown


def _quantized(content: bytes, recipes: Any) -> bytes:
    """`content` with dynamic int8 weights and activations (AI Edge Quantizer's `dynamic_wi8_afp32`)."""
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(bytearray(content), recipes.dynamic_wi8_afp32())
    return bytes(q.quantize(enable_progress_bar=False, enable_progress_report=False).quantized_model)


def with_metadata(content: bytes, metadata: dict[str, Any]) -> bytes:
    """The flatbuffer `content` with `metadata` as UTF-8 JSON in its metadata table under METADATA_NAME."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(content, 0)
    for buffer in model.buffers:  # data stored past the flatbuffer (offset from the file's start) comes inside
        if buffer.offset > 1:
            buffer.data = np.frombuffer(content, dtype=np.uint8, count=buffer.size, offset=buffer.offset)
            buffer.offset = buffer.size = 0
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in model.metadata or [] if m.name != METADATA_NAME.encode()] + [entry]
    builder = flatbuffers.Builder(len(content) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(path: Path) -> dict[str, Any] | None:
    """Our metadata in the flatbuffer at `path`, or None where it has none (not written by `export_tflite`)."""
    from ai_edge_litert import schema_py_generated as schema

    with path.open("rb") as f:
        if f.read(8)[4:] != b"TFL3":  # a flatbuffer's identifier follows its 4-byte root offset
            return None
        content = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with content:
        model = schema.Model.GetRootAs(content, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == METADATA_NAME.encode():
                buffer = model.Buffers(entry.Buffer())
                if buffer.Offset() > 1:  # stored past the flatbuffer, as AI Edge Quantizer writes every buffer
                    return json.loads(content[buffer.Offset():buffer.Offset() + buffer.Size()])
                return json.loads(buffer.DataAsNumpy().tobytes())
    return None


class TFLiteModel:
    """A LiteRT flatbuffer written by `export_tflite`, run by LiteRT's interpreter (XNNPACK delegate), called like
    our models.

    `model(input_ids, attention_mask=None, token_type_ids=None)` takes torch tensors or numpy arrays of any batch and
    any length up to the longest signature's, and returns a dict of float32 torch tensors by output name, at the
    input's batch and length. Each call runs the shortest signature that fits, on chunks of its batch; tokens and
    rows beyond the input are [PAD] with mask 0. `threads`: the interpreter's threads (default: LiteRT's choice).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such LiteRT model")
        interpreter = _installed("ai_edge_litert.interpreter")
        metadata = read_metadata(path)
        if metadata is None:
            raise UserError(f"{path}: not a mobilebert LiteRT model (written by `mobilebert export --format tflite`)")
        try:
            with quiet_stderr():  # the delegate's creation notes
                self.interpreter = interpreter.Interpreter(model_path=str(path), num_threads=threads)
                self.runners = {key: self.interpreter.get_signature_runner(key) for key in metadata["shapes"]}
        except Exception as e:  # noqa: BLE001 - LiteRT raises plain ValueErrors for unreadable files
            raise UserError(f"{path}: cannot load LiteRT model: {str(e).splitlines()[0]}") from None
        self.path = path
        self.output_names: list[str] = metadata["outputs"]
        self.architecture: str = metadata["architecture"]
        self.dtype: str = metadata["dtype"]
        self.config: dict[str, Any] = metadata["config"]
        self.axes: dict[str, dict[str, str]] = metadata["axes"]
        self.pad_token_id: int = metadata["pad_token_id"]
        self.shapes = {key: tuple(shape) for key, shape in sorted(metadata["shapes"].items(),
                                                                  key=lambda item: item[1][-1])}

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None
                 ) -> dict[str, torch.Tensor]:
        ids, mask, types = runner_inputs(input_ids, attention_mask, token_type_ids)
        key, shape = self._signature(ids)
        length, runner = ids.shape[-1], self.runners[key]

        def call(chunk: list[torch.Tensor]) -> list[np.ndarray]:
            with quiet_stderr():
                result = runner(**{name: t.numpy().astype(np.int32) for name, t in zip(INPUT_NAMES, chunk,
                                                                                       strict=True)})
            return [result[f"output_{k}"] for k in range(len(self.output_names))]

        outputs = run_in_chunks((ids, mask, types), self.pad_token_id, shape[0], call, tokens=shape[-1] - length)
        return {name: (out[:, :length] if self.axes[name].get("1") == "sequence" else out).float()
                for name, out in zip(self.output_names, outputs, strict=True)}

    def _signature(self, ids: torch.Tensor) -> tuple[str, tuple[int, ...]]:
        """The signature that runs `ids`: the shortest at least as long; a UserError for shapes none takes."""
        longest = next(reversed(self.shapes.values()))
        check_runner_shape(ids, longest, f"this {self.architecture} model")
        length = ids.shape[-1]
        for key, shape in self.shapes.items():
            if shape[-1] >= length:
                return key, shape
        raise UserError(f"sequence length {length} exceeds the model's longest signature, {longest[-1]}; export it "
                        "again with a larger --max-seq-length")


def padded_to(batch: dict[str, torch.Tensor], length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """`batch` (input_ids, attention_mask, token_type_ids) with [PAD] tokens appended up to `length`, as
    `TFLiteModel` pads for a signature of that length: eager on this is what the model gives for `batch`."""
    inputs = tuple(batch[name] for name in INPUT_NAMES)
    return dict(zip(INPUT_NAMES, padded_inputs(inputs, pad_token_id, tokens=length - inputs[0].shape[-1]),
                    strict=True))
