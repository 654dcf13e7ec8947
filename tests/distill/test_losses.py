"""Knowledge-transfer losses (docs/distillation.md): zero for identical inputs, tiny cases by hand, padding ignored."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import padded_batch

import mobilebert as mb
from mobilebert.distill.losses import (
    FMTWeights,
    attention_transfer,
    feature_map_mse,
    feature_map_transfer,
    kd_cross_entropy,
    layer_losses,
    pretraining_distillation,
)

MIN = torch.finfo(torch.float32).min


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    """B=1, T=2, D=2 block outputs. Per token (μ, σ², LN): teacher [1, 3] → (2, 1, [−1, 1]), [0, 4] → (2, 4,
    [−1, 1]); student [3, 1] → (2, 1, [1, −1]), [1, 2] → (1.5, 0.25, [−1, 1])."""
    return torch.tensor([[[1.0, 3.0], [0.0, 4.0]]]), torch.tensor([[[3.0, 1.0], [1.0, 2.0]]])


def _scores() -> tuple[torch.Tensor, torch.Tensor]:
    """One head, T=2: teacher rows give p_T = [1/2, 1/2] and [3/4, 1/4]; student rows the other way round."""
    ln3 = math.log(3.0)
    return torch.tensor([[[[0.0, 0.0], [ln3, 0.0]]]]), torch.tensor([[[[ln3, 0.0], [0.0, 0.0]]]])


def _pad(x: torch.Tensor, dim: int, value: float) -> torch.Tensor:
    """Append one padding position filled with `value` along `dim`."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x, torch.full(shape, value)], dim=dim)


# ------------------------------------------------------------------------------------------------------ FMT


def test_feature_map_transfer_by_hand():
    teacher, student = _maps()
    out = feature_map_transfer(teacher, student, eps=0.0)
    # mse: token 0 ((−1 − 1)² + (1 + 1)²)/2 = 4, token 1 0 → 2. mean: (0 + (2 − 1.5)²)/2 = 0.125.
    # var: (0 + |4 − 0.25|)/2 = 1.875. total = 100·2 + 5000·0.125 + 5·1.875 = 834.375.
    assert out.mse.item() == pytest.approx(2.0)
    assert out.mean.item() == pytest.approx(0.125)
    assert out.var.item() == pytest.approx(1.875)
    assert out.total.item() == pytest.approx(834.375)
    weighted = feature_map_transfer(teacher, student, weights=FMTWeights(mse=1.0, mean=2.0, var=3.0), eps=0.0)
    assert weighted.total.item() == pytest.approx(2.0 + 2 * 0.125 + 3 * 1.875)


def test_feature_map_transfer_default_eps_enters_the_normalization():
    teacher, student = _maps()
    # LN(x) = (x − μ)/sqrt(σ² + 1e-3): token 0 diffs are ±2/sqrt(1.001); token 1 ±(2/sqrt(4.001) − 0.5/sqrt(0.251)).
    token0 = 4 / 1.001
    token1 = (2 / math.sqrt(4.001) - 0.5 / math.sqrt(0.251)) ** 2
    assert feature_map_transfer(teacher, student).mse.item() == pytest.approx((token0 + token1) / 2, rel=1e-6)


def test_feature_map_mse_by_hand():
    teacher, student = _maps()
    # token 0: diffs (−2, 2) → 4; token 1: (−1, 2) → 2.5; mean 3.25.
    assert feature_map_mse(teacher, student).item() == pytest.approx(3.25)
    assert feature_map_mse(teacher, student, torch.tensor([[1, 0]])).item() == pytest.approx(4.0)


def test_feature_maps_zero_for_identical_inputs():
    x = torch.randn(2, 5, 8) * 1e4
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = feature_map_transfer(x, x.clone(), mask)
    for term in (out.total, out.mse, out.mean, out.var, feature_map_mse(x, x.clone(), mask)):
        assert term.item() == 0.0


