"""The ``mmap`` factory and the decorators it builds: ``pmap``, ``imap``, ``amap``.

::

    @pmap                   square(xs) ─▶ warm pool for (kind, nodes, pool options)
    def square(x): ...                    ─▶ pool.map  (created on first use, kept until
                                            exit; bounded; re-created in a forked child)

Options are checked once, when decorating. Decorated functions keep their name and
docstring, stay picklable, bind as methods, and run serially when called inside a
twat-mp worker (no nested pools, no deadlock).
"""

from __future__ import annotations

import atexit
import collections
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


def _pool_class(kind: str) -> Any:
    """The pool class of a warm-pool kind ("async" is apmap's: an AsyncMultiPool)."""
    if kind == "async":
        from twat_mp.aio import AsyncMultiPool

        return AsyncMultiPool
    return {"process": ProcessPool, "thread": ThreadPool}[_options.check_kind(kind)]


#: Idle warm pools kept beyond this many are closed, least recently used first.
MAX_WARM_POOLS = 8

_warm: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
_in_use: collections.Counter[tuple[Any, ...]] = collections.Counter()
_warm_lock = threading.Lock()


def _exact(value: Any) -> Any:
    """A key part that is equal only for values that are exactly the same: plain
    immutable values by value, anything else (arrays, objects, functions) by identity.
    The registry keeps the options, so an id cannot be reused while its pool lives."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return (type(value).__name__, value)
    if type(value) is tuple:
        return ("tuple", tuple(_exact(v) for v in value))
    return ("id", id(value))


def _key(kind: str, nodes: int, options: dict[str, Any]) -> tuple[Any, ...]:
    return (kind, nodes, *sorted((name, _exact(value)) for name, value in options.items()))


def warm_pool(kind: str = "process", nodes: int | None = None, **options: Any) -> MultiPool:
    """The shared, already-started pool the decorators use for ``kind`` ("process",
    "thread", or "async" for ``apmap``), ``nodes`` and pool ``options``
    (``initializer``, ``initargs``, ``start_method``; ``childconcurrency`` for async).

    Pools are keyed by exact values (arrays and other objects by identity), started on
    first use, shut down at interpreter exit, replaced after ``os.fork`` or once
    terminated (by Ctrl-C during a map, for one). At most ``MAX_WARM_POOLS`` idle warm
    pools are kept: beyond that the least recently used is closed.
    """
    with _borrowed(kind, nodes, options) as pool:
        found: MultiPool = pool
        return found


class _borrowed:
    """Hold a warm pool for the length of a call, so that the bound never closes a pool
    while a call uses it."""

    def __init__(self, kind: str, nodes: int | None, options: dict[str, Any]) -> None:
        self.kind = kind
        self.pool_class = _pool_class(kind)
        self.nodes = _options.check_nodes(nodes)
        self.options = options
        self.key = _key(self.kind, self.nodes, options)

    def __enter__(self) -> Any:
        retired: list[MultiPool] = []
        with _warm_lock:
            pool = _warm.get(self.key)
            if pool is None or not pool.alive:
                logger.debug("starting warm {} pool with {} workers", self.kind, self.nodes)
                pool = self.pool_class(self.nodes, **self.options)._open()
                pool._warm_options = self.options  # keeps the ids in the key alive
                _warm[self.key] = pool
            _warm.move_to_end(self.key)
            _in_use[self.key] += 1
            idle = [k for k in _warm if not _in_use[k]]
            while len(_warm) > MAX_WARM_POOLS and idle:
                retired.append(_warm.pop(idle.pop(0)))
        for old in retired:
            logger.debug("closing the least recently used warm pool {}", old)
            old.close()
        return pool

    def __exit__(self, *exc: Any) -> None:
        with _warm_lock:
            _in_use[self.key] -= 1
            if _in_use[self.key] <= 0:
                del _in_use[self.key]


def shutdown_warm_pools() -> None:
    """Close every warm pool the decorators and ``apmap`` started (also done at
    interpreter exit), and the forkserver their workers came from, so the process is
    left with no child."""
    with _warm_lock:
        pools = list(_warm.values())
        _warm.clear()
    for pool in pools:
        pool.close()
    for pool in pools:
        if pool._dispatcher is not None:
            pool._dispatcher.join(5.0)
    process = sys.modules.get("twat_mp._engine.process")
    if process is not None:
        process.stop_forkserver()


def _forget_after_fork() -> None:
    # The child inherited the parent's pools but none of their threads: drop, never close.
    global _warm_lock
    _warm.clear()
    _in_use.clear()
    _warm_lock = threading.Lock()


atexit.register(shutdown_warm_pools)
os.register_at_fork(after_in_child=_forget_after_fork)

# Options that choose the pool; the rest are options of each call.
_POOL_OPTIONS = {"initializer", "initargs", "start_method"}
_CALL_OPTIONS = {"chunksize", "max_in_flight", "timeout", "retries", "progress", "ordered"}
_DECORATOR_NAMES = {"map": "pmap", "imap": "imap", "amap": "amap"}


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
    (``@pmap(nodes=4, kind="thread", chunksize=..., timeout=..., retries=..., progress=...)``),
    which are checked when decorating: a bad one is a ``ValueError`` naming it.
    """
    if how not in HOWS:
        raise ValueError(f"Invalid mapping method: {how!r}; valid values are {', '.join(map(repr, HOWS))}")
    if debug:
        from twat_mp._logging import set_debug_mode

        set_debug_mode(True)
    name = _DECORATOR_NAMES[how]

    def decorator(fn: Callable[..., Any] | None = None, /, *, nodes: int | None = None,
                  kind: str = "process", **options: Any) -> Any:
        unknown = set(options) - _POOL_OPTIONS - _CALL_OPTIONS
        if unknown:
            valid = sorted(_POOL_OPTIONS | _CALL_OPTIONS | {"nodes", "kind"})
            raise ValueError(f"@{name} got unknown option(s) {sorted(unknown)}; valid options are {valid}")
        _options.check_kind(kind)
        _options.check_positive_int("nodes", nodes)
        if nodes is not None:
            _options.check_nodes(nodes)  # a size the machine cannot hold fails here
        if kind == "thread" and "start_method" in options:
            raise ValueError("start_method applies to kind='process' only")
        _options.check_start_method(options.get("start_method"))
        _options.check_initializer(options.get("initializer"))
        if "initargs" in options:
            options["initargs"] = _options.check_initargs(options["initargs"])
        call_options = _options.MapOptions(**{k: v for k, v in options.items() if k in _CALL_OPTIONS},
                                           decorator=True)
        if fn is None:
            return functools.partial(decorator, nodes=nodes, kind=kind, **options)
        if not callable(fn):
            raise TypeError(f"@{name} decorates a function, got {fn!r}")
        pool_options = {k: v for k, v in options.items() if k in _POOL_OPTIONS}
        return functools.update_wrapper(MappedFunction(fn, how, kind, nodes, pool_options, call_options), fn)

    decorator.__name__ = decorator.__qualname__ = name
    return decorator


