"""Per-worker state: what a mapped function can reach in the worker that runs it.

A model (or a connection, a cache) loaded once per worker instead of once per item::

    from twat_mp import ProcessPool, worker_state

    def load():
        worker_state()["model"] = build_model()      # runs once in each worker

    def predict(x):
        return worker_state()["model"](x)

    with ProcessPool(nodes=2, initializer=load) as pool:
        pool.map(predict, inputs)

In a process worker (ProcessPool, AsyncMultiPool) the state is one dict per process; in a
ThreadPool it is one dict per thread. In the caller's own process it is a dict too, so
code that runs serially works unchanged.
"""

from __future__ import annotations

import os
import threading
from typing import Any, NamedTuple

__all__ = ["WorkerInfo", "worker_info", "worker_state"]


class WorkerInfo(NamedTuple):
    """Who is running the current call: ``kind`` is "process", "thread" or "main"."""

    kind: str
    worker_id: int | None
    pid: int


class _ProcessSlot:
    info: WorkerInfo | None = None
    state: dict[str, Any] = {}


_local = threading.local()


def worker_state() -> dict[str, Any]:
    """The dict of state of the worker running the current call.

    >>> from twat_mp import worker_state
    >>> worker_state()["hits"] = 1
    >>> worker_state()["hits"]
    1
    """
    state: dict[str, Any] | None = getattr(_local, "state", None)
    if state is not None:
        return state
    return _ProcessSlot.state


def worker_info() -> WorkerInfo:
    """Where the current call runs.

    >>> from twat_mp import worker_info
    >>> worker_info().kind
    'main'
    """
    info = getattr(_local, "info", None) or _ProcessSlot.info
    return info if info is not None else WorkerInfo("main", None, os.getpid())


def in_worker() -> bool:
    """True inside a twat-mp worker; decorated functions then run serially."""
    return getattr(_local, "info", None) is not None or _ProcessSlot.info is not None


def in_process_worker() -> bool:
    """True in a worker process of a process or async pool (in any of its threads)."""
    return _ProcessSlot.info is not None


def enter_process_worker(worker_id: int, kind: str = "process") -> None:
    _ProcessSlot.info = WorkerInfo(kind, worker_id, os.getpid())
    _ProcessSlot.state = {}


def enter_thread_worker(worker_id: int) -> None:
    _local.info = WorkerInfo("thread", worker_id, os.getpid())
    _local.state = {}


def _reset_after_fork() -> None:  # a forked child of a thread worker is not a worker
    _local.__dict__.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
