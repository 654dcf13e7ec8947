"""`mobilebert bench`: latency and throughput of every way to run MobileBERT, against references, in one process.

Backends share the same random (or given) weights and the same inputs; each is checked against eager before it is
timed. Timing follows docs/benchmarks.md: threads pinned for every runtime (ONNX Runtime spinning only while a run
lasts), warm-up, then repetitions interleaved across backends so machine drift hits all alike; median and p90 per
backend. Every timed call starts after a short pause (`SETTLE_S`), in which the worker threads the previous call
left spinning (PyTorch's OpenMP, ExecuTorch's pool) go idle: right after our optimized forward, an ExecuTorch call
took 16.4 ms against 14.0 ms after a pause, its threads sharing two cores with spinning ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.util
import multiprocessing
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobilebert.config import MobileBertConfig
from mobilebert.deploy.fused_ops import cpu_bf16
from mobilebert.errors import UserError
from mobilebert.model import MobileBertModel
from mobilebert.stats import count_flops
from mobilebert.tables import format_table

OURS = ("eager", "optimized", "parallel", "compiled", "bf16", "compiled-bf16", "aoti", "aoti-bf16", "onnx",
        "onnx-int8", "torch-int8", "executorch", "executorch-int8", "tflite", "tflite-int8")
REFERENCES = ("hf-mobilebert", "hf-bert-base")
SETTLE_S = 0.01  # idle before each timed call: see the module docstring
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
    return Backend("eager", lambda b: _hidden(model(**b)), _size(weights / "model.safetensors"))


def _optimized(model, weights, workdir, threads, token_parallel: bool = False) -> Backend:
    from mobilebert.deploy.optimize import optimize_for_inference

    fast = optimize_for_inference(model, token_parallel=token_parallel)
    return Backend("parallel" if token_parallel else "optimized", lambda b: _hidden(fast(**b)),
                   _size(weights / "model.safetensors"))


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
    return Backend(name, lambda b: _hidden(package(**b)), _size(path))


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
    return Backend("onnx-int8" if int8 else "onnx", lambda b: _hidden(session(**b)), _size(path))


def _torch_int8(model, weights, workdir, threads) -> Backend:
    from mobilebert.deploy.quantize import quantize_torch_dynamic

    quantized = quantize_torch_dynamic(model)
    path = workdir / "torch-int8.pt"
    torch.save(quantized.state_dict(), path)
    return Backend("torch-int8", lambda b: _hidden(quantized(**b)), _size(path))


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
            backend.size_bytes = _size(path)
        return _hidden(loaded[shape](**batch))

    backend = Backend(name, run)
    return backend


def _hf_mobilebert(model, weights, workdir, threads) -> Backend:
    transformers = _transformers()

    theirs = transformers.MobileBertModel.from_pretrained(weights).eval()
    return Backend("hf-mobilebert", lambda b: _hidden(theirs(**b)), _size(weights / "model.safetensors"))


def _hf_bert_base(model, weights, workdir, threads) -> Backend:
    transformers = _transformers()

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=model.config.vocab_size)  # BERT-base: 12 × 768, 12 heads, FFN 3072
    bert = transformers.BertModel(cfg).eval()
    path = workdir / "bert-base"
    bert.save_pretrained(path)
    return Backend("hf-bert-base", lambda b: _hidden(bert(**b)), _size(path / "model.safetensors"), config=cfg)


def _transformers() -> Any:
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


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def matmul_peak(threads: int, seq: int = 128, repeats: int = 20) -> float:
    """The machine's fp32 matmul GFLOP/s on MobileBERT's shapes (best of `repeats`), the floor for its latency."""
    shapes = [(seq, 512, 128), (seq, 128, 512), (seq, 512, 512)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        for _ in range(repeats):
            began = time.perf_counter()
            for _ in range(10):
                a @ b
            best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - began) / 1e9)
    return best


def _status_kb(field: str) -> int:
    """A `VmRSS`/`VmHWM` figure of this process from /proc/self/status, in kB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages resident otherwise


