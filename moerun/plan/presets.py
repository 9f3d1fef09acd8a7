"""Strict TOML loading for the planner's presets (hardware, strategies, claims).

Owns three small things every preset loader (``HardwareSpec.load``, ``Strategy.load``,
``ClaimsFile.load``) needs, so none of them re-implements them:
finding a preset (a name in ``configs/<kind>/`` or a path to a ``.toml``), reading TOML
(``tomllib`` on 3.11+, ``tomli`` on 3.10), and building a frozen dataclass from a table
with unknown keys, wrong types and invalid values rejected by a ``ValueError`` that names
the file (and the key).

    table = load_toml(resolve_preset("hardware", "seed"))
    spec = from_table(HardwareSpec, table, where="configs/hardware/seed.toml")
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..configs import CONFIG_DIR  # configs/, shipped as moerun.configs


def list_presets(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.toml"))


def resolve_preset(kind: str, name: str | Path) -> Path:
    """``name`` as a path to a .toml file if it exists, else ``configs/<kind>/<name>.toml``."""
    path = Path(name)
    if path.is_file():
        return path
    preset = CONFIG_DIR / kind / f"{name}.toml"
    if preset.is_file():
        return preset
    raise ValueError(f"{kind} {str(name)!r} is neither a .toml file nor a preset; "
                     f"presets: {', '.join(list_presets(kind)) or '(none)'}")


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e}); fix the syntax") from e


def from_table(cls, table: dict, where: str):
    """Build dataclass ``cls`` from ``table``; unknown keys, wrong types and the dataclass's
    own checks (its ``__post_init__``) are ValueErrors prefixed with ``where``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                         f"allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for key, value in table.items():
        kw[key] = _coerce(value, hints[key], f"{where}: key {key!r}")
    missing = [n for n, f in fields.items() if n not in kw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kw)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _coerce(value, hint, where: str):
    """Check ``value`` against a simple type hint (int, float, str, bool, tuple[str, ...], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return None if value is None else _coerce(value, inner, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if dataclasses.is_dataclass(hint) and isinstance(value, hint):  # an already-built sub-table
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ValueError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")
