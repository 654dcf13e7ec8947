"""Knowledge-transfer strategies as a plan of stages (docs/distillation.md; paper §3.5).

    AKT  one stage: every layer's transfer losses + pre-training distillation (PD), all parameters trained.
    JKT  stage 1: every layer's transfer losses together; stage 2: PD.
    PKT  stage 1: one phase per layer l, only layer l's losses; layer l at 3× the base rate, lower layers at 0.3×
         (or frozen), higher layers untouched and not even computed; stage 2: PD.

Rates follow the official TF1 code (`distill_util.layer_wise_learning_rate`, `get_background_lr`): within each
layer-wise phase every trained layer's rate is scaled by a background min(ramp over the first 10% of the phase,
0.9 + 0.1·(1 − t/S)^0.5), so it warms up and then decays to 0.9 by the end of the phase. For JKT and PKT the
student's embeddings and MLM/NSP heads are copied from the teacher and frozen during stage 1; the student's own
embedding norm (NoNorm and LayerNorm differ, so it is not copied) stays at its initial identity then too (the
official code gives everything outside the encoder layers rate 0), and trains from PD on.

Everything here is a pure function of the global step, so a run resumes exactly mid-phase.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import yaml
from torch import nn

from mobilebert.config import MobileBertConfig
from mobilebert.errors import UserError
from mobilebert.train.optim import lr_factor as schedule_factor

STRATEGIES = ("pkt", "jkt", "akt")
COPIED = -2  # group key of the parameters copied from the teacher (embedding tables, projection, heads)
EMBEDDING_NORM = -1  # the student's own embedding norm: frozen in stage 1 (official) or trained with layer 0


@dataclass(frozen=True)
class Rates:
    """Learning-rate multipliers of knowledge transfer, times train.lr. The defaults are the official code's."""

    current: float = 3.0  # the layer(s) being transferred
    lower: float = 0.3  # PKT: layers below the current one (official 3 × 0.1); 0 freezes them
    phase_warmup: float = 0.1  # warm-up over this fraction of each layer-wise phase
    phase_end_factor: float = 0.9  # ... then decay to this factor by the phase's end (1.0: flat)
    phase_decay_power: float = 0.5
    pd_warmup_steps: int = 30  # PD: warm-up, then linear decay to 0 over the stage
    freeze_embedding_norm: bool = True  # keep the student's embedding norm at its initial value in stage 1

    def __post_init__(self) -> None:
        if self.current < 0 or self.lower < 0:
            raise UserError(f"layer rates must be >= 0, got current {self.current}, lower {self.lower}")
        if not 0 <= self.phase_warmup <= 1:
            raise UserError(f"phase_warmup must lie in [0, 1], got {self.phase_warmup}")
        if not 0 <= self.phase_end_factor <= 1 or self.phase_decay_power <= 0:
            raise UserError(f"phase_end_factor must lie in [0, 1] and phase_decay_power be > 0, got "
                            f"{self.phase_end_factor} and {self.phase_decay_power}")


