"""Shared test helpers: tiny configurations of every variant and random-weight utilities."""

from __future__ import annotations

import pytest
import torch

from mobilebert.heads import TASK_MODELS

# Tiny versions of the four architectures in transformers' field names (docs/models.md).
TINY = dict(vocab_size=99, hidden_size=32, embedding_size=16, intra_bottleneck_size=16, num_hidden_layers=3,
            num_attention_heads=2, intermediate_size=24, num_feedforward_networks=2, max_position_embeddings=64)
VARIANTS = {
    "mobilebert": {},
    "mobilebert-tiny": dict(use_bottleneck_attention=True, key_query_shared_bottleneck=False),
    "mobilebert-no-opt": dict(normalization_type="layer_norm", hidden_act="gelu"),
    # The teacher's structure where transformers can run it: intra width equal to inter width.
    "ib-bert": dict(intra_bottleneck_size=32, key_query_shared_bottleneck=False, num_feedforward_networks=1,
                    intermediate_size=64, normalization_type="layer_norm", hidden_act="gelu_new"),
}


def randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (norms too) by noise, so no weight is left at an identity-like init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def padded_batch(vocab: int = 99, batch: int = 3, length: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and token_type_ids of a batch whose rows have different padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, length - 3 * row:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours − reference| / max |reference|: a tolerance that scales with MobileBERT's huge activations."""
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-30)).item()


HEADS = ["Model", *(name.removeprefix("MobileBertFor") for name in TASK_MODELS)]  # the backbone, then every head
OUTPUT_FIELDS = ("last_hidden_state", "pooler_output", "prediction_logits", "seq_relationship_logits", "logits",
                 "start_logits", "end_logits")


def build(head: str, cfg, seed: int = 0) -> torch.nn.Module:
    """A randomized eval-mode model of `head` ("Model" for the backbone, else `MobileBertFor{head}`)."""
    import mobilebert as mb

    cls = mb.MobileBertModel if head == "Model" else getattr(mb, f"MobileBertFor{head}")
    return randomize(cls(cfg), seed=seed).eval()


def inputs_for(head: str, **kwargs) -> dict:
    batch = padded_batch(**kwargs)
    if head == "MultipleChoice":  # one question with three choices: (1, C, T)
        batch = {k: v.unsqueeze(0) for k, v in batch.items()}
    return batch


def eager_fields(eager: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Eager's outputs for `batch`, by name, in the order an exported runner returns them."""
    with torch.no_grad():
        out = eager(**batch)
    return {name: getattr(out, name) for name in OUTPUT_FIELDS if getattr(out, name, None) is not None}


def assert_runner_matches(runner, eager: torch.nn.Module, batch: dict, tol: float = 1e-4) -> None:
    """An exported model's runner (`ExecutorchModel`, `TFLiteModel`: outputs by name) against eager on `batch`:
    the same names in the same order, shapes, and every output within `tol` relative error."""
    expected = eager_fields(eager, batch)
    out = runner(**batch)
    assert list(out) == runner.output_names == list(expected)
    for name, t in out.items():
        assert t.shape == expected[name].shape, name
        assert relative_error(t, expected[name]) <= tol, name


def assert_same_outputs(fast, eager, batch: dict, hidden_states: bool = True, tol: float = 1e-4) -> None:
    """Every output field (and hidden state) of `fast` within `tol` relative error of eager's; no loss."""
    with torch.no_grad():
        ref = eager(**batch, output_hidden_states=hidden_states)
        out = fast(**batch, output_hidden_states=hidden_states)
    assert type(out) is type(ref)
    compared = 0
    for name in OUTPUT_FIELDS:
        expected = getattr(ref, name, None)
        assert (getattr(out, name, None) is None) == (expected is None), name
        if expected is not None:
            assert getattr(out, name).shape == expected.shape, name
            err = relative_error(getattr(out, name), expected)
            assert err <= tol, f"{name}: relative error {err:.2e}"
            compared += 1
    assert compared >= 1
    if hidden_states:
        assert len(out.hidden_states) == len(ref.hidden_states)
        for i, (mine, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
            assert relative_error(mine, theirs) <= tol, f"hidden state {i}"
    assert getattr(out, "loss", None) is None


@pytest.fixture
def tiny_cfg():
    import mobilebert as mb

    return mb.MobileBertConfig(**TINY)


# ---- the export command (tests/deploy/test_onnx_export.py, tests/deploy/test_aoti.py) ----

SENTENCES = ["the quick brown fox jumps over the lazy dog", "what does the fox say to the dog",
             "a second sentence about dogs and foxes", "the answer is in the context"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny sequence classifier with its tokenizer, saved as a user would have it, and a calibration text file."""
    import mobilebert as mb
    from mobilebert.tokenizer import Tokenizer

    tokenizer = Tokenizer.train([SENTENCES], vocab_size=200, min_frequency=1)
    cfg = mb.MobileBertConfig(**{**TINY, "vocab_size": tokenizer.vocab_size})
    path = tmp_path_factory.mktemp("checkpoint")
    randomize(mb.MobileBertForSequenceClassification(cfg), std=0.1).save_pretrained(path, tokenizer)
    text = path.parent / "calibration.txt"
    pairs = [(SENTENCES[i % 4], SENTENCES[(i + 1) % 4]) for i in range(40)]
    text.write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    return path, text


def run_export(argv: list[str]) -> int:
    """`mobilebert export ARGV` in this process; its exit code."""
    import argparse

    from mobilebert.recipes import export as export_recipe

    parser = argparse.ArgumentParser()
    export_recipe.add_arguments(parser)
    return export_recipe.main(parser.parse_args(argv))


def export_report(checkpoint: tuple, out, fmt: str, *extra: str) -> dict:
    """`mobilebert export` of the `checkpoint` fixture's model to `out` as `fmt` (32 tokens, its calibration text),
    checked to succeed; the export.json it wrote."""
    import json

    path, text = checkpoint
    argv = [str(path), "--out", str(out), "--format", fmt, "--calibration-text", str(text), "--max-seq-length", "32"]
    assert run_export([*argv, *extra]) == 0
    return json.loads((out / "export.json").read_text())
