"""How `mobilebert prepare` (and `pretrain`'s prepare-on-first-use) scale with the corpus: speed, disk and memory.

For each corpus size (plain text made of the built-in corpus's train documents, repeated), each in a fresh process:
the raw speed of the tokenizer (`tokenizers` `encode_batch` over the file's lines, on every core and on one), then
`mobilebert prepare` with 1 and 2 workers (wall time, MB/s, peak RSS of the main process and of the largest worker,
bytes on disk per token, and whether both wrote the same bytes), then `mobilebert pretrain --train.steps 2` on the
text file (it prepares into its cache first) for the smaller sizes. Prints tables, ratios and a projection for the
paper's corpus (BooksCorpus + English Wikipedia, ~18 GB of text), then one JSON line.

    python benchmarks/data_scale.py                                   # 20 80 320 MB in a temp dir
    python benchmarks/data_scale.py --sizes 2 4 --pretrain-max-mb 4   # a quick check
    python benchmarks/data_scale.py --work /data/scale --tokenizer google-vocab/ --workers-list 1 2 4

Peak RSS: a wrapper process runs the CLI in itself; the main process's is its ru_maxrss, a worker's its VmHWM in
/proc, polled every 0.1 s (a worker's ru_maxrss would be wrong: it is forked, then exec'd, and Linux keeps the
high-water mark across exec). One run per size and command: on a shared machine compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mobilebert.tables import format_table

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "configs" / "demo" / "teacher.yaml"
ENCODE = """
import sys, time, tokenizers
tok, spent = tokenizers.Tokenizer.from_file(sys.argv[2]), 0.0
with open(sys.argv[1], encoding="utf-8") as f:
    while lines := f.readlines(16_000_000):
        texts = [line.strip() for line in lines if line.strip()]
        began = time.perf_counter()
        tok.encode_batch(texts, add_special_tokens=False)
        spent += time.perf_counter() - began
print(spent)
"""
CLI = """
import json, os, resource, sys, threading, time
from pathlib import Path
from mobilebert.cli import main
workers = {}

def read(path):
    try:
        return Path(path).read_text()
    except OSError:  # the process ended
        return ""

def watch():  # the VmHWM (peak RSS since exec) of every descendant, every 0.1 s
    while True:
        parents = {int(p.parent.name): int(text.rsplit(")", 1)[1].split()[1])
                   for p in Path("/proc").glob("[0-9]*/stat") if (text := read(p))}
        tree = {os.getpid()}
        while new := {pid for pid, parent in parents.items() if parent in tree} - tree:
            tree |= new
        for pid in tree - {os.getpid()}:
            status = read(f"/proc/{pid}/status").splitlines()
            workers[pid] = max([workers.get(pid, 0), *(int(s.split()[1]) for s in status if s.startswith("VmHWM"))])
        time.sleep(0.1)

threading.Thread(target=watch, daemon=True).start()
began = time.perf_counter()
rc = main(sys.argv[2:])
seconds = time.perf_counter() - began
main_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "seconds": seconds, "main_mb": main_kb / 1024,
                                         "child_mb": max(workers.values(), default=0) / 1024}))
