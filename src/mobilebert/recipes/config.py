"""Recipe configuration flows one way: typed dataclass defaults → YAML file → `--key value` overrides.

A recipe's options are a dataclass of section dataclasses (`model`, `data`, `train`, ...). YAML is read with
`safe_load`; nothing is evaluated. Unknown keys and values of the wrong type are `UserError`s that name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mobilebert.errors import UserError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from its defaults, then the YAML file at `path`, then `overrides` (`["--train.lr", "1e-3"]`)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for key, value in _parse_overrides(overrides or []):
        dotted = _resolve_key(cls, key)
        section, _, leaf = dotted.partition(".")
        target = data.setdefault(section, {}) if leaf else data
        if leaf and not isinstance(target, dict):
            raise UserError(f"config section '{section}' must be a mapping")
        # Checked here, so that a wrong value is blamed on the command line rather than on the config file.
        target[leaf or section] = _coerce(value, _annotation(cls, dotted), dotted, "command line")
    return _build(cls, data, prefix="", source=str(path) if path else "defaults")


def to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


def save_config(options: Any, path: Path) -> None:
    from mobilebert.files import atomic_write

    text = yaml.safe_dump(to_dict(options), sort_keys=False)
    atomic_write(path, lambda p: p.write_text(text))


def check_resume(folder: str | Path, options: Any, finished: bool, ignore: tuple[str, ...] = ()) -> None:
    """`--resume` of a run folder whose config.yaml records other options (`ignore`: keys the recipe sets itself).
    A finished run is refused: resuming it would do nothing, and its results are not these options'. An unfinished
    one continues with the new options, after a warning that names them."""
    path = Path(folder) / "config.yaml"
    try:  # read as these options are, so that 1e-4 written by an older version equals 0.0001 now
        earlier = _read_yaml(path)
        typed = _build(type(options), earlier, prefix="", source=str(path))
    except UserError:  # no file, not YAML, or a key since removed: nothing to compare with
        return
    now, written = (_flat(yaml.safe_load(yaml.safe_dump(to_dict(o), sort_keys=False))) for o in (options, typed))
    before = {k: written[k] for k in _flat(earlier)}
    # A key the earlier file lacks is an option added since (that run had its default): not a change.
    changed = [f"{k}: {before[k]} in it, {now[k]} now" for k in now
               if k in before and k not in ignore and _same(before[k]) != _same(now[k])]
    if not changed:
        return
    shown = "; ".join(changed[:3]) + (f"; {len(changed) - 3} more" if len(changed) > 3 else "")
    if finished:
        raise UserError(f"{folder} finished with other options ({shown}): pass --overwrite to run it again with "
                        "these, or choose another --out")
    print(f"warning: {folder} was started with other options ({shown}); resuming with these", file=sys.stderr)


def _same(value: Any) -> Any:
    """A value as compared on resume: a path spelled `./runs/demo/x` or `runs//demo/x` is `runs/demo/x`."""
    return os.path.normpath(value) if isinstance(value, str) and value else value


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix:  # sections; a dict-valued option stays one value
            flat.update(_flat(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    return data


def _parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument {arg!r}; overrides look like --train.lr 1e-3")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"override --{key} needs a value")
            value, i = args[i + 1], i + 1
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def _leaf_keys(cls: type) -> list[str]:
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(f"{f.name}.{sub.name}" for sub in dataclasses.fields(hints[f.name]))
        else:
            keys.append(f.name)
    return keys


def _annotation(cls: type, dotted: str) -> Any:
    """The type of a key `_leaf_keys` lists (`train.lr`, or a top-level leaf)."""
    section, _, leaf = dotted.partition(".")
    kind = typing.get_type_hints(cls)[section]
    return typing.get_type_hints(kind)[leaf] if leaf else kind


def _resolve_key(cls: type, key: str) -> str:
    """A dotted key, or a leaf name that is unique across sections (`--lr` for `--train.lr`)."""
    keys = _leaf_keys(cls)
    if key in keys:
        return key
    matches = [k for k in keys if k.rpartition(".")[2] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"override --{key} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
    close = difflib.get_close_matches(key, keys, n=1)
    raise UserError(f"unknown config key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))


def _build(cls: type[T], data: Any, prefix: str, source: str, base: T | None = None) -> T:
    """`cls` from the mapping `data`; keys it leaves out keep their values in `base` (else the class defaults)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            raise UserError(f"{source}: unknown config key '{prefix}{key}'"
                            + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):  # a section: the keys given change the section's own default
            kwargs[name] = _build(kind, value, f"{prefix}{name}.", source, _section_default(cls, name, base))
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}", source)
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def _section_default(cls: type, name: str, base: Any) -> Any:
    """The value a section takes when the config does not mention it: the outer default's, or the field's
    default (a recipe's `default_factory` may differ from the section class's own defaults)."""
    if base is not None:
        return getattr(base, name)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _coerce(value: Any, kind: Any, key: str, source: str) -> Any:
    """Check (and, for strings from the command line, convert) a value against its annotation."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
        if type(None) in options:
            return None
        raise UserError(f"{source}: {key} must not be empty")
    for option in options:
        converted = _convert(value, option)
        if converted is not _FAIL:
            return converted
    names = " or ".join(str(o) if typing.get_args(o) else getattr(o, "__name__", str(o))
                        for o in options if o is not type(None))
    raise UserError(f"{source}: {key} must be {names}, got {value!r}")


_FAIL = object()


def _convert(value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind) or kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        return _FAIL
    if kind in (int, float):
        if isinstance(value, bool):
            return _FAIL
        if isinstance(value, (int, float)) and (kind is float or float(value).is_integer()):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(float(value)) if kind is float else int(value)
            except ValueError:
                return _FAIL
        return _FAIL
    if kind is str:
        return value if isinstance(value, str) else _FAIL
    if origin in (list, tuple, dict):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                return _FAIL
        if not isinstance(value, origin if origin is not tuple else (list, tuple)):
            return _FAIL
        item = typing.get_args(kind)[0] if origin is list and typing.get_args(kind) else None
        if item in (int, float):  # list[float]: YAML reads 1e-5 (no dot) as a string; "abc" must fail here
            items = [_convert(v, item) for v in value]
            return _FAIL if any(v is _FAIL for v in items) else items
        return origin(value)
    return value if kind is Any else _FAIL
