from __future__ import annotations

import os
import time

import psutil
import pytest


def wait_gone(pids: set[int], within: float = 2.0) -> set[int]:
    """Pids still alive (not reaped) after ``within`` seconds; polls, never sleeps blind."""
    deadline = time.monotonic() + within
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        if alive:
            time.sleep(0.01)
    return alive


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE or proc.ppid() == os.getpid()
    except psutil.NoSuchProcess:
        return False


def worker_pids(pool, n: int = 40) -> set[int]:
    return set(pool.map(_getpid, range(n), chunksize=1))


def _getpid(_: object) -> int:
    return os.getpid()


@pytest.fixture
def children_before():
    return {c.pid for c in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="session", autouse=True)
def no_segment_of_this_run_is_left():
    """After the whole suite, and once its pools and runtimes are shut down, no
    shared-memory segment owned by this test process is left in /dev/shm."""
    yield
    import gc

    from twat_mp import shutdown

    shutdown()
    gc.collect()
    mine = f"twat-mp-{os.getpid()}-"
    left = [name for name in os.listdir("/dev/shm") if name.startswith(mine)] if os.path.isdir("/dev/shm") else []
    assert left == [], f"shared-memory segments of this run left behind: {left}"
