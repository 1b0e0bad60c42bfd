"""200 cycles of creating, using and closing each pool kind leave the process as it was:
file descriptors, threads, child processes and shared-memory segments."""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import threading
import time

import psutil
import pytest

from conftest import wait_gone
from twat_mp import AsyncMultiPool, ProcessPool, ThreadPool, shutdown_warm_pools

CYCLES = 200


def quiesce() -> None:
    """Start from a process with no pool of earlier tests still running or stopping:
    their threads ending mid-test would look like a change (bounded wait, no blind sleep)."""
    shutdown_warm_pools()
    gc.collect()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
            t.name.endswith("-manager") or t.name.startswith("twat-mp-thread-") for t in threading.enumerate()):
        time.sleep(0.01)
        gc.collect()


def snapshot() -> dict[str, object]:
    gc.collect()  # count what is held, not what awaits the collector
    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads": collections.Counter(t.name for t in threading.enumerate()),
        "children": {c.pid for c in me.children(recursive=True)},
        "shm": {n for n in os.listdir("/dev/shm") if n.startswith("twat-mp-")},
    }


def assert_nothing_left(before: dict[str, object], after: dict[str, object]) -> None:
    """Nothing was added: descriptors, children, segments, threads. (A thread of an
    earlier test that ends meanwhile, such as an abandoned timed-out thread worker, is
    no leak.)"""
    assert after["fds"] == before["fds"]
    assert after["children"] == before["children"]
    assert after["shm"] == before["shm"]
    assert not after["threads"] - before["threads"], after["threads"] - before["threads"]  # type: ignore[operator]


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
    quiesce()
    with pool_class(nodes=2) as pool:  # warm up lazy imports, caches, the forkserver
        pool.map(len, [big])
    before = snapshot()
    for cycle in range(CYCLES):
        with pool_class(nodes=2) as pool:
            assert pool.map(inc, range(8)) == list(range(1, 9))
            if cycle % 20 == 0:
                assert pool.map(len, [big]) == [len(big)]
    assert_nothing_left(before, settle(before))


@pytest.mark.timeout(300)
def test_async_pool_cycles_leak_nothing():
    cycles = int(os.environ.get("TWAT_MP_ASYNC_CYCLES", CYCLES))

    async def cycle():
        async with AsyncMultiPool(processes=1) as pool:
            assert await pool.map(ainc, [1, 2]) == [2, 3]

    quiesce()
    asyncio.run(cycle())
    before = snapshot()
    for _ in range(cycles):
        asyncio.run(cycle())
    assert_nothing_left(before, settle(before))


@pytest.mark.timeout(180)
def test_runtime_cycles_leak_nothing():
    """Runtimes with thread, process and async ops, made and shut down 30 times; with
    large values held by refs and then dropped."""
    from twat_mp import Runtime, get, op

    @op(kind="process")
    def big(n):
        return bytes(n)

    @op(kind="process")
    def size(data):
        return len(data)

    @op(kind="thread")
    def tinc(x):
        return x + 1

    @op
    async def ainc_op(x):
        return x + 1

    def cycle():
        with Runtime(nodes=2, threads=2):
            value = big.go(2 << 20)
            assert get([size.go(value), ainc_op.go(tinc.go(1))]) == [2 << 20, 3]
            del value

    quiesce()
    cycle()  # warm up lazy imports and the forkserver
    before = snapshot()
    for _ in range(30):
        cycle()
    assert_nothing_left(before, settle(before))
