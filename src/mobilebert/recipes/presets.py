"""`mobilebert presets`: the model family at a glance."""

from __future__ import annotations

import argparse

from mobilebert.config import PRESETS, preset
from mobilebert.stats import count_flops, count_parameters
from mobilebert.tables import format_table


def preset_table(seq_len: int = 128) -> str:
    rows = []
    for name in PRESETS:
        cfg = preset(name)
        rows.append([name, cfg.num_hidden_layers, cfg.hidden_size, cfg.intra_bottleneck_size,
                     cfg.num_attention_heads, cfg.num_feedforward_networks, cfg.normalization_type, cfg.hidden_act,
                     f"{count_parameters(cfg) / 1e6:.2f}M", f"{count_flops(cfg, seq_len) / 1e9:.2f}G"])
    headers = ["preset", "layers", "inter", "intra", "heads", "FFNs", "norm", "act", "params",
               f"FLOPs@{seq_len}"]
    return format_table(headers, rows)


def main(args: argparse.Namespace) -> int:
    print(preset_table(args.seq_len))
    return 0
