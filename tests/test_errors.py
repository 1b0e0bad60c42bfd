"""Errors as an API: the class hierarchy, user exceptions that are both their own type and
a WorkerError, their text, pickling, and the fallback to a plain WorkerError."""

from __future__ import annotations

import pickle
import sys

import dill
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twat_mp import ProcessPool, SerializationError, ThreadPool, WorkerError, pmap
from twat_mp._engine.protocol import RemoteError
from twat_mp.errors import (
    BrokenPoolError,
    InitializerError,
    PoolClosedError,
    TaskTimeoutError,
    TwatMPError,
    WorkerCrashedError,
)

POOLS = [ProcessPool, ThreadPool]
KINDS = ["process", "thread"]


class OddError(Exception):
    """A constructor that does not match its args: pickle alone cannot re-create it."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code = code


class FinalError(Exception):
    """A class that refuses subclasses, so no class deriving from it and WorkerError exists."""

    def __init_subclass__(cls, **kwargs):
        raise TypeError("FinalError cannot be subclassed")


class Coded(ValueError):
    def __init__(self, code, *, reason="?"):
        super().__init__(f"code {code}")
        self.code = code
        self.reason = reason


def invert(x):
    return 1 / x


def odd(x):
    raise OddError(x, "odd constructor")


def final(x):
    raise FinalError(f"final {x}")


def coded(x):
    if x == 3:
        raise Coded(x, reason="three")
    return x


def fails_on_three(x):
    if x == 3:
        raise KeyError("three")
    return x


def exits(x):
    sys.exit(f"exit on {x}")


def nested(x):
    """A map inside a worker: its error leaves this worker and crosses a second pipe."""
    with ThreadPool(nodes=1) as pool:
        return pool.map(lambda y: coded(y // 10), [x * 10])


def caught(call):
    try:
        call()
    except BaseException as exc:  # the test inspects whatever came out
        return exc
    raise AssertionError("nothing was raised")


# --- the hierarchy ----------------------------------------------------------------------


def test_every_error_derives_from_twatmperror_and_keeps_its_builtin_base():
    assert issubclass(WorkerError, TwatMPError)
    assert issubclass(WorkerCrashedError, TwatMPError) and issubclass(WorkerCrashedError, RuntimeError)
    assert issubclass(TaskTimeoutError, TwatMPError) and issubclass(TaskTimeoutError, TimeoutError)
    assert issubclass(SerializationError, TwatMPError) and issubclass(SerializationError, TypeError)
    assert issubclass(PoolClosedError, TwatMPError) and issubclass(PoolClosedError, RuntimeError)
    assert issubclass(BrokenPoolError, TwatMPError) and issubclass(BrokenPoolError, RuntimeError)
    assert issubclass(InitializerError, TwatMPError) and issubclass(InitializerError, RuntimeError)
    import twat_mp.errors
    from twat_mp.errors import NodeExecutionError, OpError, RuntimeClosedError

    assert issubclass(OpError, TwatMPError) and issubclass(NodeExecutionError, TwatMPError)
    assert issubclass(RuntimeClosedError, TwatMPError) and issubclass(RuntimeClosedError, RuntimeError)
    assert set(twat_mp.errors.__all__) == {
        "BrokenPoolError", "InitializerError", "PoolClosedError", "SerializationError", "TaskTimeoutError",
        "TwatMPError", "WorkerCrashedError", "WorkerError", "OpError", "NodeExecutionError", "RuntimeClosedError",
        "SharedMemoryError", "ResourceError", "ServiceOverloadedError", "ServiceFailedError", "ReplicaCrashedError"}


def test_graph_errors_pickle_with_their_fields():
    import pickle

    from twat_mp.errors import NodeExecutionError, OpError

    error = pickle.loads(pickle.dumps(OpError("parse", "('x')", ["parse", "join"], ValueError("x"))))
    assert (error.op, error.inputs, error.chain) == ("parse", "('x')", ["parse", "join"])
    assert isinstance(error.__cause__, ValueError) and "parse -> join" in str(error)
    node_error = pickle.loads(pickle.dumps(NodeExecutionError("b", ["a"], KeyError("k"))))
    assert node_error.node == "b" and node_error.completed == ["a"] and isinstance(node_error.__cause__, KeyError)


def test_broken_pool_error_names_why():
    error = BrokenPoolError("the process pool's manager thread failed: boom")
    assert error.reason == "the process pool's manager thread failed: boom"
    assert str(error) == "the pool can no longer run work: the process pool's manager thread failed: boom"


def test_initializer_error_names_the_worker_and_chains_the_initializer_exception():
    def bad_init():
        raise LookupError("no config")

    try:
        bad_init()
    except LookupError as exc:
        remote = RemoteError.capture(exc)
    error = remote.to_initializer_error(1, 4242)
    assert (error.worker_id, error.worker_pid) == (1, 4242)
    assert isinstance(error.__cause__, LookupError) and error.exception is error.__cause__
    assert "the initializer of worker 1 (pid 4242) failed: LookupError: no config" in str(error)
    assert "in bad_init" in str(error)  # the remote traceback
    text_only = InitializerError(0, 77, "RuntimeError: boom\nTraceback ...")
    assert text_only.__cause__ is None and "worker 0 (pid 77) failed: RuntimeError: boom" in str(text_only)


@pytest.mark.parametrize("error", [
    WorkerError("boom", ZeroDivisionError("x"), 1, 5, "Traceback", exc_type_name="ZeroDivisionError",
                worker_pid=9),
    WorkerCrashedError([1, 2], 0, 123, -9),
    TaskTimeoutError([3], 0.5, 1),
    SerializationError("cannot pickle the item"),
    PoolClosedError("closed"),
    BrokenPoolError("manager failed"),
    InitializerError(2, 99, LookupError("no config"), "Traceback ..."),
], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, dill.dumps], ids=["pickle", "dill"])
def test_every_error_pickles_with_its_attributes(error, dumps):
    copy = pickle.loads(dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    own = {k: v for k, v in vars(error).items() if not isinstance(v, BaseException)}
    assert {k: v for k, v in vars(copy).items() if not isinstance(v, BaseException)} == own
    if isinstance(error, InitializerError):
        assert isinstance(copy.__cause__, LookupError) and copy.__cause__.args == ("no config",)


def test_worker_error_keeps_twat_mp_2x_positional_arguments():
    error = WorkerError("failed", ValueError("v"), 3, "item", "tb text")
    assert (error.worker_id, error.input_item, error.traceback_str) == (3, "item", "tb text")
    assert isinstance(error.original_exception, ValueError) and error.exc_type_name == "ValueError"
    assert "Remote traceback" in str(error)


# --- both kinds of except ---------------------------------------------------------------


@pytest.mark.parametrize("pool_class", POOLS)
def test_pool_map_error_is_both_the_user_type_and_a_worker_error(pool_class):
    with pool_class(nodes=2) as pool:
        error = caught(lambda: pool.map(invert, [1, 2, 0, 4]))
    assert isinstance(error, ZeroDivisionError) and isinstance(error, WorkerError)
    assert type(error).__name__ == "ZeroDivisionError"  # tracebacks print the user's name
    assert error.input_item == 0 and error.worker_id in (0, 1) and error.worker_pid is not None
    assert isinstance(error.original_exception, ZeroDivisionError)
    assert type(error.original_exception) is ZeroDivisionError
    assert "in invert" in error.traceback_str and "return 1 / x" in error.traceback_str
    # a pool method's text follows twat-mp 2.x
    assert str(error).startswith(f"Worker process error in worker {error.worker_id} (pid {error.worker_pid}) "
                                 "while processing 0: ZeroDivisionError: division by zero")
    assert error.args == ("division by zero",)


@pytest.mark.parametrize("pool_class", POOLS)
def test_cause_is_a_plain_worker_error_with_the_remote_traceback(pool_class):
    with pool_class(nodes=2) as pool:
        error = caught(lambda: pool.map(invert, [1, 0]))
    cause = error.__cause__
    assert type(cause) is WorkerError
    assert cause.input_item == 0 and cause.worker_id == error.worker_id and cause.worker_pid == error.worker_pid
    assert "Remote traceback" in str(cause) and "return 1 / x" in str(cause)


@pytest.mark.parametrize("pool_class", POOLS)
def test_custom_exception_keeps_its_attributes_and_both_excepts_catch_it(pool_class):
    with pool_class(nodes=2) as pool:
        with pytest.raises(Coded) as as_user:
            pool.map(coded, range(6))
        with pytest.raises(WorkerError) as as_worker_error:
            pool.map(coded, range(6))
        future_error = caught(lambda: pool.submit(coded, 3).result(timeout=30))
        lazy = pool.imap(coded, range(6), chunksize=1)
        assert [next(lazy) for _ in range(3)] == [0, 1, 2]
        lazy_error = caught(lambda: next(lazy))
        async_error = caught(lambda: pool.amap(coded, range(6)).get(timeout=30))
    for error in (as_user.value, as_worker_error.value, future_error, lazy_error, async_error):
        assert isinstance(error, Coded) and isinstance(error, ValueError) and isinstance(error, WorkerError)
        assert (error.code, error.reason) == (3, "three")
        assert "code 3" in str(error)


@pytest.mark.parametrize("kind", KINDS)
def test_decorator_error_reads_as_the_original_message(kind):
    error = caught(lambda: pmap(coded, kind=kind, nodes=2)(range(6)))
    assert isinstance(error, Coded) and isinstance(error, WorkerError)
    assert str(error) == "code 3"
    assert error.input_item == 3 and (error.code, error.reason) == (3, "three")
    assert "raise Coded" in error.traceback_str
    assert "Remote traceback" in str(error.__cause__)
    if sys.version_info >= (3, 11):
        assert any("input item 3" in note for note in error.__notes__)


def test_decorator_error_of_a_builtin_type():
    error = caught(lambda: pmap(invert)([5, 0]))
    assert isinstance(error, ZeroDivisionError) and isinstance(error, WorkerError)
    assert str(error) == "division by zero" and error.input_item == 0


@pytest.mark.parametrize("pool_class", POOLS)
def test_imap_yields_results_before_the_failing_item(pool_class):
    with pool_class(nodes=2) as pool:
        results = pool.imap(fails_on_three, range(6), chunksize=2)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyError) as info:
            next(results)
        assert isinstance(info.value, WorkerError) and info.value.args == ("three",)
        assert pool.map(fails_on_three, [1, 2]) == [1, 2]  # the pool stays usable


def test_class_defined_in_a_function_is_caught_from_a_thread_pool():
    class LocalError(Exception):  # cannot be pickled by reference
        pass

    def fail(x):
        raise LocalError(x)

    with ThreadPool(nodes=2) as pool, pytest.raises(LocalError) as info:
        pool.map(fail, [7])
    assert isinstance(info.value, WorkerError) and info.value.input_item == 7


def test_error_of_a_nested_map_names_the_outer_item_and_chains_the_inner_error():
    with ProcessPool(nodes=1) as pool:
        error = caught(lambda: pool.map(nested, [1, 3]))
    assert isinstance(error, Coded) and isinstance(error, WorkerError)
    assert error.input_item == 3 and error.code == 3
    inner = error.__cause__.__cause__  # this call's WorkerError, then the worker's own error
    assert isinstance(inner, Coded) and isinstance(inner, WorkerError) and inner.input_item == 30


# --- pickling of the dual exception -----------------------------------------------------


@pytest.mark.parametrize("decorator", [False, True])
@pytest.mark.parametrize("dumps", [pickle.dumps, dill.dumps], ids=["pickle", "dill"])
def test_dual_exception_pickles(decorator, dumps):
    with ProcessPool(nodes=1) as pool:
        error = caught(lambda: pool.map(coded, [3]))
    remote = RemoteError.capture(error.original_exception)
    error = remote.to_exception(3, 0, 1234, decorator=decorator)
    copy = pickle.loads(dumps(error))
    assert isinstance(copy, Coded) and isinstance(copy, WorkerError)
    assert str(copy) == str(error)
    assert (copy.code, copy.reason, copy.input_item, copy.worker_id, copy.worker_pid) == (3, "three", 3, 0, 1234)
    assert copy.traceback_str == error.traceback_str and copy.exc_type_name == error.exc_type_name
    assert isinstance(copy.original_exception, Coded) and not isinstance(copy.original_exception, WorkerError)
    assert type(copy.__cause__) is WorkerError and copy.__cause__.input_item == 3
    if sys.version_info >= (3, 11):
        assert getattr(copy, "__notes__", []) == getattr(error, "__notes__", [])


def test_dual_exception_crosses_a_process_boundary():
    with ProcessPool(nodes=1) as pool:
        error = caught(lambda: pool.map(coded, [3]))
        echoed = pool.map(lambda e: e, [error])[0]  # pickled to a worker and back
    assert isinstance(echoed, Coded) and isinstance(echoed, WorkerError)
    assert str(echoed) == str(error) and echoed.input_item == 3


BUILTIN_ERRORS = [ValueError, KeyError, TypeError, RuntimeError, ZeroDivisionError, LookupError, IndexError,
                  AttributeError, NotImplementedError, UnicodeError, ArithmeticError, OSError, TimeoutError]


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(BUILTIN_ERRORS), text=st.text(max_size=30), item=st.integers() | st.text(max_size=10),
       decorator=st.booleans())
def test_any_builtin_error_round_trips_as_both_types(kind, text, item, decorator):
    try:
        raise kind(text)
    except kind as exc:
        remote = RemoteError.capture(exc)
    for error in (remote.to_exception(item, 1, 42, decorator=decorator),
                  pickle.loads(pickle.dumps(remote)).to_exception(item, 1, 42, decorator=decorator)):
        assert isinstance(error, kind) and isinstance(error, WorkerError)
        assert error.args == (text,) and error.input_item == item
        assert str(error) == (str(kind(text)) if decorator else
                              f"Worker process error in worker 1 (pid 42) while processing {item!r}: "
                              f"{kind.__name__}: {kind(text)}")
        copy = pickle.loads(pickle.dumps(error))
        assert isinstance(copy, kind) and isinstance(copy, WorkerError) and str(copy) == str(error)


def test_oserror_fields_survive():
    try:
        raise FileNotFoundError(2, "No such file", "/nope")
    except OSError as exc:
        error = RemoteError.capture(exc).to_exception("/nope", 0, 1)
    assert isinstance(error, FileNotFoundError) and isinstance(error, WorkerError)
    assert (error.errno, error.strerror, error.filename) == (2, "No such file", "/nope")


def test_re_raising_with_type_of_the_error_uses_the_users_constructor():
    with ThreadPool(nodes=1) as pool:
        error = caught(lambda: pool.map(coded, [3]))
    again = type(error)(7, reason="re-raised")  # a common way to add context to an error
    assert isinstance(again, Coded) and isinstance(again, WorkerError)
    assert (again.code, again.reason, str(again)) == (7, "re-raised", "code 7")
    assert again.input_item is None and again.original_exception is None
    copy = pickle.loads(pickle.dumps(again))
    assert type(copy) is Coded and (copy.code, copy.reason, str(copy)) == (7, "re-raised", "code 7")


# --- the fallback to a plain WorkerError ------------------------------------------------


@pytest.mark.parametrize("pool_class", POOLS)
def test_a_class_that_refuses_subclasses_arrives_as_a_plain_worker_error(pool_class):
    with pool_class(nodes=1) as pool:
        error = caught(lambda: pool.map(final, [4]))
    assert type(error) is WorkerError
    assert error.exc_type_name.endswith("FinalError") and error.input_item == 4
    assert isinstance(error.original_exception, FinalError)
    assert "while processing 4: " in str(error) and "final 4" in str(error) and "Remote traceback" in str(error)


def test_odd_constructor_is_re_created_from_its_state_when_the_class_is_importable():
    with ProcessPool(nodes=1) as pool, pytest.raises(OddError) as info:
        pool.map(odd, [9])
    error = info.value
    assert isinstance(error, WorkerError) and error.code == 9
    assert error.exc_type_name.endswith("OddError") and "9: odd constructor" in str(error)
    assert "raise OddError" in error.traceback_str and error.input_item == 9


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
    assert type(info.value) is WorkerError and info.value.original_exception is None
    assert info.value.exc_type_name.endswith("LockedError")
    assert "locked" in str(info.value) and info.value.input_item == 4


@pytest.mark.parametrize("pool_class", POOLS)
def test_system_exit_is_raised_as_itself_so_except_exception_does_not_swallow_it(pool_class):
    with pool_class(nodes=1) as pool:
        error = caught(lambda: pool.map(exits, [5]))
    assert type(error) is SystemExit and error.code == "exit on 5"
    assert isinstance(error.__cause__, WorkerError) and error.__cause__.input_item == 5


# --- what did not change ----------------------------------------------------------------


def test_unpicklable_argument_is_named_at_once():
    generator = (i for i in range(3))  # neither pickle nor dill can send a generator
    with ProcessPool(nodes=1) as pool, pytest.raises(SerializationError, match="item <generator.*cannot pickle"):
        pool.map(str, [1, generator, 3])


def test_unpicklable_result_is_named():
    with ProcessPool(nodes=1) as pool, pytest.raises(SerializationError) as caught:
        pool.map(lambda _: (i for i in range(3)), [1])
    assert "the result <generator" in str(caught.value)  # a result, not "the item"
    assert "the item" not in str(caught.value)


def test_unpicklable_function_is_named_at_once():
    generator = (i for i in range(3))

    def uses_generator(x):
        return next(generator) + x

    with ProcessPool(nodes=1) as pool, pytest.raises(SerializationError, match="function.*uses_generator"):
        pool.map(uses_generator, [1])
