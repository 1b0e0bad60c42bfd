from __future__ import annotations

import asyncio

import pytest

from twat_mp import AsyncMultiPool, PoolClosedError, WorkerError, apmap, worker_info, worker_state


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
        list(get([1]))
    assert get.__name__ == "get"


def test_apmap_bad_options():
    with pytest.raises(ValueError, match="childconcurrency"):
        apmap(childconcurrency=0)
