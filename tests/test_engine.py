"""The engine's seams: placement (slots and tags), per-slot environment, restart
policies, pipelined pinned work, per-item timeouts on batches, callbacks off the
manager thread, and submit racing terminate."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import pytest

from conftest import wait_gone
from twat_mp import (
    BrokenPoolError,
    InitializerError,
    PoolClosedError,
    TaskTimeoutError,
    WorkerCrashedError,
    worker_info,
    worker_state,
)
from twat_mp._engine.dispatcher import Chunk, FnRef, RestartPolicy, SlotSpec
from twat_mp._engine.jobs import submit_call
from twat_mp._engine.process import ProcessDispatcher
from twat_mp._engine.protocol import MODE_ONE
from twat_mp._engine.threads import ThreadDispatcher


def where(_: object = None) -> tuple[int | None, int, str | None]:
    return worker_info().worker_id, os.getpid(), os.environ.get("TWAT_TEST_SLOT")


def record(value: int) -> list[int]:
    seen = worker_state().setdefault("seen", [])
    seen.append(value)
    return list(seen)


def fail_init() -> None:
    raise OSError("no device here")


def wait_for(condition, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def tagged_pool():
    slots = [SlotSpec(env=(("TWAT_TEST_SLOT", str(i)),), tags=frozenset({f"dev{i % 2}"})) for i in range(3)]
    dispatcher = ProcessDispatcher(3, slots=slots)
    yield dispatcher
    dispatcher.terminate()
    dispatcher.join(10)


@pytest.mark.timeout(60)
def test_a_chunk_pinned_to_a_slot_runs_there_with_that_slots_environment(tagged_pool):
    for slot in range(3):
        worker_id, _, env = submit_call(tagged_pool, where, (), {}, slot=slot).result(10)
        assert (worker_id, env) == (slot, str(slot))


@pytest.mark.timeout(60)
def test_a_chunk_with_a_tag_runs_on_a_worker_with_that_tag(tagged_pool):
    slots = {submit_call(tagged_pool, where, (), {}, tag="dev1").result(10)[0] for _ in range(20)}
    assert slots == {1}
    slots = {submit_call(tagged_pool, where, (), {}, tag="dev0").result(10)[0] for _ in range(40)}
    assert slots <= {0, 2}


def test_bad_placement_is_a_clear_error(tagged_pool):
    with pytest.raises(ValueError, match="no worker slot 7"):
        submit_call(tagged_pool, where, (), {}, slot=7)
    with pytest.raises(ValueError, match="no worker has the tag 'gpu9'"):
        submit_call(tagged_pool, where, (), {}, tag="gpu9")


@pytest.mark.timeout(60)
def test_a_replacement_worker_keeps_its_slots_environment(tagged_pool):
    _, pid, _ = submit_call(tagged_pool, where, (), {}, slot=2).result(10)
    os.kill(pid, signal.SIGKILL)
    assert not wait_gone({pid})

    # the first call may still reach the dead worker before its death is seen: retry it
    worker_id, new_pid, env = submit_call(tagged_pool, where, (), {}, slot=2, retries=1).result(10)
    assert (worker_id, env) == (2, "2") and new_pid != pid


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_pinned_calls_queue_behind_each_other_and_run_in_order(kind):
    dispatcher = ProcessDispatcher(2) if kind == "process" else ThreadDispatcher(2)
    try:
        futures = [submit_call(dispatcher, record, (i,), {}, slot=1) for i in range(300)]
        last = futures[-1].result(30)
        assert last[-300:] == list(range(300))  # all in slot 1, in submission order
        assert [f.result(1)[-1] for f in futures] == list(range(300))
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


@pytest.mark.timeout(60)
def test_restart_policy_with_a_limit_breaks_the_pool_with_a_clear_error():
    dispatcher = ProcessDispatcher(1, policy=RestartPolicy(max_restarts=1, window=60))
    try:
        for _ in range(2):
            _, pid, _ = submit_call(dispatcher, where, (), {}).result(10)
            os.kill(pid, signal.SIGKILL)
            assert not wait_gone({pid})
            wait_for(lambda dead=pid: dispatcher.error is not None or any(
                w.pid != dead for w in list(dispatcher._workers.values())))
        assert wait_for(lambda: dispatcher.error is not None)
        assert isinstance(dispatcher.error, BrokenPoolError)
        assert "restart policy" in str(dispatcher.error)
        with pytest.raises(BrokenPoolError):
            submit_call(dispatcher, where, (), {})
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


def test_restart_policy_backoff_grows_and_is_bounded():
    policy = RestartPolicy(backoff=0.5, max_backoff=1.5, window=10)
    assert policy.delay([], 100.0) == 0.0
    assert policy.delay([99.0], 100.0) == 0.5
    assert policy.delay([98.0, 99.0], 100.0) == 1.0
    assert policy.delay([97.0, 98.0, 99.0], 100.0) == 1.5
    assert policy.delay([50.0], 100.0) == 0.0  # outside the window: forgotten
    assert RestartPolicy(max_restarts=2).delay([1.0, 2.0], 3.0) is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_an_initializer_failure_is_an_initializer_error_inside_a_broken_pool_error(kind):
    cls = ProcessDispatcher if kind == "process" else ThreadDispatcher
    dispatcher = cls(1, initializer=fail_init)
    try:
        assert wait_for(lambda: dispatcher.error is not None)
        error = dispatcher.error
        assert isinstance(error, BrokenPoolError)
        assert "no device here" in str(error)
        assert isinstance(error.__cause__, InitializerError)
        assert "OSError" in str(error.__cause__)
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


@pytest.mark.timeout(60)
def test_done_callbacks_never_run_on_the_manager_thread():
    dispatcher = ThreadDispatcher(1)
    try:
        names: list[str] = []
        future = submit_call(dispatcher, abs, (-3,), {})
        done = threading.Event()
        future.add_done_callback(lambda f: (names.append(threading.current_thread().name), done.set()))
        assert future.result(10) == 3
        assert done.wait(10)
        assert "manager" not in names[0]
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


@pytest.mark.timeout(60)
def test_a_failing_sink_goes_to_threading_excepthook(monkeypatch):
    seen: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    dispatcher = ThreadDispatcher(1)
    try:
        def bad_sink(chunk: Chunk, outcome: object) -> None:
            raise LookupError("sink bug")

        dispatcher.submit(Chunk(FnRef(abs, MODE_ONE, None, 0), [-1], bad_sink))
        assert wait_for(lambda: bool(seen))
        assert isinstance(seen[0], LookupError)
        assert submit_call(dispatcher, abs, (-2,), {}).result(10) == 2  # the manager goes on
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_submit_racing_terminate_never_leaves_a_caller_waiting(kind):
    for _ in range(5):
        _race_submit_with_terminate(ProcessDispatcher(2) if kind == "process" else ThreadDispatcher(2))


def _race_submit_with_terminate(dispatcher) -> None:
    futures: list[concurrent.futures.Future[object]] = []
    start = threading.Barrier(5)

    def submitter() -> None:
        start.wait()
        for i in range(200):
            try:
                futures.append(submit_call(dispatcher, abs, (-i,), {}))
            except PoolClosedError:
                return

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for t in threads:
        t.start()
    start.wait()
    dispatcher.terminate()
    for t in threads:
        t.join(30)
    for future in futures:  # each one resolves: a result, or PoolClosedError
        try:
            future.result(10)
        except PoolClosedError:
            pass
    dispatcher.join(10)


def slow_item(x: int) -> int:
    if x == 37:
        time.sleep(30)
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_timeout_applies_to_each_item_of_a_batch_and_names_the_item(kind):
    from twat_mp import ProcessPool, ThreadPool

    cls = ProcessPool if kind == "process" else ThreadPool
    with cls(nodes=2, timeout=1.0) as pool:
        assert pool.map(abs, range(-200, 0), chunksize=50) == list(range(200, 0, -1))
        start = time.monotonic()
        with pytest.raises(TaskTimeoutError) as info:
            pool.map(slow_item, range(100), chunksize=50)
        assert time.monotonic() - start < 10
        assert info.value.items == [37]


def sleep_long(_: object) -> None:
    time.sleep(30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_terminate_fails_the_calls_workers_were_running(kind):
    dispatcher = ProcessDispatcher(2) if kind == "process" else ThreadDispatcher(2)
    futures = [submit_call(dispatcher, sleep_long, (i,), {}) for i in range(4)]
    assert wait_for(lambda: sum(len(w.chunks) for w in list(dispatcher._workers.values())) >= 2)
    dispatcher.terminate()
    for future in futures:
        with pytest.raises(PoolClosedError):
            future.result(10)
    dispatcher.join(10)


def test_auto_chunksize_uses_what_it_learned_of_the_function():
    from twat_mp._engine.jobs import auto_chunksize

    assert auto_chunksize(1000, 2) == 125  # nothing known: four chunks per worker
    assert auto_chunksize(1000, 2, item_seconds=1e-7) == 1000  # the whole map: less than a round trip
    assert auto_chunksize(1000, 2, item_seconds=1e-6) == 500  # quick items: one chunk per worker
    assert auto_chunksize(1000, 2, item_seconds=0.01) == 125  # slow items: balance wins
    assert auto_chunksize(100_000, 2, item_seconds=1e-7) == 12_500
    assert auto_chunksize(100, 2, concurrency=16) == 13  # async: at most childconcurrency a chunk
    assert auto_chunksize(None, 2, concurrency=16) == 4


@pytest.mark.timeout(60)
def test_a_pool_learns_how_long_a_functions_items_take():
    from twat_mp import ProcessPool

    with ProcessPool(nodes=2) as pool:
        assert pool.map(abs, range(-50, 50)) == [abs(x) for x in range(-50, 50)]
        assert pool._dispatcher is not None and pool._dispatcher.item_seconds


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_several_threads_map_on_one_warm_pool_at_once(kind):
    from twat_mp import pmap

    mapped = pmap(kind=kind, nodes=2)(abs)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(20):
                results[i] = mapped(range(-i * 100, 0))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors
    assert results == {i: [abs(x) for x in range(-i * 100, 0)] for i in range(1, 7)}


async def async_square(x: int) -> int:
    return x * x


def square(x: int) -> int:
    return x * x


@pytest.mark.timeout(120)
def test_maps_complete_while_workers_are_killed_every_200_ms():
    """Six threads map (process and async pools, with retries) for a few seconds while
    a killer SIGKILLs one of their workers every 200 ms: every map completes, right."""
    import random

    from twat_mp import AsyncMultiPool, ProcessPool

    with ProcessPool(nodes=2, retries=20) as pool:
        apool = AsyncMultiPool(processes=2, retries=20).start()
        try:
            stop = threading.Event()
            done: list[int] = []
            errors: list[BaseException] = []

            def mapper(i: int) -> None:
                try:
                    while not stop.is_set():
                        xs = range(i * 50, i * 50 + 200)
                        if i % 2:
                            assert pool.map(square, xs, chunksize=5) == [x * x for x in xs]
                        else:
                            assert apool.map_sync(async_square, xs, chunksize=5) == [x * x for x in xs]
                        done.append(i)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=mapper, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 4
            kills = 0
            while time.monotonic() < deadline and not errors:
                time.sleep(0.2)  # the fault's rhythm, not a synchronisation
                pids = [w.pid for d in (pool._dispatcher, apool._dispatcher) if d is not None
                        for w in list(d._workers.values()) if w.pid]
                if pids:
                    try:
                        os.kill(random.choice(pids), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
            stop.set()
            for t in threads:
                t.join(60)
            assert not errors, errors[:1]
            assert kills >= 10 and len(done) >= 6
        finally:
            apool.terminate()


@pytest.mark.timeout(60)
def test_pools_outlive_a_new_forkserver(tmp_path):
    """A pool made after the caller imported another heavy module (here the async
    worker) gets a new forkserver; the workers of the old one keep working."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import asyncio, os
        from twat_mp import apmap, pmap, shutdown_warm_pools
        def pid(_): return os.getpid()
        async def apid(_): return os.getpid()
        before = set(pmap(pid)(range(20)))
        assert apmap(apid).sync(range(20))  # needs the async worker: a second server
        after = set(pmap(pid)(range(20)))
        assert after <= before, (before, after)
        shutdown_warm_pools()
        import psutil
        assert not psutil.Process().children(), psutil.Process().children()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_cancelled_future_never_runs_and_the_pool_goes_on(kind):
    from twat_mp import ProcessPool, ThreadPool

    cls = ProcessPool if kind == "process" else ThreadPool
    with cls(nodes=1) as pool:
        blocker = pool.submit(time.sleep, 0.5)  # holds the only worker
        queued = [pool.submit(record, i) for i in range(5)]
        assert all(f.cancel() for f in queued[1:])  # still pending: they can be cancelled
        blocker.result(10)
        assert queued[0].result(10)[-1] == 0
        assert all(f.cancelled() for f in queued[1:])
        seen = pool.apply(record, 99)
        assert seen[-2:] == [0, 99]  # the cancelled calls never ran


