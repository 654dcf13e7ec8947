"""Optimizers, parameter groups, learning-rate schedules and gradient clipping for MobileBERT training.

MobileBERT is pre-trained with LAMB (Sun et al. 2020 §5: batch 4096, LAMB, lr warm-up then linear decay), the
layer-wise adaptive optimizer of You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes" (arXiv:1904.00962), Algorithm 2. References for the details the paper leaves open:
  - google-research/bert `optimization.py` (AdamWeightDecayOptimizer) and the MobileBERT release's
    `lamb_optimizer.py`: no bias correction; weight decay and layer adaptation excluded for "LayerNorm" and "bias".
  - NVIDIA DeepLearningExamples BERT (FusedLAMB): bias correction on.
Both variants are supported through `bias_correction`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mobilebert.errors import UserError

OPTIMIZERS = ("adamw", "lamb", "sgd")
DECAYS = ("constant", "cosine", "linear", "polynomial")


# ---------------------------------------------------------------------------------------------------------------
# LAMB
# ---------------------------------------------------------------------------------------------------------------


def trust_ratio(weight_norm: torch.Tensor, update_norm: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """LAMB's layer-wise trust ratio r = ‖p‖ / ‖u‖, or 1 where either norm is 0 (You et al. 2019, Alg. 2).

    The fallback to 1 follows the official code: a zero-initialised tensor (a bias) must still be able to move.
    Shapes: any, elementwise (0-d for one tensor, (N,) for N stacked norms). `clip` caps r from above.
    Computed on the device with `torch.where`, so no host synchronisation per parameter.
    """
    usable = (weight_norm > 0) & (update_norm > 0)
    ratio = torch.where(usable, weight_norm / update_norm, torch.ones_like(weight_norm))
    return ratio if clip is None else ratio.clamp(max=clip)


def _bias_corrections(step: int, beta1: float, beta2: float, enabled: bool) -> tuple[float, float]:
    """(1 − β1^t, 1 − β2^t) for Adam's bias correction at 1-based step t; (1, 1) when disabled (Google BERT)."""
    if not enabled:
        return 1.0, 1.0
    return 1.0 - beta1**step, 1.0 - beta2**step


def _lamb_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: int, group: dict) -> None:
    """One LAMB step for one tensor, in place: the reference path that the foreach path must match."""
    beta1, beta2 = group["betas"]
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)  # m = β1 m + (1 − β1) g
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = β2 v + (1 − β2) g²
    bc1, bc2 = _bias_corrections(step, beta1, beta2, group["bias_correction"])
    update = (exp_avg / bc1).div_((exp_avg_sq / bc2).sqrt_().add_(group["eps"]))  # m̂ / (√v̂ + ε)
    if group["weight_decay"] != 0:
        update.add_(p, alpha=group["weight_decay"])  # decoupled decay enters u, so the trust ratio sees it
    if group["adapt"]:
        weight_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
        update.mul_(trust_ratio(weight_norm, update_norm, group["trust_clip"]))
    p.add_(update, alpha=-group["lr"])


def _lamb_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                         exp_avg_sqs: list[torch.Tensor], steps: list[int], group: dict) -> None:
    """The same step as `_lamb_update` for a list of same-device, same-dtype tensors with multi-tensor kernels.

    MobileBERT has ~1,000 small tensors; one kernel per op per tensor makes the plain loop launch-bound on GPU.
    """
    beta1, beta2 = group["betas"]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    corrections = [_bias_corrections(s, beta1, beta2, group["bias_correction"]) for s in steps]
    updates = torch._foreach_div(exp_avgs, [bc1 for bc1, _ in corrections])
    denominators = torch._foreach_div(exp_avg_sqs, [bc2 for _, bc2 in corrections])
    torch._foreach_sqrt_(denominators)
    torch._foreach_add_(denominators, group["eps"])
    torch._foreach_div_(updates, denominators)
    if group["weight_decay"] != 0:
        torch._foreach_add_(updates, params, alpha=group["weight_decay"])
    if group["adapt"]:
        weight_norms = torch.stack(torch._foreach_norm(params))  # (N,)
        update_norms = torch.stack(torch._foreach_norm(updates))  # (N,)
        ratios = trust_ratio(weight_norms, update_norms, group["trust_clip"])
        torch._foreach_mul_(updates, list(ratios.unbind()))
    torch._foreach_add_(params, updates, alpha=-group["lr"])


