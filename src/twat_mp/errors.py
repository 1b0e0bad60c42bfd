"""Every public exception of twat-mp, in one place.

What a user sees on each fault is described in ``docs/failures.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PoolClosedError",
    "SerializationError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerError",
]


def _short(items: list[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(item)[:80] for item in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"[{shown}{more}]"


class WorkerError(Exception):
    """Where and how a user's function failed in a worker.

    twat-mp re-raises the user's exception with its original type; this object is
    attached as its ``__cause__`` so that ``except ValueError`` keeps working while the
    context stays available::

        try:
            square(items)
        except ValueError as exc:
            info = exc.__cause__            # a WorkerError
            info.input_item, info.worker_id, info.traceback_str

    When the original exception cannot be re-created in the caller (its class does not
    pickle, or its constructor takes other arguments than it stores), the ``WorkerError``
    itself is raised; ``exc_type_name`` then holds the original type's name.
    """

    def __init__(
        self,
        message: str,
        *,
        original_exception: BaseException | None = None,
        exc_type_name: str = "",
        worker_id: int | None = None,
        worker_pid: int | None = None,
        input_item: Any = None,
        traceback_str: str = "",
    ) -> None:
        super().__init__(message)
        self.original_exception = original_exception
        self.exc_type_name = exc_type_name or (
            type(original_exception).__name__ if original_exception is not None else ""
        )
        self.worker_id = worker_id
        self.worker_pid = worker_pid
        self.input_item = input_item
        self.traceback_str = traceback_str

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback_str:
            text += "\n\nRemote traceback:\n" + self.traceback_str.rstrip()
        return text


class WorkerCrashedError(RuntimeError):
    """A worker process died (killed, ``os._exit``, segfault, out of memory) while it held
    the items in ``items``. The pool has already replaced the worker."""

    def __init__(self, items: list[Any], worker_id: int, pid: int | None, exitcode: int | None) -> None:
        self.items = items
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode
        if exitcode is not None and exitcode < 0:
            import signal

            try:
                how = f"signal {signal.Signals(-exitcode).name}"
            except ValueError:
                how = f"signal {-exitcode}"
        else:
            how = f"exit code {exitcode}"
        super().__init__(
            f"worker {worker_id} (pid {pid}) died with {how} while running items {_short(items)}; "
            "the pool replaced it. Pass retries=N to re-run the items of a dead worker."
        )


class TaskTimeoutError(TimeoutError):
    """An item ran longer than the ``timeout`` it was given; its worker was stopped and
    replaced."""

    def __init__(self, items: list[Any], timeout: float, worker_id: int | None = None) -> None:
        self.items = items
        self.timeout = timeout
        self.worker_id = worker_id
        super().__init__(
            f"items {_short(items)} ran past timeout={timeout:g}s on worker {worker_id}; "
            "the worker was stopped and replaced. Raise timeout= or pass retries=N."
        )


class SerializationError(TypeError):
    """A function, an argument or a result could not be pickled (neither by pickle nor
    by dill)."""


class PoolClosedError(RuntimeError):
    """A pool was used while it was not open: before ``with``, after it closed, or after
    it was terminated."""


class BrokenPoolError(RuntimeError):
    """The pool can no longer run work; the message names why."""


class InitializerError(RuntimeError):
    """A worker's initializer raised; the pool could not start that worker."""

    def __init__(self, worker_id: int | None, worker_pid: int | None, detail: str) -> None:
        self.worker_id = worker_id
        self.worker_pid = worker_pid
        super().__init__(f"the initializer failed in worker {worker_id} (pid {worker_pid}): {detail}")
