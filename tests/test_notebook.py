"""Notebooks are a first-class use: a real Jupyter kernel (nbclient + ipykernel, run by
this very virtualenv's python) executes cells that define functions, constants, lambdas
and closures and map them in worker processes.

Each notebook starts with a prelude cell that defines ``emit(**values)``; cells
``assert`` what they compute and ``emit`` it as one ``RESULT {json}`` line on stdout,
which the test reads back from the cell outputs and checks again. After the kernel is
shut down, no process it started (workers of closed pools, of the warm pools, of the
async pools) may be left running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import sys
import textwrap
import threading
import time
from typing import Any, Callable

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

KERNEL_NAME = "twat-mp-test-venv"
CELL_TIMEOUT = 90  # seconds per cell (nbclient's ``timeout``)
STARTUP_TIMEOUT = 60

PRELUDE = """\
import json, os, sys

def emit(**values):
    print("RESULT " + json.dumps(values), flush=True)

emit(exe=sys.executable, kernel_pid=os.getpid())
"""


def cell(source: str) -> str:
    return textwrap.dedent(source).strip("\n")


@pytest.fixture
def kernel_name(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec, in a temporary Jupyter data dir, that runs this interpreter by its
    absolute path (not whatever ``python`` a stock kernelspec resolves to)."""
    data_dir = tmp_path / "jupyter-data"
    spec_dir = data_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "twat-mp test venv",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(data_dir))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    return KERNEL_NAME


@dataclasses.dataclass
class KernelRun:
    results: dict[str, Any]            # every emitted RESULT, merged
    kernel_pid: int
    processes: list[psutil.Process]    # the kernel and every process it started that we saw
    returncode: int | None             # the kernel's exit status (None: unknown)
    shutdown_seconds: float


