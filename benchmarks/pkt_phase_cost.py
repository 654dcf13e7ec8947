"""Cost of a knowledge-transfer step in each PKT phase, against a naive step that runs every layer of both models.

In PKT phase l only the layers 0..l of student and teacher are computed and only the student's layers that
train get gradients (`mobilebert distill`, docs/distillation.md), so phase 0 should cost a fraction of the last phase.
A naive implementation runs both models to the top in every phase; JKT's layer-wise stage and the PD stage must.

Each timed step is the real one: `Transfer.sums` (student forward with hidden states and attention scores, teacher
forward without gradients, feature-map and attention losses), backward, optimizer step. Configurations are
interleaved round by round so machine drift hits all alike (docs/benchmarks.md); medians are reported, with each
phase's time as a share of the naive step. Prints a table, writes a plot (--plot), prints one JSON line last.

    python benchmarks/pkt_phase_cost.py --threads 2
    python benchmarks/pkt_phase_cost.py --teacher ib-bert-large --student mobilebert --batch 8 --seq 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import torch

import mobilebert as mb
from mobilebert.distill.strategies import Rates, copy_embeddings_and_heads, layer_groups, plan, set_trainable
from mobilebert.recipes.distill import Transfer, TransferOptions
from mobilebert.tables import format_table
from mobilebert.train.optim import build_optimizer, parameter_groups


def random_batch(vocab: int, batch: int, seq: int, generator: torch.Generator) -> dict:
    ids = torch.randint(5, vocab, (batch, seq), generator=generator)
    labels = torch.full_like(ids, -100)
    masked = torch.rand(batch, seq, generator=generator) < 0.15
    labels[masked] = ids[masked]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": labels, "next_sentence_label": torch.randint(0, 2, (batch,), generator=generator)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="ib-bert-demo", help="teacher preset (random weights)")
    parser.add_argument("--student", default="mobilebert-demo", help="student preset")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--plot", help="write a bar chart of the per-phase cost to this PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher = mb.MobileBertForPreTraining(mb.preset(args.teacher)).eval().requires_grad_(False)
    student = mb.MobileBertForPreTraining(mb.preset(args.student, vocab_size=teacher.config.vocab_size))
    copy_embeddings_and_heads(teacher, student)
    layers = student.config.num_hidden_layers
    transfer = Transfer(teacher, TransferOptions(), list(range(layers)))
    optimizer = build_optimizer("adamw", layer_groups(parameter_groups(student, 0.01)), lr=1e-5)
    batch = random_batch(teacher.config.vocab_size, args.batch, args.seq, torch.Generator().manual_seed(0))

    phases = plan("pkt", layers, layers, 1)
    configs = {}
    for stage in phases[:-1]:
        configs[stage.name] = stage
        # The naive step of the same phase: same losses and trainable layers, but both models run to the top.
        configs[f"{stage.name} naive"] = dataclasses.replace(stage, run_layers=None)
    configs["distillation (PD)"] = phases[-1]

    def one_step(stage) -> float:
        set_trainable(student, stage, Rates())
        began = time.perf_counter()
        terms = transfer.sums(stage, student, batch)
        sum(terms.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    times: dict[str, list[float]] = {name: [] for name in configs}
    for stage in configs.values():
        for _ in range(args.warmup):
            one_step(stage)
    for _ in range(args.rounds):  # interleaved
        for name, stage in configs.items():
            times[name].append(one_step(stage))

    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [[f"phase {l}", f"{median[f'phase-{l}'] * 1e3:.1f}", f"{median[f'phase-{l} naive'] * 1e3:.1f}",
             f"{median[f'phase-{l} naive'] / median[f'phase-{l}']:.2f}×"] for l in range(layers)]
    ours = sum(median[f"phase-{l}"] for l in range(layers))
    naive = sum(median[f"phase-{l} naive"] for l in range(layers))
    rows.append(["all phases", f"{ours * 1e3:.1f}", f"{naive * 1e3:.1f}", f"{naive / ours:.2f}×"])
    rows.append(["PD step (both models in full)", f"{median['distillation (PD)'] * 1e3:.1f}", "", ""])
    print(f"{args.teacher} → {args.student}, batch {args.batch} × {args.seq}, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}; medians of {args.rounds}")
    print(format_table(["PKT step", "ms (ours)", "ms (naive: all layers)", "speed-up"], rows))
    first, last = median["phase-0"], median[f"phase-{layers - 1}"]
    print(f"phase 0 costs {first / last:.2f}× the last phase; the layer-wise stage runs {naive / ours:.2f}× faster "
          "than running every layer of both models in every phase")
    if args.plot:
        _plot(median, layers, args)
    print(json.dumps({"teacher": args.teacher, "student": args.student, "batch": args.batch, "seq": args.seq,
                      "threads": args.threads, "median_s": median,
                      "phase0_over_last": first / last, "speedup_over_naive": naive / ours,
                      "torch": torch.__version__}))
    return 0


def _plot(median: dict[str, float], layers: int, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"phase-{l}" for l in range(layers)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(layers)
    ax.bar([i - 0.2 for i in x], [median[n] * 1e3 for n in names], 0.4, color="#4c72b0",
           label="ours: layers ≤ l only")
    ax.bar([i + 0.2 for i in x], [median[f"{n} naive"] * 1e3 for n in names], 0.4, color="#c44e52",
           label="naive: all layers of both models")
    ax.set_xlabel("PKT phase (student layer being transferred)")
    ax.set_ylabel("step time, ms (median)")
    ax.set_title(f"{args.teacher} → {args.student}, {args.batch}×{args.seq}, {args.threads} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
