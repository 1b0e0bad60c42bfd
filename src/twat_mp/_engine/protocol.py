"""The messages that pass between the manager and its workers.

Every message on a pipe is one ``bytes`` frame: a fixed header followed by a pickle::

    task:     TASK  | chunk_id | token | timeout | pickle(list of items)
    function: FUNC  | 0        | token | 0       | pickle(function) + mode byte
    stop:     STOP  | 0        | 0     | 0       |
    result:   RESULT| chunk_id | 0     | 0       | pickle(ChunkResult)
    init err: INIT_FAILED | 0  | 0     | 0       | pickle(RemoteError)
    retire:   RETIRE | 0       | 0     | 0       |   (worker → manager: send me STOP)

``timeout`` is the chunk's per-item limit in seconds (0: none): a worker then stamps
the start of each item where the manager can read it (sync workers), or limits each
call itself (async workers).

The manager reads only headers; payloads are pickled and unpickled in the caller's
thread, so a bad payload fails there, at once, with the caller's traceback.
"""

from __future__ import annotations

import enum
import os
import struct
import sys
import traceback
from typing import Any, NamedTuple

from twat_mp.errors import (
    InitializerError,
    WorkerError,
    exception_state,
    failure_text,
    pickles_by_constructor,
    rebuild,
)

HEADER = struct.Struct("<BqQd")
TASK, FUNC, STOP, RESULT, INIT_FAILED, RETIRE = range(6)

# -- frames on a pipe -------------------------------------------------------------------
# The framing of multiprocess's Connection (a big-endian int32 length; -1 and a uint64 for
# frames of 2 GiB and more), read and written here without its copies: its recv_bytes
# reads a large frame in pipe-sized pieces, allocating room for the whole rest at each
# piece, then copies the frame twice; its send_bytes is fine for small frames only.
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")


def send_frame(conn: Any, header: bytes, payload: bytes | memoryview = b"") -> None:
    """Write ``header + payload`` to ``conn`` as one frame, without joining them first."""
    size = len(header) + len(payload)
    prefix = _LENGTH.pack(size) if size <= 0x7FFFFFFF else _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
    parts = [memoryview(prefix), memoryview(header), memoryview(payload).cast("B")]
    fd = conn.fileno()
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):  # a signal may cut a write short
            written -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][written:]


def recv_frame(conn: Any) -> bytearray:
    """Read one frame of ``conn`` straight into one buffer. EOFError at a clean end."""
    fd = conn.fileno()
    (size,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size, start=True))
    if size == -1:
        (size,) = _LONG_LENGTH.unpack(_read_exact(fd, _LONG_LENGTH.size))
    return _read_exact(fd, size)


def _read_exact(fd: int, size: int, *, start: bool = False) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            if start and got == 0:
                raise EOFError
            raise OSError("got end of file in the middle of a message")
        got += n
    return buffer

#: How a worker calls the function on each item of a chunk.
MODE_ONE, MODE_STAR, MODE_CALL = range(3)


class Stage(enum.IntEnum):
    """Where in a worker an error happened."""

    CALL = 0  # the user's function raised
    LOAD = 1  # the worker could not unpickle the function or the items (retry with dill)
    RESULT = 2  # a result could not be pickled
    INIT = 3  # the initializer raised
    TIMEOUT = 4  # an async call ran past its timeout (the worker cancelled it)


