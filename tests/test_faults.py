"""Fault injection: workers really die, tasks really hang, maps are really interrupted."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from conftest import wait_gone, worker_pids
from twat_mp import ProcessPool, TaskTimeoutError, ThreadPool, WorkerCrashedError, pmap

MAP_KINDS = ["map", "imap", "uimap", "amap", "submit"]


def die_on(x, victim=13):
    if x == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


def exit_on(x):
    if x == 5:
        os._exit(3)
    return x


def sleep_on(x):
    if x == 3:
        time.sleep(60)
    return x


def run(pool, kind, fn, items, **options):
    if kind == "map":
        return pool.map(fn, items, **options)
    if kind == "imap":
        return list(pool.imap(fn, items, **options))
    if kind == "uimap":
        return sorted(pool.uimap(fn, items, **options))
    if kind == "amap":
        return pool.amap(fn, items, **options).get(timeout=30)
    futures = [pool.submit(fn, x) for x in items]
    return [f.result(timeout=30) for f in futures]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", MAP_KINDS)
def test_sigkilled_worker_raises_naming_item_and_pool_recovers(kind):
    with ProcessPool(nodes=2) as pool:
        start = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            run(pool, kind, die_on, list(range(80)), **({} if kind == "submit" else {"chunksize": 4}))
        assert time.monotonic() - start < 5
        error = info.value
        assert (13,) in error.items if kind == "submit" else 13 in error.items
        assert error.exitcode == -signal.SIGKILL
        assert "SIGKILL" in str(error)
        assert pool.map(abs, [-1, -2]) == [1, 2]  # a replacement worker took over


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", MAP_KINDS)
def test_retries_rerun_the_items_of_a_dead_worker(kind, tmp_path):
    marker = tmp_path / "died-once"

    def die_once(x):
        if x == 7 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return x * 2

    with ProcessPool(nodes=2, retries=1) as pool:
        assert run(pool, kind, die_once, list(range(40))) == [x * 2 for x in range(40)]
    assert marker.exists()


@pytest.mark.timeout(30)
def test_os_exit_is_reported_with_its_exit_code():
    with ProcessPool(nodes=2) as pool, pytest.raises(WorkerCrashedError, match="exit code 3") as info:
        pool.map(exit_on, range(10), chunksize=1)
    assert info.value.items == [5]


@pytest.mark.timeout(30)
def test_decorator_survives_a_worker_death():
    crashing = pmap(die_on)
    with pytest.raises(WorkerCrashedError):
        crashing(range(20))
    assert crashing([1, 2]) == [2, 4]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pool_class", [ProcessPool, ThreadPool])
def test_timeout_names_the_item_and_the_pool_goes_on(pool_class):
    with pool_class(nodes=2) as pool:
        start = time.monotonic()
        with pytest.raises(TaskTimeoutError) as info:
            pool.map(sleep_on, range(6), timeout=0.5)
        assert time.monotonic() - start < 5
        assert info.value.items == [3]
        assert pool.map(abs, [-5]) == [5]


@pytest.mark.timeout(30)
def test_timeout_kills_the_stuck_worker():
    with ProcessPool(nodes=1) as pool:
        before = worker_pids(pool, 4)
        with pytest.raises(TaskTimeoutError):
            pool.map(sleep_on, [3], timeout=0.3)
        assert wait_gone(before) == set()
        assert worker_pids(pool, 4).isdisjoint(before)


@pytest.mark.timeout(30)
def test_interrupt_from_a_timer_thread_reaps_workers_within_two_seconds():
    with ProcessPool(nodes=2) as pool:
        pids = worker_pids(pool)
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            list(pool.imap(time.sleep, [10] * 4, chunksize=1))
        start = time.monotonic()
        assert wait_gone(pids, within=2.0) == set()
        assert time.monotonic() - start < 2.0


@pytest.mark.timeout(30)
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        "from twat_mp import ProcessPool\n"
        "pool = ProcessPool(nodes=2)._open()\n"
        "print(' '.join(map(str, set(pool.map(lambda _: os.getpid(), range(20), chunksize=1)))), flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = {int(p) for p in parent.stdout.readline().split()}
    assert pids
    parent.kill()
    parent.wait()
    assert wait_gone(pids, within=3.0) == set()


@pytest.mark.timeout(60)
def test_an_item_that_crashes_every_time_exhausts_retries():
    with ProcessPool(nodes=2, retries=2) as pool, pytest.raises(WorkerCrashedError) as info:
        pool.map(die_on, range(30), chunksize=1)
    assert info.value.items == [13]
    with ProcessPool(nodes=2) as pool:
        assert pool.map(die_on, [1, 2]) == [2, 4]


async def async_die_on(x):
    import asyncio

    await asyncio.sleep(0.01)
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


async def async_die_once(x, marker):
    if x == 7 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


@pytest.mark.timeout(60)
async def test_async_worker_death_names_the_items_and_never_hangs():
    from twat_mp import AsyncMultiPool

    async with AsyncMultiPool(processes=2, childconcurrency=4) as pool:
        start = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            await pool.map(async_die_on, range(40))
        assert time.monotonic() - start < 10
        assert 13 in info.value.items
        assert info.value.exitcode == -signal.SIGKILL
        assert await pool.map(async_die_on, [1, 2]) == [2, 4]  # aiomultiprocess replaced it


@pytest.mark.timeout(60)
async def test_async_retries_rerun_lost_items(tmp_path):
    from twat_mp import apmap

    marker = str(tmp_path / "died")
    mapped = apmap(processes=2, childconcurrency=4, retries=1)(async_die_once)
    assert await mapped(range(30), [marker] * 30) == [x * 2 for x in range(30)]
    assert os.path.exists(marker)


def segfault_on_four(x):
    if x == 4:
        import ctypes
        import faulthandler

        # pytest's faulthandler writes to a copy of the terminal's stderr that the worker inherits:
        # without this, a passing run prints a "Fatal Python error" dump. The crash stays real.
        faulthandler.disable()
        ctypes.string_at(0)  # a real segmentation fault
    return x


@pytest.mark.timeout(30)
def test_segfault_is_reported_with_its_signal():
    with ProcessPool(nodes=2) as pool:
        with pytest.raises(WorkerCrashedError, match="SIGSEGV") as info:
            pool.map(segfault_on_four, range(8), chunksize=1)
        assert info.value.items == [4]
        assert pool.map(segfault_on_four, [1, 2]) == [1, 2]
