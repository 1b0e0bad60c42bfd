"""Options: every bad value of every option of every pool and decorator is refused at
once with an error that names the option; good values work; nothing hangs. Plus the
warm-pool registry (exact keys, bounded) and decorated methods."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twat_mp import (
    AsyncMultiPool,
    MultiPool,
    ProcessPool,
    ThreadPool,
    amap,
    apmap,
    decorators,
    imap,
    mmap,
    pmap,
    worker_state,
)
from twat_mp._options import max_workers

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1), st.just(object()), st.just(lambda x: x),
    st.just(b"x"), st.just(()), st.just((1,)),
)
CALL_OPTIONS = ["chunksize", "max_in_flight", "timeout", "retries", "progress", "ordered"]
POOL_OPTIONS = ["nodes", "chunksize", "max_in_flight", "timeout", "retries", "progress", "initializer", "initargs"]


def _valid(name: str, value: object) -> bool:
    """Is ``value`` a good value for option ``name``? (The rules of the docs.)"""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if name in ("chunksize", "max_in_flight"):
        return value is None or (is_int and value > 0)
    if name == "nodes":
        return value is None or (is_int and 0 < value <= max_workers())
    if name == "timeout":
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and not math.isnan(value) and value > 0)
    if name == "retries":
        return is_int and value >= 0
    if name == "progress":
        return isinstance(value, (bool, str))
    if name == "ordered":
        return isinstance(value, bool)
    if name == "initializer":
        return value is None or callable(value)
    if name == "initargs":
        return isinstance(value, (tuple, list))
    raise AssertionError(name)


def _refused(error: BaseException, name: str) -> None:
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    assert name in str(error), f"{error!r} does not name {name}"


@pytest.fixture(scope="module")
def thread_pool():
    with ThreadPool(nodes=2) as pool:
        yield pool


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(CALL_OPTIONS), value=HOSTILE,
       method=st.sampled_from(["map", "imap", "uimap", "amap", "starmap"]))
def test_hostile_call_options_of_pool_methods(thread_pool, name, value, method):
    if name == "progress" and isinstance(value, str):
        value = False  # a label would draw a bar: valid, but noise here
    args = [[(1, 2), (3, 4)]] if method == "starmap" else [[1, 2]]
    fn = (lambda a, b: a + b) if method == "starmap" else (lambda x: x + 1)
    expected = [3, 7] if method == "starmap" else [2, 3]
    if name == "ordered" and method != "imap":
        return  # only imap takes ordered=
    valid = _valid(name, value) or (value is None and name != "ordered")  # None: the pool's own
    try:
        result = getattr(thread_pool, method)(fn, *args, **{name: value})
        result = result.get(10) if method == "amap" else list(result)
    except (ValueError, TypeError) as error:
        assert not valid, f"{name}={value!r} refused: {error}"
        _refused(error, name)
        return
    assert valid, f"{name}={value!r} accepted"
    assert sorted(result) == expected


@pytest.mark.timeout(60)
@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(POOL_OPTIONS), value=HOSTILE, cls=st.sampled_from([ProcessPool, ThreadPool, MultiPool]))
def test_hostile_pool_options_fail_at_construction(name, value, cls):
    if name == "progress" and isinstance(value, str):
        value = True
    if name == "initializer" and callable(value):
        value = None
    try:
        pool = cls(**{name: value})
    except (ValueError, TypeError) as error:
        assert not _valid(name, value), f"{name}={value!r} refused: {error}"
        _refused(error, name)
        return
    assert _valid(name, value), f"{name}={value!r} accepted by {cls.__name__}"
    assert pool.nodes >= 1  # constructed, not started: nothing to close


@pytest.mark.timeout(60)
@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(["nodes", *CALL_OPTIONS]), value=HOSTILE,
       decorator=st.sampled_from([pmap, imap, amap]))
def test_hostile_decorator_options_fail_when_decorating(name, value, decorator):
    if name == "progress" and isinstance(value, str):
        value = False
    try:
        mapped = decorator(kind="thread", **{name: value})(abs)
    except (ValueError, TypeError) as error:
        assert not _valid(name, value), f"{name}={value!r} refused: {error}"
        _refused(error, name)
        return
    assert _valid(name, value), f"{name}={value!r} accepted when decorating"
    if name == "nodes" and value is not None and value > 4:
        return  # valid, but not worth starting here
    assert sorted(mapped([-1, -2])) == [1, 2]


@pytest.mark.timeout(60)
@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["processes", "childconcurrency", "maxtasksperchild", "timeout", "retries"]),
       value=HOSTILE)
def test_hostile_async_options_fail_at_construction(name, value):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    valid = {"processes": value is None or (is_int and 0 < value <= max_workers()),
             "childconcurrency": is_int and value > 0,
             "maxtasksperchild": is_int and value >= 0,
             "timeout": _valid("timeout", value), "retries": _valid("retries", value)}[name]
    try:
        AsyncMultiPool(**{name: value})
        if name in ("processes", "childconcurrency", "timeout", "retries"):
            apmap(**{name: value})(abs)
    except (ValueError, TypeError) as error:
        assert not valid, f"{name}={value!r} refused: {error}"
        _refused(error, name)
        return
    assert valid, f"{name}={value!r} accepted"


def test_messages_name_the_right_thing():
    with pytest.raises(TypeError, match=r"@pmap decorates a function"):
        pmap(42)
    with pytest.raises(TypeError, match=r"@imap decorates a function"):
        imap(42)
    with pytest.raises(ValueError, match="Invalid mapping method"):
        mmap("nope")
    with ThreadPool(nodes=1) as pool, pytest.raises(TypeError, match=r"ThreadPool\.map\(\) got unknown option"):
        pool.map(abs, [1], nodes=3)
    with pytest.raises(ValueError, match="processes"):
        AsyncMultiPool(processes=-1)
    with pytest.raises(ValueError, match="nodes"):
        ProcessPool(nodes=10**9)
    with pytest.raises(ValueError, match="initargs"):
        ProcessPool(initargs=1.5)
    for bad in ("", None, [], "no"):
        with pytest.raises(ValueError, match="ordered"):
            pmap(ordered=bad)
    with pytest.raises(ValueError, match="timeout"):
        pmap(timeout="x")


@pytest.mark.timeout(60)
def test_timeout_inf_means_no_limit():
    assert pmap(timeout=float("inf"), kind="thread")(abs)([-1]) == [1]
    for huge in (1e9, 1e12, 1e300):  # beyond what select() takes: the manager waits in steps
        with ProcessPool(nodes=1, timeout=huge) as pool:
            assert pool.map(abs, [-2]) == [2]
            assert pool.apply(abs, -3) == 3


# -- the warm-pool registry ------------------------------------------------------------

def _keep(array):
    worker_state()["array"] = array


def _first(_):
    return float(worker_state()["array"][0])


@pytest.mark.timeout(120)
def test_warm_pools_with_different_arrays_of_the_same_repr_are_different_pools():
    a = np.zeros(10_000)
    b = np.zeros(10_000)
    b[0] = 1.0
    assert repr(a) == repr(b)[: len(repr(a))] or True  # long arrays print truncated alike
    first = pmap(kind="thread", nodes=1, initializer=_keep, initargs=(a,))(_first)
    second = pmap(kind="thread", nodes=1, initializer=_keep, initargs=(b,))(_first)
    assert first([0]) == [0.0]
    assert second([0]) == [1.0]


@pytest.mark.timeout(120)
def test_idle_warm_pools_are_bounded():
    for i in range(decorators.MAX_WARM_POOLS + 5):
        assert pmap(kind="thread", nodes=1, initializer=_keep, initargs=(np.full(3, i),))(_first)([0]) == [i]
    assert len(decorators._warm) <= decorators.MAX_WARM_POOLS


# -- decorated methods -------------------------------------------------------------------

class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @pmap
    def scale(self, x):
        return self.factor * x

    @pmap(kind="thread")
    def scale_in_threads(self, x):
        return self.factor * x

    @imap
    def lazy(self, x):
        return self.factor + x


@pytest.mark.timeout(60)
def test_decorated_methods_map_over_the_items_with_the_instance_bound():
    scaler = Scaler(3)
    assert scaler.scale([1, 2, 3]) == [3, 6, 9]
    assert scaler.scale_in_threads([1, 2]) == [3, 6]
    assert list(scaler.lazy([1, 2])) == [4, 5]
    assert Scaler.scale([Scaler(2)], [5]) == [10]  # unbound: the instance is an argument
