"""LAMB by hand, parameter groups by BERT's rule, learning-rate schedules at chosen steps, exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import mobilebert as mb
from mobilebert.train.optim import (
    Lamb,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
    lr_factor,
    parameter_groups,
    trust_ratio,
)


def one_step(p0: list[float], grad: list[float], **options) -> torch.Tensor:
    """The parameter after one Lamb step from p0 with gradient `grad`, in float64 so hand arithmetic matches."""
    p = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = Lamb([p], **options)
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    return p.detach()


# ---------------------------------------------------------------------------------------------------------------
# LAMB: one step by hand. p = [3, 4] (‖p‖ = 5), g = [1, 2], lr 0.1, β = (0.9, 0.999), ε = 1e-6, λ = 0.01.
# m = 0.1 g = [0.1, 0.2], v = 0.001 g² = [0.001, 0.004].
# ---------------------------------------------------------------------------------------------------------------

HAND = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def test_lamb_step_with_bias_correction_by_hand():
    # m̂ = m / 0.1 = [1, 2], v̂ = v / 0.001 = [1, 4], √v̂ = [1, 2]
    u = [1 / (1 + 1e-6) + 0.01 * 3, 2 / (2 + 1e-6) + 0.01 * 4]
    r = 5 / math.hypot(*u)
    expected = torch.tensor([3 - 0.1 * r * u[0], 4 - 0.1 * r * u[1]], dtype=torch.float64)
    got = one_step([3.0, 4.0], [1.0, 2.0], **HAND, bias_correction=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_lamb_step_without_bias_correction_by_hand():
    # Google BERT's LAMB: u = m / (√v + ε) + λp with the raw moments.
    u = [0.1 / (math.sqrt(0.001) + 1e-6) + 0.01 * 3, 0.2 / (math.sqrt(0.004) + 1e-6) + 0.01 * 4]
    r = 5 / math.hypot(*u)
    expected = torch.tensor([3 - 0.1 * r * u[0], 4 - 0.1 * r * u[1]], dtype=torch.float64)
    got = one_step([3.0, 4.0], [1.0, 2.0], **HAND, bias_correction=False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_lamb_step_without_layer_adaptation_by_hand():
    u = [1 / (1 + 1e-6) + 0.01 * 3, 2 / (2 + 1e-6) + 0.01 * 4]  # as with bias correction, but r = 1
    expected = torch.tensor([3 - 0.1 * u[0], 4 - 0.1 * u[1]], dtype=torch.float64)
    got = one_step([3.0, 4.0], [1.0, 2.0], **HAND, adapt=False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_lamb_counts_steps_for_bias_correction():
    # With a constant gradient the corrected moments are exactly g and g² at every t, so two steps move twice as
    # far as one; a step counter stuck at 1 (or bias correction applied twice) would break this.
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = Lamb([p], lr=0.1, adapt=False)
    for _ in range(2):
        p.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
        opt.step()
    u = torch.tensor([1 / (1 + 1e-6), -2 / (2 + 1e-6)], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64) - 2 * 0.1 * u)
    assert opt.state[p]["step"] == 2


def test_zero_parameter_gets_trust_ratio_one():
    got = one_step([0.0, 0.0, 0.0], [1.0, -1.0, 2.0], lr=0.1)
    expected = -0.1 * torch.tensor([1 / (1 + 1e-6), -1 / (1 + 1e-6), 2 / (2 + 1e-6)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert trust_ratio(torch.tensor(0.0), torch.tensor(3.0)).item() == 1.0
    assert trust_ratio(torch.tensor(2.0), torch.tensor(0.0)).item() == 1.0  # zero update: no division by zero


def test_trust_clip_caps_the_ratio():
    # p = [30, 40] (‖p‖ = 50), u ≈ [1, 1] (‖u‖ ≈ √2): r ≈ 35 unclipped, 2 clipped.
    u = torch.tensor([1 / (1 + 1e-6), 2 / (2 + 1e-6)], dtype=torch.float64)
    p0 = torch.tensor([30.0, 40.0], dtype=torch.float64)
    clipped = one_step([30.0, 40.0], [1.0, 2.0], lr=0.1, trust_clip=2.0)
    free = one_step([30.0, 40.0], [1.0, 2.0], lr=0.1)
    torch.testing.assert_close(clipped, p0 - 0.1 * 2.0 * u, rtol=1e-12, atol=0)
    torch.testing.assert_close(free, p0 - 0.1 * (50 / u.norm()) * u, rtol=1e-12, atol=0)


def test_lamb_skips_parameters_without_gradient_and_handles_any_shape():
    used, unused = nn.Parameter(torch.randn(2, 3, 4)), nn.Parameter(torch.randn(5))
    scalar = nn.Parameter(torch.tensor(1.5))
    before = unused.detach().clone()
    opt = Lamb([used, unused, scalar], lr=0.01)
    (used.sum() + scalar * 2).backward()
    opt.step()
    assert torch.equal(unused, before) and unused not in opt.state
    assert set(opt.state[used]) == {"step", "exp_avg", "exp_avg_sq"} and opt.state[scalar]["step"] == 1


def test_lamb_rejects_sparse_gradients_and_bad_hyperparameters():
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(mb.UserError, match="sparse"):
        Lamb(emb.parameters()).step()
    with pytest.raises(mb.UserError, match="betas"):
        Lamb([nn.Parameter(torch.ones(1))], betas=(0.9, 1.0))


def test_lamb_fits_a_linear_regression():
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = x @ torch.randn(8, 1) + 0.01 * torch.randn(128, 1)
    model = nn.Linear(8, 1)
    opt = build_optimizer("lamb", parameter_groups(model, weight_decay=0.0), lr=0.05)
    sched = build_scheduler(opt, total_steps=200, warmup_steps=10)
    losses = []
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert losses[-1] < 0.1 * losses[0]


def test_foreach_path_matches_the_loop():
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.zeros(5), torch.randn(7)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    results = []
    for foreach in (False, True):
        ps = [nn.Parameter(p.clone()) for p in params]
        opt = Lamb(ps, lr=0.01, weight_decay=0.01, trust_clip=10.0, foreach=foreach)
        for step_grads in grads:
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append(ps)
    for loop_p, foreach_p in zip(*results, strict=True):
        torch.testing.assert_close(foreach_p, loop_p, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------------------------


def make_run(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
    opt = Lamb(parameter_groups(model, weight_decay=0.01), lr=0.02, trust_clip=10.0)
    return model, opt, build_scheduler(opt, total_steps=20, warmup_steps=3)


def train(model: nn.Module, opt: torch.optim.Optimizer, sched, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)  # the batch depends on the step only, as a resumed loader would
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def test_state_dict_round_trip_resumes_bit_identically():
    model, opt, sched = make_run(seed=0)
    train(model, opt, sched, range(10))

    first, first_opt, first_sched = make_run(seed=0)
    train(first, first_opt, first_sched, range(4))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict(), "sched": first_sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_opt, resumed_sched = make_run(seed=1)  # different init: everything must come from the file
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    train(resumed, resumed_opt, resumed_sched, range(4, 10))

    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in resumed_opt.param_groups]
    assert resumed_opt.param_groups[0]["names"] == opt.param_groups[0]["names"]


# ---------------------------------------------------------------------------------------------------------------
# Parameter groups and optimizer construction
# ---------------------------------------------------------------------------------------------------------------


class NoNorm(nn.Module):
    """Stands in for MobileBERT's NoNorm: only the class name is matched. `rows` > 0 gives a 2-D weight."""

    def __init__(self, width: int, rows: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(rows, width) if rows else torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.no_norm = NoNorm(4)
        self.wide_no_norm = NoNorm(4, rows=2)  # 2-D, yet exempt because it belongs to a NoNorm
        self.head = nn.Linear(4, 2, bias=False)
        self.scale = nn.Parameter(torch.ones(4))  # 1-D outside any norm: exempt as well
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_parameter_groups_follow_berts_rule():
    decay, no_decay = parameter_groups(Tiny(), weight_decay=0.01, lr=3e-4)
    assert decay["names"] == ["embed.weight", "proj.weight", "head.weight"]
    # named_parameters order: the module's own parameters (scale) come before its children's.
    assert no_decay["names"] == ["scale", "proj.bias", "norm.weight", "norm.bias", "no_norm.weight", "no_norm.bias",
                                 "wide_no_norm.weight", "wide_no_norm.bias"]
    assert (decay["weight_decay"], decay["adapt"], no_decay["weight_decay"], no_decay["adapt"]) == (0.01, True, 0.0,
                                                                                                   False)
    assert decay["lr"] == no_decay["lr"] == 3e-4
    assert len(decay["params"]) == len(decay["names"]) and len(no_decay["params"]) == len(no_decay["names"])


def test_parameter_groups_cover_mobilebert():
    model = mb.MobileBertForPreTraining(mb.preset("mobilebert-test"))
    decay, no_decay = parameter_groups(model, weight_decay=0.01)
    names = {n for n, _ in model.named_parameters()}
    assert set(decay["names"]) | set(no_decay["names"]) == names
    assert not set(decay["names"]) & set(no_decay["names"])
    assert all(p.ndim >= 2 for p in decay["params"])
    norms = [n for n, m in model.named_modules() if type(m).__name__ in ("NoNorm", "LayerNorm")]
    assert norms and all(f"{n}.weight" in no_decay["names"] for n in norms)


def test_build_optimizer_rejects_unknown_names():
    with pytest.raises(mb.UserError, match="adamw, lamb, sgd"):
        build_optimizer("adam", parameter_groups(Tiny(), 0.01), lr=1e-3)


def test_train_options_refuse_what_the_optimizer_cannot_do_when_read():
    """Checked when the config is read, before a run folder or data exist: not first when the engine starts."""
    from mobilebert.train.loop import TrainOptions

    with pytest.raises(mb.UserError, match="unknown optimizer 'adam'"):
        TrainOptions(optimizer="adam")
    with pytest.raises(mb.UserError, match="bias_correction false is available with the lamb optimizer only"):
        TrainOptions(optimizer="adamw", bias_correction=False)
    assert not TrainOptions(optimizer="lamb", bias_correction=False).bias_correction
    with pytest.raises(mb.UserError, match="lamb optimizer only"):
        build_optimizer("sgd", parameter_groups(Tiny(), 0.01), lr=1e-3, bias_correction=False)


def test_adamw_groups_get_their_weight_decay():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    groups = parameter_groups(model, weight_decay=0.1)
    opt = build_optimizer("adamw", groups, lr=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert "adapt" in opt.param_groups[0] and "lr" not in groups[0]  # extra keys kept; caller's dicts untouched
    weight, norm_weight = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's step is then 0, leaving only the decoupled decay p ← p(1 − lr·λ)
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), weight * (1 - 0.01 * 0.1))
    assert torch.equal(model[1].weight, norm_weight)