def emitted(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(o.get("text", "") for o in outputs
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")
    merged: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            merged.update(json.loads(line[len("RESULT "):]))
    return merged


def processes_of(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(psutil.Process(pid))
    return found


def run_notebook(cells: list[str], kernel_name: str, workdir: pathlib.Path, *,
                 background: Callable[[psutil.Process], None] | None = None) -> KernelRun:
    """Run PRELUDE + ``cells`` in a fresh kernel; shut it down; report what happened.

    ``background(kernel)`` runs in a thread while the cells execute (to interrupt the
    kernel as Jupyter does)."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in [PRELUDE, *cells]]
    client = NotebookClient(notebook, kernel_name=kernel_name, timeout=CELL_TIMEOUT,
                            startup_timeout=STARTUP_TIMEOUT, resources={"metadata": {"path": str(workdir)}})
    results: dict[str, Any] = {}
    seen: list[psutil.Process] = []
    popen = None
    with client.setup_kernel():
        popen = getattr(getattr(client.km, "provisioner", None), "process", None)
        for index, nb_cell in enumerate(notebook.cells):
            client.execute_cell(nb_cell, index)  # raises CellExecutionError if the cell raised
            values = emitted(nb_cell.outputs)
            results.update(values)
            if index == 0:
                kernel = psutil.Process(values["kernel_pid"])
                assert kernel.ppid() == os.getpid(), "the kernel is not a child of this test"
                seen.append(kernel)
                if background is not None:
                    threading.Thread(target=background, args=(kernel,), daemon=True).start()
            # processes named by the cell (worker pids), while they can still be looked up
            seen += processes_of([pid for key, value in values.items() if key.endswith("pids") for pid in value])
        seen += kernel.children(recursive=True)  # warm pools still running at shutdown
        started = time.monotonic()
    shutdown_seconds = time.monotonic() - started
    returncode = popen.poll() if popen is not None else None
    return KernelRun(results, kernel.pid, seen, returncode, shutdown_seconds)


def running(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Those of ``processes`` still running (not exited, not a zombie) after ``within`` s."""
    deadline = time.monotonic() + within
    alive = list(processes)
    while True:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    try:  # is_running() compares the start time too, so a reused pid is not "running"
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(run: KernelRun) -> None:
    left = running(run.processes, within=15.0)
    for process in left:  # never leave them behind, even when the test fails
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert left == [], f"processes outlived the kernel: {left}"


# -- functions, constants, lambdas and closures defined in cells -----------------------

MAP_CELLS = [
    cell("""
        from twat_mp import ProcessPool, amap, imap, pmap
        import time
    """),
    cell("""
        OFFSET = 10  # a constant from an earlier cell, used by a function of a later one
    """),
    cell("""
        def cube(x):
            return x ** 3

        def shifted(x):
            return cube(x) + OFFSET

        def make_scaler(factor):
            def scale(x):
                return x * factor
            return scale

        def worker_pid(_):
            time.sleep(0.05)  # long enough that every worker takes some items
            return os.getpid()
    """),
    cell("""
        with ProcessPool(nodes=2) as pool:
            result = pool.map(cube, range(6))
            shifted_result = pool.map(shifted, range(3))
            pool_pids = sorted(set(pool.map(worker_pid, range(8), chunksize=1)))
        assert result == [0, 1, 8, 27, 64, 125], result
        assert shifted_result == [10, 11, 18], shifted_result
        assert os.getpid() not in pool_pids
        emit(cubes=result, shifted=shifted_result, pool_pids=pool_pids)
    """),
    cell("""
        @pmap
        def square(x):
            return x * x

        squares = square(range(5))
        with ProcessPool(nodes=2) as pool:
            lambdas = pool.map(lambda x: x * 2 + OFFSET, range(3))
            closures = pool.map(make_scaler(3), [1, 2, 3])
        pmap_lambda = pmap(lambda x: -x)([1, 2])
        pmap_closure = pmap(make_scaler(5))([1, 2])
        lazy = list(imap(cube)(iter(range(4))))
        collected = amap(shifted)([1, 2])
        nested = pmap(lambda n: sum(square(range(n))))([3, 4])  # calls a @pmap function in a worker
        assert squares == [0, 1, 4, 9, 16], squares
        assert lambdas == [10, 12, 14], lambdas
        assert closures == [3, 6, 9], closures
        assert (pmap_lambda, pmap_closure) == ([-1, -2], [5, 10]), (pmap_lambda, pmap_closure)
        assert lazy == [0, 1, 8, 27], lazy
        assert collected == [11, 18], collected
        assert nested == [5, 14], nested
        emit(squares=squares, lambdas=lambdas, closures=closures, pmap_lambda=pmap_lambda,
             pmap_closure=pmap_closure, lazy=lazy, collected=collected, nested=nested)
    """),
    cell("""
        # the warm pool of @pmap and a pool kept open across cells both exist from here on
        warm_pids = sorted(set(pmap(chunksize=1)(worker_pid)(range(8))))
        persistent = ProcessPool(nodes=2)
        persistent.__enter__()
        persistent_pids = sorted(set(persistent.map(worker_pid, range(8), chunksize=1)))
        shift_before = pmap(shifted)([1, 2])
        persistent_before = persistent.map(shifted, [1, 2])
        assert shift_before == persistent_before == [11, 18], (shift_before, persistent_before)
        emit(shift_before=shift_before, persistent_before=persistent_before,
             warm_pids=warm_pids, persistent_pids=persistent_pids)
    """),
    cell("""
        OFFSET = 100  # redefined after the workers exist: functions are pickled anew each call
    """),
    cell("""
        shift_after = pmap(shifted)([1, 2])
        persistent_after = persistent.map(shifted, [1, 2])
        assert shift_after == persistent_after == [101, 108], (shift_after, persistent_after)
        emit(shift_after=shift_after, persistent_after=persistent_after)
    """),
    cell("""
        def cube(x):  # a function redefined after the workers exist
            return -x

        redefined = pmap(shifted)([1, 2])
        persistent_redefined = persistent.map(shifted, [1, 2])
        assert redefined == persistent_redefined == [99, 98], (redefined, persistent_redefined)
        # the same workers served every call: nothing was restarted to see the new values
        warm_pids_after = sorted(set(pmap(chunksize=1)(worker_pid)(range(8))))
        persistent_pids_after = sorted(set(persistent.map(worker_pid, range(8), chunksize=1)))
        assert set(warm_pids_after) <= set(warm_pids), (warm_pids, warm_pids_after)
        assert set(persistent_pids_after) <= set(persistent_pids), (persistent_pids, persistent_pids_after)
        persistent.__exit__(None, None, None)
        emit(redefined=redefined, persistent_redefined=persistent_redefined,
             warm_pids_after=warm_pids_after, persistent_pids_after=persistent_pids_after)
    """),
]


@pytest.mark.timeout(180)
def test_functions_defined_in_cells_map_in_worker_processes(kernel_name, tmp_path):
    run = run_notebook(MAP_CELLS, kernel_name, tmp_path)
    result = run.results
    assert result["exe"] == sys.executable  # the kernel runs this very virtualenv
    assert result["cubes"] == [0, 1, 8, 27, 64, 125]
    assert result["shifted"] == [10, 11, 18]
    assert result["squares"] == [0, 1, 4, 9, 16]
    assert result["lambdas"] == [10, 12, 14]
    assert result["closures"] == [3, 6, 9]
    assert result["pmap_lambda"] == [-1, -2]
    assert result["pmap_closure"] == [5, 10]
    assert result["lazy"] == [0, 1, 8, 27]
    assert result["collected"] == [11, 18]
    assert result["nested"] == [5, 14]
    assert result["shift_before"] == result["persistent_before"] == [11, 18]
    assert result["shift_after"] == result["persistent_after"] == [101, 108]
    assert result["redefined"] == result["persistent_redefined"] == [99, 98]
    workers = set(result["pool_pids"]) | set(result["warm_pids"]) | set(result["persistent_pids"])
    assert run.kernel_pid not in workers
    assert len(result["warm_pids"]) == len(result["persistent_pids"]) == 2
    assert_nothing_left(run)


# -- @apmap: the kernel's event loop is running, so cells can `await` at top level ------

APMAP_CELLS = [
    cell("""
        import asyncio
        from twat_mp import apmap
        SCALE = 10
    """),
    cell("""
        @apmap
        async def get(x):
            await asyncio.sleep(0.01)
            return x * SCALE

        async def pid_of(_):
            await asyncio.sleep(0.01)
            return os.getpid()

        def make_adder(k):
            async def add(x):
                return x + k
            return add
    """),
    cell("""
        result = await get(range(5))  # top-level await: no asyncio.run in a notebook
        assert result == [0, 10, 20, 30, 40], result
        emit(result=result)
    """),
    cell("""
        again = await get([5, 6])  # the warm async pool of the kernel's loop, reused
        closure = await apmap(make_adder(7))([1, 2])
        apmap_pids = sorted(set(await apmap(pid_of)(range(20))))
        assert again == [50, 60], again
        assert closure == [8, 9], closure
        assert os.getpid() not in apmap_pids
        emit(again=again, closure=closure, apmap_pids=apmap_pids)
    """),
    cell("""
        SCALE = 100  # redefined after the async workers exist
        rescaled = await get([1, 2])
        assert rescaled == [100, 200], rescaled
        emit(rescaled=rescaled)
    """),
    cell("""
        # no await in this cell: .sync() runs the map while the kernel's loop is running
        synced = get.sync([3, 4])
        assert synced == [300, 400], synced
        emit(synced=synced)
    """),
]


@pytest.mark.timeout(180)
def test_apmap_with_top_level_await_in_a_notebook(kernel_name, tmp_path):
    run = run_notebook(APMAP_CELLS, kernel_name, tmp_path)
    result = run.results
    assert result["exe"] == sys.executable
    assert result["result"] == [0, 10, 20, 30, 40]
    assert result["again"] == [50, 60]
    assert result["closure"] == [8, 9]
    assert result["rescaled"] == [100, 200]
    assert result["synced"] == [300, 400]
    assert run.kernel_pid not in result["apmap_pids"]
    assert_nothing_left(run)


# -- interrupting the kernel, as Jupyter's "Interrupt" does --------------------------

def interrupt_when(marker: pathlib.Path, delay: float) -> Callable[[psutil.Process], None]:
    """Once ``marker`` exists, wait ``delay`` s and send SIGINT to the kernel's process
    group: what jupyter_client's interrupt does (its workers receive it too)."""

    def background(kernel: psutil.Process) -> None:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(kernel.pid), signal.SIGINT)

    return background


@pytest.mark.timeout(180)
def test_interrupting_a_map_in_a_notebook_leaves_a_working_kernel(kernel_name, tmp_path):
    marker = tmp_path / "map-started"
    cells = [
        cell("""
            import pathlib, time
            from twat_mp import pmap

            def slow(x):
                time.sleep(0.1)
                return os.getpid()

            before_pids = sorted(set(pmap(chunksize=1)(slow)(range(8))))
            emit(before_pids=before_pids)
        """),
        cell(f"""
            started = time.monotonic()
            try:
                pathlib.Path({str(marker)!r}).touch()
                pmap(chunksize=1)(slow)(range(1000))  # 50 s of work: interrupted long before
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
            assert interrupted
            emit(interrupted=interrupted, seconds_to_interrupt=time.monotonic() - started)
        """),
        cell("""
            after_pids = sorted(set(pmap(chunksize=1)(slow)(range(8))))
            assert len(after_pids) == 2, after_pids
            emit(after_pids=after_pids)
        """),
    ]
    run = run_notebook(cells, kernel_name, tmp_path, background=interrupt_when(marker, 0.5))
    assert run.results["interrupted"] is True
    assert run.results["seconds_to_interrupt"] < 10.0
    assert len(run.results["after_pids"]) == 2
    assert_nothing_left(run)


# -- shutting the kernel down -------------------------------------------------------

WARM_POOL_CELL = cell("""
    from twat_mp import pmap, shutdown_warm_pools
    warm = pmap(abs)(range(-3, 3))
    assert warm == [3, 2, 1, 0, 1, 2], warm
""")


@pytest.mark.timeout(120)
def test_kernel_exits_cleanly_once_the_warm_pools_are_shut_down(kernel_name, tmp_path):
    run = run_notebook([WARM_POOL_CELL, "shutdown_warm_pools()"], kernel_name, tmp_path)
    assert run.returncode == 0, (  # exited by itself: not terminated by jupyter_client
        f"the kernel was killed (returncode {run.returncode}) after {run.shutdown_seconds:.1f} s")
    assert_nothing_left(run)


@pytest.mark.timeout(120)
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "BUG: on shutdown/restart ipykernel SIGTERMs the processes of its group "
    "(Kernel._progressively_terminate_all_children); the warm @pmap pool's manager "
    "thread replaces every worker killed that way, so the kernel always has children, "
    "never exits by itself, and jupyter_client SIGTERMs it after shutdown_wait_time/2 "
    "(~2.5 s; returncode -15, atexit handlers such as shutdown_warm_pools never run)"))
