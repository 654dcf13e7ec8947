"""Writing files so that a reader never sees half of one; reading JSON files that may be damaged."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mobilebert.errors import UserError


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file in the same folder and rename it into place: never a half-written file.

    The file gets the permissions an ordinary `open` would give it (0666 less the umask): `mkstemp` makes 0600,
    which would keep checkpoints and results from the group on a shared machine.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: Path, hint: str = "") -> Any:
    """A JSON file's content; an unreadable one (not JSON, not UTF-8) is a one-line UserError naming it, + `hint`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}){hint}") from None


def read_json_or_none(path: Path) -> Any:
    """A JSON file's content, or None when it is damaged: for records that are then treated as absent."""
    try:
        return read_json(path)
    except UserError:
        return None


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def json_text(content: Any, indent: int | None = 2) -> str:
    """Strict JSON (RFC 8259) of `content`: NaN and infinities, which JSON has no word for, become null.

    `json.dumps` writes them as the bare words NaN / Infinity, which strict parsers (browsers, jq, Go, Rust) reject;
    a metric that is undefined (the correlation of a constant prediction) is written as null instead.
    """
    return json.dumps(_finite(content), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def check_overwritable(path: Path, markers: tuple[str, ...], what: str) -> None:
    """Before `--overwrite` deletes `path`: it must be missing, empty, or hold one of `markers` (the files that make
    it one of our output folders, `what`), so that a mistyped --out never deletes a user's own folder."""
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and
                                                 not any((path / m).exists() for m in markers))):
        raise UserError(f"{path}: exists and is not {what}, so --overwrite will not delete it; choose another --out")


def remove_output_folder(path: Path, markers: tuple[str, ...], what: str) -> None:
    """`--overwrite`: delete `path` after `check_overwritable`."""
    import shutil

    check_overwritable(path, markers, what)
    if path.exists():
        shutil.rmtree(path)
