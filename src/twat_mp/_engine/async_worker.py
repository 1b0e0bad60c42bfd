"""The asyncio worker: an event loop in a worker process running up to ``concurrency``
calls at once.

::

    task pipe ─▶ loop reader (add_reader) ─▶ TASK: a task per chunk ─▶ its items' calls,
                                             awaited concurrently under one semaphore
    result pipe ◀── RESULT frame (chunk id) ◀── as each chunk finishes, in any order

A call past its timeout is cancelled here (the worker lives on); the first failing call
cancels the rest of its chunk; with ``max_tasks`` the worker asks to be retired.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from typing import Any

from twat_mp._engine import protocol, shm
from twat_mp._engine.protocol import HEADER, MODE_ONE, MODE_STAR, ChunkResult, RemoteError, Stage
from twat_mp._engine.worker import (
    WorkerSetup,
    _per_call,
    encode_result,
    load_function,
    prepare,
    stage_error,
    start_worker,
)


def async_worker_main(task_r: Any, result_w: Any, setup: WorkerSetup, stamp: Any) -> None:
    """An event loop running up to ``setup.concurrency`` calls at once; frames are read
    by a loop callback as they arrive."""
    if not start_worker(setup, result_w, "async-process"):
        return
    asyncio.run(_AsyncWorker(task_r, result_w, setup).serve())


class _AsyncWorker:
    def __init__(self, task_r: Any, result_w: Any, setup: WorkerSetup) -> None:
        self.task_r = task_r
        self.result_w = result_w
        self.setup = setup
        self.pid = os.getpid()
        self.functions: dict[int, tuple[Any, int]] = {}
        self.running: set[asyncio.Task[None]] = set()
        self.calls = 0
        self.retire_asked = False

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.limit = asyncio.Semaphore(self.setup.concurrency)
        self.stopped = loop.create_future()
        loop.add_reader(self.task_r.fileno(), self._on_readable)
        self._prune_later(loop)
        await self.stopped
        loop.remove_reader(self.task_r.fileno())
        if self.running:  # STOP: answer what was sent before it
            await asyncio.gather(*self.running, return_exceptions=True)

    def _prune_later(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every second: let go of shared mappings whose owners released them."""
        shm.prune_kept()
        loop.call_later(1.0, self._prune_later, loop)

    def _on_readable(self) -> None:
        """Read every frame that has arrived. The manager writes whole frames and never
        sends an async worker more than its pipe holds, so a read never waits long."""
        try:
            while self.task_r.poll(0):
                self._on_frame(protocol.recv_frame(self.task_r))
        except (EOFError, OSError):  # the manager is gone
            self._on_frame(HEADER.pack(protocol.STOP, 0, 0, 0.0))

    def _on_frame(self, frame: bytes | bytearray) -> None:
        kind, chunk_id, token, timeout = HEADER.unpack_from(frame)
        body = memoryview(frame)[HEADER.size:]
        if kind == protocol.TASK:
            task = asyncio.ensure_future(self._run_chunk(chunk_id, token, body, timeout or None))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        elif kind == protocol.FUNC:
            load_function(self.functions, token, body)
        elif kind == protocol.STOP and not self.stopped.done():
            self.stopped.set_result(None)

    async def _run_chunk(self, chunk_id: int, token: int, body: memoryview, timeout: float | None) -> None:
        fn, mode, items, error = prepare(self.functions, token, body)
        worker_id = self.setup.worker_id
        if error is not None:
            result = ChunkResult([], error, worker_id, self.pid, 0.0)
        else:
            result = await self._run_items(fn, mode, items, timeout)
        protocol.send_frame(self.result_w, HEADER.pack(protocol.RESULT, chunk_id, 0, 0.0),
                            encode_result(result, self.setup.shm_prefix, _per_call(fn, mode)))
        del result, items
        shm.prune_kept()
        if self.setup.max_tasks and self.calls >= self.setup.max_tasks and not self.retire_asked:
            self.retire_asked = True
            protocol.send_frame(self.result_w, HEADER.pack(protocol.RETIRE, 0, 0, 0.0))

    async def _run_items(self, fn: Any, mode: int, items: list[Any], timeout: float | None) -> ChunkResult:
        """Call ``fn`` on every item; await the awaitable results concurrently (at most
        ``concurrency`` in the whole worker). The first error cancels the rest."""
        start = time.perf_counter()
        results: list[Any] = [None] * len(items)
        waiting: dict[int, asyncio.Future[Any]] = {}
        failed: tuple[int, BaseException] | None = None
        for index, item in enumerate(items):
            self.calls += 1
            try:
                if mode == MODE_ONE:
                    call = fn(item)
                elif mode == MODE_STAR:
                    call = fn(*item)
                else:
                    call = fn(*item[0], **item[1])
            except (Exception, SystemExit) as raised:  # a plain function raised
                failed = (index, raised)
                break
            if inspect.isawaitable(call):
                waiting[index] = asyncio.ensure_future(self._await(call, timeout))
            else:
                results[index] = call
        if waiting and failed is None:
            try:
                for index, value in zip(waiting, await asyncio.gather(*waiting.values())):
                    results[index] = value
            except (Exception, SystemExit):
                first = min(i for i, f in waiting.items()
                            if f.done() and not f.cancelled() and f.exception() is not None)
                raised_later = waiting[first].exception()
                assert raised_later is not None
                failed = (first, raised_later)
        if failed is None:
            return ChunkResult(results, None, self.setup.worker_id, self.pid, time.perf_counter() - start)
        for future in waiting.values():  # stop at the first error: the rest is cancelled
            future.cancel()
        index, exc = failed
        done = []
        for i in range(index):
            pending = waiting.get(i)
            if pending is not None and not (pending.done() and not pending.cancelled()
                                            and pending.exception() is None):
                break
            done.append(results[i])
        if isinstance(exc, _Exit):
            exc = exc.exc
        if isinstance(exc, _CallTimedOut):
            error = stage_error(Stage.TIMEOUT, f"the call ran past timeout={timeout:g}s")
        else:
            error = RemoteError.capture(exc)
        return ChunkResult(done, error, self.setup.worker_id, self.pid, time.perf_counter() - start, index)

    async def _await(self, call: Any, timeout: float | None) -> Any:
        async with self.limit:
            try:
                if timeout is None:
                    return await call
                try:
                    return await asyncio.wait_for(call, timeout)
                except asyncio.TimeoutError:
                    raise _CallTimedOut from None
            except SystemExit as exc:  # asyncio would let it end the loop: carry it as data
                raise _Exit(exc) from exc


class _CallTimedOut(Exception):
    """An async call ran past its timeout (told apart from the user's TimeoutError)."""


class _Exit(Exception):
    """A SystemExit raised by a call, carried through asyncio (which would re-raise it
    out of the event loop)."""

    def __init__(self, exc: SystemExit) -> None:
        super().__init__(exc)
        self.exc = exc
