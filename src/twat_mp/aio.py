"""AsyncMultiPool and apmap: async functions in worker processes that each run an
event loop, on the engine's asyncio worker mode.

::

    await get(xs) ─▶ warm AsyncMultiPool ─▶ jobs.run_batches_async ─▶ Dispatcher
                     (one per option set,      chunks ≤ childconcurrency   (async-process
                      any event loop)          items; the manager's sink    workers: up to
                                               wakes the caller's loop      childconcurrency
    [results] ◀──── in input order ◀────────── (call_soon_threadsafe)       calls at once)

Worker death, timeouts, retries, progress, ``worker_state()`` and errors are the
engine's, exactly as for process maps. The pool is not tied to an event loop: one
warm pool serves ``await f(xs)`` from any loop and ``f.sync(xs)`` from plain code.
"""

from __future__ import annotations

import asyncio
import collections.abc
import functools
import inspect
import threading
from typing import Any, AsyncIterator, Callable, Generator, Iterable, Sequence

from twat_mp import _options, state
from twat_mp._engine.dispatcher import Dispatcher
from twat_mp._engine.jobs import collect, run_batches, run_batches_async, submit_call
from twat_mp._engine.process import ProcessDispatcher
from twat_mp._engine.protocol import MODE_ONE, MODE_STAR
from twat_mp._logging import logger
from twat_mp.errors import PoolClosedError
from twat_mp.pools import PoolLifecycle

__all__ = ["AsyncMultiPool", "apmap"]

NOT_OPEN = "Pool not initialized: use it inside `async with AsyncMultiPool(...) as pool:`"