def test_feature_maps_ignore_padding():
    teacher, student = _maps()
    mask = torch.tensor([[1, 1, 0]])
    ref = feature_map_transfer(teacher, student, eps=0.0)
    for fill in (0.0, 1e8):
        t, s = _pad(teacher, 1, fill), _pad(student, 1, -fill)
        out = feature_map_transfer(t, s, mask, eps=0.0)
        for a, b in zip((out.total, out.mse, out.mean, out.var), (ref.total, ref.mse, ref.mean, ref.var), strict=True):
            assert a.item() == pytest.approx(b.item(), rel=1e-6)
        assert feature_map_mse(t, s, mask).item() == pytest.approx(3.25)
    # Only the real token 0 counts: mse 4, equal means and variances.
    only_first = feature_map_transfer(teacher, student, torch.tensor([[1, 0]]), eps=0.0)
    assert (only_first.mse.item(), only_first.mean.item(), only_first.var.item()) == pytest.approx((4.0, 0.0, 0.0))


# ------------------------------------------------------------------------------------------------------- AT


def test_attention_transfer_by_hand():
    teacher, student = _scores()
    # row 0: KL([1/2, 1/2] ‖ [3/4, 1/4]) = ½ln(2/3) + ½ln 2 = ½ln(4/3)
    # row 1: KL([3/4, 1/4] ‖ [1/2, 1/2]) = ¾ln(3/2) + ¼ln(1/2); averaged over the two query rows.
    expected = (0.5 * math.log(4 / 3) + 0.75 * math.log(1.5) - 0.25 * math.log(2)) / 2
    assert attention_transfer(teacher, student).item() == pytest.approx(expected, rel=1e-6)


def test_attention_transfer_zero_for_identical_scores_with_masked_keys():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    scores = torch.randn(2, 3, 4, 4).masked_fill(~mask.bool()[:, None, None, :], MIN)
    assert attention_transfer(scores, scores.clone(), mask).item() == 0.0
    assert attention_transfer(scores, scores.clone()).item() == 0.0  # finfo.min columns without a mask: still 0


def test_attention_transfer_ignores_padding_rows_and_columns():
    teacher, student = _scores()
    ref = attention_transfer(teacher, student).item()
    mask = torch.tensor([[1, 1, 0]])
    # As the model returns them: padded key column at finfo.min; the padded query row holds anything.
    t, s = _pad(_pad(teacher, 3, MIN), 2, 5.0), _pad(_pad(student, 3, MIN), 2, -7.0)
    assert attention_transfer(t, s, mask).item() == pytest.approx(ref, rel=1e-6)
    # The key mask is re-applied, so even unmasked junk in the padded column does not count.
    t[..., 2], s[..., 2] = 30.0, -30.0
    assert attention_transfer(t, s, mask).item() == pytest.approx(ref, rel=1e-6)


def test_attention_transfer_no_nan_with_finfo_min_scores():
    mask = torch.tensor([[1, 1, 0, 0]])
    keep = mask.bool()[:, None, None, :]
    teacher = torch.randn(1, 2, 4, 4).masked_fill(~keep, MIN).requires_grad_()
    student = torch.randn(1, 2, 4, 4).masked_fill(~keep, MIN).requires_grad_()
    for m in (mask, None):
        loss = attention_transfer(teacher, student, m)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0
        assert teacher.grad is None and torch.isfinite(student.grad).all()
        student.grad = None


# ------------------------------------------------------------------------------------------------------- PD


def _pd_case() -> dict[str, torch.Tensor]:
    """Two predicted positions, V=3: student rows [0, 0, 0] → uniform and [ln 2, 0, 0] → [1/2, 1/4, 1/4];
    teacher rows the other way round; labels 0 and 1; one NSP pair with logits [0, 0] and label 0."""
    ln2 = math.log(2.0)
    return dict(student_logits=torch.tensor([[0.0, 0.0, 0.0], [ln2, 0.0, 0.0]]),
                teacher_logits=torch.tensor([[ln2, 0.0, 0.0], [0.0, 0.0, 0.0]]), labels=torch.tensor([0, 1]),
                student_nsp_logits=torch.zeros(1, 2), nsp_labels=torch.tensor([0]))