def _peak_rss_mb(name: str, weights: str, workdir: str, threads: int, inputs: dict[str, torch.Tensor]) -> float:
    """Run in a fresh process: build backend `name`, run it once, let go of everything the build needed, reset the
    kernel's peak-RSS mark, run two forwards; the peak above the RSS of the process before it loaded anything, in
    MB. Memory a first call allocates and keeps (a compiled graph, a runtime's arena) counts; its transient peak
    (inductor compiling) does not."""
    torch.set_num_threads(threads)
    importlib.import_module("torch._inductor.compile_fx")  # library code is not the backend's memory
    with contextlib.suppress(ImportError):
        importlib.import_module("onnxruntime")
    with contextlib.suppress(ImportError):
        _transformers()
    from mobilebert.deploy.mobile import quiet_stderr

    for runtime in ("executorch.runtime", "ai_edge_litert.interpreter"):  # the on-device runtimes' libraries
        with contextlib.suppress(ImportError), quiet_stderr():
            importlib.import_module(runtime)
    _release_freed_memory()
    before = _status_kb("VmRSS")
    model = MobileBertModel.from_pretrained(weights).eval()
    backend = BUILDERS[name](model, Path(weights), Path(workdir), threads)
    del model  # backends that run the eager model keep their own reference
    with torch.inference_mode():
        backend.run(inputs)  # first calls build lazily (compiled backends compile): what they keep stays resident
    _release_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)
    with torch.inference_mode():
        backend.run(inputs)
        backend.run(inputs)
    return (_status_kb("VmHWM") - before) * 1024 / 1e6


def peak_memory(backends: list[Backend], weights: Path, workdir: Path, threads: int,
                inputs: dict[str, torch.Tensor]) -> None:
    """Set each backend's `peak_mb`: the resident memory a process needs to hold that backend and run it on
    `inputs` (weights, runtime buffers, activations), measured in a fresh process per backend so that nothing
    the others allocated counts. Linux only (/proc); elsewhere it is left unset."""
    if not Path("/proc/self/clear_refs").exists():
        print("skipping peak memory: needs Linux's /proc/self/clear_refs")
        return
    calls = [(b.name, str(weights), str(workdir), threads, inputs) for b in backends]
    for backend, result in zip(backends, in_fresh_processes(_peak_rss_mb, calls), strict=True):
        if isinstance(result, OSError):  # e.g. clear_refs not writable in a sandbox
            print(f"no peak memory for {backend.name}: {result}")
        else:
            backend.peak_mb = result


def in_fresh_processes(fn: Callable, calls: list[tuple], workers: int = 2) -> list[Any]:
    """`fn(*args)` for each args in `calls`, each in a newly spawned process (a pool's worker would carry one
    call's libraries and caches into the next), `workers` at a time; an OSError is returned in place of its result,
    other errors are raised."""
    with multiprocessing.get_context("spawn").Pool(max(1, min(workers, len(calls))), maxtasksperchild=1) as pool:
        jobs = [pool.apply_async(fn, args) for args in calls]
        results = []
        for job in jobs:
            try:
                results.append(job.get())
            except OSError as e:
                results.append(e)
        return results


@torch.inference_mode()
def measure(backends: list[Backend], inputs: dict[str, torch.Tensor], warmup: int, repetitions: int) -> None:
    """Check each backend against eager, warm them up, then time them interleaved (A B C A B C ...).

    First calls build what backends build lazily. ExecuTorch's lowering resets dynamo, which throws away every
    torch.compile'd graph, so the compiled backends make their first call after every other backend's, and all
    warm-ups come after all first calls: no compile lands in a timed call."""
    reference = backends[0].run(inputs) if backends and backends[0].name == "eager" else None
    for backend in sorted(backends, key=lambda b: b.compiles_lazily):
        out = backend.run(inputs)
        if reference is not None and out.shape == reference.shape and backend.name != "hf-bert-base":
            mask = inputs["attention_mask"].bool()
            backend.error = ((out - reference)[mask].abs().max() / reference[mask].abs().max()).item()
    for backend in backends:
        for _ in range(warmup):
            backend.run(inputs)
    for _ in range(repetitions):
        for backend in backends:
            time.sleep(SETTLE_S)
            began = time.perf_counter()
            backend.run(inputs)
            backend.times.append(time.perf_counter() - began)


