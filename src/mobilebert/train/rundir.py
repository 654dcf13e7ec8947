"""The run folder contract (docs/training.md) and resumable checkpoints.

    OUT/config.yaml            the resolved options
    OUT/metrics.jsonl          one JSON object per logged step or evaluation
    OUT/checkpoints/step-N/    model (transformers format), optimizer, scheduler, RNG states, trainer state
    OUT/final/                 transformers-format model + tokenizer

A checkpoint is written into a hidden temporary folder and renamed into place, so `step-N` exists only complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mobilebert.checkpoint import load_hf_state_dict, read_weights, save_pretrained
from mobilebert.errors import UserError
from mobilebert.files import atomic_write


class RunDir:
    def __init__(self, out: str | Path, is_main: bool = True) -> None:
        self.root = Path(out)
        self.is_main = is_main
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / "final"

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber earlier work unless asked: --resume continues it, --overwrite starts afresh."""
        if overwrite and resume:
            raise UserError("--resume and --overwrite exclude each other")
        existing = self.final.exists() or self.latest_checkpoint() is not None
        if existing and not (resume or overwrite):
            what = "a finished run" if self.final.exists() else "checkpoints"
            raise UserError(f"{self.root} already holds {what}: pass --resume to continue it, --overwrite to "
                            "start again, or choose another --out")
        if overwrite and self.is_main:
            shutil.rmtree(self.final, ignore_errors=True)
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            shutil.rmtree(self.root / "tensorboard", ignore_errors=True)
            self.metrics.unlink(missing_ok=True)
        if self.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (temporary folders are hidden and never match)."""
        return sorted(int(m.group(1)) for p in self.checkpoints.glob("step-*")
                      if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir())

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoints / f"step-{steps[-1]}" if steps else None

    def log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint we resume from), so no step appears twice."""
        if not self.is_main or not self.metrics.is_file():
            return
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(self.metrics, lambda p: p.write_text("".join(line + "\n" for line in kept)))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def save_checkpoint(run: RunDir, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, rank: int, world_size: int, barrier, keep: int, extra: dict | None = None,
                    tokenizer: Any = None) -> Path:
    """Everything needed to resume exactly at `step`: every rank writes its RNG state, rank 0 the rest."""
    tmp = run.checkpoints / f".step-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    barrier()
    final = run.checkpoints / f"step-{step}"
    if rank == 0:
        save_pretrained(model, tmp, tokenizer)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "world_size": world_size, **(extra or {})}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        _prune(run, keep)
    barrier()
    return final


def _prune(run: RunDir, keep: int) -> None:
    steps = run.checkpoint_steps()
    for step in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(run.checkpoints / f"step-{step}", ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    rank: int, world_size: int) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the trainer state (with `step`)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        weights, source = read_weights(path)
        load_hf_state_dict(model, weights, source)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    except (OSError, json.JSONDecodeError, RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{path}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
    rng_file = path / f"rng-{rank}.pt"
    if state.get("world_size") == world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
