"""The architecture itself: shapes, attention paths, padding option, partial depth, heads' losses."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, randomize, relative_error

import mobilebert as mb


@pytest.mark.parametrize("name", ["mobilebert-test", "mobilebert-demo", "ib-bert-demo"])
def test_outputs_have_the_contract_shapes(name):
    cfg = mb.preset(name)
    model = mb.MobileBertForPreTraining(cfg).eval()
    batch = padded_batch(cfg.vocab_size, batch=3, length=12)
    out = model(**batch, output_hidden_states=True, output_attentions=True, output_attention_scores=True)
    L, H, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    assert out.prediction_logits.shape == (3, 12, cfg.vocab_size)
    assert out.seq_relationship_logits.shape == (3, 2)
    assert len(out.hidden_states) == L + 1 and all(h.shape == (3, 12, D) for h in out.hidden_states)
    assert len(out.attentions) == L and all(a.shape == (3, H, 12, 12) for a in out.attentions)
    assert len(out.attention_scores) == L
    # Probabilities over keys sum to one and give padding no weight; scores are the pre-softmax values.
    mask = batch["attention_mask"][:, None, None, :].expand(-1, H, 12, -1)
    for probs, scores in zip(out.attentions, out.attention_scores, strict=True):
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, H, 12))
        assert probs[mask == 0].abs().max() == 0
        torch.testing.assert_close(scores.softmax(-1), probs)


def test_sdpa_and_explicit_attention_paths_agree():
    model = randomize(mb.MobileBertModel(mb.preset("mobilebert-test")), std=0.2).eval()
    batch = padded_batch()
    with torch.no_grad():
        fast = model(**batch).last_hidden_state
        explicit = model(**batch, output_attentions=True).last_hidden_state
    assert relative_error(fast, explicit) < 1e-5


def test_padding_stays_out_of_real_tokens_except_through_the_trigram_shift():
    """Published behaviour: the last real token sees the [PAD] embedding via the t+1 shift. With
    `trigram_skip_padding` real tokens are independent of what fills the padding."""
    cfg = mb.preset("mobilebert-test")
    torch.manual_seed(0)
    published = randomize(mb.MobileBertModel(cfg)).eval()
    skipping = mb.MobileBertModel(cfg.replace(trigram_skip_padding=True)).eval()
    skipping.load_state_dict(published.state_dict())
    ids = torch.randint(1, 99, (1, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    other = ids.clone()
    other[0, 6:] = 7  # different padding content, same mask
    with torch.no_grad():
        a, b = published(ids, mask).last_hidden_state, published(other, mask).last_hidden_state
        assert not torch.allclose(a[0, 5], b[0, 5])  # the last real token sees its right neighbour (then all do)
        c, d = skipping(ids, mask).last_hidden_state, skipping(other, mask).last_hidden_state
        torch.testing.assert_close(c[0, :6], d[0, :6])


def test_first_layers_only_equal_the_full_models_prefix():
    model = randomize(mb.MobileBertModel(mb.preset("mobilebert-test", num_hidden_layers=4))).eval()
    batch = padded_batch()
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        two = model(**batch, output_hidden_states=True, num_layers=2)
    assert len(two.hidden_states) == 3
    torch.testing.assert_close(two.last_hidden_state, full.hidden_states[2])
    with pytest.raises(mb.UserError, match="num_layers=5 is outside 0..4"):
        model(**batch, num_layers=5)


def test_bad_inputs_get_clear_errors():
    model = mb.MobileBertModel(mb.preset("mobilebert-test"))
    with pytest.raises(mb.UserError, match="sequence length 65 exceeds .*max_position_embeddings=64"):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(mb.UserError, match="attention_mask has shape"):
        model(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(mb.UserError, match=r"input_ids must be \(batch, tokens\)"):
        model(torch.ones(5, dtype=torch.long))


def test_dropout_is_active_in_training_only():
    cfg = mb.preset("ib-bert-large", num_hidden_layers=2, intra_bottleneck_size=64, intermediate_size=64)
    model = mb.MobileBertModel(cfg)
    ids = torch.randint(1, 100, (2, 16))
    model.train()
    assert not torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)
    model.eval()
    assert torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)


def test_mlm_decoder_is_tied_to_the_embedding_table():
    model = mb.MobileBertForPreTraining(mb.preset("mobilebert-test"))
    batch = padded_batch()
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 2] = 5
    model(**batch, labels=labels).loss.backward()
    assert model.mobilebert.embeddings.word.weight.grad[5].abs().sum() > 0  # reached through the decoder too
    assert model.mlm.extra_columns.shape == (32 - 16, 99)


def test_qa_loss_ignores_positions_outside_the_window():
    model = mb.MobileBertForQuestionAnswering(mb.preset("mobilebert-test")).eval()
    batch = padded_batch(length=8)
    out = model(**batch, start_positions=torch.tensor([1, 99, 2]), end_positions=torch.tensor([2, 99, 3]))
    s, e = out.start_logits, out.end_logits
    keep = torch.tensor([0, 2])
    expected = (torch.nn.functional.cross_entropy(s[keep], torch.tensor([1, 2]))
                + torch.nn.functional.cross_entropy(e[keep], torch.tensor([2, 3]))) / 2
    torch.testing.assert_close(out.loss, expected)


def test_regression_head_uses_mse():
    model = mb.MobileBertForSequenceClassification(mb.preset("mobilebert-test", id2label={0: "score"})).eval()
    batch = padded_batch()
    target = torch.tensor([0.5, 2.0, 4.5])
    out = model(**batch, labels=target)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.loss, ((out.logits.squeeze(-1) - target) ** 2).mean())


def test_bf16_autocast_runs_and_stays_close():
    model = mb.MobileBertForPreTraining(mb.preset("mobilebert-test")).eval()
    batch = padded_batch()
    with torch.no_grad():
        ref = model(**batch).prediction_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**batch).prediction_logits
    assert torch.isfinite(low).all() and relative_error(low, ref) < 0.05
