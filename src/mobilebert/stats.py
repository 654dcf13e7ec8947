"""Size and cost of a config, computed from the architecture alone (no model is built).

FLOPs count multiply-adds of the backbone's matrix products as two operations, at batch 1; norms, activations
and softmax are left out, as in the paper's figures and docs/benchmarks.md (MobileBERT at 1×128: 5.39 GFLOP).
"""

from __future__ import annotations

from mobilebert.config import MobileBertConfig


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _block_parameters(cfg: MobileBertConfig) -> int:
    D, I, Fw = cfg.hidden_size, cfg.intra_bottleneck_size, cfg.intermediate_size
    shared = cfg.key_query_shared_bottleneck
    qk_in = I if (cfg.use_bottleneck_attention or shared) else D
    v_in = I if cfg.use_bottleneck_attention else D
    n = _linear(D, I) + 2 * I  # input bottleneck + norm
    n += (_linear(D, I) + 2 * I) if shared else 0
    n += 2 * _linear(qk_in, I) + _linear(v_in, I) + _linear(I, I) + 2 * I
    n += cfg.num_feedforward_networks * (_linear(I, Fw) + _linear(Fw, I) + 2 * I)
    return n + _linear(I, D) + 2 * D


def count_parameters(cfg: MobileBertConfig, pooler: bool = True) -> int:
    """Backbone parameters: embeddings, blocks and (when `classifier_activation`) the pooler; no task heads."""
    D, E = cfg.hidden_size, cfg.embedding_size
    embeddings = cfg.vocab_size * E + (cfg.max_position_embeddings + cfg.type_vocab_size) * D
    embeddings += _linear(E * (3 if cfg.trigram_input else 1), D) + 2 * D
    pool = _linear(D, D) if pooler and cfg.classifier_activation else 0
    return embeddings + cfg.num_hidden_layers * _block_parameters(cfg) + pool


def count_flops(cfg: MobileBertConfig, seq_len: int = 128) -> int:
    """Backbone FLOPs for one sequence of `seq_len` tokens."""
    T, D, I, E, Fw = seq_len, cfg.hidden_size, cfg.intra_bottleneck_size, cfg.embedding_size, cfg.intermediate_size
    shared = cfg.key_query_shared_bottleneck
    qk_in = I if (cfg.use_bottleneck_attention or shared) else D
    v_in = I if cfg.use_bottleneck_attention else D
    macs = D * I * (2 if shared else 1) + 2 * qk_in * I + v_in * I + I * I
    macs += cfg.num_feedforward_networks * 2 * I * Fw + I * D
    per_block = T * macs + 2 * T * T * I  # projections, then scores (T×T×I) and context (T×T×I)
    embedding = T * E * (3 if cfg.trigram_input else 1) * D
    return 2 * (embedding + cfg.num_hidden_layers * per_block)
