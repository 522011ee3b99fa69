"""Readers of one config value: each gives a typed value or raises ConfigError naming the
key, the value and what is allowed (one line for the CLIs to print)."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


def check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r}: {allowed}")


def get(section, key: str, default=None):
    return section.get(key, default) if hasattr(section, "get") else default


def number(section, name: str, key: str, cast, default=None):
    """section.<name> as `cast` (int or float), or a ConfigError naming the key."""
    if default is None and not (hasattr(section, "get") and name in section):
        raise missing_key(key)
    value = get(section, name, default)
    try:
        if cast is int and (isinstance(value, bool) or float(value) != int(value)):
            raise ValueError
        result = cast(value)
    except (TypeError, ValueError):
        kind = "an integer" if cast is int else "a number"
        raise ConfigError(f"config {key}={value!r}: expected {kind}") from None
    if cast is float and not math.isfinite(result):
        raise ConfigError(f"config {key}={value!r}: expected a finite number")
    return result


def as_tuple(value, cast):
    """Config lists may be given as a list or a comma-separated string (CLI overrides)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(cast(v) for v in value)


def missing_key(key: str) -> ConfigError:
    return ConfigError(
        f"config has no key {key}: every key of dpo_jax/schema.py must be there (start the "
        "config from schema.default_config(); a run's config.json written by an older "
        "version needs the keys added since)"
    )
