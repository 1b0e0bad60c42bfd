from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time

import pytest

from twat_mp import (
    AsyncMultiPool,
    PoolClosedError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerError,
    apmap,
    worker_info,
    worker_state,
)


async def double(x):
    await asyncio.sleep(0.001)
    return 2 * x


async def add(a, b):
    return a + b


async def fail_on_two(x):
    if x == 2:
        raise LookupError(f"no {x}")
    return x


def sync_triple(x):
    return 3 * x


def _init(value):
    worker_state()["value"] = value


async def read_state(_):
    return worker_state()["value"], worker_info().kind


@apmap
async def get(x):
    await asyncio.sleep(0.001)
    return x + 100


@apmap(processes=2, childconcurrency=4)
async def get_small(x):
    return -x


@pytest.mark.timeout(120)
async def test_async_pool_map_starmap_imap_apply():
    async with AsyncMultiPool(processes=2, childconcurrency=8) as pool:
        assert pool.nodes == 2
        assert await pool.map(double, range(10)) == [2 * x for x in range(10)]
        assert await pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert [y async for y in pool.imap(double, range(5))] == [0, 2, 4, 6, 8]
        assert await pool.apply(add, (2, 3)) == 5
        assert await pool.map(sync_triple, [1, 2]) == [3, 6]  # plain functions work too
        assert await pool.map(lambda x: x - 1, [1]) == [0]
        assert await pool.map(double, []) == []


@pytest.mark.timeout(120)
async def test_async_errors_keep_type_and_item():
    async with AsyncMultiPool(processes=1) as pool:
        with pytest.raises(LookupError, match="no 2") as info:
            await pool.map(fail_on_two, [1, 2, 3])
    cause = info.value.__cause__
    assert isinstance(cause, WorkerError)
    assert cause.input_item == 2
    assert "fail_on_two" in cause.traceback_str


@pytest.mark.timeout(120)
async def test_async_initializer_and_state():
    async with AsyncMultiPool(processes=1, initializer=_init, initargs=(42,)) as pool:
        assert await pool.map(read_state, [0]) == [(42, "async-process")]


async def test_async_pool_outside_with_is_a_clear_error():
    pool = AsyncMultiPool(processes=1)
    with pytest.raises(PoolClosedError, match="async with"):
        await pool.map(double, [1])


def test_async_pool_options_are_checked():
    with pytest.raises(ValueError, match="processes|nodes"):
        AsyncMultiPool(processes=0)
    with pytest.raises(ValueError, match="childconcurrency"):
        AsyncMultiPool(childconcurrency=0)


@pytest.mark.timeout(120)
async def test_apmap_awaits_a_list_and_reuses_its_pool():
    assert await get(range(5)) == [100, 101, 102, 103, 104]
    assert await get([7]) == [107]
    assert await get_small([1, 2]) == [-1, -2]
    assert await get([]) == []


@pytest.mark.timeout(120)
def test_apmap_from_sync_code():
    assert get.sync([1, 2]) == [101, 102]
    with pytest.raises(TypeError, match="await get"):
        list(get([1]))  # a coroutine used as a list says what to write instead
    assert get.__name__ == "get"


def test_apmap_bad_options():
    with pytest.raises(ValueError, match="childconcurrency"):
        apmap(childconcurrency=0)


# -- the async worker mode of the engine ---------------------------------------------

async def exit_zero_on_three(x):
    if x == 3:
        os._exit(0)  # a worker that exits with code 0 mid-task
    await asyncio.sleep(0.01)
    return x


async def slow_or_fast(x):
    await asyncio.sleep(30 if x == 1 else 0.01)
    return x, os.getpid()


async def fail_first(x):
    if x == 0:
        raise KeyError("first")
    await asyncio.sleep(0.5)
    return x


async def pid_of(_):
    await asyncio.sleep(0.001)
    return os.getpid()


def endless():
    yield from itertools.count()


@pytest.mark.timeout(60)
async def test_an_async_worker_that_exits_0_mid_task_is_a_crash_not_a_hang():
    async with AsyncMultiPool(processes=2, childconcurrency=4) as pool:
        with pytest.raises(WorkerCrashedError, match="exit code 0"):
            await pool.map(exit_zero_on_three, range(8), chunksize=1)
        assert await pool.map(double, [1, 2]) == [2, 4]  # replaced


