"""Task graphs: ``@op`` functions, ``.go()`` and ``ObjectRef`` futures, run by a
dependency-aware scheduler on the engine's pools.

>>> from twat_mp import op, get
>>> @op(kind="inline")
... def add(a, b):
...     return a + b
>>> total = add.go(add.go(1, 2), add.go(3, 4))   # returns at once
>>> total.result()
10
>>> get([add.go(1, 1), add.go(2, 2)])
[2, 4]

::

    caller thread(s)                runtime loop thread                 engine
    ────────────────                ───────────────────                 ──────
    op.go(*args) ─▶ ObjectRef ──▶   inbox ─▶ admit: count unfinished
      (refs found in args,          deps; ready ─▶ by kind:
       nested containers too)         inline: call now
                                      async: a task on this loop
                                      thread/process/async-process:
                                        batch per pool, flushed once per
                                        loop turn ──────────────────────▶  submit_calls: a few
                                    outcomes ◀── inbox ◀────────────────── chunks per batch
                                    complete: value to the ref, wake
                                    waiters, dependents' counters -1
    ref.result() / await ref ◀──────┘   callbacks, hooks ─▶ callback thread

All graph state belongs to one thread, the runtime's event-loop thread: other threads
only append to its inbox. ``ref.result()`` blocks on an event, so it works from scripts,
threads and notebook cells (whose own loop is running); ``await ref`` works on any loop.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextvars
import functools
import importlib
import inspect
import itertools
import math
import os
import threading
import time
import weakref
from typing import Any, Callable, Coroutine, Iterable, Iterator, Sequence

from twat_mp import _options, profiling, state
from twat_mp._logging import logger
from twat_mp.errors import OpError, RuntimeClosedError, TaskTimeoutError

__all__ = ["ObjectRef", "Op", "Runtime", "as_completed", "get", "op", "run_sync", "shutdown", "wait"]

KINDS = ("inline", "async", "thread", "process", "async-process")
_POOL_KINDS = ("thread", "process", "async-process")
#: A batch sent to a pool is cut into chunks of about this long, once ops' times are known.
TARGET_CHUNK_SECONDS = 0.02

PENDING, QUEUED, RUNNING, DONE, FAILED, CANCELLED = range(6)
_STATE_NAMES = ("pending", "queued", "running", "done", "failed", "cancelled")
_CONTAINERS = (list, tuple, set, frozenset)


# -- ops ------------------------------------------------------------------------------------
class Op:
    """A function that can run as a task of a graph (made by ``@op``).

    Calling it runs the plain function; ``.go(*args, **kwargs)`` submits a task to the
    current runtime and returns an :class:`ObjectRef` at once.
    """

    fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any], *, kind: str | None = None, name: str | None = None,
                 retries: int = 0, timeout: float | None = None, nodes: int | None = None) -> None:
        if isinstance(fn, Op):
            fn = fn.fn
        if not callable(fn):
            raise TypeError(f"@op decorates a function, got {fn!r}")
        is_async = inspect.iscoroutinefunction(fn)
        if kind is None:
            kind = "async" if is_async else "thread"
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        if is_async and kind in ("inline", "thread", "process"):
            raise TypeError(f"{_name_of(fn)} is an async function: use kind='async' (on the runtime's "
                            "event loop) or kind='async-process' (in async worker processes)")
        if not is_async and kind == "async":
            raise TypeError(f"{_name_of(fn)} is not an async function, so it would block the event loop: "
                            "use kind='thread', 'process' or 'inline' (or define it with async def)")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.fn = fn
        self.kind = kind
        self.name = name or _name_of(fn)
        self.retries = _options.check_retries(retries)
        self.timeout = _options.check_timeout(timeout)
        if self.timeout is not None and kind == "inline":
            raise ValueError("timeout= cannot stop an inline op (it runs on the scheduler's thread); "
                             "use kind='thread', 'process', 'async' or 'async-process'")
        self.nodes = None if nodes is None else _options.check_nodes(nodes, "nodes", _pool_kind(kind))
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def go(self, *args: Any, **kwargs: Any) -> ObjectRef:
        """Submit ``self(*args, **kwargs)`` as a task and return its ref at once. Refs in
        the arguments (also inside lists, tuples, dicts and sets) are dependencies: the
        task runs once they are done, with their values in their place."""
        return current_runtime().submit(self, args, kwargs)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        """An op defined in a class body binds like a method: ``obj.method.go(x)``."""
        if instance is None:
            return self
        return _BoundOp(self, instance)

    def options(self, **changes: Any) -> Op:
        """A copy of this op with some options changed: ``f.options(kind="process").go(x)``."""
        settings: dict[str, Any] = {"kind": self.kind, "name": self.name, "retries": self.retries,
                                    "timeout": self.timeout, "nodes": self.nodes}
        unknown = sorted(set(changes) - set(settings))
        if unknown:
            raise TypeError(f"{self.name}.options() got unknown option(s) {unknown}; valid options are "
                            f"{sorted(settings)}")
        settings.update(changes)
        return Op(self.fn, **settings)

    def __reduce__(self) -> Any:
        # By reference where the op is importable under its name (workers then load it
        # by import); otherwise by value: the function and the options.
        module, qualname = getattr(self.fn, "__module__", None), getattr(self.fn, "__qualname__", "")
        if module and module != "__main__" and "<" not in qualname:
            try:
                found = _lookup(module, qualname)
            except (ImportError, AttributeError):
                found = None
            if found is self:
                return (_lookup, (module, qualname))
        return (_rebuild_op, (self.fn, self.kind, self.name, self.retries, self.timeout, self.nodes))

    def __repr__(self) -> str:
        return f"<op {self.name} kind={self.kind}>"


class _BoundOp:
    """An op looked up on an instance: calls and tasks get the instance first."""

    def __init__(self, fn: Op, instance: Any) -> None:
        self.op = fn
        self.instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.op.fn(self.instance, *args, **kwargs)

    def go(self, *args: Any, **kwargs: Any) -> ObjectRef:
        return current_runtime().submit(self.op, (self.instance, *args), kwargs)

    def __repr__(self) -> str:
        return f"<bound op {self.op.name} of {self.instance!r}>"


class ExternalOp(Op):
    """An op whose tasks another layer runs (a service's method): when a task is ready,
    the runtime calls ``start(runtime, ref, args, kwargs)`` on its loop thread, and that
    layer later calls ``runtime.settle(ref, ok, value)`` there (``runtime.post`` from
    other threads). Dependencies, failures, hooks and profiles work as for any op."""

    def __init__(self, name: str) -> None:  # no function of its own: no checks of one
        self.fn = self._not_callable
        self.kind = "external"
        self.name = name
        self.retries = 0
        self.timeout = None
        self.nodes = None

    def _not_callable(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self.name} runs only as a task: use .go()")

    def start(self, runtime: Runtime, ref: ObjectRef, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def __reduce__(self) -> Any:
        raise TypeError(f"{self.name} cannot be pickled: it lives in the process that made it")

    def __repr__(self) -> str:
        return f"<external op {self.name}>"


def _name_of(fn: Any) -> str:
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def _pool_kind(kind: str) -> str:
    return "thread" if kind == "thread" else "process"


def _lookup(module: str, qualname: str) -> Any:
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _rebuild_op(fn: Callable[..., Any], kind: str, name: str, retries: int, timeout: float | None,
                nodes: int | None) -> Op:
    return Op(fn, kind=kind, name=name, retries=retries, timeout=timeout, nodes=nodes)


def op(fn: Callable[..., Any] | None = None, /, *, kind: str | None = None, name: str | None = None,
       retries: int = 0, timeout: float | None = None, nodes: int | None = None) -> Any:
    """Make ``fn`` an op of task graphs: ``@op`` or ``@op(kind=..., ...)``.

    Args:
        kind: where its tasks run: ``"async"`` (the default for ``async def``: on the
            runtime's event loop), ``"thread"`` (the default for a plain function: the
            runtime's thread pool), ``"process"`` (worker processes), ``"async-process"``
            (``async def`` functions in async worker processes) or ``"inline"`` (called
            on the scheduler's thread as soon as it is ready: for trivial functions).
        name: the op's name in errors and profiles (default: the function's).
        retries: run a task again when its worker died or it timed out, up to this many
            times (exceptions it raises are not retried), as for maps.
        timeout: seconds a task may run (not for ``inline``).
        nodes: the size of the pool its tasks run on (default: the runtime's).

    >>> @op
    ... def double(x):
    ...     return 2 * x
    >>> double(4), double.go(4).result()
    (8, 8)
    """
    if fn is None:
        return functools.partial(op, kind=kind, name=name, retries=retries, timeout=timeout, nodes=nodes)
    return Op(fn, kind=kind, name=name, retries=retries, timeout=timeout, nodes=nodes)


# -- refs -----------------------------------------------------------------------------------
class ObjectRef:
    """The future result of a task: awaitable, and usable from sync code.

    Pass it to another op's ``.go()`` to make a dependency; ``result()`` blocks for the
    value (or raises the task's error), ``await ref`` waits on any event loop.
    """

    __slots__ = (
        "__weakref__",
        "_args",
        "_callbacks",
        "_deep",
        "_dependents",
        "_deps",
        "_id",
        "_kwargs",
        "_left",
        "_op",
        "_rt",
        "_state",
        "_times",
        "_value",
        "_waiters",
    )

    _ids = itertools.count(1)

    def __init__(self, rt: Runtime, fn: Op, args: tuple[Any, ...], kwargs: dict[str, Any] | None,
                 deps: list[ObjectRef] | None, deep: bool) -> None:
        self._id = next(ObjectRef._ids)
        self._rt = rt
        self._op = fn
        self._args: tuple[Any, ...] | None = args
        self._kwargs = kwargs
        self._deps = deps
        self._deep = deep
        self._left = 0
        self._dependents: list[ObjectRef] | None = None
        self._state = PENDING
        self._value: Any = None
        self._waiters: list[Callable[[ObjectRef], None]] | None = None
        self._callbacks: list[Callable[[ObjectRef], Any]] | None = None
        self._times: list[float] | None = None

    # -- what a hook or a user may read --------------------------------------------------
    @property
    def op(self) -> Op:
        """The op this task runs."""
        return self._op

    @property
    def task_id(self) -> int:
        return self._id

    @property
    def args(self) -> tuple[Any, ...]:
        """The task's positional arguments as given (refs unresolved); empty once it has
        finished (they are released then)."""
        return self._args or ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self._kwargs or {})

    # -- the future ----------------------------------------------------------------------
    def done(self) -> bool:
        """True once the task finished, failed or was cancelled, or its runtime was shut
        down before it finished (it then fails with ``RuntimeClosedError``)."""
        return self._state >= DONE or self._rt._closed

    def cancelled(self) -> bool:
        return self._state == CANCELLED

    def result(self, timeout: float | None = None) -> Any:
        """The task's value, waiting up to ``timeout`` seconds (``TimeoutError`` after
        that). Raises the op's own exception if it failed, an ``OpError`` if an op it
        depends on failed, ``concurrent.futures.CancelledError`` if it was cancelled."""
        if self._state < DONE:
            self._wait(timeout)
        return self._outcome()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception (None if it succeeded), waiting like ``result``."""
        if self._state < DONE:
            self._wait(timeout)
        if self._state == CANCELLED:
            raise concurrent.futures.CancelledError(f"task {self._op.name}#{self._id} was cancelled")
        if self._state == FAILED:
            error: BaseException = self._value
            return error
        if self._state < DONE:
            return RuntimeClosedError(self._closed_text())
        return None

    def cancel(self) -> bool:
        """Cancel the task if it has not started; what depends on it is cancelled too.
        Returns whether it is now cancelled (False once it runs or has finished)."""
        return bool(self._rt.call_on_loop(self._rt._cancel, self))

    def add_done_callback(self, fn: Callable[[ObjectRef], Any]) -> None:
        """Call ``fn(ref)`` once the task is done, on the runtime's callback thread (at
        once, there, if it already is). Its exceptions go to ``threading.excepthook``."""
        if not callable(fn):
            raise TypeError(f"add_done_callback() takes a callable, got {fn!r}")
        rt = self._rt
        with rt._lock:
            if self._state < DONE and not rt._closed:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                rt._watched.add(self)
                return
        rt._callback_thread.put(fn, self)

    def __await__(self) -> Any:
        if self._state < DONE:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            rt = self._rt
            if loop is rt._loop:
                def wake(_: ObjectRef) -> None:
                    if not future.done():
                        future.set_result(None)
            else:
                def wake(_: ObjectRef) -> None:
                    if not loop.is_closed():  # an awaiter that gave up may have closed its loop
                        loop.call_soon_threadsafe(_set_if_pending, future)
            if rt._add_waiter(self, wake):
                try:
                    yield from future.__await__()
                except BaseException:  # the awaiter gave up (cancelled, wait_for timed out)
                    rt._remove_waiter(self, wake)
                    raise
        return self._outcome()

    # -- inside ------------------------------------------------------------------------------
    def _outcome(self) -> Any:
        state_ = self._state
        if state_ == DONE:
            return self._value
        if state_ == FAILED:
            raise self._value
        if state_ == CANCELLED:
            raise concurrent.futures.CancelledError(f"task {self._op.name}#{self._id} was cancelled")
        raise RuntimeClosedError(self._closed_text())

    def _closed_text(self) -> str:
        return (f"task {self._op.name}#{self._id} never finished: its runtime was shut down "
                "(twat_mp.shutdown() or the end of its `with Runtime()` block); submit it again")

    def _wait(self, timeout: float | None) -> None:
        rt = self._rt
        if threading.get_ident() == rt._loop_ident:
            raise RuntimeError(
                f"ref.result() of {self._op.name}#{self._id} was called on the runtime's own event loop "
                "(inside an async or inline op), where it would wait forever: use `await ref` there")
        event = threading.Event()
        wake = _event_setter(event)
        if rt._add_waiter(self, wake) and not event.wait(timeout):
            rt._remove_waiter(self, wake)
            raise TimeoutError(f"task {self._op.name}#{self._id} was not done after {timeout}s "
                               f"(it is {_STATE_NAMES[self._state]})")

    def __reduce__(self) -> Any:
        raise TypeError(
            f"an ObjectRef ({self._op.name}#{self._id}) cannot be pickled: it belongs to the runtime of "
            "the process that made it. Pass it to .go() (its value is sent), or send ref.result()")

    def __repr__(self) -> str:
        return f"<ObjectRef {self._op.name}#{self._id} {_STATE_NAMES[self._state]}>"


def _event_setter(event: threading.Event) -> Callable[[ObjectRef], None]:
    return lambda _: event.set()


def _set_if_pending(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def _collect(value: Any, found: list[ObjectRef]) -> None:
    kind = type(value)
    if kind is ObjectRef:
        found.append(value)
    elif kind in _CONTAINERS:
        for item in value:
            _collect(item, found)
    elif kind is dict:
        for key, item in value.items():
            _collect(key, found)
            _collect(item, found)


def _substitute(value: Any) -> Any:
    kind = type(value)
    if kind is ObjectRef:
        return value._value
    if kind in _CONTAINERS:
        return kind(_substitute(item) for item in value)
    if kind is dict:
        return {_substitute(key): _substitute(item) for key, item in value.items()}
    return value


def _abbreviate(args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None) -> str:
    parts = [_short(a) for a in args or ()] + [f"{k}={_short(v)}" for k, v in (kwargs or {}).items()]
    text = ", ".join(parts)
    return f"({text[:200]}{'...' if len(text) > 200 else ''})"


def _short(value: Any) -> str:
    if type(value) is ObjectRef:
        return f"<ref {value._op.name}#{value._id}>"
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<{type(value).__name__}: repr raised {type(exc).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


# -- the callback thread ----------------------------------------------------------------------
class _CallbackThread:
    """One thread per runtime that runs done-callbacks and hooks (never the loop thread or
    the engine's manager thread); an exception goes to ``threading.excepthook``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._ready = threading.Semaphore(0)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        self._queue.append((fn, args))
        self._ready.release()

    def _run(self) -> None:
        while True:
            self._ready.acquire()
            fn, args = self._queue.popleft()
            if fn is _STOP:
                return
            try:
                fn(*args)
            except Exception as exc:
                threading.excepthook(threading.ExceptHookArgs(
                    (type(exc), exc, exc.__traceback__, threading.current_thread())))

    def stop(self, timeout: float) -> None:
        if self._thread is not None:
            self.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout)


def _STOP() -> None:
    """The callback thread's stop marker."""


# -- the runtime -------------------------------------------------------------------------------
_current: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar("twat_mp_runtime", default=None)
_default: Runtime | None = None
_default_lock = threading.Lock()
_live: weakref.WeakSet[Runtime] = weakref.WeakSet()


class Runtime:
    """A scheduler for task graphs with its own event-loop thread, pools and hooks.

    A default runtime is made on first use, so ``.go()`` needs no set-up; ``with
    Runtime(...)`` gives an isolated one, made current inside the block (also for
    ``.go()`` called inside its ops) and shut down at its end.

    Args:
        nodes: the size of each process pool (default: the CPUs this process may use).
        threads: the size of the thread pool (default: ``min(32, CPUs + 4)``).
        concurrency: calls each async worker process runs at once (``async-process``).
        start_method: how worker processes start ("forkserver", the default on Linux,
            "spawn" or "fork"), as for ``ProcessPool``.
        name: shown in thread names and reprs.

    >>> from twat_mp import Runtime, op
    >>> @op(kind="inline")
    ... def inc(x):
    ...     return x + 1
    >>> with Runtime(threads=4) as rt:
    ...     inc.go(inc.go(1)).result()
    3
    """

    _names = itertools.count(1)

    def __init__(self, *, nodes: int | None = None, threads: int | None = None, concurrency: int = 16,
                 start_method: str | None = None, name: str | None = None) -> None:
        self.nodes = _options.check_nodes(nodes, "nodes")
        self.start_method = _options.check_start_method(start_method)
        cpus = _options.cpu_count()
        self.threads = _options.check_nodes(threads if threads is not None else min(32, cpus + 4),
                                            "threads", "thread")
        self.concurrency: int = _options.check_positive_int(  # type: ignore[assignment]
            "concurrency", concurrency, allow_none=False)
        self.name = name or f"runtime-{next(Runtime._names)}"
        self._lock = threading.Lock()
        self._closed = False
        self._before: list[Callable[[ObjectRef], Any]] = []
        self._after: list[Callable[[ObjectRef, Any], Any]] = []
        self._inbox: collections.deque[Any] = collections.deque()
        self._wake_pending = False
        self._batches: dict[tuple[str, int | None], list[ObjectRef]] = {}
        self._flush_pending = False
        self._pools: dict[tuple[str, int | None], Any] = {}
        self._watched: set[ObjectRef] = set()  # unfinished refs someone waits on or has callbacks on
        self._running: set[asyncio.Task[Any]] = set()
        self._callback_thread = _CallbackThread(f"twat-mp-{self.name}-callbacks")
        # In a process worker, process kinds run in that worker (on threads, or its loop):
        # a nested graph never waits on the pool its own task holds a slot of.
        self._kind_map = {"process": "thread", "async-process": "async"} if state.in_process_worker() else {}
        self._loop = asyncio.new_event_loop()
        self._loop_ident = -1
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name=f"twat-mp-{self.name}",
                                        daemon=True)
        self._thread.start()
        started.wait()
        self._token: contextvars.Token[Runtime | None] | None = None
        self._enter_hooks: list[Callable[[], Any]] = []
        self._closers: list[Callable[[], Any]] = []
        _live.add(self)

    def _serve(self, started: threading.Event) -> None:
        self._loop_ident = threading.get_ident()
        _current.set(self)  # ops running on this loop submit to this runtime
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> Runtime:
        self._check_open()
        self._token = _current.set(self)
        try:
            for hook in self._enter_hooks:
                hook()
        except BaseException:
            self.__exit__()
            raise
        return self

    def on_enter(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` when a ``with`` block of this runtime starts (services deploy)."""
        self._enter_hooks.append(fn)

    def on_shutdown(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` first thing when this runtime shuts down (services stop)."""
        self._closers.append(fn)

    def __exit__(self, *exc: Any) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None
        self.shutdown()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError(f"{self!r} is shut down; make a new Runtime (or use the default one)")

    # -- hooks -------------------------------------------------------------------------------
    def add_hook(self, *, before_submit: Callable[[ObjectRef], Any] | None = None,
                 after_complete: Callable[[ObjectRef, Any], Any] | None = None) -> None:
        """Register hooks, run on the runtime's callback thread.

        ``before_submit(task)`` sees each task before it is scheduled; returning an
        ``Op`` (or any callable) reroutes the task to it, with the same arguments;
        raising fails the task with that exception. ``after_complete(task, outcome)``
        sees each finished task with its value or its exception.
        """
        for hook in (before_submit, after_complete):
            if hook is not None and not callable(hook):
                raise TypeError(f"a hook must be callable, got {hook!r}")
        if before_submit is not None:
            self._before = [*self._before, before_submit]
        if after_complete is not None:
            self._after = [*self._after, after_complete]

    def remove_hooks(self) -> None:
        """Forget every hook."""
        self._before, self._after = [], []

    # -- submission (any thread) ---------------------------------------------------------------
    def submit(self, fn: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ObjectRef:
        """Submit ``fn(*args, **kwargs)``; what ``Op.go`` calls."""
        if self._closed:
            self._check_open()
        found: list[ObjectRef] = []
        deep = False
        for arg in args:
            kind = type(arg)
            if kind is ObjectRef:
                found.append(arg)
            elif kind in _CONTAINERS or kind is dict:
                before = len(found)
                _collect(arg, found)
                deep = deep or len(found) > before
        if kwargs:
            before = len(found)
            _collect(kwargs, found)
            deep = deep or len(found) > before
        else:
            kwargs = None  # type: ignore[assignment]
        deps: list[ObjectRef] | None = None
        if found:
            deps = list(dict.fromkeys(found)) if len(found) > 1 else found
            for dep in deps:
                if dep._rt is not self:
                    if dep._rt._closed:
                        raise RuntimeClosedError(
                            f"{dep!r} belongs to a runtime that was shut down; submit its task again")
                    raise ValueError(f"{dep!r} belongs to another runtime ({dep._rt.name}); a graph stays in "
                                     "one runtime: pass ref.result() instead")
        ref = ObjectRef(self, fn, args, kwargs, deps, deep)
        if self._before:
            self._callback_thread.put(self._run_before_hooks, ref)
        elif threading.get_ident() == self._loop_ident:
            self._admit(ref)
        else:
            self._post(ref)
        return ref

    def _post(self, item: Any) -> None:
        """Hand a ref to admit, or a function to call, to the loop thread (any thread)."""
        self._inbox.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: shutdown fails what is left
                self._wake_pending = False

    def _run_before_hooks(self, ref: ObjectRef) -> None:
        try:
            for hook in self._before:
                replacement = hook(ref)
                if replacement is not None:
                    if not isinstance(replacement, Op):
                        if not callable(replacement):
                            raise TypeError(f"before_submit returned {replacement!r}: return None, an op or "
                                            "a callable")
                        replacement = Op(replacement)
                    ref._op = replacement
        except Exception as exc:
            self._post(functools.partial(self._fail, ref, exc))
            return
        self._post(ref)

    def call_on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the loop thread and return its result (any thread)."""
        if threading.get_ident() == self._loop_ident or self._closed or self._loop.is_closed():
            return fn(*args)  # (once shut down, nothing else touches the graph)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self._post(call)
        return future.result()

    # -- the loop thread ---------------------------------------------------------------------------
    def _drain(self) -> None:
        self._wake_pending = False
        inbox = self._inbox
        while inbox:
            item = inbox.popleft()
            if type(item) is ObjectRef:
                try:
                    self._admit(item)
                except Exception as exc:  # a bug of ours must still fail the task, not lose it
                    logger.debug("twat-mp graph: admitting {} failed: {!r}", item, exc)
                    self._fail(item, exc)
            else:
                try:
                    item()
                except Exception as exc:  # one broken hand-off must not drop the rest of the inbox
                    threading.excepthook(threading.ExceptHookArgs((type(exc), exc, exc.__traceback__,
                                                                   threading.current_thread())))

    def _admit(self, ref: ObjectRef) -> None:
        if ref._state != PENDING:  # cancelled before it was admitted
            return
        if profiling.active:
            ref._times = [time.perf_counter()]
        left = 0
        deps = ref._deps
        if deps:
            for dep in deps:
                if profiling.active:
                    for prof in profiling.active:
                        prof.edge(dep._op.name, ref._op.name)
                state_ = dep._state
                if state_ == DONE:
                    continue
                if state_ == FAILED:
                    self._fail(ref, _as_op_error(dep, ref))
                    return
                if state_ == CANCELLED:
                    self._cancel(ref)
                    return
                if dep._dependents is None:
                    dep._dependents = [ref]
                else:
                    dep._dependents.append(ref)
                left += 1
        ref._left = left
        if left == 0:
            self._ready(ref)

    def _ready(self, ref: ObjectRef) -> None:
        if ref._times is not None:
            ref._times.append(time.perf_counter())
        fn = ref._op
        kind = fn.kind
        kind = self._kind_map.get(kind, kind)
        if kind == "external":  # another layer runs it (a service): it calls settle() when done
            ref._state = RUNNING
            if ref._times is not None:
                ref._times.append(time.perf_counter())
            try:
                args, kwargs = self._arguments(ref)
                fn.start(self, ref, args, kwargs)  # type: ignore[attr-defined]
            except Exception as exc:
                self._fail(ref, exc)
        elif kind == "inline":
            ref._state = RUNNING
            if ref._times is not None:
                ref._times.append(time.perf_counter())
            try:
                args, kwargs = self._arguments(ref)
                value = fn.fn(*args, **kwargs)
            except BaseException as exc:  # SystemExit too: it must not end the loop thread
                self._fail(ref, exc)
            else:
                self._complete(ref, value)
        elif kind == "async":
            ref._state = RUNNING
            if ref._times is not None:
                ref._times.append(time.perf_counter())
            task = self._loop.create_task(self._drive(ref))
            self._running.add(task)
        else:
            ref._state = QUEUED
            key = (kind, fn.nodes)
            batch = self._batches.get(key)
            if batch is None:
                self._batches[key] = [ref]
            else:
                batch.append(ref)
            if not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)

    @staticmethod
    def _arguments(ref: ObjectRef) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = ref._args or (), ref._kwargs or {}
        if ref._deps:
            if ref._deep:
                args = tuple(_substitute(a) for a in args)
                kwargs = _substitute(kwargs) if kwargs else kwargs
            else:
                args = tuple(a._value if type(a) is ObjectRef else a for a in args)
        return args, kwargs

    async def _drive(self, ref: ObjectRef) -> None:
        fn = ref._op
        try:
            args, kwargs = self._arguments(ref)
            attempts = fn.retries + 1
            while True:
                attempts -= 1
                try:
                    if fn.timeout is None:
                        value = await fn.fn(*args, **kwargs)
                    else:
                        value = await asyncio.wait_for(fn.fn(*args, **kwargs), fn.timeout)
                    break
                except asyncio.TimeoutError:
                    if fn.timeout is None or attempts <= 0:
                        if fn.timeout is None:
                            raise
                        raise TaskTimeoutError([_abbreviate(args, kwargs)], fn.timeout) from None
        except asyncio.CancelledError:
            if not self._closed:
                self._fail(ref, concurrent.futures.CancelledError(f"task {fn.name}#{ref._id} was cancelled"))
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # never out of the loop thread
            self._fail(ref, exc)
        else:
            self._complete(ref, value)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)

    def _flush(self) -> None:
        self._flush_pending = False
        batches, self._batches = self._batches, {}
        for (kind, nodes), refs in batches.items():
            refs = [ref for ref in refs if ref._state == QUEUED]
            if not refs:
                continue
            try:
                dispatcher, workers = self._pool(kind, nodes)
            except Exception as exc:
                for ref in refs:
                    self._fail(ref, exc)
                continue
            singles = [ref for ref in refs if ref._op.timeout is not None]
            for ref in singles:
                self._send(dispatcher, [ref], ref._op.timeout, ref._op.retries)
            by_retries: dict[int, list[ObjectRef]] = {}
            for ref in refs:
                if ref._op.timeout is None:
                    by_retries.setdefault(ref._op.retries, []).append(ref)
            for retries, group in by_retries.items():
                size = self._chunk_size(dispatcher, group, workers)
                for start in range(0, len(group), size):
                    self._send(dispatcher, group[start:start + size], None, retries)

    def _chunk_size(self, dispatcher: Any, refs: list[ObjectRef], workers: int) -> int:
        even = math.ceil(len(refs) / workers)
        slowest = 0.0
        for ref in refs[:64]:
            seconds = dispatcher.item_seconds.get(id(ref._op.fn))  # learned by the engine's pool
            if seconds is None:  # not seen yet: four chunks a worker, as a map starts
                return max(1, math.ceil(len(refs) / (workers * 4)))
            slowest = max(slowest, seconds)
        return max(1, min(even, int(TARGET_CHUNK_SECONDS / max(slowest, 1e-7))))

    def _send(self, dispatcher: Any, refs: list[ObjectRef], timeout: float | None, retries: int) -> None:
        from twat_mp._engine.calls import submit_calls

        calls = []
        now = time.perf_counter() if profiling.active else 0.0
        for ref in refs:
            args, kwargs = self._arguments(ref)
            calls.append((ref._op, args, kwargs))
            ref._state = RUNNING
            if ref._times is not None:
                ref._times.append(now)
        try:
            submit_calls(dispatcher, calls, functools.partial(self._landed, dispatcher, refs),
                         self._post, timeout=timeout, retries=retries)
        except Exception as exc:
            for ref in refs:
                self._fail(ref, exc)

    def _landed(self, dispatcher: Any, refs: list[ObjectRef], outcome: Any, elapsed: float) -> None:
        if isinstance(outcome, BaseException):
            for ref in refs:
                self._fail(ref, outcome)
            return
        each = elapsed / len(refs) if refs else 0.0
        if refs:
            dispatcher.remember_cost(id(refs[0]._op.fn), each)
        if profiling.active:  # a batch is timed as a whole: give each task its share
            now = time.perf_counter()
            for ref in refs:
                if ref._times is not None and len(ref._times) >= 3:
                    ref._times[2] = max(ref._times[1], now - each)
        for ref, (ok, value) in zip(refs, outcome):
            if ok:
                self._complete(ref, value)
            else:
                self._fail(ref, value)

    def _pool(self, kind: str, nodes: int | None) -> tuple[Any, int]:
        key = (kind, nodes)
        pool = self._pools.get(key)
        if pool is None or not pool.alive:
            if kind == "thread":
                from twat_mp.pools import ThreadPool

                pool = ThreadPool(nodes or self.threads, initializer=_enter_runtime, initargs=(self,))._open()
            elif kind == "process":
                from twat_mp.pools import ProcessPool

                pool = ProcessPool(nodes or self.nodes, start_method=self.start_method)._open()
            else:
                from twat_mp.aio import AsyncMultiPool

                pool = AsyncMultiPool(nodes or self.nodes, childconcurrency=self.concurrency,
                                      start_method=self.start_method).start()
            self._pools[key] = pool
        dispatcher = pool._engine()
        return dispatcher, dispatcher.nodes

    # -- outcomes (loop thread) ----------------------------------------------------------------------
    def settle(self, ref: ObjectRef, ok: bool, value: Any) -> None:
        """Finish a task run by another layer (an external op): its value, or its
        exception when ``ok`` is false. On the loop thread; elsewhere use ``post``."""
        if ok:
            self._complete(ref, value)
        else:
            self._fail(ref, value)

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the runtime's loop thread, soon (from any thread)."""
        self._post(fn)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The runtime's event loop (its own thread runs it)."""
        return self._loop

    def _complete(self, ref: ObjectRef, value: Any) -> None:
        if ref._state >= DONE:
            return
        waiters, callbacks = self._settle(ref, DONE, value)
        self._finished(ref, value, waiters, callbacks, False)
        dependents = ref._dependents
        if dependents:
            ref._dependents = None
            for dep in dependents:
                if dep._state == PENDING:
                    dep._left -= 1
                    if dep._left == 0:
                        self._ready(dep)

    def _settle(self, ref: ObjectRef, new_state: int, value: Any) -> tuple[Any, Any]:
        """Give ``ref`` its outcome; return its waiters and callbacks to call."""
        with self._lock:
            ref._state = new_state
            ref._value = value
            waiters, ref._waiters = ref._waiters, None
            callbacks, ref._callbacks = ref._callbacks, None
            if waiters or callbacks:
                self._watched.discard(ref)
        return waiters, callbacks

    def _finished(self, ref: ObjectRef, outcome: Any, waiters: list[Callable[[ObjectRef], None]] | None,
                  callbacks: list[Callable[[ObjectRef], Any]] | None, failed: bool) -> None:
        if ref._times is not None and len(ref._times) >= 3:
            end = time.perf_counter()
            _, ready, start = ref._times[:3]
            for prof in profiling.active:
                prof.record(ref._op.name, start - ready, end - start, failed)
        if self._after:
            for hook in self._after:
                self._callback_thread.put(hook, ref, outcome)
        ref._args = ref._kwargs = ref._deps = None  # release the inputs (and the refs they hold)
        if waiters:
            for wake in waiters:
                wake(ref)
        if callbacks:
            for callback in callbacks:
                self._callback_thread.put(callback, ref)

    def _fail(self, ref: ObjectRef, error: BaseException, new_state: int = FAILED) -> None:
        """Fail ``ref`` with ``error`` and everything that depends on it with an OpError."""
        stack = [(ref, error)]
        while stack:
            current, exc = stack.pop()
            if current._state >= DONE:
                continue
            waiters, callbacks = self._settle(current, new_state, exc)
            dependents, current._dependents = current._dependents, None
            if new_state == FAILED:
                for dep in dependents or ():
                    stack.append((dep, _as_op_error(current, dep)))
            else:
                stack.extend((dep, exc) for dep in dependents or ())
            self._finished(current, exc, waiters, callbacks, new_state == FAILED)

    def _cancel(self, ref: ObjectRef) -> bool:
        if ref._state >= RUNNING:
            return ref._state == CANCELLED
        error = concurrent.futures.CancelledError(f"task {ref._op.name}#{ref._id} was cancelled")
        self._fail(ref, error, CANCELLED)
        return True

    def _remove_waiter(self, ref: ObjectRef, wake: Callable[[ObjectRef], None]) -> None:
        """Forget a waiter that stopped waiting (a timeout, a cancelled await)."""
        with self._lock:
            waiters = ref._waiters
            if waiters is not None and wake in waiters:
                waiters.remove(wake)

    def _add_waiter(self, ref: ObjectRef, wake: Callable[[ObjectRef], None]) -> bool:
        """Register ``wake`` for when ``ref`` finishes; False if it already has (or can
        never, its runtime being shut down)."""
        with self._lock:
            if ref._state >= DONE or self._closed:
                return False
            if ref._waiters is None:
                ref._waiters = [wake]
            else:
                ref._waiters.append(wake)
            self._watched.add(ref)
            return True

    # -- async helpers -------------------------------------------------------------------------------
    def run_coroutine(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run ``coro`` on the runtime's event loop; a concurrent Future of its result."""
        self._check_open()
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- shutdown -------------------------------------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Stop the runtime: tasks not finished fail with ``RuntimeClosedError`` (running
        ones are abandoned), its pools and threads stop. Idempotent."""
        with self._lock:
            if self._closed:
                return
            closers, self._closers = self._closers, []
        for close in reversed(closers):  # services first, while the loop still runs
            try:
                close()
            except Exception as exc:
                threading.excepthook(threading.ExceptHookArgs((type(exc), exc, exc.__traceback__,
                                                               threading.current_thread())))
        with self._lock:
            if self._closed:
                return
            self._closed = True
        global _default
        with _default_lock:
            if _default is self:
                _default = None
        if not self._loop.is_closed() and self._thread.is_alive():
            # Bounded: an inline op stuck on the loop thread must not hang shutdown (or exit).
            stopped = threading.Event()

            def stop() -> None:
                try:
                    self._stop_on_loop()
                finally:
                    stopped.set()
                    self._loop.stop()

            if threading.get_ident() == self._loop_ident:
                stop()
            else:
                self._post(stop)
                stopped.wait(5.0 if wait else 1.0)
                self._thread.join(5.0 if wait else 0.5)
        self._fail_watched()
        for pool in self._pools.values():
            pool.terminate()
        if wait:
            for pool in self._pools.values():
                if pool._dispatcher is not None:
                    pool._dispatcher.join(5.0)
        self._pools.clear()
        self._callback_thread.stop(5.0 if wait else 0.0)

    def _stop_on_loop(self) -> None:
        for task in list(self._running):
            task.cancel()
        for refs in self._batches.values():
            for ref in refs:
                if ref._state < DONE:
                    self._fail(ref, RuntimeClosedError(ref._closed_text()))
        self._batches.clear()
        self._fail_watched()

    def _fail_watched(self) -> None:
        with self._lock:
            watched = [ref for ref in self._watched if ref._state < DONE]
            self._watched.clear()
        for ref in watched:
            self._fail(ref, RuntimeClosedError(ref._closed_text()))

    def __repr__(self) -> str:
        return f"<Runtime {self.name} {'closed' if self._closed else 'open'} nodes={self.nodes} threads={self.threads}>"


def _as_op_error(failed: ObjectRef, dependent: ObjectRef) -> OpError:
    """The error of ``dependent``, whose input ``failed`` failed."""
    error = failed._value
    if isinstance(error, OpError) and failed._op.name == error.chain[-1]:
        return OpError(error.op, error.inputs, [*error.chain, dependent._op.name], error.exception)
    return OpError(failed._op.name, _abbreviate(failed._args, failed._kwargs), [failed._op.name, dependent._op.name],
                   error)


def _enter_runtime(rt: Runtime) -> None:
    """Thread-pool initializer: ``.go()`` inside a thread op submits to its runtime."""
    _current.set(rt)


def current_runtime() -> Runtime:
    """The runtime ``.go()`` submits to: the innermost ``with Runtime()`` (or the one
    whose op is running), else the default runtime, made on first use."""
    rt = _current.get()
    if rt is not None and not rt._closed:
        return rt
    return default_runtime()


def default_runtime() -> Runtime:
    global _default
    rt = _default
    if rt is None or rt._closed:
        with _default_lock:
            rt = _default
            if rt is None or rt._closed:
                rt = _default = Runtime(name="default")
    return rt


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the current runtime's event loop and wait for its result: async
    code from sync code, also in a notebook cell whose own loop is running."""
    rt = current_runtime()
    if threading.get_ident() == rt._loop_ident:
        coro.close()
        raise RuntimeError("run_sync() was called on the runtime's own event loop, where it would wait "
                           "forever: await the coroutine instead")
    future = rt.run_coroutine(coro)
    try:
        return future.result()
    except BaseException:  # Ctrl-C (or any error here): the coroutine must not run on unseen
        future.cancel()
        raise


def shutdown() -> None:
    """End the default runtime (its unfinished tasks fail with ``RuntimeClosedError``)
    and every warm pool. The next ``.go()`` starts a fresh default runtime."""
    global _default
    with _default_lock:
        rt, _default = _default, None
    if rt is not None:
        rt.shutdown()
    from twat_mp.decorators import shutdown_warm_pools

    shutdown_warm_pools()


# -- waiting on many ----------------------------------------------------------------------------------
def get(refs: ObjectRef | Sequence[ObjectRef], timeout: float | None = None) -> Any:
    """The value of a ref, or the list of values of a sequence of refs (in order),
    waiting up to ``timeout`` seconds in all."""
    if isinstance(refs, ObjectRef):
        return refs.result(timeout)
    refs = list(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    return [ref.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for ref in refs]


def wait(refs: Sequence[ObjectRef], num_returns: int = 1,
         timeout: float | None = None) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """Wait until ``num_returns`` of ``refs`` are done, or ``timeout`` seconds pass;
    return ``(done, pending)``, each in the order of ``refs`` (``done`` holds at most
    ``num_returns``), as ``ray.wait`` does."""
    refs = list(refs)
    for ref in refs:
        if not isinstance(ref, ObjectRef):
            raise TypeError(f"wait() takes ObjectRefs, got {ref!r}")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int) or not 0 <= num_returns <= len(refs):
        raise ValueError(f"num_returns must be an int between 0 and len(refs)={len(refs)}, got {num_returns!r}")
    arrived = threading.Semaphore(0)
    count = 0

    def wake(_: ObjectRef) -> None:
        arrived.release()

    registered = []
    for ref in refs:
        if ref.done() or not ref._rt._add_waiter(ref, wake):
            count += 1
        else:
            registered.append(ref)
    deadline = None if timeout is None else time.monotonic() + timeout
    while count < num_returns:
        remaining = None if deadline is None else deadline - time.monotonic()
        if (remaining is not None and remaining <= 0) or not arrived.acquire(timeout=remaining):
            break
        count += 1
    for ref in registered:  # those still pending keep no waiter of ours
        ref._rt._remove_waiter(ref, wake)
    done_ids = {id(ref) for ref in refs if ref.done()}
    done = [ref for ref in refs if id(ref) in done_ids][:num_returns]
    chosen = {id(ref) for ref in done}
    return done, [ref for ref in refs if id(ref) not in chosen]


def as_completed(refs: Iterable[ObjectRef], timeout: float | None = None) -> Iterator[ObjectRef]:
    """Yield ``refs`` as they finish (those already done first); ``TimeoutError`` if
    ``timeout`` seconds pass before all have."""
    refs = list(dict.fromkeys(refs))
    arrived: collections.deque[ObjectRef] = collections.deque()
    ready = threading.Semaphore(0)
    pending = 0
    wake = functools.partial(_arrive, arrived, ready)
    for ref in refs:
        if not ref._rt._add_waiter(ref, wake):
            arrived.append(ref)
            ready.release()
        pending += 1
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            if (remaining is not None and remaining <= 0) or not ready.acquire(timeout=remaining):
                raise TimeoutError(f"{pending} of {len(refs)} refs were not done after {timeout}s")
            pending -= 1
            yield arrived.popleft()
    finally:  # a timeout, or a caller that stopped iterating: leave no waiter behind
        for ref in refs:
            ref._rt._remove_waiter(ref, wake)


def _arrive(arrived: collections.deque[ObjectRef], ready: threading.Semaphore, ref: ObjectRef) -> None:
    arrived.append(ref)
    ready.release()


def _shutdown_all() -> None:
    for rt in list(_live):
        rt.shutdown(wait=False)


def _forget_after_fork() -> None:
    global _default, _default_lock, _live
    _default = None
    _default_lock = threading.Lock()
    _live = weakref.WeakSet()


atexit.register(_shutdown_all)
os.register_at_fork(after_in_child=_forget_after_fork)