def test_pretraining_distillation_by_hand():
    ln2, ln3 = math.log(2.0), math.log(3.0)
    mlm = (ln3 + math.log(4.0)) / 2  # −log(1/3) and −log(1/4)
    # KD row 0: −Σ p_T log(1/3) = ln 3; row 1: −⅓(log ½ + 2 log ¼) = (5/3) ln 2.
    kd = (ln3 + 5 / 3 * ln2) / 2
    out = pretraining_distillation(**_pd_case(), alpha=0.5)
    assert out.mlm.item() == pytest.approx(mlm, rel=1e-6)
    assert out.kd.item() == pytest.approx(kd, rel=1e-6)
    assert out.nsp.item() == pytest.approx(ln2, rel=1e-6)
    assert out.total.item() == pytest.approx(0.5 * mlm + 0.5 * kd + ln2, rel=1e-6)
    no_nsp = pretraining_distillation(**{**_pd_case(), "nsp_labels": None})
    assert no_nsp.nsp.item() == 0.0 and no_nsp.total.item() == pytest.approx(0.5 * mlm + 0.5 * kd, rel=1e-6)


def test_pretraining_distillation_full_and_gathered_forms_agree():
    case = _pd_case()
    # (B=1, T=3, V=3): the predicted rows at positions 0 and 2; position 1 is junk with label −100.
    junk = torch.tensor([[9.0, -9.0, 4.0]])
    full = dict(case, student_logits=torch.cat([case["student_logits"][:1], junk, case["student_logits"][1:]])[None],
                teacher_logits=torch.cat([case["teacher_logits"][:1], -junk, case["teacher_logits"][1:]])[None],
                labels=torch.tensor([[0, -100, 1]]))
    a, b = pretraining_distillation(**case), pretraining_distillation(**full)
    for x, y in zip((a.total, a.mlm, a.kd, a.nsp), (b.total, b.mlm, b.kd, b.nsp), strict=True):
        assert x.item() == pytest.approx(y.item(), rel=1e-6)


def test_kd_of_identical_logits_is_the_teacher_entropy():
    logits = torch.randn(5, 7)
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert kd_cross_entropy(logits, logits.clone()).item() == pytest.approx(entropy.item(), rel=1e-6)


def test_kd_temperature_scaling():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    by_hand = 4.0 * -(t.div(2).softmax(-1) * s.div(2).log_softmax(-1)).sum(-1).mean()  # T² · CE at T = 2
    assert kd_cross_entropy(s, t, temperature=2.0).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_pretraining_distillation_without_predictions_is_finite():
    out = pretraining_distillation(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.full((2, 3), -100))
    assert out.mlm.item() == 0.0 and out.kd.item() == 0.0 and out.total.item() == 0.0


# ------------------------------------------------------------------------------------- gradients and dtypes


