"""Pre-training examples: NSP pairs, BERT masking, determinism and sharding."""

from __future__ import annotations

import numpy as np
import pytest

from mobilebert.data.pairs import PairSettings, create_pairs
from mobilebert.data.pretraining import IGNORE_INDEX, MaskSettings, PretrainingBatches, mask_tokens, shuffled
from mobilebert.errors import UserError

CLS, SEP, MASK, PAD = 2, 3, 4, 0
SPECIAL = {PAD, 1, CLS, SEP, MASK}


def documents(n_docs: int = 30, seed: int = 0) -> list[list[list[int]]]:
    """Documents of sentences whose tokens encode (document, sentence) so pairs can be traced back."""
    rng = np.random.default_rng(seed)
    return [[[10 + d] * int(rng.integers(3, 9)) + [200 + s] for s in range(int(rng.integers(2, 8)))]
            for d in range(n_docs)]


def test_pairs_are_well_formed_and_half_random():
    settings = PairSettings(max_seq_length=32, short_seq_prob=0.1, dupe_factor=3, seed=1)
    data = create_pairs(documents(), CLS, SEP, settings)
    assert len(data) > 100
    for i in range(len(data)):
        ex = data.example(i)
        a_end = data.first_lengths[i]
        assert len(ex) <= 32 and ex[0] == CLS and ex[a_end - 1] == SEP and ex[-1] == SEP
        first, second = ex[1:a_end - 1], ex[a_end:-1]
        assert len(first) and len(second)
        doc_a = {t for t in first if 10 <= t < 200}
        doc_b = {t for t in second if 10 <= t < 200}
        if data.is_random_next[i]:
            assert not doc_a & doc_b  # B comes from another document
        else:
            assert doc_b <= doc_a  # B continues A's document (B may be the end of a sentence cut in two)
    assert 0.4 < data.is_random_next.mean() < 0.6


def test_labels_stay_even_on_short_documents():
    """Two-sentence documents leave lone sentences after every random-next pair; BERT's rule would make them all
    random. Cutting a lone sentence in two keeps the labels near 50/50 and B a true continuation."""
    docs = [[list(range(10 + 20 * d, 20 + 20 * d)), list(range(20 + 20 * d, 30 + 20 * d))] for d in range(200)]
    data = create_pairs(docs, CLS, SEP, PairSettings(max_seq_length=64, short_seq_prob=0.0, seed=0))
    assert 0.45 < data.is_random_next.mean() < 0.55
    for i in np.flatnonzero(data.is_random_next == 0):
        ex = data.example(i)
        a_end = data.first_lengths[i]
        assert ex[a_end] == ex[a_end - 2] + 1  # B starts with the token that follows A's last one


def test_pairs_are_deterministic():
    settings = PairSettings(max_seq_length=32, seed=3)
    a, b = (create_pairs(documents(), CLS, SEP, settings) for _ in range(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.is_random_next, b.is_random_next)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4099])
def test_shuffled_is_a_permutation_keyed_by_seed_and_epoch(n):
    order = shuffled(np.arange(n), n, seed=5, epoch=0)
    assert sorted(order.tolist()) == list(range(n))
    np.testing.assert_array_equal(order[3:9], shuffled(np.arange(3, 9)[: max(0, n - 3)], n, 5, 0)[: len(order[3:9])])
    if n >= 64:  # another epoch or seed gives another order, and the order is far from the identity
        assert not np.array_equal(order, shuffled(np.arange(n), n, seed=5, epoch=1))
        assert not np.array_equal(order, shuffled(np.arange(n), n, seed=6, epoch=0))
        assert np.mean(order == np.arange(n)) < 0.1


def test_too_small_corpus_is_refused():
    with pytest.raises(UserError, match="at least two non-empty documents"):
        create_pairs([[[5, 6]]], CLS, SEP, PairSettings())


def test_masking_follows_bert_rates():
    rng = np.random.default_rng(0)
    settings = MaskSettings(masked_lm_prob=0.15, max_predictions_per_seq=1000)
    n_pred = n_mask = n_kept = n_random = 0
    for _ in range(300):
        ids = rng.integers(10, 1000, 100)
        ids[0], ids[50], ids[99] = CLS, SEP, SEP
        special = np.isin(ids, list(SPECIAL))
        masked, labels = mask_tokens(ids, special, None, 1000, MASK, settings, rng)
        chosen = labels != IGNORE_INDEX
        assert not chosen[special].any()
        assert chosen.sum() == round(97 * 0.15)
        np.testing.assert_array_equal(labels[chosen], ids[chosen])
        np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
        n_pred += chosen.sum()
        n_mask += (masked[chosen] == MASK).sum()
        n_kept += (masked[chosen] == ids[chosen]).sum()
        n_random += ((masked[chosen] != MASK) & (masked[chosen] != ids[chosen])).sum()
    assert n_mask / n_pred == pytest.approx(0.8, abs=0.02)
    assert n_kept / n_pred == pytest.approx(0.1, abs=0.02)  # random replacements rarely hit the same token
    assert n_random / n_pred == pytest.approx(0.1, abs=0.02)


def test_prediction_cap_and_whole_word_masking():
    rng = np.random.default_rng(1)
    ids = np.arange(10, 110)
    special = np.zeros(100, dtype=bool)
    _, labels = mask_tokens(ids, special, None, 200, MASK, MaskSettings(max_predictions_per_seq=5), rng)
    assert (labels != IGNORE_INDEX).sum() == 5
    word_start = np.tile([True, False, False, False], 25)  # words of four pieces
    for _ in range(20):
        _, labels = mask_tokens(ids, special, word_start, 200, MASK,
                                MaskSettings(max_predictions_per_seq=20, whole_word_masking=True), rng)
        chosen = (labels != IGNORE_INDEX).reshape(25, 4)
        assert (chosen.all(1) | ~chosen.any(1)).all()  # every word fully in or fully out


def _batches(data, batch_size, rank=0, world=1):
    return PretrainingBatches(data, batch_size, 1000, MASK, PAD, SPECIAL, MaskSettings(), seed=7, rank=rank,
                              world_size=world)


def test_batches_are_a_pure_function_of_step_and_shard_exactly():
    data = create_pairs(documents(), CLS, SEP, PairSettings(max_seq_length=32))
    whole = _batches(data, 8)
    again = _batches(data, 8)
    for step in (0, 3, 57):  # 57 crosses an epoch boundary
        a, b = whole.batch(step), again.batch(step)
        for k in a:
            assert (a[k] == b[k]).all()
        shards = [_batches(data, 8, rank, 2).indices(step) for rank in (0, 1)]
        assert shards[0] + shards[1] == whole.indices(step)
        half = _batches(data, 8, 1, 2).batch(step)
        T = half["input_ids"].shape[1]
        assert (half["labels"] == a["labels"][4:, :T]).all()  # masking does not depend on the sharding
    epoch0 = sorted(i for s in range(len(data) // 8) for _, i in whole.indices(s))
    assert epoch0 == list(range(len(data) // 8 * 8))[: len(epoch0)] or len(set(epoch0)) == len(epoch0)


def test_collate_pads_and_masks():
    data = create_pairs(documents(), CLS, SEP, PairSettings(max_seq_length=32, short_seq_prob=0.5))
    batch = _batches(data, 16).batch(0)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max()
    for row, n in enumerate(lengths.tolist()):
        assert (batch["input_ids"][row, n:] == PAD).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["token_type_ids"][row, :n].max() == 1
