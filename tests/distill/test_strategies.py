"""Strategy plans and schedules: in each PKT phase exactly the intended parameters train, at the intended rates,
and copied embeddings and heads stay equal to the teacher's through layer-wise transfer."""

from __future__ import annotations

import pytest
import torch

import mobilebert as mb
from mobilebert.distill.strategies import (
    COPIED,
    EMBEDDING_NORM,
    Rates,
    build_layer_map,
    check_pair,
    copy_embeddings_and_heads,
    group_key,
    layer_groups,
    lr_factor,
    plan,
    set_trainable,
    stage_at,
)
from mobilebert.errors import UserError
from mobilebert.train.optim import parameter_groups


def test_plans_of_the_three_strategies():
    pkt = plan("pkt", 4, layerwise_steps=40, pd_steps=20)
    assert [s.name for s in pkt] == ["phase-0", "phase-1", "phase-2", "phase-3", "distillation"]
    assert [(s.start, s.steps) for s in pkt] == [(0, 10), (10, 10), (20, 10), (30, 10), (40, 20)]
    assert pkt[2].transfer_layers == (2,) and pkt[2].run_layers == 3 and pkt[2].lower == (0, 1)
    jkt = plan("jkt", 4, 40, 20)
    assert [s.name for s in jkt] == ["layerwise", "distillation"] and jkt[0].transfer_layers == (0, 1, 2, 3)
    akt = plan("akt", 4, 40, 20)
    assert len(akt) == 1 and akt[0].pd and akt[0].transfer_layers == (0, 1, 2, 3) and not akt[0].copied_frozen
    assert stage_at(pkt, 25).name == "phase-2" and stage_at(pkt, 59).name == "distillation"
    with pytest.raises(UserError, match="unknown strategy"):
        plan("xkt", 4, 1, 1)
    with pytest.raises(UserError, match="at least one step per layer"):
        plan("pkt", 4, 3, 1)


def test_pkt_rates_per_phase_follow_the_official_background():
    stages = plan("pkt", 3, 30, 10)
    phase1 = stages[1]  # steps 10..19
    rates = Rates(current=3.0, lower=0.3, phase_warmup=0.2, pd_warmup_steps=2)

    def rate(step, key):
        return lr_factor(stage_at(stages, step), step, key, rates)

    def background(t):  # min(ramp over 2 steps, 0.9 + 0.1·(1 − t/10)^0.5)
        return min((t + 1) / 2, 0.9 + 0.1 * (1 - t / 10) ** 0.5)

    assert rate(10, 1) == pytest.approx(3.0 * 0.5)  # warm-up over the first 2 steps of the phase
    assert rate(11, 1) == pytest.approx(3.0 * background(1)) and rate(19, 1) == pytest.approx(3.0 * background(9))
    assert rate(19, 1) < rate(12, 1) < 3.0 and rate(19, 1) > 3.0 * 0.9  # decays towards 0.9 within the phase
    assert rate(15, 0) == pytest.approx(0.3 * background(5))  # finished layers: 1/10 of the current layer
    assert rate(15, 2) == 0.0 and rate(15, COPIED) == 0.0
    assert rate(15, EMBEDDING_NORM) == 0.0  # frozen through stage 1 (official)
    assert lr_factor(stages[1], 15, EMBEDDING_NORM, Rates(lower=0.3, freeze_embedding_norm=False)) > 0
    assert phase1.current == (1,)
    # Stage 2: everything trains, warm-up then linear decay to zero.
    assert rate(30, COPIED) == pytest.approx(0.5) and rate(31, 2) == pytest.approx(1.0)
    assert rate(39, 0) == pytest.approx(1 - 7 / 8)  # the last step of the stage; zero just after it
    assert rate(30, EMBEDDING_NORM) == pytest.approx(0.5)
    flat = Rates(current=1.0, phase_warmup=0.2, phase_end_factor=1.0)  # the old warm-up-then-flat schedule
    assert lr_factor(stages[1], 19, 1, flat) == 1.0
    with pytest.raises(UserError, match="phase_end_factor"):
        Rates(phase_end_factor=1.5)


