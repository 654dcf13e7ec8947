"""optimize_for_inference: same outputs as eager for every variant and head, input untouched, fused structure."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import HEADS, TINY, VARIANTS, assert_same_outputs, build, inputs_for, padded_batch, relative_error
from torch.utils._python_dispatch import TorchDispatchMode

import mobilebert as mb
from mobilebert.deploy.onednn import onednn_bf16
from mobilebert.deploy.optimize import optimize_for_inference

TOL = 1e-4  # the bound, fp32
# Beyond the four architectures: the embedding's other paths.
EXTRA_VARIANTS = {
    "skip-padding": dict(trigram_skip_padding=True),
    "no-trigram": dict(trigram_input=False, embedding_size=32),  # E == D: no projection at all
    "no-trigram-projected": dict(trigram_input=False),
}


@pytest.mark.parametrize("pooler", [False, True])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_eager_for_every_variant_and_head(variant, head, pooler):
    cfg = mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}, classifier_activation=pooler)
    eager = build(head, cfg)
    assert_same_outputs(optimize_for_inference(eager), eager, inputs_for(head))


@pytest.mark.parametrize("variant", list(EXTRA_VARIANTS))
def test_matches_eager_on_every_embedding_path(variant):
    eager = build("PreTraining", mb.MobileBertConfig(**{**TINY, **EXTRA_VARIANTS[variant]}))
    assert_same_outputs(optimize_for_inference(eager), eager, inputs_for("PreTraining"))


@pytest.mark.parametrize("variant", ["mobilebert", "mobilebert-tiny", "ib-bert", "no-trigram"])
def test_matches_eager_without_mask_or_token_types_and_with_nothing_padded(variant):
    eager = build("Model", mb.MobileBertConfig(**{**TINY, **{**VARIANTS, **EXTRA_VARIANTS}[variant]}))
    fast = optimize_for_inference(eager)
    ids = padded_batch()["input_ids"].clamp_min(1)
    for _ in range(2):  # twice, batch 1 (where tables are used as views): a call must not change the next
        assert_same_outputs(fast, eager, dict(input_ids=ids[:1]))
    assert_same_outputs(fast, eager, dict(input_ids=ids))
    assert_same_outputs(fast, eager, dict(input_ids=ids, attention_mask=torch.ones_like(ids)))
    ids[0, :] = 0  # a row of padding only
    assert_same_outputs(fast, eager, dict(input_ids=ids, attention_mask=(ids != 0).long()))


def test_partial_depth_matches_eager():
    eager = build("Model", mb.MobileBertConfig(**TINY))
    fast, batch = optimize_for_inference(eager), padded_batch()
    with torch.no_grad():
        for n in (0, 2):
            ref, out = eager(**batch, num_layers=n), fast(**batch, num_layers=n)
            assert relative_error(out.last_hidden_state, ref.last_hidden_state) <= TOL


@pytest.mark.parametrize("name", list(mb.PRESETS))
def test_every_preset_matches_eager(name):
    """Every preset's real widths (the teacher's 1024/4096 too), with 2 layers and a small vocabulary."""
    eager = build("PreTraining", mb.preset(name, num_hidden_layers=2, vocab_size=99), seed=1)
    with torch.no_grad():  # keep the wide presets' activations in range: matrices scaled by 1/sqrt(fan-in)
        for p in eager.parameters():
            if p.dim() == 2:
                p.div_(p.shape[-1] ** 0.5)
    assert_same_outputs(optimize_for_inference(eager), eager, padded_batch())


def test_full_size_mobilebert_matches_eager_on_a_short_sequence():
    cfg = mb.preset("mobilebert")
    torch.manual_seed(0)
    eager = mb.MobileBertModel(cfg).eval()
    with torch.no_grad():  # norms away from identity, so folding them is exercised
        for name, p in eager.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    fast = optimize_for_inference(eager)
    ids = torch.randint(1, cfg.vocab_size, (1, 16))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    assert_same_outputs(fast, eager, dict(input_ids=ids, attention_mask=mask), hidden_states=False)


def test_input_model_is_left_untouched():
    eager = build("PreTraining", mb.MobileBertConfig(**TINY))
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    fast = optimize_for_inference(eager)
    with torch.no_grad():
        fast(**padded_batch())
        for tensor in fast.state_dict().values():  # no storage is shared with the input either
            tensor.add_(1)
    after = eager.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert eager.training is False and all(p.requires_grad for p in eager.parameters())
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training


def test_dropout_is_off_even_for_a_model_in_training_mode():
    eager = build("SequenceClassification", mb.MobileBertConfig(**TINY, hidden_dropout_prob=0.5))
    fast = optimize_for_inference(eager.train())
    assert eager.training  # left as it was
    assert_same_outputs(fast, eager.eval(), padded_batch())


def test_labels_and_attention_maps_are_refused_with_clear_errors():
    fast = optimize_for_inference(build("SequenceClassification", mb.MobileBertConfig(**TINY)))
    batch = padded_batch()
    with pytest.raises(mb.UserError, match="inference only.*labels"):
        fast(**batch, labels=torch.tensor([0, 1, 0]))
    with pytest.raises(NotImplementedError, match="output_attentions"):
        fast(**batch, output_attentions=True)
    with pytest.raises(mb.UserError, match="optimize_for_inference takes"):
        optimize_for_inference(torch.nn.Linear(2, 2))


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["mobilebert", "mobilebert-tiny"])
def test_fused_structure_of_a_nonorm_model(variant):
    """Per block: one matmul reads the block input, one makes Q and K (TINY: Q, K, V), SDPA, one matmul adding into
    the attention residual, per FFN two matmuls, the second adding into the residual, and the same for the output;
    nothing is copied. NoNorm leaves no multiply or add behind: the hidden states run scaled per channel and one
    fused multiply-add restores the last one; the padding mask is built once per forward."""
    cfg = mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]})
    fast = optimize_for_inference(build("Model", cfg))
    L, F_ = cfg.num_hidden_layers, cfg.num_feedforward_networks
    with torch.no_grad(), CountOps() as ops:
        fast(**padded_batch())
    counts = ops.counts
    # The embedding projection, then per block: the input's matmul, Q and K's, and each FFN's up projection ...
    assert counts["addmm"] == 1 + L * (2 + F_)
    # ... and the residual steps (attention output, each FFN's down projection, the output) add into their residual
    assert counts["addmm_"] == L * (1 + F_ + 1)
    assert sum(n for name, n in counts.items() if "scaled_dot_product" in name) == L
    assert counts["addcmul"] == 1 and "copy_" not in counts
    assert counts["masked_fill_"] == 1
    assert counts["add"] == 1  # the embedding: token-type rows + position rows
    assert not {"mul", "mul_", "add_", "layer_norm", "native_layer_norm", "cat", "dropout"} & set(counts)


def test_no_mask_is_built_when_nothing_is_padded():
    """SDPA runs faster without a mask; a mask of ones changes nothing, so none is built."""
    eager = build("Model", mb.MobileBertConfig(**TINY))
    fast = optimize_for_inference(eager)
    batch = padded_batch(batch=1)
    assert bool(batch["attention_mask"].all())
    with torch.no_grad(), CountOps() as ops:
        fast(**batch)
    assert "masked_fill_" not in ops.counts
    assert_same_outputs(fast, eager, batch)


@pytest.mark.parametrize("variant", ["mobilebert", "mobilebert-tiny"])
def test_scaled_hidden_states_hold_with_extreme_norm_scales(variant):
    """The scaled representation divides by products of NoNorm gammas: gammas of 1e-3 (products down to 1e-13) and
    of 10 (activations up to 1e10) still match eager, hidden states and partial depth included."""
    cfg = mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]})
    for gamma in (1e-3, 10.0):
        eager = build("Model", cfg)
        with torch.no_grad():
            for module in eager.modules():
                if isinstance(module, mb.model.NoNorm):
                    module.weight.mul_(gamma)
        fast = optimize_for_inference(eager)
        assert fast.hidden_scale is not None
        assert_same_outputs(fast, eager, padded_batch())
        with torch.no_grad():
            ref = eager(**padded_batch(), num_layers=1).last_hidden_state
            assert relative_error(fast(**padded_batch(), num_layers=1).last_hidden_state, ref) <= TOL


def test_a_zero_norm_scale_keeps_hidden_states_unscaled():
    """A NoNorm gamma of exactly 0 cannot be divided by: the model runs its residual steps unscaled, still exact."""
    eager = build("Model", mb.MobileBertConfig(**TINY))
    with torch.no_grad():
        eager.layers[1].output_norm.weight[3] = 0.0
    fast = optimize_for_inference(eager)
    assert fast.hidden_scale is None
    assert_same_outputs(fast, eager, padded_batch())


def test_dtype_conversion_after_optimizing_keeps_outputs_right():
    """.double() replaces every tensor; the fused blocks' cached references must follow (stale ones would mix dtypes).
    The folded weights carry fp32 rounding, hence fp32's tolerance."""
    eager = build("Model", mb.MobileBertConfig(**TINY))
    fast = optimize_for_inference(eager)
    batch = padded_batch()
    with torch.no_grad():
        fast(**batch)  # fills the caches in fp32
        ref = eager.double()(**batch).last_hidden_state
        out = fast.double()(**batch).last_hidden_state
        assert out.dtype == torch.float64 and relative_error(out, ref) <= TOL
        assert relative_error(copy.deepcopy(fast)(**batch).last_hidden_state, ref) <= TOL