# -- lifecycle events, restart modes, slot initializers, stats (for services) --------------------
_slot_value: dict[str, object] = {}


def remember(value: object) -> None:
    _slot_value["value"] = value


def recall(_: object = None) -> tuple[object, int]:
    return _slot_value.get("value"), os.getpid()


def exit_zero(_: object = None) -> None:
    os._exit(0)


def kill_self(_: object = None) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _replaced(dispatcher, slot: int, pid: int) -> bool:
    try:
        return submit_call(dispatcher, recall, (), {}, slot=slot).result(10)[1] != pid
    except WorkerCrashedError:  # sent to the dying worker before its death was seen
        return False


class Events:
    def __init__(self) -> None:
        self.seen: list[object] = []
        self.lock = threading.Lock()

    def __call__(self, event) -> None:  # on the manager thread: only records
        with self.lock:
            self.seen.append(event)

    def kinds(self, slot: int | None = None) -> list[str]:
        with self.lock:
            return [e.kind for e in self.seen if slot is None or e.slot == slot]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_slot_initializers_run_per_slot_and_again_in_a_replacement(kind):
    slots = [SlotSpec(init=(remember, (f"slot {i}",))) for i in range(2)]
    make = ProcessDispatcher if kind == "process" else ThreadDispatcher
    dispatcher = make(2, slots=slots)
    try:
        if kind == "thread":  # threads share the module: check the call order instead
            assert submit_call(dispatcher, recall, (), {}, slot=0).result(10)[0] in ("slot 0", "slot 1")
            return
        assert [submit_call(dispatcher, recall, (), {}, slot=i).result(10)[0] for i in range(2)] == \
            ["slot 0", "slot 1"]
        dispatcher.update_slot(1, SlotSpec(init=(remember, ("slot 1, restored",))))
        _, pid = submit_call(dispatcher, recall, (), {}, slot=1).result(10)
        os.kill(pid, signal.SIGKILL)
        assert not wait_gone({pid})
        assert wait_for(lambda: _replaced(dispatcher, 1, pid))
        assert submit_call(dispatcher, recall, (), {}, slot=1).result(10)[0] == "slot 1, restored"
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


