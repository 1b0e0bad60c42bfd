"""Checks of the options every pool and decorator takes: each bad value is a ValueError
that names the option."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Callable, Sequence

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


#: The most workers one pool may have, whatever the limits say: a sane cap for threads too.
MAX_WORKERS_CAP = 4096
#: Processes and descriptors left for everything else this process does.
_HEADROOM = 64


def max_workers(kind: str = "process") -> int:
    """The most workers this machine lets one pool start, so that a size it cannot hold
    fails at once instead of after minutes of forking. A process worker needs a process
    (``RLIMIT_NPROC``) and about four file descriptors (two pipes, a sentinel, a pidfd:
    ``RLIMIT_NOFILE``); a thread counts against ``RLIMIT_NPROC`` on Linux and needs no
    descriptor. Never more than ``MAX_WORKERS_CAP``."""
    limit = MAX_WORKERS_CAP
    try:
        import resource
    except ImportError:  # not on a POSIX system
        return limit
    needs = [(resource.RLIMIT_NPROC, 1)]
    if kind != "thread":
        needs.append((resource.RLIMIT_NOFILE, 4))
    for which, per_worker in needs:
        try:
            soft, _ = resource.getrlimit(which)
        except (OSError, ValueError):
            continue
        if soft != resource.RLIM_INFINITY:
            limit = min(limit, max(1, (soft - _HEADROOM) // per_worker))
    return limit


def check_nodes(nodes: Any, name: str = "nodes", kind: str = "process") -> int:
    """A pool size: a positive int no larger than :func:`max_workers`; ``None`` is the
    CPUs this process may use."""
    size = check_positive_int(name, nodes)
    if size is None:
        return cpu_count()
    most = max_workers(kind)
    if size > most:
        what = "thread" if kind == "thread" else "process and file-descriptor"
        raise ValueError(f"{name}={size} is more workers than this machine allows one pool ({most}: its "
                         f"{what} limits); ask for fewer")
    return size


def check_initializer(initializer: Any) -> Any:
    if initializer is not None and not callable(initializer):
        raise ValueError(f"initializer must be callable, got {initializer!r}")
    return initializer


def check_initargs(initargs: Any) -> tuple[Any, ...]:
    if not isinstance(initargs, (tuple, list)):
        raise ValueError(f"initargs must be a tuple (or list) of arguments for the initializer, got {initargs!r}")
    return tuple(initargs)


def check_pool_class(pool_class: Any) -> type | None:
    if pool_class is not None and not isinstance(pool_class, type):
        raise ValueError(f"pool_class must be a class (a thread or process pool class) or None, got {pool_class!r}")
    return pool_class


def check_kind(kind: Any) -> str:
    if type(kind) is not str or kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return str(kind)


def check_start_method(start_method: Any) -> str | None:
    if not (start_method is None or (type(start_method) is str and start_method in ("fork", "spawn", "forkserver"))):
        raise ValueError(f"start_method must be 'fork', 'spawn' or 'forkserver', got {start_method!r}")
    return start_method


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
        for name in ("chunksize", "max_in_flight"):  # beyond sys.maxsize means the same as sys.maxsize
            value = check_positive_int(name, getattr(self, name))
            set_(self, name, None if value is None else min(value, sys.maxsize))
        set_(self, "timeout", check_timeout(self.timeout))
        set_(self, "retries", check_retries(self.retries))
        set_(self, "progress", check_progress(self.progress))
        set_(self, "ordered", check_ordered(self.ordered))

    def merged(self, where: str = "", /, **overrides: Any) -> MapOptions:
        """These options with ``overrides`` (a call's keyword options) applied, checked;
        an override of ``None`` keeps the value (``ordered`` takes only a bool). Unknown
        names are a TypeError naming ``where`` (the method called) and the valid names."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            valid = sorted(names - {"decorator"})
            raise TypeError(f"{where or 'this call'} got unknown option(s) {unknown}; valid options are {valid}")
        if "ordered" in overrides:
            check_ordered(overrides["ordered"])  # None is no "keep" here: it reads as False
        changes = {k: v for k, v in overrides.items()
                   if v is not None and not (type(v) is type(getattr(self, k)) and v == getattr(self, k))}
        return dataclasses.replace(self, **changes) if changes else self


def exact_key(value: Any) -> Any:
    """A hashable stand-in for ``value`` that is equal only for values that are exactly
    the same, so that a key never lets two different option values share one pool.
    ``None``, bools, ints, strs and bytes count by value (with their type: ``1`` is not
    ``True``), floats by their exact bits (``0.0`` is not ``-0.0``), tuples by their
    parts; anything else (an array, a list, an object, a function) by identity. Whoever
    keeps such a key must keep the value too, so that its id is not reused."""
    kind = type(value)
    if value is None or kind in (bool, int, str, bytes):
        return (kind, value)
    if kind is float:
        return (kind, value.hex())
    if kind is tuple:
        return (kind, tuple(exact_key(part) for part in value))
    return ("id", id(value))


@dataclasses.dataclass(frozen=True, eq=False)
class PoolSpec:
    """What a pool is made of (its kind, size, start method and initializer), checked
    once when a pool is made or a function decorated. The engine takes its values from
    it, and ``key()`` keys the decorators' warm pools."""

    kind: str = "process"
    nodes: int | None = None  # None: the CPUs this process may use (resolved here)
    start_method: str | None = None
    initializer: Callable[..., Any] | None = None
    initargs: Sequence[Any] = ()  # a tuple once checked
    devices: Any = None  # None, or the tuple of Devices the workers are pinned to
    per_device: int | None = None  # workers on each device (default: 1 a GPU, the cores on the CPU)
    torch_threads: int | None = None  # intra-op threads of each worker (default: its share of the cores)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "kind", check_kind(self.kind))
        set_(self, "per_device", check_positive_int("per_device", self.per_device))
        set_(self, "torch_threads", check_positive_int("torch_threads", self.torch_threads))
        if self.kind == "thread" and (self.devices, self.per_device, self.torch_threads) != (None, None, None):
            raise ValueError("devices, per_device and torch_threads apply to process pools, not threads")
        if self.devices is not None:
            from twat_mp import hardware as device_layer

            pinned = device_layer.parse(self.devices)
            assert pinned is not None
            set_(self, "devices", pinned)
            workers = len(device_layer.workers_per_device(pinned, self.per_device))
            if self.nodes is not None and self.nodes != workers:
                raise ValueError(f"nodes={self.nodes!r} but devices={[str(d) for d in pinned]} with per_device="
                                 f"{self.per_device} make {workers} workers; give devices= alone (with "
                                 "per_device=) or nodes= alone")
            set_(self, "nodes", workers)
        elif self.per_device is not None:
            raise ValueError("per_device= needs devices= (the devices to put that many workers on)")
        set_(self, "nodes", check_nodes(self.nodes, kind=self.kind))
        set_(self, "start_method", check_start_method(self.start_method))
        if self.kind == "thread" and self.start_method is not None:
            raise ValueError(f"start_method applies to kind='process' only, got {self.start_method!r} for threads")
        set_(self, "initializer", check_initializer(self.initializer))
        set_(self, "initargs", check_initargs(self.initargs))

    @property
    def size(self) -> int:
        """``nodes``, resolved (for the type checker: it is never None after checks)."""
        assert self.nodes is not None
        return self.nodes

    def key(self) -> tuple[Any, ...]:
        """Equal for two specs only when every part is exactly the same (see
        :func:`exact_key`); hashable even when ``initargs`` holds arrays."""
        pinned = None if self.devices is None else tuple(map(str, self.devices))
        return (self.kind, self.nodes, self.start_method, exact_key(self.initializer), exact_key(self.initargs),
                pinned, self.per_device, self.torch_threads)

    @property
    def args(self) -> tuple[Any, ...]:
        """``initargs``, as the tuple the checks made of it."""
        return tuple(self.initargs) if type(self.initargs) is not tuple else self.initargs

    def pool_options(self) -> dict[str, Any]:
        """The keyword arguments that make a pool of this spec."""
        options: dict[str, Any] = {"initializer": self.initializer, "initargs": self.initargs}
        if self.kind == "process":
            options.update(start_method=self.start_method, devices=self.devices, per_device=self.per_device,
                           torch_threads=self.torch_threads)
        return options

    def slot_envs(self, start_method: str) -> list[tuple[tuple[str, str], ...]]:
        """The environment of each worker slot: its device (if pinned) and its share of
        the cores for intra-op threads. Forked workers keep one thread: a forked child
        must not touch an OpenMP pool its parent started (it would hang)."""
        from twat_mp import hardware as device_layer

        size = self.size
        threads = 1 if start_method == "fork" and self.torch_threads is None else \
            device_layer.thread_share(size, self.torch_threads)
        if self.devices is None:
            return [device_layer.slot_env(None, threads)] * size
        device_layer.check_fork_safe(start_method, self.devices)
        return [device_layer.slot_env(device, threads)
                for device in device_layer.workers_per_device(self.devices, self.per_device)]
