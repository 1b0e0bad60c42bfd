"""Options: every bad value of every option of every pool and decorator is refused at
once with an error that names the option; good values work; nothing hangs. Plus the
warm-pool registry (exact keys, bounded, in-use pools kept)."""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twat_mp import (
    AsyncMultiPool,
    MultiPool,
    ProcessPool,
    TaskTimeoutError,
    ThreadPool,
    amap,
    apmap,
    decorators,
    imap,
    mmap,
    pmap,
    warm_pool,
    worker_state,
)
from twat_mp._options import max_workers

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12), st.just(10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1), st.just(object()), st.just(lambda x: x),
    st.just(b"x"), st.just(()), st.just((1,)), st.just(np.zeros(2)), st.just(int), st.just(print),
    st.sampled_from(["fork", "spawn", "forkserver", "process", "thread", "map", "imap", "amap"]),
)
CALL_OPTIONS = ["chunksize", "max_in_flight", "timeout", "retries", "progress", "ordered"]
POOL_OPTIONS = ["nodes", "chunksize", "max_in_flight", "timeout", "retries", "progress", "initializer", "initargs",
                "start_method", "pool_class", "torch_threads", "per_device"]
DECORATOR_OPTIONS = ["nodes", "kind", "initializer", "initargs", *CALL_OPTIONS]
EXAMPLE_SECONDS = 20  # no single example may take longer: a hang fails the example


def _valid(name: str, value: object, kind: str = "process") -> bool:
    """Is ``value`` a good value for option ``name``? (The rules of the docs.)"""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if name in ("chunksize", "max_in_flight"):
        return value is None or (is_int and value > 0)
    if name == "nodes":
        return value is None or (is_int and 0 < value <= max_workers(kind))
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
    if name == "start_method":
        return value is None or (isinstance(value, str) and value in ("fork", "spawn", "forkserver"))
    if name == "kind":
        return isinstance(value, str) and value in ("process", "thread")
    if name == "pool_class":
        return value is None or isinstance(value, type)
    if name == "torch_threads":
        return value is None or (kind == "process" and is_int and value > 0)
    if name == "per_device":
        return value is None  # only with devices=
    raise AssertionError(name)


def _refused(error: BaseException, name: str) -> None:
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    assert name in str(error), f"{error!r} does not name {name}"


