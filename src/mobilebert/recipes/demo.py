"""`mobilebert demo`: the whole MobileBERT pipeline on the built-in corpus, ending in a report.

built-in corpus → tokenizer → IB-BERT-shaped teacher (pre-training) → PKT knowledge transfer and pre-training
distillation → a student of the same shape trained from scratch for the same steps (the baseline) → fine-tuning
of teacher, distilled and undistilled students on the built-in tasks → int8 quantization and ONNX export of the
distilled student's task models → benchmark → report.md / report.html with plots.

Each stage writes into its own folder under --out and a `stage.json` when it is finished; a finished stage is
skipped, an interrupted one resumes from its last checkpoint. `--quick` runs the same pipeline at toy size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mobilebert.data.builtin_tasks import BUILTIN_TASKS, BuiltinSizes, write_builtin_tasks
from mobilebert.errors import UserError
from mobilebert.files import atomic_write, read_json


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of every stage: the full demo (under 20 minutes on 2 AMD EPYC cores, docs/finetuning.md) or `--quick`
    (about a minute)."""

    teacher_steps: int = 800  # configs/demo/teacher.yaml has 1200: a third less, for the time budget on AMD
    # PKT splits the layer-wise steps over the 6 layers. At 300 (+ 300 PD) the distilled student's builtin-qa EM
    # ranged 50.5-90 over seeds; at 600 (+ 150 PD) 71-91, or 91-94 with 16,000 questions (docs/distillation.md).
    # A PD step costs about 1.7 layer-wise steps: 150 of them keep the student's stage at its former length.
    layerwise_steps: int = 600
    pd_steps: int = 150
    max_seq_length: int = 64
    task_train: int = 2000
    task_dev: int = 400
    # builtin-qa's training questions (the built-in default: 8 x task_train). 12,000 instead of 16,000 cut the demo's
    # wall clock by about 150 s on 2 AMD cores; the distilled student's EM 93.0 -> 88.25 (docs/finetuning.md).
    qa_train: int | None = 12000
    epochs: float = 1.5  # the classification and regression tasks
    qa_epochs: float | None = None  # builtin-qa: its family's default (batch 8 x 1 epoch)
    # Task distillation (`demo --task-kd`: builtin-qa, where the teacher led the student by far; on the others it
    # moved scores by about 0.01): with the teacher's forward in every step it costs a QA fine-tuning and a half,
    # which the 20-minute budget on 2 AMD cores cannot take (docs/finetuning.md).
    kd_tasks: tuple[str, ...] = ()
    bench_preset: str = "mobilebert"
    bench_repetitions: int = 10
    # A few backends show what deployment buys; every backend's table is `mobilebert bench` (minutes, not seconds).
    bench_backends: tuple[str, ...] = ("eager", "optimized", "onnx", "onnx-int8", "hf-mobilebert")
    bench_memory: bool = False  # the peak-memory column: one fresh process per backend
    teacher_preset: str = "ib-bert-demo"
    student_preset: str = "mobilebert-demo"
    vocab_size: int = 8192
    max_documents: int | None = None  # of the corpus: all
    log_every: int = 10
    # Of every training run (initialisation, batch order, masking, dropout) and fine-tuning trial; the corpus, its
    # masked pairs and the built-in tasks stay the same, so two seeds differ only in how the models were trained.
    seed: int = 0


QUICK = DemoPlan(teacher_steps=30, layerwise_steps=24, pd_steps=12, max_seq_length=32, task_train=96, task_dev=48,
                 qa_train=96, epochs=1.0, qa_epochs=1.0, bench_preset="mobilebert-test", bench_repetitions=2,
                 bench_backends=("eager", "optimized", "onnx-int8"),
                 teacher_preset="ib-bert-demo", vocab_size=1000, max_documents=300, log_every=1)

MODELS = ("teacher", "student", "scratch")  # pre-trained: the teacher, the distilled and the undistilled student
# Fine-tuned: each pre-trained model, and the distilled student again with task distillation from the fine-tuned
# teacher (`finetune --teacher`).
FINETUNED = (*MODELS, "student-kd")


