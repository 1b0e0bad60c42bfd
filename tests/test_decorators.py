from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import types

import pytest

import twat_mp
from twat_mp import amap, imap, mmap, pmap, warm_pool


@pmap
def square(x):
    """Square a number."""
    return x * x


@imap
def lazy_square(x):
    return x * x


@amap
def async_square(x):
    return x * x


@pmap(nodes=2, kind="thread")
def thread_square(x):
    return x * x


@pmap
def pid_of(_):
    return os.getpid()


@pmap
def outer(x):
    return sum(square(range(x)))  # a decorated function called inside a worker


def test_bare_decorators():
    assert square(range(5)) == [0, 1, 4, 9, 16]
    result = lazy_square(range(5))
    assert isinstance(result, types.GeneratorType) or hasattr(result, "__next__")
    assert list(result) == [0, 1, 4, 9, 16]
    assert async_square(range(5)) == [0, 1, 4, 9, 16]


def test_decorators_with_options():
    assert thread_square([1, 2, 3]) == [1, 4, 9]

    @pmap(nodes=2, kind="process", chunksize=1)
    def inc(x):
        return x + 1

    assert inc(range(4)) == [1, 2, 3, 4]
    assert imap(nodes=1)(abs)([-1, -2]).__next__() == 1
    assert amap(kind="thread")(abs)([-3]) == [3]


def test_empty_input_returns_empty_list():
    assert square([]) == []
    assert async_square([]) == []
    assert list(lazy_square([])) == []


def test_several_iterables_zip_like_builtin_map():
    assert pmap(pow)([2, 3], [3, 2]) == [8, 9]


def test_metadata_and_pickling_are_kept():
    assert square.__name__ == "square"
    assert square.__doc__ == "Square a number."
    assert pickle.loads(pickle.dumps(square)) is square


def test_mmap_rejects_unknown_how_listing_valid_ones():
    with pytest.raises(ValueError, match="Invalid mapping method.*'map', 'imap', 'amap'"):
        mmap("parallel")
    assert mmap("map", get_result=True)(abs)([-1]) == [1]


@pytest.mark.parametrize("kwargs,option", [({"nodes": 0}, "nodes"), ({"kind": "fiber"}, "kind"),
                                           ({"timeout": -1}, "timeout"), ({"chunksize": 0}, "chunksize"),
                                           ({"progress": 3}, "progress"), ({"ordered": "no"}, "ordered"),
                                           ({"initargs": 1.5}, "initargs"), ({"start_method": "x"}, "start_method")])
def test_bad_options_are_value_errors_naming_the_option_when_decorating(kwargs, option):
    with pytest.raises(ValueError, match=option):
        pmap(**kwargs)  # before any function, before any call


def test_unknown_options_are_type_errors_listing_the_valid_ones():
    with pytest.raises(TypeError, match=r"@pmap got unknown option\(s\) \['bogus'\]; valid options are .*'timeout'"):
        pmap(bogus=1)
    with pytest.raises(TypeError, match=r"@amap got unknown option"):
        amap(nodes=1, bogus=1)
    with pytest.raises(TypeError, match=r"warm_pool\(\) got unknown pool option\(s\) \['timeout'\]"):
        warm_pool("thread", 1, timeout=3)


def test_calling_without_an_iterable_is_a_type_error():
    with pytest.raises(TypeError, match="iterable"):
        square()


def test_warm_pool_is_reused_across_calls():
    pool = warm_pool("process")
    workers = {w.pid for w in pool._dispatcher._workers.values()}
    served = set(pid_of(range(20))) | set(pid_of(range(20)))
    assert served <= workers  # the warm pool's own workers served both calls
    assert warm_pool("process") is warm_pool("process")
    assert warm_pool("process", 1) is not warm_pool("process", 2)


def test_nested_decorated_call_in_a_worker_runs_serially():
    assert outer([3, 4]) == [0 + 1 + 4, 0 + 1 + 4 + 9]


def test_warm_pool_is_recreated_after_a_terminate():
    pool = warm_pool("process")
    pool.terminate()
    pool.join()
    assert square([3]) == [9]
    assert warm_pool("process") is not pool


