"""MultiPool, ProcessPool and ThreadPool: the user-facing surface over the engine.

The surface is pathos's (``map``, ``imap``, ``uimap``, ``amap``, ``pipe``/``apipe``,
``nodes``); the dispatch underneath is twat-mp's own (see ``twat_mp._engine``)::

    with ProcessPool(nodes=2) as pool:
        pool.map(lambda x: x + 1, range(10))
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from twat_mp import _options
from twat_mp._engine.protocol import MODE_ONE, MODE_STAR
from twat_mp._logging import logger
from twat_mp.errors import PoolClosedError

if TYPE_CHECKING:  # the engine is imported when a pool opens (import twat_mp stays cheap)
    from twat_mp._engine.dispatcher import Dispatcher


__all__ = ["AsyncResult", "MultiPool", "ProcessPool", "ThreadPool"]


class AsyncResult:
    """The handle ``amap`` returns: ``get()`` waits for the list of results.

    It behaves like ``multiprocessing.pool.AsyncResult`` (``get``, ``wait``, ``ready``,
    ``successful``) and exposes the underlying ``concurrent.futures.Future`` as ``future``.
    """

    def __init__(self, future: concurrent.futures.Future[list[Any]]) -> None:
        self.future = future

    def get(self, timeout: float | None = None) -> list[Any]:
        """The results; raises the first error, or ``TimeoutError`` after ``timeout``."""
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the results were not ready within {timeout}s") from None

    def wait(self, timeout: float | None = None) -> None:
        concurrent.futures.wait([self.future], timeout)

    def ready(self) -> bool:
        return self.future.done()

    def successful(self) -> bool:
        if not self.future.done():
            raise ValueError("the results are not ready yet")
        return self.future.exception() is None


class PoolLifecycle:
    """What every pool has: one engine dispatcher, started on opening, closed or
    terminated under a lock (process, thread and async pools share it)."""

    _dispatcher: Dispatcher | None
    _closed: bool
    _lock: threading.Lock

    def close(self) -> None:
        """Accept no more work; workers exit once the work already given is done."""
        with self._lock:
            self._closed = True
            if self._dispatcher is not None:
                self._dispatcher.close()

    def terminate(self) -> None:
        """Stop every worker now; unfinished calls raise."""
        with self._lock:
            self._closed = True
            if self._dispatcher is not None:
                self._dispatcher.terminate()

    @property
    def alive(self) -> bool:
        return not self._closed and (self._dispatcher is None or self._dispatcher.alive)


class MultiPool(PoolLifecycle):
    """A pool of workers used as a context manager.

    Args:
        nodes: number of workers (default: the CPUs this process may use).
        initializer, initargs: ``initializer(*initargs)`` runs once in each worker; see
            :func:`twat_mp.worker_state` for keeping what it loads.
        chunksize: items per batch sent to a worker (default: automatic).
        max_in_flight: most batches submitted and not yet consumed (default: unbounded
            for a list, ``4 × nodes`` for an iterator, so infinite generators stream).
        timeout: seconds each item may take (default: no limit); see ``docs/failures.md``.
        retries: times the items of a dead or timed-out worker are re-run (default 0).
        progress: ``True`` or a label shows a tqdm progress bar on each map.
        devices: process pools only: pin the workers to devices, ``"auto"`` (one worker
            per GPU, else the CPU's cores), ``"cuda"``, ``"mps"``, ``"cpu"``, a device
            name (``"cuda:1"``), a :class:`~twat_mp.hardware.Device` or a list of those;
            ``nodes`` then follows from them. See :mod:`twat_mp.hardware`.
        per_device: workers on each device (default: one per GPU, the cores on the CPU).
        torch_threads: intra-op threads of each worker process for torch, OpenMP and
            MKL (default: the cores divided among the workers, at least one).
        pool_class: for twat-mp 2.x code that builds ``MultiPool(pool_class=...)``
            directly: a thread pool class (ours or pathos's) gives worker threads,
            anything else worker processes. New code uses ProcessPool or ThreadPool.

    Leaving the ``with`` block closes the pool and joins its workers; an exception or
    KeyboardInterrupt inside it terminates them at once.
    """

    kind = "process"

    def __init__(
        self,
        nodes: int | None = None,
        *,
        pool_class: type | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Sequence[Any] = (),
        chunksize: int | None = None,
        max_in_flight: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        progress: bool | str = False,
        start_method: str | None = None,
        devices: Any = None,
        per_device: int | None = None,
        torch_threads: int | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            valid = ["chunksize", "initargs", "initializer", "max_in_flight", "nodes", "pool_class", "progress",
                     "retries", "timeout"] + (["devices", "per_device", "start_method", "torch_threads"]
                                              if self.kind == "process" else [])
            raise TypeError(f"{type(self).__name__}() got unknown option(s) {sorted(unknown)}; "
                            f"valid options are {sorted(valid)}")
        self._pool_class = _options.check_pool_class(pool_class)
        kind = self.kind
        if pool_class is not None and type(self) is MultiPool:  # 2.x style: the class chooses
            kind = "thread" if "thread" in pool_class.__name__.lower() else "process"
        #: What the pool is made of, checked here once; the engine takes its values from it.
        self.spec = _options.PoolSpec(kind=kind, nodes=nodes, start_method=start_method,
                                      initializer=initializer, initargs=initargs, devices=devices,
                                      per_device=per_device, torch_threads=torch_threads)
        self.options = _options.MapOptions(chunksize=chunksize, max_in_flight=max_in_flight, timeout=timeout,
                                           retries=retries, progress=progress)
        self._dispatcher: Dispatcher | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def nodes(self) -> int:
        """The number of workers."""
        return self.spec.size

    @property
    def _nodes(self) -> int:
        return self.spec.size

    @property
    def initializer(self) -> Callable[..., Any] | None:
        return self.spec.initializer

    @property
    def initargs(self) -> tuple[Any, ...]:
        return self.spec.args

    @property
    def start_method(self) -> str | None:
        return self.spec.start_method

    def _make_dispatcher(self) -> Dispatcher:
        # Used directly (twat-mp 2.x style: ``MultiPool(pool_class=...)``), the pool's
        # kind follows ``pool_class``: thread for a thread pool class, else process.
        if self._pool_class is not None and "thread" in self._pool_class.__name__.lower():
            from twat_mp._engine.threads import ThreadDispatcher

            return ThreadDispatcher(self._nodes, initializer=self.initializer, initargs=self.initargs)
        from twat_mp._engine.process import ProcessDispatcher, default_start_method

        return ProcessDispatcher(self._nodes, initializer=self.initializer, initargs=self.initargs,
                                 slots=slot_specs(self.spec, default_start_method()))

    def _open(self) -> MultiPool:
        with self._lock:
            if self._closed:
                raise PoolClosedError(f"this {type(self).__name__} is closed; create a new one")
            if self._dispatcher is None:
                logger.debug("starting {} with {} workers", type(self).__name__, self._nodes)
                self._dispatcher = self._make_dispatcher()
        return self

    def __enter__(self) -> MultiPool:
        return self._open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()
        self.join()

    def stats(self) -> list[dict[str, Any]]:
        """Per worker slot, as plain dicts: ``calls`` (items run), ``chunks``,
        ``failures`` (chunks lost to a crash or a timeout), ``crashes``, ``restarts``,
        ``busy_s``, ``p50_s``/``p95_s`` (latency of its last chunks, sent to answered)
        and ``queue`` (chunks pinned to it, not yet sent). Empty before the pool opens.

        >>> with ThreadPool(nodes=1) as pool:
        ...     _ = pool.map(abs, [-1, -2])
        ...     [(s["slot"], s["calls"]) for s in pool.stats()]
        [(0, 2)]
        """
        dispatcher = self._dispatcher
        if dispatcher is None:
            return []
        return [{"slot": slot, **stats.to_dict(), "queue": dispatcher.queue_depth(slot)}
                for slot, stats in enumerate(dispatcher.stats)]

    def join(self, timeout: float | None = None) -> None:
        """Wait until the workers have exited (after ``close`` or ``terminate``)."""
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)

    def _engine(self) -> Dispatcher:
        dispatcher = self._dispatcher
        if dispatcher is None:
            name = type(self).__name__
            if self._closed:
                raise PoolClosedError(f"this {name} is closed; create a new one")
            raise PoolClosedError(
                f"this {name} is not open: use it inside `with {name}(...) as pool:`")
        if dispatcher.error is not None:
            raise dispatcher.error
        if self._closed or not dispatcher.alive:
            raise PoolClosedError(
                f"this {type(self).__name__} is closed (it left its `with` block or was "
                "terminated, e.g. by KeyboardInterrupt); create a new one")
        return dispatcher

    # -- maps ------------------------------------------------------------------------------
    def _batches(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], *,
                 ordered: bool = True, method: str = "map", **options: Any) -> Iterator[list[Any]]:
        dispatcher = self._engine()
        if not iterables:
            raise TypeError(f"{type(self).__name__}.{method}() needs at least one iterable")
        check_iterables(f"{type(self).__name__}.{method}()", iterables)
        if len(iterables) == 1:
            source, mode = iterables[0], MODE_ONE
        else:
            source, mode = zip(*iterables), MODE_STAR
        return self._run(dispatcher, fn, source, mode=mode, ordered=ordered, method=method, **options)

    def _run(self, dispatcher: Dispatcher, fn: Callable[..., Any], source: Iterable[Any], *,
             mode: int, ordered: bool, method: str, **overrides: Any) -> Iterator[list[Any]]:
        from twat_mp._engine.jobs import run_batches
        from twat_mp._progress import progress_bar

        options = self.options.merged(f"{type(self).__name__}.{method}()", ordered=ordered, **overrides)
        bar = progress_bar(options.progress, source)
        results = run_batches(dispatcher, fn, source, mode=mode, options=options, progress=bar)
        if bar is None:
            return results
        return _closing_bar(results, bar)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> list[Any]:
        """``list(map(fn, *iterables))``, computed by the workers.

        Options (``chunksize``, ``max_in_flight``, ``timeout``, ``retries``, ``progress``)
        override the pool's for this call.
        """
        from twat_mp._engine.jobs import collect

        return collect(self._batches(fn, iterables, **options))

    def imap(self, fn: Callable[..., Any], *iterables: Iterable[Any], ordered: bool = True,
             **options: Any) -> Iterator[Any]:
        """A lazy iterator of results in input order (``ordered=False``: as they finish).

        It reads the input as it goes and keeps at most ``max_in_flight`` batches
        submitted and not yet consumed, so an endless generator streams in flat memory.
        """
        from twat_mp._engine.jobs import flatten

        _options.check_ordered(ordered)
        return flatten(self._batches(fn, iterables, ordered=ordered, method="imap", **options))

    def uimap(self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> Iterator[Any]:
        """A lazy iterator of results in the order they finish."""
        from twat_mp._engine.jobs import flatten

        return flatten(self._batches(fn, iterables, ordered=False, method="uimap", **options))

    def starmap(self, fn: Callable[..., Any], iterable: Iterable[Sequence[Any]], **options: Any) -> list[Any]:
        """``[fn(*args) for args in iterable]``, computed by the workers."""
        check_iterables(f"{type(self).__name__}.starmap()", (iterable,))
        from twat_mp._engine.jobs import collect

        batches = self._run(self._engine(), fn, iterable, mode=MODE_STAR, ordered=True, method="starmap", **options)
        return collect(batches)

    def amap(self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> AsyncResult:
        """Submit the map and return at once; ``.get()`` returns the list of results."""
        from twat_mp._engine.jobs import collect

        batches = self._batches(fn, iterables, method="amap", **options)
        future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

        def gather() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(collect(batches))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=gather, name="twat-mp-amap", daemon=True).start()
        return AsyncResult(future)

    # -- single calls ------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker; return a ``concurrent.futures.Future``."""
        from twat_mp._engine.jobs import submit_call

        return submit_call(self._engine(), fn, args, kwargs, timeout=self.options.timeout,
                           retries=self.options.retries)

    def apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a worker and return its result."""
        return self.submit(fn, *args, **kwargs).result()

    pipe = apply  # pathos's names
    apipe = submit

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._dispatcher else "not started")
        return f"<{type(self).__name__} nodes={self._nodes} {state}>"


def check_iterables(where: str, iterables: tuple[Any, ...]) -> None:
    """Refuse what cannot be iterated before any work starts, with a message that says
    which argument it was (``iter`` of a generator or a list has no side effect)."""
    for position, iterable in enumerate(iterables, 1):
        try:
            iter(iterable)
        except TypeError:
            raise TypeError(f"{where} maps over iterables (like builtin map); argument {position} is "
                            f"{iterable!r:.80} ({type(iterable).__name__}), which is not iterable") from None


def _closing_bar(results: Iterator[list[Any]], bar: Any) -> Iterator[list[Any]]:
    try:
        yield from results
    finally:
        bar.close()


def slot_specs(spec: _options.PoolSpec, start_method: str) -> list[Any]:
    """The engine's slot specs of a process pool: each slot's environment (device, thread
    share) and, for a pinned slot, its device as a tag that work can target."""
    from twat_mp._engine.dispatcher import SlotSpec
    from twat_mp.hardware import DEVICE_ENV

    return [SlotSpec(env=env, tags=frozenset(value for name, value in env if name == DEVICE_ENV))
            for env in spec.slot_envs(start_method)]


class ProcessPool(MultiPool):
    """Worker processes (``multiprocess``, with dill): lambdas, closures and functions
    defined in a notebook or ``__main__`` work.

    >>> from twat_mp import ProcessPool
    >>> with ProcessPool(nodes=2) as pool:
    ...     pool.map(lambda x: x * x, range(5))
    [0, 1, 4, 9, 16]

    ``start_method`` is ``"forkserver"`` on Linux (workers are forked from a clean
    server process that preloads the heavy modules the caller imported; safe in a
    parent that runs threads, and no ``__main__`` guard is needed) and ``"spawn"``
    elsewhere; ``"fork"`` starts the first pool fastest.
    """

    kind = "process"

    def __init__(self, nodes: int | None = None, *, start_method: str | None = None, **options: Any) -> None:
        super().__init__(nodes, start_method=start_method, **options)

    @property
    def devices(self) -> tuple[Any, ...] | None:
        """The devices the workers are pinned to (``devices=``), one entry per device."""
        devices: tuple[Any, ...] | None = self.spec.devices
        return devices

    def _make_dispatcher(self) -> Dispatcher:
        from twat_mp._engine.process import ProcessDispatcher, default_start_method

        method = self.start_method or default_start_method()
        return ProcessDispatcher(self._nodes, start_method=self.start_method, initializer=self.initializer,
                                 initargs=self.initargs, slots=slot_specs(self.spec, method))


class ThreadPool(MultiPool):
    """Worker threads (``multiprocess.dummy``): for I/O-bound work and code that releases
    the GIL. Nothing is pickled.

    >>> from twat_mp import ThreadPool
    >>> with ThreadPool(nodes=4) as pool:
    ...     pool.map(str.upper, ["a", "b"])
    ['A', 'B']
    """

    kind = "thread"

    def _make_dispatcher(self) -> Dispatcher:
        from twat_mp._engine.threads import ThreadDispatcher

        return ThreadDispatcher(self._nodes, initializer=self.initializer, initargs=self.initargs)
