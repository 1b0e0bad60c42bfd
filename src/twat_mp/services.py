"""Services: stateful ``@service`` classes replicated across the devices of a ``Mesh``,
supervised and restarted when they crash.

>>> from twat_mp import service
>>> @service(replicas=2, executor="thread")
... class Counter:
...     def __init__(self, start):
...         self.n = start
...     def add(self, k):
...         self.n += k
...         return self.n
>>> counter = Counter.init(10)
>>> counter.add(5) in (15,)       # a direct call returns the value from sync code
True
>>> counter.add.go(1).result() > 10   # .go() gives an ObjectRef, usable in op graphs
True
>>> counter.shutdown()

::

    handle.method.go(x) ─▶ capacity (backpressure: block, await, or ServiceOverloadedError)
        │                     ─▶ an ObjectRef of the runtime (an external op: deps resolved)
        ▼  on the runtime's loop thread
    router: least-loaded live replica with room (< max_concurrency in flight), else the
            handle's queue; per replica, the calls of one loop turn go as one chunk
        │
        ├─ process / async-process: the engine, one dispatcher per service, one slot per
        │  replica: the slot's initializer builds the instance (and restores its last
        │  checkpoint); calls go by method name to ``_invoke``, pinned to the slot; the
        │  engine's RestartPolicy restarts crashed replicas; its events reach observers
        ├─ thread: the same on the thread transport
        └─ async: the instance lives on the runtime's loop; async methods run there, sync
           methods on the replica's own thread (one at a time)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import inspect
import itertools
import sys
import threading
import time
from typing import Any, Callable

from twat_mp import _options, state
from twat_mp._logging import logger
from twat_mp.errors import (
    BrokenPoolError,
    ReplicaCrashedError,
    ServiceFailedError,
    ServiceOverloadedError,
    WorkerCrashedError,
)
from twat_mp.graph import ExternalOp, ObjectRef, Runtime, current_runtime

__all__ = ["ServiceEvent", "ServiceHandle", "deploy", "idempotent", "replica", "runtime", "service"]

EXECUTORS = ("process", "thread", "async", "async-process")
#: Restart strategies (seed 003) and the engine's restart modes they are.
STRATEGIES = {"permanent": "always", "transient": "abnormal", "temporary": "never"}
EVENTS = ("starting", "started", "crashed", "restarting", "failed", "stopping", "stopped")


@dataclasses.dataclass(frozen=True)
class ServiceOptions:
    """A service's options, checked once when it is decorated."""

    replicas: int = 1
    gpus: int = 0
    cpus: int | None = None
    executor: str = "process"
    max_concurrency: int = 8
    restart: str = "permanent"
    max_restarts: int = 3
    within_s: float = 60.0
    backoff_s: float = 0.05
    idempotent: bool = False
    queue_limit: int = 1024
    checkpoint_every: int = 1
    name: str | None = None

    def __post_init__(self) -> None:
        for field in ("replicas", "max_concurrency", "queue_limit", "checkpoint_every"):
            _options.check_positive_int(field, getattr(self, field), allow_none=False)
        for field in ("gpus", "max_restarts"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be an integer >= 0, got {value!r}")
        _options.check_positive_int("cpus", self.cpus)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(map(repr, EXECUTORS))}; got {self.executor!r}")
        if self.restart not in STRATEGIES:
            raise ValueError(f"restart must be one of {', '.join(map(repr, STRATEGIES))}; got {self.restart!r}")
        for field in ("within_s", "backoff_s"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{field} must be a number of seconds >= 0, got {value!r}")
        if not isinstance(self.idempotent, bool):
            raise ValueError(f"idempotent must be True or False, got {self.idempotent!r}")
        if self.gpus and self.executor in ("thread", "async"):
            raise ValueError(f"gpus={self.gpus} needs executor='process' or 'async-process' (a replica pinned "
                             "to its GPU in its own process)")


@dataclasses.dataclass(frozen=True)
class ServiceEvent:
    """A lifecycle event of a service's replica (``replica`` -1: the whole service):
    ``kind`` is one of starting, started, crashed, restarting, failed, stopping, stopped."""

    service: str
    replica: int
    kind: str
    pid: int | None = None
    exitcode: int | None = None
    detail: str = ""
    time: float = 0.0


def idempotent(method: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a service method safe to run twice: its calls on a replica that crashed are
    re-run on a live one instead of failing with ``ReplicaCrashedError``."""
    method.__twat_mp_idempotent__ = True  # type: ignore[attr-defined]
    return method


# -- the worker side: instances by (service key, slot), calls by method name ----------------------
_instances: dict[tuple[str, int], Any] = {}
_call_counts: dict[tuple[str, int], int] = collections.Counter()
_loops: dict[tuple[str, int], asyncio.AbstractEventLoop] = {}
_NO_CHECKPOINT = "twat_mp.services.no-checkpoint"


class _Checkpointed:
    """A method's value with the replica's state after it (``__checkpoint__()``)."""

    __slots__ = ("state", "value")

    def __init__(self, value: Any, state_: Any) -> None:
        self.value = value
        self.state = state_

    def __reduce__(self) -> Any:
        return (_Checkpointed, (self.value, self.state))

    def __repr__(self) -> str:
        return f"<the value of a call with the state __checkpoint__() returned: {self.state!r:.80}>"


def _slot() -> int:
    return state.worker_info().worker_id or 0


def _construct(key: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], checkpoint: Any,
               is_function: bool) -> None:
    """A slot initializer: build this replica's instance (restored from its checkpoint)."""
    instance = target if is_function else target(*args, **kwargs)
    if not (isinstance(checkpoint, str) and checkpoint == _NO_CHECKPOINT):
        instance.__restore__(checkpoint)
    _instances[(key, _slot())] = instance
    _call_counts[(key, _slot())] = 0


def _invoke(key: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], every: int) -> Any:
    """Run one call on this worker's replica, by method name."""
    where = (key, _slot())
    instance = _instances[where]
    method = instance if name == "__call__" else getattr(instance, name)
    value = method(*args, **kwargs)
    if inspect.isawaitable(value):
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a sync worker: its own loop, kept for the next async call
            loop = _loops.get(where)
            if loop is None:
                loop = _loops[where] = asyncio.new_event_loop()
            value = loop.run_until_complete(value)
        else:  # an async worker awaits it (run_call_async)
            return _checkpoint_after(where, instance, value, every)
    return _checkpointed(where, instance, value, every)


async def _checkpoint_after(where: tuple[str, int], instance: Any, value: Any, every: int) -> Any:
    return _checkpointed(where, instance, await value, every)


def _checkpointed(where: tuple[str, int], instance: Any, value: Any, every: int) -> Any:
    _call_counts[where] += 1
    checkpoint = getattr(instance, "__checkpoint__", None)
    if checkpoint is not None and _call_counts[where] % every == 0:
        return _Checkpointed(value, checkpoint())
    return value


# -- the caller's side ------------------------------------------------------------------------------
class _Room:
    """The calls a service may hold (queued or in flight): a counting semaphore whose
    waiters are threads (``acquire``) or coroutines (``acquire_async``: no thread, and
    a cancelled waiter takes nothing)."""

    def __init__(self, size: int) -> None:
        self.free = size
        self.size = size
        self._lock = threading.Lock()
        self._waiters: collections.deque[Any] = collections.deque()  # Events and (loop, future)

    def try_acquire(self) -> bool:
        with self._lock:
            if self.free > 0:
                self.free -= 1
                return True
            return False

    def acquire(self, timeout: float | None) -> bool:
        with self._lock:
            if self.free > 0:
                self.free -= 1
                return True
            event = threading.Event()
            self._waiters.append(event)
        if event.wait(timeout):
            return True  # release() handed its unit to this waiter
        with self._lock:
            if event in self._waiters:
                self._waiters.remove(event)
                return False
        return True  # handed over just as the wait ended

    async def acquire_async(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.free > 0:
                self.free -= 1
                return
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
        try:
            await future
        except asyncio.CancelledError:
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))
                    raise
            self.release()  # the unit arrived as it was cancelled: give it back
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if isinstance(waiter, threading.Event):
                    waiter.set()
                    return
                loop, future = waiter
                try:
                    loop.call_soon_threadsafe(_hand_over, future, self)
                except RuntimeError:  # its loop closed: that waiter is gone, try the next
                    continue
                return
            self.free = min(self.size, self.free + 1)