def test_every_optimizer_name_builds():
    for name in ("lamb", "adamw", "sgd", "LAMB"):
        opt = build_optimizer(name, parameter_groups(Tiny(), 0.01), lr=1e-3)
        assert opt.param_groups[1]["names"][:2] == ["scale", "proj.bias"]


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------

# total 10, warm-up 2: warm-up gives 0.5, 1.0 at steps 0, 1; decay progress = (step − 2) / 8 afterwards.
SCHEDULE_CASES = [
    # (decay, options, step, expected)
    ("linear", {}, 0, 0.5),
    ("linear", {}, 1, 1.0),
    ("linear", {}, 2, 1.0),
    ("linear", {}, 6, 0.5),
    ("linear", {}, 10, 0.0),
    ("linear", {}, 25, 0.0),
    ("linear", dict(end_factor=0.1), 6, 0.1 + 0.9 * 0.5),
    ("linear", dict(end_factor=0.1), 99, 0.1),
    ("polynomial", dict(power=2.0), 6, 0.25),
    ("polynomial", dict(power=2.0, end_factor=0.1), 6, 0.1 + 0.9 * 0.25),
    ("polynomial", dict(power=2.0), 10, 0.0),
    ("cosine", {}, 2, 1.0),
    ("cosine", {}, 4, 0.5 * (1 + math.cos(math.pi / 4))),
    ("cosine", {}, 6, 0.5),
    ("cosine", dict(end_factor=0.2), 10, 0.2),
    ("cosine", dict(end_factor=0.2), 11, 0.2),
    ("constant", {}, 0, 0.5),
    ("constant", {}, 5, 1.0),
    ("constant", dict(end_factor=0.3), 50, 1.0),
]


