"""Knowledge-transfer losses of MobileBERT (Sun et al. 2020 §3; docs/distillation.md), as pure functions of tensors.

Axis legend: B batch, T tokens, D block-output width (512), H heads, V vocabulary, N predicted positions.
`attention_mask` is (B, T) with 1 for real tokens and 0 for padding; None means every token is real.
Teacher quantities are detached inside every loss, so gradients reach only the student. Statistics are computed
in float32 whatever the input dtype: NoNorm activations reach 1e7-1e8, beyond what bf16 sums keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of positions that are not predicted (transformers' convention)


def _masked_token_mean(values: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of per-token `values` (B, T) over real tokens. Padding is selected away (not multiplied by 0), so
    whatever it holds, even inf or NaN, cannot leak in. An all-padding batch gives 0."""
    if attention_mask is None:
        return values.mean()
    real = attention_mask.bool()
    return torch.where(real, values, 0.0).sum() / real.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------------------------
# Feature-map transfer (FMT)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FMTWeights:
    """Weights of the three FMT terms: TF2 official `hidden_distill_factor`, `beta_distill_factor`,
    `gamma_distill_factor`."""

    mse: float = 100.0
    mean: float = 5000.0
    var: float = 5.0


@dataclass
class FMTLoss:
    """`total` = weighted sum of the three (unweighted) terms below; all scalars."""

    total: Tensor
    mse: Tensor  # mean over real tokens and channels of (LN(H_T) − LN(H_S))²
    mean: Tensor  # mean over real tokens of (μ_T − μ_S)²
    var: Tensor  # mean over real tokens of |σ²_T − σ²_S|


