"""200 cycles of creating, using and closing each pool kind leave the process as it was:
file descriptors, threads, child processes and shared-memory segments."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

import psutil
import pytest

from conftest import wait_gone
from twat_mp import AsyncMultiPool, ProcessPool, ThreadPool

CYCLES = 200


def snapshot() -> dict[str, object]:
    gc.collect()  # count what is held, not what awaits the collector
    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads": threading.active_count(),
        "children": {c.pid for c in me.children(recursive=True)},
        "shm": {n for n in os.listdir("/dev/shm") if n.startswith("twat-mp-")},
    }


def settle(before: dict[str, object]) -> dict[str, object]:
    """The snapshot once exited children are reaped (bounded wait, no blind sleep)."""
    after = snapshot()
    extra = set(after["children"]) - set(before["children"])  # type: ignore[arg-type]
    wait_gone(extra, within=5.0)
    return snapshot()


def inc(x):
    return x + 1


async def ainc(x):
    return x + 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pool_class", [ProcessPool, ThreadPool])
def test_pool_cycles_leak_nothing(pool_class):
    big = bytes(2 << 20)  # goes through shared memory in process pools
    with pool_class(nodes=2) as pool:  # warm up lazy imports and caches
        pool.map(len, [big])
    before = snapshot()
    for cycle in range(CYCLES):
        with pool_class(nodes=2) as pool:
            assert pool.map(inc, range(8)) == list(range(1, 9))
            if cycle % 20 == 0:
                assert pool.map(len, [big]) == [len(big)]
    assert settle(before) == before


@pytest.mark.timeout(300)
def test_async_pool_cycles_leak_nothing():
    cycles = int(os.environ.get("TWAT_MP_ASYNC_CYCLES", CYCLES))

    async def cycle():
        async with AsyncMultiPool(processes=1) as pool:
            assert await pool.map(ainc, [1, 2]) == [2, 3]

    asyncio.run(cycle())
    before = snapshot()
    for _ in range(cycles):
        asyncio.run(cycle())
    after = settle(before)
    assert after["children"] == before["children"]
    assert after["shm"] == before["shm"]
    assert after["threads"] == before["threads"]
    assert after["fds"] == before["fds"]
