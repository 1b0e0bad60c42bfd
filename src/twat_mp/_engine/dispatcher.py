"""The manager: one thread that owns every piece of mutable engine state.

::

    submit(chunk) ─▶ pending deque ─┐                       ┌─▶ worker 0
    cancel(chunk) ─▶ chunk.cancelled │  manager thread       ├─▶ worker 1
    close()/terminate() ─▶ flags ───┴─▶ dispatch / wait ────┴─▶ ...
                                          │   ▲
          chunk.sink(chunk, outcome) ◀────┘   └── results, deaths, deadlines

Callers only append to ``pending`` (thread-safe) and wake the manager. The manager
hands a chunk to an idle worker, one at a time per worker, waits for results, worker
deaths and deadlines, re-runs or fails the chunks of dead and timed-out workers, starts
replacements, and calls each chunk's ``sink`` exactly once. Transports (processes,
threads) subclass it and say how a worker starts, receives and is stopped.
"""

from __future__ import annotations

import collections
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable

from twat_mp._engine.protocol import MODE_CALL
from twat_mp._engine.serialization import release
from twat_mp._logging import logger
from twat_mp.errors import PoolClosedError, TaskTimeoutError, WorkerCrashedError

#: A chunk is queued behind a busy worker only when that worker's chunks take less than
#: this: then a round trip is a real share of the work. Longer chunks go to whichever
#: worker is free first, which balances the load better.
QUEUE_BEHIND_BELOW_SECONDS = 0.01

Outcome = Any  # ChunkResult, its pickled bytes, or a BaseException for the chunk
Sink = Callable[["Chunk", Outcome], None]


class FnRef:
    """A function as the engine ships it: ``token`` names its payload in workers' caches."""

    __slots__ = ("fn", "mode", "payload", "token")

    def __init__(self, fn: Callable[..., Any], mode: int, payload: bytes | None, token: int) -> None:
        self.fn = fn
        self.mode = mode
        self.payload = payload
        self.token = token


class Chunk:
    """A batch of items of one call, and where its outcome goes."""

    __slots__ = ("attempts", "cancelled", "fn", "id", "items", "payload", "retries", "seq",
                 "sink", "timeout", "used_dill")

    _ids = iter(range(1, 1 << 62))

    def __init__(self, fn: FnRef, items: list[Any], sink: Sink, *, seq: int = 0,
                 timeout: float | None = None, retries: int = 0) -> None:
        self.id = next(Chunk._ids)
        self.seq = seq
        self.fn = fn
        self.items = items
        self.sink = sink
        self.timeout = timeout
        self.retries = retries
        self.attempts = 0
        self.cancelled = False
        self.payload: bytes | None = None
        self.used_dill = False

    def shown_items(self) -> list[Any]:
        """The items as a user sees them: a single call shows its arguments."""
        if self.fn.mode != MODE_CALL:
            return self.items
        return [args if not kwargs else (args, kwargs) for args, kwargs in self.items]


