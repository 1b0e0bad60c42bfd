"""Worker processes: the process transport of the dispatcher.

::

    manager thread                                  worker process (fork or spawn)
    ──────────────                                  ──────────────────────────────
    task_w.send_bytes(FUNC frame, once per token) ─▶ task_r ─▶ cache function
    task_w.send_bytes(TASK frame)                 ─▶ task_r ─▶ run_chunk ─┐
    result_r ◀── RESULT frame ◀───────────────────── result_w ◀───────────┘
    proc.sentinel ready ─▶ worker died: re-run or fail its chunk, start a replacement

Processes and pipes come from ``multiprocess`` (pathos's process layer, with dill), so
``spawn`` can start workers from a notebook. A worker runs one chunk and may have one
more waiting in its pipe only if that chunk (with its function, if not yet sent) fits in
16 KiB, far below the pipe's buffer: the manager's writes never block on a worker that is
itself blocked writing a result, so the pipes cannot deadlock.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Sequence

import multiprocess
from multiprocess.connection import wait as mp_wait

from twat_mp._engine import protocol, shm
from twat_mp._engine.dispatcher import Chunk, Dispatcher, Worker
from twat_mp._engine.protocol import HEADER
from twat_mp._engine.serialization import dumps_dill
from twat_mp._engine.worker import FUNCTION_CACHE_SIZE, process_worker_main

STOP_GRACE_SECONDS = 1.0
QUEUE_BEHIND_MAX_BYTES = 16 * 1024  # well under the smallest pipe buffer (64 KiB on Linux)


def default_start_method() -> str:
    return "fork" if sys.platform.startswith("linux") else "spawn"


class _ProcessWorker(Worker):
    def __init__(self, slot: int, proc: Any, task_w: Any, result_r: Any) -> None:
        super().__init__(slot)
        self.proc = proc
        self.pid = proc.pid
        self.task_w = task_w
        self.result_r = result_r

    def release(self) -> None:
        for conn in (self.task_w, self.result_r):
            conn.close()
        try:
            self.proc.close()
        except ValueError:  # still running: only after a failed kill
            pass


class ProcessDispatcher(Dispatcher):
    kind = "process"

    def __init__(self, nodes: int, *, start_method: str | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: Sequence[Any] = ()) -> None:
        self.start_method = start_method or default_start_method()
        self._ctx = multiprocess.get_context(self.start_method)
        self._init_payload = dumps_dill((initializer, tuple(initargs)), "initializer") if initializer else None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self.shm_prefix: str | None = shm.new_prefix() if shm.AVAILABLE else None
        self._fd_lock = threading.Lock()  # the wake pipe closes while callers may write
        try:
            super().__init__(nodes)
        except BaseException:
            self._stop_all(graceful=False)
            raise

    def _start_worker(self, slot: int) -> Worker:
        task_r, task_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=process_worker_main,
            args=(task_r, result_w, slot, os.getpid(), self._init_payload, self.shm_prefix),
            name=f"twat-mp-worker-{slot}",
            daemon=True,
        )
        try:
            proc.start()
        except Exception as exc:
            for conn in (task_r, task_w, result_r, result_w):
                conn.close()
            raise RuntimeError(f"cannot start a worker process ({self.start_method}): {exc!r}") from exc
        task_r.close()
        result_w.close()
        return _ProcessWorker(slot, proc, task_w, result_r)

    def _send(self, worker: Worker, chunk: Chunk) -> None:
        assert isinstance(worker, _ProcessWorker) and chunk.payload is not None
        fn = chunk.fn
        try:
            if fn.token not in worker.tokens:
                assert fn.payload is not None
                if len(worker.tokens) >= FUNCTION_CACHE_SIZE:  # the worker drops its oldest too
                    worker.tokens.pop(next(iter(worker.tokens)))
                worker.task_w.send_bytes(HEADER.pack(protocol.FUNC, 0, fn.token) + fn.payload)
                worker.tokens[fn.token] = None
            worker.task_w.send_bytes(HEADER.pack(protocol.TASK, chunk.id, fn.token) + chunk.payload)
        except OSError:
            pass  # the worker died; its sentinel reports it and the chunk is re-run or failed

    def _can_queue(self, worker: Worker, chunk: Chunk) -> bool:
        # Only what fits in the pipe's buffer at once: the manager must never block on a
        # write while the worker blocks writing its result (pipe deadlock).
        assert chunk.payload is not None and chunk.fn.payload is not None
        size = len(chunk.payload)
        if chunk.fn.token not in worker.tokens:
            size += len(chunk.fn.payload)
        return size <= QUEUE_BEHIND_MAX_BYTES

    def _wake(self) -> None:
        if self._wake_pending:
            return
        self._wake_pending = True
        with self._fd_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # the pipe is full: the manager is awake anyway

    def _wait(self, timeout: float | None) -> list[tuple[str, Worker, Any]]:
        by_key: dict[Any, tuple[str, _ProcessWorker]] = {}
        for w in self._workers.values():
            assert isinstance(w, _ProcessWorker)
            by_key[w.result_r] = ("conn", w)
            by_key[w.proc.sentinel] = ("sentinel", w)
        ready = mp_wait([self._wake_r, *by_key], timeout)
        events: list[tuple[str, Worker, Any]] = []
        dead: list[_ProcessWorker] = []
        for key in ready:
            if key == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self._wake_pending = False  # after draining, or a wake could be lost
                continue
            what, worker = by_key[key]
            if what == "conn":
                event = self._receive(worker)
                if event is not None:
                    events.append(event)
            else:
                dead.append(worker)
        for worker in dead:  # read what a worker sent before it died, then bury it
            if worker.result_r.poll(0) and not any(e[1] is worker for e in events):
                event = self._receive(worker)
                if event is not None:
                    events.append(event)
            worker.proc.join(0.5)
            events.append(("dead", worker, worker.proc.exitcode))
            worker.release()
        return events

    @staticmethod
    def _receive(worker: _ProcessWorker) -> tuple[str, Worker, Any] | None:
        try:
            frame = worker.result_r.recv_bytes()
        except (EOFError, OSError):
            return None  # it died mid-write; the sentinel reports the death
        kind, _, _ = HEADER.unpack_from(frame)
        body = memoryview(frame)[HEADER.size:]
        if kind == protocol.INIT_FAILED:
            from twat_mp._engine.serialization import loads

            error = loads(body)
            return ("init_failed", worker, f"{error.type_name}: {error.message}\n{error.traceback_str}")
        return ("result", worker, body)

    def _kill(self, worker: Worker) -> None:
        assert isinstance(worker, _ProcessWorker)
        worker.proc.kill()

    def _stop_all(self, graceful: bool) -> None:
        workers = [w for w in self._workers.values() if isinstance(w, _ProcessWorker)]
        self._workers.clear()
        if graceful:
            for w in workers:
                try:
                    w.task_w.send_bytes(HEADER.pack(protocol.STOP, 0, 0))
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            for w in workers:
                w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.proc.exitcode is None:
                w.proc.kill()
        for w in workers:
            w.proc.join(2.0)
            w.release()
        if not graceful and self.shm_prefix is not None:
            shm.sweep(self.shm_prefix)  # segments of results cut off mid-flight
        with self._fd_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
