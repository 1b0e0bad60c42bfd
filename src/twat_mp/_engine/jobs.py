"""The caller's side of a map: cut the input into chunks, keep a bounded number in
flight, and hand results back in input order (or as they finish).

::

    MapJob (one per map call)             drivers
    ─────────────────────────             ───────
    fill(): read input, make chunks,      run_batches: a generator for sync callers,
            pickle, submit ≤ bound        blocks on a SimpleQueue that sinks fill
    accept(chunk, outcome): unpickle,     run_batches_async: an async generator; sinks
            retry, adapt chunk size       wake the caller's loop (call_soon_threadsafe)
    ready(): the next chunk to yield

The caller's thread (or event loop) runs this, so the user's input iterator is only
ever advanced there, and pickling errors surface there at once. Nothing here knows
which transport runs the chunks: a dispatcher says whether it ships bytes
(``ships_bytes``) and how many calls a worker runs at once (``concurrency``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import math
import queue
import sys
import threading
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from twat_mp._engine.dispatcher import Chunk, Dispatcher, FnRef
from twat_mp._engine.protocol import MODE_CALL, ChunkResult, Stage
from twat_mp._engine.serialization import dumps, dumps_dill, dumps_function, find_unpicklable, loads, release
from twat_mp._options import MapOptions
from twat_mp.errors import SerializationError, TaskTimeoutError

#: Chunks of unknown-length input grow until one takes about this long in a worker.
TARGET_CHUNK_SECONDS = 0.02
MAX_ADAPTIVE_CHUNK = 8192
#: ``MapJob.fill`` hands its chunks to the dispatcher once this much is pickled (or the
#: input or the in-flight bound ends it), so that big chunks start as soon as each is ready.
FLUSH_BYTES = 64 * 1024


def make_fnref(dispatcher: Dispatcher, fn: Callable[..., Any], mode: int) -> FnRef:
    """Prepare ``fn`` for ``dispatcher``. Where it ships bytes, the function is pickled
    (``dumps_function`` re-uses its bytes while the function and the globals it reads
    are unchanged, so a notebook function picks up a global re-bound in a later cell),
    and its token is the hash of its bytes: workers that hold them are not sent them
    again."""
    if not callable(fn):
        raise TypeError(f"expected a callable to map, got {fn!r} of type {type(fn).__qualname__}")
    if dispatcher.ships_bytes:
        payload = dumps_function(fn) + bytes([mode])
        return FnRef(fn, mode, payload, hash(payload) & (2**64 - 1))
    return FnRef(fn, mode, None, 0)


def encode(dispatcher: Dispatcher, chunk: Chunk, *, force_dill: bool = False) -> None:
    if not dispatcher.ships_bytes:
        return
    try:
        if force_dill:
            chunk.payload, chunk.used_dill = dumps_dill(chunk.items, "items"), True
        else:
            chunk.payload, chunk.used_dill = dumps(chunk.items, "items", dispatcher.shm_prefix)
    except SerializationError as exc:
        raise SerializationError(
            f"cannot send an argument to a worker: {find_unpicklable(chunk.items)}") from exc.__cause__


def decode(outcome: Any, *, keep: bool = False) -> ChunkResult:
    """Unpickle a chunk's outcome. Its shared-memory segments are unlinked once mapped,
    or, with ``keep``, held while an object on them lives (so sending such a result on
    to another worker refers to its segment instead of copying it)."""
    if isinstance(outcome, ChunkResult):
        return outcome
    result: ChunkResult = loads(outcome, unlink=not keep, keep=keep)
    return result


#: A chunk of a function known to be quick is made big enough to take about this long:
#: below it, a chunk's round trip costs more than the balance it buys.
MIN_CHUNK_SECONDS = 0.002
#: What moving one small item costs besides running it (pickled there and back), roughly.
ITEM_TRANSFER_SECONDS = 0.5e-6
#: About what a warm worker's round trip costs: a map whose items together compute for
#: less than this runs as one chunk (waking a second worker would cost more than it saves).
ROUND_TRIP_SECONDS = 0.0002


def auto_chunksize(length: int | None, nodes: int, concurrency: int = 0,
                   item_seconds: float | None = None) -> int | None:
    """Four chunks per worker for input of known length (as the stdlib Pool does), or
    fewer (down to one per worker, or one in all) when this function's items are known
    to be so quick that smaller chunks would cost more in round trips than they save;
    for async workers, at most ``concurrency`` items a chunk, so every worker stays full."""
    if length is None or length <= 0:
        return max(1, concurrency // 4) if concurrency else None
    chunks = nodes * 4
    if item_seconds is not None and not concurrency:
        wanted = min(chunks, int(length * (item_seconds + ITEM_TRANSFER_SECONDS) / MIN_CHUNK_SECONDS))
        chunks = max(nodes, wanted - wanted % nodes)  # a multiple of the workers: balanced
        if length * item_seconds < ROUND_TRIP_SECONDS:
            chunks = 1
    size = max(1, math.ceil(length / chunks))
    return min(size, concurrency) if concurrency else size


class MapJob:
    """The state of one map: what was submitted, what came back, what to yield next."""

    def __init__(self, dispatcher: Dispatcher, fn: Callable[..., Any], iterable: Iterable[Any], *,
                 mode: int, options: MapOptions, sink: Callable[[Chunk, Any], None]) -> None:
        self.dispatcher = dispatcher
        self.options = options
        self.sink = sink
        self.fnref = make_fnref(dispatcher, fn, mode)
        try:
            length: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            length = None
        concurrency = dispatcher.concurrency
        self.cost_key = self.fnref.token or id(fn)
        self.fixed = options.chunksize or auto_chunksize(length, dispatcher.nodes, concurrency,
                                                         dispatcher.item_seconds.get(self.cost_key))
        self.size = self.fixed or 1
        self.max_in_flight = options.max_in_flight
        if self.max_in_flight is None and length is None:
            self.max_in_flight = 4 * dispatcher.nodes
            if concurrency:
                self.max_in_flight = math.ceil(2 * dispatcher.nodes * concurrency / self.size) + dispatcher.nodes
        self.source = iter(iterable)
        # a list or tuple is cut into chunks by slicing (a copy at C speed)
        self.sequence: list[Any] | tuple[Any, ...] | None = (
            iterable if type(iterable) in (list, tuple) else None)  # type: ignore[assignment]
        self.offset = 0
        self.outstanding: dict[int, Chunk] = {}
        self.finished: dict[int, tuple[Chunk, ChunkResult | BaseException]] = {}
        self.next_seq = self.next_yield = 0
        self.exhausted = False
        self.abandoned = False
        self.on_abandon: Callable[[], None] = lambda: None

    def fill(self) -> None:
        """Submit chunks until the in-flight bound or the end of the input. Small chunks
        go to the dispatcher in batches (``FLUSH_BYTES``), so that the manager does not
        wake, and take the GIL, for each while the next is still being pickled."""
        bound = self.max_in_flight
        batch: list[Chunk] = []
        size = 0
        while not self.exhausted and (bound is None or len(self.outstanding) + len(self.finished) < bound):
            if self.sequence is not None:
                part = self.sequence[self.offset:self.offset + self.size]
                items = part if isinstance(part, list) else list(part)
                self.offset += len(items)
            else:
                items = list(itertools.islice(self.source, self.size))
            if not items:
                self.exhausted = True
                break
            chunk = Chunk(self.fnref, items, self.sink, seq=self.next_seq, timeout=self.options.timeout,
                          retries=self.options.retries)
            encode(self.dispatcher, chunk)  # a failure here fails the map: abandon() frees the batch
            self.outstanding[self.next_seq] = chunk
            self.next_seq += 1
            batch.append(chunk)
            size += len(chunk.payload or b"")
            if size >= FLUSH_BYTES:
                self.dispatcher.submit_all(batch)
                batch, size = [], 0
        if batch:
            self.dispatcher.submit_all(batch)

    @property
    def done(self) -> bool:
        return not self.outstanding and not self.finished

    def accept(self, chunk: Chunk, outcome: Any) -> None:
        """Take a chunk's outcome from its sink: unpickle it, re-send what a worker
        could not load (pickled with dill) or what timed out (if retries are left)."""
        release(chunk.payload)  # the task's shared memory: no longer needed
        if self.outstanding.get(chunk.seq) is not chunk:
            if isinstance(outcome, (bytes, memoryview)):
                release(outcome)  # abandoned: nobody will unpickle it
            return
        if not isinstance(outcome, BaseException):
            outcome = decode(outcome)
            error = outcome.error
            if error is not None and error.stage is Stage.LOAD and not chunk.used_dill:
                encode(self.dispatcher, chunk, force_dill=True)  # e.g. a class defined after fork
                self.dispatcher.submit(chunk)
                return
            if error is not None and error.stage is Stage.TIMEOUT and chunk.attempts < chunk.retries:
                chunk.attempts += 1
                encode(self.dispatcher, chunk)
                self.dispatcher.submit(chunk)
                return
            if outcome.results and outcome.error is None:
                self.dispatcher.remember_cost(self.cost_key, outcome.elapsed / len(chunk.items))
            if self.fixed is None and outcome.results and outcome.elapsed > 0:
                per_item = outcome.elapsed / len(chunk.items)
                self.size = max(1, min(self.size * 2, MAX_ADAPTIVE_CHUNK, int(TARGET_CHUNK_SECONDS / per_item)))
        del self.outstanding[chunk.seq]
        self.finished[chunk.seq] = (chunk, outcome)

    def ready(self) -> tuple[Chunk, ChunkResult | BaseException] | None:
        """The next chunk to yield, if it is here (in input order, or any if unordered)."""
        if self.options.ordered:
            if self.next_yield not in self.finished:
                return None
            found = self.finished.pop(self.next_yield)
            self.next_yield += 1
            return found
        if not self.finished:
            return None
        return self.finished.pop(next(iter(self.finished)))

    def unpack(self, chunk: Chunk, outcome: ChunkResult | BaseException,
               progress: Any) -> tuple[list[Any], BaseException | None]:
        """A chunk's results, and the error to raise once they are yielded."""
        if isinstance(outcome, BaseException):
            return [], outcome
        if progress is not None:
            progress.update(len(outcome.results))
        if outcome.error is None:
            return outcome.results, None
        return outcome.results, item_error(chunk, outcome, self.options.decorator)

    def abandon(self) -> None:
        """The caller stopped reading: cancel what is queued, and free the shared memory
        of every outcome that arrived and will not be read (and of any that arrives
        later: the sinks drop those)."""
        self.abandoned = True
        if sys.is_finalizing():
            return  # interpreter exit: the pools are terminated and sweep their segments
        for chunk in self.outstanding.values():
            self.dispatcher.cancel(chunk)
            release(chunk.payload)
        self.outstanding.clear()
        self.on_abandon()