class MappedFunction:
    """What ``@pmap``/``@imap``/``@amap`` return: call it with an iterable.

    It pickles by reference where it can be imported, and otherwise as its parts (the
    function by value), so that functions defined in ``__main__`` or a notebook can call
    a decorated function and still be sent to workers (where it then runs serially).
    As a method, it binds: ``obj.method(xs)`` maps ``method(obj, x)`` over ``xs``.
    """

    def __init__(self, fn: Callable[..., Any], how: str, kind: str, nodes: int | None,
                 pool_options: dict[str, Any], call_options: _options.MapOptions) -> None:
        self.func = fn
        self.how = how
        self.kind = kind
        self.nodes = nodes
        self.pool_options = pool_options
        self.call_options = call_options

    def __call__(self, *iterables: Iterable[Any]) -> Any:
        return self._map(self.func, iterables)

    def _map(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...]) -> Any:
        if not iterables:
            raise TypeError(f"{getattr(self.func, '__name__', fn)}() takes an iterable to map over (like builtin map)")
        if state.in_worker():  # inside a worker: run serially, never nest pools
            serial = map(fn, *iterables)
            return serial if self.how == "imap" else list(serial)
        overrides = _call_overrides(self.call_options)
        if self.how == "imap":
            return _borrowed_imap(self, fn, iterables, overrides)
        with _borrowed(self.kind, self.nodes, self.pool_options) as pool:
            if self.how == "amap":
                return pool.amap(fn, *iterables, **overrides).get()
            return pool.map(fn, *iterables, **overrides)

    def __reduce__(self) -> Any:
        module = sys.modules.get(getattr(self, "__module__", ""), None)
        name = getattr(self, "__qualname__", "")
        if module is not None and module.__name__ != "__main__" and _lookup(module, name) is self:
            return name  # importable: pickle by reference
        return (MappedFunction, (self.func, self.how, self.kind, self.nodes, self.pool_options, self.call_options))

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        """As a method: ``obj.method(xs)`` maps ``method(obj, x)`` over ``xs``."""
        if instance is None:
            return self
        return _BoundMapped(self, instance)

    def __repr__(self) -> str:
        return f"<{_DECORATOR_NAMES[self.how]} {getattr(self.func, '__qualname__', self.func)!r}>"


class _BoundMapped:
    """A decorated method bound to its instance (the instance travels with each call)."""

    def __init__(self, mapped: MappedFunction, instance: Any) -> None:
        self.mapped = mapped
        self.instance = instance
        functools.update_wrapper(self, mapped.func)

    def __call__(self, *iterables: Iterable[Any]) -> Any:
        return self.mapped._map(functools.partial(self.mapped.func, self.instance), iterables)

    def __repr__(self) -> str:
        return f"<bound {self.mapped!r} of {self.instance!r}>"


def _borrowed_imap(mapped: MappedFunction, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                   overrides: dict[str, Any]) -> Any:
    borrowed = _borrowed(mapped.kind, mapped.nodes, mapped.pool_options)
    pool = borrowed.__enter__()
    try:
        results = pool.imap(fn, *iterables, **overrides)
    except BaseException:
        borrowed.__exit__(None, None, None)
        raise
    return _released_when_done(results, borrowed)


def _released_when_done(results: Any, borrowed: _borrowed) -> Any:
    try:
        yield from results
    finally:
        results.close()
        borrowed.__exit__(None, None, None)


def _call_overrides(options: _options.MapOptions) -> dict[str, Any]:
    return {"chunksize": options.chunksize, "max_in_flight": options.max_in_flight, "timeout": options.timeout,
            "retries": options.retries, "progress": options.progress, "ordered": options.ordered,
            "decorator": True}


def _lookup(module: Any, qualname: str) -> Any:
    target = module
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target


pmap = mmap("map")
imap = mmap("imap")
amap = mmap("amap", get_result=True)
