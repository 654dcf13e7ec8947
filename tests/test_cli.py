"""The `mobilebert` command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys


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