def test_portable_form_follows_dtype_conversion():
    """The portable forward's (out, in) weight copies, built by `make_portable`, follow a later .double() too."""
    from mobilebert.deploy.optimize import portable

    eager = build("Model", mb.MobileBertConfig(**TINY))
    fast = portable(optimize_for_inference(eager))
    batch = padded_batch()
    with torch.no_grad():
        ref = eager.double()(**batch).last_hidden_state
        out = fast.double()(**batch).last_hidden_state
    assert fast.embeddings.weight.dtype == torch.float64
    assert out.dtype == torch.float64 and relative_error(out, ref) <= TOL


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_model_matches_eager_for_every_variant(variant):
    """`dtype=torch.bfloat16`, the bench's and the demo's reduced-precision path (prepacked oneDNN matmuls where the
    CPU has native bf16). bf16 keeps 8 bits of mantissa: hidden states agree to about 1e-2 relative."""
    eager = build("QuestionAnswering", mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}))
    fast = optimize_for_inference(eager, dtype=torch.bfloat16)
    assert all((block.runtime == "packed") == onednn_bf16() for block in fast.mobilebert.layers)
    batch = padded_batch()
    with torch.no_grad():
        ref = eager(**batch, output_hidden_states=True)
        for hidden_states in (True, False):  # False: residual sums are built in their inputs' memory
            out = fast(**batch, output_hidden_states=hidden_states)
            assert out.start_logits.dtype == torch.bfloat16 and torch.isfinite(out.start_logits).all()
            assert relative_error(out.start_logits.float(), ref.start_logits) < 0.2  # small logits: cancellation
        for mine, theirs in zip(fast(**batch, output_hidden_states=True).hidden_states, ref.hidden_states,
                                strict=True):
            assert relative_error(mine.float(), theirs) < 3e-2
        # After .to() the packing is gone and the plain matmuls give the same results.
        plain = copy.deepcopy(fast).to(torch.bfloat16)
        assert relative_error(plain(**batch).start_logits.float(), fast(**batch).start_logits.float()) < 2e-2
