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
from twat_mp.errors import SerializationError
from twat_mp.pools import MultiPool, ProcessPool, ThreadPool, check_iterables

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


def warm_pool(kind: str = "process", nodes: int | None = None, **options: Any) -> MultiPool:
    """The shared, already-started pool the decorators use for ``kind`` ("process",
    "thread", or "async" for ``apmap``), ``nodes`` and pool ``options``
    (``initializer``, ``initargs``, ``start_method``; ``childconcurrency`` for async).

    Pools are keyed by exact values (numbers, strings and tuples of them by value;
    arrays, objects and functions by identity: see ``_options.exact_key``), started on
    first use, shut down at interpreter exit, replaced after ``os.fork`` or once
    terminated (by Ctrl-C during a map, for one). At most ``MAX_WARM_POOLS`` idle warm
    pools are kept: beyond that the least recently used is closed.
    """
    with _borrowed(kind, nodes, options) as pool:
        found: MultiPool = pool
        return found


def _spec(kind: Any, nodes: Any, options: dict[str, Any], where: str) -> _options.PoolSpec:
    unknown = sorted(set(options) - _POOL_OPTIONS)
    if unknown:
        raise TypeError(f"{where} got unknown pool option(s) {unknown}; valid options are {sorted(_POOL_OPTIONS)}")
    return _options.PoolSpec(kind=kind, nodes=nodes, **options)


class _borrowed:
    """Hold a warm pool for the length of a call, so that the bound never closes a pool
    while a call uses it."""

    def __init__(self, kind: str, nodes: int | None, options: dict[str, Any],
                 spec: _options.PoolSpec | None = None) -> None:
        self.pool_class = _pool_class(kind)
        if kind == "async":
            self.nodes = _options.check_nodes(nodes, "processes")
            if "devices" in options:  # the devices decide the size
                self.nodes = _options.PoolSpec(nodes=nodes, devices=options["devices"],
                                               per_device=options.get("per_device")).size
            self.options = dict(options)
            self.key: tuple[Any, ...] = (kind, self.nodes, *sorted(
                (name, _options.exact_key(value)) for name, value in options.items()))
            self.keep: Any = self.options
        else:
            spec = spec or _spec(kind, nodes, options, "warm_pool()")
            self.nodes = spec.size
            self.options = spec.pool_options()
            self.key = spec.key()
            self.keep = spec

    @classmethod
    def of(cls, spec: _options.PoolSpec) -> _borrowed:
        """Borrow the warm pool of an already checked spec (a decorated function's)."""
        return cls(spec.kind, spec.nodes, {}, spec)

    def __enter__(self) -> Any:
        with _warm_lock:
            pool = _warm.get(self.key)
            if pool is None or not pool.alive:
                logger.debug("starting warm pool {} with {} workers", self.pool_class.__name__, self.nodes)
                pool = self.pool_class(self.nodes, **self.options)._open()
                pool._warm_keep = self.keep  # keeps the objects whose ids are in the key alive
                _warm[self.key] = pool
            _warm.move_to_end(self.key)
            _in_use[self.key] += 1
            retired = _idle_beyond_bound()
        _close(retired)
        return pool

    def __exit__(self, *exc: Any) -> None:
        with _warm_lock:
            _in_use[self.key] -= 1
            if _in_use[self.key] <= 0:
                del _in_use[self.key]
            retired = _idle_beyond_bound()
        _close(retired)


def _idle_beyond_bound() -> list[Any]:
    """Under ``_warm_lock``: take out the least recently used idle pools beyond the bound."""
    idle = [key for key in _warm if not _in_use[key]]  # oldest first
    return [_warm.pop(key) for key in idle[: max(0, len(_warm) - MAX_WARM_POOLS)]]