class AsyncMultiPool(PoolLifecycle):
    """Worker processes that each run an event loop with up to ``childconcurrency``
    calls at once. The API is aiomultiprocess's.

    >>> import asyncio
    >>> from twat_mp import AsyncMultiPool
    >>> async def double(x):
    ...     await asyncio.sleep(0)
    ...     return 2 * x
    >>> async def main():
    ...     async with AsyncMultiPool(processes=2) as pool:
    ...         return await pool.map(double, [1, 2, 3])
    >>> asyncio.run(main())
    [2, 4, 6]

    Args:
        processes: worker processes (default: the CPUs this process may use).
        initializer, initargs: run once in each worker (see ``worker_state``).
        maxtasksperchild: calls a worker runs before it is replaced (0: never).
        childconcurrency: calls each worker runs at once (default 16).
        queuecount: accepted for aiomultiprocess compatibility; each worker has its own
            pipe here, so it changes nothing.
        chunksize, timeout, retries, progress: as for ``ProcessPool``; ``timeout``
            cancels a call that runs longer, inside its worker.
        start_method: as for ``ProcessPool``.
        devices, per_device, torch_threads: workers pinned to devices, as for
            ``ProcessPool`` (``processes`` then follows from them).
    """

    def __init__(self, processes: int | None = None, initializer: Callable[..., Any] | None = None,
                 initargs: Sequence[Any] = (), maxtasksperchild: int = 0, childconcurrency: int = 16,
                 queuecount: int | None = None, *, chunksize: int | None = None, timeout: float | None = None,
                 retries: int = 0, progress: bool | str = False, start_method: str | None = None,
                 devices: Any = None, per_device: int | None = None, torch_threads: int | None = None) -> None:
        _options.check_nodes(processes, "processes")
        #: Size, start method and devices, checked once (``devices=`` as for ProcessPool).
        self.spec = _options.PoolSpec(kind="process", nodes=processes, start_method=start_method,
                                      devices=devices, per_device=per_device, torch_threads=torch_threads)
        self.processes = self.spec.size
        self.childconcurrency: int = _options.check_positive_int(  # type: ignore[assignment]
            "childconcurrency", childconcurrency, allow_none=False)
        if isinstance(maxtasksperchild, bool) or not isinstance(maxtasksperchild, int) or maxtasksperchild < 0:
            raise ValueError(f"maxtasksperchild must be an integer >= 0, got {maxtasksperchild!r}")
        self.maxtasksperchild = maxtasksperchild
        self.queuecount = _options.check_positive_int("queuecount", queuecount)
        if initializer is not None and not callable(initializer):
            raise ValueError(f"initializer must be callable, got {initializer!r}")
        if isinstance(initargs, (str, bytes)) or not isinstance(initargs, collections.abc.Iterable):
            raise ValueError(f"initargs must be a tuple of arguments for the initializer, got {initargs!r}")
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.start_method = _options.check_start_method(start_method)
        self.options = _options.MapOptions(chunksize=chunksize, timeout=timeout, retries=retries, progress=progress)
        self._dispatcher: Dispatcher | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def nodes(self) -> int:
        return self.processes

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> AsyncMultiPool:
        """Start the workers (``async with`` does it); needs no event loop."""
        with self._lock:
            if self._closed:
                raise PoolClosedError("this AsyncMultiPool is closed; create a new one")
            if self._dispatcher is None:
                from twat_mp._engine.process import default_start_method
                from twat_mp.pools import slot_specs

                slots = slot_specs(self.spec, self.start_method or default_start_method())
                self._dispatcher = ProcessDispatcher(
                    self.processes, start_method=self.start_method, initializer=self.initializer,
                    initargs=self.initargs, concurrency=self.childconcurrency, max_tasks=self.maxtasksperchild,
                    slots=slots)
                logger.debug("AsyncMultiPool started with {} processes", self.processes)
        return self

    _open = start

    async def __aenter__(self) -> AsyncMultiPool:
        return self.start()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()
        await self.join()

    async def join(self) -> None:
        """Wait until the workers have exited (after ``close`` or ``terminate``)."""
        dispatcher = self._dispatcher
        if dispatcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, dispatcher.join)

    def _engine(self) -> Dispatcher:
        dispatcher = self._dispatcher
        if dispatcher is None:
            raise PoolClosedError("this AsyncMultiPool is closed; create a new one" if self._closed else NOT_OPEN)
        if dispatcher.error is not None:
            raise dispatcher.error
        if self._closed or not dispatcher.alive:
            raise PoolClosedError("this AsyncMultiPool is closed (it left its `async with` block or was "
                                  "terminated); create a new one")
        return dispatcher

    # -- maps ------------------------------------------------------------------------------
    def _batches(self, fn: Callable[..., Any], iterable: Iterable[Any], mode: int,
                 overrides: dict[str, Any]) -> AsyncIterator[list[Any]]:
        from twat_mp._progress import progress_bar

        options = self.options.merged(**overrides)
        bar = progress_bar(options.progress, iterable)
        batches = run_batches_async(self._engine(), fn, iterable, mode=mode, options=options, progress=bar)
        return batches if bar is None else _closing_bar(batches, bar)

    async def map(self, fn: Callable[..., Any], iterable: Iterable[Any], **options: Any) -> list[Any]:
        """``[await fn(x) for x in iterable]``, run concurrently in the workers. Options
        (``chunksize``, ``timeout``, ``retries``, ``progress``) override the pool's."""
        return [x async for batch in self._batches(fn, iterable, MODE_ONE, options) for x in batch]

    async def starmap(self, fn: Callable[..., Any], iterable: Iterable[Sequence[Any]], **options: Any) -> list[Any]:
        """``[await fn(*args) for args in iterable]``, run concurrently in the workers."""
        return [x async for batch in self._batches(fn, iterable, MODE_STAR, options) for x in batch]

    async def imap(self, fn: Callable[..., Any], iterable: Iterable[Any], **options: Any) -> AsyncIterator[Any]:
        """An async iterator of results in input order. It reads the input as it goes
        and keeps a bounded number of calls in flight, so an endless generator streams."""
        batches = self._batches(fn, iterable, MODE_ONE, options)
        try:
            async for batch in batches:
                for value in batch:
                    yield value
        finally:
            await batches.aclose()  # type: ignore[attr-defined]

    async def apply(self, fn: Callable[..., Any], args: Sequence[Any] = (),
                    kwds: dict[str, Any] | None = None) -> Any:
        """``await fn(*args, **kwds)`` in a worker."""
        future = submit_call(self._engine(), fn, tuple(args), dict(kwds or {}),
                             timeout=self.options.timeout, retries=self.options.retries)
        return await asyncio.wrap_future(future)

    # -- the same maps from synchronous code -----------------------------------------
    def map_sync(self, fn: Callable[..., Any], *iterables: Iterable[Any], **options: Any) -> list[Any]:
        """``map`` for a caller with no event loop (``apmap(...).sync`` uses it)."""
        if self._dispatcher is None:
            self.start()
        source, mode = (iterables[0], MODE_ONE) if len(iterables) == 1 else (zip(*iterables), MODE_STAR)
        from twat_mp._progress import progress_bar

        merged = self.options.merged(**options)
        bar = progress_bar(merged.progress, source)
        try:
            batches = run_batches(self._engine(), fn, source, mode=mode, options=merged, progress=bar)
            return collect(batches)
        finally:
            if bar is not None:
                bar.close()

    def __repr__(self) -> str:
        status = "closed" if self._closed else ("open" if self._dispatcher else "not started")
        return f"<AsyncMultiPool processes={self.processes} childconcurrency={self.childconcurrency} {status}>"


