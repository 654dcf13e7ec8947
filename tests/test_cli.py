"""The `mobilebert` command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mobilebert.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mobilebert", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "presets" in result.stdout and "demo" in result.stdout


def test_presets_prints_the_spec_sizes():
    result = run("presets")
    assert result.returncode == 0, result.stderr
    assert "24.58M" in result.stdout and "15.49M" in result.stdout and "294.47M" in result.stdout
    assert "5.39G" in result.stdout


def test_user_errors_are_one_line_without_traceback():
    result = run("presets", "--seq-len", "abc")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_warnings_are_one_line_without_library_source():
    code = ("import warnings; from mobilebert.cli import main; main(['presets']); "
            "warnings.warn('data.tsv: skipped 2 malformed row(s)', stacklevel=1)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "warning: data.tsv: skipped 2 malformed row(s) (UserWarning)\n"


@pytest.mark.parametrize("argv, flag, value", [
    (["predict", "model", "--batch-size", "0", "a"], "--batch-size", "0"),
    (["predict", "model", "--threads", "-1", "a"], "--threads", "-1"),
    (["evaluate", "model", "--task", "rte", "--max-examples", "-1"], "--max-examples", "-1"),
    (["evaluate", "model", "--task", "rte", "--batch-size", "0"], "--batch-size", "0"),
    (["bench", "--seq", "128", "0"], "--seq", "0"),
    (["bench", "--repetitions", "0"], "--repetitions", "0"),
    (["bench", "--threads", "0"], "--threads", "0"),
    (["demo", "--workers", "0"], "--workers", "0"),
])
def test_counts_and_sizes_below_one_are_refused_before_anything_runs(capsys, argv, flag, value):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"argument {flag}: must be at least 1, got {value}")


def test_resume_and_overwrite_together_are_refused_for_every_training_command(capsys, tmp_path):
    for command in ("prepare", "pretrain", "distill", "finetune"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--out", str(tmp_path / command), "--resume", "--overwrite"])
        assert stop.value.code == 2 and "--resume and --overwrite exclude each other" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_overwrite_never_deletes_a_folder_the_toolkit_did_not_write(capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for argv in (["prepare", "--corpus", "builtin"], ["finetune", "--checkpoint", "x", "--task", "rte"]):
        assert main([*argv, "--out", str(mine), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"{mine}: exists and is not a" in err and "--overwrite will not delete it" in err, err
    assert (mine / "thesis.tex").read_text() == "years of work"
