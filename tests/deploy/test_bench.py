"""`mobilebert bench` end to end on a tiny preset: every backend runs, matches eager, and the JSON line is complete."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from mobilebert.deploy.backends import BF16, DEFAULT_BACKENDS, Backend, random_inputs
from mobilebert.deploy.bench import in_fresh_processes, measure


def run_bench(cwd, *args: str) -> dict:
    """`mobilebert bench` on the test preset (2 x 16, two repetitions), checked to succeed; its JSON line."""
    result = subprocess.run([sys.executable, "-m", "mobilebert", "bench", "--preset", "mobilebert-test",
                             "--repetitions", "2", "--warmup", "1", "--seq", "16", "--batch", "2", *args],
                            capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# Compiled by inductor, each in its own tests (test_compiled, test_aoti): about 80 s of this test on 2 AMD cores.
INDUCTOR = ("compiled-bf16", "aoti-bf16")


def test_bench_runs_the_default_backends_and_prints_json_last(tmp_path):
    backends = [b for b in DEFAULT_BACKENDS if b not in INDUCTOR]
    report = run_bench(tmp_path, "--backends", *backends, "--plot", str(tmp_path / "new" / "bench.png"),
                       "--no-memory")  # memory: the next test; the plot's folder is made
    conditions = report["conditions"]
    assert conditions["threads"] == 2 and conditions["batch"] == 2 and conditions["seq"] == 16
    assert conditions["matmul_peak_gflops"] > 0 and "torch" in conditions and "cpu" in conditions
    rows = {r["backend"]: r for r in report["results"]}
    expected = set(backends) - (set() if conditions["native_bf16"] else set(BF16))
    assert set(rows) == expected
    for row in rows.values():
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["sequences_per_s"] > 0
        assert row["speedup_vs_hf-mobilebert"] > 0
        assert row["peak_mb"] is None
    for name in ("optimized", "parallel", "onnx", "hf-mobilebert"):
        assert rows[name]["relative_error"] < 1e-4, name
    for name in ("onnx-int8", "torch-int8"):
        assert rows[name]["relative_error"] < 0.5, name  # int8 of random tiny weights: close, not exact
    assert rows["onnx-int8"]["size_mb"] < rows["onnx"]["size_mb"]
    assert (tmp_path / "new" / "bench.png").stat().st_size > 0


def test_bench_measures_peak_memory_in_fresh_processes(tmp_path):
    report = run_bench(tmp_path, "--backends", "eager", "hf-bert-base")
    rows = {r["backend"]: r for r in report["results"]}
    assert all(row["peak_mb"] > 0 for row in rows.values())
    # Peak memory holds at least the weights: BERT-base's 86M parameters (at this preset's vocabulary) are 344 MB.
    assert rows["hf-bert-base"]["peak_mb"] > 0.9 * rows["hf-bert-base"]["size_mb"]


def test_compiled_backends_are_first_called_after_every_build_and_warmed_up_last():
    """ExecuTorch's lowering (a first call) resets dynamo: a compiled backend called before it would compile again
    in a timed call."""
    calls = []

    def backend(name: str, lazily: bool = False) -> Backend:
        return Backend(name, lambda b: calls.append(name) or torch.ones(1, 4, 8), compiles_lazily=lazily)

    backends = [backend("eager"), backend("compiled", lazily=True), backend("executorch")]
    measure(backends, random_inputs(50, batch=1, seq=4), warmup=1, repetitions=2)
    assert calls[:4] == ["eager", "eager", "executorch", "compiled"]  # the reference, then first calls
    assert calls[4:7] == ["eager", "compiled", "executorch"]  # warm-ups, after every first call
    assert calls[7:] == ["eager", "compiled", "executorch"] * 2 and all(len(b.times) == 2 for b in backends)


def test_each_memory_measurement_gets_a_process_of_its_own():
    pids = in_fresh_processes(os.getpid, [()] * 3)
    assert len(set(pids)) == 3 and os.getpid() not in pids
    missing = in_fresh_processes(os.stat, [("/no/such/file",)])[0]  # OSError: handed back, not raised
    assert isinstance(missing, FileNotFoundError)
    with pytest.raises(ValueError):
        in_fresh_processes(int, [("not a number",)])


def test_bench_rejects_unknown_backends_and_too_long_sequences(tmp_path):
    (tmp_path / "earlier.png").write_bytes(b"a chart")
    for args, message in ((["--backends", "gpu9000"], "unknown backend 'gpu9000'"),
                          (["--preset", "mobilebert-test", "--seq", "4096"], "max_position_embeddings"),
                          (["--preset", "mobilebert-test", "--plot", "chart.txt"], "name a .png, .svg or .pdf"),
                          (["--preset", "mobilebert-test", "--plot", "earlier.png"], "exists; pass --overwrite")):
        result = subprocess.run([sys.executable, "-m", "mobilebert", "bench", *args], capture_output=True,
                                text=True, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert (tmp_path / "earlier.png").read_bytes() == b"a chart"


def test_random_inputs_have_a_realistic_mask():
    inputs = random_inputs(100, batch=3, seq=16)
    assert inputs["attention_mask"][0].all() and not inputs["attention_mask"][2].all()
    assert inputs["input_ids"].min() >= 5


def test_backend_and_head_names_agree_across_bench_export_and_the_accuracy_benchmark():
    """One table of backends: what `export` writes, `bench` times and the reduced-precision benchmark scores are
    its names, each exported backend can be written and read back, and every head has its fused head and its
    export task."""
    import importlib.util
    from pathlib import Path

    from mobilebert.deploy.backends import BACKENDS, BUILDERS, FORMATS
    from mobilebert.deploy.optimize import _HEADS
    from mobilebert.heads import TASK_MODELS
    from mobilebert.recipes.export import TASKS, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    formats = next(a for a in parser._actions if a.dest == "format").choices
    assert list(formats) == list(FORMATS) == [n for n, s in BACKENDS.items() if s.file]
    assert set(BUILDERS) == {n for n, s in BACKENDS.items() if not s.calibrated}
    for name, spec in BACKENDS.items():
        assert (spec.file is None) == (spec.export is None) == (spec.load is None), name
        assert spec.bench is not None or spec.export is not None, name
        assert spec.precision in ("fp32", "bf16", "int8"), name
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "reduced_precision_accuracy.py"
    spec = importlib.util.spec_from_file_location("reduced_precision_accuracy", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.DEFAULT) <= set(module.REDUCED) <= set(BUILDERS)
    assert set(_HEADS) == set(TASK_MODELS.values())
    assert set(TASKS.values()) == {"MobileBertModel", *TASK_MODELS}