def _hand_over(future: asyncio.Future[None], room: _Room) -> None:
    if future.cancelled():
        room.release()  # its waiter went away meanwhile: pass the unit on
    else:
        future.set_result(None)


class _Call:
    __slots__ = ("args", "attempts", "kwargs", "method", "ref", "sent_at")

    def __init__(self, ref: ObjectRef, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.ref = ref
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.attempts = 0
        self.sent_at = 0.0


class _Replica:
    def __init__(self, index: int) -> None:
        self.index = index
        self.in_flight = 0
        self.outbox: list[_Call] = []
        self.alive = True
        self.pid: int | None = None
        self.calls = 0
        self.failures = 0
        self.restarts = 0
        self.busy = 0.0
        self.latencies: collections.deque[float] = collections.deque(maxlen=512)
        self.checkpoint: Any = _NO_CHECKPOINT
        self.history: list[float] = []  # when an async replica was restarted
        # async executor: the instance, and a thread for its sync methods
        self.instance: Any = None
        self.thread: _SerialThread | None = None


class _SerialThread:
    """One daemon thread running an async replica's sync methods in order (a daemon: a
    slow method never holds up interpreter exit)."""

    def __init__(self, name: str) -> None:
        self._queue: collections.deque[tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None] = \
            collections.deque()
        self._ready = threading.Semaphore(0)
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.append((future, fn))
        self._ready.release()
        return future

    def stop(self) -> None:
        self._queue.append(None)
        self._ready.release()

    def _run(self) -> None:
        while True:
            self._ready.acquire()
            work = self._queue.popleft()
            if work is None:
                return
            future, fn = work
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # SystemExit too: it belongs to the call
                future.set_exception(exc)


class _MethodOp(ExternalOp):
    """The op of one method of one handle: its tasks go to the handle's router."""

    def __init__(self, handle: ServiceHandle, method: str) -> None:
        super().__init__(f"{handle.name}.{method}")
        self.handle = handle
        self.method = method

    def start(self, runtime: Runtime, ref: ObjectRef, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.handle._enqueue(_Call(ref, self.method, args, kwargs))


class ServiceMethod:
    """``handle.method``: ``.go(...)`` gives an ObjectRef; calling it returns the value
    from sync code (a plain notebook cell too), and an awaitable from async code (an
    ``async def``, or a notebook cell that uses top-level ``await``)."""

    def __init__(self, handle: ServiceHandle, name: str) -> None:
        self.handle = handle
        self.name = name
        self._op = _MethodOp(handle, name)

    def go(self, *args: Any, block: bool = True, **kwargs: Any) -> ObjectRef:
        """Submit a call; returns its ref at once while the service's queue has room.
        When it is full, waits for room (``block=False``: ``ServiceOverloadedError``)."""
        handle = self.handle
        handle._take_room(block)
        return handle._submit(self._op, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _called_from_async_code(sys._getframe(1)):
            return self._acall(args, kwargs)
        return self.go(*args, **kwargs).result()

    async def _acall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        handle = self.handle
        if handle._status == "new":  # starting replicas blocks: not on the caller's loop
            await asyncio.get_running_loop().run_in_executor(None, handle.deploy)
        handle._check_running()
        await handle._room.acquire_async()  # full: wait, without a thread or blocking the loop
        return await handle._submit(self._op, args, kwargs)

    def __repr__(self) -> str:
        return f"<service method {self.handle.name}.{self.name}>"


class ServiceHandle:
    """A running (or about to run) service: ``handle.method.go(...)``, ``handle.method(...)``,
    ``deploy()``, ``shutdown()``, ``stats()``, ``on_event(callback)``."""

    _numbers = itertools.count(1)

    def __init__(self, service: ServiceClass, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.service = service
        self.options = service.options
        self.name = f"{service.name}#{next(ServiceHandle._numbers)}"
        self._key = f"{self.name}@{id(self):x}"
        self._args = args
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._status = "new"  # new, running, failed, stopped
        self._failure: BaseException | None = None
        opts = self.options
        self._room = _Room(opts.replicas * (opts.queue_limit + opts.max_concurrency))
        self._replicas = [_Replica(i) for i in range(opts.replicas)]
        self._queue: collections.deque[_Call] = collections.deque()
        self._flush_pending = False
        self._coroutine_methods: dict[str, bool] = {}  # async executor: method name -> async def?
        self._observers: list[Callable[[ServiceEvent], Any]] = []
        self._runtime: Runtime | None = None
        self._dispatcher: Any = None
        self._methods: dict[str, ServiceMethod] = {}

    # -- what users call ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> ServiceMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        methods: dict[str, ServiceMethod] = self.__dict__["_methods"]
        found = methods.get(name)
        if found is None:
            target = self.__dict__["service"].target
            if not callable(getattr(target, name, None)):
                raise AttributeError(f"service {self.__dict__['name']} has no method {name!r}")
            found = methods[name] = ServiceMethod(self, name)
            self.__dict__[name] = found  # the next access is a plain attribute lookup
        return found

    def go(self, *args: Any, block: bool = True, **kwargs: Any) -> ObjectRef:
        """For a service made from a function: submit a call of it."""
        return self._call_method().go(*args, block=block, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """For a service made from a function: call it (as ``ServiceMethod.__call__``)."""
        return self._call_method()(*args, **kwargs)

    def _call_method(self) -> ServiceMethod:
        if not self.service.is_function:
            raise TypeError(f"{self.name} is a service of class {self.service.name}: call its methods "
                            "(handle.method(...)), not the handle")
        found = self._methods.get("__call__")
        if found is None:
            found = self._methods["__call__"] = ServiceMethod(self, "__call__")
        return found

    @property
    def status(self) -> str:
        """"new", "running", "failed" or "stopped"."""
        return self._status

    def on_event(self, callback: Callable[[ServiceEvent], Any]) -> Callable[[ServiceEvent], Any]:
        """Call ``callback(event)`` for each lifecycle event (on the runtime's callback
        thread; an exception goes to ``threading.excepthook``). Returns the callback."""
        if not callable(callback):
            raise TypeError(f"on_event() takes a callable, got {callback!r}")
        self._observers.append(callback)
        return callback

    def deploy(self) -> ServiceHandle:
        """Start the replicas now (the first call does it otherwise), on the devices of the
        current ``Mesh``. Raises ``ResourceError`` when the mesh is too small."""
        with self._lock:
            if self._status == "running":
                return self
            if self._status in ("failed", "stopped"):
                raise ServiceFailedError(f"service {self.name} is {self._status}; make a new handle with "
                                         f"{self.service.name}.init(...)") from self._failure
            rt = current_runtime()
            self._start(rt)
            self._runtime = rt
            self._status = "running"
            rt.on_shutdown(self.shutdown)
        if self.options.executor == "async":  # outside the lock: a failing __init__ takes it
            rt.call_on_loop(self._start_async_replicas)
        return self

    def shutdown(self) -> None:
        """Stop the replicas; calls not finished fail with ``ServiceFailedError``."""
        with self._lock:
            if self._status in ("new", "stopped"):
                self._status = "stopped"
                return
            was_failed = self._status == "failed"
            self._status = "stopped"
        self._emit(-1, "stopping")
        error = ServiceFailedError(f"service {self.name} was shut down")
        rt = self._runtime
        if rt is not None and not rt.closed:
            rt.call_on_loop(self._fail_all, error)
        if self._dispatcher is not None:  # stop, not drain: what runs now fails (as documented)
            self._dispatcher.terminate()
            self._dispatcher.join(5.0)
        for replica in self._replicas:
            if replica.thread is not None:
                replica.thread.stop()
            replica.instance = None
        for where in [w for w in _instances if w[0] == self._key]:  # in-process executors' instances
            _instances.pop(where, None)
            _call_counts.pop(where, None)
            loop = _loops.pop(where, None)
            if loop is not None:
                loop.close()
        self._emit(-1, "stopped", detail="after a failure" if was_failed else "")

    def stats(self) -> list[dict[str, Any]]:
        """Per replica, as plain dicts: ``calls``, ``failures``, ``restarts``, ``busy_s``,
        ``p50_s``/``p95_s`` (latency of its last calls), ``in_flight``, ``queue`` (calls
        of the service waiting for a replica), ``alive`` and ``pid``."""
        rows = []
        for replica in self._replicas:
            ordered = sorted(replica.latencies)

            def quantile(q: float, ordered: list[float] = ordered) -> float | None:
                return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

            rows.append({"replica": replica.index, "calls": replica.calls, "failures": replica.failures,
                         "restarts": replica.restarts, "busy_s": replica.busy, "p50_s": quantile(0.5),
                         "p95_s": quantile(0.95), "in_flight": replica.in_flight, "queue": len(self._queue),
                         "alive": replica.alive, "pid": replica.pid})
        return rows

    def __repr__(self) -> str:
        return f"<ServiceHandle {self.name} {self._status} replicas={self.options.replicas} " \
               f"executor={self.options.executor}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"a ServiceHandle ({self.name}) cannot be pickled: its replicas belong to this process")

    # -- backpressure (the caller's thread) ----------------------------------------------------
    def _check_running(self) -> None:
        if self._status != "running":
            raise ServiceFailedError(f"service {self.name} is {self._status}") from self._failure

    def _take_room(self, block: bool) -> None:
        if self._status == "new":
            self.deploy()
        self._check_running()
        if self._room.try_acquire():
            return
        rt = self._runtime_for_calls()
        if not block or threading.get_ident() == rt._loop_ident:  # waiting there would stop the settling
            raise ServiceOverloadedError(
                f"service {self.name} has {self.options.queue_limit} calls queued per replica already "
                f"({self.options.replicas} replica(s)); wait, call with block=True"
                + (" (not possible on the runtime's own loop: await the direct call instead)"
                   if block else ""))
        while not self._room.acquire(timeout=0.5):
            self._check_running()

    def _submit(self, fn: ExternalOp, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ObjectRef:
        """Submit a call that holds a unit of room; the unit comes back when its ref ends,
        however it ends (a value, an error, a failed input, a cancel, a shutdown)."""
        rt = self._runtime_for_calls()
        try:
            ref = rt.submit(fn, args, kwargs)
        except BaseException:
            self._room.release()
            raise
        if not rt._add_waiter(ref, self._give_back):
            self._room.release()
        return ref

    def _give_back(self, _: ObjectRef) -> None:
        self._room.release()

    def _runtime_for_calls(self) -> Runtime:
        rt = self._runtime
        assert rt is not None
        return rt

    # -- starting ---------------------------------------------------------------------------------
    def _start(self, rt: Runtime) -> None:
        from twat_mp import hardware
        from twat_mp._engine.dispatcher import SlotSpec
        from twat_mp.mesh import current_mesh

        opts = self.options
        placed = current_mesh(gpus=opts.gpus > 0).place(self.service.name, opts.replicas, opts.gpus, opts.cpus)
        for replica in self._replicas:
            self._emit(replica.index, "starting")
        if opts.executor == "async":
            return  # deploy() builds the instances on the loop, once the handle is running
        policy = self._policy()
        threads = opts.cpus or hardware.thread_share(opts.replicas, None)
        slots = [SlotSpec(env=hardware.slot_env(group[0], threads, group[1:])
                          if group and opts.executor != "thread" else (),
                          tags=frozenset(map(str, group)),
                          init=self._slot_init(_NO_CHECKPOINT))
                 for group in placed]

        def on_event(event: Any) -> None:  # the engine's manager thread: only queue
            rt.post(functools.partial(self._on_engine_event, event))

        if opts.executor == "thread":
            from twat_mp._engine.threads import ThreadDispatcher

            self._dispatcher = ThreadDispatcher(opts.replicas, slots=slots, policy=policy, on_event=on_event)
        else:
            from twat_mp._engine.process import ProcessDispatcher

            concurrency = opts.max_concurrency if opts.executor == "async-process" else 0
            self._dispatcher = ProcessDispatcher(opts.replicas, slots=slots, policy=policy, on_event=on_event,
                                                 concurrency=concurrency)

    def _slot_init(self, checkpoint: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (_construct, (self._key, self.service.target, self._args, self._kwargs, checkpoint,
                             self.service.is_function))

    def _start_async_replicas(self) -> None:
        for replica in self._replicas:
            self._construct_async(replica)

    def _construct_async(self, replica: _Replica) -> None:
        """Build an async replica's instance on the loop (again after a crash)."""
        try:
            target = self.service.target
            instance = target if self.service.is_function else target(*self._args, **self._kwargs)
            if not (isinstance(replica.checkpoint, str) and replica.checkpoint == _NO_CHECKPOINT):
                instance.__restore__(replica.checkpoint)
        except Exception as exc:
            self._emit(replica.index, "crashed", detail=f"__init__ raised {type(exc).__name__}: {exc}")
            self._async_crashed(replica, exc)
            return
        replica.instance = instance
        replica.alive = True
        replica.thread = replica.thread or _SerialThread(f"twat-mp-{self.name}-{replica.index}")
        self._emit(replica.index, "started")
        self._pump()

    def _async_crashed(self, replica: _Replica, exc: BaseException) -> None:
        """An async replica's ``__init__`` raised: restart it as the engine restarts a
        worker slot, by the same restart policy (its limit and backoff)."""
        replica.alive = False
        now = time.monotonic()
        policy = self._policy()
        if policy.restart != "always":  # not restarted: the others go on (the engine's _give_up)
            self._emit(replica.index, "failed", detail=str(exc))
            if not any(r.alive for r in self._replicas):
                self._service_failed(ServiceFailedError(f"service {self.name}: every replica failed"), exc)
            return
        delay = policy.delay(replica.history, now)
        if delay is None:  # past the restart limit: the service fails (the engine breaks the pool)
            self._emit(replica.index, "failed", detail=str(exc))
            self._service_failed(ServiceFailedError(
                f"service {self.name} failed: replica {replica.index} crashed {len(replica.history) + 1} times "
                f"within {policy.window:g}s; the restart policy allows {policy.max_restarts}"), exc)
            return
        replica.history.append(now)
        replica.restarts += 1
        self._emit(replica.index, "restarting", detail=f"in {delay:.3g}s")
        self._runtime_for_calls().loop.call_later(delay, self._construct_async, replica)

    def _policy(self) -> Any:
        """The restart policy of this service's replicas (the engine's)."""
        from twat_mp._engine.dispatcher import RestartPolicy

        opts = self.options
        return RestartPolicy(max_restarts=opts.max_restarts, window=opts.within_s, backoff=opts.backoff_s,
                             restart_on_init_failure=True, restart=STRATEGIES[opts.restart])

    # -- events (loop thread) ---------------------------------------------------------------------
    def _emit(self, replica: int, kind: str, pid: int | None = None, exitcode: int | None = None,
              detail: str = "") -> None:
        event = ServiceEvent(self.name, replica, kind, pid, exitcode, detail, time.time())
        logger.debug("service {} replica {}: {} {}", self.name, replica, kind, detail)
        rt = self._runtime or current_runtime()
        for observer in self._observers:
            rt._callback_thread.put(observer, event)

    def _on_engine_event(self, event: Any) -> None:
        if event.slot < 0:  # the dispatcher stopped: shutdown() says so
            return
        replica = self._replicas[event.slot]
        if event.kind == "started":
            replica.pid = event.pid
            replica.alive = True
            self._emit(event.slot, "started", event.pid)
            self._pump()
        elif event.kind == "crashed":
            replica.alive = False
            self._emit(event.slot, "crashed", event.pid, event.exitcode)
        elif event.kind == "restarting":
            replica.restarts += 1
            self._emit(event.slot, "restarting", event.pid, event.exitcode, f"in {event.delay:.3g}s")
        elif event.kind == "failed":
            replica.alive = False
            self._emit(event.slot, "failed", event.pid, event.exitcode, event.reason)
            error = self._dispatcher.error if self._dispatcher is not None else None
            if error is not None or not any(r.alive for r in self._replicas):
                self._service_failed(ServiceFailedError(f"service {self.name} failed: {event.reason}"), error)
            else:
                self._pump()

    def _service_failed(self, error: ServiceFailedError, cause: BaseException | None) -> None:
        error.__cause__ = cause
        with self._lock:
            if self._status != "running":  # failed already (or stopped): said once
                return
            self._status = "failed"
            self._failure = error
        self._emit(-1, "failed", detail=str(cause or error))
        self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        calls = list(self._queue)
        self._queue.clear()
        for replica in self._replicas:
            calls += replica.outbox
            replica.outbox = []
        for call in calls:
            self._settle(call, False, error)

    # -- routing (loop thread) ----------------------------------------------------------------------
    def _enqueue(self, call: _Call) -> None:
        if self._status != "running":
            why = "was shut down" if self._status == "stopped" else f"is {self._status}"
            self._settle(call, False, ServiceFailedError(f"service {self.name} {why}"))
            return
        self._queue.append(call)
        self._pump()

    def _pump(self) -> None:
        limit = self.options.max_concurrency
        queue = self._queue
        on_loop = self.options.executor == "async"
        while queue:
            best = None
            for replica in self._replicas:
                if replica.alive and replica.in_flight < limit and (best is None or replica.in_flight < best.in_flight):
                    best = replica
            if best is None:
                break
            call = queue.popleft()
            best.in_flight += 1
            if on_loop:  # on this loop already: start it now, no batching
                call.sent_at = time.perf_counter()
                rt = self._runtime_for_calls()
                rt._running.add(rt.loop.create_task(self._run_async(best, call)))  # cancelled at shutdown
                continue
            best.outbox.append(call)
        if not on_loop and not self._flush_pending and any(r.outbox for r in self._replicas):
            self._flush_pending = True
            self._runtime_for_calls().loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        now = time.perf_counter()
        for replica in self._replicas:
            calls, replica.outbox = replica.outbox, []
            if not calls:
                continue
            for call in calls:
                call.sent_at = now
            self._send(replica, calls)

    def _send(self, replica: _Replica, calls: list[_Call]) -> None:
        from twat_mp._engine.calls import submit_calls

        every = self.options.checkpoint_every
        batch: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
            (_invoke, (self._key, c.method, c.args, c.kwargs, every), {}) for c in calls]
        rt = self._runtime_for_calls()
        try:
            submit_calls(self._dispatcher, batch, functools.partial(self._landed, replica, calls), rt.post,
                         slot=replica.index, shown=[call.args for call in calls])
        except Exception as exc:
            self._landed(replica, calls, exc, 0.0)

    def _landed(self, replica: _Replica, calls: list[_Call], outcome: Any, elapsed: float) -> None:
        replica.in_flight -= len(calls)
        now = time.perf_counter()
        if isinstance(outcome, BaseException):
            self._chunk_failed(replica, calls, outcome)
        else:
            replica.busy += elapsed
            for call, (ok, value) in zip(calls, outcome):
                replica.calls += 1
                replica.latencies.append(now - call.sent_at)
                if ok and isinstance(value, _Checkpointed):
                    self._keep_checkpoint(replica, value.state)
                    value = value.value
                if not ok:
                    replica.failures += 1
                self._settle(call, ok, value)
        self._pump()

    def _chunk_failed(self, replica: _Replica, calls: list[_Call], error: BaseException) -> None:
        if isinstance(error, WorkerCrashedError):
            replica.failures += len(calls)
            retry = []
            for call in calls:
                if self._is_idempotent(call.method) and call.attempts < self.options.max_restarts + 1:
                    call.attempts += 1
                    retry.append(call)
                else:
                    self._settle(call, False, ReplicaCrashedError(
                        self.name, replica.index, error.pid, error.exitcode, f"{call.method}{_short(call.args)}"))
            self._queue.extendleft(reversed(retry))
            return
        if isinstance(error, BrokenPoolError):
            failure = ServiceFailedError(f"service {self.name} failed: {error.reason}")
            self._service_failed(failure, error)
        elif self._status == "stopped":  # terminated by shutdown()
            error = ServiceFailedError(f"service {self.name} was shut down while this call ran")
        for call in calls:
            self._settle(call, False, self._failure or error)

    def _keep_checkpoint(self, replica: _Replica, checkpoint: Any) -> None:
        from twat_mp._engine.dispatcher import SlotSpec

        replica.checkpoint = checkpoint
        if self._dispatcher is not None:
            spec = self._dispatcher.slots[replica.index]
            self._dispatcher.update_slot(replica.index, SlotSpec(spec.env, spec.tags, self._slot_init(checkpoint)))

    def _is_idempotent(self, method: str) -> bool:
        if self.options.idempotent:
            return True
        return bool(getattr(getattr(self.service.target, method, None), "__twat_mp_idempotent__", False))

    def _settle(self, call: _Call, ok: bool, value: Any) -> None:
        self._runtime_for_calls().settle(call.ref, ok, value)

    async def _run_async(self, replica: _Replica, call: _Call) -> None:
        instance = replica.instance
        try:
            method = instance if call.method == "__call__" else getattr(instance, call.method)
            is_coroutine = self._coroutine_methods.get(call.method)
            if is_coroutine is None or call.method == "__call__":  # per method, not per call
                is_coroutine = self._coroutine_methods[call.method] = inspect.iscoroutinefunction(method)
            if is_coroutine:
                value = await method(*call.args, **call.kwargs)
            else:
                assert replica.thread is not None
                value = await asyncio.wrap_future(replica.thread.submit(
                    functools.partial(method, *call.args, **call.kwargs)))
                if inspect.isawaitable(value):
                    value = await value
            every = self.options.checkpoint_every
            replica.calls += 1
            checkpoint = getattr(instance, "__checkpoint__", None)
            if checkpoint is not None and replica.calls % every == 0:
                replica.checkpoint = checkpoint()
        except asyncio.CancelledError:  # the runtime shut down
            replica.in_flight -= 1
            self._settle(call, False, ServiceFailedError(f"service {self.name} was shut down while this call ran"))
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # never out of the loop thread
            replica.failures += 1
            outcome: tuple[bool, Any] = (False, exc)
        else:
            outcome = (True, value)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._runtime_for_calls()._running.discard(task)
        replica.in_flight -= 1
        replica.latencies.append(time.perf_counter() - call.sent_at)
        replica.busy += replica.latencies[-1]
        self._settle(call, *outcome)
        self._pump()


_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR
_NESTED = ("<genexpr>", "<listcomp>", "<setcomp>", "<dictcomp>", "<lambda>")


def _called_from_async_code(frame: Any) -> bool:
    """Whether a direct call should give an awaitable: the code calling it (seen through
    comprehensions and lambdas) is an ``async def`` or a notebook cell with top-level
    ``await``, running on an event loop. A plain notebook cell (its loop runs too) and
    any sync code get the value."""
    while frame is not None and frame.f_code.co_name in _NESTED and not frame.f_code.co_flags & _ASYNC_FLAGS:
        frame = frame.f_back
    if frame is None or not frame.f_code.co_flags & _ASYNC_FLAGS:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _short(args: tuple[Any, ...]) -> str:
    text = repr(args)
    return text if len(text) <= 80 else text[:77] + "..."


class ServiceClass:
    """What ``@service`` returns: ``.init(*args, **kwargs)`` gives a ServiceHandle;
    calling it builds a plain local instance (or calls the plain function)."""

    def __init__(self, target: Any, options: ServiceOptions) -> None:
        self.target = target
        self.options = options
        self.is_function = not isinstance(target, type)
        self.name: str = options.name or str(getattr(target, "__name__", "service"))
        self._default: ServiceHandle | None = None
        functools.update_wrapper(self, target, updated=())

    def init(self, *args: Any, **kwargs: Any) -> ServiceHandle:
        """A handle on a new instance of the service, built as ``target(*args, **kwargs)``
        in each replica (replicas start on ``deploy()`` or with the first call)."""
        return ServiceHandle(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    # -- the seed-001 spelling (``@replica``): one default handle per class ----------------------
    def deploy(self, *args: Any, **kwargs: Any) -> ServiceHandle:
        """Start the default handle (``init(*args, **kwargs)``) and return it."""
        if self._default is None or self._default.status in ("failed", "stopped"):
            self._default = self.init(*args, **kwargs)
        return self._default.deploy()

    def get(self) -> ServiceHandle:
        """The default handle ``deploy()`` started."""
        if self._default is None or self._default.status != "running":
            raise ServiceFailedError(f"{self.name} is not deployed: call {self.name}.deploy(...) first")
        return self._default

    def shutdown(self) -> None:
        """Stop the default handle."""
        if self._default is not None:
            self._default.shutdown()

    def __repr__(self) -> str:
        return f"<service {self.name} executor={self.options.executor} replicas={self.options.replicas}>"


def service(target: Any = None, /, **options: Any) -> Any:
    """Make a class (or a function) a service: ``@service`` or ``@service(...)``.

    Options: ``replicas`` (1), ``gpus`` per replica (0), ``cpus`` per replica,
    ``executor`` ("process", "thread", "async" or "async-process"), ``max_concurrency``
    (calls running or sent ahead per replica, 8), ``restart`` ("permanent",
    "transient" or "temporary"), ``max_restarts`` (3) within ``within_s`` (60),
    ``backoff_s`` (0.05, doubling), ``idempotent`` (False), ``queue_limit`` (calls
    queued per replica, 1024), ``checkpoint_every`` (1), ``name``.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ServiceOptions)})
    if unknown:
        valid = sorted(f.name for f in dataclasses.fields(ServiceOptions))
        raise TypeError(f"@service got unknown option(s) {unknown}; valid options are {valid}")
    checked = ServiceOptions(**options)
    if target is None:
        return functools.partial(service, **options)
    if not callable(target):
        raise TypeError(f"@service decorates a class or a function, got {target!r}")
    return ServiceClass(target, checked)


replica = service  # the seed-001 spelling: Cls.deploy(), Cls.get(), Cls.shutdown()


def deploy(*handles: ServiceHandle) -> list[ServiceHandle]:
    """Start the replicas of ``handles`` now, on the current runtime and mesh."""
    return [handle.deploy() for handle in handles]


def runtime(*handles: ServiceHandle, **options: Any) -> Runtime:
    """A ``Runtime`` that deploys ``handles`` when its ``with`` block starts and shuts
    them (and everything else of it) down when it ends."""
    rt = Runtime(**options)
    rt.on_enter(lambda: deploy(*handles))
    return rt
