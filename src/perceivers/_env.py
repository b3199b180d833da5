"""The ``PERCEIVERS_*`` switches in the environment, read one way for all of them."""

from __future__ import annotations

import os

__all__ = ["env_switch"]


def env_switch(name: str) -> bool | None:
    """``0``/``false``/``off``/``no`` → False, ``1``/``true``/``on``/``yes`` → True (any case, spaces ignored);
    unset or anything else (e.g. ``auto``) → None, the caller's default."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes"):
        return True
    return None