def run_stage(out: Path, name: str, work: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
    """Run `work(folder)` unless its stage.json says it finished; record how long it took."""
    folder = out / name
    marker = folder / "stage.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        print(f"[{name}] done earlier ({record['seconds']:.0f}s): skipped")
        return record
    print(f"[{name}] running")
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    result = work(folder) or {}
    record = {"stage": name, "seconds": time.perf_counter() - began, **result}
    atomic_write(marker, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    print(f"[{name}] finished in {record['seconds']:.0f}s")
    return record


def run_stages(out: Path, stages: list[tuple[str, Callable[[Path], dict[str, Any] | None]]],
               workers: int, after: dict[str, str | tuple[str, ...]] | None = None) -> dict[str, dict[str, Any]]:
    """Run stages `workers` at a time, each in its own process with its share of the CPU threads.

    Small models use two cores poorly (many small operations): two one-thread processes do about 1.7× the work of
    one two-thread process (measured on 2 cores). `after` maps a stage to the stage or stages that must finish
    first; whenever a worker is free it takes the first stage in list order that is ready, so no worker idles while
    another runs a long stage (list first what others wait for, then the longest). `work` must be picklable (a
    functools.partial of a module-level function). Unfinished stages run first; then every stage's record is read
    back in order."""
    after = after or {}
    pending = [(name, work) for name, work in stages if not (out / name / "stage.json").is_file()]

    def ready(name: str) -> bool:
        needs = after.get(name, ())
        return all((out / need / "stage.json").is_file() for need in ((needs,) if isinstance(needs, str) else needs))

    def waiting_forever() -> RuntimeError:
        return RuntimeError(f"stages wait for stages that never run: {', '.join(n for n, _ in pending)}")

    if workers == 1 or len(pending) < 2:
        while pending:
            name, work = next((item for item in pending if ready(item[0])), (None, None))
            if name is None:
                raise waiting_forever()
            pending.remove((name, work))
            run_stage(out, name, work)
    else:
        threads = max(1, torch_threads() // workers)
        print(f"[{', '.join(n for n, _ in pending)}] running, {workers} at a time ({threads} thread(s) each)")
        context = multiprocessing.get_context("spawn")  # fork after OpenMP has started can hang the children
        with ProcessPoolExecutor(min(workers, len(pending)), mp_context=context) as pool:
            running: dict[Future, str] = {}
            while pending or running:
                for item in [i for i in pending if ready(i[0])][:max(0, workers - len(running))]:
                    pending.remove(item)
                    running[pool.submit(_stage_process, out, item[0], item[1], threads)] = item[0]
                if not running:
                    raise waiting_forever()
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    del running[future]
                    future.result()  # re-raises a stage's failure here
    return {name: run_stage(out, name, work) for name, work in stages}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _stage_process(out: Path, name: str, work: Callable[[Path], dict[str, Any] | None], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["MOBILEBERT_PROGRESS"] = "0"  # one process's progress bar at a time is readable, two are not
    run_stage(out, name, work)


def _run(command: str, out: Path, config: str | None, overrides: list[str], **options: str) -> None:
    """Run `mobilebert COMMAND` in this process, as a user would type it: `--resume`, so that a stage killed
    midway continues from its last checkpoint."""
    from mobilebert.cli import main

    argv = [command, "--out", str(out), "--resume", *(["--config", config] if config else [])]
    for name, value in options.items():
        argv += [f"--{name}", value]
    code = main([*argv, *overrides])
    if code == 130:  # interrupted: the demo is too
        raise KeyboardInterrupt
    if code != 0:
        raise UserError(f"the demo stopped: `mobilebert {command}` for {out} failed (its error is printed above); "
                        "fix it and run the same command again to resume")


def _config(name: str) -> str | None:
    """A shipped demo config: found beside the package in a checkout (configs/demo/)."""
    path = Path(__file__).resolve().parents[3] / "configs" / "demo" / name
    return str(path) if path.is_file() else None


def _data_overrides(plan: DemoPlan, cache: Path) -> list[str]:
    limit = ["--data.max_documents", str(plan.max_documents)] if plan.max_documents else []
    return ["--data.max_seq_length", str(plan.max_seq_length), "--data.cache_dir", str(cache),
            "--train.tensorboard", "false", "--train.log_every", str(plan.log_every), "--train.seed", str(plan.seed),
            *limit]


def data_work(plan: DemoPlan, folder: Path) -> dict:
    """The built-in corpus prepared once (tokenizer, masked pairs) for the teacher, the students and the baseline."""
    limit = ["--data.max_documents", str(plan.max_documents)] if plan.max_documents else []
    _run("prepare", folder / "prepared", _config("teacher.yaml"), [
        "--data.vocab_size", str(plan.vocab_size), "--data.max_seq_length", str(plan.max_seq_length), *limit])
    return {"data": str(folder / "prepared")}


def teacher_work(plan: DemoPlan, out: Path, data: str, folder: Path) -> dict:
    """Pre-train the teacher on the prepared folder `data` (`data_work`)."""
    _run("pretrain", folder, _config("teacher.yaml"), [
        "--model.preset", plan.teacher_preset, "--train.steps", str(plan.teacher_steps),
        "--train.warmup_steps", str(min(50, plan.teacher_steps // 10)),
        "--train.eval_every", str(max(plan.teacher_steps // 4, 1)), *_data_overrides(plan, out / "cache"),
        "--data.prepared", data])
    return {"model": str(folder / "final")}


def student_work(plan: DemoPlan, teacher: str, cache: Path, folder: Path, strategy: str = "pkt") -> dict:
    """Knowledge transfer from `teacher` (layer-wise with `strategy`), then pre-training distillation."""
    _run("distill", folder, _config(f"distill-{strategy}.yaml"), [
        "--distill.layerwise_steps", str(plan.layerwise_steps), "--distill.pd_steps", str(plan.pd_steps),
        "--distill.pd_warmup_steps", str(max(plan.pd_steps // 10, 1)), "--train.eval_every",
        str(plan.layerwise_steps + plan.pd_steps), *_data_overrides(plan, cache)],
         teacher=teacher, student=plan.student_preset, strategy=strategy)
    return {"model": str(folder / "final")}


def scratch_work(plan: DemoPlan, teacher: str, cache: Path, folder: Path, data: str | None = None) -> dict:
    """The baseline: the student's shape trained with plain MLM + NSP for as many steps as the distillation (on
    the teacher's prepared folder `data`, or with the teacher's tokenizer)."""
    steps = plan.layerwise_steps + plan.pd_steps
    source = ["--data.prepared", data] if data else ["--data.tokenizer", teacher]
    _run("pretrain", folder, _config("teacher.yaml"), [
        "--model.preset", plan.student_preset, "--train.steps", str(steps), "--train.warmup_steps",
        str(min(50, steps // 10)), "--train.eval_every", str(steps), *_data_overrides(plan, cache), *source])
    return {"model": str(folder / "final")}


def finetune_work(plan: DemoPlan, checkpoint: str, tasks: Path, task: str, folder: Path,
                  extra: tuple[str, ...] = ()) -> dict:
    """Fine-tune one pre-trained model on one built-in task (its files written beforehand under `tasks`)."""
    # Sequences no longer than in pre-training, whose later positions were never trained (and half the cost of
    # GLUE's 128). QA: the question is short, the rest of the window is context; its family's batch and epochs
    # unless the plan sets the epochs. The others: the plan's epochs.
    length = ("--task.max_seq_length", str(plan.max_seq_length))
    if BUILTIN_TASKS[task].format == "squad":
        epochs = ("--search.epochs", f"[{plan.qa_epochs}]") if plan.qa_epochs else ()
        extra = (*length, "--task.doc_stride", str(plan.max_seq_length // 2), "--task.max_query_length",
                 str(plan.max_seq_length // 2), *epochs, *extra)
    else:
        extra = (*length, "--search.epochs", f"[{plan.epochs}]", *extra)
    _run("finetune", folder, None, ["--task.data_dir", str(tasks / task), "--train.tensorboard", "false",
                                     "--search.seeds", f"[{plan.seed}]", *extra], checkpoint=checkpoint, task=task)
    summary = json.loads((folder / "results.json").read_text())
    return {"metrics": summary["best"]["metrics"], "baseline": summary["baseline"],
            "main_metric": summary["main_metric"]}


def finetune_stages(plan: DemoPlan, out: Path, tasks: Path, models: Sequence[str]
                    ) -> list[tuple[str, Callable[[Path], dict]]]:
    """One stage per (model, task), every model's QA first: the longest runs start early, so two workers end
    together."""
    order = sorted(BUILTIN_TASKS, key=lambda t: BUILTIN_TASKS[t].format != "squad")
    stages = []
    for task in order:
        for model in models:
            if model.endswith("-kd") and task not in plan.kd_tasks:
                continue
            pretrained = str(out / model.removesuffix("-kd") / "final")
            kd = ("--teacher", str(out / "finetune-teacher" / task / "final")) if model.endswith("-kd") else ()
            stages.append((f"finetune-{model}/{task}", partial(finetune_work, plan, pretrained, tasks, task, extra=kd)))
    return stages


def collect_finetuning(records: dict[str, dict[str, Any]], model: str) -> Callable[[Path], dict]:
    """The per-model stage record: its tasks' results (each task ran as its own stage)."""
    def work(folder: Path) -> dict:
        ran = [task for task in BUILTIN_TASKS if f"finetune-{model}/{task}" in records]
        tasks = {task: {k: records[f"finetune-{model}/{task}"][k] for k in ("metrics", "baseline", "main_metric")}
                 for task in ran}
        return {"tasks": tasks, "task_seconds": sum(records[f"finetune-{model}/{t}"]["seconds"] for t in ran)}

    return work


def check_plan(out: Path, plan: DemoPlan, resuming: bool) -> None:
    """Record the plan in OUT/plan.json, or refuse to resume a run that was made with another plan: its finished
    stages would be skipped and their results reported as this plan's. `kd_tasks` only adds stages, so it may
    differ. A field that a plan.json lacks was added later: that run was made with the field's default."""
    def as_json(p: DemoPlan) -> dict[str, Any]:  # as plan.json holds it (tuples as lists)
        return json.loads(json.dumps(asdict(p)))

    recorded = {k: v for k, v in as_json(plan).items() if k != "kd_tasks"}
    path = out / "plan.json"
    if path.is_file():
        earlier = read_json(path, hint=": give another --out or delete that folder")
        defaults = as_json(DemoPlan())
        earlier = {**{k: defaults[k] for k in recorded if k not in earlier}, **earlier}
        keys = [*recorded, *(k for k in earlier if k not in recorded)]  # in the plan's order
        differ = [k for k in keys if earlier.get(k) != recorded.get(k)]
        if differ:
            shown = "; ".join(f"{k}: {earlier.get(k)} in it, {recorded.get(k)} now" for k in differ[:3])
            raise UserError(f"{out} holds a demo run made with another plan ({shown}): give another --out or "
                            "delete that folder")
        return
    if resuming:
        print(f"warning: {out} has finished stages from a version that did not record its plan: they are reused "
              "as they are (delete the folder to start again)")
    elif any(out.iterdir()):
        raise UserError(f"{out}: exists and is not a demo folder (no plan.json); choose another --out")
    atomic_write(path, lambda p: p.write_text(json.dumps(recorded, indent=2) + "\n"))


def main(args: argparse.Namespace) -> int:
    from mobilebert.recipes.demo_report import bench_stage, deploy_stage, write_report

    plan = QUICK if args.quick else DemoPlan()
    if getattr(args, "task_kd", False):
        plan = dataclasses.replace(plan, kd_tasks=("builtin-qa",))
    plan = dataclasses.replace(plan, seed=getattr(args, "seed", 0))
    models = (*MODELS, "student-kd") if plan.kd_tasks else MODELS
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    workers = max(1, getattr(args, "workers", 2))
    skipped = len(list(out.glob("*/stage.json")))  # finished before this invocation
    check_plan(out, plan, resuming=skipped > 0)
    records: dict[str, Any] = {"plan": asdict(plan)}
    records["data"] = run_stage(out, "data", partial(data_work, plan))
    data, teacher, cache = records["data"]["data"], str(out / "teacher" / "final"), out / "cache"
    tasks = write_builtin_tasks(out / "tasks", BuiltinSizes(plan.task_train, plan.task_dev, qa_train=plan.qa_train))
    # One schedule, each stage as soon as what it needs is done: the baseline (which needs only the data) and its
    # fine-tuning run beside the teacher; the distilled student takes the first worker the teacher frees (it is on
    # the longest path); task distillation waits for the student and its fine-tuned teacher.
    pretrained = [("teacher", partial(teacher_work, plan, out, data)),
                  ("scratch", partial(scratch_work, plan, teacher, cache, data=data)),
                  ("student", partial(student_work, plan, teacher, cache))]
    after: dict[str, str | tuple[str, ...]] = {"student": "teacher"}
    for task in BUILTIN_TASKS:
        after.update({f"finetune-{model}/{task}": model for model in MODELS})
    after.update({f"finetune-student-kd/{task}": ("student", f"finetune-teacher/{task}") for task in plan.kd_tasks})
    done = run_stages(out, [*pretrained, *finetune_stages(plan, out, tasks, models)], workers, after)
    records.update({name: done[name] for name, _ in pretrained})
    for model in models:
        records[f"finetune-{model}"] = run_stage(out, f"finetune-{model}", collect_finetuning(done, model))
    records["deploy"] = run_stage(out, "deploy", deploy_stage(plan, out))
    records["bench"] = run_stage(out, "bench", bench_stage(plan, out))
    records["run"] = {"seconds": time.perf_counter() - began, "workers": workers, "skipped": skipped}
    report = write_report(out, records)
    print(f"\ndone in {time.perf_counter() - began:.0f}s; report: {report}")
    return 0