async def _closing_bar(batches: AsyncIterator[list[Any]], bar: Any) -> AsyncIterator[list[Any]]:
    try:
        async for batch in batches:
            yield batch
    finally:
        bar.close()


# -- apmap ---------------------------------------------------------------------------------
class MapCall(collections.abc.Coroutine):  # type: ignore[type-arg]
    """What an ``@apmap`` function returns: a coroutine (``await`` it, or pass it to
    ``asyncio.run`` / ``asyncio.create_task``) of the list of results. Used as a list
    from synchronous code, it says what to write instead."""

    def __init__(self, name: str, coroutine: Any) -> None:
        self._name = name
        self._coroutine = coroutine

    def send(self, value: Any) -> Any:
        return self._coroutine.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coroutine.throw(*args)

    def close(self) -> None:
        self._coroutine.close()

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self._coroutine.__await__()  # type: ignore[no-any-return]

    def _misuse(self, *args: Any) -> Any:
        self._coroutine.close()
        raise TypeError(
            f"{self._name}() is an @apmap function and returns a coroutine: write "
            f"`await {self._name}(items)` in async code, or `{self._name}.sync(items)` "
            "from synchronous code")

    __iter__ = __len__ = __getitem__ = __bool__ = _misuse


class AsyncMappedFunction:
    """What ``@apmap`` returns: ``await f(items)`` maps ``f`` over ``items`` in async
    worker processes; ``f.sync(items)`` does the same from synchronous code."""

    def __init__(self, fn: Callable[..., Any], processes: int | None, childconcurrency: int,
                 options: _options.MapOptions, pool_options: dict[str, Any] | None = None) -> None:
        self.func = fn
        self.processes = processes
        self.childconcurrency = childconcurrency
        self.pool_options = {"childconcurrency": childconcurrency, **(pool_options or {})}
        self.options = options
        self.__name__: str = getattr(fn, "__name__", "function")
        functools.update_wrapper(self, fn)

    def __call__(self, *iterables: Iterable[Any]) -> MapCall:
        return self._call(self.func, iterables)

    def _call(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...]) -> MapCall:
        if not iterables:
            raise TypeError(f"{self.__name__}() takes an iterable to map over (like builtin map)")
        return MapCall(self.__name__, self._run(fn, iterables))

    async def _run(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...]) -> list[Any]:
        if state.in_worker():  # inside a worker: await each call here, never nest pools
            return [await _call(fn, args) for args in zip(*iterables)]
        mode, source = (MODE_ONE, iterables[0]) if len(iterables) == 1 else (MODE_STAR, zip(*iterables))
        options = dataclass_dict(self.options)
        with self._warm_pool() as pool:
            return [x async for batch in pool._batches(fn, source, mode, options) for x in batch]

    def _warm_pool(self) -> Any:
        """The shared warm pool for these options (the decorators' registry), held for
        the length of a call."""
        from twat_mp.decorators import _borrowed

        return _borrowed("async", self.processes, self.pool_options)

    def sync(self, *iterables: Iterable[Any]) -> list[Any]:
        """Run the map from synchronous code (no event loop needed; a running one in
        this thread, as in a notebook cell, is not disturbed)."""
        return self._sync(self.func, iterables)

    def _sync(self, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...]) -> list[Any]:
        if not iterables:
            raise TypeError(f"{self.__name__}.sync() takes an iterable to map over (like builtin map)")
        if state.in_worker():
            serial: list[Any] = _run_sync(self._run(fn, iterables))
            return serial
        with self._warm_pool() as pool:
            results: list[Any] = pool.map_sync(fn, *iterables, **dataclass_dict(self.options))
        return results

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        """As a method: ``await obj.method(xs)`` maps ``method(obj, x)`` over ``xs``."""
        return self if instance is None else _BoundAsyncMapped(self, instance)

    def __repr__(self) -> str:
        return f"<apmap {getattr(self.func, '__qualname__', self.func)!r}>"


