"""ExecuTorch programs: the optimized model as one `.pte` file for ExecuTorch, PyTorch's on-device runtime (Android,
iOS, embedded Linux; and Python here), the whole encoder delegated to XNNPACK, ExecuTorch's CPU backend.

`export_executorch` captures `optimize_for_inference(model)` with `torch.export` in the form XNNPACK's partitioner
takes (`portable`): `F.linear` on constant (out, in) weights and a separate residual add where the optimized model
adds into the residual with `addmm`, attention as bmm, softmax, bmm with a finite mask where it calls SDPA, and x,
q, k, v each from its own matmul where it splits one. Lowered by `to_edge_transform_and_lower`, every matmul,
attention and elementwise op of the encoder runs in one XNNPACK delegate call; only the embedding gathers and the
mask are left to ExecuTorch's portable kernels. `int8=True`: dynamic quantization by ExecuTorch's XNNPACK quantizer
(torchao's PT2E flow): every Linear's weights int8 per output channel, its input int8 per tensor, quantized on each
call; the word embedding table int8 per row (ExecuTorch's `embedding_byte` kernel), the embedding projection like
the Linears; the position and token-type tables, 1 MB at full size, stay float32.

One program takes every sequence length from 1 to the `length` it was exported for; its batch (and, for multiple
choice, the number of choices) is fixed: XNNPACK's reshapes may leave one size to infer, and attention reshapes
through both batch and length. Each reshape's length is written as that inferred size (`_inferred_sizes`), so the
whole encoder still lowers to one delegate call. `ExecutorchModel` runs larger batches in chunks and pads a last
short chunk with rows of [PAD], so it takes any batch; outputs come back at the input's size.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebert.deploy.fused_block import FusedEmbeddings
from mobilebert.deploy.interface import (
    INPUT_NAMES,
    Exportable,
    check_runner_shape,
    dynamic_axes,
    eager_outputs,
    eval_mode,
    example_batch,
    export_metadata,
    export_shapes,
    quiet_stderr,
    run_in_chunks,
    runner_inputs,
)
from mobilebert.deploy.optimize import optimize_for_inference, portable
from mobilebert.errors import UserError
from mobilebert.files import atomic_write
from mobilebert.model import check_length

METADATA_METHOD = "mobilebert_metadata"  # a constant method of the program: our metadata as UTF-8 JSON bytes
INSTALL_HINT = "ExecuTorch is not installed: pip install 'mobilebert[mobile]' (executorch)"


def export_executorch(model: nn.Module, path: str | os.PathLike, batch: int = 1, length: int = 128,
                      choices: int = 2, int8: bool = False) -> Path:
    """Write `model` (the backbone or any task model) as the ExecuTorch program `path` (.pte) for inputs of shape
    (batch, T), or (batch, choices, T) for multiple choice, any T from 1 to `length`.

    The program computes `optimize_for_inference(model)` (float32, or with int8 dynamically quantized Linears), its
    inputs are `input_ids`, `attention_mask`, `token_type_ids` and its outputs the model's inference fields, named
    in the program's `mobilebert_metadata` method (`ExecutorchModel` returns them by name). Lowering takes seconds for
    the tiny presets and about a minute for MobileBERT (two with int8). Written atomically; `model` is left as it was.
    """
    lower, partitioner, quantizer = executorch_lowering()
    path = Path(path)
    if min(batch, length, choices) < 1:
        raise UserError(f"batch, length and choices must be positive, got {batch}, {length}, {choices}")
    check_length(length, model.config.max_position_embeddings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        example = example_batch(model, batch=batch, length=length, choices=choices)
        names = list(eager_outputs(model, example))
        fused = portable(optimize_for_inference(model))
        if int8:
            _ops()
            for embeddings in [m for m in fused.modules() if isinstance(m, FusedEmbeddings)]:
                embeddings.word = Int8Embedding(embeddings.word.weight)
        wrapper = Exportable(fused, names).eval()
        inputs = tuple(example[name] for name in INPUT_NAMES)
        axes = dynamic_axes(model, names)
        dims = {"sequence": torch.export.Dim("sequence", min=1, max=length)} if length > 1 else {}  # batch fixed
        shapes = export_shapes(axes, dims)
        metadata = export_metadata(model, names, "int8" if int8 else "float32")
        metadata["shape"] = list(example["input_ids"].shape)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's and torchao's notes on internals
            program = torch.export.export(wrapper, inputs, dynamic_shapes=shapes)
            if int8:
                program = _quantized(program, inputs, shapes, quantizer())
            lowered = lower(_without_unused_buffers(program), transform_passes=[_inferred_sizes],
                            partitioner=[partitioner()],
                            constant_methods={METADATA_METHOD: _utf8(json.dumps(metadata))}).to_executorch()
    atomic_write(path, lambda tmp: tmp.write_bytes(lowered.buffer))
    return path


def executorch_lowering() -> tuple[Any, Any, Any]:
    """ExecuTorch's lowering function, XNNPACK partitioner and a dynamic int8 quantizer factory; a UserError that
    says how to install ExecuTorch where it is missing."""
    try:
        with quiet_stderr():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer,
                get_symmetric_quantization_config,
            )
            from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    def quantizer() -> XNNPACKQuantizer:
        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))

    return to_edge_transform_and_lower, XnnpackPartitioner, quantizer


class Int8Embedding(nn.Module):
    """An embedding table in int8, one float32 scale per row (symmetric: zero maps to zero), looked up by ExecuTorch's
    `quantized_decomposed::embedding_byte` kernel, which returns the dequantized rows."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        scale = weight.detach().float().abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, 1.0)  # an all-zero row (our [PAD] and past-the-end rows)
        self.register_buffer("weight", torch.round(weight.detach() / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.default(self.weight, self.scale, None, -127, 127, ids)


def _ops() -> None:
    """Register ExecuTorch's quantized operators: their Python definitions (for capture) and kernels (to run)."""
    with quiet_stderr():
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401


def _quantized(program: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...], shapes: dict,
               quantizer: Any) -> torch.export.ExportedProgram:
    """`program` with its Linears int8 (PT2E: annotate, observe one call, convert), captured again."""
    with quiet_stderr():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = prepare_pt2e(program.module(), quantizer)
    graph(*inputs)  # dynamic quantization observes only the weights, but they are observed on a call
    return torch.export.export(convert_pt2e(graph), inputs, dynamic_shapes=shapes)


def _inferred_sizes(graph_module: torch.fx.GraphModule) -> None:
    """Write the one symbolic size of each reshape as -1 (inferred), in place: XNNPACK's partitioner takes
    reshapes with one inferred size but none with a symbolic one, which is what the edge dialect's `view_copy` gets
    (it resolves the -1 of `bmm_attention`'s reshapes into the sequence length)."""
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "aten.view_copy.default":
            size = list(node.args[1])
            symbolic = [i for i, d in enumerate(size) if not isinstance(d, int)]
            if len(symbolic) == 1 and -1 not in size:
                size[symbolic[0]] = -1
                node.args = (node.args[0], size, *node.args[2:])
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()


def _without_unused_buffers(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`program` without the buffers its graph never reads, returned; ExecuTorch would store them in the file.

    The portable forward reads copies of the optimized model's matrices in nn.Linear's layout, so the (in, out)
    originals are captured as inputs and left unused: half the file.
    """
    from torch.export.graph_signature import InputKind

    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    specs = program.graph_signature.input_specs
    unused = [spec for spec in specs if spec.kind in (InputKind.BUFFER, InputKind.PARAMETER)
              and not placeholders[spec.arg.name].users]
    for spec in unused:
        specs.remove(spec)
        program.state_dict.pop(spec.target, None)
        program.constants.pop(spec.target, None)  # non-persistent buffers live here
        program.graph.erase_node(placeholders[spec.arg.name])
    program.graph_module.recompile()
    return program


def _utf8(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


class ExecutorchModel:
    """An ExecuTorch program written by `export_executorch`, called like our models.

    `model(input_ids, attention_mask=None, token_type_ids=None)` takes torch tensors or numpy arrays of any batch
    and any length up to the program's, and returns a dict of float32 torch tensors by output name, at the input's
    batch and length. `threads`: the size of ExecuTorch's thread pool (default: one thread per core). The pool
    is process-wide and every loaded program keeps using the one it was loaded with, so the size can change only
    before the first program of the process is loaded (later, another size is refused).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such ExecuTorch program")
        try:
            with quiet_stderr():
                from executorch.runtime import Runtime
        except ImportError:
            raise UserError(INSTALL_HINT) from None
        try:
            _ops()  # an int8 program's embedding kernel
            with quiet_stderr():  # loading logs the runtime's probing of the CPU
                if threads is not None:
                    _set_threads(threads)
                program = Runtime.get().load_program(path)
                if METADATA_METHOD not in program.method_names:
                    raise UserError(f"{path}: not a mobilebert program (written by `mobilebert export --format "
                                    "executorch`)")
                metadata = json.loads(bytes(program.load_method(METADATA_METHOD).execute([])[0].tolist()))
                self.method = program.load_method("forward")
                _loaded.append(path)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the loader raises plain RuntimeErrors for unreadable files
            raise UserError(f"{path}: cannot load ExecuTorch program: {str(e).splitlines()[0]}") from None
        self.path = path
        self.output_names: list[str] = metadata["outputs"]
        self.architecture: str = metadata["architecture"]
        self.dtype: str = metadata["dtype"]
        self.config: dict[str, Any] = metadata["config"]
        self.shape: tuple[int, ...] = tuple(metadata["shape"])  # (batch, [choices,] length) of one call
        self.pad_token_id: int = metadata["pad_token_id"]

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None
                 ) -> dict[str, torch.Tensor]:
        ids, mask, types = runner_inputs(input_ids, attention_mask, token_type_ids)
        check_runner_shape(ids, self.shape, f"this {self.architecture} program")
        length = ids.shape[-1]
        if length > self.shape[-1]:
            raise UserError(f"sequence length {length} exceeds the program's maximum {self.shape[-1]}; export it "
                            "again with a larger --max-seq-length")
        check_length(length, self.config["max_position_embeddings"])
        outputs = run_in_chunks((ids, mask, types), self.pad_token_id, self.shape[0], self.method.execute)
        return {name: out.float() for name, out in zip(self.output_names, outputs, strict=True)}


_loaded: list[Path] = []  # the programs loaded in this process: they hold on to the thread pool of their loading


def _set_threads(threads: int) -> None:
    """Resize ExecuTorch's process-wide thread pool, where no loaded program holds on to the current one."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count, _unsafe_reset_threadpool

    current = _threadpool_get_thread_count()
    if threads == current:
        return
    if _loaded:
        raise UserError(f"ExecuTorch's thread pool has {current} threads and {_loaded[0]} runs on it: the pool is "
                        "process-wide and can be resized only before the first program is loaded")
    _unsafe_reset_threadpool(threads)
