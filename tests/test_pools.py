from __future__ import annotations

import os
import threading

import pytest

from conftest import wait_gone, worker_pids
from twat_mp import MultiPool, PoolClosedError, ProcessPool, ThreadPool, worker_info, worker_state
from twat_mp._options import cpu_count

POOLS = [ProcessPool, ThreadPool]


def double(x):
    return 2 * x


def add(a, b):
    return a + b


@pytest.mark.parametrize("pool_class", POOLS)
def test_every_map_kind(pool_class):
    with pool_class(nodes=2) as pool:
        assert pool.nodes == 2
        assert pool.map(double, range(10)) == [2 * x for x in range(10)]
        assert list(pool.imap(double, iter(range(10)))) == [2 * x for x in range(10)]
        assert sorted(pool.uimap(double, range(10))) == [2 * x for x in range(10)]
        handle = pool.amap(double, range(5))
        assert handle.get(timeout=10) == [0, 2, 4, 6, 8]
        assert handle.ready() and handle.successful()
        assert pool.apply(add, 2, 3) == 5
        assert pool.submit(add, 4, b=5).result(timeout=10) == 9
        assert pool.pipe(add, 1, 1) == 2
        assert pool.apipe(add, 1, 2).result(timeout=10) == 3
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.map(add, [1, 2], [10, 20]) == [11, 22]  # several iterables zip, like map
        assert pool.map(double, []) == []


def test_lambdas_and_closures_through_process_pool():
    offset = 7

    def closure(x):
        return x + offset

    with ProcessPool(nodes=2) as pool:
        assert pool.map(lambda x: x * x, range(6)) == [0, 1, 4, 9, 16, 25]
        assert pool.map(closure, [1, 2]) == [8, 9]
        assert pool.apply(lambda: "called") == "called"


def test_nodes_defaults_to_cpu_count():
    assert ProcessPool().nodes == cpu_count()
    assert ThreadPool().nodes == cpu_count()


def test_process_pool_really_uses_other_processes():
    with ProcessPool(nodes=2) as pool:
        pids = worker_pids(pool)
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


@pytest.mark.parametrize("pool_class", POOLS)
def test_use_outside_with_or_after_close_is_a_clear_runtime_error(pool_class):
    pool = pool_class(nodes=1)
    with pytest.raises(RuntimeError, match="not open.*with"):
        pool.map(double, [1])
    with pool:
        pool.map(double, [1])
    with pytest.raises(RuntimeError, match="closed"):
        pool.map(double, [1])
    with pytest.raises(PoolClosedError):
        pool.submit(double, 1)
    with pytest.raises(RuntimeError, match="closed"), pool:
        pass


def test_leaving_with_joins_workers():
    with ProcessPool(nodes=2) as pool:
        pids = worker_pids(pool)
    assert wait_gone(pids, within=0.1) == set()


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_exception_inside_with_terminates_workers(error):
    with pytest.raises(error), ProcessPool(nodes=2) as pool:
        pids = worker_pids(pool)
        raise error("stop")
    assert wait_gone(pids, within=2.0) == set()


def test_keyboard_interrupt_during_a_map_terminates_the_pool():
    import signal
    import time

    with ProcessPool(nodes=2) as pool:
        pids = worker_pids(pool)
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            pool.map(time.sleep, [5] * 4, chunksize=1)
        assert time.monotonic() - start < 3
        assert wait_gone(pids, within=2.0) == set()
        with pytest.raises(RuntimeError, match="terminated"):
            pool.map(double, [1])


def _load_table(size):
    worker_state()["table"] = {i: i * i for i in range(size)}


def _lookup(x):
    return worker_state()["table"][x], worker_info().kind


@pytest.mark.parametrize("pool_class,kind", [(ProcessPool, "process"), (ThreadPool, "thread")])
def test_initializer_and_worker_state(pool_class, kind):
    with pool_class(nodes=2, initializer=_load_table, initargs=(10,)) as pool:
        assert pool.map(_lookup, [2, 3]) == [(4, kind), (9, kind)]
    assert worker_info().kind == "main"


def _failing_initializer():
    raise OSError("no model file")