def test_warm_pools_are_recreated_in_a_forked_child(tmp_path):
    script = tmp_path / "forker.py"
    script.write_text(textwrap.dedent("""
        import os
        from twat_mp import pmap

        @pmap
        def inc(x):
            return x + 1

        assert inc([1, 2]) == [2, 3]           # warm pool in the parent
        pid = os.fork()
        if pid == 0:
            ok = inc([5]) == [6]               # the child builds its own
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert inc([7]) == [8]                 # the parent's pool still works
        print("fork ok")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "fork ok" in out.stdout


def test_thread_kind_rejects_start_method():
    with pytest.raises(ValueError, match="start_method"):
        pmap(kind="thread", start_method="spawn")(abs)


def test_workers_resend_functions_evicted_from_their_cache():
    from twat_mp import ProcessPool
    from twat_mp._engine.worker import FUNCTION_CACHE_SIZE

    first = lambda x: x + 1  # noqa: E731
    with ProcessPool(nodes=1) as pool:
        assert pool.map(first, [1]) == [2]
        for offset in range(FUNCTION_CACHE_SIZE + 5):
            assert pool.map(lambda x, k=offset: x + k, [1]) == [1 + offset]
        assert pool.map(first, [1]) == [2]  # evicted in the worker: sent again


def test_compat_module_paths_reexport_the_2x_names():
    from twat_mp import async_mp, mp

    for name in ["pmap", "imap", "amap", "mmap", "MultiPool", "ProcessPool", "ThreadPool",
                 "WorkerError", "set_debug_mode"]:
        assert getattr(mp, name) is getattr(twat_mp, name)
    for name in ["apmap", "AsyncMultiPool"]:
        assert getattr(async_mp, name) is getattr(twat_mp, name)
    assert isinstance(twat_mp.__version__, str)
    assert set(twat_mp.__all__) >= {"pmap", "imap", "amap", "apmap", "mmap", "MultiPool", "ProcessPool",
                                    "ThreadPool", "AsyncMultiPool", "WorkerError", "set_debug_mode"}


# -- decorated methods: obj.method(xs) maps method(obj, x) over xs -------------------------

class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @pmap
    def scale(self, x):
        return self.factor * x

    @pmap(kind="thread")
    def scale_in_threads(self, x):
        return self.factor * x

    @imap(nodes=2)
    def lazy(self, x):
        return self.factor + x

    @amap(kind="thread")
    def collected(self, x, y):
        return self.factor * x + y

    @pmap(kind="thread")
    @staticmethod
    def halve(x):
        return x / 2

    @pmap
    @classmethod
    def named(cls, x):
        return f"{cls.__name__}:{x}"


class BigScaler(Scaler):
    pass


class Unpicklable(Scaler):
    def __init__(self, factor: int) -> None:
        super().__init__(factor)
        self.pending = (i for i in range(3))  # a generator: neither pickle nor dill takes it


def test_decorated_methods_map_over_the_items_with_the_instance_bound():
    scaler = Scaler(3)
    assert scaler.scale([1, 2, 3]) == [3, 6, 9]  # process workers: the instance is pickled along
    assert scaler.scale_in_threads([1, 2]) == [3, 6]
    assert list(scaler.lazy([1, 2])) == [4, 5]
    assert scaler.collected([1, 2], [10, 20]) == [13, 26]  # several iterables zip, as for functions
    assert Scaler.scale([Scaler(2)], [5]) == [10]  # from the class: the instance is an argument
    assert scaler.scale.__name__ == "scale" and scaler.scale([]) == []


def test_static_and_class_methods():
    assert Scaler.halve([2, 4]) == Scaler(1).halve([2, 4]) == [1.0, 2.0]  # nothing bound
    assert Scaler.named([1]) == Scaler(1).named([1]) == ["Scaler:1"]  # the class bound
    assert BigScaler.named([2]) == ["BigScaler:2"]


def test_a_decorated_method_pickles_by_reference():
    assert pickle.loads(pickle.dumps(Scaler.__dict__["scale"])) is Scaler.__dict__["scale"]


def test_an_unpicklable_instance_is_a_clear_error_for_processes_and_fine_for_threads():
    with pytest.raises(twat_mp.SerializationError, match=r"Scaler\.scale is a @pmap method: its instance travels "
                                                         r"to the worker processes .* must be picklable"):
        Unpicklable(2).scale([1, 2])
    with pytest.raises(twat_mp.SerializationError, match="must be picklable"):
        list(Unpicklable(2).lazy([1, 2]))
    assert Unpicklable(2).scale_in_threads([1, 2]) == [2, 4]  # nothing is pickled for threads
