"""What runs inside a worker: the two loops of a worker process (sync and asyncio),
and the chunk runner that process and thread workers share.

::

    sync worker                               async worker
    ───────────                               ────────────
    recv TASK ─▶ run_chunk ─▶ send RESULT     loop reader: recv frame ─▶ a task
       (one chunk at a time, in order;        loop: each TASK becomes a task; its items
        each item's start stamped for           run concurrently, at most
        the manager when it has a timeout)      ``concurrency`` calls in the whole worker;
                                                RESULT frames go back by chunk id as
                                                chunks finish, in any order

A process worker ignores SIGINT (the caller decides what Ctrl-C means), exits on its own
when its parent dies (a watchdog thread polls the parent pid), applies its slot's
environment, loads each function once by token, and answers every task frame with
exactly one result frame.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import select
import signal
import sys
import threading
import time
from typing import Any, Callable

from twat_mp import state
from twat_mp._engine import protocol
from twat_mp._engine.protocol import HEADER, MODE_ONE, MODE_STAR, ChunkResult, RemoteError, Stage
from twat_mp._engine.serialization import dumps, find_unpicklable, loads

PARENT_POLL_SECONDS = 0.25
FUNCTION_CACHE_SIZE = 64


def run_chunk(fn: Callable[..., Any], mode: int, items: list[Any], worker_id: int, pid: int,
              stamp: Any = None) -> ChunkResult:
    """Call ``fn`` on each item; stop at the first exception and report it. With
    ``stamp`` (a one-slot array the manager can read), write each item's start time
    into it, so the manager can enforce a per-item timeout on a whole batch."""
    results: list[Any] = []
    append = results.append
    start = time.perf_counter()
    try:
        if stamp is not None:
            clock = time.monotonic
            if mode == MODE_ONE:
                for index, item in enumerate(items):
                    stamp[0] = clock()
                    stamp[1] = index
                    append(fn(item))
            else:
                for index, item in enumerate(items):
                    stamp[0] = clock()
                    stamp[1] = index
                    append(fn(*item) if mode == MODE_STAR else fn(*item[0], **item[1]))
        elif mode == MODE_ONE:
            for item in items:
                append(fn(item))
        elif mode == MODE_STAR:
            for item in items:
                append(fn(*item))
        else:
            for args, kwargs in items:
                append(fn(*args, **kwargs))
    except (Exception, SystemExit) as exc:
        return ChunkResult(results, RemoteError.capture(exc), worker_id, pid, time.perf_counter() - start)
    return ChunkResult(results, None, worker_id, pid, time.perf_counter() - start)


def stage_error(stage: Stage, message: str) -> RemoteError:
    return RemoteError(None, f"twat_mp.{stage.name.lower()}", message, "", stage)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the process that owns the pool dies. Under forkserver that process is
    not our parent, so watch it by pid: a pidfd turns readable when it exits (Linux);
    elsewhere, poll."""
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(70)
    except (AttributeError, OSError):  # no pidfd here: poll the pid
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(70)
            except PermissionError:
                pass
    select.select([pidfd], [], [])
    os._exit(70)


def _limit_torch_threads() -> None:
    """One intra-op thread per worker process: the workers already fill the cores, and a
    forked child must not touch the OpenMP pool its parent started (it would hang)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


class WorkerSetup:
    """What a worker process needs to start: sent as one argument of the process."""

    def __init__(self, worker_id: int, parent_pid: int, init_payload: bytes | None, shm_prefix: str | None,
                 env: tuple[tuple[str, str], ...] = (), concurrency: int = 0, max_tasks: int = 0) -> None:
        self.worker_id = worker_id
        self.parent_pid = parent_pid
        self.init_payload = init_payload
        self.shm_prefix = shm_prefix
        self.env = env
        self.concurrency = concurrency  # 0: a sync worker; else async calls at once
        self.max_tasks = max_tasks  # calls before the worker asks to be replaced (0: never)


def _start(setup: WorkerSetup, result_w: Any, kind: str) -> bool:
    """Common start of every worker process; False if the initializer failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(dict(setup.env))
    state.enter_process_worker(setup.worker_id, kind=kind)
    _limit_torch_threads()
    threading.Thread(target=_watch_parent, args=(setup.parent_pid,), daemon=True).start()
    if setup.init_payload is not None:
        try:
            initializer, initargs = loads(setup.init_payload)
            initializer(*initargs)
        except Exception as exc:
            error = RemoteError.capture(exc)._replace(stage=Stage.INIT)
            result_w.send_bytes(HEADER.pack(protocol.INIT_FAILED, 0, 0, 0.0) + dumps(error)[0])
            return False
    return True


