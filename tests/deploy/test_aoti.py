"""AOTInductor packages (`export_aoti`, `AotiModel`, `mobilebert export --format aoti`) on tiny random models.

Each package builds C++ (about ten seconds each here). The example torch.export traces is (3, 64); every check runs
other batch sizes and lengths, down to one token, through the same package (symbolic axes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY, VARIANTS, build, export_report, inputs_for, padded_batch, relative_error, run_export
from torch.utils import cmake_prefix_path

import mobilebert as mb
from mobilebert.deploy import aoti
from mobilebert.deploy.aoti import AotiModel, export_aoti
from mobilebert.deploy.onednn import cpu_bf16

FP32_TOL = 1e-4


def assert_package_matches(package: AotiModel, eager: torch.nn.Module, batch: dict[str, torch.Tensor],
                           tol: float = FP32_TOL) -> None:
    with torch.no_grad():
        ref = eager(**batch)
    out = package(**batch)
    assert list(out) == package.output_names
    for name, t in out.items():
        assert t.shape == getattr(ref, name).shape, name
        assert relative_error(t, getattr(ref, name)) <= tol, name


@pytest.fixture(scope="module")
def mobilebert_package(tmp_path_factory):
    """MobileBERT (the default variant) with the pretraining heads, and its package (built for 2 threads)."""
    eager = build("PreTraining", mb.MobileBertConfig(**TINY))
    return eager, AotiModel(export_aoti(eager, tmp_path_factory.mktemp("aoti") / "model.pt2", threads=2))


def assert_any_batch_and_length(package: AotiModel, eager: torch.nn.Module) -> None:
    for batch in (padded_batch(batch=1, length=5), padded_batch(batch=4, length=23, seed=1),
                  padded_batch(batch=2, length=TINY["max_position_embeddings"], seed=2),
                  padded_batch(batch=1, length=1, seed=3)):
        assert_package_matches(package, eager, batch)


def test_package_matches_eager_on_any_batch_and_length_and_records_the_model(mobilebert_package):
    eager, package = mobilebert_package
    assert_any_batch_and_length(package, eager)
    assert package.output_names == ["prediction_logits", "seq_relationship_logits"]
    assert package.architecture == "MobileBertForPreTraining" and package.dtype == torch.float32
    assert package.threads == 2 and package.config["hidden_size"] == TINY["hidden_size"]
    assert [p.name for p in package.path.parent.iterdir()] == ["model.pt2"]  # no temporary file left


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("mobilebert", "mobilebert-tiny")])
def test_every_other_variant_matches_eager_and_is_left_untouched(variant, tmp_path):
    """(MobileBERT-TINY's package is the multiple-choice test's: one package less to compile.)"""
    eager = build("PreTraining", mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}))
    eager.train()
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    package = AotiModel(export_aoti(eager, tmp_path / "model.pt2"))
    assert eager.training and all(torch.equal(before[k], v) for k, v in eager.state_dict().items())
    assert_any_batch_and_length(package, eager.eval())


def test_multiple_choice_tiny_has_a_symbolic_choices_axis_and_defaults_fill_in(tmp_path):
    eager = build("MultipleChoice", mb.MobileBertConfig(**TINY, **VARIANTS["mobilebert-tiny"],
                                                         classifier_activation=True))
    package = AotiModel(export_aoti(eager, tmp_path / "mc.pt2"))
    for choices in (1, 3):
        batch = {k: v.unsqueeze(0).expand(2, choices, -1).contiguous() for k, v in padded_batch(batch=1).items()}
        assert_package_matches(package, eager, batch)
    ids = inputs_for("MultipleChoice")["input_ids"]
    with torch.no_grad():
        expected = eager(ids, torch.ones_like(ids), torch.zeros_like(ids)).logits
    assert relative_error(package(ids.numpy())["logits"], expected) <= FP32_TOL  # numpy in, mask/types filled in


def test_aoti_model_refuses_what_it_cannot_run(mobilebert_package, tmp_path, monkeypatch):
    with pytest.raises(mb.UserError, match="no such AOTInductor package"):
        AotiModel(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip file")
    with pytest.raises(mb.UserError, match="cannot load AOTInductor package"):
        AotiModel(tmp_path / "junk.pt2")
    package = mobilebert_package[1]
    too_long = torch.ones(1, TINY["max_position_embeddings"] + 1, dtype=torch.long)
    with pytest.raises(mb.UserError, match="max_position_embeddings=64"):
        package(too_long)
    with pytest.raises(mb.UserError, match="attention_mask has shape"):
        package(too_long[:, :8], attention_mask=too_long[:, :9])
    monkeypatch.setattr(aoti, "_cpu_isa", lambda: "AVX2")  # an older CPU than the one it was built on
    if set(package.runner.get_metadata()["AOTI_CPU_ISA"].split()) - {"AVX2"}:
        with pytest.raises(mb.UserError, match="which this one lacks"):
            AotiModel(package.path)
    else:  # built on an AVX2 machine: nothing is missing
        assert AotiModel(package.path).architecture == "MobileBertForPreTraining"


def test_export_command_writes_a_package_that_matches_eager(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    report = export_report(checkpoint, out, "aoti", "--threads", "1")
    assert list(report["files"]) == ["model.pt2"] and report["fp32_ok"]
    assert report["parity"]["fp32"]["relative_error"]["logits"] <= FP32_TOL
    assert report["parity"]["fp32"]["argmax_agreement"]["logits"] == 1.0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert AotiModel(out / "model.pt2").threads == 1
    printed = capsys.readouterr().out
    assert "package built for 1 threads" in printed and json.loads(printed.splitlines()[-1])["format"] == "aoti"
    with pytest.raises(mb.UserError, match="--no-optimize applies to the ONNX formats"):
        run_export([str(checkpoint[0]), "--out", str(out), "--format", "aoti", "--no-optimize"])


@pytest.mark.skipif(not cpu_bf16(), reason="the CPU has no native bf16")
def test_export_command_bf16_package_is_close_to_eager(checkpoint, tmp_path):
    out = tmp_path / "bf16"
    report = export_report(checkpoint, out, "aoti-bf16")
    assert list(report["files"]) == ["model-bf16.pt2"] and report["fp32_ok"]
    assert report["parity"]["bf16"]["relative_error"]["logits"] < 3e-2
    assert AotiModel(out / "model-bf16.pt2").dtype == torch.bfloat16


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("c++")), reason="needs cmake and a C++ compiler")
def test_the_cpp_example_builds_and_runs_a_package(mobilebert_package, tmp_path):
    """examples/aoti_cpp, built against the libtorch of this environment as its CMakeLists.txt says."""
    source = Path(__file__).resolve().parents[2] / "examples" / "aoti_cpp"
    build_dir = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), f"-DCMAKE_PREFIX_PATH={cmake_prefix_path}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir)], check=True, capture_output=True)
    run = subprocess.run([str(build_dir / "run_package"), str(mobilebert_package[1].path), "2", "7", "3"],
                         check=True, capture_output=True, text=True)
    lines = run.stdout.splitlines()
    assert lines[0].startswith("MobileBertForPreTraining (float32, built for 2 threads)")
    assert lines[1].split() == ["[2,", "7,", f"{TINY['vocab_size']}]", "float"]  # prediction_logits
    assert lines[2].split() == ["[2,", "2]", "float"] and lines[3].startswith("median ")