@dataclass(frozen=True)
class Stage:
    name: str  # "phase-3", "layerwise", "distillation" or "auxiliary"
    start: int  # first global step of the stage
    steps: int
    transfer_layers: tuple[int, ...]  # student layers whose feature-map / attention losses count
    run_layers: int | None  # student blocks computed (None: all)
    pd: bool  # pre-training distillation loss on
    current: tuple[int, ...]  # layers trained at the full (current-layer) rate
    lower: tuple[int, ...]  # layers trained at the lower rate (or frozen)
    copied_frozen: bool  # embeddings and heads frozen

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan(strategy: str, num_layers: int, layerwise_steps: int, pd_steps: int) -> list[Stage]:
    """The stages of `strategy` for a student of `num_layers` blocks. PKT splits `layerwise_steps` evenly."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    every = tuple(range(num_layers))
    if strategy == "akt":
        if layerwise_steps + pd_steps <= 0:
            raise UserError("akt needs steps: layerwise_steps + pd_steps must be positive")
        return [Stage("auxiliary", 0, layerwise_steps + pd_steps, every, None, True, every, (), False)]
    stages: list[Stage] = []
    if strategy == "jkt":
        stages.append(Stage("layerwise", 0, layerwise_steps, every, None, False, every, (), True))
    else:
        per_phase = layerwise_steps // num_layers
        if per_phase <= 0:
            raise UserError(f"pkt needs at least one step per layer: layerwise_steps {layerwise_steps} < "
                            f"{num_layers} layers")
        stages += [Stage(f"phase-{l}", l * per_phase, per_phase, (l,), l + 1, False, (l,), tuple(range(l)), True)
                   for l in range(num_layers)]
    start = stages[-1].end if stages else 0
    if pd_steps > 0:
        stages.append(Stage("distillation", start, pd_steps, (), None, True, every, (), False))
    return [s for s in stages if s.steps > 0]


def stage_at(stages: list[Stage], step: int) -> Stage:
    for stage in stages:
        if stage.start <= step < stage.end:
            return stage
    return stages[-1]


def group_key(name: str) -> int:
    """Which schedule a student parameter follows: its block index, EMBEDDING_NORM, or COPIED."""
    block = re.match(r"(?:mobilebert\.)?layers\.(\d+)\.", name)
    if block:
        return int(block.group(1))
    return EMBEDDING_NORM if ".embeddings.norm." in f".{name}" else COPIED


def phase_background(t: int, steps: int, rates: Rates) -> float:
    """The official per-phase background at 0-based step `t` of a `steps`-long phase: min(warm-up ramp,
    end + (1 − end)·(1 − t/steps)^power). The ramp is (t + 1)/warm-up steps, so the first step already moves (the
    official 10·t/S spends step 0 at rate 0)."""
    warmup = max(1, round(rates.phase_warmup * steps))
    ramp = min(1.0, (t + 1) / warmup)
    decay = rates.phase_end_factor + (1 - rates.phase_end_factor) * (1 - t / steps) ** rates.phase_decay_power
    return min(ramp, decay)


def _frozen_in_stage1(key: int, rates: Rates) -> bool:
    return key == COPIED or (key == EMBEDDING_NORM and rates.freeze_embedding_norm)


def lr_factor(stage: Stage, step: int, key: int, rates: Rates = Rates()) -> float:
    """Learning-rate multiplier of parameter group `key` at global `step` (0 means frozen this stage)."""
    if stage.pd:  # PD (and AKT): every parameter, warm-up then linear decay to zero over the stage
        return schedule_factor(step - stage.start, stage.steps, min(rates.pd_warmup_steps, stage.steps), "linear")
    if stage.copied_frozen and _frozen_in_stage1(key, rates):
        return 0.0
    layer = 0 if key == EMBEDDING_NORM else key
    background = phase_background(step - stage.start, stage.steps, rates)
    if layer in stage.current:
        return rates.current * background
    if layer in stage.lower:
        return rates.lower * background
    return 0.0


def set_trainable(student: nn.Module, stage: Stage, rates: Rates = Rates()) -> None:
    """Freeze what the stage does not train, so no gradient is computed for it."""
    for name, p in student.named_parameters():
        key = group_key(name)
        layer = 0 if key == EMBEDDING_NORM else key
        if stage.pd:
            p.requires_grad_(True)
        else:  # trained exactly where `lr_factor` gives a rate above 0
            frozen = stage.copied_frozen and _frozen_in_stage1(key, rates)
            p.requires_grad_(not frozen and (layer in stage.current or (layer in stage.lower and rates.lower > 0)))


def layer_groups(groups: list[dict]) -> list[dict]:
    """Split decay / no-decay optimizer groups further by schedule key (each group gets a `"key"`)."""
    out = []
    for group in groups:
        by_key: dict[int, tuple[list, list]] = {}
        for name, p in zip(group["names"], group["params"], strict=True):
            names, params = by_key.setdefault(group_key(name), ([], []))
            names.append(name)
            params.append(p)
        for key, (names, params) in sorted(by_key.items()):
            out.append({**group, "params": params, "names": names, "key": key})
    return out


def check_pair(teacher: MobileBertConfig, student: MobileBertConfig, layer_map: list[int],
               copy_from_teacher: bool) -> None:
    """Say exactly what stops layer-wise transfer between these two models, if anything."""
    problems = []
    if teacher.hidden_size != student.hidden_size:
        problems.append(f"block width (hidden_size) teacher {teacher.hidden_size} vs student {student.hidden_size}")
    if teacher.num_attention_heads != student.num_attention_heads:
        problems.append(f"attention heads teacher {teacher.num_attention_heads} vs student "
                        f"{student.num_attention_heads}")
    if len(layer_map) != student.num_hidden_layers or not all(0 <= t < teacher.num_hidden_layers for t in layer_map):
        problems.append(f"layer map {layer_map} does not send the student's {student.num_hidden_layers} layers to "
                        f"the teacher's {teacher.num_hidden_layers}")
    if copy_from_teacher:
        for field in ("vocab_size", "embedding_size", "trigram_input", "max_position_embeddings", "type_vocab_size"):
            if getattr(teacher, field) != getattr(student, field):
                problems.append(f"{field} teacher {getattr(teacher, field)} vs student {getattr(student, field)} "
                                "(embeddings and heads are copied)")
    if problems:
        raise UserError("teacher and student do not match for layer-wise transfer: " + "; ".join(problems))


def build_layer_map(spec: str | list[int], teacher_layers: int, student_layers: int) -> list[int]:
    """Student layer i → teacher layer: "same" (equal depths), "uniform" (evenly spread), or an explicit list
    (also as the text of one, e.g. `--distill.layer_map '[1, 3, 5]'` on the command line)."""
    if isinstance(spec, str) and spec.strip().startswith("["):
        try:
            spec = [int(t) for t in yaml.safe_load(spec)]
        except (yaml.YAMLError, TypeError, ValueError):
            raise UserError(f"distill.layer_map: {spec!r} is not a list of teacher layers") from None
    if isinstance(spec, list):
        return [int(t) for t in spec]
    if spec == "same":
        if teacher_layers != student_layers:
            raise UserError(f"teacher has {teacher_layers} layers and student {student_layers}: set "
                            "distill.layer_map to 'uniform' or to a list")
        return list(range(student_layers))
    if spec == "uniform":
        return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]
    raise UserError(f"distill.layer_map must be 'same', 'uniform' or a list of teacher layers, got {spec!r}")


@torch.no_grad()
def copy_embeddings_and_heads(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Copy the teacher's embedding tables, trigram projection, MLM and NSP heads (and pooler when both have
    one) into the student; returns the parameter names copied. The embedding norm is left alone."""
    source = dict(teacher.named_parameters())
    copied = []
    for name, p in student.named_parameters():
        if group_key(name) == COPIED and name in source and source[name].shape == p.shape:
            p.copy_(source[name])
            copied.append(name)
    return copied