def test_paper_config_rates_are_the_official_code_s():
    """The paper recipe resolves to the current layer at 3× train.lr and finished layers at 0.3× (1/10 of it)."""
    from pathlib import Path

    from mobilebert.recipes.config import load_config
    from mobilebert.recipes.distill import DistillOptions

    root = Path(__file__).resolve().parents[2] / "configs"
    options = load_config(DistillOptions, root / "paper" / "mobilebert-pkt.yaml")
    rates = options.distill.rates()
    stages = plan("pkt", 24, options.distill.layerwise_steps, options.distill.pd_steps)
    phase = stages[5]
    middle = phase.start + phase.steps // 2
    background = lr_factor(phase, middle, 5, rates) / 3.0
    assert 0.9 < background < 1.0
    assert lr_factor(phase, middle, 5, rates) == pytest.approx(3.0 * background)
    assert lr_factor(phase, middle, 2, rates) == pytest.approx(0.3 * background)
    assert lr_factor(phase, middle, EMBEDDING_NORM, rates) == 0.0
    assert (rates.phase_warmup, rates.phase_end_factor, rates.phase_decay_power) == (0.1, 0.9, 0.5)
    d, train = options.distill, options.train
    assert d.reset_optimizer and not d.student_dropout and d.freeze_embedding_norm
    assert (train.optimizer, train.bias_correction) == ("lamb", False)


def test_group_keys_and_trainable_sets():
    student = mb.MobileBertForPreTraining(mb.preset("mobilebert-test", num_hidden_layers=3))
    keys = {name: group_key(name) for name, _ in student.named_parameters()}
    assert keys["mobilebert.layers.2.query.weight"] == 2
    assert keys["mobilebert.embeddings.norm.weight"] == EMBEDDING_NORM
    assert keys["mobilebert.embeddings.word.weight"] == COPIED and keys["mlm.extra_columns"] == COPIED
    stages = plan("pkt", 3, 30, 10)
    set_trainable(student, stages[1], Rates(lower=0.0))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, k in keys.items() if k == 1}
    set_trainable(student, stages[2], Rates(lower=0.3))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, k in keys.items() if k in (0, 1, 2)}
    set_trainable(student, stages[0], Rates(freeze_embedding_norm=False))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, k in keys.items() if k in (0, EMBEDDING_NORM)}
    set_trainable(student, stages[-1], Rates())
    assert all(p.requires_grad for p in student.parameters())
    groups = layer_groups(parameter_groups(student, 0.01))
    assert {g["key"] for g in groups} == {COPIED, EMBEDDING_NORM, 0, 1, 2}
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


def test_layer_maps_and_pair_checks():
    assert build_layer_map("same", 6, 6) == [0, 1, 2, 3, 4, 5]
    assert build_layer_map("uniform", 24, 12) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    assert build_layer_map([0, 2], 4, 2) == [0, 2]
    assert build_layer_map("[1, 3]", 4, 2) == [1, 3]  # as the command line gives it
    with pytest.raises(UserError, match="not a list of teacher layers"):
        build_layer_map("[1, x", 4, 2)
    with pytest.raises(UserError, match="set distill.layer_map"):
        build_layer_map("same", 24, 12)
    teacher, student = mb.preset("ib-bert-demo"), mb.preset("mobilebert-demo")
    check_pair(teacher, student, list(range(6)), copy_from_teacher=True)
    with pytest.raises(UserError, match="block width .*teacher 128 vs student 512.*attention heads teacher 4 vs "
                                        "student 2"):
        check_pair(teacher, mb.preset("mobilebert", num_attention_heads=2, num_hidden_layers=6), list(range(6)),
                   copy_from_teacher=False)
    with pytest.raises(UserError, match="embedding_size teacher 64 vs student 32"):
        check_pair(teacher, student.replace(embedding_size=32), list(range(6)), copy_from_teacher=True)


def _pair():
    teacher = mb.MobileBertForPreTraining(mb.preset("ib-bert-demo", num_hidden_layers=2, vocab_size=99)).eval()
    student = mb.MobileBertForPreTraining(mb.preset("mobilebert-demo", num_hidden_layers=2, vocab_size=99))
    return teacher, student


def test_copied_parameters_equal_the_teachers_and_stay_frozen_in_a_phase():
    teacher, student = _pair()
    copied = copy_embeddings_and_heads(teacher, student)
    assert "mobilebert.embeddings.word.weight" in copied and "nsp.weight" in copied
    assert "mobilebert.embeddings.norm.weight" not in copied  # NoNorm vs LayerNorm
    stages = plan("pkt", 2, 4, 0)
    set_trainable(student, stages[0], Rates(freeze_embedding_norm=False))
    groups = layer_groups(parameter_groups(student, 0.01))
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    ids = torch.randint(5, 99, (2, 8))
    out = student(ids, output_hidden_states=True, num_layers=1)
    out.hidden_states[1].pow(2).mean().backward()
    optimizer.step()
    tparams = dict(teacher.named_parameters())
    moved = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all(group_key(name) in (0, EMBEDDING_NORM) for name in moved), moved
    assert "mobilebert.layers.0.input_bottleneck.weight" in moved
    assert all(torch.equal(p, tparams[name]) for name, p in student.named_parameters() if name in copied)
