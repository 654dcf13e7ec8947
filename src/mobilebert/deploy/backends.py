"""Every deployment backend in one table, `BACKENDS`: a name -> how `mobilebert bench` builds it, how
`mobilebert export` writes it and how it is read back, what precision it computes in.

Two kinds of backend. In-process ones (eager, optimized, compiled, bf16, ...) turn the eager model into another
PyTorch module (`Spec.inference`). Exported ones write a file (`Spec.file`, through `Spec.export`, an adapter in
`deploy/formats.py`) that a runtime loads (`Spec.load`). `mobilebert bench` times either kind as a `Backend`: a
function of a batch that returns the last hidden state as float32, with its size on disk and FLOPs; exported
backends get their bench builder from the table. A backend whose runtime is missing, or which this CPU cannot run
well (bf16 without native support), raises a UserError or NotImplementedError when built and is skipped with that
reason.

Adding a backend: its export and runtime in their own module under deploy/, its adapters in formats.py, and one
entry here. `mobilebert bench`, `mobilebert export`, `mobilebert predict`, the demo's deploy stage and
benchmarks/reduced_precision_accuracy.py all take their names from this table.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mobilebert.deploy import formats
from mobilebert.deploy.onednn import cpu_bf16
from mobilebert.errors import UserError
from mobilebert.model import MobileBertModel
from mobilebert.stats import count_flops


@dataclass
class Backend:
    name: str
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # inputs -> last hidden state (float32)
    size_bytes: int | None = None  # the model's file on disk
    flops: int | None = None  # per sequence
    config: Any = None  # a reference's own config, when it is not our architecture
    error: float | None = None  # relative error of its output against eager
    peak_mb: float | None = None  # resident memory to hold it and run it (see `peak_memory`)
    compiles_lazily: bool = False  # torch.compile'd: its first call compiles (see `measure`)
    times: list[float] = field(default_factory=list)


def random_inputs(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh random ids and a realistic mask: every row but the first ends in padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, seq - seq // (4 * row) :] = 0
    types = torch.zeros_like(ids)
    types[:, seq // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _hidden(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        out = out.get("last_hidden_state", next(iter(out.values())))
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return torch.as_tensor(out).float()


def build_backends(model: MobileBertModel, names: list[str], threads: int, workdir: Path,
                   example: dict[str, torch.Tensor]) -> list[Backend]:
    """Every requested backend around the same weights; names that cannot run here are reported and skipped."""
    weights = workdir / "eager"
    model.save_pretrained(weights)
    flops = count_flops(model.config, example["input_ids"].shape[1])
    backends = []
    for name in names:
        try:
            backend = BUILDERS[name](model, weights, workdir, threads)
        except (ImportError, RuntimeError, NotImplementedError, UserError) as e:
            print(f"skipping {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        backend.flops = bert_flops(backend.config, example["input_ids"].shape[1]) if name == "hf-bert-base" else flops
        backends.append(backend)
    return backends


def _eager(model, weights, workdir, threads) -> Backend:
    return Backend("eager", lambda b: _hidden(model(**b)), file_bytes(weights / "model.safetensors"))


def _optimized_model(model: nn.Module, token_parallel: bool = False) -> nn.Module:
    from mobilebert.deploy.optimize import optimize_for_inference

    return optimize_for_inference(model, token_parallel=token_parallel)


def _bf16_model(model: nn.Module) -> nn.Module:
    from mobilebert.deploy.optimize import optimize_for_inference

    return optimize_for_inference(model, dtype=torch.bfloat16)


def _optimized(model, weights, workdir, threads, token_parallel: bool = False) -> Backend:
    fast = _optimized_model(model, token_parallel)
    return Backend("parallel" if token_parallel else "optimized", lambda b: _hidden(fast(**b)),
                   file_bytes(weights / "model.safetensors"))


def _require_native_bf16() -> None:
    """bf16 backends are skipped (not timed) where the CPU would only emulate bf16."""
    if not cpu_bf16():
        raise NotImplementedError("this CPU has no native bf16 (AVX512-BF16/AMX): emulated bf16 is slower")


def _compiled(model, weights, workdir, threads, dtype: torch.dtype | None = None) -> Backend:
    from mobilebert.deploy.compiled import compile_for_inference
    from mobilebert.deploy.quantize import state_dict_size

    if dtype == torch.bfloat16:
        _require_native_bf16()
    name = "compiled-bf16" if dtype == torch.bfloat16 else "compiled"
    print(f"{name}: compiles on its first call (bf16 at full size: about a minute, mostly autotuning its matmuls)")
    fast = compile_for_inference(model, dtype, dynamic=False)  # a static graph for every sequence length timed
    return Backend(name, lambda b: _hidden(fast(**b)), state_dict_size(fast.fused), compiles_lazily=True)


def _bf16(model, weights, workdir, threads) -> Backend:
    from mobilebert.deploy.quantize import state_dict_size

    _require_native_bf16()
    # Weights converted (and packed for oneDNN) once: autocast casts every weight on every call (no faster than fp32).
    fast = _bf16_model(model)
    return Backend("bf16", lambda b: _hidden(fast(**b)), state_dict_size(fast))


def _hf_mobilebert(model, weights, workdir, threads) -> Backend:
    transformers = import_transformers()

    theirs = transformers.MobileBertModel.from_pretrained(weights).eval()
    return Backend("hf-mobilebert", lambda b: _hidden(theirs(**b)), file_bytes(weights / "model.safetensors"))


def _hf_bert_base(model, weights, workdir, threads) -> Backend:
    transformers = import_transformers()

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=model.config.vocab_size)  # BERT-base: 12 × 768, 12 heads, FFN 3072
    bert = transformers.BertModel(cfg).eval()
    path = workdir / "bert-base"
    bert.save_pretrained(path)
    return Backend("hf-bert-base", lambda b: _hidden(bert(**b)), file_bytes(path / "model.safetensors"), config=cfg)


def import_transformers() -> Any:
    """transformers, imported without the notes it prints where torchao (ExecuTorch's dependency) is installed."""
    from mobilebert.deploy.interface import quiet_stderr

    with quiet_stderr():
        import transformers

        transformers.MobileBertModel, transformers.BertModel  # noqa: B018  (lazy modules: import them now)
    return transformers


def bert_flops(cfg: Any, seq: int) -> int:
    """BERT's encoder FLOPs for one sequence: Q, K, V, output and FFN projections, scores and context."""
    T, D, Fw, L = seq, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return 2 * L * (T * (4 * D * D + 2 * D * Fw) + 2 * T * T * D)


@dataclass(frozen=True)
class Spec:
    """One backend: what it is and where each of its steps lives."""

    precision: str = "fp32"  # what it computes in: "fp32", "bf16" (only where the CPU has it natively) or "int8"
    bench: Callable[..., Backend] | None = None  # in-process and references: (model, weights, workdir, threads)
    inference: Callable[[nn.Module], nn.Module] | None = None  # in-process: the model as this backend runs it
    file: str | None = None  # exported: the file `mobilebert export --format NAME` writes
    export: formats.Exporter | None = None  # exported: (model, folder, file, options) -> {precision: path}
    load: formats.Loader | None = None  # exported: (path, threads, float_model) -> the runtime's model
    runtime: str = "torch"  # what runs it: "torch", "onnxruntime", "aoti", "executorch", "litert"
    per_shape: bool = False  # a fixed batch (ExecuTorch) or fixed lengths (LiteRT): bench builds one per shape timed
    requires: str | None = None  # a module that must be installed (checked without importing it)
    calibrated: bool = False  # quantized on real text: exported only, never timed on random weights
    default: bool = False  # in `mobilebert bench`'s default set
    reference: bool = False  # another implementation, timed as the yardstick


def _compiled_bf16_model(model: nn.Module) -> nn.Module:
    from mobilebert.deploy.compiled import compile_for_inference

    return compile_for_inference(model, dtype=torch.bfloat16)


def _compiled_model(model: nn.Module) -> nn.Module:
    from mobilebert.deploy.compiled import compile_for_inference

    return compile_for_inference(model)


_EXECUTORCH = dict(runtime="executorch", load=formats.load_executorch, per_shape=True, requires="executorch")
_LITERT = dict(runtime="litert", load=formats.load_tflite, per_shape=True, requires="litert_torch")

BACKENDS: dict[str, Spec] = {
    "eager": Spec(bench=_eager, inference=lambda m: m, default=True),
    "optimized": Spec(bench=_optimized, inference=_optimized_model, default=True),
    "parallel": Spec(bench=lambda *a: _optimized(*a, token_parallel=True),
                     inference=lambda m: _optimized_model(m, token_parallel=True), default=True),
    "compiled": Spec(bench=_compiled, inference=_compiled_model),
    "bf16": Spec("bf16", bench=_bf16, inference=_bf16_model, default=True),
    "compiled-bf16": Spec("bf16", bench=lambda *a: _compiled(*a, dtype=torch.bfloat16),
                          inference=_compiled_bf16_model, default=True),
    "aoti": Spec(file="model.pt2", export=formats.aoti, load=formats.load_aoti, runtime="aoti"),
    "aoti-bf16": Spec("bf16", file="model-bf16.pt2", export=formats.aoti_bf16, load=formats.load_aoti,
                      runtime="aoti", default=True),
    "onnx": Spec(file="model.onnx", export=formats.onnx, load=formats.load_onnx, runtime="onnxruntime",
                 default=True),
    "onnx-int8": Spec("int8", file="model-int8.onnx", export=formats.onnx_int8, load=formats.load_onnx,
                      runtime="onnxruntime", default=True),
    "onnx-int8-static": Spec("int8", file="model-int8-static.onnx", export=formats.onnx_int8_static,
                             load=formats.load_onnx, runtime="onnxruntime", calibrated=True),
    "torch-int8": Spec("int8", file="torch-int8.pt", export=formats.torch_int8, load=formats.load_torch_int8,
                       default=True),
    "executorch": Spec(file="model.pte", export=formats.executorch, **_EXECUTORCH),
    "executorch-int8": Spec("int8", file="model-int8.pte", export=formats.executorch_int8, default=True,
                            **_EXECUTORCH),
    "tflite": Spec(file="model.tflite", export=formats.tflite, **_LITERT),
    "tflite-int8": Spec("int8", file="model-int8.tflite", export=formats.tflite_int8, **_LITERT),
    "hf-mobilebert": Spec(bench=_hf_mobilebert, reference=True, default=True),
    "hf-bert-base": Spec(bench=_hf_bert_base, reference=True, default=True),
}

# Views of the table, in its order.
FORMATS = {name: spec.file for name, spec in BACKENDS.items() if spec.file}  # what `mobilebert export` writes
DEFAULT_BACKENDS = tuple(name for name, spec in BACKENDS.items() if spec.default)
REFERENCES = tuple(name for name, spec in BACKENDS.items() if spec.reference)
BF16 = tuple(name for name, spec in BACKENDS.items() if spec.precision == "bf16")  # timed only with native bf16


def _bench_builder(name: str, spec: Spec) -> Callable[..., Backend]:
    if spec.bench is not None:
        return spec.bench
    return lambda *a: (_exported_per_shape if spec.per_shape else _exported)(name, spec, *a)


BUILDERS: dict[str, Callable[..., Backend]] = {name: _bench_builder(name, spec) for name, spec in BACKENDS.items()
                                               if not spec.calibrated}


def _check_runnable(spec: Spec) -> None:
    """Raise where this backend cannot run here: its runtime is not installed (a UserError, found without
    importing it, so `peak_memory` counts only the runtime a backend loads), or it is bf16 without native bf16."""
    if spec.requires is not None and importlib.util.find_spec(spec.requires) is None:
        raise UserError(_install_hint(spec.requires))
    if spec.precision == "bf16":
        _require_native_bf16()


def _install_hint(module: str) -> str:
    if module == "executorch":
        from mobilebert.deploy.mobile import INSTALL_HINT

        return INSTALL_HINT
    if module == "litert_torch":
        from mobilebert.deploy.litert import INSTALL_HINT

        return INSTALL_HINT
    return f"{module} is not installed: pip install {module.replace('_', '-')}"


def _exported(name: str, spec: Spec, model, weights, workdir, threads) -> Backend:
    """An exported backend, written once per workdir (`peak_memory`'s processes load the parent's file)."""
    _check_runnable(spec)
    path = workdir / spec.file
    if not path.is_file():
        options = formats.ExportOptions(length=min(128, model.config.max_position_embeddings), threads=threads,
                                        reuse=True)  # onnx-int8 quantizes the onnx backend's graph
        spec.export(model, workdir, spec.file, options)
    runtime = spec.load(path, threads, lambda: type(model)(model.config))
    return Backend(name, lambda b: _hidden(runtime(**b)), file_bytes(path))


def _exported_per_shape(name: str, spec: Spec, model, weights, workdir, threads) -> Backend:
    """An exported backend of fixed shape (ExecuTorch, LiteRT), written on the first call of each (batch, length):
    a program made for the length timed plans its memory for that length, as a deployment would."""
    _check_runnable(spec)
    loaded: dict[tuple[int, ...], Callable[..., Any]] = {}

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = tuple(batch["input_ids"].shape)
        if shape not in loaded:
            # `peak_memory`'s processes load it
            file = f"{name}-{'x'.join(map(str, shape))}.{spec.file.rsplit('.', 1)[1]}"
            if not (workdir / file).is_file():
                spec.export(model, workdir, file, formats.ExportOptions(length=shape[1], batch=shape[0]))
            loaded[shape] = spec.load(workdir / file, threads, None)
            backend.size_bytes = file_bytes(workdir / file)
        return _hidden(loaded[shape](**batch))

    backend = Backend(name, run)
    return backend


def load_exported(fmt: str, path: str | Path, threads: int | None = None,
                  float_model: Callable[[], nn.Module] | None = None) -> Any:
    """The runtime's model of an exported file, called as (input_ids, attention_mask, token_type_ids) and returning
    outputs by name (torch-int8: the quantized module; `float_model` builds the float model it was quantized from)."""
    spec = BACKENDS.get(fmt)
    if spec is None or spec.load is None:
        raise ValueError(f"no runner for format {fmt!r}")
    return spec.load(Path(path), threads, float_model)


Runner = Callable[[dict[str, torch.Tensor]], dict[str, np.ndarray]]  # a batch -> outputs by name


def open_exported(fmt: str, path: str | Path, threads: int | None = None,
                  float_model: Callable[[], nn.Module] | None = None) -> Runner:
    """`load_exported`'s model as a runner of a batch: outputs by name as float32 numpy arrays."""
    model = load_exported(fmt, path, threads, float_model)
    if isinstance(model, nn.Module):
        from mobilebert.deploy.interface import eager_outputs

        return lambda batch: eager_outputs(model, batch)

    def run(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return {k: (v.float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32))
                for k, v in out.items()}

    return run


def task_model(name: str, model: nn.Module, folder: Path, length: int, threads: int | None = None) -> Any:
    """`model` (a task model) as backend `name` runs it, for scoring: an in-process module, or the exported file
    (written under `folder` for inputs up to `length` tokens) behind the task-model interface `finetuning.predict`
    calls. What the demo's deploy stage and the reduced-precision benchmark score."""
    from mobilebert.deploy.interface import ExportedTaskModel

    spec = BACKENDS[name]
    if spec.inference is not None:
        return spec.inference(model)
    if spec.export is None or spec.calibrated:
        raise ValueError(f"backend {name!r} cannot score a task model")
    _check_runnable(spec)
    files = spec.export(model, folder, spec.file, formats.ExportOptions(length=length, threads=threads))
    runtime = spec.load(files[spec.precision], threads, lambda: type(model)(model.config))
    return runtime if isinstance(runtime, nn.Module) else ExportedTaskModel(runtime)


def file_bytes(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None
