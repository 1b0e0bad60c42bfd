"""Property tests: every decorator and pool kind equals the builtin ``map``."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twat_mp import AsyncMultiPool, ProcessPool, ThreadPool, amap, apmap, imap, pmap

values = st.one_of(st.lists(st.integers()), st.lists(st.text(max_size=20)))
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def twice(x):
    return x * 2


async def async_twice(x):
    return x * 2


DECORATED = {
    "pmap-process": pmap(twice),
    "pmap-thread": pmap(kind="thread")(twice),
    "imap-process": lambda xs: list(imap(twice)(xs)),
    "imap-thread": lambda xs: list(imap(kind="thread", nodes=3)(twice)(xs)),
    "amap-process": amap(twice),
    "amap-thread": amap(kind="thread")(twice),
    "pmap-chunk1": pmap(chunksize=1)(twice),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(DECORATED))
@SETTINGS
@given(xs=values)
def test_decorators_equal_builtin_map(name, xs):
    assert DECORATED[name](xs) == list(map(twice, xs))


@pytest.fixture(scope="module", params=[ProcessPool, ThreadPool])
def pool(request):
    with request.param(nodes=2) as pool:
        yield pool


@pytest.mark.timeout(120)
@SETTINGS
@given(xs=values)
def test_pool_maps_equal_builtin_map(pool, xs):
    expected = list(map(twice, xs))
    assert pool.map(twice, xs) == expected
    assert list(pool.imap(twice, iter(xs))) == expected
    assert sorted(pool.uimap(twice, xs)) == sorted(expected)
    assert pool.amap(twice, xs).get(timeout=30) == expected


@pytest.mark.timeout(180)
@settings(max_examples=10, deadline=None)
@given(xs=values)
def test_apmap_equals_builtin_map(xs):
    assert apmap(async_twice).sync(xs) == list(map(twice, xs))


@pytest.mark.timeout(180)
def test_async_pool_equals_builtin_map():
    @settings(max_examples=10, deadline=None)
    @given(xs=values)
    def check(xs):
        async def run():
            async with AsyncMultiPool(processes=2) as pool:
                return await pool.map(async_twice, xs)

        assert asyncio.run(run()) == list(map(twice, xs))

    check()
