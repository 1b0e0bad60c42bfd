"""Checks of the options every pool and decorator takes: each bad value is a ValueError
that names the option."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

KINDS = ("process", "thread")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_positive_int(name: str, value: Any, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def max_workers() -> int:
    """The most workers this machine lets one pool start: each process worker needs a
    process and about four file descriptors (pipes, sentinel), within this process's
    limits; never more than 4096."""
    limit = 4096
    try:
        import resource

        for which, per_worker in ((resource.RLIMIT_NPROC, 1), (resource.RLIMIT_NOFILE, 4)):
            soft, _ = resource.getrlimit(which)
            if soft != resource.RLIM_INFINITY:
                limit = min(limit, max(1, (soft - 64) // per_worker))
    except (ImportError, OSError, ValueError):
        pass
    return limit


def check_nodes(nodes: Any, name: str = "nodes") -> int:
    size = check_positive_int(name, nodes)
    if size is None:
        return cpu_count()
    most = max_workers()
    if size > most:
        raise ValueError(f"{name}={size} is more workers than this machine allows one pool ({most}: "
                         "process and file-descriptor limits); ask for fewer")
    return size


def check_initializer(initializer: Any) -> Any:
    if initializer is not None and not callable(initializer):
        raise ValueError(f"initializer must be callable, got {initializer!r}")
    return initializer


def check_initargs(initargs: Any) -> tuple[Any, ...]:
    if isinstance(initargs, (str, bytes, dict)) or not isinstance(initargs, (tuple, list)):
        raise ValueError(f"initargs must be a tuple (or list) of arguments for the initializer, got {initargs!r}")
    return tuple(initargs)


def check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return str(kind)


def check_start_method(start_method: Any) -> str | None:
    if start_method not in (None, "fork", "spawn", "forkserver"):
        raise ValueError(f"start_method must be 'fork', 'spawn' or 'forkserver', got {start_method!r}")
    return start_method  # type: ignore[no-any-return]


def check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    if math.isinf(timeout):
        return None  # no limit
    return float(timeout)


def check_retries(retries: Any) -> int:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    return retries


def check_progress(progress: Any) -> bool | str:
    if isinstance(progress, (bool, str)):
        return progress
    raise ValueError(f"progress must be True, False or a label (str), got {progress!r}")


def check_ordered(ordered: Any) -> bool:
    if not isinstance(ordered, bool):
        raise ValueError(f"ordered must be True or False, got {ordered!r}")
    return ordered


@dataclasses.dataclass(frozen=True)
class MapOptions:
    """The options of one map, checked once, carried as one value from a pool or a
    decorator down to the engine (``_engine.jobs``)."""

    chunksize: int | None = None
    max_in_flight: int | None = None
    timeout: float | None = None  # seconds per item; None: no limit
    retries: int = 0
    progress: bool | str = False
    ordered: bool = True
    decorator: bool = False  # set by the decorators: errors read as the plain function's

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "chunksize", check_positive_int("chunksize", self.chunksize))
        set_(self, "max_in_flight", check_positive_int("max_in_flight", self.max_in_flight))
        set_(self, "timeout", check_timeout(self.timeout))
        set_(self, "retries", check_retries(self.retries))
        set_(self, "progress", check_progress(self.progress))
        set_(self, "ordered", check_ordered(self.ordered))

    def merged(self, where: str = "", /, **overrides: Any) -> MapOptions:
        """These options with ``overrides`` (a call's keyword options) applied; an
        override of ``None`` keeps the value. Unknown names are a TypeError."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            valid = sorted(names - {"decorator"})
            raise TypeError(f"{where or 'this call'} got unknown option(s) {unknown}; valid options are {valid}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self
