"""`mobilebert demo`: the whole pipeline on the built-in corpus. So far: the model family and checkpoints."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mobilebert.config import preset
from mobilebert.heads import MobileBertForPreTraining
from mobilebert.recipes.presets import preset_table


def checkpoint_round_trip(out: Path) -> str:
    """Save a random demo-size student in transformers' format, load it back (and into transformers if present)."""
    torch.manual_seed(0)
    model = MobileBertForPreTraining(preset("mobilebert-demo")).eval()
    ids = torch.randint(1, 8192, (2, 64))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    model.save_pretrained(out)
    reloaded = MobileBertForPreTraining.from_pretrained(out)
    with torch.no_grad():
        ref = model(ids, mask).prediction_logits
        same = torch.equal(reloaded(ids, mask).prediction_logits, ref)
    lines = [f"saved {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB); reloaded: "
             f"{'identical outputs' if same else 'OUTPUTS DIFFER'}"]
    try:
        import transformers
    except ImportError:
        lines.append("transformers not installed: interoperability check skipped")
    else:
        theirs = transformers.MobileBertForPreTraining.from_pretrained(out).eval()
        with torch.no_grad():
            err = ((theirs(ids, attention_mask=mask).prediction_logits - ref).abs().max() / ref.abs().max()).item()
        lines.append(f"loaded in transformers {transformers.__version__}: relative error {err:.1e}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    start = time.perf_counter()
    print("The MobileBERT family (backbone parameters; FLOPs of one sequence):")
    print(preset_table())
    print()
    print(checkpoint_round_trip(out / "checkpoint"))
    print(f"\ndone in {time.perf_counter() - start:.1f}s; outputs in {out}")
    return 0
