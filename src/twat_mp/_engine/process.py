"""Worker processes: the process transport of the dispatcher, sync or asyncio.

::

    manager thread                                  worker process (fork, spawn, forkserver)
    ──────────────                                  ────────────────────────────────────────
    send_frame(task_w, FUNC, once per token)   ─▶ task_r ─▶ cache function
    send_frame(task_w, TASK)                      ─▶ task_r ─▶ run the chunk ─┐
    result_r ◀── RESULT frame (by chunk id) ◀──────── result_w ◀──────────────┘
    stamp ◀── chunk id and index of the running item (sync workers, timed chunks)
    proc.sentinel ready ─▶ worker died: re-run or fail its chunks, restart its slot

Processes and pipes come from ``multiprocess`` (pathos's process layer, with dill), so
``spawn`` can start workers from a notebook.

A sync worker runs one chunk at a time. Behind it the manager may queue more only
while everything queued fits in the task pipe's buffer (raised to 1 MiB where the
kernel allows): the manager's writes then never block on a worker that is itself
blocked writing a result, so the pipes cannot deadlock. An async worker
(``concurrency > 0``) reads its pipe from its event loop, so it takes many chunks
at once (up to twice ``concurrency`` items, within the same pipe budget) and answers
them in any order.
"""

from __future__ import annotations

import fcntl
import math
import os
import select
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import multiprocess

from twat_mp._engine import protocol, shm
from twat_mp._engine.dispatcher import Chunk, Dispatcher, RestartPolicy, SlotSpec, Worker, WorkerEvent
from twat_mp._engine.protocol import HEADER
from twat_mp._engine.serialization import dumps_dill, loads
from twat_mp._engine.worker import FUNCTION_CACHE_SIZE, WorkerSetup, process_worker_main

STOP_GRACE_SECONDS = 1.0
PIPE_BYTES = 1 << 20  # asked of the kernel for each task and result pipe (F_SETPIPE_SZ)
#: At most this much pipe buffer for one pool: the kernel counts it against the user's
#: pipe-user-pages-soft (64 MiB by default), beyond which every new pipe of the user is
#: tiny. Pools of more than 16 workers get smaller buffers.
POOL_PIPE_BYTES = 32 << 20
MIN_QUEUE_BYTES = 16 * 1024  # well under the smallest pipe buffer (64 KiB on Linux)
ASYNC_DEADLINE_GRACE = 1.0  # an async worker enforces timeouts itself; this is a backstop


def default_start_method() -> str:
    """forkserver on Linux: safe in a parent that runs threads (ours run a manager
    thread per pool), with modules preloaded so workers start fast; spawn elsewhere."""
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


# -- forkserver: workers forked from a clean, single-threaded server process ------------
#: Modules the server imports once, so that workers forked from it do not import them
#: again (torch takes seconds). Only those the caller has imported are preloaded.
HEAVY_MODULES = ("numpy", "torch", "pandas", "scipy", "sklearn", "jax", "tensorflow", "polars", "pyarrow")
_server_lock = threading.Lock()
_preloaded: tuple[str, ...] | None = None
_no_main = threading.local()
_retired_servers: list[Any] = []


def _use_server(server: Any) -> None:
    """Make ``server`` multiprocess's forkserver (its module functions are bound methods
    of the singleton, so rebind them too)."""
    from multiprocess import forkserver

    forkserver._forkserver = server
    for name in ("ensure_running", "get_inherited_fds", "connect_to_new_process", "set_forkserver_preload"):
        setattr(forkserver, name, getattr(server, name))


def _prepare_forkserver(ctx: Any) -> None:
    """Set the forkserver's preload list: our worker module and the heavy modules the
    caller has imported. When the caller has imported a heavy module since the server
    started, new workers come from a new server that preloads it too."""
    global _preloaded
    wanted = ("twat_mp._engine.worker", *(m for m in HEAVY_MODULES if m in sys.modules))
    if "twat_mp._engine.async_worker" in sys.modules:
        wanted += ("twat_mp._engine.async_worker",)
    with _server_lock:
        if _preloaded is not None and set(wanted) <= set(_preloaded):
            return
        from multiprocess import forkserver

        if _preloaded is not None:
            # A new server for new workers; the old one keeps serving the workers it
            # forked (their exit statuses come through it), until stop_forkserver().
            _retired_servers.append(forkserver._forkserver)
            _use_server(forkserver.ForkServer())
        ctx.set_forkserver_preload(list(wanted))
        _preloaded = wanted
        _install_main_filter()