def _close(pools: list[Any]) -> None:
    for pool in pools:  # close() only asks: the workers finish and exit on their own
        logger.debug("closing the least recently used warm pool {}", pool)
        pool.close()


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
_POOL_OPTIONS = {"initializer", "initargs", "start_method", "devices", "per_device", "torch_threads"}
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
    which are checked when decorating: a bad value is a ``ValueError`` naming its
    option, an unknown name a ``TypeError``.
    """
    if type(how) is not str or how not in HOWS:
        raise ValueError(f"Invalid mapping method: {how!r}; valid values are {', '.join(map(repr, HOWS))}")
    if debug:
        from twat_mp._logging import set_debug_mode

        set_debug_mode(True)
    name = _DECORATOR_NAMES[how]

    def decorator(fn: Any = None, /, *, nodes: int | None = None, kind: str = "process", **options: Any) -> Any:
        unknown = sorted(set(options) - _POOL_OPTIONS - _CALL_OPTIONS)
        if unknown:
            valid = sorted(_POOL_OPTIONS | _CALL_OPTIONS | {"nodes", "kind"})
            raise TypeError(f"@{name} got unknown option(s) {unknown}; valid options are {valid}")
        spec = _spec(kind, nodes, {k: v for k, v in options.items() if k in _POOL_OPTIONS}, f"@{name}")
        call_options = _options.MapOptions(**{k: v for k, v in options.items() if k in _CALL_OPTIONS},
                                           decorator=True)
        if fn is None:
            return functools.partial(decorator, nodes=nodes, kind=kind, **options)
        binding = "method"
        if isinstance(fn, staticmethod):
            fn, binding = fn.__func__, "static"
        elif isinstance(fn, classmethod):
            fn, binding = fn.__func__, "class"
        if not callable(fn):
            raise TypeError(f"@{name} decorates a function, got {fn!r}")
        return functools.update_wrapper(MappedFunction(fn, how, spec, call_options, binding), fn)

    decorator.__name__ = decorator.__qualname__ = name
    return decorator


class MappedFunction:
    """What ``@pmap``/``@imap``/``@amap`` return: call it with an iterable.

    It pickles by reference where it can be imported, and otherwise as its parts (the
    function by value), so that functions defined in ``__main__`` or a notebook can call
    a decorated function and still be sent to workers (where it then runs serially).
    As a method, it binds: ``obj.method(xs)`` maps ``method(obj, x)`` over ``xs``; over
    ``@staticmethod`` nothing is bound, over ``@classmethod`` the class is.
    """

    def __init__(self, fn: Callable[..., Any], how: str, spec: _options.PoolSpec,
                 call_options: _options.MapOptions, binding: str = "method") -> None:
        self.func = fn
        self.how = how
        self.spec = spec
        self.call_options = call_options
        self.binding = binding

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def nodes(self) -> int:
        return self.spec.size

    def __call__(self, *iterables: Iterable[Any]) -> Any:
        return self._map(self.func, iterables)

    def _map(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], bound: Any = None) -> Any:
        where = f"{getattr(self.func, '__name__', self.func)}()"
        if not iterables:
            raise TypeError(f"{where} takes an iterable to map over (like builtin map)")
        check_iterables(where, iterables)
        if state.in_worker():  # inside a worker: run serially, never nest pools
            serial = map(fn, *iterables)
            return serial if self.how == "imap" else list(serial)
        overrides = _call_overrides(self.call_options)
        if self.how == "imap":
            return _borrowed_imap(self, fn, iterables, overrides, bound)
        try:
            with _borrowed.of(self.spec) as pool:
                if self.how == "amap":
                    return pool.amap(fn, *iterables, **overrides).get()
                return pool.map(fn, *iterables, **overrides)
        except SerializationError as exc:
            raise _instance_error(self, bound, exc) or exc  # noqa: B904 (a better message, same chain)

    def __reduce__(self) -> Any:
        module = sys.modules.get(getattr(self, "__module__", ""), None)
        name = getattr(self, "__qualname__", "")
        if module is not None and module.__name__ != "__main__" and _lookup(module, name) is self:
            return name  # importable: pickle by reference
        return (MappedFunction, (self.func, self.how, self.spec, self.call_options, self.binding))

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        """As a method: ``obj.method(xs)`` maps ``method(obj, x)`` over ``xs``."""
        if self.binding == "static":
            return self
        if self.binding == "class":
            return _BoundMapped(self, owner if owner is not None else type(instance))
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
        return self.mapped._map(functools.partial(self.mapped.func, self.instance), iterables, self.instance)

    def __repr__(self) -> str:
        return f"<bound {self.mapped!r} of {self.instance!r}>"


def _instance_error(mapped: MappedFunction, instance: Any, exc: SerializationError) -> SerializationError | None:
    """When a decorated method could not be sent to worker processes because of its
    instance, an error that says so (``None`` when the instance is not to blame)."""
    if instance is None or mapped.kind != "process":
        return None
    from twat_mp._engine.serialization import dumps_dill

    try:
        dumps_dill(instance, "the instance")
    except SerializationError as reason:
        name = getattr(mapped.func, "__qualname__", mapped.func)
        error = SerializationError(
            f"{name} is a @{_DECORATOR_NAMES[mapped.how]} method: its instance travels to the worker processes "
            f"with each call, so it must be picklable, and it is not ({reason}); use kind='thread' "
            "(nothing is pickled) or make the instance picklable (e.g. __getstate__)")
        error.__cause__ = exc
        return error
    return None


def _borrowed_imap(mapped: MappedFunction, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                   overrides: dict[str, Any], bound: Any) -> Any:
    borrowed = _borrowed.of(mapped.spec)
    pool = borrowed.__enter__()
    try:
        results = pool.imap(fn, *iterables, **overrides)
    except BaseException:
        borrowed.__exit__(None, None, None)
        raise
    return _released_when_done(results, borrowed, mapped, bound)


def _released_when_done(results: Any, borrowed: _borrowed, mapped: MappedFunction, bound: Any) -> Any:
    try:
        yield from results
    except SerializationError as exc:
        raise _instance_error(mapped, bound, exc) or exc  # noqa: B904 (a better message, same chain)
    finally:
        results.close()
        borrowed.__exit__(None, None, None)


def _call_overrides(options: _options.MapOptions) -> dict[str, Any]:
    return {"chunksize": options.chunksize, "max_in_flight": options.max_in_flight, "timeout": options.timeout,
            "retries": options.retries, "progress": options.progress, "ordered": options.ordered,
            "decorator": True}


def _lookup(module: Any, qualname: str) -> Any:
    """What ``module.<qualname>`` holds, read from each namespace without binding (a
    decorated method is found as itself, not as a bound method)."""
    target = module
    for part in qualname.split("."):
        target = vars(target).get(part) if hasattr(target, "__dict__") else None
    return target


pmap = mmap("map")
imap = mmap("imap")
amap = mmap("amap", get_result=True)