def _load_function(functions: dict[int, tuple[Any, int]], token: int, body: memoryview) -> None:
    if len(functions) >= FUNCTION_CACHE_SIZE:
        functions.pop(next(iter(functions)))
    try:
        functions[token] = (loads(body[:-1]), body[-1])
    except Exception as exc:
        functions[token] = (exc, -1)


def _encode_result(result: ChunkResult, shm_prefix: str | None) -> bytes:
    try:
        payload, _ = dumps(result, "results", shm_prefix)
    except Exception:
        where = find_unpicklable(result.results)
        payload = dumps(ChunkResult([], stage_error(Stage.RESULT, f"a result cannot be pickled: {where}"),
                                    result.worker_id, result.pid, result.elapsed))[0]
    return payload


def process_worker_main(task_r: Any, result_w: Any, setup: WorkerSetup, stamp: Any) -> None:
    if not _start(setup, result_w, "process"):
        return
    worker_id, pid = setup.worker_id, os.getpid()
    stamp = memoryview(stamp).cast("B").cast("d")  # cheaper to write than the ctypes array
    functions: dict[int, tuple[Any, int]] = {}
    while True:
        try:
            frame = task_r.recv_bytes()
        except (EOFError, OSError):
            return
        kind, chunk_id, token, timeout = HEADER.unpack_from(frame)
        body = memoryview(frame)[HEADER.size:]
        if kind == protocol.TASK:
            fn, mode, items, error = _prepare(functions, token, body)
            if error is not None:
                result = ChunkResult([], error, worker_id, pid, 0.0)
            else:
                result = run_chunk(fn, mode, items, worker_id, pid, stamp if timeout else None)
            result_w.send_bytes(HEADER.pack(protocol.RESULT, chunk_id, 0, 0.0)
                                + _encode_result(result, setup.shm_prefix))
        elif kind == protocol.FUNC:
            _load_function(functions, token, body)
        elif kind == protocol.STOP:
            return


def _prepare(functions: dict[int, tuple[Any, int]], token: int,
             body: memoryview) -> tuple[Any, int, Any, RemoteError | None]:
    fn, mode = functions.get(token, (None, -1))
    if mode == -1:
        return None, -1, None, stage_error(Stage.LOAD, f"the worker could not load the function: {fn!r}")
    try:
        items = loads(body)
    except Exception as exc:
        return None, -1, None, stage_error(Stage.LOAD, f"the worker could not unpickle the items: {exc!r}")
    return fn, mode, items, None


# -- the asyncio worker -------------------------------------------------------------------
def async_worker_main(task_r: Any, result_w: Any, setup: WorkerSetup, stamp: Any) -> None:
    """An event loop running up to ``setup.concurrency`` calls at once; frames are read
    by a loop callback as they arrive."""
    if not _start(setup, result_w, "async-process"):
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
        await self.stopped
        loop.remove_reader(self.task_r.fileno())
        if self.running:  # STOP: answer what was sent before it
            await asyncio.gather(*self.running, return_exceptions=True)

    def _on_readable(self) -> None:
        """Read every frame that has arrived. The manager writes whole frames and never
        sends an async worker more than its pipe holds, so a read never waits long."""
        try:
            while self.task_r.poll(0):
                self._on_frame(self.task_r.recv_bytes())
        except (EOFError, OSError):  # the manager is gone
            self._on_frame(HEADER.pack(protocol.STOP, 0, 0, 0.0))

    def _on_frame(self, frame: bytes) -> None:
        kind, chunk_id, token, timeout = HEADER.unpack_from(frame)
        body = memoryview(frame)[HEADER.size:]
        if kind == protocol.TASK:
            task = asyncio.ensure_future(self._run_chunk(chunk_id, token, body, timeout or None))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
        elif kind == protocol.FUNC:
            _load_function(self.functions, token, body)
        elif kind == protocol.STOP and not self.stopped.done():
            self.stopped.set_result(None)

    async def _run_chunk(self, chunk_id: int, token: int, body: memoryview, timeout: float | None) -> None:
        fn, mode, items, error = _prepare(self.functions, token, body)
        worker_id = self.setup.worker_id
        if error is not None:
            result = ChunkResult([], error, worker_id, self.pid, 0.0)
        else:
            result = await self._run_items(fn, mode, items, timeout)
        self.result_w.send_bytes(HEADER.pack(protocol.RESULT, chunk_id, 0, 0.0)
                                 + _encode_result(result, self.setup.shm_prefix))
        if self.setup.max_tasks and self.calls >= self.setup.max_tasks and not self.retire_asked:
            self.retire_asked = True
            self.result_w.send_bytes(HEADER.pack(protocol.RETIRE, 0, 0, 0.0))

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
