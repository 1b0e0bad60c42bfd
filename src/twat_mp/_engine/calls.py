"""Many independent calls in one chunk, each with its own outcome.

A map stops a chunk at its first error; a batch of calls does not: each call's result or
exception comes back on its own, so one failing call fails only itself. This is how a
task graph sends the tasks that became ready together to a pool as a few chunks instead
of one round trip per task.

::

    caller                          worker (sync, thread or async)
    ──────                          ──────────────────────────────
    submit_calls(calls) ─ chunk ─▶  run_call(fn, args, kwargs) per item (MODE_STAR)
         ▲                          → (True, value) | (False, error)
         └─ finish(chunk, outcome) ◀ one ChunkResult for the whole batch

A process worker sends an error as a ``RemoteError`` (the exception's pickle and the
remote traceback); a thread worker keeps the exception object itself. A worker that
dies, or a call past its ``timeout``, fails every call of the chunk it held (send calls
with a timeout one per chunk to keep that to one), and ``retries`` re-runs the chunk.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

from twat_mp._engine.dispatcher import Chunk, Dispatcher
from twat_mp._engine.jobs import encode, item_error, make_fnref, settled
from twat_mp._engine.protocol import MODE_STAR, RemoteError
from twat_mp._engine.serialization import release
from twat_mp.errors import SerializationError

#: One call's outcome: ``(True, value)`` or ``(False, exception)``.
Outcome = tuple[bool, Any]
Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def run_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
    """Run one call of a batch in a thread worker; its exception is its outcome."""
    try:
        return True, fn(*args, **kwargs)
    except (Exception, SystemExit) as exc:
        return False, exc


def run_call_remote(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
    """Run one call of a batch in a process worker; an exception travels as a RemoteError."""
    try:
        return True, fn(*args, **kwargs)
    except (Exception, SystemExit) as exc:
        return False, RemoteError.capture(exc)


async def run_call_async(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
    """Run one call of a batch in an async worker, awaiting it if it is a coroutine."""
    try:
        value = fn(*args, **kwargs)
        if inspect.isawaitable(value):
            value = await value
        return True, value
    except (Exception, SystemExit) as exc:
        return False, RemoteError.capture(exc)


def _runner(dispatcher: Dispatcher) -> Callable[..., Any]:
    if not dispatcher.ships_bytes:
        return run_call
    return run_call_async if dispatcher.concurrency else run_call_remote


def submit_calls(dispatcher: Dispatcher, calls: Sequence[Call],
                 done: Callable[[list[Outcome] | BaseException, float], None],
                 post: Callable[[Callable[[], None]], None], *, timeout: float | None = None,
                 retries: int = 0, slot: int | None = None, tag: str | None = None,
                 shown: Sequence[Any] | None = None) -> None:
    """Run ``calls`` as one chunk (on worker slot ``slot``, or a worker tagged ``tag``,
    if given). When it is back, ``post`` is handed a function (on the engine's manager
    thread: ``post`` must only queue it, e.g. for an event loop or a completions thread)
    that unpickles the outcome and calls ``done(outcomes, seconds)``: one outcome per
    call, in order, and the seconds the worker spent on them; or ``done(exception, 0)``
    when the whole chunk failed (a dead worker, a timeout). A call whose arguments (or
    result) cannot be pickled fails alone, with ``SerializationError``. ``shown``: what
    errors show of each call (default: its arguments)."""
    chunk = Chunk(make_fnref(dispatcher, _runner(dispatcher), MODE_STAR), list(calls),
                  lambda c, outcome: post(lambda: _finish(dispatcher, c, outcome, done, shown)),
                  timeout=timeout, retries=retries, slot=slot, tag=tag)
    try:
        encode(dispatcher, chunk)
    except SerializationError:
        if len(calls) == 1:
            raise
        _submit_picklable(dispatcher, calls, done, post, timeout=timeout, retries=retries, slot=slot, tag=tag,
                          shown=shown)
        return
    dispatcher.submit(chunk)


def _submit_picklable(dispatcher: Dispatcher, calls: Sequence[Call],
                      done: Callable[[list[Outcome] | BaseException, float], None],
                      post: Callable[[Callable[[], None]], None], **options: Any) -> None:
    """Some call of a batch cannot be pickled: send the others, and fail only those."""
    failed: dict[int, BaseException] = {}
    for index, call in enumerate(calls):
        probe = Chunk(make_fnref(dispatcher, _runner(dispatcher), MODE_STAR), [call], lambda c, o: None)
        try:
            encode(dispatcher, probe)
        except SerializationError as exc:
            failed[index] = exc
        finally:
            release(probe.payload)
    kept = [i for i in range(len(calls)) if i not in failed]
    shown = options.pop("shown")

    def merged(outcome: list[Outcome] | BaseException, seconds: float) -> None:
        if isinstance(outcome, BaseException):
            done(outcome, seconds)
            return
        full: list[Outcome] = [(False, failed[i]) if i in failed else (True, None) for i in range(len(calls))]
        for index, one in zip(kept, outcome):
            full[index] = one
        done(full, seconds)

    if not kept:
        post(lambda: merged([], 0.0))
        return
    submit_calls(dispatcher, [calls[i] for i in kept], merged, post,
                 shown=None if shown is None else [shown[i] for i in kept], **options)


def _finish(dispatcher: Dispatcher, chunk: Chunk, outcome: Any,
            done: Callable[[list[Outcome] | BaseException, float], None], shown: Sequence[Any] | None) -> None:
    try:
        result = settled(dispatcher, chunk, outcome, chunk.cancelled)
        if result is None:
            return
        if result.error is not None:
            raise item_error(chunk, result)
        outcomes: list[Outcome] = []
        for index, ((_, args, _), (ok, value)) in enumerate(zip(chunk.items, result.results)):
            if not ok and isinstance(value, RemoteError):
                item = args if shown is None else shown[index]
                value = value.to_exception(item, result.worker_id, result.pid, decorator=True)
            outcomes.append((ok, value))
    except BaseException as exc:
        done(exc, 0.0)
    else:
        done(outcomes, result.elapsed)


def picklable_outcomes(results: list[Any]) -> list[Any]:
    """In a worker, the outcomes of a batch whose result would not pickle: each outcome
    that does not becomes that call's ``SerializationError`` (the others go back)."""
    from twat_mp._engine.serialization import dumps, find_unpicklable

    fixed: list[Any] = []
    for outcome in results:
        try:
            dumps(outcome, "result")
        except Exception:
            message = f"a result cannot be pickled: {find_unpicklable([outcome[1]], 'result')}"
            outcome = (False, RemoteError.capture(SerializationError(message)))
        fixed.append(outcome)
    return fixed
