"""The training engine every recipe shares: optimizer, schedule, accumulation, precision, DDP, checkpoints, logs.

A recipe owns the algorithm; the engine owns the bookkeeping:

    engine = Engine(model, options.train, run, dist)
    for step in engine.steps():                       # resumes, checkpoints, evaluates, shows progress
        engine.step(micro_batches(step), count_fn, loss_fn)

Losses are normalised over the *global* batch: `count_fn(micro_batch)` gives each loss term's number of items
(masked tokens, sequences) before any forward pass, the counts are summed over micro-batches and processes, and
`loss_fn(model, micro_batch)` returns per-term *sums*. So a 2-process run takes exactly the steps of a
1-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from mobilebert.errors import UserError
from mobilebert.train.optim import (
    build_optimizer,
    build_scheduler,
    check_optimizer,
    clip_grad_norm,
    parameter_groups,
)
from mobilebert.train.rundir import RunDir, load_checkpoint, save_checkpoint

Batch = dict[str, torch.Tensor]


@dataclass
class TrainOptions:
    """How to train, shared by pre-training, distillation and fine-tuning."""

    steps: int = 1000
    batch_size: int = 32  # global: summed over processes and accumulation
    micro_batch_size: int | None = None  # per process and forward pass; None: the whole per-process share
    optimizer: str = "lamb"
    lr: float = 1e-3
    warmup_steps: int = 0
    decay: str = "linear"  # linear | polynomial | cosine | constant
    decay_power: float = 1.0
    end_factor: float = 0.0
    weight_decay: float = 0.01  # not on biases and norms
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    bias_correction: bool = True  # LAMB's Adam bias correction; the official MobileBERT/BERT code has none (false)
    clip_grad_norm: float = 1.0  # 0 disables
    precision: str = "fp32"  # fp32 | bf16 (autocast); fp16 overflows on MobileBERT
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.precision == "fp16":
            raise UserError("precision fp16 is refused: MobileBERT activations reach 1e8 and overflow fp16 "
                            "(NaN losses); use bf16 or fp32")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"precision must be fp32 or bf16, got {self.precision!r}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        check_optimizer(self.optimizer, self.bias_correction)  # before any run folder or data


@dataclass
class Distributed:
    """This process's place in a `torchrun` job (a single process when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tdist.all_reduce(t)
        return t


def setup_distributed(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes in the environment: gloo on CPU, nccl on GPUs."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Distributed(rank, world_size, local_rank, torch.device("cuda", local_rank) if use_cuda else
                       torch.device("cpu"))


def open_run(out: str, resume: bool, overwrite: bool, device: str) -> tuple[Distributed, RunDir] | None:
    """Join the process group and claim the run folder; None when --resume finds the run already finished."""
    dist = setup_distributed(device)
    run = RunDir(out, dist.is_main)
    run.prepare(resume=resume, overwrite=overwrite)
    if run.final.exists() and resume:
        if dist.is_main:
            print(f"{run.final} is already complete; nothing to do")
        return None
    return dist, run


def micro_batches(batch: Batch, size: int | None) -> list[Batch]:
    """Split a per-process batch into micro-batches of at most `size` rows (gradient accumulation)."""
    n = len(next(iter(batch.values())))
    size = size or n
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


