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
import contextlib
import functools
import inspect
import mmap
import multiprocessing
import os
import threading
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Sequence

import aiomultiprocess

from twat_mp import _options, state
from twat_mp._engine import shm
from twat_mp._engine.process import default_start_method
from twat_mp._engine.protocol import RemoteError
from twat_mp._engine.serialization import dumps_function, loads
from twat_mp._logging import logger
from twat_mp._progress import progress_bar
from twat_mp.errors import PoolClosedError, WorkerCrashedError

__all__ = ["AsyncMultiPool", "apmap"]

_loaded: dict[bytes, Callable[..., Any]] = {}
_Call = tuple[tuple[Any, ...], dict[str, Any]]
POLL_SECONDS = 0.005  # as aiomultiprocess itself polls


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


class _Tracker:
    """Which worker process started each item of one map: an int32 per item in a shared
    segment (0 not started, a pid while running, -1 done). When a worker dies, the items
    still marked with its pid are exactly the ones it lost."""

    def __init__(self, size: int) -> None:
        self.path: str | None = None
        self.view: memoryview | None = None
        if size and shm.AVAILABLE:
            self.path = f"{shm.new_prefix()}-track"
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, 4 * size)
                self.view = memoryview(mmap.mmap(fd, 4 * size)).cast("i")
            finally:
                os.close(fd)

    def running_on(self, pid: int) -> list[int]:
        return [] if self.view is None else [i for i, owner in enumerate(self.view) if owner == pid]

    def reset(self, index: int) -> None:
        if self.view is not None:
            self.view[index] = 0

    def close(self) -> None:
        if self.path is not None:
            shm.unlink([shm.Segment(self.path, 0)])
            self.path = None


_marks: dict[str, memoryview] = {}


def _mark(path: str | None, index: int, value: int) -> None:
    if path is None:
        return
    view = _marks.get(path)
    if view is None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # the map is over (abandoned after a crash)
            return
        try:
            view = memoryview(mmap.mmap(fd, 0)).cast("i")
        finally:
            os.close(fd)
        if len(_marks) > 32:
            _marks.clear()
        _marks[path] = view
    view[index] = value