def summarise(backends: list[Backend], batch: int, peak: float) -> list[dict[str, Any]]:
    rows = []
    by_name = {b.name: b for b in backends}
    for b in backends:
        median = statistics.median(b.times)
        p90 = sorted(b.times)[max(0, int(round(0.9 * len(b.times))) - 1)]
        row = {"backend": b.name, "median_ms": 1000 * median, "p90_ms": 1000 * p90,
               "sequences_per_s": batch / median, "size_mb": b.size_bytes / 1e6 if b.size_bytes else None,
               "relative_error": b.error, "peak_mb": b.peak_mb}
        for ref in REFERENCES:
            if ref in by_name:
                row[f"speedup_vs_{ref}"] = statistics.median(by_name[ref].times) / median
        if b.flops:
            row["gflops_per_s"] = batch * b.flops / median / 1e9
            row["share_of_peak"] = row["gflops_per_s"] / peak
        rows.append(row)
    return rows


def conditions(threads: int, batch: int, seq: int, peak: float) -> dict[str, Any]:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for module in ("onnxruntime", "transformers"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    from mobilebert.deploy.export import mobile_runtime_versions  # not at the top: it loads onnx, and bench and
    # peak_memory's baseline processes import this module without needing it

    versions |= mobile_runtime_versions()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"cpu": cpu, "native_bf16": cpu_bf16(), "threads": threads, "batch": batch, "seq": seq,
            "dtype": "fp32 unless the backend says", "matmul_peak_gflops": peak, **versions}


def run_bench(cfg: MobileBertConfig, names: list[str], threads: int, batch: int, seq: int, warmup: int,
              repetitions: int, checkpoint: str | None = None, memory: bool = True,
              workdir: Path | None = None) -> dict[str, Any]:
    """One interleaved run at (batch, seq). `workdir` keeps the files backends build (ONNX graphs, AOTInductor
    packages: every length can run them) for later runs on the same weights; default: a temporary folder."""
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_bench(cfg, names, threads, batch, seq, warmup, repetitions, checkpoint, memory, Path(tmp))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = (MobileBertModel.from_pretrained(checkpoint) if checkpoint else MobileBertModel(cfg)).eval()
    if seq > model.config.max_position_embeddings:
        raise UserError(f"--seq {seq} exceeds the model's max_position_embeddings "
                        f"({model.config.max_position_embeddings})")
    inputs = random_inputs(model.config.vocab_size, batch, seq)
    peak = matmul_peak(threads, seq)
    backends = build_backends(model, names, threads, workdir, inputs)
    measure(backends, inputs, warmup, repetitions)
    if memory:
        peak_memory(backends, workdir / "eager", workdir, threads, inputs)
    return {"conditions": conditions(threads, batch, seq, peak), "results": summarise(backends, batch, peak)}


def format_results(report: dict[str, Any]) -> str:
    refs = [r for r in REFERENCES if any(f"speedup_vs_{r}" in row for row in report["results"])]
    header = ["backend", "median ms", "p90 ms", "seq/s", "MB", "peak MB", "rel. error", *[f"× vs {r}" for r in refs],
              "GFLOP/s", "% of peak"]
    rows = []
    for r in report["results"]:
        rows.append([r["backend"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['sequences_per_s']:.1f}",
                     f"{r['size_mb']:.1f}" if r["size_mb"] else "-",
                     f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-",
                     f"{r['relative_error']:.1e}" if r["relative_error"] is not None else "-",
                     *[f"{r[f'speedup_vs_{ref}']:.2f}" for ref in refs],
                     f"{r.get('gflops_per_s', 0):.0f}", f"{100 * r.get('share_of_peak', 0):.0f}%"])
    c = report["conditions"]
    line = (f"{c['cpu']}, {c['threads']} threads, batch {c['batch']}, sequence {c['seq']}, torch {c['torch']}, "
            f"onnxruntime {c.get('onnxruntime', '-')}, transformers {c.get('transformers', '-')}, "
            f"matmul peak {c['matmul_peak_gflops']:.0f} GFLOP/s")
    return format_table(header, rows) + "\n" + line


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    names = [r["backend"] for r in rows]
    ax.barh(names, [r["median_ms"] for r in rows], color=["#888" if n in REFERENCES else "#2a7" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("median latency (ms), lower is better")
    c = report["conditions"]
    ax.set_title(f"batch {c['batch']} × {c['seq']}, {c['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