def run_batches(dispatcher: Dispatcher, fn: Callable[..., Any], iterable: Iterable[Any], *, mode: int,
                options: MapOptions, progress: Any = None) -> Iterator[list[Any]]:
    """Yield the results of ``fn`` over ``iterable``, computed by ``dispatcher``'s
    workers, one list per chunk (so an eager map flattens them at C speed).

    ``options.max_in_flight`` bounds the chunks submitted but not yet yielded; ``None``
    means unbounded for input of known length and a few per worker for an iterator.
    """
    results: queue.SimpleQueue[tuple[Chunk, Any]] = queue.SimpleQueue()

    def sink(chunk: Chunk, outcome: Any) -> None:
        if job.abandoned:  # nobody will read it: free its shared memory now
            _drop(chunk, outcome)
            return
        results.put((chunk, outcome))
        if job.abandoned:  # abandoned as it was queued: drain what the reader left
            _drain(results)

    job = MapJob(dispatcher, fn, iterable, mode=mode, options=options, sink=sink)
    job.on_abandon = lambda: _drain(results)
    try:
        while True:
            job.fill()
            if job.done:
                return
            found = job.ready()
            while found is None:
                job.accept(*results.get())
                found = job.ready()
            batch, error = job.unpack(*found, progress)
            if batch:
                yield batch
            if error is not None:
                raise error
    except (KeyboardInterrupt, SystemExit):
        dispatcher.terminate()  # Ctrl-C means stop now: every worker goes
        raise
    finally:
        job.abandon()