def test_kernel_with_a_warm_pool_exits_by_itself_on_shutdown(kernel_name, tmp_path):
    # (that no worker outlives the kernel even then is checked by the tests above, which
    # also leave warm pools running at shutdown)
    run = run_notebook([WARM_POOL_CELL], kernel_name, tmp_path)
    assert run.returncode == 0, (
        f"the kernel was killed (returncode {run.returncode}) after {run.shutdown_seconds:.1f} s")


ERROR_CLASS_CELLS = [
    "from twat_mp import ProcessPool, WorkerError",
    "class CellError(Exception):\n"
    "    def __init__(self, code):\n"
    "        super().__init__(f'code {code}')\n"
    "        self.code = code\n\n"
    "def fail(x):\n"
    "    raise CellError(x)",
    "result = {}\n"
    "with ProcessPool(nodes=1) as pool:\n"
    "    try:\n"
    "        pool.map(fail, [7])\n"
    "    except CellError as exc:\n"
    "        result = {'code': exc.code, 'both': isinstance(exc, WorkerError), 'args': list(exc.args)}\n"
    "emit(caught=result)",
]


@pytest.mark.timeout(240)
def test_an_exception_class_defined_in_a_cell_is_caught_by_its_own_name(kernel_name, tmp_path):
    run = run_notebook(ERROR_CLASS_CELLS, kernel_name, tmp_path)
    assert run.results["caught"] == {"code": 7, "both": True, "args": ["code 7"]}
    assert_nothing_left(run)


