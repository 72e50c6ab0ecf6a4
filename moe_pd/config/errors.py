"""Config validation helpers: every message names the field, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the field."""


def check(ok: bool, field_name: str, value: Any, requirement: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r}: {requirement}")


def check_choice(field_name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{field_name}={value!r}: must be one of {', '.join(map(repr, allowed))}")