@pytest.mark.timeout(60)
async def test_an_async_timeout_cancels_the_call_in_its_worker_and_spares_the_others():
    async with AsyncMultiPool(processes=1, childconcurrency=8, timeout=0.5) as pool:
        start = time.monotonic()
        with pytest.raises(TaskTimeoutError) as info:
            await pool.map(slow_or_fast, range(4), chunksize=4)
        assert time.monotonic() - start < 10
        assert info.value.items == [1]
        before = await pool.map(pid_of, [0])
        assert await pool.map(pid_of, [0]) == before  # the worker was not killed


@pytest.mark.timeout(60)
async def test_an_async_map_stops_at_the_first_error():
    async with AsyncMultiPool(processes=2, childconcurrency=4) as pool:
        start = time.monotonic()
        with pytest.raises(KeyError):
            await pool.map(fail_first, range(600))
        assert time.monotonic() - start < 5  # not 600 x 0.5 s / 8


@pytest.mark.timeout(60)
async def test_async_imap_streams_an_endless_generator():
    async with AsyncMultiPool(processes=2, childconcurrency=8) as pool:
        got = []
        async for value in pool.imap(double, endless()):
            got.append(value)
            if len(got) == 50:
                break
        assert got == [2 * x for x in range(50)]


@pytest.mark.timeout(60)
def test_apmap_returns_a_real_coroutine():
    assert asyncio.run(get([1, 2])) == [101, 102]

    async def main():
        task = asyncio.create_task(get([3]))
        return await task

    assert asyncio.run(main()) == [103]
    call = get([1])
    assert asyncio.iscoroutine(call)  # a collections.abc.Coroutine
    call.close()


@pytest.mark.timeout(60)
def test_apmap_sync_reuses_its_warm_workers():
    mapped = apmap(processes=2)(pid_of)
    first = set(mapped.sync(range(40)))
    assert set(mapped.sync(range(40))) <= first


@pytest.mark.timeout(120)
def test_apmap_sync_from_three_threads_at_once():
    mapped = apmap(processes=2, childconcurrency=8)(double)
    results: dict[int, list[int]] = {}

    def run(i):
        results[i] = mapped.sync(range(i, i + 50))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: [2 * x for x in range(i, i + 50)] for i in range(3)}


@pytest.mark.timeout(60)
async def test_maxtasksperchild_replaces_workers_without_losing_calls():
    async with AsyncMultiPool(processes=1, childconcurrency=2, maxtasksperchild=5) as pool:
        pids = await pool.map(pid_of, range(40), chunksize=1)
        assert len(pids) == 40
        assert len(set(pids)) >= 3


async def test_an_unopened_async_pool_says_pool_not_initialized():
    pool = AsyncMultiPool(processes=1)
    with pytest.raises(PoolClosedError, match="Pool not initialized"):
        await pool.map(double, [1])


def test_async_pool_option_errors_name_the_option():
    with pytest.raises(ValueError, match="processes"):
        AsyncMultiPool(processes=-1)
    with pytest.raises(ValueError, match="initargs"):
        AsyncMultiPool(initargs=1.5)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        AsyncMultiPool(maxtasksperchild=-1)


class Scaler:
    def __init__(self, k):
        self.k = k

    @apmap(processes=2)
    async def scale(self, x):
        return self.k * x


@pytest.mark.timeout(60)
def test_apmap_methods_bind_their_instance():
    assert Scaler(3).scale.sync([1, 2]) == [3, 6]
    assert asyncio.run(Scaler(4).scale([1, 2])) == [4, 8]


MAIN_SCRIPT = """
import asyncio
from twat_mp import apmap, WorkerError

class Oops(Exception):
    pass

@apmap
async def risky(x):
    await asyncio.sleep(0.001)
    if x == 3:
        raise Oops(f"bad {x}")
    return x

for run in (lambda: risky.sync(range(10)), lambda: asyncio.run(risky(range(10)))):
    try:
        run()
    except Oops as exc:
        print("caught", isinstance(exc, WorkerError), exc.input_item)
"""


@pytest.mark.timeout(60)
def test_an_exception_class_of_a_main_script_is_caught_through_apmap(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(MAIN_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["caught True 3", "caught True 3"]
    assert out.stderr == ""