# -- task graphs: refs without await, in cells whose own loop is running ----------------

GRAPH_CELLS = [
    cell("""
        import asyncio, os
        from twat_mp import OpError, get, op, shutdown

        @op(kind="process")
        def square(x):
            return x * x

        @op
        async def slow_plus(x, y):
            await asyncio.sleep(0.01)
            return x + y

        @op(kind="inline")
        def collect(*parts):
            return list(parts)

        class CellError(Exception):
            pass

        @op(kind="process")
        def fails(x):
            raise CellError(f"cell {x}")

        @op(kind="process")
        def pid(_):
            return os.getpid()
    """),
    cell("""
        refs = [slow_plus.go(square.go(i), 1) for i in range(5)]
        emit(sync=collect.go(*refs).result(timeout=60), graph_pids=get([pid.go(i) for i in range(4)]))
    """),
    cell("""
        emit(awaited=await collect.go(*[square.go(i) for i in range(3)]))
    """),
    cell("""
        try:
            collect.go(fails.go(1)).result(timeout=60)
        except OpError as exc:
            emit(op=exc.op, chain=exc.chain, caught_cell_error=isinstance(exc.__cause__, CellError))
        try:
            fails.go(2).result(timeout=60)
        except CellError as exc:
            emit(own=str(exc))
    """),
    cell("""
        shutdown()
        emit(after_shutdown=square.go(7).result(timeout=60))
        shutdown()
    """),
]