@pytest.mark.timeout(60)
def test_lifecycle_events_reach_the_observer_in_order():
    events = Events()
    dispatcher = ProcessDispatcher(1, on_event=events)
    _, pid = submit_call(dispatcher, recall, (), {}).result(10)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: events.kinds().count("started") == 2)
    dispatcher.close()
    dispatcher.join(10)
    assert events.kinds() == ["started", "crashed", "restarting", "started", "stopped"]
    crashed = events.seen[1]
    assert crashed.pid == pid and crashed.exitcode == -signal.SIGKILL
    assert dispatcher.stats[0].crashes == 1 and dispatcher.stats[0].restarts == 1


@pytest.mark.timeout(60)
def test_restart_never_leaves_the_slot_empty_and_fails_its_pinned_work():
    events = Events()
    dispatcher = ProcessDispatcher(2, policy=RestartPolicy(restart="never"), on_event=events)
    try:
        with pytest.raises(WorkerCrashedError):
            submit_call(dispatcher, kill_self, (), {}, slot=0).result(10)
        assert wait_for(lambda: "failed" in events.kinds(0))
        assert dispatcher.live_slots() == [1]
        with pytest.raises(WorkerCrashedError):
            submit_call(dispatcher, recall, (), {}, slot=0).result(10)
        assert submit_call(dispatcher, recall, (), {}, slot=1).result(10)[1] > 0  # the other slot goes on
        with pytest.raises(WorkerCrashedError):
            submit_call(dispatcher, kill_self, (), {}, slot=1).result(10)
        assert wait_for(lambda: dispatcher.error is not None)
        assert "every worker slot is gone" in str(dispatcher.error)
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


