"""What runs inside a worker: the loop of a worker process, and the chunk runner that
process and thread workers share.

A process worker ignores SIGINT (the caller decides what Ctrl-C means), exits on its own
when its parent dies (a watchdog thread polls the parent pid), loads each function once
by token, and answers every task frame with exactly one result frame.
"""

from __future__ import annotations

import os
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


def run_chunk(fn: Callable[..., Any], mode: int, items: list[Any], worker_id: int, pid: int) -> ChunkResult:
    """Call ``fn`` on each item; stop at the first exception and report it."""
    results: list[Any] = []
    append = results.append
    start = time.perf_counter()
    try:
        if mode == MODE_ONE:
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


def _stage_error(stage: Stage, message: str) -> RemoteError:
    return RemoteError(None, f"twat_mp.{stage.name.lower()}", message, "", stage)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(70)


def _limit_torch_threads() -> None:
    """One intra-op thread per worker process: the workers already fill the cores, and a
    forked child must not touch the OpenMP pool its parent started (it would hang)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def process_worker_main(task_r: Any, result_w: Any, worker_id: int, parent_pid: int,
                        init_payload: bytes | None, shm_prefix: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state.enter_process_worker(worker_id)
    _limit_torch_threads()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    pid = os.getpid()
    if init_payload is not None:
        try:
            initializer, initargs = loads(init_payload)
            initializer(*initargs)
        except Exception as exc:
            error = RemoteError.capture(exc)
            result_w.send_bytes(HEADER.pack(protocol.INIT_FAILED, 0, 0) + dumps(error)[0])
            return
    functions: dict[int, tuple[Any, int]] = {}
    while True:
        try:
            frame = task_r.recv_bytes()
        except (EOFError, OSError):
            return
        kind, chunk_id, token = HEADER.unpack_from(frame)
        body = memoryview(frame)[HEADER.size:]
        if kind == protocol.TASK:
            result = _run_task(functions, token, body, worker_id, pid)
            try:
                payload, _ = dumps(result, "results", shm_prefix)
            except Exception:
                where = find_unpicklable(result.results)
                payload = dumps(ChunkResult([], _stage_error(
                    Stage.RESULT, f"a result cannot be pickled: {where}"), worker_id, pid, result.elapsed))[0]
            result_w.send_bytes(HEADER.pack(protocol.RESULT, chunk_id, 0) + payload)
        elif kind == protocol.FUNC:
            if len(functions) >= FUNCTION_CACHE_SIZE:
                functions.pop(next(iter(functions)))
            try:
                functions[token] = (loads(body[:-1]), body[-1])
            except Exception as exc:
                functions[token] = (exc, -1)
        elif kind == protocol.STOP:
            return


def _run_task(functions: dict[int, tuple[Any, int]], token: int, body: memoryview,
              worker_id: int, pid: int) -> ChunkResult:
    fn, mode = functions.get(token, (None, -1))
    if mode == -1:
        return ChunkResult([], _stage_error(
            Stage.LOAD, f"the worker could not load the function: {fn!r}"), worker_id, pid, 0.0)
    try:
        items = loads(body)
    except Exception as exc:
        return ChunkResult([], _stage_error(
            Stage.LOAD, f"the worker could not unpickle the items: {exc!r}"), worker_id, pid, 0.0)
    return run_chunk(fn, mode, items, worker_id, pid)

