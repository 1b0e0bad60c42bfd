"""What runs inside a worker: the loop of a sync worker process, the set-up every worker
process shares, and the chunk runner of process and thread workers. (The asyncio
worker's loop is in ``async_worker``, imported only by async pools.)

::

    sync worker                               async worker
    ───────────                               ────────────
    recv TASK ─▶ run_chunk ─▶ send RESULT     loop reader: recv frame ─▶ a task
       (one chunk at a time, in order;        loop: each TASK becomes a task; its items
        each item's index published for         run concurrently, at most
        the manager when it has a timeout)      ``concurrency`` calls in the whole worker;
                                                RESULT frames go back by chunk id as
                                                chunks finish, in any order

A process worker ignores SIGINT (the caller decides what Ctrl-C means), exits on its own
when its parent dies (a watchdog thread polls the parent pid), applies its slot's
environment, loads each function once by token, and answers every task frame with
exactly one result frame.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import Any, Callable

from twat_mp import state
from twat_mp._engine import protocol, shm
from twat_mp._engine.protocol import HEADER, MODE_ONE, MODE_STAR, ChunkResult, RemoteError, Stage
from twat_mp._engine.serialization import dumps, find_unpicklable, loads

PARENT_POLL_SECONDS = 0.25
KEPT_PRUNE_SECONDS = 1.0  # an idle worker holding shared mappings checks them this often
FUNCTION_CACHE_SIZE = 64


def run_chunk(fn: Callable[..., Any], mode: int, items: list[Any], worker_id: int, pid: int,
              stamp: Any = None) -> ChunkResult:
    """Call ``fn`` on each item; stop at the first exception and report it. With
    ``stamp`` (an array the manager can read), write each item's index into it as the
    item starts, so the manager can enforce a per-item timeout on a whole batch."""
    results: list[Any] = []
    append = results.append
    start = time.perf_counter()
    try:
        if stamp is not None:
            if mode == MODE_ONE:
                for index, item in enumerate(items):
                    stamp[1] = index
                    append(fn(item))
            else:
                for index, item in enumerate(items):
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
    """Give this worker its share of the cores (``TWAT_MP_TORCH_THREADS``, set per slot
    by the pool: the cores divided among the workers, one for forked workers), so the
    workers together neither oversubscribe nor idle: torch's intra-op threads, and the
    BLAS and OpenMP pools of libraries already loaded (numpy's OpenBLAS read
    ``OMP_NUM_THREADS`` when the forkserver imported it, so the environment alone is too
    late for them; threadpoolctl sets them now). Libraries imported later read the
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` the slot's environment sets to the same share."""
    threads = int(os.environ.get("TWAT_MP_TORCH_THREADS", "1"))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    if "numpy" in sys.modules or "scipy" in sys.modules:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # an environment without it: the env vars still reach later imports
            return
        threadpool_limits(limits=threads)


class WorkerSetup:
    """What a worker process needs to start: sent as one argument of the process."""

    def __init__(self, worker_id: int, parent_pid: int, init_payload: bytes | None, shm_prefix: str | None,
                 env: tuple[tuple[str, str], ...] = (), concurrency: int = 0, max_tasks: int = 0,
                 slot_init: bytes | None = None) -> None:
        self.slot_init = slot_init  # the slot's own (fn, args), after the pool's initializer
        self.worker_id = worker_id
        self.parent_pid = parent_pid
        self.init_payload = init_payload
        self.shm_prefix = shm_prefix
        self.env = env
        self.concurrency = concurrency  # 0: a sync worker; else async calls at once
        self.max_tasks = max_tasks  # calls before the worker asks to be replaced (0: never)


def start_worker(setup: WorkerSetup, result_w: Any, kind: str) -> bool:
    """Common start of every worker process; False if the initializer failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(dict(setup.env))
    state.enter_process_worker(setup.worker_id, kind=kind)
    _limit_torch_threads()
    threading.Thread(target=_watch_parent, args=(setup.parent_pid,), daemon=True).start()
    for payload in (setup.init_payload, setup.slot_init):
        if payload is None:
            continue
        try:
            initializer, initargs = loads(payload)
            initializer(*initargs)
        except Exception as exc:
            error = RemoteError.capture(exc)._replace(stage=Stage.INIT)
            protocol.send_frame(result_w, HEADER.pack(protocol.INIT_FAILED, 0, 0, 0.0), dumps(error)[0])
            return False
    return True


def load_function(functions: dict[int, tuple[Any, int]], token: int, body: memoryview) -> None:
    if len(functions) >= FUNCTION_CACHE_SIZE:
        functions.pop(next(iter(functions)))
    try:
        functions[token] = (loads(body[:-1]), body[-1])
    except Exception as exc:
        functions[token] = (exc, -1)


def encode_result(result: ChunkResult, shm_prefix: str | None, per_call: bool = False) -> bytes:
    """Pickle a chunk's result; one that cannot be is named (``per_call``: a batch of
    independent calls, where only the calls whose results do not pickle fail)."""
    try:
        payload, _ = dumps(result, "results", shm_prefix)
    except Exception:
        if per_call:
            from twat_mp._engine.calls import picklable_outcomes

            fixed = result._replace(results=picklable_outcomes(result.results))
            return dumps(fixed, "results", shm_prefix)[0]
        where = find_unpicklable(result.results, "result")
        payload = dumps(ChunkResult([], stage_error(Stage.RESULT, f"a result cannot be pickled: {where}"),
                                    result.worker_id, result.pid, result.elapsed))[0]
    return payload


def process_worker_main(task_r: Any, result_w: Any, setup: WorkerSetup, stamp: Any) -> None:
    if not start_worker(setup, result_w, "process"):
        return
    worker_id, pid = setup.worker_id, os.getpid()
    stamp = memoryview(stamp).cast("B").cast("q")  # cheaper to write than the ctypes array
    functions: dict[int, tuple[Any, int]] = {}
    while True:
        try:
            while shm.kept_any() and not task_r.poll(KEPT_PRUNE_SECONDS):
                shm.prune_kept()  # idle: free what owners released meanwhile
            frame = protocol.recv_frame(task_r)
        except (EOFError, OSError):
            return
        kind, chunk_id, token, timeout = HEADER.unpack_from(frame)
        body = memoryview(frame)[HEADER.size:]
        if kind == protocol.TASK:
            fn, mode, items, error = prepare(functions, token, body)
            if error is not None:
                result = ChunkResult([], error, worker_id, pid, 0.0)
            else:
                if timeout:  # published for the manager (see Dispatcher._deadline)
                    stamp[0], stamp[1] = chunk_id, 0
                result = run_chunk(fn, mode, items, worker_id, pid, stamp if timeout else None)
            protocol.send_frame(result_w, HEADER.pack(protocol.RESULT, chunk_id, 0, 0.0),
                                encode_result(result, setup.shm_prefix, _per_call(fn, mode)))
            del items, result, frame, body  # hold no task's data (or mapping) while idle
            shm.prune_kept()
        elif kind == protocol.FUNC:
            load_function(functions, token, body)
        elif kind == protocol.STOP:
            return


def _per_call(fn: Any, mode: int) -> bool:
    """Is this chunk a batch of independent calls (``_engine.calls``)?"""
    return mode == MODE_STAR and getattr(fn, "__module__", "") == "twat_mp._engine.calls"


def prepare(functions: dict[int, tuple[Any, int]], token: int,
             body: memoryview) -> tuple[Any, int, Any, RemoteError | None]:
    fn, mode = functions.get(token, (None, -1))
    if mode == -1:
        return None, -1, None, stage_error(Stage.LOAD, f"the worker could not load the function: {fn!r}")
    try:
        items = loads(body)
    except Exception as exc:
        return None, -1, None, stage_error(Stage.LOAD, f"the worker could not unpickle the items: {exc!r}")
    return fn, mode, items, None
