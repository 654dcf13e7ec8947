"""The token-parallel runtime (`optimize_for_inference(token_parallel=True)`): the Python loop's outputs on every
thread count, batch and padding; clear refusals; errors raised, not hung; no threads of its own."""

from __future__ import annotations

import copy
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import HEADS, TINY, VARIANTS, assert_same_outputs, build, inputs_for, padded_batch, relative_error

import mobilebert as mb
from mobilebert.deploy import native
from mobilebert.deploy.optimize import optimize_for_inference

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="the token-parallel runtime is built with a C++ compiler")
NONORM = ["mobilebert", "mobilebert-tiny"]


@pytest.fixture
def threads():
    """Restores PyTorch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def tiny(threads):
    """A tiny MobileBERT on two threads: (eager, token-parallel, padded batch)."""
    threads(2)
    eager = build("Model", mb.MobileBertConfig(**TINY))
    return eager, optimize_for_inference(eager, token_parallel=True), padded_batch()


@pytest.mark.parametrize("variant", NONORM)
def test_matches_the_python_loop_on_every_thread_count_batch_and_padding(variant, threads):
    eager = build("Model", mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}))
    plain, parallel = optimize_for_inference(eager), optimize_for_inference(eager, token_parallel=True)
    batch = padded_batch(length=13)  # rows with different padding, one row split between two threads
    single = dict(input_ids=batch["input_ids"][:1].clamp_min(1))
    one_token = dict(input_ids=batch["input_ids"][:1, :1])  # fewer rows than threads
    for n in (1, 2, 3):
        threads(n)
        for inputs in (batch, single, one_token):
            with torch.no_grad():
                ref = plain(**inputs).last_hidden_state
                out = parallel(**inputs).last_hidden_state
            assert relative_error(out, ref) <= 1e-6, (n, inputs["input_ids"].shape)
        assert_same_outputs(parallel, eager, batch, hidden_states=False)


@pytest.mark.parametrize("head", HEADS)
def test_every_head_matches_eager(head, threads):
    threads(2)
    eager = build(head, mb.MobileBertConfig(**TINY))
    assert_same_outputs(optimize_for_inference(eager, token_parallel=True), eager, inputs_for(head),
                        hidden_states=False)


def test_hidden_states_and_partial_depth_take_the_python_loop_and_agree(tiny):
    eager, parallel, batch = tiny
    assert_same_outputs(parallel, eager, batch, hidden_states=True)
    with torch.no_grad():
        for n in (0, 1, 3):
            ref, out = eager(**batch, num_layers=n), parallel(**batch, num_layers=n)
            assert relative_error(out.last_hidden_state, ref.last_hidden_state) <= 1e-4, n


def test_full_size_mobilebert_matches_the_python_loop(threads):
    threads(2)
    eager = mb.MobileBertModel(mb.preset("mobilebert", num_hidden_layers=3)).eval()
    plain, parallel = optimize_for_inference(eager), optimize_for_inference(eager, token_parallel=True)
    ids = torch.randint(5, 30522, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        ref = plain(ids, attention_mask=mask).last_hidden_state
        out = parallel(ids, attention_mask=mask).last_hidden_state
    assert relative_error(out, ref) <= 1e-6


def test_weights_changed_after_optimizing_are_used(tiny):
    _, parallel, batch = tiny
    ids = batch["input_ids"]
    with torch.no_grad():
        before = parallel(ids).last_hidden_state
        moved = parallel.to(torch.float64).to(torch.float32)  # new tensors for every buffer
        assert relative_error(moved(ids).last_hidden_state, before) <= 1e-6
        twin = copy.deepcopy(parallel)
        twin.layers[1].output_t.mul_(2)  # in place: load_state_dict's way, cached views stay valid
        assert relative_error(twin(ids).last_hidden_state, before) > 1e-3
        assert relative_error(parallel(ids).last_hidden_state, before) <= 1e-6  # the copy's weights are its own
        restored = pickle.loads(pickle.dumps(parallel))
        assert relative_error(restored(ids).last_hidden_state, before) <= 1e-6


@pytest.mark.parametrize("variant", ["mobilebert-no-opt", "ib-bert"])
def test_layernorm_models_are_refused(variant):
    eager = build("Model", mb.MobileBertConfig(**{**TINY, **VARIANTS[variant]}))
    with pytest.raises(mb.UserError, match="LayerNorms; only all-NoNorm models"):
        optimize_for_inference(eager, token_parallel=True)


def test_reduced_precision_is_refused():
    eager = build("Model", mb.MobileBertConfig(**TINY))
    with pytest.raises(mb.UserError, match="runs float32"):
        optimize_for_inference(eager, dtype=torch.bfloat16, token_parallel=True)


def test_an_error_inside_the_loop_is_raised_and_the_threads_stay_usable(tiny):
    _, parallel, batch = tiny
    ids = batch["input_ids"]
    with torch.no_grad():
        before = parallel(ids).last_hidden_state
        h = torch.randn(ids.numel(), TINY["hidden_size"])
        blocks = [native._flat(block.weights()) for block in parallel.layers]
        blocks[1][4] = torch.zeros(3, 3)  # a wrong attention weight in the second block: one thread fails
        with pytest.raises(RuntimeError):
            native.extension().blocks_forward(h, None, ids.shape[0], ids.shape[1], blocks, 2, True)
        assert relative_error(parallel(ids).last_hidden_state, before) <= 1e-6


def test_runs_on_pytorchs_own_threads_and_leaves_their_counts_alone():
    """The loop runs in PyTorch's OpenMP team: no thread of its own, and PyTorch's thread count is unchanged after
    it (checked in a fresh process, so the count of threads is this test's own)."""
    script = """
import os, torch, mobilebert as mb
from mobilebert.deploy.optimize import optimize_for_inference
torch.set_num_threads(2)
model = optimize_for_inference(mb.MobileBertModel(mb.preset("mobilebert-test")).eval(), token_parallel=True)
ids = torch.randint(5, 99, (2, 32))
count = lambda: len(os.listdir("/proc/self/task"))
with torch.no_grad():
    torch.mm(torch.randn(256, 256), torch.randn(256, 256))  # the caller's OpenMP team
    before = count()
    for _ in range(3):
        model(ids)
    print(count() - before, torch.get_num_threads())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "2"]