def _leaves(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student tensors that both ask for gradients."""
    return torch.randn(*shape, requires_grad=True), torch.randn(*shape, requires_grad=True)


def test_gradients_reach_only_the_student():
    mask = torch.tensor([[1, 1, 1, 0]])
    pad_keys = ~mask.bool()[:, None, None, :]
    labels, nsp_labels = torch.tensor([[0, 1, -100, 3]]), torch.tensor([1])
    cases = {
        "fmt": (lambda t, s: feature_map_transfer(t, s, mask).total, _leaves(1, 4, 8)),
        "mse": (lambda t, s: feature_map_mse(t, s, mask), _leaves(1, 4, 8)),
        "at": (lambda t, s: attention_transfer(t.masked_fill(pad_keys, MIN), s.masked_fill(pad_keys, MIN), mask),
               _leaves(1, 2, 4, 4)),
        "kd": (lambda t, s: kd_cross_entropy(s, t, temperature=2.0), _leaves(3, 5)),
        "pd": (lambda t, s: pretraining_distillation(s, t, labels, s[:, 0, :2], nsp_labels).total, _leaves(1, 4, 5)),
    }
    for name, (loss_fn, (teacher, student)) in cases.items():
        loss_fn(teacher, student).backward()
        assert teacher.grad is None, name
        assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0, name


def test_bf16_inputs_give_float32_results():
    mask = torch.tensor([[1, 1, 1, 0]])
    teacher, student = (torch.randn(1, 4, 512) * 1e7).bfloat16(), (torch.randn(1, 4, 512) * 1e7).bfloat16()
    keep = mask.bool()[:, None, None, :]
    bf16_min = torch.finfo(torch.bfloat16).min
    t_scores = torch.randn(1, 2, 4, 4).bfloat16().masked_fill(~keep, bf16_min)
    s_scores = torch.randn(1, 2, 4, 4).bfloat16().masked_fill(~keep, bf16_min)
    fmt = feature_map_transfer(teacher, student, mask)
    pd = pretraining_distillation(student[0, :, :8], teacher[0, :, :8] / 1e7, torch.tensor([1, 2, -100, 3]))
    results = [fmt.total, fmt.mse, fmt.mean, fmt.var, feature_map_mse(teacher, student, mask),
               attention_transfer(t_scores, s_scores, mask), attention_transfer(t_scores, s_scores),
               pd.total, pd.mlm, pd.kd, pd.nsp]
    for r in results:
        assert r.dtype == torch.float32 and torch.isfinite(r)


# ---------------------------------------------------------------------------------------------- layer_losses


def test_layer_losses_compare_block_l_with_the_same_teacher_block():
    """hidden[l + 1] is block l's output (index 0 is the embeddings); scores[l] are block l's scores."""
    hidden = tuple(torch.randn(2, 3, 8) for _ in range(4))  # embeddings + 3 blocks
    scores = tuple(torch.randn(2, 2, 3, 3) for _ in range(3))
    student_hidden = (torch.randn(2, 3, 8), hidden[1], torch.randn(2, 3, 8), hidden[3])  # block 1 differs
    student_scores = (scores[0], torch.randn(2, 2, 3, 3), scores[2])  # block 1 differs
    out = layer_losses(hidden, student_hidden, scores, student_scores, None, layers=range(3))
    assert set(out.terms) == {f"{k}/{l}" for k in ("fmt", "at") for l in range(3)}
    assert set(out.logs) == {f"fmt_{k}/{l}" for k in ("mse", "mean", "var") for l in range(3)}
    assert [out.terms[f"fmt/{l}"].item() == 0 for l in range(3)] == [True, False, True]
    assert [out.terms[f"at/{l}"].item() == 0 for l in range(3)] == [True, False, True]
    assert out.total.item() == pytest.approx(sum(v.item() for v in out.terms.values()))
    assert all(not v.requires_grad for v in out.logs.values())
    fmt = feature_map_transfer(hidden[2], student_hidden[2])
    assert out.terms["fmt/1"].item() == pytest.approx(fmt.total.item())
    assert out.logs["fmt_var/1"].item() == pytest.approx(fmt.var.item())

    plain = layer_losses(hidden, student_hidden, None, student_scores, None, layers=[1], at_weight=2.0, plain_mse=True)
    assert set(plain.terms) == {"fmt/1"} and plain.logs == {}
    assert plain.terms["fmt/1"].item() == pytest.approx(feature_map_mse(hidden[2], student_hidden[2]).item())
    weighted = layer_losses(hidden, student_hidden, scores, student_scores, None, layers=[1], at_weight=2.0)
    assert weighted.terms["at/1"].item() == pytest.approx(2 * out.terms["at/1"].item())


def test_layer_losses_on_real_models():
    cfg = mb.preset("mobilebert-test")
    torch.manual_seed(0)
    teacher = mb.MobileBertForPreTraining(cfg).eval()
    torch.manual_seed(1)
    student = mb.MobileBertForPreTraining(cfg)
    batch = padded_batch(cfg.vocab_size, batch=3, length=12)
    with torch.no_grad():
        t = teacher(**batch, output_hidden_states=True, output_attention_scores=True)
    s = student(**batch, output_hidden_states=True, output_attention_scores=True)
    out = layer_losses(t.hidden_states, s.hidden_states, t.attention_scores, s.attention_scores,
                       batch["attention_mask"], layers=range(cfg.num_hidden_layers))
    assert len(out.terms) == 2 * cfg.num_hidden_layers
    # A KL of near-equal distributions is 0 up to rounding: -1e-8 was seen on AMD CPUs (other kernels, other sums).
    for value in (*out.terms.values(), *out.logs.values(), out.total):
        assert torch.isfinite(value) and value >= -1e-6
    out.total.backward()
    grads = [p.grad for p in student.mobilebert.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