async def run_batches_async(dispatcher: Dispatcher, fn: Callable[..., Any], iterable: Iterable[Any], *,
                            mode: int, options: MapOptions, progress: Any = None) -> AsyncIterator[list[Any]]:
    """``run_batches`` for a caller on an event loop: the manager's sink wakes the loop
    (``call_soon_threadsafe``); nothing polls."""
    import asyncio

    loop = asyncio.get_running_loop()
    results: asyncio.Queue[tuple[Chunk, Any]] = asyncio.Queue()

    def put(item: tuple[Chunk, Any]) -> None:  # on the caller's loop
        if job.abandoned:
            _drop(*item)
        else:
            results.put_nowait(item)

    def sink(chunk: Chunk, outcome: Any) -> None:
        if job.abandoned:
            _drop(chunk, outcome)
            return
        try:
            loop.call_soon_threadsafe(put, (chunk, outcome))
        except RuntimeError:  # the caller's loop has closed: nobody will read it
            _drop(chunk, outcome)

    job = MapJob(dispatcher, fn, iterable, mode=mode, options=options, sink=sink)
    job.on_abandon = lambda: _drain(results)
    try:
        while True:
            job.fill()
            if job.done:
                return
            found = job.ready()
            while found is None:
                job.accept(*await results.get())
                found = job.ready()
            batch, error = job.unpack(*found, progress)
            if batch:
                yield batch
            if error is not None:
                raise error
    finally:
        job.abandon()