class _BoundAsyncMapped:
    """An ``@apmap`` method bound to its instance (sent along with each call)."""

    def __init__(self, mapped: AsyncMappedFunction, instance: Any) -> None:
        self.mapped = mapped
        self.instance = instance
        functools.update_wrapper(self, mapped.func)

    def __call__(self, *iterables: Iterable[Any]) -> MapCall:
        return self.mapped._call(functools.partial(self.mapped.func, self.instance), iterables)

    def sync(self, *iterables: Iterable[Any]) -> list[Any]:
        return self.mapped._sync(functools.partial(self.mapped.func, self.instance), iterables)


def dataclass_dict(options: _options.MapOptions) -> dict[str, Any]:
    return {"chunksize": options.chunksize, "timeout": options.timeout, "retries": options.retries,
            "progress": options.progress, "decorator": options.decorator}


def apmap(fn: Callable[..., Any] | None = None, /, *, processes: int | None = None, childconcurrency: int = 16,
          chunksize: int | None = None, timeout: float | None = None, retries: int = 0,
          progress: bool | str = False, devices: Any = None, per_device: int | None = None,
          torch_threads: int | None = None) -> Any:
    """Decorate an async function so that ``await f(items)`` maps it over ``items`` in
    worker processes, returning the list of results.

    >>> import asyncio
    >>> from twat_mp import apmap
    >>> @apmap
    ... async def double(x):
    ...     return 2 * x
    >>> double.sync([1, 2, 3])          # from synchronous code
    [2, 4, 6]

    In async code, ``await double([1, 2, 3])``; ``asyncio.run(double(xs))`` and
    ``asyncio.create_task(double(xs))`` work too. The pool is warm: it is started on
    first use, shared by every event loop and thread, and stopped at interpreter exit or
    by ``shutdown_warm_pools()``.
    """
    _options.check_nodes(processes, "processes")
    _options.check_positive_int("childconcurrency", childconcurrency, allow_none=False)
    options = _options.MapOptions(chunksize=chunksize, timeout=timeout, retries=retries, progress=progress,
                                  decorator=True)
    pinning: dict[str, Any] = {k: v for k, v in (("devices", devices), ("per_device", per_device),
                                                 ("torch_threads", torch_threads)) if v is not None}
    if pinning:  # checked now, as every option is (the pool is made on first use)
        _options.PoolSpec(kind="process", nodes=processes, devices=devices, per_device=per_device,
                          torch_threads=torch_threads)
    if fn is None:
        return functools.partial(apmap, processes=processes, childconcurrency=childconcurrency,
                                 chunksize=chunksize, timeout=timeout, retries=retries, progress=progress,
                                 **pinning)
    if not callable(fn):
        raise TypeError(f"@apmap decorates a function, got {fn!r}")
    return AsyncMappedFunction(fn, processes, childconcurrency, options, pinning)


def _run_sync(coroutine: Any) -> Any:
    """Run a coroutine to its end from synchronous code, even where this thread already
    runs an event loop (an async worker, a notebook cell): then on a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, asyncio.run(coroutine)))
        except BaseException as exc:
            box.append((False, exc))

    thread = threading.Thread(target=target, name="twat-mp-sync-helper")
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


async def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    result = fn(*args)
    return await result if inspect.isawaitable(result) else result
