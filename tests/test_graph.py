"""Task graphs: @op, .go(), ObjectRef, the scheduler, hooks and profiles, on real
threads, processes and event loops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pickle
import signal
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import twat_mp
from twat_mp import ObjectRef, OpError, Runtime, RuntimeClosedError, TaskTimeoutError, as_completed, get, op, wait
from twat_mp.graph import current_runtime, run_sync

pytestmark = pytest.mark.timeout(90)


# Ops at module level: process workers import them by name.
@op(kind="inline")
def add_inline(a, b):
    return a + b


@op
async def add_async(a, b):
    return a + b


@op(kind="thread")
def add_thread(a, b):
    return a + b


@op(kind="process")
def add_process(a, b):
    return a + b


@op(kind="async-process")
async def add_async_process(a, b):
    await asyncio.sleep(0)
    return a + b


ADDERS = [add_inline, add_async, add_thread, add_process, add_async_process]


class Boom(ValueError):
    pass


@op(kind="process")
def explode(x):
    raise Boom(f"bad {x}")


@op(kind="thread")
def explode_thread(x):
    raise Boom(f"bad {x}")


@op(kind="process")
def pid_of(_):
    return os.getpid()


@op(kind="process")
def nested_in_process(n):
    # A graph inside a process worker runs on that worker's own runtime.
    refs = [add_process.go(i, i) for i in range(n)]
    return sum(get(refs)), current_runtime().name


@op(kind="process", retries=2)
def die_once(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


@op(kind="process", timeout=0.3)
def hang(_):
    time.sleep(60)


@pytest.fixture
def rt():
    with Runtime(nodes=2, threads=4) as runtime:
        yield runtime


# -- ops --------------------------------------------------------------------------------------
def test_calling_an_op_runs_the_plain_function():
    assert add_thread(2, 3) == 5
    assert asyncio.run(add_async(2, 3)) == 5
    assert add_thread.__name__ == "add_thread" and add_thread.__wrapped__ is not None


def test_default_kinds():
    @op
    def plain(x):
        return x

    @op
    async def coro(x):
        return x

    assert plain.kind == "thread" and coro.kind == "async"


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        op(kind="gpu")(lambda x: x)
    with pytest.raises(TypeError, match="not an async function"):
        op(kind="async")(lambda x: x)

    async def coro(x):
        return x

    with pytest.raises(TypeError, match="is an async function"):
        op(kind="process")(coro)
    with pytest.raises(ValueError, match="timeout"):
        op(kind="thread", timeout=-1)(lambda x: x)
    with pytest.raises(ValueError, match="inline"):
        op(kind="inline", timeout=1)(lambda x: x)
    with pytest.raises(TypeError, match="decorates a function"):
        op(42)
    with pytest.raises(TypeError, match="unknown option"):
        add_thread.options(knd="process")


def test_ops_pickle_by_reference():
    assert pickle.loads(pickle.dumps(add_process)) is add_process


@pytest.mark.parametrize("adder", ADDERS, ids=lambda f: f.kind)
def test_each_kind_computes_a_tree(rt, adder):
    refs = [adder.go(i, 0) for i in range(64)]
    while len(refs) > 1:
        refs = [adder.go(refs[i], refs[i + 1]) for i in range(0, len(refs), 2)]
    assert refs[0].result() == sum(range(64))


def test_go_returns_at_once(rt):
    gate = threading.Event()

    @op(kind="thread")
    def wait_for_gate():
        return gate.wait(30)

    started = time.perf_counter()
    ref = wait_for_gate.go()
    assert time.perf_counter() - started < 0.5 and not ref.done()
    gate.set()
    assert ref.result() is True


def test_refs_inside_containers_are_resolved(rt):
    @op(kind="inline")
    def show(*args, **kwargs):
        return args, kwargs

    one, two = add_inline.go(0, 1), add_inline.go(1, 1)
    got = show.go([one, (two, {"k": one})], {one, 5}, frozenset([two]), key={"x": [two]}).result()
    assert got == (([1, (2, {"k": 1})], {1, 5}, frozenset([2])), {"key": {"x": [2]}})


# -- the property: any DAG of mixed kinds equals a serial evaluation -------------------------
@st.composite
def dags(draw):
    n = draw(st.integers(1, 25))
    nodes = []
    for i in range(n):
        constant = draw(st.integers(-100, 100))
        parents = draw(st.lists(st.integers(0, i - 1), max_size=3)) if i else []
        kind = draw(st.sampled_from(range(len(ADDERS))))
        nodes.append((constant, parents, kind))
    return nodes


@op(kind="inline")
def combine_inline(constant, *parents):
    return constant + sum(parents)


@op(kind="thread")
def combine_thread(constant, *parents):
    return constant + sum(parents)


@op(kind="process")
def combine_process(constant, *parents):
    return constant + sum(parents)


@op
async def combine_async(constant, *parents):
    return constant + sum(parents)


@op(kind="async-process")
async def combine_async_process(constant, *parents):
    return constant + sum(parents)


COMBINERS = [combine_inline, combine_thread, combine_process, combine_async, combine_async_process]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dags())
def test_random_dags_equal_serial_evaluation(rt, dag):
    serial: list[int] = []
    for constant, parents, _ in dag:
        serial.append(constant + sum(serial[p] for p in parents))
    refs: list[ObjectRef] = []
    for constant, parents, kind in dag:
        refs.append(COMBINERS[kind].go(constant, *[refs[p] for p in parents]))
    assert get(refs) == serial


# -- failures ------------------------------------------------------------------------------
def test_a_failure_reaches_dependents_as_op_error_and_spares_other_branches(rt):
    bad = explode.go(7)
    middle = add_thread.go(bad, 1)
    top = add_inline.go(middle, 2)
    fine = add_thread.go(1, 2)
    with pytest.raises(Boom, match="bad 7"):  # the op's own ref: its own exception
        bad.result()
    with pytest.raises(OpError) as caught:
        top.result()
    error = caught.value
    assert error.op == "explode" and "7" in error.inputs
    assert error.chain == ["explode", "add_thread", "add_inline"]
    assert isinstance(error.__cause__, Boom)
    assert "explode" in str(error) and "add_thread -> add_inline" in str(error)
    assert fine.result() == 3
    assert isinstance(middle.exception(), OpError)


def test_thread_op_error_keeps_the_exception_object(rt):
    ref = explode_thread.go(1)
    assert isinstance(ref.exception(), Boom)
    with pytest.raises(Boom):
        get([ref])


def test_depending_on_an_already_failed_ref(rt):
    bad = explode_thread.go(1)
    bad.exception()
    with pytest.raises(OpError, match="explode_thread"):
        add_inline.go(bad, 1).result()


def test_a_worker_killed_mid_task_is_retried(rt, tmp_path):
    assert die_once.go(str(tmp_path / "marker")).result() == "survived"


def test_timeout_stops_a_process_op(rt):
    ref = hang.go(1)
    with pytest.raises(TaskTimeoutError):
        ref.result()


def test_async_op_timeout_and_retries(rt):
    attempts = []

    @op(timeout=0.2, retries=1)
    async def slow():
        attempts.append(1)
        await asyncio.sleep(30)

    with pytest.raises(TaskTimeoutError):
        slow.go().result()
    assert len(attempts) == 2


def test_unpicklable_argument_fails_the_task_not_the_runtime(rt):
    ref = add_process.go((i for i in range(3)), 1)
    with pytest.raises(twat_mp.SerializationError):
        ref.result()
    assert add_process.go(1, 1).result() == 2


# -- cancellation ------------------------------------------------------------------------------
def test_cancel_a_pending_task_cancels_its_dependents(rt):
    gate = threading.Event()

    @op(kind="thread")
    def blocked():
        gate.wait(30)
        return 1

    first = blocked.go()
    waiting = add_thread.go(first, 1)
    after = add_inline.go(waiting, 1)
    other = add_inline.go(1, 1)
    assert waiting.cancel() is True
    assert waiting.cancelled() and after.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        after.result()
    gate.set()
    assert first.result() == 1 and other.result() == 2
    assert first.cancel() is False  # finished: nothing to cancel


# -- concurrency ----------------------------------------------------------------------------
def test_independent_thread_ops_overlap(rt):
    barrier = threading.Barrier(3, timeout=20)

    @op(kind="thread")
    def meet(i):
        barrier.wait()  # passes only when three tasks run at once
        return i

    assert get([meet.go(i) for i in range(3)]) == [0, 1, 2]


def test_independent_async_ops_overlap(rt):
    @op
    async def meet(i, events):
        events[i].set()
        await asyncio.wait_for(events[1 - i].wait(), 20)  # needs the other one running
        return i

    events = run_sync(_make_events())
    assert get([meet.go(0, events), meet.go(1, events)]) == [0, 1]


async def _make_events():
    return [asyncio.Event(), asyncio.Event()]


def test_independent_process_ops_run_on_different_workers(rt):
    @op(kind="process")
    def sleepy(_):
        time.sleep(0.4)
        return os.getpid()

    assert len(set(get([sleepy.go(i) for i in range(2)]))) == 2


# -- callers --------------------------------------------------------------------------------
def test_await_from_a_foreign_loop(rt):
    async def main():
        one = add_async.go(1, 2)
        many = await asyncio.gather(add_thread.go(one, 1), add_process.go(one, 2))
        return await one, many

    assert asyncio.run(main()) == (3, [4, 5])


def test_nested_go_inside_async_and_thread_ops(rt):
    @op
    async def fan_out(n):
        return sum(await asyncio.gather(*[add_async.go(i, 1) for i in range(n)]))

    @op(kind="thread")
    def fan_out_sync(n):
        assert current_runtime() is rt
        return sum(get([add_inline.go(i, 1) for i in range(n)]))

    assert fan_out.go(10).result() == sum(range(1, 11))
    assert fan_out_sync.go(10).result() == sum(range(1, 11))


def test_nested_graph_inside_a_process_op_runs_on_the_workers_runtime(rt):
    total, name = nested_in_process.go(20).result()
    assert total == sum(2 * i for i in range(20))
    assert name == "default"  # the worker's own default runtime, not the parent's


def test_result_on_the_runtime_loop_is_an_error_not_a_deadlock(rt):
    @op
    async def blocking_get():
        return add_thread.go(1, 1).result()

    with pytest.raises(RuntimeError, match="await ref"):
        blocking_get.go().result()


def test_get_wait_as_completed(rt):
    gate = threading.Event()

    @op(kind="thread")
    def slow():
        gate.wait(30)
        return "slow"

    fast = [add_inline.go(i, 0) for i in range(3)]
    pending = slow.go()
    done, rest = wait([pending, *fast], num_returns=2, timeout=10)
    assert done == fast[:2] and rest == [pending, fast[2]]
    done, rest = wait([pending], num_returns=1, timeout=0.05)
    assert done == [] and rest == [pending]
    with pytest.raises(TimeoutError):
        pending.result(timeout=0.05)
    with pytest.raises(TimeoutError):
        list(as_completed([pending], timeout=0.05))
    order = []
    for ref in as_completed([pending, fast[0]]):
        order.append(ref)
        gate.set()
    assert order == [fast[0], pending]
    assert get(pending) == "slow" and get(fast) == [0, 1, 2]
    with pytest.raises(ValueError, match="num_returns"):
        wait(fast, num_returns=4)


def test_refs_cannot_be_pickled(rt):
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(add_inline.go(1, 1))


# -- runtimes ---------------------------------------------------------------------------------
def test_default_runtime_needs_no_setup_and_shutdown_ends_it():
    first = current_runtime()
    assert add_inline.go(1, 2).result() == 3
    twat_mp.shutdown()
    assert first.closed
    assert add_inline.go(2, 2).result() == 4  # a fresh default runtime
    assert current_runtime() is not first


def test_a_shut_down_runtime_is_a_clear_error():
    gate = threading.Event()

    @op(kind="thread")
    def blocked():
        gate.wait(30)

    with Runtime() as runtime:
        pending = blocked.go()
        done = add_inline.go(1, 1)
        done.result()
    gate.set()
    assert pending.done() and not pending.cancelled()
    assert isinstance(pending.exception(), RuntimeClosedError)
    with pytest.raises(RuntimeClosedError, match="shut down"):
        pending.result(timeout=10)
    with pytest.raises(RuntimeClosedError):
        add_inline.go(done, 1)
    with pytest.raises(RuntimeClosedError):
        runtime.submit(add_inline, (1, 1), {})
    assert done.result() == 2


def test_a_waiter_blocked_when_the_runtime_shuts_down_is_released():
    gate = threading.Event()

    @op(kind="thread")
    def blocked():
        gate.wait(30)

    runtime = Runtime()
    with runtime:
        pending = blocked.go()
        box = []
        waiter = threading.Thread(target=lambda: box.append(pending.exception(timeout=20)))
        waiter.start()
        deadline = time.monotonic() + 10
        while not pending._waiters and time.monotonic() < deadline:  # until it is blocked on the ref
            time.sleep(0.001)
        assert pending._waiters
    waiter.join(20)
    gate.set()
    assert isinstance(box[0], RuntimeClosedError)
    # and one who asks after the shutdown is told the same, at once
    assert pending.done() and isinstance(pending.exception(), RuntimeClosedError)


def test_refs_stay_in_their_runtime():
    with Runtime() as one:
        ref = add_inline.go(1, 1)
        with Runtime(), pytest.raises(ValueError, match="another runtime"):
            add_inline.go(ref, 1)
        assert current_runtime() is one


# -- callbacks and hooks ----------------------------------------------------------------------
def test_callbacks_run_on_the_callback_thread_and_errors_reach_excepthook(rt, monkeypatch):
    seen = []
    hooked = []
    done = threading.Event()
    monkeypatch.setattr(threading, "excepthook", lambda args: (hooked.append(args.exc_value), done.set()))

    def callback(ref):
        seen.append((ref.result(), threading.current_thread().name))

    def broken(ref):
        raise KeyError("in a callback")

    ref = add_thread.go(1, 2)
    ref.add_done_callback(callback)
    ref.add_done_callback(broken)
    assert done.wait(10)
    assert seen == [(3, f"twat-mp-{rt.name}-callbacks")]
    assert isinstance(hooked[0], KeyError)


def test_hooks_observe_and_reroute(rt):
    seen = []
    finished = threading.Semaphore(0)

    @op(kind="inline")
    def subtract(a, b):
        return a - b

    def before(task):
        seen.append(("before", task.op.name, task.args))
        if task.op.name == "add_inline":
            return subtract
        return None

    def after(task, outcome):
        seen.append(("after", task.op.name, outcome))
        finished.release()

    rt.add_hook(before_submit=before, after_complete=after)
    assert add_inline.go(5, 3).result() == 2  # rerouted
    assert finished.acquire(timeout=10)
    assert ("before", "add_inline", (5, 3)) in seen and ("after", "subtract", 2) in seen
    rt.remove_hooks()
    assert add_inline.go(5, 3).result() == 8


def test_a_failing_before_hook_fails_the_task(rt):
    def before(task):
        raise PermissionError("not this one")

    rt.add_hook(before_submit=before)
    with pytest.raises(PermissionError):
        add_inline.go(1, 1).result()


# -- profiles ---------------------------------------------------------------------------------
def test_profile_records_counts_latencies_and_edges(rt):
    with twat_mp.profile() as prof:
        leaves = [add_thread.go(i, 1) for i in range(4)]
        get([add_inline.go(leaves[0], leaves[1]), add_inline.go(leaves[2], leaves[3])])
    data = prof.to_dict()
    assert data["ops"]["add_thread"]["count"] == 4 and data["ops"]["add_inline"]["count"] == 2
    assert data["ops"]["add_thread"]["p95_s"] >= 0 and data["ops"]["add_thread"]["wait_mean_s"] >= 0
    assert data["edges"] == [{"from": "add_thread", "to": "add_inline", "count": 4}]
    assert "-->|4|" in prof.to_mermaid()
    assert "add_thread" in str(prof)


# -- large values between process ops stay in shared memory --------------------------------
@op(kind="process")
def make_big(n):
    import numpy as np

    return np.arange(n, dtype=np.float64)


@op(kind="process")
def total_of(array):
    return float(array.sum()), len(array)


def test_a_large_value_goes_from_process_op_to_process_op_through_shared_memory(rt):
    np = pytest.importorskip("numpy")
    from twat_mp._engine import shm

    if not shm.available():
        pytest.skip("no writable /dev/shm here")
    n = 1 << 19  # 4 MiB of float64
    make_big.go(8).result()  # pools warm
    written, referenced = shm.bytes_written, shm.bytes_referenced
    big = make_big.go(n)
    sums = get([total_of.go(big), total_of.go(big)])
    assert sums == [(float(np.arange(n).sum()), n)] * 2
    assert shm.bytes_written == written  # the parent copied nothing into a new segment
    assert shm.bytes_referenced - referenced >= 2 * 8 * n  # both sends referred to the result's segment


@pytest.mark.parametrize("kind", ["inline", "thread", "process"])
def test_an_op_raising_system_exit_fails_only_its_task(rt, kind):
    import sys

    exiting = op(kind=kind, name="exiting")(sys.exit)
    with pytest.raises(SystemExit):
        exiting.go(3).result()
    assert add_inline.go(1, 1).result() == 2 and add_thread.go(2, 2).result() == 4


@op(kind="async-process", timeout=0.3)
async def hang_async_process(_):
    await asyncio.sleep(60)


def test_timeouts_of_thread_and_async_process_ops(rt):
    release = threading.Event()

    @op(kind="thread", timeout=0.3)
    def hang_thread(_):
        release.wait(30)

    try:
        with pytest.raises(TaskTimeoutError):
            hang_thread.go(1).result(timeout=20)
        with pytest.raises(TaskTimeoutError):
            hang_async_process.go(1).result(timeout=20)
        assert add_thread.go(1, 1).result() == 2 and add_async_process.go(1, 2).result() == 3
    finally:
        release.set()


def test_an_awaiter_that_gave_up_and_closed_its_loop_breaks_nothing(rt):
    gate = threading.Event()

    @op(kind="thread")
    def slow():
        gate.wait(30)
        return 1

    first = slow.go()
    after = add_inline.go(first, 1)

    async def impatient():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first, 0.05)

    asyncio.run(impatient())  # its loop is closed now
    assert not first._waiters  # the awaiter that gave up took its waiter back
    gate.set()
    assert after.result(timeout=10) == 2 and first._waiters is None


def test_timed_out_waits_leave_no_waiter_behind(rt):
    gate = threading.Event()

    @op(kind="thread")
    def slow():
        gate.wait(30)

    ref = slow.go()
    for _ in range(20):
        with pytest.raises(TimeoutError):
            ref.result(timeout=0.001)
    wait([ref], timeout=0.001)
    with pytest.raises(TimeoutError):
        list(as_completed([ref], timeout=0.001))
    assert not ref._waiters
    gate.set()
    ref.result(timeout=10)


def test_one_unpicklable_task_of_a_batch_fails_alone(rt):
    refs = [add_process.go(i, 0) for i in range(6)] + [add_process.go((i for i in range(2)), 1)]
    refs += [add_process.go(i, 10) for i in range(6)]
    outcomes = [r.exception(timeout=20) for r in refs]
    assert [o is None for o in outcomes] == [True] * 6 + [False] + [True] * 6
    assert isinstance(outcomes[6], twat_mp.SerializationError)
