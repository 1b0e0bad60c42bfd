"""AsyncMultiPool and apmap: async functions in worker processes, on aiomultiprocess.

::

    await get(xs) ─▶ warm AsyncMultiPool of the running loop ─▶ aiomultiprocess.Pool
                     └ fn wrapped in _RemoteCall (dill payload) ─▶ each worker runs an
                       event loop with up to ``childconcurrency`` calls at once
    results ◀── ("ok", value) | ("error", RemoteError) ◀── _RemoteCall.__call__

The wrapper ships the function with dill (so functions from a notebook or ``__main__``
work under aiomultiprocess's ``spawn``) and returns errors as data, so the caller
re-raises the original exception type with the item and the remote traceback.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence

import aiomultiprocess

from twat_mp import _options, state
from twat_mp._engine.protocol import RemoteError
from twat_mp._engine.serialization import dumps_function, loads
from twat_mp._logging import logger
from twat_mp._progress import progress_bar
from twat_mp.errors import PoolClosedError

__all__ = ["AsyncMultiPool", "apmap"]

_loaded: dict[bytes, Callable[..., Any]] = {}
PROGRESS_STEPS = 20


def _load_function(payload: bytes) -> Callable[..., Any]:
    fn = _loaded.get(payload)
    if fn is None:
        if len(_loaded) > 64:
            _loaded.clear()
        fn = _loaded[payload] = loads(payload)
    return fn


def _init_async_worker(initializer: Callable[..., Any] | None, initargs: Sequence[Any]) -> None:
    state.enter_process_worker(0, kind="async-process")
    if initializer is not None:
        initializer(*initargs)


class _RemoteCall:
    """A picklable stand-in for the user's function (sync or async) in an async worker."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return (_RemoteCall, (self.payload,))

    async def __call__(self, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        try:
            result = _load_function(self.payload)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return ("ok", result)
        except (Exception, SystemExit) as exc:
            return ("error", RemoteError.capture(exc))


def _unwrap(outcome: tuple[str, Any], item: Any) -> Any:
    status, value = outcome
    if status == "ok":
        return value
    raise value.to_exception(item, None, None)


class AsyncMultiPool:
    """A pool of worker processes that each run an event loop (aiomultiprocess).

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
        childconcurrency: calls each worker runs at once (default 16).
        initializer, initargs: run once in each worker (see ``worker_state``).
        maxtasksperchild, queuecount: passed to ``aiomultiprocess.Pool``.
    """

    def __init__(self, processes: int | None = None, *, childconcurrency: int = 16,
                 initializer: Callable[..., Any] | None = None, initargs: Sequence[Any] = (),
                 maxtasksperchild: int = 0, queuecount: int | None = None) -> None:
        self.processes = _options.check_nodes(processes)
        self.childconcurrency = _options.check_positive_int("childconcurrency", childconcurrency, allow_none=False)
        if initializer is not None and not callable(initializer):
            raise ValueError(f"initializer must be callable, got {initializer!r}")
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.maxtasksperchild = maxtasksperchild
        self.queuecount = queuecount
        self.pool: aiomultiprocess.Pool | None = None
        self._closed = False

    @property
    def nodes(self) -> int:
        return self.processes

    def start(self) -> AsyncMultiPool:
        """Start the workers (``async with`` does it); needs a running event loop."""
        if self._closed:
            raise PoolClosedError("this AsyncMultiPool is closed; create a new one")
        if self.pool is None:
            asyncio.get_running_loop()
            try:
                self.pool = aiomultiprocess.Pool(
                    processes=self.processes, childconcurrency=self.childconcurrency,
                    initializer=_init_async_worker,
                    initargs=(self.initializer, self.initargs),
                    maxtasksperchild=self.maxtasksperchild, queuecount=self.queuecount)
            except Exception as exc:
                raise RuntimeError(f"cannot start the async worker processes: {exc!r}") from exc
            logger.debug("AsyncMultiPool started with {} processes", self.processes)
        return self

    async def __aenter__(self) -> AsyncMultiPool:
        return self.start()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.terminate()

    def _pool(self) -> aiomultiprocess.Pool:
        if self.pool is None or self._closed:
            raise PoolClosedError(
                "this AsyncMultiPool is not open: use it inside `async with AsyncMultiPool() as pool:`"
                if not self._closed else "this AsyncMultiPool is closed; create a new one")
        return self.pool

    async def map(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                  progress: bool | str = False) -> list[Any]:
        """``[await fn(x) for x in iterable]``, run concurrently in the workers.
        ``progress=True`` (or a label) shows a tqdm bar."""
        return await self._map(fn, [(item,) for item in iterable], progress, single=True)

    async def starmap(self, fn: Callable[..., Any], iterable: Iterable[Sequence[Any]], *,
                      progress: bool | str = False) -> list[Any]:
        """``[await fn(*args) for args in iterable]``, run concurrently in the workers."""
        return await self._map(fn, [tuple(args) for args in iterable], progress, single=False)

    async def _map(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]], progress: bool | str,
                   single: bool) -> list[Any]:
        pool = self._pool()
        remote = _RemoteCall(dumps_function(fn))
        bar = progress_bar(progress, calls)
        if bar is None:
            outcomes = list(await pool.starmap(remote, calls))
        else:  # slices awaited together: all queued at once, the bar moves per slice
            step = max(1, len(calls) // PROGRESS_STEPS)

            async def run_slice(part: list[tuple[Any, ...]]) -> list[Any]:
                done = list(await pool.starmap(remote, part))
                bar.update(len(part))
                return done

            try:
                parts = await asyncio.gather(*(run_slice(calls[i:i + step]) for i in range(0, len(calls), step)))
            finally:
                bar.close()
            outcomes = [outcome for part in parts for outcome in part]
        return [_unwrap(outcome, args[0] if single else args) for outcome, args in zip(outcomes, calls)]

    async def imap(self, fn: Callable[..., Any], iterable: Iterable[Any]) -> AsyncIterator[Any]:
        """An async iterator of results in input order."""
        items = list(iterable)
        index = 0
        async for outcome in self._pool().map(_RemoteCall(dumps_function(fn)), items):
            yield _unwrap(outcome, items[index])
            index += 1

    async def apply(self, fn: Callable[..., Any], args: Sequence[Any] = (),
                    kwds: dict[str, Any] | None = None) -> Any:
        """``await fn(*args, **kwds)`` in a worker."""
        outcome = await self._pool().apply(_RemoteCall(dumps_function(fn)), tuple(args), kwds or {})
        return _unwrap(outcome, tuple(args))

    async def close(self) -> None:
        """Let queued work finish, then stop the workers and wait for them."""
        self._closed = True
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.close()
            await pool.join()

    async def terminate(self) -> None:
        """Stop the workers now and wait for them."""
        self._closed = True
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.terminate()
            await pool.join()


# -- apmap: warm pools, one set per event loop -----------------------------------------
_loop_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], AsyncMultiPool]] = (
    weakref.WeakKeyDictionary())