def _bounded(call: Callable[[], Any], seconds: float = EXAMPLE_SECONDS) -> Any:
    """``call()``, failing (not hanging) if it takes longer than ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the test's thread, re-raised there
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call did not return within {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _quickly_timed_out(name: str, value: object, error: BaseException) -> bool:
    """A tiny but valid timeout may really time an item out: that is a right answer."""
    return name == "timeout" and isinstance(error, TaskTimeoutError) and isinstance(value, (int, float)) \
        and value < 1


@pytest.fixture(scope="module")
def thread_pool():
    with ThreadPool(nodes=2) as pool:
        yield pool


def _identity(x):
    return x


def _add(a, b):
    return a + b


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from([*CALL_OPTIONS, "nodes", "bogus"]), value=HOSTILE,
       method=st.sampled_from(["map", "imap", "uimap", "amap", "starmap"]))
def test_hostile_call_options_of_pool_methods(thread_pool, name, value, method):
    if name == "progress" and isinstance(value, str):
        value = False  # a label would draw a bar: valid, but noise here
    args = [[(1, 2), (3, 4)]] if method == "starmap" else [[1, 2]]
    fn = _add if method == "starmap" else _identity
    expected = [3, 7] if method == "starmap" else [1, 2]
    if name in ("nodes", "bogus"):  # pool options are no call options
        with pytest.raises(TypeError, match=rf"ThreadPool\.{method}\(\) got unknown option\(s\) \['{name}'\]"):
            getattr(thread_pool, method)(fn, *args, **{name: value})
        return
    if name == "ordered" and method in ("uimap", "starmap"):  # these choose the order themselves
        with pytest.raises(TypeError, match="ordered"):
            getattr(thread_pool, method)(fn, *args, ordered=value)
        return
    valid = _valid(name, value) or (value is None and name != "ordered")  # None: the pool's own

    def call():
        result = getattr(thread_pool, method)(fn, *args, **{name: value})
        return result.get(EXAMPLE_SECONDS) if method == "amap" else list(result)

    try:
        result = _bounded(call)
    except (ValueError, TypeError) as error:
        assert not valid, f"{name}={value!r} refused: {error}"
        _refused(error, name)
        return
    except TaskTimeoutError as error:
        assert _quickly_timed_out(name, value, error), repr(error)
        return
    assert valid, f"{name}={value!r} accepted"
    assert sorted(result) == expected


@pytest.mark.timeout(60)
@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(POOL_OPTIONS), value=HOSTILE, cls=st.sampled_from([ProcessPool, ThreadPool, MultiPool]))
def test_hostile_pool_options_fail_at_construction(name, value, cls):
    if name == "progress" and isinstance(value, str):
        value = True
    kind = "thread" if cls is ThreadPool else "process"
    valid = _valid(name, value, kind)
    if name == "start_method" and cls is ThreadPool:
        valid = value is None  # a thread pool has no start method
    try:
        pool = cls(**{name: value})
    except (ValueError, TypeError) as error:
        assert not valid, f"{name}={value!r} refused by {cls.__name__}: {error}"
        _refused(error, name)
        return
    assert valid, f"{name}={value!r} accepted by {cls.__name__}"
    assert pool.nodes >= 1  # constructed, not started: nothing to close


@pytest.mark.timeout(60)
@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(DECORATOR_OPTIONS), value=HOSTILE, decorator=st.sampled_from([pmap, imap, amap]))
def test_hostile_decorator_options_fail_when_decorating(name, value, decorator):
    if name == "progress" and isinstance(value, str):
        value = False
    if name == "initializer" and callable(value):
        value = None  # print or int as an initializer: valid, but not worth a pool each
    options = {"kind": "thread", name: value}
    valid = _valid(name, value, "thread")
    try:
        made = decorator(**options)  # the options alone, before any function or call
    except (ValueError, TypeError) as error:
        assert not valid, f"{name}={value!r} refused: {error}"
        _refused(error, name)
        return
    assert valid, f"{name}={value!r} accepted when decorating"
    mapped = made(abs)
    if name == "nodes" and value is not None and value > 4:
        return  # valid, but not worth starting here
    if name == "kind" and value == "process":
        return  # a process pool per example is not the point here
    try:
        assert sorted(_bounded(lambda: list(mapped([-1, -2])))) == [1, 2]
    except TaskTimeoutError as error:
        assert _quickly_timed_out(name, value, error), repr(error)


@pytest.mark.timeout(60)
@settings(max_examples=30, deadline=None)
@given(how=HOSTILE)
def test_hostile_mmap_how(how):
    try:
        decorator = mmap(how)
    except ValueError as error:
        assert not (isinstance(how, str) and how in ("map", "imap", "amap")), error
        assert "Invalid mapping method" in str(error) and "'map', 'imap', 'amap'" in str(error)
        return
    assert sorted(_bounded(lambda: list(decorator(kind="thread")(abs)([-1, 2])))) == [1, 2]


@pmap(kind="thread", nodes=2)
def _same(x):
    return x


@imap(kind="thread", nodes=2)
def _same_lazily(x):
    return x


@amap(kind="thread", nodes=2)
def _same_async(x):
    return x


HOSTILE_INPUTS = st.one_of(
    HOSTILE, st.lists(HOSTILE, max_size=4), st.tuples(st.integers(), st.text(max_size=3)),
    st.frozensets(st.integers(), max_size=4), st.lists(st.integers(), max_size=30).map(iter),
    st.binary(max_size=4), st.just(range(5)), st.just(np.arange(3)),
)


@pmap(kind="thread", nodes=2)
def _pair(*xs):
    return xs


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None)
@given(inputs=st.lists(HOSTILE_INPUTS, min_size=1, max_size=2),
       mapped=st.sampled_from([_same, _same_lazily, _same_async]))
def test_hostile_inputs_to_a_decorated_call(inputs, mapped):
    fn = mapped if len(inputs) == 1 else _pair
    given_, wanted = [], []
    for value in inputs:
        try:
            iterator = iter(value)
        except TypeError:
            with pytest.raises(TypeError, match=r"^_\w+\(\) maps over iterables .* which is not iterable"):
                _bounded(lambda: list(fn(*inputs)))
            return
        if iterator is value:  # a one-shot iterator: one copy for the call, one to compare
            value, copy = itertools.tee(value)
            wanted.append(list(copy))
        else:
            wanted.append(list(value))
        given_.append(value)
    got = _bounded(lambda: list(fn(*given_)))
    want = wanted[0] if len(wanted) == 1 else list(zip(*wanted))
    assert len(got) == len(want)
    for a, b in zip(got, want):  # threads: the very objects come back (arrays yield new scalars)
        assert a is b or (type(a) is type(b) and bool(np.all(a == b)))


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


def test_async_pool_size_beyond_the_machine_is_refused():
    with pytest.raises(ValueError, match="processes"):
        AsyncMultiPool(processes=10**9)


def test_messages_name_the_right_thing():
    with pytest.raises(TypeError, match=r"@pmap decorates a function"):
        pmap(42)
    with pytest.raises(TypeError, match=r"@imap decorates a function"):
        imap(42)
    with pytest.raises(TypeError, match=r"@amap decorates a function"):
        amap(42)
    with pytest.raises(ValueError, match="Invalid mapping method: 'nope'; valid values are 'map', 'imap', 'amap'"):
        mmap("nope")
    with ThreadPool(nodes=1) as pool:
        with pytest.raises(TypeError, match=r"^ThreadPool\.map\(\) got unknown option\(s\) \['nodes'\]; valid"):
            pool.map(abs, [1], nodes=3)
        with pytest.raises(TypeError, match=r"^ThreadPool\.imap\(\) maps over iterables.*argument 2 is 5 \(int\)"):
            pool.imap(_add, [1], 5)
    with pytest.raises(ValueError, match="processes"):
        AsyncMultiPool(processes=-1)
    with pytest.raises(ValueError, match="^nodes=1000000000 is more workers than this machine allows"):
        ProcessPool(nodes=10**9)
    with pytest.raises(ValueError, match="^nodes="):
        ThreadPool(nodes=10**9)
    with pytest.raises(ValueError, match="^nodes="):
        pmap(nodes=10**9)
    with pytest.raises(ValueError, match="^initargs must be a tuple"):
        ProcessPool(initargs=1.5)
    with pytest.raises(ValueError, match="^start_method applies to kind='process' only"):
        ThreadPool(start_method="spawn")
    for bad in ("", None, [], "no", 0, 1):
        with pytest.raises(ValueError, match="^ordered must be True or False"):
            pmap(ordered=bad)
    for option, bad in [("timeout", "x"), ("timeout", 0), ("timeout", -1.0), ("timeout", math.nan),
                        ("chunksize", 0), ("progress", 3), ("max_in_flight", 1.5), ("retries", -1)]:
        with pytest.raises(ValueError, match=f"^{option} must be"):
            pmap(**{option: bad})


def test_the_size_limit_follows_the_machine():
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    most = max_workers("process")
    assert 1 <= most <= 4096
    if soft != resource.RLIM_INFINITY:
        assert most <= soft // 4  # four descriptors per process worker
    assert max_workers("thread") >= most  # threads need no descriptors
    with pytest.raises(ValueError, match="nodes"):
        ProcessPool(nodes=most + 1)
    assert ProcessPool(nodes=most).nodes == most  # made, not started: nothing is forked


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


def _middle(_):
    array = worker_state()["array"]
    return float(array[len(array) // 2])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_warm_pools_with_different_arrays_of_the_same_repr_are_different_pools(kind):
    a = np.zeros(10_000)
    b = np.zeros(10_000)
    b[5_000] = 1.0
    assert repr(a) == repr(b)  # printed truncated: a repr-keyed registry shared one pool
    first = pmap(kind=kind, nodes=1, initializer=_keep, initargs=(a,))(_middle)
    second = pmap(kind=kind, nodes=1, initializer=_keep, initargs=(b,))(_middle)
    assert first([0]) == [0.0]
    assert second([0]) == [1.0]
    assert first([0]) == [0.0]


def test_keys_compare_exactly():
    assert warm_pool("thread", 1, initargs=(0.0,)) is not warm_pool("thread", 1, initargs=(-0.0,))
    assert warm_pool("thread", 1, initargs=(1,)) is not warm_pool("thread", 1, initargs=(True,))
    assert warm_pool("thread", 1, initargs=(1,)) is not warm_pool("thread", 1, initargs=(1.0,))
    assert warm_pool("thread", 1, initargs=("a", (1, 2))) is warm_pool("thread", 1, initargs=("a", (1, 2)))
    assert warm_pool("thread", 1, initargs=[1, "b"]) is warm_pool("thread", 1, initargs=(1, "b"))  # a list is a tuple
    array = np.zeros(3)
    assert warm_pool("thread", 1, initargs=(array,)) is warm_pool("thread", 1, initargs=(array,))  # same object
    assert warm_pool("thread", 1, initargs=(array,)) is not warm_pool("thread", 1, initargs=(array.copy(),))


@pytest.mark.timeout(120)
def test_idle_warm_pools_are_bounded_least_recently_used_first():
    bound = decorators.MAX_WARM_POOLS
    for i in range(bound + 5):  # fresh initargs on every call
        assert pmap(kind="thread", nodes=1, initializer=_keep, initargs=(np.full(3, i),))(_middle)([0]) == [i]
        assert len(decorators._warm) <= bound
    arrays = [np.full(1, i) for i in range(bound)]
    pools = [warm_pool("thread", 1, initargs=(a,)) for a in arrays]
    assert all(pool.alive for pool in pools)
    assert warm_pool("thread", 1, initargs=(arrays[0],)) is pools[0]  # used again: most recent
    warm_pool("thread", 1, initargs=(np.full(1, -1),))  # one more than the bound
    assert pools[0].alive
    assert not pools[1].alive  # the least recently used idle pool was closed
    assert all(pool.alive for pool in pools[2:])


@pytest.mark.timeout(120)
def test_a_warm_pool_in_use_is_never_closed():
    array = np.full(3, 7.0)
    lazy = imap(kind="thread", nodes=1, initializer=_keep, initargs=(array,))(_middle)
    results = lazy(itertools.count())  # holds its warm pool until it is closed
    assert next(results) == 7.0
    held = warm_pool("thread", 1, initializer=_keep, initargs=(array,))
    for i in range(decorators.MAX_WARM_POOLS + 3):  # plenty of newer pools
        warm_pool("thread", 1, initargs=(np.full(1, i),))
        assert held.alive
    assert [next(results) for _ in range(100)] == [7.0] * 100
    results.close()  # released: now the least recently used idle pool
    assert held.alive
    warm_pool("thread", 1, initargs=(np.full(1, -1),))  # one more: the bound closes the oldest idle pool
    assert not held.alive
    assert len(decorators._warm) <= decorators.MAX_WARM_POOLS


@pytest.mark.timeout(120)
def test_threads_calling_with_fresh_initargs_never_see_a_closed_or_wrong_pool():
    errors: list[BaseException] = []

    def caller(offset: int) -> None:
        try:
            for i in range(15):  # six threads, fresh arrays: far more pools than the bound
                value = float(offset * 100 + i)
                fn = pmap(kind="thread", nodes=1, initializer=_keep, initargs=(np.full(3, value),))(_middle)
                assert fn(range(20)) == [value] * 20
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors[0]
    assert len(decorators._warm) <= decorators.MAX_WARM_POOLS
