"""The backends `mobilebert bench` times: one table, `BUILDERS`, from a name to the function that builds it.

Every backend turns the same eager `MobileBertModel` (and its saved weights, for the references and the memory
measurement) into a `Backend`: a function of a batch that returns the last hidden state as float32, with its size
on disk and FLOPs. A backend whose runtime is missing, or which this CPU cannot run well (bf16 without native
support), raises a UserError when built and is skipped with that reason. Adding a backend: write its builder
here (its export and runtime live in their own module under deploy/), add it to `BUILDERS`, and, if it belongs in
the default run, to `DEFAULT_BACKENDS`; `mobilebert export`'s formats are in `deploy/runners.FORMATS`, and a test
checks the two tables agree.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilebert.deploy.fused_ops import cpu_bf16
from mobilebert.errors import UserError
from mobilebert.model import MobileBertModel
from mobilebert.stats import count_flops

OURS = ("eager", "optimized", "parallel", "compiled", "bf16", "compiled-bf16", "aoti", "aoti-bf16", "onnx",
        "onnx-int8", "torch-int8", "executorch", "executorch-int8", "tflite", "tflite-int8")
REFERENCES = ("hf-mobilebert", "hf-bert-base")
DEFAULT_BACKENDS = ("eager", "optimized", "parallel", "bf16", "compiled-bf16", "aoti-bf16", "onnx", "onnx-int8",
                    "torch-int8", "executorch-int8", *REFERENCES)
BF16 = ("bf16", "compiled-bf16", "aoti-bf16")  # timed only where the CPU has native bf16


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


def _optimized(model, weights, workdir, threads, token_parallel: bool = False) -> Backend:
    from mobilebert.deploy.optimize import optimize_for_inference

    fast = optimize_for_inference(model, token_parallel=token_parallel)
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


def _aoti(model, weights, workdir, threads, dtype: torch.dtype | None = None) -> Backend:
    from mobilebert.deploy.aoti import AotiModel, export_aoti

    if dtype == torch.bfloat16:
        _require_native_bf16()
    name = "aoti-bf16" if dtype == torch.bfloat16 else "aoti"
    path = workdir / f"{name}.pt2"  # built once per workdir: later lengths and `peak_memory`'s processes load it
    if not path.is_file():
        print(f"{name}: building the AOTInductor package (bf16 at full size: about two minutes)")
        export_aoti(model, path, dtype, threads)
    package = AotiModel(path)
    return Backend(name, lambda b: _hidden(package(**b)), file_bytes(path))


def _bf16(model, weights, workdir, threads) -> Backend:
    from mobilebert.deploy.optimize import optimize_for_inference
    from mobilebert.deploy.quantize import state_dict_size

    _require_native_bf16()
    # Weights converted (and packed for oneDNN) once: autocast casts every weight on every call (no faster than fp32).
    fast = optimize_for_inference(model, dtype=torch.bfloat16)
    return Backend("bf16", lambda b: _hidden(fast(**b)), state_dict_size(fast))


def _onnx(model, weights, workdir, threads, int8: bool = False) -> Backend:
    from mobilebert.deploy.export import OnnxModel, export_onnx

    path = workdir / "model.onnx"  # made once per workdir: `peak_memory`'s processes reuse the parent's files
    if not path.is_file():
        export_onnx(model, path)
    if int8:
        from mobilebert.deploy.quantize import quantize_onnx_dynamic

        path, source = workdir / "model-int8.onnx", path
        if not path.is_file():
            quantize_onnx_dynamic(source, path)
    session = OnnxModel(path, threads=threads)
    return Backend("onnx-int8" if int8 else "onnx", lambda b: _hidden(session(**b)), file_bytes(path))


def _torch_int8(model, weights, workdir, threads) -> Backend:
    from mobilebert.deploy.quantize import quantize_torch_dynamic

    quantized = quantize_torch_dynamic(model)
    path = workdir / "torch-int8.pt"
    torch.save(quantized.state_dict(), path)
    return Backend("torch-int8", lambda b: _hidden(quantized(**b)), file_bytes(path))


def _executorch(model, weights, workdir, threads, int8: bool = False) -> Backend:
    """An ExecuTorch program, lowered on the first call for that call's (batch, length): its batch is fixed, and a
    program lowered for the length timed plans its memory for that length, as a deployment would."""
    from mobilebert.deploy.mobile import INSTALL_HINT, ExecutorchModel, export_executorch

    _require("executorch", INSTALL_HINT)
    return _built_per_shape("executorch-int8" if int8 else "executorch", "pte", workdir,
                            "lowering", "MobileBERT: about a minute, two with int8",
                            lambda path, shape: export_executorch(model, path, batch=shape[0], length=shape[1],
                                                                  int8=int8),
                            lambda path: ExecutorchModel(path, threads))


def _tflite(model, weights, workdir, threads, int8: bool = False) -> Backend:
    """A LiteRT flatbuffer converted on the first call for that call's (batch, length): one signature of that
    shape, so no call pads."""
    from mobilebert.deploy.litert import INSTALL_HINT, TFLiteModel, export_tflite

    _require("litert_torch", INSTALL_HINT)
    return _built_per_shape("tflite-int8" if int8 else "tflite", "tflite", workdir,
                            "converting", "MobileBERT: about 20 s",
                            lambda path, shape: export_tflite(model, path, lengths=[shape[1]], batch=shape[0],
                                                              int8=int8),
                            lambda path: TFLiteModel(path, threads))


def _require(module: str, hint: str) -> None:
    """A UserError (the backend is skipped now, not on its first call) where `module` is not installed; found
    without importing it, so `peak_memory` counts only the runtime a backend loads, not its converter."""
    if importlib.util.find_spec(module) is None:
        raise UserError(hint)


def _built_per_shape(name: str, suffix: str, workdir: Path, verb: str, duration: str,
                     build: Callable[[Path, tuple[int, ...]], Any], load: Callable[[Path], Callable[..., Any]]
                     ) -> Backend:
    """A backend whose file is built on the first call of each input shape (`build(path, shape)`, announced with
    `verb` and how long it takes), then loaded."""
    loaded: dict[tuple[int, ...], Callable[..., Any]] = {}

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = tuple(batch["input_ids"].shape)
        if shape not in loaded:
            path = workdir / f"{name}-{'x'.join(map(str, shape))}.{suffix}"  # `peak_memory`'s processes load it
            if not path.is_file():
                print(f"{name}: {verb} for {' x '.join(map(str, shape))} ({duration})")
                build(path, shape)
            loaded[shape] = load(path)
            backend.size_bytes = file_bytes(path)
        return _hidden(loaded[shape](**batch))

    backend = Backend(name, run)
    return backend


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
    from mobilebert.deploy.mobile import quiet_stderr

    with quiet_stderr():
        import transformers

        transformers.MobileBertModel, transformers.BertModel  # noqa: B018  (lazy modules: import them now)
    return transformers


def bert_flops(cfg: Any, seq: int) -> int:
    """BERT's encoder FLOPs for one sequence: Q, K, V, output and FFN projections, scores and context."""
    T, D, Fw, L = seq, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return 2 * L * (T * (4 * D * D + 2 * D * Fw) + 2 * T * T * D)


BUILDERS: dict[str, Callable[..., Backend]] = {
    "eager": _eager, "optimized": _optimized, "parallel": lambda *a: _optimized(*a, token_parallel=True),
    "compiled": _compiled, "bf16": _bf16,
    "compiled-bf16": lambda *a: _compiled(*a, dtype=torch.bfloat16), "aoti": _aoti,
    "aoti-bf16": lambda *a: _aoti(*a, dtype=torch.bfloat16), "onnx": _onnx,
    "onnx-int8": lambda *a: _onnx(*a, int8=True), "torch-int8": _torch_int8, "executorch": _executorch,
    "executorch-int8": lambda *a: _executorch(*a, int8=True), "tflite": _tflite,
    "tflite-int8": lambda *a: _tflite(*a, int8=True), "hf-mobilebert": _hf_mobilebert,
    "hf-bert-base": _hf_bert_base,
}


def file_bytes(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None