async def _keep_until_loop_ends(pool: AsyncMultiPool) -> None:
    try:
        await asyncio.Event().wait()
    finally:  # asyncio.run cancels this task as the loop ends: take the workers with it
        await pool.terminate()


def _warm_async_pool(processes: int | None, childconcurrency: int) -> AsyncMultiPool:
    loop = asyncio.get_running_loop()
    pools = _loop_pools.setdefault(loop, {})
    key = (processes, childconcurrency)
    pool = pools.get(key)
    if pool is None or pool._closed:
        pool = pools[key] = AsyncMultiPool(processes, childconcurrency=childconcurrency).start()
        keeper = loop.create_task(_keep_until_loop_ends(pool), name="twat-mp-apmap-keeper")
        pool._keeper = keeper  # type: ignore[attr-defined]
    return pool


class _PendingMap(Awaitable[list[Any]]):
    """What an ``@apmap`` function returns: await it for the list of results."""

    def __init__(self, name: str, coroutine_factory: Callable[[], Any]) -> None:
        self._name = name
        self._factory = coroutine_factory

    def __await__(self) -> Generator[Any, None, list[Any]]:
        awaitable: Awaitable[list[Any]] = self._factory()
        return awaitable.__await__()

    def _misuse(self, *args: Any) -> Any:
        raise TypeError(
            f"{self._name}() is an @apmap function and returns an awaitable: write "
            f"`await {self._name}(items)` in async code, or `{self._name}.sync(items)` "
            "from synchronous code")

    __iter__ = __len__ = __getitem__ = __bool__ = _misuse


def apmap(fn: Callable[..., Any] | None = None, /, *, processes: int | None = None,
          childconcurrency: int = 16, progress: bool | str = False) -> Any:
    """Decorate an async function so that ``await f(items)`` maps it over ``items`` in
    worker processes, returning the list of results.

    >>> import asyncio
    >>> from twat_mp import apmap
    >>> @apmap
    ... async def double(x):
    ...     return 2 * x
    >>> double.sync([1, 2, 3])          # from synchronous code
    [2, 4, 6]

    In async code, ``await double([1, 2, 3])``. The pool is warm per event loop and is
    stopped when that loop ends (``asyncio.run`` returning).
    """
    _options.check_positive_int("processes", processes)
    _options.check_positive_int("childconcurrency", childconcurrency, allow_none=False)
    if fn is None:
        return functools.partial(apmap, processes=processes, childconcurrency=childconcurrency,
                                 progress=progress)
    if not callable(fn):
        raise TypeError(f"@apmap decorates a function, got {fn!r}")

    async def run(iterables: tuple[Iterable[Any], ...]) -> list[Any]:
        if state.in_worker():
            return [await _call(fn, args) for args in zip(*iterables)]
        pool = _warm_async_pool(processes, childconcurrency)
        if len(iterables) == 1:
            return await pool.map(fn, iterables[0], progress=progress)
        return await pool.starmap(fn, zip(*iterables), progress=progress)

    @functools.wraps(fn)
    def mapped(*iterables: Iterable[Any]) -> _PendingMap:
        if not iterables:
            raise TypeError(f"{fn.__name__}() takes an iterable to map over (like builtin map)")
        return _PendingMap(fn.__name__, lambda: run(iterables))

    def sync(*iterables: Iterable[Any]) -> list[Any]:
        """Run the map from synchronous code (in a fresh event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(run(iterables))
        box: dict[str, Any] = {}  # a loop runs in this thread: use a helper thread

        def target() -> None:
            try:
                box["value"] = asyncio.run(run(iterables))
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, name="twat-mp-apmap-sync")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        value: list[Any] = box["value"]
        return value

    mapped.sync = sync  # type: ignore[attr-defined]
    return mapped


async def _call(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    result = fn(*args)
    return await result if inspect.isawaitable(result) else result
