"""The ``mmap`` factory and the decorators it builds: ``pmap``, ``imap``, ``amap``.

::

    @pmap                   square(xs) ─▶ warm pool for ("process", nodes) ─▶ pool.map
    def square(x): ...                    (created on first use, kept until exit,
                                           re-created in a forked child)

Decorated functions keep their name and docstring, stay picklable, and run serially
when called inside a twat-mp worker (no nested pools, no deadlock).
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
from typing import Any, Callable, Iterable

from twat_mp import _options, state
from twat_mp._logging import logger
from twat_mp.pools import MultiPool, ProcessPool, ThreadPool

__all__ = ["MappedFunction", "amap", "imap", "mmap", "pmap", "shutdown_warm_pools", "warm_pool"]

HOWS = ("map", "imap", "amap")
_POOL_CLASSES: dict[str, type[MultiPool]] = {"process": ProcessPool, "thread": ThreadPool}

_warm: dict[tuple[Any, ...], MultiPool] = {}
_warm_lock = threading.Lock()
_warm_pid = os.getpid()


def warm_pool(kind: str = "process", nodes: int | None = None, **options: Any) -> MultiPool:
    """The shared, already-started pool the decorators use for ``kind`` and ``nodes``.

    Pools are keyed by kind, size and options, started on first use, shut down at
    interpreter exit, and replaced after ``os.fork`` or after a pool was terminated
    (for instance by Ctrl-C during a map).
    """
    kind = _options.check_kind(kind)
    nodes = _options.check_nodes(nodes)
    key = (kind, nodes, *sorted((k, id(v) if callable(v) else repr(v)) for k, v in options.items()))
    with _warm_lock:
        pool = _warm.get(key)
        if pool is None or not pool.alive:
            logger.debug("starting warm {} pool with {} workers", kind, nodes)
            pool = _POOL_CLASSES[kind](nodes, **options)._open()
            _warm[key] = pool
        return pool


def shutdown_warm_pools() -> None:
    """Close every warm pool the decorators started (also done at interpreter exit)."""
    with _warm_lock:
        pools = list(_warm.values())
        _warm.clear()
    for pool in pools:
        pool.close()
    for pool in pools:
        pool.join(5.0)


def _forget_after_fork() -> None:
    # The child inherited the parent's pools but none of their threads: drop, never close.
    global _warm_lock
    _warm.clear()
    _warm_lock = threading.Lock()


atexit.register(shutdown_warm_pools)
os.register_at_fork(after_in_child=_forget_after_fork)

# Options that choose the pool; the rest are options of each call.
_POOL_OPTIONS = {"initializer", "initargs", "start_method"}
_CALL_OPTIONS = {"chunksize", "max_in_flight", "timeout", "retries", "progress", "ordered"}


def mmap(how: str, *, get_result: bool = False, debug: bool | None = None) -> Callable[..., Any]:
    """Build a decorator that maps a function over an iterable in parallel.

    ``how`` is ``"map"`` (eager list), ``"imap"`` (lazy iterator in input order) or
    ``"amap"`` (submit asynchronously, collect the list). ``get_result`` is accepted for
    twat-mp 2.x compatibility: ``amap`` always returns the collected list.

    >>> from twat_mp import mmap
    >>> pmap = mmap("map")
    >>> @pmap
    ... def double(x):
    ...     return 2 * x
    >>> double([1, 2, 3])
    [2, 4, 6]

    The decorator works bare (``@pmap``) or with options
    (``@pmap(nodes=4, kind="thread", chunksize=..., timeout=..., retries=..., progress=...)``).
    """
    if how not in HOWS:
        raise ValueError(f"unknown how={how!r}; valid values are {', '.join(map(repr, HOWS))}")
    if debug:
        from twat_mp._logging import set_debug_mode

        set_debug_mode(True)

    def decorator(fn: Callable[..., Any] | None = None, /, *, nodes: int | None = None,
                  kind: str = "process", **options: Any) -> Any:
        _options.check_kind(kind)
        _options.check_positive_int("nodes", nodes)
        unknown = set(options) - _POOL_OPTIONS - _CALL_OPTIONS
        if unknown:
            valid = sorted(_POOL_OPTIONS | _CALL_OPTIONS | {"nodes", "kind"})
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid options are {valid}")
        if kind == "thread" and "start_method" in options:
            raise ValueError("start_method applies to kind='process' only")
        if fn is None:
            return functools.partial(decorator, nodes=nodes, kind=kind, **options)
        if not callable(fn):
            raise TypeError(f"@{how} decorates a function, got {fn!r}")
        return _decorate(fn, how, kind, nodes, options)

    decorator.__name__ = decorator.__qualname__ = _DECORATOR_NAMES[how]
    return decorator


def _decorate(fn: Callable[..., Any], how: str, kind: str, nodes: int | None,
              options: dict[str, Any]) -> Callable[..., Any]:
    return functools.update_wrapper(MappedFunction(fn, how, kind, nodes, options), fn)


class MappedFunction:
    """What ``@pmap``/``@imap``/``@amap`` return: call it with an iterable.

    It pickles by reference where it can be imported, and otherwise as its parts (the
    function by value), so that functions defined in ``__main__`` or a notebook can call
    a decorated function and still be sent to workers (where it then runs serially).
    """

    def __init__(self, fn: Callable[..., Any], how: str, kind: str, nodes: int | None,
                 options: dict[str, Any]) -> None:
        self.func = fn
        self.how = how
        self.kind = kind
        self.nodes = nodes
        self.options = options

    def __call__(self, *iterables: Iterable[Any]) -> Any:
        fn = self.func
        if not iterables:
            raise TypeError(f"{getattr(fn, '__name__', fn)}() takes an iterable to map over (like builtin map)")
        if state.in_worker():  # inside a worker: run serially, never nest pools
            serial = map(fn, *iterables)
            return serial if self.how == "imap" else list(serial)
        pool_options = {k: v for k, v in self.options.items() if k in _POOL_OPTIONS}
        call_options = {k: v for k, v in self.options.items() if k in _CALL_OPTIONS}
        pool = warm_pool(self.kind, self.nodes, **pool_options)
        if self.how == "imap":
            return pool.imap(fn, *iterables, **call_options)
        if self.how == "amap":
            return pool.amap(fn, *iterables, **call_options).get()
        return pool.map(fn, *iterables, **call_options)

    def __reduce__(self) -> Any:
        module = sys.modules.get(getattr(self, "__module__", ""), None)
        name = getattr(self, "__qualname__", "")
        if module is not None and module.__name__ != "__main__" and _lookup(module, name) is self:
            return name  # importable: pickle by reference
        return (MappedFunction, (self.func, self.how, self.kind, self.nodes, self.options))

    def __get__(self, instance: Any, owner: Any = None) -> Any:  # decorated methods bind
        return self if instance is None else functools.partial(self, instance)

    def __repr__(self) -> str:
        return f"<{_DECORATOR_NAMES[self.how]} {getattr(self.func, '__qualname__', self.func)!r}>"


def _lookup(module: Any, qualname: str) -> Any:
    target = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target


_DECORATOR_NAMES = {"map": "pmap", "imap": "imap", "amap": "amap"}


pmap = mmap("map")
imap = mmap("imap")
amap = mmap("amap", get_result=True)
