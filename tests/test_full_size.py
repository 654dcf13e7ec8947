"""The paper's full-size models build and train (forward and backward) on a CPU."""

from __future__ import annotations

import pytest
import torch

import mobilebert as mb


@pytest.mark.parametrize("name", ["ib-bert-large", "mobilebert"])
def test_full_size_model_runs_forward_and_backward(name):
    cfg = mb.preset(name)
    torch.manual_seed(0)
    model = mb.MobileBertForPreTraining(cfg)
    assert sum(p.numel() for p in model.mobilebert.parameters()) == mb.count_parameters(cfg)
    ids = torch.randint(1, cfg.vocab_size, (1, 32))
    labels = torch.full_like(ids, -100)
    labels[0, 5] = ids[0, 5]
    out = model(ids, labels=labels, next_sentence_label=torch.tensor([0]), output_hidden_states=True)
    assert out.prediction_logits.shape == (1, 32, cfg.vocab_size)
    assert len(out.hidden_states) == 25 and out.hidden_states[-1].shape == (1, 32, 512)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.mobilebert.layers[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
