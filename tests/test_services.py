"""Services: replicas on four executors, routing, backpressure, supervision (killed
replicas, restart strategies), checkpoints, events, metrics; real processes and torch."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import psutil
import pytest

from conftest import wait_gone
from twat_mp import (
    Mesh,
    ReplicaCrashedError,
    ResourceError,
    SerializationError,
    ServiceFailedError,
    ServiceOverloadedError,
    WorkerError,
    deploy,
    devices,
    get,
    idempotent,
    op,
    replica,
    runtime,
    service,
)

pytestmark = pytest.mark.timeout(90)


class Counter:
    """A plain class: the services below are made from it with different options."""

    def __init__(self, start=0):
        self.n = start

    def add(self, k=1):
        self.n += k
        return self.n

    async def aadd(self, k=1):
        await asyncio.sleep(0)
        self.n += k
        return self.n

    def pid(self):
        return os.getpid()

    def fail(self):
        raise KeyError("no such thing")

    def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    @idempotent
    def die_once(self, marker):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return "done"

    def __checkpoint__(self):
        return self.n

    def __restore__(self, n):
        self.n = n


class Gated:
    """One call at a time and one queued: a service that is full after two calls."""

    def __init__(self, gate):
        self.gate = gate

    def f(self, x):
        return x

    def wait(self):
        return self.gate.wait(30)


def full_service(handles):
    """A thread service with room for two calls, and the gate that holds its calls."""
    gate = threading.Event()
    handle = service(executor="thread", max_concurrency=1, queue_limit=1)(Gated).init(gate)
    handles.append(handle)
    return handle, gate


def make(**options):
    return service(**options)(Counter)


@pytest.fixture
def handles():
    made = []
    yield made
    for handle in made:
        handle.shutdown()


@pytest.mark.parametrize("executor", ["process", "thread", "async", "async-process"])
def test_every_executor_keeps_state_and_runs_sync_and_async_methods(handles, executor):
    handle = make(executor=executor).init(10)
    handles.append(handle)
    assert handle.add(1) == 11
    assert handle.aadd.go(2).result() == 13
    assert get([handle.add.go(1) for _ in range(5)])[-1] == 18
    with pytest.raises(KeyError):
        handle.fail()
    assert handle.add(0) == 18
    on_caller = handle.pid() == os.getpid()
    assert on_caller is (executor in ("thread", "async"))


def test_a_direct_call_is_awaitable_in_async_code(handles):
    handle = make(executor="process").init(0)
    handles.append(handle)

    async def main():
        return [await handle.add(1), await handle.aadd(1)]

    assert asyncio.run(main()) == [1, 2]

    async def gathered():  # through a generator expression and a lambda: still awaitables
        first = await asyncio.gather(*(handle.add(1) for _ in range(3)))
        second = await (lambda: handle.add(10))()
        return sorted(first), second

    assert asyncio.run(gathered()) == ([3, 4, 5], 15)

    def sync_helper():  # sync code gets the value, even while a loop runs in its thread
        return handle.add(100)

    async def calls_sync_helper():
        return sync_helper()

    assert asyncio.run(calls_sync_helper()) == 115


def test_service_refs_compose_with_ops(handles):
    handle = make(executor="thread").init(0)
    handles.append(handle)

    @op(kind="inline")
    def double(x):
        return 2 * x

    assert double.go(handle.add.go(double.go(5))).result() == 20


def test_calls_go_to_the_least_loaded_replicas(handles):
    handle = make(executor="process", replicas=2).init(0)
    handles.append(handle)
    pids = get([handle.pid.go() for _ in range(200)])
    assert len(set(pids)) == 2
    stats = handle.stats()
    assert [row["replica"] for row in stats] == [0, 1]
    assert sum(row["calls"] for row in stats) == 200 and all(row["calls"] > 0 for row in stats)
    assert all(row["p50_s"] is not None and row["p95_s"] >= row["p50_s"] for row in stats)


def test_torch_model_loaded_once_per_replica_gives_the_serial_results(handles):
    torch = pytest.importorskip("torch")

    @service(replicas=2, executor="process")
    class Linear:
        def __init__(self, seed):
            torch.manual_seed(seed)
            self.model = torch.nn.Linear(8, 3)
            self.loads = 1

        def infer(self, batch):
            with torch.no_grad():
                return self.model(batch)

        def loaded(self):
            return self.loads, os.getpid()

    handle = Linear.init(0)
    handles.append(handle)
    torch.manual_seed(0)
    serial_model = torch.nn.Linear(8, 3)
    batches = [torch.randn(4, 8) for _ in range(20)]
    results = get([handle.infer.go(b) for b in batches])
    with torch.no_grad():
        for got, batch in zip(results, batches):
            assert torch.allclose(got, serial_model(batch), atol=1e-6)
    loaded = get([handle.loaded.go() for _ in range(20)])
    assert {count for count, _ in loaded} == {1} and len({pid for _, pid in loaded}) == 2


# -- supervision -------------------------------------------------------------------------------
def test_a_killed_replica_is_restarted_and_a_non_idempotent_call_fails_naming_it(handles):
    handle = make(executor="process").init(5)
    handles.append(handle)
    events = []
    handle.on_event(lambda e: events.append((e.replica, e.kind)))
    first = handle.pid()
    with pytest.raises(ReplicaCrashedError) as caught:
        handle.die()
    error = caught.value
    assert (error.replica, error.pid, error.exitcode) == (0, first, -signal.SIGKILL)
    assert "die()" in str(error) and "idempotent" in str(error)
    assert handle.add(1) == 6  # restarted: __init__ ran again, from its cached arguments
    assert handle.pid() != first
    assert handle.stats()[0]["restarts"] == 1
    deadline = time.monotonic() + 10
    while (0, "started") not in events[events.index((0, "crashed")):] and time.monotonic() < deadline:
        time.sleep(0.01)
    crash = events.index((0, "crashed"))
    assert events[:2] == [(0, "starting"), (0, "started")]
    assert events[crash:crash + 3] == [(0, "crashed"), (0, "restarting"), (0, "started")]


def test_an_idempotent_call_of_a_killed_replica_is_re_run_and_every_call_succeeds(handles, tmp_path):
    handle = make(executor="process", replicas=2).init(0)
    handles.append(handle)
    marker = str(tmp_path / "marker")
    assert get([handle.die_once.go(marker) for _ in range(4)]) == ["done"] * 4  # one killed its replica
    assert len(get([handle.add.go(1) for _ in range(20)])) == 20  # and the service goes on


def test_idempotent_service_re_runs_every_call_of_a_killed_replica(handles):
    handle = make(executor="process", replicas=2, idempotent=True).init(0)
    handles.append(handle)
    victim = handle.pid()
    refs = [handle.add.go(1) for _ in range(100)]
    os.kill(victim, signal.SIGKILL)
    refs += [handle.add.go(1) for _ in range(100)]
    assert len(get(refs)) == 200  # none lost, none failed


def test_crashing_more_than_max_restarts_fails_the_service(handles):
    handle = make(executor="process", max_restarts=2, within_s=60, backoff_s=0.01).init(0)
    handles.append(handle)
    for _ in range(3):
        with pytest.raises((ReplicaCrashedError, ServiceFailedError)):
            handle.die()
    deadline = time.monotonic() + 10
    while handle.status != "failed" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.status == "failed"
    with pytest.raises(ServiceFailedError, match="failed"):
        handle.add(1)


def test_init_that_raises_ends_in_service_failed_error(handles):
    @service(executor="process", max_restarts=1, backoff_s=0.01)
    class Broken:
        def __init__(self):
            raise OSError("no model file")

        def run(self):
            return 1

    handle = Broken.init()
    handles.append(handle)
    with pytest.raises(ServiceFailedError) as caught:
        handle.run()
    assert "initializer failed" in str(caught.value) and "no model file" in str(caught.value)


def test_temporary_replicas_are_not_restarted(handles):
    handle = make(executor="process", replicas=2, restart="temporary").init(0)
    handles.append(handle)
    with pytest.raises(ReplicaCrashedError):
        handle.die()
    assert get([handle.add.go(1) for _ in range(10)])  # the other replica goes on
    assert [row["alive"] for row in handle.stats()].count(True) == 1


def test_checkpoint_is_restored_into_a_restarted_replica(handles):
    handle = make(executor="process", checkpoint_every=1).init(0)
    handles.append(handle)
    for _ in range(5):
        handle.add(1)
    with pytest.raises(ReplicaCrashedError):
        handle.die()
    assert handle.add(1) == 6  # the state after the last call before the crash, plus one


def test_async_replica_whose_init_fails_is_retried_then_fails(handles):
    attempts = []

    @service(executor="async", max_restarts=2, backoff_s=0.01)
    class Flaky:
        def __init__(self):
            attempts.append(1)
            raise RuntimeError("not yet")

        async def run(self):
            return 1

    handle = Flaky.init()
    handles.append(handle)
    with pytest.raises(ServiceFailedError):
        handle.run.go().result(timeout=20)
    assert len(attempts) == 3


# -- backpressure -------------------------------------------------------------------------------
def test_max_concurrency_bounds_the_calls_running_at_a_replica(handles):
    @service(executor="async", max_concurrency=3)
    class Meter:
        def __init__(self):
            self.running = self.most = 0

        async def work(self):
            self.running += 1
            self.most = max(self.most, self.running)
            await asyncio.sleep(0.01)
            self.running -= 1

        def peak(self):
            return self.most

    handle = Meter.init()
    handles.append(handle)
    get([handle.work.go() for _ in range(30)])
    assert handle.peak() == 3


def test_a_full_queue_blocks_or_refuses(handles):
    handle, gate = full_service(handles)
    first, second = handle.wait.go(), handle.wait.go()  # one running, one queued: full
    with pytest.raises(ServiceOverloadedError, match="queued"):
        handle.wait.go(block=False)
    blocked = []
    thread = threading.Thread(target=lambda: blocked.append(handle.wait.go()))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # waiting for room
    gate.set()
    thread.join(10)
    assert get([first, second, blocked[0]]) == [True, True, True]


# -- mesh, deploy, runtime ---------------------------------------------------------------------
def test_a_mesh_too_small_is_a_resource_error_at_deploy():
    with Mesh(devices("cpu")):
        with pytest.raises(ResourceError, match="needs 2 replica.*GPU.*the mesh has 0") as caught:
            make(replicas=2, gpus=1).init().deploy()
        assert (caught.value.need, caught.value.capacity, caught.value.resource) == (2, 0, "gpus")
        cores = devices("cpu")[0].capacity
        with pytest.raises(ResourceError, match="CPU"):
            make(replicas=cores + 1, cpus=1).init().deploy()


def test_runtime_deploys_on_entry_and_shutdown_leaves_no_process(handles):
    handle = make(executor="process", replicas=2).init(0)
    with runtime(handle) as rt:
        assert handle.status == "running"
        pids = set(get([handle.pid.go() for _ in range(50)]))
    assert rt.closed and handle.status == "stopped"
    assert not wait_gone(pids, within=10)
    with pytest.raises(ServiceFailedError):
        handle.add(1)
    mine = f"twat-mp-{os.getpid()}-"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(mine) and "shared" in n]
    assert not [c for c in psutil.Process().children() if c.pid in pids]


def test_replica_spelling_and_function_services():
    Deployed = replica(executor="thread")(Counter)
    handle = Deployed.deploy(3)
    try:
        assert Deployed.get() is handle and handle.add(1) == 4
    finally:
        Deployed.shutdown()
    with pytest.raises(ServiceFailedError, match="not deployed"):
        Deployed.get()

    @service(executor="thread")
    def shout(text):
        return text.upper()

    fn_handle = shout.init()
    try:
        assert fn_handle("hi") == "HI" and fn_handle.go("yo").result() == "YO"
        assert shout("direct") == "DIRECT"
    finally:
        fn_handle.shutdown()


def test_deploy_many_and_bad_options():
    one, two = make(executor="thread").init(1), make(executor="async").init(2)
    try:
        assert deploy(one, two) == [one, two] and one.status == two.status == "running"
    finally:
        one.shutdown()
        two.shutdown()
    with pytest.raises(ValueError, match="executor"):
        make(executor="gpu")
    with pytest.raises(ValueError, match="restart"):
        make(restart="sometimes")
    with pytest.raises(ValueError, match="replicas"):
        make(replicas=0)
    with pytest.raises(ValueError, match="gpus"):
        make(gpus=1, executor="thread")
    with pytest.raises(TypeError, match="unknown option"):
        service(replica=2)(Counter)
    with pytest.raises(AttributeError, match="no method"):
        make(executor="thread").init().nope  # noqa: B018


def test_transient_replicas_restart_after_a_crash_but_not_after_a_clean_exit(handles):
    @service(executor="process", replicas=2, restart="transient", backoff_s=0.01)
    class Exiting:
        def pid(self):
            return os.getpid()

        def crash(self):
            os.kill(os.getpid(), signal.SIGKILL)

        def leave(self):
            os._exit(0)

    handle = Exiting.init()
    handles.append(handle)
    events = []
    handle.on_event(lambda e: events.append((e.replica, e.kind)))
    with pytest.raises(ReplicaCrashedError):
        handle.crash()
    get([handle.pid.go() for _ in range(10)])
    with pytest.raises(ReplicaCrashedError):
        handle.leave()
    deadline = time.monotonic() + 10
    while [row["alive"] for row in handle.stats()].count(True) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [row["alive"] for row in handle.stats()].count(True) == 1  # the clean exit was not restarted
    assert handle.pid() > 0


def test_awaiting_a_full_service_waits_without_blocking_the_loop(handles):
    handle, gate = full_service(handles)
    held = [handle.wait.go(), handle.wait.go()]  # full

    async def main():
        ticks = 0
        waiting = asyncio.ensure_future(handle.wait())
        while not waiting.done() and ticks < 20:  # the loop keeps running meanwhile
            await asyncio.sleep(0.01)
            ticks += 1
        gate.set()
        return await waiting, ticks

    value, ticks = asyncio.run(main())
    assert value is True and ticks == 20
    assert get(held) == [True, True]


def test_mesh_nodes_and_bad_meshes():
    from twat_mp import MeshNode
    from twat_mp.mesh import current_mesh

    cpu = devices("cpu")[0]
    mesh = Mesh([MeshNode((cpu,), name="here")])
    assert mesh.devices == [cpu] and mesh.gpus == [] and mesh.cpus == cpu.capacity
    with mesh:
        assert current_mesh() is mesh
    assert current_mesh(gpus=False).cpus == cpu.capacity
    with pytest.raises(TypeError, match="Device and MeshNode"):
        Mesh(["cpu"])
    with pytest.raises(ValueError, match="at least one device"):
        Mesh([])
    with pytest.raises(TypeError, match="Device objects"):
        MeshNode(("cuda:0",))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="no CUDA device here")
def test_gpu_replicas_are_pinned_one_gpu_each(handles):
    @service(replicas=1, gpus=1, executor="process")
    class OnGPU:
        def where(self):
            import torch

            from twat_mp import current_device

            return os.environ.get("CUDA_VISIBLE_DEVICES"), str(current_device()), torch.cuda.device_count()

    handle = OnGPU.init()
    handles.append(handle)
    visible, device, count = handle.where()
    assert visible == str(devices("cuda")[0].index) and device == "cuda:0" and count == 1


# -- regressions from a review ---------------------------------------------------------------------
@pytest.mark.parametrize("restart, max_restarts", [("temporary", 0), ("permanent", 0), ("permanent", 2)])
def test_async_replica_init_failure_never_deadlocks_deploy(restart, max_restarts):
    @service(executor="async", restart=restart, max_restarts=max_restarts, backoff_s=0.01)
    class Broken:
        def __init__(self):
            raise RuntimeError("bad config")

        async def f(self):
            return 1

    handle = Broken.init()
    with pytest.raises(ServiceFailedError):
        handle.f.go().result(timeout=20)
    assert handle.status == "failed"


def test_async_method_raising_system_exit_fails_only_its_call(handles):
    import sys

    @service(executor="async")
    class Quitter:
        async def quit(self):
            sys.exit(3)

        def ok(self):
            return "ok"

    handle = Quitter.init()
    handles.append(handle)
    with pytest.raises(SystemExit):
        handle.quit.go().result(timeout=10)
    assert handle.ok() == "ok"

    @op(kind="inline")
    def one():
        return 1

    assert one.go().result(timeout=10) == 1  # the runtime's loop lives on


def test_room_comes_back_however_a_call_ends(handles):
    handle, gate = full_service(handles)

    @op(kind="inline")
    def boom():
        raise ValueError("no input")

    for _ in range(3):  # an input that failed
        with pytest.raises(Exception):  # noqa: B017 - OpError
            handle.f.go(boom.go()).result(timeout=10)
    blocker = handle.wait.go()
    pending = op(kind="thread")(gate.wait).go(30)
    waiting = handle.f.go(pending)  # waits on its input: cancel it
    assert waiting.cancel()
    gate.set()
    assert blocker.result(timeout=10) is True
    assert handle._room.free == handle._room.size
    assert handle.f(5) == 5


def test_cancelled_await_for_room_takes_none(handles):
    handle, gate = full_service(handles)
    held = [handle.wait.go(), handle.wait.go()]  # full

    async def impatient():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(handle.wait(), 0.1)

    asyncio.run(impatient())
    gate.set()
    assert get(held) == [True, True]
    deadline = time.monotonic() + 10
    while handle._room.free != handle._room.size and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle._room.free == handle._room.size


def test_a_full_service_from_the_runtimes_own_loop_is_overloaded_not_a_deadlock(handles):
    handle, gate = full_service(handles)

    @op
    async def fan_out():
        return [handle.wait.go() for _ in range(4)]

    with pytest.raises(ServiceOverloadedError, match="own loop"):
        fan_out.go().result(timeout=10)
    gate.set()


def test_shutdown_stops_running_calls_at_once(handles):
    @service(executor="process", replicas=2)
    class Slow:
        def sleep(self, seconds):
            time.sleep(seconds)

        def pid(self):
            return os.getpid()

    handle = Slow.init()
    pids = set(get([handle.pid.go() for _ in range(20)]))
    calls = [handle.sleep.go(30) for _ in range(3)]
    started = time.monotonic()
    handle.shutdown()
    assert time.monotonic() - started < 5
    for call in calls:
        with pytest.raises(ServiceFailedError, match="shut down"):
            call.result(timeout=10)
    assert not wait_gone(pids, within=10)


def test_in_process_instances_are_released_at_shutdown():
    import gc
    import weakref

    from twat_mp import services

    @service(executor="thread", replicas=2)
    class Holder:
        def __init__(self):
            self.data = bytearray(1 << 20)

        def me(self):
            return weakref.ref(self)

    handle = Holder.init()
    refs = get([handle.me.go() for _ in range(10)])
    handle.shutdown()
    gc.collect()
    assert all(r() is None for r in refs)
    assert not [key for key in services._instances if key[0] == handle._key]


def test_two_thread_services_run_async_methods_at_once(handles):
    @service(executor="thread")
    class Sleeper:
        async def nap(self, i):
            await asyncio.sleep(0.05)
            return i

    one, two = Sleeper.init(), Sleeper.init()
    handles += [one, two]
    refs = [h.nap.go(i) for i in range(4) for h in (one, two)]
    assert get(refs) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_one_unpicklable_argument_or_result_fails_only_its_call(handles):
    @service(executor="process")
    class Echo:
        def echo(self, x):
            return x

        def gen(self):
            return (i for i in range(3))

    handle = Echo.init()
    handles.append(handle)
    refs = [handle.echo.go(i) for i in range(3)] + [handle.echo.go(i for i in range(3))] + \
        [handle.echo.go(i) for i in range(3, 6)]
    assert [r.exception(timeout=20) is None for r in refs] == [True] * 3 + [False] + [True] * 3
    assert isinstance(refs[3].exception(), SerializationError)
    refs = [handle.echo.go(1), handle.gen.go(), handle.echo.go(2)]
    assert refs[0].result(timeout=20) == 1 and refs[2].result(timeout=20) == 2
    with pytest.raises(SerializationError, match="result"):
        refs[1].result(timeout=20)


def test_a_methods_error_names_the_call_not_internals(handles):
    @service(executor="process")
    class Raiser:
        def boom(self, x):
            class Local(Exception):  # its class cannot be found by name in the caller
                pass

            raise Local(f"bad {x}")

    handle = Raiser.init()
    handles.append(handle)
    with pytest.raises(WorkerError) as caught:
        handle.boom(7)
    assert str(caught.value).startswith("bad 7") and caught.value.input_item == (7,)  # the call, not _invoke's


def test_a_replica_with_two_gpus_sees_both_and_meshes_work_in_threads():
    from twat_mp import Device
    from twat_mp.hardware import slot_env

    fake = [Device("cuda", i, f"gpu {i}", 1 << 34, 100) for i in range(4)]
    mesh = Mesh(fake)
    groups = mesh.place("big", 2, 2, None)
    assert groups == [tuple(fake[:2]), tuple(fake[2:])]
    env = dict(slot_env(groups[1][0], 1, groups[1][1:]))
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["TWAT_MP_DEVICE"] == "cuda:2"
    with pytest.raises(ResourceError):
        mesh.place("bigger", 3, 2, None)
    errors = []
    barrier = threading.Barrier(2)

    def use(seconds):
        try:
            with mesh:
                barrier.wait(5)
                time.sleep(seconds)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use, args=(s,)) for s in (0.05, 0.15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
