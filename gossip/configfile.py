"""Config files: strict loading of flat TOML knobs, each value checked against its default's type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomllib

from gossip.config import ConfigError


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML file of knobs; keys are normalised to underscores."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {p}: section [{key}] not supported; use flat keys")
        out[key.replace("-", "_")] = value
    return out


def coerce(key: str, value: Any, default: Any) -> Any:
    """Check a config-file value against the type of the knob's default."""
    kind = type(default)
    if default is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list | str):
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(v).strip() for v in items if str(v).strip())
    raise ConfigError(f"config key {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