class RemoteError(NamedTuple):
    """A user exception caught in a worker, made safe to send back.

    The exception travels two ways. ``exc_payload`` is its pickle (by reference when the
    C pickle can, else by value with dill). ``state_payload`` also carries its ``(args,
    state)`` when only dill could pickle it (a class from ``__main__`` or a notebook, which
    dill rebuilds by value as a new class), when nothing could, or when pickle would
    re-create it by calling its ``__init__`` again. The caller then looks the class up by
    ``type_module`` and ``type_qualname`` and, when it has it, rebuilds the exception as
    that class without calling ``__init__``, so ``except MyError`` catches it with its
    attributes as they were. ``live`` is the exception
    object itself for the thread transport, where nothing is pickled; it is dropped when
    a RemoteError is pickled (see ``__reduce__``).
    """

    exc_payload: bytes | None  # pickle of the exception, None if it will not round-trip
    type_name: str
    message: str
    traceback_str: str
    stage: Stage = Stage.CALL
    type_module: str = ""
    type_qualname: str = ""
    state_payload: bytes | None = None  # pickle of exception_state(exc), or None
    live: BaseException | None = None  # never pickled (see __reduce__)

    def __reduce__(self) -> tuple[Any, ...]:
        return RemoteError, (*self[:-1], None)

    @classmethod
    def capture(cls, exc: BaseException) -> RemoteError:
        """Record ``exc``; never raises (it runs in a worker's error path)."""
        from twat_mp._engine.serialization import dumps, loads

        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            message = str(exc)
        except Exception as str_error:  # a broken __str__ must not lose the error itself
            message = f"<str() of the exception raised {type(str_error).__name__}>"
        payload: bytes | None
        try:
            payload, by_value = dumps(exc, "exception")
            loads(payload)  # odd constructors pickle fine and fail to load: check now
        except Exception:
            payload, by_value = None, True
        kind = type(exc)
        # A spawned worker runs the script as __mp_main__; in the caller it is __main__.
        module = "__main__" if kind.__module__ == "__mp_main__" else kind.__module__
        state: bytes | None = None
        if by_value or module == "__main__" or pickles_by_constructor(kind):
            # the caller may have the class by name: send what rebuilds it without __init__
            try:
                state, _ = dumps(exception_state(exc), "exception state")
                loads(state)
            except Exception:
                state = None
        return cls(payload, f"{module}.{kind.__qualname__}", message, tb, Stage.CALL, module, kind.__qualname__,
                   state, exc)

    def original(self) -> BaseException | None:
        """The exception re-created in this process: from its state, as the class this
        process has under its module and qualified name, else from its pickle; None when
        neither works."""
        from twat_mp._engine.serialization import loads

        if self.live is not None:
            return self.live
        if self.state_payload is not None:
            cls = _find_exception_class(self.type_module, self.type_qualname)
            if cls is not None:
                try:
                    args, state = loads(self.state_payload)
                    return rebuild(cls, args, state)
                except Exception:  # a custom __new__, a state it refuses: try the pickle
                    pass
        if self.exc_payload is not None:
            try:
                loaded: BaseException = loads(self.exc_payload)
                return loaded
            except Exception:
                return None
        return None

    def to_exception(self, item: Any, worker_id: int | None, pid: int | None, *,
                     decorator: bool = False) -> BaseException:
        """The exception to raise in the caller: an instance of both the original type and
        WorkerError where possible (see ``WorkerError.wrap``), else a plain WorkerError.
        ``decorator``: the map was called through @pmap/@imap/@amap, so the error reads
        as the original message. An original that is not an ``Exception`` (SystemExit)
        is raised as itself, with a WorkerError as its cause, so that ``except
        Exception`` does not swallow it."""
        original = self.original()
        name = self.type_name.removeprefix("builtins.")
        if original is not None and not isinstance(original, Exception):
            info = WorkerError(failure_text(name, self.message, item, worker_id, pid), original, worker_id, item,
                               self.traceback_str, exc_type_name=name, worker_pid=pid)
            original.__cause__ = info
            return original
        return WorkerError.wrap(original, message=self.message, exc_type_name=name, input_item=item,
                                worker_id=worker_id, worker_pid=pid, traceback_str=self.traceback_str,
                                decorator=decorator)

    def to_initializer_error(self, worker_id: int | None, pid: int | None) -> InitializerError:
        """The error of a worker whose initializer raised, with the initializer's exception
        (re-created where possible) as its ``__cause__``."""
        original = self.original()
        name = self.type_name.removeprefix("builtins.")
        error: BaseException | str = original if original is not None else f"{name}: {self.message}"
        return InitializerError(worker_id, pid, error, self.traceback_str)


def _find_exception_class(module: str, qualname: str) -> type[BaseException] | None:
    """The exception class this process has under ``module`` and ``qualname``, if any
    (a class made inside a function, ``<locals>``, cannot be found by name)."""
    found: Any = sys.modules.get(module) if module else None
    if found is None or "<" in qualname:
        return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, BaseException):
        return found
    return None


class ChunkResult(NamedTuple):
    """What a worker returns for a chunk: results of the items it finished, in order,
    and the error that stopped it, if any, at ``error_index`` (-1: at
    ``len(results)``; an async worker may fail an item before earlier ones finish)."""

    results: list[Any]
    error: RemoteError | None
    worker_id: int
    pid: int
    elapsed: float
    error_index: int = -1

    def failed_at(self) -> int:
        return len(self.results) if self.error_index < 0 else self.error_index
