"""Parity with transformers' MobileBERT on tiny random models, both ways (docs/models.md, issue: model family)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, VARIANTS, padded_batch, randomize, relative_error

import mobilebert as mb

transformers = pytest.importorskip("transformers")

TOL = 1e-5
HEADS = ["PreTraining", "MaskedLM", "NextSentencePrediction", "SequenceClassification", "MultipleChoice",
         "TokenClassification", "QuestionAnswering"]


def labels_for(head: str, batch: dict, num_labels: int) -> dict:
    B, T = batch["input_ids"].shape
    g = torch.Generator().manual_seed(1)
    mlm = torch.full((B, T), -100)
    mlm[:, 1:4] = torch.randint(0, 99, (B, 3), generator=g)
    if head == "PreTraining":
        return dict(labels=mlm, next_sentence_label=torch.tensor([0, 1, 0]))
    if head == "MaskedLM":
        return dict(labels=mlm)
    if head == "NextSentencePrediction":
        return dict(labels=torch.tensor([1, 0, 1]))
    if head == "SequenceClassification":
        return dict(labels=torch.randn(B) if num_labels == 1 else torch.randint(0, num_labels, (B,), generator=g))
    if head == "MultipleChoice":
        return dict(labels=torch.tensor([1]))
    if head == "TokenClassification":
        return dict(labels=torch.randint(0, num_labels, (B, T), generator=g))
    return dict(start_positions=torch.tensor([1, 2, 30]), end_positions=torch.tensor([3, 2, 5]))


def inputs_for(head: str) -> dict:
    batch = padded_batch()
    if head == "MultipleChoice":  # one question with three choices: (1, C, T)
        batch = {k: v.unsqueeze(0) for k, v in batch.items()}
    return batch


def compare(ours, theirs, head: str) -> None:
    fields = {"PreTraining": ["prediction_logits", "seq_relationship_logits"],
              "QuestionAnswering": ["start_logits", "end_logits"]}.get(head, ["logits"])
    for name in [*fields, "loss"]:
        err = relative_error(getattr(ours, name), getattr(theirs, name))
        assert err <= TOL, f"{head}.{name}: relative error {err:.2e}"


def build_pair(variant: str, head: str, pooler: bool, num_labels: int):
    hf_cfg = transformers.MobileBertConfig(**{**TINY, **VARIANTS[variant]}, classifier_activation=pooler,
                                           num_labels=num_labels)
    return hf_cfg, getattr(transformers, f"MobileBertFor{head}"), getattr(mb, f"MobileBertFor{head}")


@pytest.mark.parametrize("pooler", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
def test_transformers_checkpoint_loads_and_matches(tmp_path, variant, head, pooler):
    num_labels = {"QuestionAnswering": 2, "SequenceClassification": 1 if variant == "mobilebert" else 3}.get(head, 3)
    hf_cfg, hf_cls, our_cls = build_pair(variant, head, pooler, num_labels)
    theirs = randomize(hf_cls(hf_cfg)).eval()
    theirs.save_pretrained(tmp_path)
    ours = our_cls.from_pretrained(tmp_path)
    batch, labels = inputs_for(head), labels_for(head, padded_batch(), num_labels)
    with torch.no_grad():
        compare(ours(**batch, **labels), theirs(**batch, **labels), head)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
def test_our_checkpoint_loads_in_transformers(tmp_path, variant, head):
    names = {0: "start", 1: "end"} if head == "QuestionAnswering" else {0: "neg", 1: "neu", 2: "pos"}
    cfg = mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}, classifier_activation=True, id2label=names)
    ours = randomize(getattr(mb, f"MobileBertFor{head}")(cfg), seed=3).eval()
    ours.save_pretrained(tmp_path)
    theirs = getattr(transformers, f"MobileBertFor{head}").from_pretrained(tmp_path).eval()
    assert theirs.config.id2label == names
    batch, labels = inputs_for(head), labels_for(head, padded_batch(), 3)
    with torch.no_grad():
        compare(ours(**batch, **labels), theirs(**batch, **labels), head)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_states_and_attentions_match(tmp_path, variant):
    hf_cfg = transformers.MobileBertConfig(**{**TINY, **VARIANTS[variant]})
    theirs = randomize(transformers.MobileBertModel(hf_cfg, add_pooling_layer=False)).eval()
    theirs.save_pretrained(tmp_path)
    theirs = transformers.MobileBertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = mb.MobileBertModel.from_pretrained(tmp_path)
    batch = padded_batch()
    with torch.no_grad():
        a = theirs(**batch, output_hidden_states=True, output_attentions=True)
        b = ours(**batch, output_hidden_states=True, output_attentions=True)
    assert len(b.hidden_states) == len(a.hidden_states) == TINY["num_hidden_layers"] + 1
    assert len(b.attentions) == len(a.attentions) == TINY["num_hidden_layers"]
    for mine, ref in zip(b.hidden_states + b.attentions, a.hidden_states + a.attentions, strict=True):
        assert relative_error(mine, ref) <= TOL


def test_base_model_and_task_model_checkpoints_interchange(tmp_path):
    """A bare backbone saved by transformers (no `mobilebert.` prefix) loads into a task model and back."""
    hf_cfg = transformers.MobileBertConfig(**TINY)
    theirs = randomize(transformers.MobileBertModel(hf_cfg)).eval()
    theirs.save_pretrained(tmp_path / "base")
    classifier = mb.MobileBertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=4)
    assert classifier.classifier.out_features == 4
    classifier.save_pretrained(tmp_path / "clf")
    backbone = mb.MobileBertModel.from_pretrained(tmp_path / "clf")
    batch = padded_batch()
    with torch.no_grad():
        ref = theirs(**batch).last_hidden_state
        assert relative_error(backbone(**batch).last_hidden_state, ref) <= TOL
        assert relative_error(classifier.mobilebert(**batch).last_hidden_state, ref) <= TOL


def test_published_style_transformers_checkpoint_with_tied_copies(tmp_path):
    """Older transformers saved `cls.predictions.decoder.*` and `position_ids`; they are tied copies: skipped."""
    hf_cfg = transformers.MobileBertConfig(**TINY, classifier_activation=False)
    theirs = randomize(transformers.MobileBertForPreTraining(hf_cfg)).eval()
    state = dict(theirs.state_dict())
    state["cls.predictions.decoder.weight"] = theirs.mobilebert.embeddings.word_embeddings.weight
    state["mobilebert.embeddings.position_ids"] = torch.arange(64)[None]
    theirs.config.save_pretrained(tmp_path)
    torch.save({k: v.clone() for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    ours = mb.MobileBertForPreTraining.from_pretrained(tmp_path)
    batch = padded_batch()
    with torch.no_grad():
        assert relative_error(ours(**batch).prediction_logits, theirs(**batch).prediction_logits) <= TOL