def _drop(chunk: Chunk, outcome: Any) -> None:
    """Free an outcome nobody will read (and its task's payload)."""
    release(chunk.payload)
    if isinstance(outcome, (bytes, memoryview)):
        release(outcome)


def _drain(results: Any) -> None:
    """Drop what is left in a results queue (a SimpleQueue or an asyncio.Queue)."""
    empty: tuple[type[BaseException], ...] = (queue.Empty,)
    if "asyncio" in sys.modules:
        empty += (sys.modules["asyncio"].QueueEmpty,)
    while True:
        try:
            item = results.get_nowait()
        except empty:
            return
        _drop(*item)


def collect(batches: Iterable[list[Any]]) -> list[Any]:
    """Every result of ``run_batches`` in one list (each batch appended at C speed)."""
    results: list[Any] = []
    for batch in batches:
        results += batch
    return results


def flatten(batches: Iterator[list[Any]]) -> Iterator[Any]:
    """One result at a time from ``run_batches`` (closing it when abandoned)."""
    try:
        for batch in batches:
            yield from batch
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def item_error(chunk: Chunk, outcome: ChunkResult, decorator: bool = False) -> BaseException:
    error = outcome.error
    assert error is not None
    index = outcome.failed_at()
    items = chunk.shown_items()
    item = items[index] if index < len(items) else None
    if error.stage is Stage.TIMEOUT:
        return TaskTimeoutError([item], chunk.timeout or 0.0, outcome.worker_id)
    if error.stage is not Stage.CALL:
        return SerializationError(error.message)
    return error.to_exception(item, outcome.worker_id, outcome.pid, decorator=decorator)


# -- single calls ----------------------------------------------------------------------
class _Completions:
    """One thread per process that completes ``submit`` futures, so that a future's
    done-callbacks (user code) never run on a manager thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, work: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # first use, or after fork
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, args=(self._queue,),
                                                name="twat-mp-completions", daemon=True)
                self._thread.start()
            self._queue.put(work)

    @staticmethod
    def _run(work_queue: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            work_queue.get()()


completions = _Completions()


def settled(dispatcher: Dispatcher, chunk: Chunk, outcome: Any, dropped: bool) -> ChunkResult | None:
    """The result of a chunk of single calls, its payload released: None where there is
    nothing more to do (``dropped``: nobody wants it; or it was sent again, pickled with
    dill, because the worker could not load it by reference). Raises the exception that
    failed the whole chunk (a dead worker, a timeout)."""
    release(chunk.payload)
    if dropped:
        if isinstance(outcome, (bytes, memoryview)):
            release(outcome)
        return None
    if isinstance(outcome, BaseException):
        raise outcome
    result = decode(outcome, keep=True)  # a call's value may feed the next call: keep its segments
    if result.error is not None and result.error.stage is Stage.LOAD and not chunk.used_dill:
        encode(dispatcher, chunk, force_dill=True)
        dispatcher.submit(chunk)
        return None
    return result


def submit_call(dispatcher: Dispatcher, fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any], *, timeout: float | None = None, retries: int = 0,
                slot: int | None = None, tag: str | None = None) -> concurrent.futures.Future[Any]:
    """Run ``fn(*args, **kwargs)`` in a worker (in slot ``slot``, or a worker tagged
    ``tag``, if given); return a Future of its result."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def resolve(chunk: Chunk, outcome: Any) -> None:
        try:
            result = settled(dispatcher, chunk, outcome, future.cancelled())
            if result is None:
                return
            if result.error is not None:
                raise item_error(chunk, result)
            value = result.results[0]
        except BaseException as exc:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled meanwhile
                future.set_exception(exc)
        else:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_result(value)

    chunk = Chunk(make_fnref(dispatcher, fn, MODE_CALL), [(args, kwargs)],
                  lambda c, outcome: completions.put(lambda: resolve(c, outcome)),
                  timeout=timeout, retries=retries, slot=slot, tag=tag)
    encode(dispatcher, chunk)
    future.add_done_callback(lambda f: f.cancelled() and dispatcher.cancel(chunk))
    dispatcher.submit(chunk)
    return future
