"""Strategy plans and schedules: in each PKT phase exactly the intended parameters train, at the intended rates,
and copied embeddings and heads stay equal to the teacher's through layer-wise transfer."""

from __future__ import annotations

import pytest
import torch

import mobilebert as mb
from mobilebert.distill.strategies import (
    COPIED,
    EMBEDDING_NORM,
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


def test_pkt_rates_per_phase():
    stages = plan("pkt", 3, 30, 10)
    phase1 = stages[1]  # steps 10..19

    def rate(step, key):
        return lr_factor(stage_at(stages, step), step, key, current_scale=3.0, lower_scale=0.1, phase_warmup=0.2,
                         pd_warmup_steps=2)

    assert rate(10, 1) == pytest.approx(3.0 * 0.5)  # warm-up over the first 2 steps of the phase
    assert rate(11, 1) == pytest.approx(3.0) and rate(19, 1) == pytest.approx(3.0)
    assert rate(15, 0) == pytest.approx(0.1) and rate(15, EMBEDDING_NORM) == pytest.approx(0.1)
    assert rate(15, 2) == 0.0 and rate(15, COPIED) == 0.0
    assert phase1.current == (1,)
    # Stage 2: everything trains, warm-up then linear decay to zero.
    assert rate(30, COPIED) == pytest.approx(0.5) and rate(31, 2) == pytest.approx(1.0)
    assert rate(39, 0) == pytest.approx(1 - 7 / 8)  # the last step of the stage; zero just after it


def test_group_keys_and_trainable_sets():
    student = mb.MobileBertForPreTraining(mb.preset("mobilebert-test", num_hidden_layers=3))
    keys = {name: group_key(name) for name, _ in student.named_parameters()}
    assert keys["mobilebert.layers.2.query.weight"] == 2
    assert keys["mobilebert.embeddings.norm.weight"] == EMBEDDING_NORM
    assert keys["mobilebert.embeddings.word.weight"] == COPIED and keys["mlm.extra_columns"] == COPIED
    stages = plan("pkt", 3, 30, 10)
    set_trainable(student, stages[1], lower_scale=0.0)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, k in keys.items() if k == 1}
    set_trainable(student, stages[2], lower_scale=0.1)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, k in keys.items() if k in (0, 1, 2, EMBEDDING_NORM)}
    set_trainable(student, stages[-1], lower_scale=0.1)
    assert all(p.requires_grad for p in student.parameters())
    groups = layer_groups(parameter_groups(student, 0.01))
    assert {g["key"] for g in groups} == {COPIED, EMBEDDING_NORM, 0, 1, 2}
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


def test_layer_maps_and_pair_checks():
    assert build_layer_map("same", 6, 6) == [0, 1, 2, 3, 4, 5]
    assert build_layer_map("uniform", 24, 12) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    assert build_layer_map([0, 2], 4, 2) == [0, 2]
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
    set_trainable(student, stages[0], lower_scale=0.1)
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
