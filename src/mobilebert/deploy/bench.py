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
from pathlib import Path
from typing import Any

import torch

from mobilebert.config import MobileBertConfig
from mobilebert.deploy.backends import BUILDERS, REFERENCES, Backend, build_backends, import_transformers, random_inputs
from mobilebert.deploy.onednn import cpu_bf16
from mobilebert.errors import UserError
from mobilebert.model import MobileBertModel
from mobilebert.tables import format_table

SETTLE_S = 0.01  # idle before each timed call: see the module docstring

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
        import_transformers()
    from mobilebert.deploy.interface import quiet_stderr

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
    from mobilebert.deploy.interface import mobile_runtime_versions

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