sys.exit(rc)
"""


def build_corpus(work: Path, size_mb: float) -> Path:
    """Paragraphs (a document's sentences joined by a space) separated by blank lines, repeated to `size_mb`."""
    path = work / f"corpus-{size_mb:g}mb.txt"
    target = int(size_mb * 1e6)
    if path.is_file() and abs(path.stat().st_size - target) <= 0.01 * target:
        return path
    from mobilebert.data.builtin_corpus import builtin_corpus

    block = "".join(" ".join(doc) + "\n\n" for doc in builtin_corpus("train")).encode("utf-8")
    with open(path, "wb") as f:
        written = 0
        while written < target:
            part = block[:block.rfind(b"\n\n", 0, target - written) + 2]  # the last copy ends at a paragraph
            if len(part) < 2:
                break
            f.write(part)
            written += len(part)
    return path


def tokenizer_dir(work: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        from mobilebert.data.builtin_corpus import builtin_corpus
        from mobilebert.tokenizer import Tokenizer

        Tokenizer.train(builtin_corpus("train"), vocab_size=30522).save_pretrained(folder)
    return folder


def raw_speed(corpus: Path, tok: Path, parallel: bool) -> float:
    """MB/s of `encode_batch` alone, on every core (tokenizers' default) or one."""
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    if not parallel:
        env["TOKENIZERS_PARALLELISM"] = "false"
    out = subprocess.run([sys.executable, "-c", ENCODE, str(corpus), str(tok / "tokenizer.json")], env=env,
                         check=True, capture_output=True, text=True).stdout
    return corpus.stat().st_size / 1e6 / float(out.split()[-1])


def run_cli(argv: list[str], scratch: Path) -> dict[str, Any]:
    """`mobilebert ARGV` in a fresh wrapper process: seconds, peak RSS of it and of its largest child (MB)."""
    report = scratch / "rusage.json"
    env = {**os.environ, "MOBILEBERT_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "-c", CLI, str(report), *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"mobilebert {' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {**json.loads(report.read_text()), "stdout": done.stdout.strip()}


def shards_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted((folder / "shards").glob("*/*.npy")):
        h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def prepare_run(corpus: Path, tok: Path, workers: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    argv = ["prepare", "--corpus", str(corpus), "--tokenizer", str(tok), "--workers", str(workers), "--out", str(out),
            "--data.max_seq_length", "128"] + (["--data.shard_mb", str(args.shard_mb)] if args.shard_mb else [])
    r = run_cli(argv, out.parent)
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["totals"]["train_tokens"] + manifest["totals"]["validation_tokens"]
    own = re.search(r"([\d.]+) MB/s over", r["stdout"])  # the command's own figure: prepare() alone, no start-up
    return {"workers": workers, "seconds": r["seconds"], "mb_s": float(own.group(1)) if own else float("nan"),
            "main_mb": r["main_mb"], "child_mb": r["child_mb"], "shards": len(manifest["shards"]), "tokens": tokens,
            "disk_bytes": manifest["disk_bytes"], "bytes_per_token": manifest["disk_bytes"] / tokens,
            "tokens_per_byte": tokens / manifest["text_bytes"], "digest": shards_digest(out)}


def pretrain_run(corpus: Path, tok: Path, out: Path) -> dict[str, Any]:
    r = run_cli(["pretrain", "--config", str(TEACHER), "--data.corpus", str(corpus), "--data.tokenizer", str(tok),
                 "--train.steps", "2", "--train.warmup_steps", "0", "--out", str(out)], out.parent)
    return {"seconds": r["seconds"], "peak_mb": max(r["main_mb"], r["child_mb"]), "main_mb": r["main_mb"],
            "child_mb": r["child_mb"]}


def measure(size_mb: float, tok: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    corpus = build_corpus(work, size_mb)
    result: dict[str, Any] = {"size_mb": corpus.stat().st_size / 1e6, "raw_all_mb_s": raw_speed(corpus, tok, True),
                              "raw_one_mb_s": raw_speed(corpus, tok, False), "prepare": []}
    outs = [work / f"prepared-{size_mb:g}mb-w{w}" for w in args.workers_list]
    for workers, out in zip(args.workers_list, outs, strict=True):
        shutil.rmtree(out, ignore_errors=True)
        result["prepare"].append(prepare_run(corpus, tok, workers, out, args))
    result["identical"] = len({p["digest"] for p in result["prepare"]}) == 1
    for p in result["prepare"]:
        p.update(vs_raw=p["mb_s"] / result["raw_all_mb_s"], vs_first=p["mb_s"] / result["prepare"][0]["mb_s"])
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    if size_mb <= args.pretrain_max_mb:
        run = work / f"pretrain-{size_mb:g}mb"
        shutil.rmtree(run, ignore_errors=True)
        result["pretrain"] = pretrain_run(corpus, tok, run)
        shutil.rmtree(run, ignore_errors=True)
    return result


def projection(results: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """The paper's corpus from the largest size: linear in cores at the measured per-worker speed."""
    big = results[-1]
    most = max(big["prepare"], key=lambda p: p["workers"])
    per_core = most["mb_s"] / most["workers"]
    tokens = args.paper_gb * 1e9 * big["prepare"][0]["tokens_per_byte"] * args.dupe_factor
    pooled = [p for r in results for p in r["prepare"] if p["workers"] > 1] or big["prepare"]
    main_mb, child_mb = max(p["main_mb"] for p in pooled), max(p["child_mb"] for p in pooled)
    return {"text_gb": args.paper_gb, "dupe_factor": args.dupe_factor, "per_core_mb_s": per_core,
            "tokens": tokens, "disk_gb": tokens * big["prepare"][0]["bytes_per_token"] / 1e9,
            "hours": {n: args.paper_gb * 1e3 / (per_core * n) / 3600 for n in args.project_cores},
            "ram_mb": {n: main_mb + n * child_mb for n in args.project_cores}}


def conditions() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            **{lib: version(lib) for lib in ("tokenizers", "torch", "numpy", "mobilebert")}}


def report(results: list[dict], proj: dict[str, Any], growth: float | None, env: dict[str, Any]) -> None:
    print(f"data scale: {env['cpu']}, {env['cores']} cores; Python {env['python']}, tokenizers {env['tokenizers']}, "
          f"torch {env['torch']}, numpy {env['numpy']}; max_seq_length 128, dupe_factor 1; one run each")
    print("\nraw tokenizer (encode_batch over lines, encode time only)")
    print(format_table(["MB", "all cores MB/s", "1 core MB/s"], [[f"{r['size_mb']:.3g}", f"{r['raw_all_mb_s']:.2f}",
                                                                f"{r['raw_one_mb_s']:.2f}"] for r in results]))
    print("\nmobilebert prepare (s: the process, start-up included; MB/s: the command's own, prepare() alone)")
    rows = [[f"{r['size_mb']:.3g}", p["workers"], f"{p['seconds']:.1f}", f"{p['mb_s']:.2f}", f"{p['vs_raw']:.2f}",
             f"{p['vs_first']:.2f}", f"{p['main_mb']:.0f}", f"{p['child_mb']:.0f}", p["shards"],
             f"{p['bytes_per_token']:.2f}", "yes" if r["identical"] else "no"] for r in results for p in r["prepare"]]
    print(format_table(["MB", "workers", "s", "MB/s", "÷ raw all", f"÷ {results[0]['prepare'][0]['workers']} worker",
                        "main RSS MB", "worker RSS MB", "shards", "disk B/token", "identical"], rows))
    pre = [r for r in results if "pretrain" in r]
    if pre:
        print("\nmobilebert pretrain --train.steps 2 (prepares into its cache first; peak RSS over the tree)")
        print(format_table(["MB", "s", "peak RSS MB", "main MB", "worker MB"], [
            [f"{r['size_mb']:.3g}", f"{t['seconds']:.1f}", f"{t['peak_mb']:.0f}", f"{t['main_mb']:.0f}",
             f"{t['child_mb']:.0f}"] for r in pre for t in [r["pretrain"]]]))
    if growth is not None:
        print(f"pretrain RSS growth: {growth:+.2f} MB per MB of text ({pre[0]['size_mb']:.3g} → "
              f"{pre[-1]['size_mb']:.3g} MB)")
    print(f"\nprojection, paper corpus ({proj['text_gb']:g} GB of text, dupe_factor {proj['dupe_factor']}; measured "
          f"at seq 128 and dupe 1, so time is a lower bound and disk per token an upper bound at seq 512): "
          f"{proj['tokens'] / 1e9:.1f} G tokens, {proj['disk_gb']:.0f} GB on disk")
    print(format_table(["cores", "hours", "RAM MB (main + cores × worker)"],
                       [[n, f"{proj['hours'][n]:.1f}", f"{proj['ram_mb'][n]:.0f}"] for n in proj["hours"]]))


def pretrain_growth(results: list[dict]) -> float | None:
    """MB of peak RSS per MB of text, between the smallest and the largest size pretrain ran on."""
    pre = [r for r in results if "pretrain" in r]
    if len(pre) < 2:
        return None
    return (pre[-1]["pretrain"]["peak_mb"] - pre[0]["pretrain"]["peak_mb"]) / (pre[-1]["size_mb"] - pre[0]["size_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[20, 80, 320], help="corpus sizes, MB")
    parser.add_argument("--work", help="folder for corpora and outputs (kept; corpora reused); default a temp dir")
    parser.add_argument("--tokenizer", help="tokenizer folder (tokenizer.json); default: train one of 30522")
    parser.add_argument("--workers-list", type=int, nargs="+", default=[1, 2], help="the first: ratios' base")
    parser.add_argument("--shard-mb", type=float, help="pass --data.shard_mb (default: prepare's own)")
    parser.add_argument("--pretrain-max-mb", type=float, default=80, help="run pretrain for sizes up to this")
    parser.add_argument("--paper-gb", type=float, default=18.0, help="text of BooksCorpus + Wikipedia, GB")
    parser.add_argument("--dupe-factor", type=int, default=5, help="the paper config's data.dupe_factor")
    parser.add_argument("--project-cores", type=int, nargs="+", default=[2, 16, 64], help="projected for")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="data_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        tok = tokenizer_dir(work, args.tokenizer)
        results = [measure(size, tok, work, args) for size in sorted(args.sizes)]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    proj, growth, env = projection(results, args), pretrain_growth(results), conditions()
    report(results, proj, growth, env)
    print(json.dumps({"benchmark": "data_scale", **env, "results": results, "pretrain_growth_mb_per_mb": growth,
                      "projection": proj}))


if __name__ == "__main__":
    main()
