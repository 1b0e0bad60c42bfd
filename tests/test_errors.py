from __future__ import annotations

import pytest

from twat_mp import ProcessPool, SerializationError, ThreadPool, WorkerError, pmap

POOLS = [ProcessPool, ThreadPool]


class OddError(Exception):
    """An exception whose constructor does not match its args: it cannot be unpickled."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")


def invert(x):
    return 1 / x


def odd(x):
    raise OddError(x, "odd constructor")


def fails_on_three(x):
    if x == 3:
        raise KeyError("three")
    return x


@pytest.mark.parametrize("pool_class", POOLS)
def test_user_exception_keeps_type_item_worker_and_traceback(pool_class):
    with pool_class(nodes=2) as pool, pytest.raises(ZeroDivisionError) as info:
        pool.map(invert, [1, 2, 0, 4])
    cause = info.value.__cause__
    assert isinstance(cause, WorkerError)
    assert cause.input_item == 0
    assert cause.worker_id in (0, 1)
    assert cause.worker_pid is not None
    assert "in invert" in cause.traceback_str and "return 1 / x" in cause.traceback_str
    assert any("input item 0" in note for note in info.value.__notes__)


def test_decorator_errors_keep_their_type():
    with pytest.raises(ZeroDivisionError) as info:
        pmap(invert)([5, 0])
    assert info.value.__cause__.input_item == 0


@pytest.mark.parametrize("pool_class", POOLS)
def test_imap_yields_results_before_the_failing_item(pool_class):
    with pool_class(nodes=2) as pool:
        results = pool.imap(fails_on_three, range(6), chunksize=2)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError):
            next(results)
        assert pool.map(fails_on_three, [1, 2]) == [1, 2]  # the pool stays usable


def test_exception_that_cannot_be_recreated_arrives_as_worker_error_with_its_name():
    with ProcessPool(nodes=1) as pool, pytest.raises(WorkerError) as info:
        pool.map(odd, [9])
    error = info.value
    assert error.exc_type_name.endswith("OddError")
    assert "9: odd constructor" in str(error)
    assert "raise OddError" in error.traceback_str
    assert error.input_item == 9


def test_submit_future_carries_the_error():
    with ProcessPool(nodes=1) as pool:
        future = pool.submit(invert, 0)
        with pytest.raises(ZeroDivisionError):
            future.result(timeout=10)


def test_unpicklable_argument_is_named_at_once():
    generator = (i for i in range(3))  # neither pickle nor dill can send a generator
    with ProcessPool(nodes=1) as pool, pytest.raises(SerializationError, match="item <generator.*cannot pickle"):
        pool.map(str, [1, generator, 3])


def test_unpicklable_result_is_named():
    with ProcessPool(nodes=1) as pool, pytest.raises(SerializationError, match="result.*generator"):
        pool.map(lambda _: (i for i in range(3)), [1])


def test_worker_error_str_includes_remote_traceback():
    error = WorkerError("boom", exc_type_name="ValueError", traceback_str="Traceback ...\nValueError: boom")
    assert "Remote traceback" in str(error)


def test_unpicklable_function_is_named_at_once():
    generator = (i for i in range(3))

    def uses_generator(x):
        return next(generator) + x

    with ProcessPool(nodes=1) as pool, pytest.raises(SerializationError, match="function.*uses_generator"):
        pool.map(uses_generator, [1])


def test_exception_of_a_class_that_cannot_be_pickled_keeps_its_name():
    import threading

    class LockedError(Exception):  # carries a lock: neither pickle nor dill can send it
        def __init__(self):
            super().__init__("locked")
            self.lock = threading.Lock()
            self.gen = (i for i in range(1))

    def fail(_):
        raise LockedError()

    with ProcessPool(nodes=1) as pool, pytest.raises(WorkerError) as info:
        pool.map(fail, [4])
    assert info.value.exc_type_name.endswith("LockedError")
    assert "locked" in str(info.value) and info.value.input_item == 4