def stop_forkserver() -> None:
    """Stop the forkserver once no pool of ours is open (``shutdown_warm_pools`` calls
    it), so the caller is left with no child process; the next pool starts it again.
    A Jupyter kernel, for one, waits for its children before it exits."""
    global _preloaded
    from twat_mp._engine.dispatcher import live_dispatchers

    with _server_lock:
        if _preloaded is None or any(d.running and getattr(d, "start_method", "") == "forkserver"
                                     for d in live_dispatchers()):
            return  # a pool still open or still stopping (its workers are the server's children)
        from multiprocess import forkserver, resource_tracker

        for server in [*_retired_servers, forkserver._forkserver]:
            try:
                server._stop()
            except FileNotFoundError:  # at exit its socket's directory may be gone already
                server._forkserver_address = None
        _retired_servers.clear()
        resource_tracker._resource_tracker._stop()  # the server started it; it ignores SIGTERM
        _preloaded = None


def _forget_server_after_fork() -> None:
    """A forked child is not the parent of its parent's forkserver: it starts its own."""
    global _preloaded, _server_lock
    _server_lock = threading.Lock()
    _retired_servers.clear()
    if _preloaded is not None:
        _preloaded = None
        from multiprocess import forkserver

        _use_server(forkserver.ForkServer())


os.register_at_fork(after_in_child=_forget_server_after_fork)


def _install_main_filter() -> None:
    """Workers never re-import the caller's ``__main__`` (functions travel by value), so
    a script needs no ``if __name__ == "__main__":`` guard under forkserver either: the
    preparation data of our workers leaves the main module out."""
    from multiprocess import spawn

    original = spawn.get_preparation_data
    if getattr(original, "twat_mp", False):
        return

    def get_preparation_data(name: str) -> dict[str, Any]:
        data: dict[str, Any] = original(name)
        if getattr(_no_main, "on", False):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data.twat_mp = True  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data


def _forkserver_process_class(ctx: Any) -> Any:
    from multiprocess.popen_forkserver import Popen

    class _Popen(Popen):  # type: ignore[misc]
        def _launch(self, process_obj: Any) -> None:
            _no_main.on = True
            try:
                super()._launch(process_obj)
            finally:
                _no_main.on = False

    class WorkerProcess(ctx.Process):  # type: ignore[misc]
        @staticmethod
        def _Popen(process_obj: Any) -> Any:
            return _Popen(process_obj)

    return WorkerProcess


def _load_error(body: memoryview) -> Any:
    return loads(body)


def pipe_bytes(nodes: int) -> int:
    """The buffer to ask for each of the two pipes of a worker in a pool of ``nodes``."""
    share = POOL_PIPE_BYTES // (2 * max(1, nodes))
    return max(64 * 1024, min(PIPE_BYTES, 1 << (share.bit_length() - 1)))


def _grow_pipe(fd: int, size: int) -> int:
    """Raise a pipe's buffer towards ``size``; return what it holds."""
    try:
        return fcntl.fcntl(fd, 1031, size)  # F_SETPIPE_SZ (Linux)
    except OSError:
        try:
            return fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ
        except OSError:
            return 64 * 1024