class Engine:
    def __init__(self, model: nn.Module, options: TrainOptions, run: RunDir, dist: Distributed,
                 groups: list[dict] | None = None, evaluate: Callable[[], dict[str, float]] | None = None,
                 tokenizer: Any = None, lr_lambda: Callable[[int, dict], float] | None = None,
                 partial_graph: bool = False, dropout: bool = True) -> None:
        """`groups`: optimizer parameter groups (default: decay / no-decay). `lr_lambda(step, group)`: a
        per-group learning-rate factor replacing the options' schedule. `partial_graph`: some parameters get no
        gradient in some steps (frozen or not computed), which DDP must be told. `dropout=False` trains with the
        model in eval mode (no dropout; MobileBERT has no other train/eval difference)."""
        self.options, self.run, self.dist, self.tokenizer = options, run, dist, tokenizer
        self.dropout = dropout
        self.model = model.to(dist.device)
        self.ddp = nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=partial_graph) \
            if dist.world_size > 1 else None
        groups = groups if groups is not None else parameter_groups(self.model, options.weight_decay)
        self.optimizer = build_optimizer(options.optimizer, groups, lr=options.lr,
                                         betas=(options.beta1, options.beta2), eps=options.eps,
                                         bias_correction=options.bias_correction)
        if lr_lambda is None:
            self.scheduler = build_scheduler(self.optimizer, options.steps, options.warmup_steps, options.decay,
                                             options.decay_power, options.end_factor)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, [functools.partial(lr_lambda, group=g) for g in self.optimizer.param_groups])
        self.evaluate = evaluate
        self.step_index = 0
        self._data_wait: float | None = None  # seconds the last step waited for its batch (see `batches`)
        self.last: dict[str, float] = {}
        self.last_evaluation: dict[str, float] = {}  # the newest evaluate() results (main process)
        self._tb = _tensorboard(run) if options.tensorboard and dist.is_main else None

    @property
    def trained(self) -> nn.Module:
        """The module to call in a step: the DDP wrapper when distributed (it syncs gradients)."""
        return self.ddp or self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.options.precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the step to continue from."""
        latest = self.run.latest_checkpoint()
        if latest is None:
            return 0
        state = load_checkpoint(latest, self.model, self.optimizer, self.scheduler, self.dist.rank,
                                self.dist.world_size)
        self.run.truncate_metrics(state["step"])
        return state["step"]

    def steps(self, resume: bool = False) -> Iterator[int]:
        """Yield step indices from the resume point; after each, log, evaluate and checkpoint as configured."""
        torch.manual_seed(self.options.seed + self.dist.rank)
        start = self.resume() if resume else 0
        bar = _progress(self.options.steps, start, self.dist.is_main)
        for step in range(start, self.options.steps):
            self.step_index = step
            began = time.perf_counter()
            yield step
            done = step + 1
            self.last["step_time"] = time.perf_counter() - began
            self.last["tokens_per_s"] = self.last.get("tokens", 0) / self.last["step_time"]
            if self._data_wait is not None:
                self.last["data_wait_s"] = self._data_wait
            if done % self.options.log_every == 0 or done == self.options.steps:
                self._log(done)
            if self.options.eval_every and done % self.options.eval_every == 0 and done != self.options.steps:
                self.run_evaluation(done)
            if done % self.options.checkpoint_every == 0 or done == self.options.steps:
                self.checkpoint(done)
            if bar is not None:
                postfix = {"loss": f"{self.last['loss']:.4f}", "tok_s": f"{self.last['tokens_per_s']:.0f}"}
                bar.set_postfix(postfix, refresh=False)  # redraw at the bar's own pace
                if done < self.options.steps:
                    bar.update(1)
                else:  # the last step: `close` draws the finished bar, once (an update would draw it too)
                    bar.n = done
        if bar is not None:
            bar.close()
        self.run_evaluation(self.options.steps)

    def batches(self, stream: Callable[[int], Iterator[Batch]], resume: bool = False) -> Iterator[tuple[int, Batch]]:
        """`steps`, each with its batch from `stream(first step)`; the time spent waiting for each batch is logged
        as `data_wait_s` (near 0 when background loader workers keep up)."""
        batches = None
        for step in self.steps(resume=resume):
            if batches is None:
                batches = stream(step)
            began = time.perf_counter()
            batch = next(batches)
            self._data_wait = time.perf_counter() - began
            yield step, batch

    def step(self, micro: list[Batch], count_fn: Callable[[Batch], dict[str, int]],
             loss_fn: Callable[[nn.Module, Batch], dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over this process's micro-batches; returns the global mean of every loss term."""
        self.model.train(self.dropout)
        counts = self._global_counts(micro, count_fn)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
            sync = self.ddp is None or i == len(micro) - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self.autocast():
                terms = loss_fn(self.trained, batch)
                # Scale by the world size: DDP averages gradients over processes, we want the global sum / count.
                loss = sum(terms[k] / max(counts[k], 1) for k in terms) * self.dist.world_size
            loss.backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        grad_norm = clip_grad_norm(self.model.parameters(), self.options.clip_grad_norm or math.inf)
        means = self._global_means(sums, counts)
        if not all(math.isfinite(v) for v in means.values()) or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            latest = self.run.latest_checkpoint()
            raise TrainingDiverged(f"non-finite loss or gradient at step {self.step_index + 1} ({means}); "
                                   f"last good checkpoint: {latest or 'none'}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last = {"loss": sum(means.values()), **means, "lr": max(g["lr"] for g in self.optimizer.param_groups),
                     "grad_norm": grad_norm, "tokens": counts.get("tokens", 0)}
        return means

    def reset_optimizer_state(self) -> None:
        """Forget every parameter's optimizer state (moments, step counts), as a new run would start with."""
        self.optimizer.state.clear()

    def _global_counts(self, micro: list[Batch], count_fn) -> dict[str, int]:
        local: dict[str, int] = {}
        for batch in micro:
            for k, v in count_fn(batch).items():
                local[k] = local.get(k, 0) + int(v)
        local["tokens"] = sum(int(b["attention_mask"].sum()) for b in micro if "attention_mask" in b)
        keys = sorted(local)
        # On the process's device: nccl reduces CUDA tensors only.
        total = self.dist.all_reduce(torch.tensor([local[k] for k in keys], dtype=torch.float64,
                                                  device=self.dist.device))
        return {k: int(v) for k, v in zip(keys, total.tolist(), strict=True)}

    def _global_means(self, sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
        keys = sorted(sums)
        total = self.dist.all_reduce(torch.stack([sums[k].to(self.dist.device) for k in keys]).double())
        return {k: v / max(counts[k], 1) for k, v in zip(keys, total.tolist(), strict=True)}

    def _log(self, step: int) -> None:
        record = {"step": step, **{k: v for k, v in self.last.items() if k != "tokens"}}
        self.run.log(record)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(f"train/{k}", v, step)

    def run_evaluation(self, step: int) -> dict[str, float]:
        """Evaluate on the main process (others wait), log under split=validation."""
        results: dict[str, float] = {}
        if self.evaluate is not None and self.dist.is_main:
            self.model.eval()
            with torch.no_grad(), self.autocast():
                results = self.evaluate()
            self.last_evaluation = results
            self.run.log({"step": step, "split": "validation", **results})
            if self._tb is not None:
                for k, v in results.items():
                    self._tb.add_scalar(f"validation/{k}", v, step)
        self.dist.barrier()
        return results

    def checkpoint(self, step: int) -> None:
        save_checkpoint(self.run, step, self.model, self.optimizer, self.scheduler, self.dist.rank,
                        self.dist.world_size, self.dist.barrier, self.options.keep_checkpoints,
                        tokenizer=self.tokenizer)

    def finish(self) -> None:
        """Write OUT/final (transformers format + tokenizer) from the main process."""
        if self.dist.is_main:
            tmp = self.run.root / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, self.tokenizer)
            shutil.rmtree(self.run.final, ignore_errors=True)
            tmp.replace(self.run.final)
        if self._tb is not None:
            self._tb.close()
        self.dist.barrier()


def _progress(total: int, start: int, enabled: bool):
    if not enabled or os.environ.get("MOBILEBERT_PROGRESS") == "0":  # e.g. in `mobilebert demo`'s side-by-side runs
        return None
    from tqdm.auto import tqdm

    # In a log file (not a terminal) redraw rarely: every redraw is a new line there.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=interval)


def _tensorboard(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.jsonl always has everything
        return None
    return SummaryWriter(log_dir=str(run.root / "tensorboard"))