def _check_lamb_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                                trust_clip: float | None) -> None:
    if lr < 0:
        raise UserError(f"Lamb: lr must be >= 0, got {lr}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise UserError(f"Lamb: betas must lie in [0, 1), got {tuple(betas)}")
    if eps < 0:
        raise UserError(f"Lamb: eps must be >= 0, got {eps}")
    if weight_decay < 0:
        raise UserError(f"Lamb: weight_decay must be >= 0, got {weight_decay}")
    if trust_clip is not None and trust_clip <= 0:
        raise UserError(f"Lamb: trust_clip must be > 0 or None, got {trust_clip}")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, Algorithm 2) as used for BERT and MobileBERT pre-training.

    Per tensor p with gradient g at 1-based step t:
        m = β1 m + (1 − β1) g,  v = β2 v + (1 − β2) g²,  m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)
        u = m̂ / (√v̂ + ε) + λ p
        r = ‖p‖₂ / ‖u‖₂ (1 if either norm is 0; 1 if the group has adapt=False; capped at trust_clip)
        p ← p − lr · r · u
    `bias_correction=False` drops the 1 − β^t divisions (Google's BERT/MobileBERT code); True is NVIDIA's.
    Every option is also a per-group key; `adapt=False` is what `parameter_groups` sets for norms and biases.
    `foreach=None` uses multi-tensor kernels on CUDA when a group's tensors share device and dtype; the per-tensor
    loop is used otherwise. State per tensor: `step` (int), `exp_avg`, `exp_avg_sq`.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 bias_correction: bool = True, trust_clip: float | None = None, adapt: bool = True,
                 foreach: bool | None = None) -> None:
        _check_lamb_hyperparameters(lr, betas, eps, weight_decay, trust_clip)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust_clip=trust_clip, adapt=adapt, foreach=foreach)
        super().__init__(params, defaults)

    def _advance(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Create the state of `p` on first use, count the step, return (exp_avg, exp_avg_sq, step)."""
        if p.grad.is_sparse:
            raise UserError(f"Lamb does not support sparse gradients (tensor of shape {tuple(p.shape)}); "
                            "build embeddings with sparse=False")
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    @staticmethod
    def _use_foreach(group: dict, params: list[torch.Tensor]) -> bool:
        # Stacking the norms needs one device and one dtype; mixed groups fall back to the exact loop.
        homogeneous = len({(p.device, p.dtype) for p in params}) == 1
        wanted = group["foreach"] if group["foreach"] is not None else params[0].is_cuda
        return wanted and homogeneous

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Apply one LAMB update to every parameter that has a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            exp_avgs, exp_avg_sqs, steps = zip(*(self._advance(p) for p in params), strict=True)
            grads = [p.grad for p in params]
            if self._use_foreach(group, params):
                _lamb_update_foreach(params, grads, list(exp_avgs), list(exp_avg_sqs), list(steps), group)
            else:
                for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
                    _lamb_update(p, g, m, v, t, group)
        return loss


# ---------------------------------------------------------------------------------------------------------------
# Parameter groups and optimizer construction
# ---------------------------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    # Matched by class name so MobileBERT's NoNorm (model.py) and look-alikes in tests or exports all count.
    return isinstance(module, nn.LayerNorm) or type(module).__name__ == "NoNorm"


def parameter_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """[decay group, no-decay group] for `model`'s trainable parameters, by BERT's rule.

    No weight decay and no layer adaptation (`adapt=False`) for biases (names ending in `.bias`), every parameter
    of a `nn.LayerNorm` or `NoNorm`, and any other parameter with fewer than 2 dimensions (google-research/bert
    `optimization.py` excludes "LayerNorm" and "bias" by name; we match modules so renamed norms still count).
    Everything else (Linear and Embedding weights) gets `weight_decay` and `adapt=True`. Frozen parameters
    (requires_grad=False) are left out. Each group carries `"names"`, aligned with `"params"`, and `"lr"` when given.
    Both groups are always returned, possibly empty, so group indices mean the same thing for every model.
    """
    norm_ids = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    decay: dict[str, list] = {"params": [], "names": []}
    no_decay: dict[str, list] = {"params": [], "names": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = name.endswith(".bias") or id(p) in norm_ids or p.ndim < 2
        target = no_decay if exempt else decay
        target["params"].append(p)
        target["names"].append(name)
    groups = [{**decay, "weight_decay": weight_decay, "adapt": True}, {**no_decay, "weight_decay": 0.0, "adapt": False}]
    if lr is not None:
        for group in groups:
            group["lr"] = lr
    return groups


def check_optimizer(name: str, bias_correction: bool = True) -> None:
    """An optimizer name and options `build_optimizer` takes (also checked when a config is read)."""
    if name.lower() not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if not bias_correction and name.lower() != "lamb":
        raise UserError(f"train.bias_correction false is available with the lamb optimizer only, not {name!r}")


def build_optimizer(name: str, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-6, bias_correction: bool = True) -> torch.optim.Optimizer:
    """The optimizer called `name` ("lamb", "adamw" or "sgd") over `groups` (as from `parameter_groups`).

    Per-group keys (weight_decay, lr, adapt, names, lr_scale) are kept; the default weight decay is 0 for all three,
    so a group without the key is not decayed (AdamW's own default of 0.01 would silently decay norms).
    AdamW ignores `adapt`. The group dicts are copied, so `groups` is not modified. `bias_correction=False` (the
    official MobileBERT LAMB) exists for LAMB only: torch's AdamW always corrects.
    """
    groups = [dict(g) for g in groups]
    check_optimizer(name, bias_correction)
    key = name.lower()
    if key == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0, bias_correction=bias_correction)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    return torch.optim.SGD(groups, lr=lr, weight_decay=0.0)  # "sgd": check_optimizer allows no other name


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------


def check_schedule(total_steps: int, warmup_steps: int, decay: str, power: float, end_factor: float) -> None:
    if total_steps <= 0:
        raise UserError(f"schedule: total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise UserError(f"schedule: warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
    if decay not in DECAYS:
        raise UserError(f"schedule: unknown decay {decay!r}: choose one of {', '.join(DECAYS)}")
    if power <= 0:
        raise UserError(f"schedule: power must be > 0, got {power}")
    if end_factor < 0:
        raise UserError(f"schedule: end_factor must be >= 0, got {end_factor}")


def _decay_shape(progress: float, decay: str, power: float) -> float:
    """How much of the way from end_factor back to 1 remains at `progress` in [0, 1]: 1 at 0, 0 at 1."""
    if decay == "linear":
        return 1.0 - progress
    if decay == "polynomial":
        return (1.0 - progress) ** power
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, decay: str = "linear", power: float = 1.0,
              end_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at 0-based optimizer step `step` (BERT: warm-up, then linear decay).

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps, so the first step already moves (official BERT uses
    step / warmup_steps, which wastes step 0 at lr 0) and step warmup_steps − 1 reaches 1.
    Decay over progress = (step − warmup_steps) / (total_steps − warmup_steps), clamped to [0, 1]:
      "linear": 1 → end_factor linearly; "polynomial": end + (1 − end)(1 − progress)^power (BERT's
      polynomial_decay); "cosine": end + (1 − end)·½(1 + cos π·progress); "constant": 1 (ignores end_factor).
    Steps at or past total_steps give end_factor. Raises UserError on a bad argument.
    """
    check_schedule(total_steps, warmup_steps, decay, power, end_factor)
    if step < 0:
        raise UserError(f"schedule: step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = total_steps - warmup_steps
    progress = 1.0 if span == 0 else min((step - warmup_steps) / span, 1.0)
    return end_factor + (1.0 - end_factor) * _decay_shape(progress, decay, power)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    decay: str = "linear", power: float = 1.0,
                    end_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following `lr_factor`, times each group's `"lr_scale"` (default 1), read live at every step.

    The per-group scale is how progressive knowledge transfer trains lower layers at a tenth of the rate (Sun et
    al. 2020 §3.4). Call `scheduler.step()` after each `optimizer.step()`. The lambdas are not in the scheduler's
    state_dict (only last_epoch and base lrs are); rebuilding with the same arguments and loading resumes exactly.
    """
    check_schedule(total_steps, warmup_steps, decay, power, end_factor)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, decay, power, end_factor)

    lambdas = [lambda s, g=group: g.get("lr_scale", 1.0) * factor(s) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


# ---------------------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------------------


def clip_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> float:
    """Clip the global L2 norm of the gradients to `max_norm` in place; return the norm before clipping.

    A thin wrapper over `torch.nn.utils.clip_grad_norm_` that returns a Python float, keeping inf and nan so the
    caller can skip a step with a non-finite gradient. Parameters without a gradient are ignored (norm 0 if none).
    """
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
