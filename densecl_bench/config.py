"""Protocol configs: YAML files read with `yaml.safe_load` (never executed), with profiles.

A config is a mapping of protocol parameters plus an optional `profiles:` mapping
(`demo`, `vissl`, ...) whose entries override the top level; several profiles compose in order.
Configs ship inside the package (`densecl_bench/configs/{benchmarks,pretrain}`) and are also
reachable from the repo's top-level `benchmarks/` and `pretrain/` folders.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from densecl_bench.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(UserError, ValueError):
    """A config file is missing, unreadable or has a bad value; the message names the file."""


def find(name_or_path: str | Path, kind: str) -> Path:
    """Resolve a config given as a path, or by name (with or without `.yaml`) in the packaged `kind` folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml")
    packaged = CONFIG_DIR / kind / f"{stem}.yaml"
    if packaged.is_file():
        return packaged
    known = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!s} not found (no such file, and no packaged {kind} config "
                      f"of that name; known: {', '.join(known) or 'none'})")


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def offered(name_or_path: str | Path, kind: str) -> list[str]:
    """The profile names a config defines."""
    return list(_read(find(name_or_path, kind)).get("profiles") or {})


def load(name_or_path: str | Path | Mapping[str, Any], kind: str, profiles: str | Sequence[str] | None = None, *,
         if_offered: bool = False) -> dict[str, Any]:
    """Load a config and apply the overrides of `profiles` in order (deeply merged); returns a plain dict.

    With `if_offered`, profiles the config does not define are left out (the runner reports them), so
    one suite-wide list such as `demo,vissl` can be passed to every benchmark. `_profile` records the
    applied ones, comma-joined, or `full` (the published protocol) when none applies. A config already
    loaded (a mapping, e.g. with a command-line override applied) comes back as a copy, so functions
    that load their config by name accept one too.
    """
    if isinstance(name_or_path, Mapping):
        if profiles:
            raise ConfigError("profiles apply when a config is loaded from its file, not to a loaded config")
        return copy.deepcopy(dict(name_or_path))
    path = find(name_or_path, kind)
    raw = _read(path)
    defined = raw.pop("profiles", None) or {}
    names = [profiles] if isinstance(profiles, str) else list(profiles or ())
    unknown = [p for p in names if p not in defined]
    if unknown and not if_offered:
        raise ConfigError(f"{path}: no profile {unknown[0]!r} (profiles: {', '.join(defined) or 'none'})")
    applied = [p for p in names if p in defined]
    cfg = copy.deepcopy(raw)
    for name in applied:
        cfg = merge(cfg, defined[name])
    cfg["_config"] = path.stem
    cfg["_profile"] = ",".join(applied) or "full"
    return cfg


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def fingerprint(cfg: dict[str, Any]) -> str:
    """A stable hash of a resolved config: the protocol fingerprint recorded with every metric."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def require(cfg: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    """Fetch `cfg[key]`, failing with the config's name when it is missing or of the wrong type."""
    if key not in cfg:
        raise ConfigError(f"config {cfg.get('_config', '?')}: missing key {key!r}")
    value = cfg[key]
    if not isinstance(value, types):
        raise ConfigError(f"config {cfg.get('_config', '?')}: {key!r} must be {types}, got {value!r}")
    return value