class _RemoteCall:
    """A picklable stand-in for the user's function (sync or async) in an async worker."""

    def __init__(self, payload: bytes, tracker: str | None = None) -> None:
        self.payload = payload
        self.tracker = tracker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_RemoteCall, (self.payload, self.tracker))

    async def __call__(self, index: int, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        _mark(self.tracker, index, os.getpid())
        try:
            result = _load_function(self.payload)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return ("ok", result)
        except (Exception, SystemExit) as exc:
            return ("error", RemoteError.capture(exc))
        finally:
            _mark(self.tracker, index, -1)


def _unwrap(outcome: tuple[str, Any], item: Any) -> Any:
    status, value = outcome
    if status == "ok":
        return value
    raise value.to_exception(item, None, None)


class _Pool(aiomultiprocess.Pool):  # type: ignore[misc]
    """aiomultiprocess's pool with a start method of its own: aiomultiprocess reads a
    module-global context, which is swapped only while this pool makes its queues and
    workers."""

    def __init__(self, start_method: str, **options: Any) -> None:
        self._mp_context = multiprocessing.get_context(start_method)
        super().__init__(**options)

    def init(self) -> None:
        self.context = self._mp_context
        with self._own_context():
            super().init()

    def create_worker(self, qid: Any) -> Any:
        with self._own_context():
            return super().create_worker(qid)

    @contextlib.contextmanager
    def _own_context(self) -> Iterator[None]:
        saved = aiomultiprocess.core.context
        aiomultiprocess.core.context = self._mp_context
        try:
            yield
        finally:
            aiomultiprocess.core.context = saved


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
        retries: times the items of a worker that died are re-queued (default 0: the
            map raises ``WorkerCrashedError`` naming them).
        start_method: ``"fork"`` on Linux (no ``if __name__ == "__main__"`` guard needed),
            ``"spawn"`` elsewhere; set for this pool only, not for aiomultiprocess at large.
    """

    def __init__(self, processes: int | None = None, *, childconcurrency: int = 16,
                 initializer: Callable[..., Any] | None = None, initargs: Sequence[Any] = (),
                 maxtasksperchild: int = 0, queuecount: int | None = None, retries: int = 0,
                 start_method: str | None = None) -> None:
        self.processes = _options.check_nodes(processes)
        self.start_method = _options.check_start_method(start_method) or default_start_method()
        self.childconcurrency = _options.check_positive_int("childconcurrency", childconcurrency, allow_none=False)
        if initializer is not None and not callable(initializer):
            raise ValueError(f"initializer must be callable, got {initializer!r}")
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.maxtasksperchild = maxtasksperchild
        self.queuecount = queuecount
        self.retries = _options.check_retries(retries)
        self._orphans: set[int] = set()
        self._generation = 0  # bumped each time the aiomultiprocess pool is replaced
        self._retired: set[asyncio.Future[Any]] = set()
        self.pool: aiomultiprocess.Pool | None = None
        self._closed = False

    @property
    def nodes(self) -> int:
        return self.processes

    def start(self, *, _replace: bool = False) -> AsyncMultiPool:
        """Start the workers (``async with`` does it); needs a running event loop."""
        if self._closed and not _replace:
            raise PoolClosedError("this AsyncMultiPool is closed; create a new one")
        if self.pool is None:
            asyncio.get_running_loop()
            try:
                self.pool = _Pool(
                    self.start_method,
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
                  progress: bool | str = False, retries: int | None = None) -> list[Any]:
        """``[await fn(x) for x in iterable]``, run concurrently in the workers.
        ``progress=True`` (or a label) shows a tqdm bar."""
        calls: list[_Call] = [((item,), {}) for item in iterable]
        return [value async for value in self._stream(fn, calls, progress, retries)]

    async def starmap(self, fn: Callable[..., Any], iterable: Iterable[Sequence[Any]], *,
                      progress: bool | str = False, retries: int | None = None) -> list[Any]:
        """``[await fn(*args) for args in iterable]``, run concurrently in the workers."""
        calls: list[_Call] = [(tuple(args), {}) for args in iterable]
        return [value async for value in self._stream(fn, calls, progress, retries)]

    async def imap(self, fn: Callable[..., Any], iterable: Iterable[Any], *,
                   progress: bool | str = False, retries: int | None = None) -> AsyncIterator[Any]:
        """An async iterator of results in input order."""
        calls: list[_Call] = [((item,), {}) for item in iterable]
        async for value in self._stream(fn, calls, progress, retries):
            yield value

    async def apply(self, fn: Callable[..., Any], args: Sequence[Any] = (),
                    kwds: dict[str, Any] | None = None) -> Any:
        """``await fn(*args, **kwds)`` in a worker."""
        async for value in self._stream(fn, [(tuple(args), dict(kwds or {}))], False, None):
            return value
        raise AssertionError("unreachable: one call yields one value")

    async def _stream(self, fn: Callable[..., Any], calls: list[_Call],
                      progress: bool | str, retries: int | None) -> AsyncIterator[Any]:
        """Queue every call, then yield results in input order as they arrive.

        aiomultiprocess waits forever for the tasks of a worker that dies, and a worker
        killed while it held a queue lock can stall the others. So on a crash a tracker
        says which items the dead worker held, the whole aiomultiprocess pool is
        replaced, unfinished items are queued again (the lost ones only if ``retries``
        allow), and otherwise ``WorkerCrashedError`` names the lost items.
        """
        self._pool()
        retries = self.retries if retries is None else _options.check_retries(retries)
        tracker = _Tracker(len(calls))
        remote = _RemoteCall(dumps_function(fn), tracker.path)
        pending: dict[int, int] = {}  # aiomultiprocess task id -> index of the call
        attempts = [0] * len(calls)
        outcomes: dict[int, tuple[str, Any]] = {}
        known: dict[int, Any] = {}  # worker pid -> aiomultiprocess Process
        generation = -1

        def item(index: int) -> Any:
            args, kwargs = calls[index]
            return (args[0] if len(args) == 1 else args) if not kwargs else (args, kwargs)

        bar = progress_bar(progress, calls)
        next_index = 0
        try:
            while next_index < len(calls):
                while next_index in outcomes:
                    yield _unwrap(outcomes.pop(next_index), item(next_index))
                    next_index += 1
                if next_index >= len(calls):
                    break
                pool = self._pool()
                if generation != self._generation:  # first pass, or the pool was replaced
                    generation = self._generation
                    known.clear()
                    todo = sorted(set(range(len(calls))) - set(outcomes))
                    pending.clear()
                    for index in todo:
                        tracker.reset(index)
                        args, kwargs = calls[index]
                        pending[pool.queue_work(remote, (index, *args), kwargs)] = index
                for task_id in [t for t in pool._results if t in pending]:
                    value, remote_tb = pool._results.pop(task_id)
                    index = pending.pop(task_id)
                    if remote_tb is not None:
                        raise RuntimeError(f"aiomultiprocess could not run item {item(index)!r}:\n{remote_tb}")
                    outcomes[index] = value
                    if bar is not None:
                        bar.update(1)
                crashes = self._crashes(known, tracker)
                if crashes:
                    self._restart()
                    for lost, pid, exitcode in crashes:
                        lost = [i for i in lost if i not in outcomes]
                        if any(attempts[i] >= retries for i in lost):
                            raise WorkerCrashedError([item(i) for i in lost], -1, pid, exitcode)
                        for index in lost:
                            attempts[index] += 1
                    continue
                self._drop_orphans()
                if next_index not in outcomes:
                    await asyncio.sleep(POLL_SECONDS)
        finally:
            if generation == self._generation:
                self._orphans.update(pending)
            tracker.close()
            if bar is not None:
                bar.close()

    def _restart(self) -> None:
        """Replace the aiomultiprocess pool after a worker crash."""
        old = self.pool
        assert old is not None
        self.pool = None
        self.start(_replace=True)
        self._generation += 1
        self._orphans.clear()
        old.terminate()
        self._retired.add(asyncio.ensure_future(_join_and_release(old)))
        logger.debug("async pool replaced after a worker crash")

    def _crashes(self, known: dict[int, Any], tracker: _Tracker) -> list[tuple[list[int], int, int]]:
        """Workers that died with a non-zero exit since the last look, and what they held."""
        assert self.pool is not None
        for process in list(self.pool.processes):
            if process.pid is not None:
                known.setdefault(process.pid, process)
        crashed = []
        for pid, process in list(known.items()):
            exitcode = process.exitcode
            if exitcode is None:
                continue
            del known[pid]
            if exitcode != 0:
                logger.debug("async worker {} died with {}", pid, exitcode)
                crashed.append((tracker.running_on(pid), pid, exitcode))
        return crashed

    def _drop_orphans(self) -> None:
        """Results of abandoned tasks would pile up in the pool: drop them on arrival."""
        if self.pool is not None and self._orphans:
            for task_id in [t for t in self.pool._results if t in self._orphans]:
                del self.pool._results[task_id]
                self._orphans.discard(task_id)

    async def close(self) -> None:
        """Let queued work finish, then stop the workers and wait for them."""
        self._closed = True
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.close()
            await _join_and_release(pool)
        await self._reap_retired()

    async def _reap_retired(self) -> None:
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
            self._retired.clear()

    async def terminate(self) -> None:
        """Stop the workers now and wait for them."""
        self._closed = True
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.terminate()
            await _join_and_release(pool)
        await self._reap_retired()


async def _join_and_release(pool: aiomultiprocess.Pool) -> None:
    """Wait for a closed pool, then release what aiomultiprocess leaves to the garbage
    collector (queues with their feeder threads, process handles), so a closed pool
    holds no thread or descriptor."""
    processes = list(pool.processes)
    await pool.join()
    for process in processes:
        process.aio_process.join(1.0)
        if process.exitcode is not None:
            process.close()
    for queues in pool.queues.values():
        for q in queues:
            q.close()
            q.join_thread()


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
          childconcurrency: int = 16, progress: bool | str = False, retries: int = 0) -> Any:
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
    _options.check_retries(retries)
    if fn is None:
        return functools.partial(apmap, processes=processes, childconcurrency=childconcurrency,
                                 progress=progress, retries=retries)
    if not callable(fn):
        raise TypeError(f"@apmap decorates a function, got {fn!r}")

    async def run(iterables: tuple[Iterable[Any], ...]) -> list[Any]:
        if state.in_worker():
            return [await _call(fn, args) for args in zip(*iterables)]
        pool = _warm_async_pool(processes, childconcurrency)
        if len(iterables) == 1:
            return await pool.map(fn, iterables[0], progress=progress, retries=retries)
        return await pool.starmap(fn, zip(*iterables), progress=progress, retries=retries)

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