def feature_map_mse(teacher: Tensor, student: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Plain feature-map transfer (paper §3, Eq. 1): MSE between teacher and student block outputs.

    teacher, student: (B, T, D). Averaged over the D channels and over real tokens (padding excluded).
    """
    per_token = (teacher.detach().float() - student.float()).pow(2).mean(-1)  # (B, T)
    return _masked_token_mean(per_token, attention_mask)


def _token_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token mean μ (B, T), biased variance σ² (B, T) over channels, and LN(x) = (x − μ)/sqrt(σ² + eps)."""
    var, mean = torch.var_mean(x, dim=-1, correction=0)
    normed = (x - mean[..., None]) * torch.rsqrt(var[..., None] + eps)  # (B, T, D), no affine parameters
    return mean, var, normed


def feature_map_transfer(teacher: Tensor, student: Tensor, attention_mask: Tensor | None = None,
                         weights: FMTWeights = FMTWeights(), eps: float = 1e-3) -> FMTLoss:
    """Feature-map transfer in the official decomposition (docs/distillation.md; TF2 `official/projects/mobilebert`).

    teacher, student: (B, T, D) block outputs of the *same* layer (TF1 compared the statistics against all
    teacher layers stacked, a bug TF2 fixed). Per token, over the channel axis D: μ = mean, σ² = biased variance,
    LN(x) = (x − μ)/sqrt(σ² + eps) without affine parameters. Then

        mse  = mean((LN(H_T) − LN(H_S))²)      over real tokens and channels
        mean = mean((μ_T − μ_S)²)              over real tokens
        var  = mean(|σ²_T − σ²_S|)             over real tokens (an L1 term)
        total = weights.mse·mse + weights.mean·mean + weights.var·var   (100, 5000, 5 by default)

    Padding tokens (attention_mask 0) are excluded; TF2 averages them in. `eps` = 1e-3 is the epsilon of the
    official code's normalization (a non-trainable `tf.keras.layers.LayerNormalization`, whose default is 1e-3);
    with MobileBERT's per-token variances (≫ 1) it hardly matters. Computed in float32.
    """
    mu_t, var_t, ln_t = _token_stats(teacher.detach().float(), eps)
    mu_s, var_s, ln_s = _token_stats(student.float(), eps)
    mse = _masked_token_mean((ln_t - ln_s).pow(2).mean(-1), attention_mask)
    mean = _masked_token_mean((mu_t - mu_s).pow(2), attention_mask)
    var = _masked_token_mean((var_t - var_s).abs(), attention_mask)
    total = weights.mse * mse + weights.mean * mean + weights.var * var
    return FMTLoss(total=total, mse=mse, mean=mean, var=var)


# ---------------------------------------------------------------------------------------------------------------
# Attention transfer (AT)
# ---------------------------------------------------------------------------------------------------------------


def attention_transfer(teacher_scores: Tensor, student_scores: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Attention transfer (paper §3, Eq. 2): per head, KL(p_T ‖ p_S) of the attention distributions over keys.

    teacher_scores, student_scores: (B, H, T, T) masked *pre-softmax* scores (queries × keys), as the model returns
    them (padding keys filled with finfo.min). Softmax is applied once (the TF2 port's second softmax is a bug).
    KL is summed over keys, then averaged over heads and over real query positions; padding query rows are excluded.
    With `attention_mask` given, padding key columns are masked again here, so their content never matters; they
    get zero teacher probability and their 0·log 0 terms count as exactly 0 (no NaN from finfo.min − finfo.min).
    The official code uses the cross-entropy −Σ p_T log p_S, which differs by the teacher's entropy: same gradient.
    """
    t, s = teacher_scores.detach().float(), student_scores.float()
    if attention_mask is not None:
        padding_key = ~attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        t = t.masked_fill(padding_key, torch.finfo(t.dtype).min)
        s = s.masked_fill(padding_key, torch.finfo(s.dtype).min)
    log_p_t, log_p_s = t.log_softmax(-1), s.log_softmax(-1)  # (B, H, T, T)
    p_t = log_p_t.exp()
    # Where p_T = 0 both logs may be -inf (their difference NaN); the limit of p·log(p/q) there is 0.
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(-1)  # (B, H, T): KL per head and query
    return _masked_token_mean(kl.mean(1), attention_mask)


# ---------------------------------------------------------------------------------------------------------------
# Pre-training distillation (PD)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PDLoss:
    """`total` = α·mlm + (1 − α)·kd + nsp; all scalars (nsp is 0 without NSP labels)."""

    total: Tensor
    mlm: Tensor
    kd: Tensor
    nsp: Tensor


def kd_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Distillation term of PD (paper §3, Eq. 3): cross-entropy −Σ_v p_T log p_S, times T², averaged over rows.

    student_logits, teacher_logits: (N, V), one row per predicted position. p = softmax(z / T) for both models.
    The T² factor (Hinton et al. 2015) keeps gradient magnitudes independent of T; at the paper's T = 1 it is 1.
    For identical logits the value is the teacher's entropy, not 0. No rows gives 0.
    """
    p_t = (teacher_logits.detach().float() / temperature).softmax(-1)
    log_p_s = (student_logits.float() / temperature).log_softmax(-1)
    per_row = -(p_t * log_p_s).sum(-1)  # (N,)
    return per_row.sum() / max(per_row.numel(), 1) * temperature**2


def pretraining_distillation(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                             student_nsp_logits: Tensor | None = None, nsp_labels: Tensor | None = None,
                             alpha: float = 0.5, temperature: float = 1.0) -> PDLoss:
    """Pre-training distillation (docs/distillation.md): α·MLM_CE(labels) + (1 − α)·KD + NSP_CE.

    student_logits, teacher_logits: MLM logits, either (B, T, V) with labels (B, T) or already gathered (N, V)
    with labels (N,); labels of −100 mark unpredicted positions, which are left out of both MLM and KD. Both
    terms are averaged over the predicted positions (0 when there are none). KD is `kd_cross_entropy` with
    `temperature`. student_nsp_logits: (B, 2), nsp_labels: (B,); either None makes the NSP term 0.
    """
    vocab = student_logits.shape[-1]
    flat_labels = labels.reshape(-1)
    predicted = flat_labels != IGNORE_INDEX  # (B·T,) or (N,)
    student = student_logits.reshape(-1, vocab)[predicted]  # (N, V)
    teacher = teacher_logits.reshape(-1, vocab)[predicted]  # (N, V)
    mlm = F.cross_entropy(student.float(), flat_labels[predicted], reduction="sum") / max(student.shape[0], 1)
    kd = kd_cross_entropy(student, teacher, temperature)
    if student_nsp_logits is None or nsp_labels is None:
        nsp = mlm.new_zeros(())
    else:
        nsp = F.cross_entropy(student_nsp_logits.float(), nsp_labels.reshape(-1))
    total = alpha * mlm + (1 - alpha) * kd + nsp
    return PDLoss(total=total, mlm=mlm, kd=kd, nsp=nsp)


PAD_LOGIT = -1e4  # a position outside the sequence: exp() of it is 0 in float32, and 0 · log p stays finite


def task_distillation(student: Tensor, teacher: Tensor, kind: str, attention_mask: Tensor | None = None,
                      temperature: float = 1.0) -> Tensor:
    """KD term of task-specific distillation (beyond the paper; docs/finetuning.md), summed over the B rows.

    kind "classification": student, teacher (B, C) logits; `kd_cross_entropy` (soft cross-entropy × T²) per row.
    kind "regression": (B,) predictions; squared error per row (the temperature does not apply).
    kind "qa": (B, 2, T) start and end logits; per row the mean of the start and the end soft cross-entropies
    over positions, where positions with attention_mask (B, T) 0 are in neither distribution.
    """
    rows = student.shape[0]
    if kind == "regression":
        return F.mse_loss(student.float(), teacher.detach().float(), reduction="sum")
    if kind == "qa":
        if attention_mask is not None:
            outside = attention_mask[:, None, :] == 0  # (B, 1, T)
            fill = PAD_LOGIT * max(temperature, 1.0)  # still PAD_LOGIT or below once divided by T
            student = student.float().masked_fill(outside, fill)
            teacher = teacher.float().masked_fill(outside, fill)
        student, teacher = student.flatten(0, 1), teacher.flatten(0, 1)  # (2B, T): start and end rows
    return kd_cross_entropy(student, teacher, temperature) * rows


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise knowledge transfer over model outputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LayerLosses:
    """Per-layer knowledge-transfer terms of `layer_losses`.

    terms: weighted, differentiable terms to optimise — "fmt/{l}" (FMT total, or the plain MSE) and "at/{l}"
           (at_weight · AT). `total` is their sum.
    logs:  detached unweighted FMT components for logging — "fmt_mse/{l}", "fmt_mean/{l}", "fmt_var/{l}"
           (absent with plain_mse).
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, Tensor] = field(default_factory=dict)


def layer_losses(teacher_hidden: Sequence[Tensor], student_hidden: Sequence[Tensor],
                 teacher_scores: Sequence[Tensor] | None, student_scores: Sequence[Tensor] | None,
                 attention_mask: Tensor | None, layers: Iterable[int], fmt_weights: FMTWeights = FMTWeights(),
                 at_weight: float = 1.0, plain_mse: bool = False) -> LayerLosses:
    """FMT and AT for each block l in `layers` (0-based), student block l against the *same* teacher block l.

    Indexing follows the model outputs: `*_hidden` are the `hidden_states` tuples of L + 1 tensors (B, T, D) whose
    index 0 is the embedding output, so block l's output (its feature map) is `hidden[l + 1]`; `*_scores` are the
    `attention_scores` tuples of L tensors (B, H, T, T), so block l's scores are `scores[l]`. AT is skipped when
    either scores tuple is None. With `plain_mse` the FMT term is the unweighted `feature_map_mse` (paper Eq. 1)
    instead of the official decomposition. Models run to partial depth work as long as they reach max(layers).
    """
    terms: dict[str, Tensor] = {}
    logs: dict[str, Tensor] = {}
    for layer in layers:
        teacher_map, student_map = teacher_hidden[layer + 1], student_hidden[layer + 1]
        if plain_mse:
            terms[f"fmt/{layer}"] = feature_map_mse(teacher_map, student_map, attention_mask)
        else:
            fmt = feature_map_transfer(teacher_map, student_map, attention_mask, fmt_weights)
            terms[f"fmt/{layer}"] = fmt.total
            logs.update({f"fmt_mse/{layer}": fmt.mse.detach(), f"fmt_mean/{layer}": fmt.mean.detach(),
                         f"fmt_var/{layer}": fmt.var.detach()})
        if teacher_scores is not None and student_scores is not None:
            at = attention_transfer(teacher_scores[layer], student_scores[layer], attention_mask)
            terms[f"at/{layer}"] = at_weight * at
    total = sum(terms.values(), student_hidden[0].new_zeros((), dtype=torch.float32))
    return LayerLosses(total=total, terms=terms, logs=logs)
