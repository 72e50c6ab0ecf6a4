"""Config validation helpers: every message names the field, the value and what is allowed."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
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


@contextlib.contextmanager
def exit_on(*errors: type[Exception]) -> Iterator[None]:
    """Commands wrap their work in this: an error the user can fix (bad config, prompt, checkpoint) ends
    the command with its message and exit status 2 instead of a traceback."""
    try:
        yield
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