@pytest.mark.parametrize("pool_class", POOLS)
def test_failing_initializer_is_a_runtime_error_naming_the_cause(pool_class):
    with pytest.raises(RuntimeError, match="initializer failed.*no model file"), pool_class(
            nodes=2, initializer=_failing_initializer) as pool:
        pool.map(double, range(10))


@pytest.mark.parametrize(
    "kwargs,option",
    [({"nodes": 0}, "nodes"), ({"nodes": -1}, "nodes"), ({"nodes": 1.5}, "nodes"),
     ({"timeout": -1}, "timeout"), ({"retries": -1}, "retries"), ({"chunksize": 0}, "chunksize"),
     ({"max_in_flight": 0}, "max_in_flight"), ({"initializer": 3}, "initializer")],
)
def test_invalid_options_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        ProcessPool(**kwargs)


def test_bad_start_method():
    with pytest.raises(ValueError, match="start_method"):
        ProcessPool(start_method="teleport")


def test_multipool_is_the_base_and_works_directly_as_in_2x():
    import pathos.pools

    assert issubclass(ProcessPool, MultiPool) and issubclass(ThreadPool, MultiPool)
    with MultiPool(nodes=2) as pool:
        assert pool.map(_lookup_pid, [0]) != [os.getpid()]
    with MultiPool(pool_class=pathos.pools.ThreadPool, nodes=2) as pool:
        assert pool.map(_lookup_pid, [0]) == [os.getpid()]


def _lookup_pid(_):
    return os.getpid()


def test_imap_is_lazy_and_streams_an_infinite_generator():
    import itertools

    with ProcessPool(nodes=2) as pool:
        results = pool.imap(double, itertools.count())
        assert [next(results) for _ in range(1000)] == [2 * x for x in range(1000)]
        results.close()


def test_spawn_start_method_works():
    with ProcessPool(nodes=1, start_method="spawn") as pool:
        assert pool.map(lambda x: x + 1, [1, 2]) == [2, 3]


def test_a_pool_is_made_of_one_checked_spec():
    def setup(*args):
        pass

    pool = ProcessPool(nodes=2, start_method="spawn", initializer=setup, initargs=[1, "a"])
    assert (pool.spec.kind, pool.spec.nodes, pool.spec.start_method) == ("process", 2, "spawn")
    assert pool.initializer is setup and pool.initargs == (1, "a") and pool.start_method == "spawn"
    assert ThreadPool(nodes=3).spec.kind == "thread"
    import pathos.pools

    assert MultiPool(pool_class=pathos.pools.ThreadPool, nodes=1).spec.kind == "thread"
    with pytest.raises(ValueError, match="pool_class must be a class"):
        MultiPool(pool_class="thread")
    with pytest.raises(ValueError, match="start_method applies to kind='process' only"):
        ThreadPool(start_method="fork")
    with pytest.raises(TypeError, match=r"^ProcessPool\(\) got unknown option\(s\) \['bogus'\]; valid options are"):
        ProcessPool(nodes=1, bogus=2)
    with pytest.raises(TypeError, match=r"^ThreadPool\(\) got unknown option\(s\) \['processes'\]"):
        ThreadPool(processes=2)


def test_call_options_are_checked_on_the_call_naming_the_method():
    with ThreadPool(nodes=1) as pool:
        with pytest.raises(TypeError, match=r"ThreadPool\.map\(\) got unknown option\(s\) \['nodes'\]"):
            pool.map(double, [1], nodes=3)
        with pytest.raises(TypeError, match=r"ThreadPool\.starmap\(\) got unknown option\(s\) \['bogus'\]"):
            pool.starmap(add, [(1, 2)], bogus=1)
        for bad in (None, "", [], "no"):
            with pytest.raises(ValueError, match="ordered must be True or False"):
                pool.imap(double, [1], ordered=bad)
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            pool.map(double, [1], timeout=float("nan"))
        with pytest.raises(TypeError, match=r"ThreadPool\.map\(\) maps over iterables .* argument 1 is 3 \(int\)"):
            pool.map(double, 3)
        with pytest.raises(TypeError, match=r"ThreadPool\.starmap\(\) maps over iterables"):
            pool.starmap(add, None)
        assert pool.map(double, [1, 2], chunksize=10**30) == [2, 4]  # past sys.maxsize: one chunk
        assert pool.map(double, [1], timeout=float("inf"), retries=None) == [2]  # None: the pool's own