class Worker:
    """The manager's record of one worker."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.chunks: collections.deque[Chunk] = collections.deque()  # sent, in the worker's order
        self.started = 0.0  # when the chunk at the head of ``chunks`` started
        self.last_duration = float("inf")  # how long its previous chunk took
        self.deadline: float | None = None
        self.tokens: dict[int, None] = {}  # functions the worker holds, oldest first
        self.timed_out = False
        self.pid: int | None = None


class Dispatcher(ABC):
    kind = "?"
    shm_prefix: str | None = None  # where large buffers of this engine's payloads go

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        self._pending: collections.deque[Chunk] = collections.deque()
        self._workers: dict[int, Worker] = {}
        self._closing = False  # no new work; finish what is queued, then stop
        self._terminating = False  # stop now
        self._broken: BaseException | None = None
        self._lock = threading.Lock()  # guards only the closing/terminating flags
        for slot in range(nodes):
            self._workers[slot] = self._start_worker(slot)  # in the caller: errors surface here
        self._thread = threading.Thread(target=self._run, name=f"twat-mp-{self.kind}-manager", daemon=True)
        self._thread.start()
        logger.debug("{} dispatcher started with {} workers", self.kind, nodes)

    # -- the caller's side -------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not (self._closing or self._terminating) and self._broken is None

    @property
    def error(self) -> BaseException | None:
        """Why the dispatcher stopped working (initializer failure, start failure)."""
        return self._broken

    def submit(self, chunk: Chunk) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closing or self._terminating:
            raise PoolClosedError("the pool is closed; create a new one to submit more work")
        self._pending.append(chunk)
        self._wake()

    @staticmethod
    def cancel(chunk: Chunk) -> None:
        chunk.cancelled = True

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._wake()

    def terminate(self) -> None:
        with self._lock:
            self._closing = self._terminating = True
        self._wake()

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- transport hooks ---------------------------------------------------------------
    @abstractmethod
    def _start_worker(self, slot: int) -> Worker: ...

    @abstractmethod
    def _send(self, worker: Worker, chunk: Chunk) -> None: ...

    @abstractmethod
    def _wait(self, timeout: float | None) -> list[tuple[str, Worker, Any]]:
        """Block until something happens; return events ("result", worker, outcome),
        ("dead", worker, exitcode) or ("init_failed", worker, message)."""

    @abstractmethod
    def _wake(self) -> None: ...

    @abstractmethod
    def _kill(self, worker: Worker) -> None:
        """Stop a stuck worker now; a "dead" event for it must follow."""

    @abstractmethod
    def _stop_all(self, graceful: bool) -> None:
        """Stop every worker and release every resource of the transport."""

    # -- the manager thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._terminating:
                self._dispatch()  # first: it drops cancelled chunks from ``pending``
                if self._closing and not self._pending and not self._busy():
                    break
                for event, worker, value in self._wait(self._next_deadline()):
                    self._handle(event, worker, value)
                self._check_deadlines()
        except BaseException as exc:  # a bug here must fail the calls, never hang them
            logger.exception("twat-mp manager thread failed")
            self._broken = RuntimeError(f"twat-mp {self.kind} pool manager failed: {exc!r}")
        finally:
            self._closing = True
            try:
                self._stop_all(graceful=not self._terminating and self._broken is None)
            finally:
                self._fail_outstanding(self._broken or PoolClosedError(
                    "the pool was terminated before this work finished"))
            logger.debug("{} dispatcher stopped", self.kind)

    def _busy(self) -> bool:
        return any(w.chunks for w in self._workers.values())

    def _dispatch(self) -> None:
        """Give each idle worker a chunk; then queue one more behind a busy worker where
        the transport says it is safe, so workers never wait for their next chunk."""
        for depth in (0, 1):
            ready = [w for w in self._workers.values() if len(w.chunks) == depth and not w.timed_out]
            while ready and self._pending:
                chunk = self._pending[0]
                if chunk.cancelled:
                    self._pending.popleft()
                    continue
                worker = ready[-1]
                if depth and not (chunk.timeout is None and worker.chunks[0].timeout is None
                                  and worker.last_duration < QUEUE_BEHIND_BELOW_SECONDS
                                  and self._can_queue(worker, chunk)):
                    break
                self._pending.popleft()
                ready.pop()
                if not depth:
                    worker.started = time.monotonic()
                    if chunk.timeout:
                        worker.deadline = worker.started + chunk.timeout * len(chunk.items)
                worker.chunks.append(chunk)
                self._send(worker, chunk)

    def _can_queue(self, worker: Worker, chunk: Chunk) -> bool:
        """May ``chunk`` wait in ``worker``'s queue behind the one it runs? (The
        transport's say; the dispatcher already requires short chunks and no timeout.)"""
        return True

    def _next_deadline(self) -> float | None:
        deadlines = [w.deadline for w in self._workers.values() if w.deadline is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers.values()):
            if worker.deadline is not None and worker.deadline <= now and not worker.timed_out:
                worker.timed_out = True
                worker.deadline = None
                logger.debug("worker {} ran past its deadline; stopping it", worker.slot)
                self._kill(worker)

    def _handle(self, event: str, worker: Worker, value: Any) -> None:
        if self._workers.get(worker.slot) is not worker:
            return  # a late event from a worker already replaced
        if event == "result":
            chunk = worker.chunks.popleft() if worker.chunks else None
            worker.deadline = None
            now = time.monotonic()
            worker.last_duration, worker.started = now - worker.started, now
            if chunk is not None and not chunk.cancelled:
                self._deliver(chunk, value)
            elif isinstance(value, (bytes, memoryview)):
                release(value)  # nobody will unpickle it: free its shared memory
        elif event == "dead":
            self._on_death(worker, value)
        elif event == "init_failed":
            self._broken = RuntimeError(
                f"the worker initializer failed, so the pool cannot start workers: {value}")
            self._terminating = True

    def _on_death(self, worker: Worker, exitcode: int | None) -> None:
        del self._workers[worker.slot]
        chunk = worker.chunks.popleft() if worker.chunks else None  # the one it was running
        for waiting in reversed(worker.chunks):  # never started: back to the front, no retry used
            self._pending.appendleft(waiting)
        worker.chunks.clear()
        logger.debug("worker {} (pid {}) ended with {}", worker.slot, worker.pid, exitcode)
        if not (self._closing or self._terminating):
            try:
                self._workers[worker.slot] = self._start_worker(worker.slot)
            except Exception as exc:
                self._broken = RuntimeError(f"cannot start a replacement worker: {exc!r}")
                self._terminating = True
        if chunk is None or chunk.cancelled:
            return
        error: BaseException
        if worker.timed_out:
            error = TaskTimeoutError(chunk.shown_items(), chunk.timeout or 0.0, worker.slot)
        else:
            error = WorkerCrashedError(chunk.shown_items(), worker.slot, worker.pid, exitcode)
        if chunk.attempts < chunk.retries and not self._terminating:
            chunk.attempts += 1
            logger.debug("re-running chunk {} (attempt {})", chunk.id, chunk.attempts + 1)
            self._pending.appendleft(chunk)
        else:
            self._deliver(chunk, error)

    def _fail_outstanding(self, error: BaseException) -> None:
        chunks = [chunk for w in self._workers.values() for chunk in w.chunks]
        chunks += list(self._pending)
        self._pending.clear()
        for worker in self._workers.values():
            worker.chunks.clear()
        for chunk in chunks:
            if not chunk.cancelled:
                self._deliver(chunk, error)

    @staticmethod
    def _deliver(chunk: Chunk, outcome: Outcome) -> None:
        try:
            chunk.sink(chunk, outcome)
        except Exception:
            logger.exception("twat-mp: a result sink failed")
