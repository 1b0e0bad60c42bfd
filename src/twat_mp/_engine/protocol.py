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
import struct
import traceback
from typing import Any, NamedTuple

from twat_mp.errors import WorkerError

HEADER = struct.Struct("<BqQd")
TASK, FUNC, STOP, RESULT, INIT_FAILED, RETIRE = range(6)

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
    """A user exception caught in a worker, made safe to send back."""

    exc_payload: bytes | None  # pickle of the exception, None if it will not round-trip
    type_name: str
    message: str
    traceback_str: str
    stage: Stage = Stage.CALL

    @classmethod
    def capture(cls, exc: BaseException) -> RemoteError:
        from twat_mp._engine.serialization import dumps, loads

        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        payload: bytes | None
        try:
            payload, _ = dumps(exc, "exception")
            loads(payload)  # odd constructors pickle fine and fail to load: check now
        except Exception:
            payload = None
        return cls(payload, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb)

    def to_exception(self, item: Any, worker_id: int | None, pid: int | None, *,
                     decorator: bool = False) -> BaseException:
        """The exception to raise in the caller: the original type where possible, with a
        WorkerError (item, worker, remote traceback) as its cause."""
        from twat_mp._engine.serialization import loads

        original: BaseException | None = None
        if self.exc_payload is not None:
            try:
                original = loads(self.exc_payload)
            except Exception:
                original = None
        name = self.type_name.removeprefix("builtins.")
        where = f"worker {worker_id} (pid {pid})" if worker_id is not None else "the worker"
        info = WorkerError(
            f"{name}: {self.message} — raised in {where} on input item {item!r:.200}",
            original_exception=original,
            exc_type_name=name,
            worker_id=worker_id,
            worker_pid=pid,
            input_item=item,
            traceback_str=self.traceback_str,
        )
        if original is None:
            return info
        original.__cause__ = info
        if hasattr(original, "add_note"):
            original.add_note(f"twat-mp: raised in {where} on input item {item!r:.200}")
        return original


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
