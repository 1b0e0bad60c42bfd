"""Logging: silent until the user asks for it (library convention), and loguru only loaded then.

Engine modules call ``logger.debug("... {}", x)`` on the proxy below. While debug mode is off a
call is one global lookup, and loguru (about 135 ms to import) is never imported, so
``import twat_mp`` stays cheap. ``set_debug_mode(True)`` or ``TWAT_MP_DEBUG=1`` imports loguru
and forwards every call to it.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loguru import Logger

__all__ = ["logger", "set_debug_mode"]

# The loguru logger while debug mode is on, None while it is off.
_active: Logger | None = None
_lock = threading.Lock()


def _write_to_stderr(message: str) -> None:
    """Write to whatever ``sys.stderr`` is now, not to the stream that was current at set-up.

    A stream saved at set-up can be closed by the time a message comes: pytest's capture is closed
    before the interpreter's exit hooks run, and the warm pools log as they stop there.
    """
    stream = sys.stderr
    if stream is None or getattr(stream, "closed", False):
        return  # nowhere to write (pythonw, or stderr closed by the program itself)
    stream.write(message)
    stream.flush()


def _load_loguru() -> Logger:
    """Import loguru; if this is its first import, give it a default handler that finds stderr late.

    loguru's own default handler keeps the ``sys.stderr`` of the moment it is imported. When this
    function is what imports it, that handler is replaced, before it exists, by an equivalent one
    (same level and format, ``LOGURU_*`` settings honoured) writing to the current ``sys.stderr``.
    It is loguru's first handler, so it keeps id 0 for code that removes it. A program that
    imported and configured loguru itself, or that set ``LOGURU_AUTOINIT``, keeps its set-up.
    """
    if "loguru" in sys.modules or "LOGURU_AUTOINIT" in os.environ:
        from loguru import logger as loguru_logger

        return loguru_logger
    os.environ["LOGURU_AUTOINIT"] = "False"
    try:
        from loguru import logger as loguru_logger
    finally:
        del os.environ["LOGURU_AUTOINIT"]
    loguru_logger.add(_write_to_stderr)
    return loguru_logger


class _LazyLogger:
    """The part of loguru's logger that twat-mp calls, forwarded only while debug mode is on.

    ``opt(depth=1)`` makes loguru record the caller's module and line, not this proxy's.
    """

    __slots__ = ()

    def debug(self, message: str, *args: Any, **kwargs: Any) -> None:
        active = _active
        if active is not None:
            active.opt(depth=1).debug(message, *args, **kwargs)

    def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        active = _active
        if active is not None:
            active.opt(depth=1).info(message, *args, **kwargs)

    def warning(self, message: str, *args: Any, **kwargs: Any) -> None:
        active = _active
        if active is not None:
            active.opt(depth=1).warning(message, *args, **kwargs)

    def error(self, message: str, *args: Any, **kwargs: Any) -> None:
        active = _active
        if active is not None:
            active.opt(depth=1).error(message, *args, **kwargs)

    def exception(self, message: str, *args: Any, **kwargs: Any) -> None:
        """Log at error level with the exception being handled, as ``loguru.logger.exception``."""
        active = _active
        if active is not None:
            active.opt(depth=1, exception=True).error(message, *args, **kwargs)


logger = _LazyLogger()


def set_debug_mode(enabled: bool = True) -> None:
    """Turn twat-mp's debug logs of pool lifecycle on or off.

    >>> from twat_mp import set_debug_mode
    >>> set_debug_mode(True); set_debug_mode(False)

    Setting the environment variable ``TWAT_MP_DEBUG=1`` does the same at import.
    """
    global _active
    with _lock:
        if enabled:
            loguru_logger = _load_loguru()
            loguru_logger.enable("twat_mp")  # in case the program disabled it through loguru
            _active = loguru_logger
        else:
            _active = None


if os.environ.get("TWAT_MP_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}:
    set_debug_mode(True)