@pytest.mark.timeout(60)
def test_restart_abnormal_restarts_a_crash_but_not_a_clean_exit():
    events = Events()
    dispatcher = ProcessDispatcher(1, policy=RestartPolicy(restart="abnormal"), on_event=events)
    try:
        with pytest.raises(WorkerCrashedError):
            submit_call(dispatcher, kill_self, (), {}).result(10)
        assert wait_for(lambda: events.kinds().count("started") == 2)
        with pytest.raises(WorkerCrashedError):
            submit_call(dispatcher, exit_zero, (), {}).result(10)
        assert wait_for(lambda: "failed" in events.kinds())
        assert dispatcher.live_slots() == []
    finally:
        dispatcher.terminate()
        dispatcher.join(10)
    with pytest.raises(ValueError, match="restart must be"):
        RestartPolicy(restart="sometimes")


@pytest.mark.timeout(60)
def test_slot_stats_count_items_latency_and_crashes():
    dispatcher = ProcessDispatcher(1)
    try:
        for _ in range(5):
            submit_call(dispatcher, recall, (), {}).result(10)
        stats = dispatcher.stats[0].to_dict()
        assert stats["calls"] == 5 and stats["chunks"] == 5 and stats["busy_s"] > 0
        assert 0 < stats["p50_s"] <= stats["p95_s"]
        assert dispatcher.queue_depth(0) == 0
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


