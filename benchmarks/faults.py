"""Time to detect and recover from each fault (``make bench`` runs it after run.py).

Each row: how long from the fault to the caller seeing the error (detect), and from
there to the pool serving the next call (recover). Medians of 5.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import psutil

from twat_mp import AsyncMultiPool, ProcessPool, TaskTimeoutError, ThreadPool, WorkerCrashedError

REPEAT = 5


def kill_self_after_mark(path: str) -> int:
    with open(path, "w") as mark:
        mark.write(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


def exit_after_mark(path: str) -> int:
    with open(path, "w") as mark:
        mark.write(str(time.time()))
    os._exit(3)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def hang(_: int) -> int:
    time.sleep(60)
    return 0


@contextlib.contextmanager
def marked() -> Iterator[tuple[str, Callable[[], float]]]:
    """A file the dying worker stamps with the time of its death, and a function that
    says how long ago that was."""
    with tempfile.NamedTemporaryFile(delete=False) as handle:
        path = handle.name

    def since_mark() -> float:
        now = time.time()
        with open(path) as mark:
            return now - float(mark.read())

    try:
        yield path, since_mark
    finally:
        os.unlink(path)


def crash_case(fn, label: str) -> None:  # type: ignore[no-untyped-def]
    detect, recover = [], []
    with ProcessPool(nodes=2) as pool:
        for _ in range(REPEAT):
            with marked() as (path, since_mark):
                try:
                    pool.map(fn, [path])
                except WorkerCrashedError:
                    detect.append(since_mark())
            start = time.perf_counter()
            pool.map(abs, [-1, -2])
            recover.append(time.perf_counter() - start)
    row(label, detect, recover)


def timeout_case(pool_class, label: str) -> None:  # type: ignore[no-untyped-def]
    detect, recover = [], []
    with pool_class(nodes=2) as pool:
        for _ in range(REPEAT):
            start = time.perf_counter()
            try:
                pool.map(hang, [0], timeout=0.2)
            except TaskTimeoutError:
                detect.append(time.perf_counter() - start - 0.2)
            start = time.perf_counter()
            pool.map(abs, [-1, -2])
            recover.append(time.perf_counter() - start)
    row(label, detect, recover)


def interrupt_case() -> None:
    reap = []
    for _ in range(REPEAT):
        with ProcessPool(nodes=2) as pool:
            pids = set(pool.map(lambda _: os.getpid(), range(20), chunksize=1))
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                pool.map(hang, [0, 1])
            except KeyboardInterrupt:
                start = time.perf_counter()
            while any(map(alive, pids)):
                time.sleep(0.001)
            reap.append(time.perf_counter() - start)
    row("Ctrl-C during a map: all workers reaped", reap, None)


def parent_death_case() -> None:
    gone = []
    code = ("import os, time\nfrom twat_mp import ProcessPool\npool = ProcessPool(nodes=2)._open()\n"
            "print(*set(pool.map(lambda _: os.getpid(), range(20), chunksize=1)), flush=True)\ntime.sleep(60)\n")
    for _ in range(REPEAT):
        parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        pids = {int(p) for p in parent.stdout.readline().split()}  # type: ignore[union-attr]
        parent.kill()
        start = time.perf_counter()
        parent.wait()
        while any(map(alive, pids)):
            time.sleep(0.005)
        gone.append(time.perf_counter() - start)
    row("parent killed: its workers exit", gone, None)


async def async_kill(path: str) -> int:
    kill_self_after_mark(path)
    return 0


def async_case() -> None:
    detect, recover = [], []

    async def run() -> None:
        async with AsyncMultiPool(processes=2) as pool:
            for _ in range(REPEAT):
                with marked() as (path, since_mark):
                    try:
                        await pool.map(async_kill, [path])
                    except WorkerCrashedError:
                        detect.append(since_mark())
                start = time.perf_counter()
                await pool.map(abs, [-1])
                recover.append(time.perf_counter() - start)

    asyncio.run(run())
    row("async worker SIGKILL (AsyncMultiPool), target 50 ms", detect, recover)


def row(label: str, detect: list[float], recover: list[float] | None) -> None:
    rec = f"{statistics.median(recover) * 1000:8.1f} ms" if recover else "       —"
    print(f"  {label:<44} detect {statistics.median(detect) * 1000:8.1f} ms   recover {rec}")


def main() -> None:
    print("\n== faults: time to detect and to recover (medians of 5)")
    crash_case(kill_self_after_mark, "worker SIGKILL (ProcessPool)")
    crash_case(exit_after_mark, "worker os._exit(3) (ProcessPool)")
    timeout_case(ProcessPool, "item past timeout (ProcessPool), beyond 0.2 s")
    timeout_case(ThreadPool, "item past timeout (ThreadPool), beyond 0.2 s")
    async_case()
    interrupt_case()
    parent_death_case()


if __name__ == "__main__":
    main()
