"""Worker threads: the thread transport of the dispatcher.

::

    manager thread ── inbox.put(chunk) ─▶ worker thread ─▶ run_chunk ─┐
          ▲                                                           │
          └───────── events.get() ◀── ("result", worker, ChunkResult) ┘

Threads come from ``multiprocess.dummy`` (pathos's thread layer). A thread cannot be
killed: a thread that runs past its timeout is abandoned (its late result is dropped)
and a fresh thread takes its slot.
"""

from __future__ import annotations

import os
import queue
import time
from typing import Any, Callable, Iterable, Sequence

from multiprocess.dummy import DummyProcess

from twat_mp import state
from twat_mp._engine.dispatcher import Chunk, Dispatcher, RestartPolicy, SlotSpec, Worker, WorkerEvent
from twat_mp._engine.protocol import RemoteError, Stage
from twat_mp._engine.worker import run_chunk

STOP_GRACE_SECONDS = 1.0
_WAKE = ("wake", None, None)


class _ThreadWorker(Worker):
    def __init__(self, slot: int) -> None:
        super().__init__(slot)
        self.pid: int = os.getpid()
        self.inbox: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        self.thread: Any = None
        self.stamp = [0, 0]  # running item: chunk id, index (for timeouts)

    def running_item(self) -> tuple[int, int] | None:
        return self.stamp[0], self.stamp[1]


class ThreadDispatcher(Dispatcher):
    kind = "thread"
    stamps_items = True

    def __init__(self, nodes: int, *, initializer: Callable[..., Any] | None = None,
                 initargs: Sequence[Any] = (), slots: Iterable[SlotSpec] | None = None,
                 policy: RestartPolicy | None = None,
                 on_event: Callable[[WorkerEvent], None] | None = None) -> None:
        self._events: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._initializer = initializer
        self._initargs = tuple(initargs)
        super().__init__(nodes, slots=slots, policy=policy, on_event=on_event)

    def _start_worker(self, slot: int) -> Worker:
        worker = _ThreadWorker(slot)
        thread = DummyProcess(target=self._thread_main, args=(worker,), name=f"twat-mp-thread-{slot}")
        thread.daemon = True
        thread.start()
        worker.thread = thread
        return worker

    def _thread_main(self, worker: _ThreadWorker) -> None:
        state.enter_thread_worker(worker.slot)
        slot_init = self.slots[worker.slot].init
        for initializer, initargs in ((self._initializer, self._initargs), slot_init or (None, ())):
            if initializer is None:
                continue
            try:
                initializer(*initargs)
            except Exception as exc:
                self._events.put(("init_failed", worker, RemoteError.capture(exc)._replace(stage=Stage.INIT)))
                return
        while True:
            chunk = worker.inbox.get()
            if chunk is None:
                return
            stamp = None
            if chunk.timeout:
                stamp = worker.stamp
                stamp[0], stamp[1] = chunk.id, 0
            result = run_chunk(chunk.fn.fn, chunk.fn.mode, chunk.items, worker.slot, worker.pid, stamp)
            self._events.put(("result", worker, (chunk.id, result)))

    def _send(self, worker: Worker, chunk: Chunk) -> None:
        assert isinstance(worker, _ThreadWorker)
        worker.inbox.put(chunk)

    def _wake(self) -> None:
        self._events.put(_WAKE)

    def _wait(self, timeout: float | None) -> list[tuple[str, Worker, Any]]:
        events = []
        try:
            with self._blocking():
                event = self._events.get(timeout=timeout)
            while True:
                if event is not _WAKE:
                    events.append(event)
                event = self._events.get_nowait()
        except queue.Empty:
            pass
        return events

    def _kill(self, worker: Worker) -> None:
        assert isinstance(worker, _ThreadWorker)
        worker.inbox.put(None)  # it exits once its stuck call returns; its result is dropped
        self._events.put(("dead", worker, None))

    def _stop_all(self, graceful: bool) -> None:
        workers = [w for w in self._workers.values() if isinstance(w, _ThreadWorker)]
        self._workers.clear()
        for worker in workers:
            worker.inbox.put(None)
        if graceful:  # a thread stuck in user code cannot be stopped; it is left to finish
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            for worker in workers:
                worker.thread.join(max(0.0, deadline - time.monotonic()))