class _ProcessWorker(Worker):
    def __init__(self, slot: int, proc: Any, task_w: Any, result_r: Any, stamp: Any, pipe_bytes: int) -> None:
        super().__init__(slot)
        self.proc = proc
        self.pid = proc.pid
        self.task_w = task_w
        self.result_r = result_r
        self.stamp = memoryview(stamp).cast("B").cast("q")
        self.queue_budget = max(MIN_QUEUE_BYTES, pipe_bytes // 2)
        self.items_held = 0  # items of the chunks it holds (async workers)
        self.released = False
        self.readable = select.poll()  # is a frame waiting? (Connection.poll builds a selector each call)
        self.readable.register(result_r.fileno(), select.POLLIN)

    def running_item(self) -> tuple[int, int] | None:
        return self.stamp[0], self.stamp[1]

    def release(self) -> None:
        self.released = True  # dead and reaped: nothing of it may be used any more
        for conn in (self.task_w, self.result_r):
            conn.close()
        try:
            self.proc.close()
        except ValueError:  # still running: only after a failed kill
            pass


class ProcessDispatcher(Dispatcher):
    kind = "process"
    ships_bytes = True

    def __init__(self, nodes: int, *, start_method: str | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: Sequence[Any] = (),
                 slots: Iterable[SlotSpec] | None = None, policy: RestartPolicy | None = None,
                 concurrency: int = 0, max_tasks: int = 0,
                 on_event: Callable[[WorkerEvent], None] | None = None) -> None:
        self.start_method = start_method or default_start_method()
        self.concurrency = concurrency
        self.max_tasks = max_tasks
        self.in_order = self.stamps_items = not concurrency
        if concurrency:
            self.kind = "async-process"
        self._ctx = multiprocess.get_context(self.start_method)
        self._process_class = self._ctx.Process
        if concurrency:
            import twat_mp._engine.async_worker  # noqa: F401  (preloaded by the forkserver too)
        if self.start_method == "forkserver":
            _prepare_forkserver(self._ctx)
            self._process_class = _forkserver_process_class(self._ctx)
        self._init_payload = dumps_dill((initializer, tuple(initargs)), "initializer") if initializer else None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self.shm_prefix: str | None = shm.new_prefix() if shm.AVAILABLE else None
        self._dead_pids: list[int | None] = []
        self._polled: tuple[list[Worker], Any, dict[int, tuple[str, _ProcessWorker]]] | None = None
        self._fd_lock = threading.Lock()  # the wake pipe closes while callers may write
        try:
            super().__init__(nodes, slots=slots, policy=policy, on_event=on_event)
        except BaseException:
            self._stop_all(graceful=False)
            raise

    def _start_worker(self, slot: int) -> Worker:
        task_r, task_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        stamp = self._ctx.RawArray("q", 2)  # running item: chunk id, index
        spec = self.slots[slot]
        env = spec.env
        if self.start_method != "fork":  # the caller's environment as it is now, then the slot's
            env = (*os.environ.items(), *env)
        slot_init = dumps_dill(spec.init, "slot initializer") if spec.init is not None else None
        setup = WorkerSetup(slot, os.getpid(), self._init_payload, self.shm_prefix, env,
                            self.concurrency, self.max_tasks, slot_init)
        target: Callable[..., None] = process_worker_main
        if self.concurrency:
            from twat_mp._engine.async_worker import async_worker_main

            target = async_worker_main
        proc = self._process_class(
            target=target,
            args=(task_r, result_w, setup, stamp),
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
        size = pipe_bytes(self.nodes)
        _grow_pipe(result_r.fileno(), size)  # a large result is then written in one go, not in 64 KiB turns
        return _ProcessWorker(slot, proc, task_w, result_r, stamp, _grow_pipe(task_w.fileno(), size))

    def _send(self, worker: Worker, chunk: Chunk) -> None:
        assert isinstance(worker, _ProcessWorker) and chunk.payload is not None
        fn = chunk.fn
        worker.items_held += len(chunk.items)
        try:
            if fn.token not in worker.tokens:
                assert fn.payload is not None
                if len(worker.tokens) >= FUNCTION_CACHE_SIZE:  # the worker drops its oldest too
                    worker.tokens.pop(next(iter(worker.tokens)))
                protocol.send_frame(worker.task_w, HEADER.pack(protocol.FUNC, 0, fn.token, 0.0), fn.payload)
                worker.tokens[fn.token] = None
            protocol.send_frame(worker.task_w, HEADER.pack(protocol.TASK, chunk.id, fn.token, chunk.timeout or 0.0),
                                chunk.payload)
        except OSError:
            pass  # the worker died; its sentinel reports it and the chunk is re-run or failed

    def _has_room(self, worker: Worker, chunk: Chunk) -> bool:
        if not self.concurrency:
            return super()._has_room(worker, chunk)
        assert isinstance(worker, _ProcessWorker)
        if not worker.chunks:
            return True
        return worker.items_held < 2 * self.concurrency and self._can_queue(worker, chunk)

    def _can_queue(self, worker: Worker, chunk: Chunk) -> bool:
        # Only what fits in the pipe's buffer: the manager must never block on a write
        # while the worker blocks writing its result (pipe deadlock). (An async worker
        # reads its frames as they come; the bound keeps the manager's writes short.)
        assert isinstance(worker, _ProcessWorker)
        assert chunk.payload is not None and chunk.fn.payload is not None
        queued = list(worker.chunks.values())[0 if self.concurrency else 1:]
        size = len(chunk.payload) + sum(len(c.payload or b"") + HEADER.size for c in queued)
        if chunk.fn.token not in worker.tokens:
            size += len(chunk.fn.payload)
        return size <= worker.queue_budget

    def _started_chunks(self, worker: Worker) -> list[Chunk]:
        if self.concurrency:
            return list(worker.chunks.values())  # all of them may have been running
        return super()._started_chunks(worker)

    def _deadline(self, worker: Worker) -> float | None:
        if not self.concurrency:
            return super()._deadline(worker)
        if worker.timed_out:
            return None
        deadlines = [c.sent_at + c.timeout * (math.ceil(len(c.items) / self.concurrency) + 2)
                     + ASYNC_DEADLINE_GRACE for c in worker.chunks.values() if c.timeout is not None]
        return min(deadlines) if deadlines else None

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

    def _poller(self) -> tuple[Any, dict[int, tuple[str, _ProcessWorker]]]:
        """A poll object on the wake pipe and every worker's result pipe and sentinel,
        made again only when the workers change (a fresh one: no stale descriptor)."""
        workers = list(self._workers.values())
        if self._polled is None or self._polled[0] != workers:
            poller, by_fd = select.poll(), {}
            poller.register(self._wake_r, select.POLLIN)
            for w in workers:
                assert isinstance(w, _ProcessWorker)
                by_fd[w.result_r.fileno()] = ("conn", w)
                by_fd[w.proc.sentinel] = ("sentinel", w)
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            self._polled = (workers, poller, by_fd)
        return self._polled[1], self._polled[2]

    def _wait(self, timeout: float | None) -> list[tuple[str, Worker, Any]]:
        poller, by_fd = self._poller()
        with self._blocking():
            ready = poller.poll(None if timeout is None else math.ceil(timeout * 1000))
        events: list[tuple[str, Worker, Any]] = []
        dead: list[_ProcessWorker] = []
        for key, _ in ready:
            if key == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self._wake_pending = False  # after draining, or a wake could be lost
                continue
            what, worker = by_fd[key]
            if what == "conn":
                self._receive_all(worker, events)
            else:
                dead.append(worker)
        for worker in dead:  # read what a worker sent before it died, then bury it
            self._receive_all(worker, events)
            worker.proc.join(0.5)
            events.append(("dead", worker, worker.proc.exitcode))
            self._dead_pids.append(worker.pid)  # what it wrote while dying is swept at stop
            worker.release()
        return events

    def _receive_all(self, worker: _ProcessWorker, events: list[tuple[str, Worker, Any]]) -> None:
        """Every frame the worker has written so far."""
        try:
            while worker.readable.poll(0):
                frame = protocol.recv_frame(worker.result_r)
                kind, chunk_id, _, _ = HEADER.unpack_from(frame)
                body = memoryview(frame)[HEADER.size:]
                if kind == protocol.RESULT:
                    chunk = worker.chunks.get(chunk_id)
                    if chunk is not None:
                        worker.items_held -= len(chunk.items)
                    events.append(("result", worker, (chunk_id, body)))
                elif kind == protocol.INIT_FAILED:
                    events.append(("init_failed", worker, _load_error(body)))
                elif kind == protocol.RETIRE:
                    events.append(("retire", worker, None))
        except (EOFError, OSError):
            return  # it died mid-write; the sentinel reports the death

    def _retire(self, worker: Worker) -> None:
        assert isinstance(worker, _ProcessWorker)
        try:
            protocol.send_frame(worker.task_w, HEADER.pack(protocol.STOP, 0, 0, 0.0))
        except OSError:
            pass  # already gone: its sentinel says so

    def _kill(self, worker: Worker) -> None:
        assert isinstance(worker, _ProcessWorker)
        if not worker.released:  # one that died in the same wait was released already
            worker.proc.kill()

    def _stop_all(self, graceful: bool) -> None:
        workers = [w for w in self._workers.values() if isinstance(w, _ProcessWorker) and not w.released]
        self._workers.clear()
        if graceful:
            for w in workers:
                self._retire(w)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            for w in workers:
                w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.proc.exitcode is None:
                w.proc.kill()
        for w in workers:
            w.proc.join(2.0)
            w.release()
        if self.shm_prefix is not None:
            if not graceful:
                shm.sweep(self.shm_prefix)  # segments of results cut off mid-flight
            else:  # every result was delivered: what dead workers left half-sent is garbage
                for pid in self._dead_pids:
                    shm.sweep(f"{self.shm_prefix}-{pid}")
        with self._fd_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
