"""The caller's side of a map: cut the input into chunks, keep a bounded number in
flight, and hand results back in input order (or as they finish).

The caller's thread runs this generator, so the user's input iterator is only ever
advanced in the caller's thread, and pickling errors surface there at once.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import queue
from typing import Any, Callable, Iterable, Iterator

from twat_mp._engine.dispatcher import Chunk, Dispatcher, FnRef
from twat_mp._engine.process import ProcessDispatcher
from twat_mp._engine.protocol import MODE_CALL, ChunkResult, Stage
from twat_mp._engine.serialization import dumps, dumps_dill, dumps_function, find_unpicklable, loads, release
from twat_mp._options import MapOptions
from twat_mp.errors import SerializationError

#: Chunks of unknown-length input grow until one takes about this long in a worker.
TARGET_CHUNK_SECONDS = 0.02
MAX_ADAPTIVE_CHUNK = 8192


def make_fnref(dispatcher: Dispatcher, fn: Callable[..., Any], mode: int) -> FnRef:
    """Prepare ``fn`` for ``dispatcher``. For processes it is pickled now (every call, so
    a notebook function picks up the globals it sees now), and its token is the hash of
    its bytes, so workers that already hold the same bytes are not sent them again."""
    if not callable(fn):
        raise TypeError(f"expected a callable to map, got {fn!r} of type {type(fn).__qualname__}")
    if isinstance(dispatcher, ProcessDispatcher):
        payload = dumps_function(fn) + bytes([mode])
        return FnRef(fn, mode, payload, hash(payload) & (2**64 - 1))
    return FnRef(fn, mode, None, 0)


def encode(dispatcher: Dispatcher, chunk: Chunk, *, force_dill: bool = False) -> None:
    if not isinstance(dispatcher, ProcessDispatcher):
        return
    try:
        if force_dill:
            chunk.payload, chunk.used_dill = dumps_dill(chunk.items, "items"), True
        else:
            chunk.payload, chunk.used_dill = dumps(chunk.items, "items", dispatcher.shm_prefix)
    except SerializationError as exc:
        raise SerializationError(
            f"cannot send an argument to a worker: {find_unpicklable(chunk.items)}") from exc.__cause__


def decode(outcome: Any) -> ChunkResult:
    if isinstance(outcome, ChunkResult):
        return outcome
    result: ChunkResult = loads(outcome, unlink=True)
    return result


def auto_chunksize(length: int | None, nodes: int) -> int | None:
    """Four chunks per worker for input of known length (as the stdlib Pool does)."""
    if length is None or length <= 0:
        return None
    return max(1, math.ceil(length / (nodes * 4)))


def run_batches(
    dispatcher: Dispatcher,
    fn: Callable[..., Any],
    iterable: Iterable[Any],
    *,
    mode: int,
    options: MapOptions,
    progress: Any = None,
) -> Iterator[list[Any]]:
    """Yield the results of ``fn`` over ``iterable``, computed by ``dispatcher``'s
    workers, one list per chunk (so an eager map flattens them at C speed).

    ``max_in_flight`` bounds the chunks submitted but not yet yielded; ``None`` means
    unbounded for input of known length and ``4 × nodes`` for an iterator.
    """
    ordered, chunksize, timeout, retries = options.ordered, options.chunksize, options.timeout, options.retries
    max_in_flight = options.max_in_flight
    fnref = make_fnref(dispatcher, fn, mode)
    try:
        length: int | None = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        length = None
    fixed = chunksize or (1 if timeout else auto_chunksize(length, dispatcher.nodes))
    size = fixed or 1
    if max_in_flight is None and length is None:
        max_in_flight = 4 * dispatcher.nodes
    results: queue.SimpleQueue[tuple[Chunk, Any]] = queue.SimpleQueue()
    sink = lambda chunk, outcome: results.put((chunk, outcome))  # noqa: E731
    source = iter(iterable)
    outstanding: dict[int, Chunk] = {}
    finished: dict[int, tuple[Chunk, ChunkResult | BaseException]] = {}
    next_seq = next_yield = 0
    exhausted = False

    def receive() -> None:
        nonlocal size
        chunk, outcome = results.get()
        release(chunk.payload)  # the task's shared memory: no longer needed
        if not isinstance(outcome, BaseException):
            outcome = decode(outcome)
            error = outcome.error
            if error is not None and error.stage is Stage.LOAD and not chunk.used_dill:
                encode(dispatcher, chunk, force_dill=True)  # e.g. a class defined after fork
                dispatcher.submit(chunk)
                return
            if fixed is None and outcome.results and outcome.elapsed > 0:
                per_item = outcome.elapsed / len(chunk.items)
                size = max(1, min(size * 2, MAX_ADAPTIVE_CHUNK, int(TARGET_CHUNK_SECONDS / per_item)))
        outstanding.pop(chunk.seq, None)
        finished[chunk.seq] = (chunk, outcome)

    try:
        while True:
            while not exhausted and (max_in_flight is None or len(outstanding) + len(finished) < max_in_flight):
                items = list(itertools.islice(source, size))
                if not items:
                    exhausted = True
                    break
                chunk = Chunk(fnref, items, sink, seq=next_seq, timeout=timeout, retries=retries)
                encode(dispatcher, chunk)
                dispatcher.submit(chunk)
                outstanding[next_seq] = chunk
                next_seq += 1
            if not outstanding and not finished:
                return
            if ordered:
                while next_yield not in finished:
                    receive()
                chunk, outcome = finished.pop(next_yield)
                next_yield += 1
            else:
                if not finished:
                    receive()
                if not finished:
                    continue
                chunk, outcome = finished.pop(next(iter(finished)))
            yield from _unpack(chunk, outcome, progress, options.decorator)
    except (KeyboardInterrupt, SystemExit):
        dispatcher.terminate()  # Ctrl-C means stop now: every worker goes
        raise
    finally:
        for chunk in outstanding.values():
            dispatcher.cancel(chunk)
            release(chunk.payload)


def _unpack(chunk: Chunk, outcome: ChunkResult | BaseException, progress: Any,
            decorator: bool = False) -> Iterator[list[Any]]:
    if isinstance(outcome, BaseException):
        raise outcome
    if progress is not None:
        progress.update(len(outcome.results))
    if outcome.results:
        yield outcome.results
    if outcome.error is not None:
        raise item_error(chunk, outcome, decorator)


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
    index = len(outcome.results)
    if error.stage is not Stage.CALL:
        return SerializationError(error.message)
    items = chunk.shown_items()
    item = items[index] if index < len(items) else None
    return error.to_exception(item, outcome.worker_id, outcome.pid, decorator=decorator)


def submit_call(dispatcher: Dispatcher, fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any], *, timeout: float | None = None,
                retries: int = 0) -> concurrent.futures.Future[Any]:
    """Run ``fn(*args, **kwargs)`` in a worker; return a Future of its result."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def sink(chunk: Chunk, outcome: Any) -> None:
        release(chunk.payload)
        if future.cancelled():
            if isinstance(outcome, (bytes, memoryview)):
                release(outcome)
            return
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            result = decode(outcome)
            if result.error is not None:
                raise item_error(chunk, result)
            value = result.results[0]
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(value)

    chunk = Chunk(make_fnref(dispatcher, fn, MODE_CALL), [(args, kwargs)], sink, timeout=timeout, retries=retries)
    encode(dispatcher, chunk)
    future.add_done_callback(lambda f: f.cancelled() and dispatcher.cancel(chunk))
    dispatcher.submit(chunk)
    return future

