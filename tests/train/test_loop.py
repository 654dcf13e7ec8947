"""The training engine's progress bar."""

from __future__ import annotations

import io

import torch
from tqdm import tqdm

import mobilebert as mb
from mobilebert.train import loop
from mobilebert.train.loop import Distributed, Engine, TrainOptions
from mobilebert.train.rundir import RunDir


def test_the_finished_progress_bar_is_drawn_once(tmp_path, monkeypatch):
    """Every update redraws (no rate limit here): the last step's update and `close` used to draw the finished bar
    twice, two lines in a log file."""
    stream = io.StringIO()
    monkeypatch.setattr(loop, "_progress", lambda total, start, enabled: tqdm(
        total=total, initial=start, desc="train", file=stream, mininterval=0, miniters=1))
    model = mb.MobileBertForPreTraining(mb.preset("mobilebert-test"))
    run = RunDir(tmp_path / "run")
    run.prepare(resume=False, overwrite=False)
    engine = Engine(model, TrainOptions(steps=3, tensorboard=False), run, Distributed())
    batch = {"input_ids": torch.randint(5, 99, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    for _ in engine.steps():
        engine.step([batch], lambda b: {"x": 1},
                    lambda m, b: {"x": m(b["input_ids"], b["attention_mask"]).prediction_logits.pow(2).mean()})
    drawn = stream.getvalue()
    assert drawn.count("2/3") == 1 and drawn.count("3/3") == 1, drawn