def test_refs_in_notebook_cells_without_await(kernel_name, tmp_path):
    run = run_notebook(GRAPH_CELLS, kernel_name, tmp_path)
    result = run.results
    assert result["sync"] == [1, 2, 5, 10, 17]
    assert result["awaited"] == [0, 1, 4]
    assert result["op"] == "fails" and result["chain"] == ["fails", "collect"] and result["caught_cell_error"]
    assert result["own"].startswith("cell 2")
    assert result["after_shutdown"] == 49
    assert run.kernel_pid not in result["graph_pids"]
    assert_nothing_left(run)


SERVICE_CELLS = [
    cell("""
        import os
        from twat_mp import service, shutdown

        class CellError(Exception):
            pass

        @service(replicas=2, executor="process")
        class Model:
            def __init__(self, k):
                self.k = k
            def predict(self, x):
                if x < 0:
                    raise CellError(f"negative {x}")
                return self.k * x
            def pid(self):
                return os.getpid()

        model = Model.init(3)
    """),
    cell("""
        emit(direct=model.predict(2), refs=[r.result(timeout=60) for r in [model.predict.go(i) for i in range(4)]],
             service_pids=sorted({model.pid() for _ in range(20)}))
    """),
    cell("""
        emit(awaited=await model.predict(5))
    """),
    cell("""
        try:
            model.predict(-1)
        except CellError as exc:
            emit(caught=str(exc))
        shutdown()
        emit(status=model.status)
    """),
]


def test_a_service_class_defined_in_a_cell(kernel_name, tmp_path):
    run = run_notebook(SERVICE_CELLS, kernel_name, tmp_path)
    result = run.results
    assert result["direct"] == 6 and result["refs"] == [0, 3, 6, 9] and result["awaited"] == 15
    assert result["caught"].startswith("negative -1") and result["status"] == "stopped"
    assert run.kernel_pid not in result["service_pids"]
    assert_nothing_left(run)
