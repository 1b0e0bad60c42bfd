"""Logging: loguru, disabled until the user asks for it (library convention)."""

from __future__ import annotations

import os

from loguru import logger

__all__ = ["logger", "set_debug_mode"]

logger.disable("twat_mp")


def set_debug_mode(enabled: bool = True) -> None:
    """Turn twat-mp's debug logs of pool lifecycle on or off.

    >>> from twat_mp import set_debug_mode
    >>> set_debug_mode(True); set_debug_mode(False)

    Setting the environment variable ``TWAT_MP_DEBUG=1`` does the same at import.
    """
    if enabled:
        logger.enable("twat_mp")
    else:
        logger.disable("twat_mp")


if os.environ.get("TWAT_MP_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}:
    set_debug_mode(True)