def fail_slot_init() -> None:
    raise OSError("no model file")


@pytest.mark.timeout(60)
def test_work_waiting_on_a_failing_slot_initializer_gets_the_initializers_error():
    slots = [SlotSpec(init=(fail_slot_init, ()))]
    policy = RestartPolicy(max_restarts=1, restart_on_init_failure=True)
    dispatcher = ProcessDispatcher(1, slots=slots, policy=policy)
    try:
        with pytest.raises(BrokenPoolError) as caught:
            submit_call(dispatcher, recall, (), {}, slot=0).result(20)  # never ran: no WorkerCrashedError
        assert "initializer failed" in str(caught.value) and "no model file" in str(caught.value)
        assert isinstance(caught.value.__cause__, InitializerError)
    finally:
        dispatcher.terminate()
        dispatcher.join(10)


RELEASE = threading.Event()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process", "thread"])
def test_a_chunk_goes_to_an_idle_worker_rather_than_behind_a_busy_one(kind):
    dispatcher = ProcessDispatcher(2) if kind == "process" else ThreadDispatcher(2)
    try:
        for _ in range(3):  # both workers ran quick chunks: either may queue one behind another
            assert [f.result(10) for f in [submit_call(dispatcher, abs, (-i,), {}) for i in range(4)]] == [0, 1, 2, 3]
        blocked = submit_call(dispatcher, RELEASE.wait, (30,), {})
        assert wait_for(lambda: sum(len(w.chunks) for w in list(dispatcher._workers.values())) == 1)
        assert submit_call(dispatcher, abs, (-5,), {}).result(10) == 5  # not stuck behind the other
        assert not blocked.done()
    finally:
        RELEASE.set()
        dispatcher.terminate()
        dispatcher.join(10)
        RELEASE.clear()


@pytest.mark.timeout(60)
def test_a_frame_cut_off_by_ctrl_c_in_a_caller_costs_its_worker_not_the_pool():
    """A caller hands chunks to idle workers itself: Ctrl-C in the middle of a send
    leaves half a frame in the worker's pipe, so that worker is replaced, and the pool
    goes on."""
    import struct

    from twat_mp import ProcessPool

    with ProcessPool(nodes=1) as pool:
        first_pid = pool.submit(os.getpid).result(10)
        dispatcher = pool._dispatcher
        assert dispatcher is not None
        original = dispatcher._send

        def interrupted(worker, chunk):
            if threading.current_thread() is not threading.main_thread():
                return original(worker, chunk)
            dispatcher._send = original  # once
            worker.task_w._send(struct.pack("!i", 1000))  # a frame's length, and no frame
            raise KeyboardInterrupt

        dispatcher._send = interrupted
        assert wait_for(lambda: not dispatcher._state.locked())  # the manager waits: the caller sends
        with pytest.raises(KeyboardInterrupt):
            pool.submit(abs, -1)
        assert pool.submit(abs, -2).result(10) == 2
        assert pool.submit(os.getpid).result(10) != first_pid