@pytest.mark.parametrize(("decay", "options", "step", "expected"), SCHEDULE_CASES)
def test_lr_factor_at_chosen_steps(decay, options, step, expected):
    assert lr_factor(step, total_steps=10, warmup_steps=2, decay=decay, **options) == pytest.approx(expected, abs=1e-12)


def test_lr_factor_edges():
    assert lr_factor(0, total_steps=4) == 1.0  # no warm-up: the first step runs at the base rate
    assert lr_factor(2, total_steps=4) == 0.5
    assert lr_factor(3, total_steps=4, warmup_steps=4) == 1.0  # warm-up covers the whole run
    assert lr_factor(4, total_steps=4, warmup_steps=4, end_factor=0.1) == 0.1


@pytest.mark.parametrize(("args", "match"), [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10, warmup_steps=11), "warmup_steps"),
    (dict(total_steps=10, warmup_steps=-1), "warmup_steps"),
    (dict(total_steps=10, decay="step"), "unknown decay"),
    (dict(total_steps=10, decay="polynomial", power=0.0), "power"),
    (dict(total_steps=10, end_factor=-0.5), "end_factor"),
])
def test_lr_factor_rejects_bad_arguments(args, match):
    with pytest.raises(mb.UserError, match=match):
        lr_factor(0, **args)


def test_scheduler_applies_each_groups_lr_scale():
    lower, upper = nn.Linear(2, 2), nn.Linear(2, 2)
    groups = [{"params": list(lower.parameters()), "lr_scale": 0.1}, {"params": list(upper.parameters())}]
    opt = build_optimizer("sgd", groups, lr=1.0)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * 0.25, 0.25])
    for _ in range(3):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 1.0])
    for _ in range(2):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * 5 / 6, 5 / 6])


# ---------------------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------------------


def test_clip_grad_norm_returns_the_norm_before_clipping():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm([p], max_norm=1.0) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)
    p.grad = torch.tensor([float("inf"), 1.0])
    assert clip_grad_norm([p], max_norm=1.0) == math.inf
    p.grad = torch.tensor([float("nan"), 1.0])
    assert math.isnan(clip_grad_norm([p], max_norm=1.0))
    assert clip_grad_norm([nn.Parameter(torch.zeros(2))], max_norm=1.0) == 0.0
