"""AOTInductor packages: the compiled inference model as one `.pt2` file that runs without Python's compiler stack.

`export_aoti` takes what `compile_for_inference` compiles (the optimized model, inductor's freezing, bf16 GEMM
templates on CPUs with native bf16) and compiles it ahead of time instead of on the first call: `torch.export`
captures the forward with symbolic batch and sequence (and choices) axes, AOTInductor generates and builds C++
for it, and the weights, the shared library and the call spec go into one zip file. `AotiModel` loads it in
Python; C++ programs load the same file with libtorch's `torch::inductor::AOTIModelPackageLoader`.

No dynamo guards, no Python wrapper around the kernels: measured on MobileBERT bf16, 1×128, 2 threads, one
interleaved run, 10.8 ms against 13.1 ms for `compile_for_inference` with a static graph (docs/deployment.md).

A package is built for this machine: its CPU's vector ISA (AVX512, AMX, ...; recorded in the package and checked
by `AotiModel`), the thread count its parallel loops are specialized for (`threads`), and the torch version that
loads it (the generated code calls libtorch's C shim, which is stable within a release, not across them).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobilebert.deploy.compiled import inductor_settings, own_ffn_storage
from mobilebert.deploy.interface import (
    INPUT_NAMES,
    Exportable,
    dynamic_axes,
    eager_outputs,
    eval_mode,
    example_batch,
    export_shapes,
    runner_inputs,
)
from mobilebert.deploy.optimize import optimize_for_inference
from mobilebert.errors import UserError
from mobilebert.files import atomic_write
from mobilebert.model import check_length

_META = "mobilebert."  # prefix of our keys in the package's metadata


def export_aoti(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
                threads: int | None = None) -> Path:
    """Compile `model` (the backbone or any task model) ahead of time into the AOTInductor package `path` (.pt2).

    The package computes `optimize_for_inference(model)` in `dtype` (default float32; bfloat16 converts the
    weights once) for any batch, sequence length up to `max_position_embeddings`, and number of choices; its
    inputs are `input_ids`, `attention_mask`, `token_type_ids` and its outputs the model's inference fields
    (recorded in the package, `AotiModel` returns them by name). `threads`: the thread count its parallel loops
    are built for (default: torch's current one). Building takes seconds for the tiny presets, about two minutes
    for MobileBERT in bf16 (inductor autotunes every matmul shape), and needs a C++ compiler. The file is written
    atomically; `model` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = dtype or torch.float32
    threads = threads or torch.get_num_threads()
    with eval_mode(model):
        example = example_batch(model, batch=3, length=min(64, model.config.max_position_embeddings))
        names = list(eager_outputs(model, example))
        fused = own_ffn_storage(optimize_for_inference(model).to(dtype))
        wrapper = Exportable(fused, names).eval()
        dims: dict[str, torch.export.Dim] = {
            "batch": torch.export.Dim("batch", min=1),
            "choices": torch.export.Dim("choices", min=1),
            "sequence": torch.export.Dim("sequence", min=1, max=model.config.max_position_embeddings),
        }
        axes = dynamic_axes(model, names)
        shapes = export_shapes(axes, dims)
        settings = {**inductor_settings(dtype), "cpp.threads": threads, "aot_inductor.metadata": {
            _META + "architecture": type(model).__name__, _META + "outputs": json.dumps(names),
            _META + "dtype": str(dtype).removeprefix("torch."), _META + "threads": str(threads),
            _META + "vocab_size": str(model.config.vocab_size),  # for programs that read no JSON (examples/aoti_cpp)
            _META + "config": json.dumps(model.config.to_transformers_dict(type(model).__name__))}}

        def write(tmp: Path) -> None:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.export's and inductor's notes on internals
                program = torch.export.export(wrapper, tuple(example[n] for n in INPUT_NAMES), dynamic_shapes=shapes)
                with open(tmp, "w+b") as f:  # a file object: the package path itself must end in .pt2
                    torch._inductor.aoti_compile_and_package(program, package_path=f, inductor_configs=settings)

        atomic_write(path, write)
    return path


class AotiModel:
    """An AOTInductor package written by `export_aoti`, called like our models.

    `model(input_ids, attention_mask=None, token_type_ids=None)` takes torch tensors or numpy arrays and returns
    a dict of torch tensors by output name (in the package's dtype). Refuses a package built for vector
    instructions this CPU lacks (it would crash on the first one).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such AOTInductor package")
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
            metadata = self.runner.get_metadata()
        except Exception as e:  # noqa: BLE001 - the loader raises plain RuntimeErrors for unreadable files
            raise UserError(f"{path}: cannot load AOTInductor package: {str(e).splitlines()[0]}") from None
        if _META + "outputs" not in metadata:
            raise UserError(f"{path}: not a mobilebert package (written by `mobilebert export --format aoti`)")
        isa = set(metadata.get("AOTI_CPU_ISA", "").split())
        missing = isa - set(_cpu_isa().split())
        if missing:
            raise UserError(f"{path}: built for a CPU with {' '.join(sorted(missing))}, which this one lacks; "
                            "export it again on this machine")
        if "AMX_TILE" in isa:  # Linux lends AMX registers only to a process that asks (else: Illegal instruction)
            torch.cpu._init_amx()
        self.path = path
        self.output_names: list[str] = json.loads(metadata[_META + "outputs"])
        self.architecture = metadata[_META + "architecture"]
        self.dtype = getattr(torch, metadata[_META + "dtype"])
        self.threads = int(metadata[_META + "threads"])
        self.config: dict[str, Any] = json.loads(metadata[_META + "config"])
        self.max_positions = self.config["max_position_embeddings"]

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None
                 ) -> dict[str, torch.Tensor]:
        ids, mask, types = runner_inputs(input_ids, attention_mask, token_type_ids)
        if ids.dim() < 2:
            raise UserError(f"input_ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        check_length(ids.shape[-1], self.max_positions)
        with torch.no_grad():
            outputs = self.runner(ids.contiguous(), mask.contiguous(), types.contiguous())
        return dict(zip(self.output_names, outputs, strict=True))


def _cpu_isa() -> str:
    """This CPU's vector ISA as inductor names it (what a package records as AOTI_CPU_ISA)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()).upper()
