"""compile_for_inference: the compiled optimized model matches eager for every variant and head.

Inductor builds C++ kernels on a model's first call (seconds each here); kernels it has built are reused, so the
heads after the first compile quickly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HEADS, TINY, VARIANTS, assert_same_outputs, build, inputs_for, padded_batch, relative_error

import mobilebert as mb
from mobilebert.deploy.compiled import AMX_GEMM, compile_for_inference, inductor_settings
from mobilebert.deploy.onednn import cpu_bf16
from mobilebert.deploy.optimize import optimize_for_inference


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_matches_eager(variant):
    eager = build("PreTraining", mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}))
    assert_same_outputs(compile_for_inference(eager), eager, inputs_for("PreTraining"))


@pytest.mark.parametrize("head", [h for h in HEADS if h != "PreTraining"])
def test_every_head_matches_eager(head):
    eager = build(head, mb.MobileBertConfig(**TINY, classifier_activation=True))
    assert_same_outputs(compile_for_inference(eager), eager, inputs_for(head), hidden_states=False)


def test_a_new_shape_compiles_again_and_the_model_is_left_untouched():
    eager = build("Model", mb.MobileBertConfig(**TINY))
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    fast = compile_for_inference(eager)
    for batch in (padded_batch(batch=1, length=7), padded_batch(batch=3, length=11)):
        assert_same_outputs(fast, eager, batch, hidden_states=False)
    assert all(torch.equal(before[k], v) for k, v in eager.state_dict().items())


@pytest.mark.skipif(not cpu_bf16(), reason="the CPU has no native bf16")
def test_bf16_runs_inductors_gemm_templates_and_matches_eager_to_bf16_rounding():
    """MobileBERT's widths (inductor's templates take them; the tiny ones go to ATen), one block of four FFNs: a
    packing that read the later FFNs' weights from the first's place (they are views of one stacked buffer in the
    optimized model) would show, also after a `.to()` rebuilds the weights."""
    assert inductor_settings(torch.bfloat16) is AMX_GEMM and inductor_settings(torch.float32) is not AMX_GEMM
    eager = build("Model", mb.preset("mobilebert", num_hidden_layers=1, vocab_size=99))
    with torch.no_grad():  # weights of a trained scale, so bf16 rounding stays at bf16's 2^-8 per op
        for p in eager.parameters():
            if p.dim() == 2:
                p.div_(p.shape[-1] ** 0.5)
    batch = padded_batch(length=32)
    fast = compile_for_inference(eager, torch.bfloat16)
    with torch.no_grad():
        ref = eager(**batch).last_hidden_state
        bf16 = optimize_for_inference(eager).to(torch.bfloat16)(**batch).last_hidden_state  # eager, bf16 weights
        for _ in range(2):
            out = fast(**batch).last_hidden_state
            assert out.dtype == torch.bfloat16
            assert relative_error(out, ref) < 1e-2  # 4.7e-3 measured; 1.4e-2 with every FFN on the first one's weights
            assert relative_error(out, bf16) < 6e-3  # 2.9e-3 measured (bf16 roundings); 1.1e-2 with that bug
            fast.to("cpu")  # drops the cached weights: the recompile must rebuild them on their own storage again
    assert all(name.startswith("fused.") for name in fast.state_dict())


@pytest.mark.parametrize("head", ["Model", "QuestionAnswering"])
def test_the_forward_is_one_graph_without_breaks(head):
    """Dynamo captures the optimized forward whole: a graph break would run its pieces eagerly in between."""
    eager = build(head, mb.MobileBertConfig(**TINY))
    fused = compile_for_inference(eager).fused
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fused)(**padded_batch())
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
