"""Task-graph throughput side by side with peers (``make bench`` runs it after faults.py).

The workload: a 3,999-task pairwise reduction tree of trivial ops. 2,000 leaves
(``leaf(i)`` returns i), then pairwise ``add`` up to one root (1,999 adds). Each run
builds the whole graph, then waits for the root and checks it equals sum(range(2000));
tasks/s = 3,999 / elapsed, graph building included.

Sides: twat-mp async ops (waited for with ``ref.result()``, and awaited from the caller's
event loop as ThinkAgain's are), thread, process and inline ops, all on one ``Runtime`` of
2 processes and 2 threads; ThinkAgain 0.3.0 async ops (``.go()``, ``await``); Dask
``dask.delayed`` on the threads and the processes schedulers (2 workers); Ray local
(``@ray.remote``, ``ray.get``, 2 CPUs). A side whose package is not installed is skipped
with a note. Every side is warmed first by one untimed run (pools,
Ray workers and Dask's process pool started and then reused, as ours are); then each
comparison interleaves its two sides, ours then the peer, for R rounds. Figures are medians;
a ratio is the median of the per-round ratios ours/peer (above 1: twat-mp is faster).

Last, the scheduler's memory per pending task: 20,000 ops waiting on one gate op that
does not finish until released, traced by tracemalloc (all threads) around building them.

    python benchmarks/graph.py            # R = 5 rounds (env GRAPH_BENCH_ROUNDS)
    python benchmarks/graph.py --quick    # or GRAPH_BENCH_QUICK=1: 1 round, 255 tasks, no Ray
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

# Process workers import the op functions from benchmarks/_graph_ops.py by name: twat-mp's
# forkserver and Dask's spawned workers take the parent's sys.path, Ray's take PYTHONPATH.
from run import importable_by_workers

importable_by_workers(__file__)

import _graph_ops as fns  # noqa: E402
from run import NODES, median_time, paired  # noqa: E402

QUICK = "--quick" in sys.argv[1:] or os.environ.get("GRAPH_BENCH_QUICK", "") not in ("", "0")
ROUNDS = 1 if QUICK else int(os.environ.get("GRAPH_BENCH_ROUNDS", "5"))
LEAVES = 128 if QUICK else 2000
TASKS = 2 * LEAVES - 1
EXPECTED = sum(range(LEAVES))
PENDING = 2_000 if QUICK else 20_000
MEMORY_TARGET = 2048  # bytes per pending task

Run = Callable[[], object]


class Skip(Exception):
    """A side left out of this run, with the reason."""


CLOSERS: list[Callable[[], object]] = []


def tree(leaf: Callable[[int], Any], add: Callable[[Any, Any], Any], leaves: int) -> Any:
    """Submit the pairwise reduction tree; return the root's handle (an odd one out is
    carried up a level). ``leaves - 1`` adds in all."""
    refs = [leaf(i) for i in range(leaves)]
    while len(refs) > 1:
        paired_up = [add(refs[k], refs[k + 1]) for k in range(0, len(refs) - 1, 2)]
        if len(refs) % 2:
            paired_up.append(refs[-1])
        refs = paired_up
    return refs[0]


def checked(run: Callable[[], int], name: str) -> Run:
    def run_and_check() -> None:
        value = run()
        if value != EXPECTED:
            raise AssertionError(f"{name}: root is {value!r}, expected {EXPECTED}")

    return run_and_check


# -- sides: each returns a run (build the tree, wait for the root, check it) ------------
def runtime() -> None:
    """Our ops run on a runtime of NODES processes and NODES threads, as the peers' sides."""
    from twat_mp import Runtime

    rt = Runtime(nodes=NODES, threads=NODES, name="graph-bench")
    rt.__enter__()
    CLOSERS.append(lambda: rt.__exit__(None, None, None))


def ours(kind: str) -> Run:
    from twat_mp import op

    if kind == "async":
        leaf, add = op(kind=kind)(fns.aleaf), op(kind=kind)(fns.aadd)
    else:
        leaf, add = op(kind=kind)(fns.leaf), op(kind=kind)(fns.add)
    return lambda: tree(leaf.go, add.go, LEAVES).result()


def ours_awaited() -> Run:
    """Async ops driven from the caller's own event loop (``await ref``), as ThinkAgain's are."""
    from twat_mp import op

    leaf, add = op(kind="async")(fns.aleaf), op(kind="async")(fns.aadd)
    run = on_loop()

    async def root() -> int:
        return await tree(leaf.go, add.go, LEAVES)  # type: ignore[no-any-return]

    return lambda: run(root)


def on_loop() -> Callable[[Callable[[], Awaitable[int]]], int]:
    """One event loop for all the rounds of a side (none started per round)."""
    loop = asyncio.new_event_loop()
    CLOSERS.append(loop.close)
    return lambda make: loop.run_until_complete(make())


def thinkagain_async() -> Run:
    import thinkagain

    leaf, add = thinkagain.op(fns.aleaf), thinkagain.op(fns.aadd)
    run = on_loop()

    async def root() -> int:
        return await tree(leaf.go, add.go, LEAVES)  # type: ignore[no-any-return]

    return lambda: run(root)


def dask_threads() -> Run:
    import dask

    leaf, add = dask.delayed(fns.leaf), dask.delayed(fns.add)
    return lambda: dask.compute(tree(leaf, add, LEAVES), scheduler="threads", num_workers=NODES)[0]


def dask_processes() -> Run:
    """Dask's own pool (spawn context, its worker initializer), made once and passed in:
    by default each compute() would start and stop one."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    import dask
    import dask.multiprocessing

    context = multiprocessing.get_context(dask.config.get("multiprocessing.context", "spawn"))
    pool = ProcessPoolExecutor(NODES, mp_context=context, initializer=partial(
        dask.multiprocessing.initialize_worker_process, user_initializer=None))
    CLOSERS.append(pool.shutdown)
    leaf, add = dask.delayed(fns.leaf), dask.delayed(fns.add)
    return lambda: dask.compute(tree(leaf, add, LEAVES), scheduler="processes", pool=pool)[0]


def ray_local() -> Run:
    import ray

    if QUICK:
        raise Skip("not in a quick run (starting Ray takes seconds)")
    ray.init(num_cpus=NODES, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    CLOSERS.append(ray.shutdown)
    leaf, add = ray.remote(fns.leaf), ray.remote(fns.add)
    return lambda: ray.get(tree(leaf.remote, add.remote, LEAVES))


SIDES: dict[str, Callable[[], Run]] = {
    "twat-mp async ops": lambda: ours("async"),
    "twat-mp async ops, awaited": ours_awaited,
    "ThinkAgain 0.3.0 async ops": thinkagain_async,
    "twat-mp thread ops": lambda: ours("thread"),
    "Dask delayed, threads": dask_threads,
    "twat-mp process ops": lambda: ours("process"),
    "Dask delayed, processes": dask_processes,
    "twat-mp inline ops": lambda: ours("inline"),
    "Ray local": ray_local,
}
# (ours, peer, target ratio ours/peer) from the issue
PAIRS = [("twat-mp async ops", "ThinkAgain 0.3.0 async ops", 1.5),
         ("twat-mp async ops, awaited", "ThinkAgain 0.3.0 async ops", 1.5),
         ("twat-mp thread ops", "Dask delayed, threads", 2.0),
         ("twat-mp process ops", "Dask delayed, processes", 3.0)]
ASYNC_TARGET = 60_000  # tasks/s


def start_sides() -> dict[str, Run]:
    """Make every side that can be made, and warm it with one untimed run."""
    try:
        runtime()
    except ImportError:
        print("  NOTE: twat_mp.op is missing (no task-graph layer in this twat-mp): all twat-mp rows are skipped")
    runs = {}
    for name, make in SIDES.items():
        try:
            run = checked(make(), name)
        except ImportError as exc:  # twat_mp.op before the graph layer, a peer not installed
            print(f"  skipped {name}: {type(exc).__name__}: {exc}")
            continue
        except Skip as exc:
            print(f"  skipped {name}: {exc}")
            continue
        start = time.perf_counter()
        run()
        print(f"  warmed {name} in {time.perf_counter() - start:.2f} s")
        runs[name] = run
    if "ThinkAgain 0.3.0 async ops" not in runs:
        print("  note: ThinkAgain 0.3.0 is not on the package registry; install the wheel with "
              "`pip install ../shared/peers/thinkagain-0.3.0-py3-none-any.whl` for its rows")
    return runs


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "MISS"


def measure(runs: dict[str, Run]) -> None:
    times: dict[str, float] = {}
    ratios: dict[tuple[str, str], float] = {}
    for mine, peer, _ in PAIRS:
        if mine in runs and peer in runs:
            times[mine], peer_time, ratios[mine, peer] = paired(runs[mine], runs[peer], ROUNDS)
            times.setdefault(peer, peer_time)  # a peer in two pairs: its figure from the first
    for name, run in runs.items():  # sides without their pair
        if name not in times:
            times[name] = median_time(run, repeat=ROUNDS)

    print(f"\n== task graph: {TASKS:,}-task pairwise reduction ({LEAVES:,} leaves, {LEAVES - 1:,} adds), "
          f"graph building included; median of {ROUNDS} round(s), {NODES} workers where a side has any")
    for name in SIDES:
        if name in times:
            print(f"  {name:<30} {TASKS / times[name]:>10,.0f} tasks/s   {times[name] * 1000:8.1f} ms")
        else:
            print(f"  {name:<30} {'skipped':>10}")
    print("  ratios ours/peer (median of per-round ratios of tasks/s), against the issue's targets:")
    for mine, peer, target in PAIRS:
        label = f"{mine.removeprefix('twat-mp ')} / {peer}"
        if (mine, peer) in ratios:
            ratio = ratios[mine, peer]
            print(f"  {label:<50} {ratio:6.2f}x  target >= {target}x  {verdict(ratio, target)}")
        else:
            print(f"  {label:<50}      —  target >= {target}x  (a side is skipped)")
    if "twat-mp async ops" in times:
        rate = TASKS / times["twat-mp async ops"]
        print(f"  {'async ops, absolute':<50} {rate:>7,.0f}  target >= {ASYNC_TARGET:,} tasks/s  "
              f"{verdict(rate, ASYNC_TARGET)}")


def traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def memory_ours() -> float:
    """Bytes per pending task: PENDING async ops on one thread-op gate, the refs held."""
    from twat_mp import get, op

    event = threading.Event()
    gate_op, add = op(kind="thread")(fns.wait_event), op(kind="async")(fns.aadd)
    tracemalloc.start()
    try:
        gate = gate_op.go(event)
        time.sleep(0.1)  # the gate is running
        before = traced_bytes()
        pending = [add.go(gate, i) for i in range(PENDING)]
        time.sleep(0.2)  # the runtime's loop thread has taken them in
        after = traced_bytes()
    finally:
        event.set()
        tracemalloc.stop()
    if get(pending) != list(range(PENDING)):
        raise AssertionError("twat-mp: wrong values after the gate opened")
    return (after - before) / PENDING


def memory_thinkagain() -> float:
    import thinkagain

    gate_op, add = thinkagain.op(fns.wait_async_event), thinkagain.op(fns.aadd)

    async def measure() -> float:
        event = asyncio.Event()
        tracemalloc.start()
        try:
            gate = gate_op.go(event)
            await asyncio.sleep(0.05)
            before = traced_bytes()
            pending = [add.go(gate, i) for i in range(PENDING)]
            await asyncio.sleep(0.05)
            after = traced_bytes()
        finally:
            event.set()
            tracemalloc.stop()
        if await asyncio.gather(*pending) != list(range(PENDING)):
            raise AssertionError("ThinkAgain: wrong values after the gate opened")
        return (after - before) / PENDING

    return asyncio.run(measure())


def memory() -> None:
    print(f"\n== scheduler memory per pending task: {PENDING:,} async ops waiting on one gate op "
          "(tracemalloc, all threads; the caller's refs included)")
    for name, measure_one in (("twat-mp", memory_ours), ("ThinkAgain 0.3.0 (reference)", memory_thinkagain)):
        try:
            per_task = measure_one()
        except ImportError as exc:
            print(f"  {name:<30} skipped: {type(exc).__name__}: {exc}")
            continue
        target = f"  target <= {MEMORY_TARGET:,} B  {'PASS' if per_task <= MEMORY_TARGET else 'MISS'}"
        print(f"  {name:<30} {per_task:8,.0f} B per pending task{target if name == 'twat-mp' else ''}")


def shutdown() -> None:
    for close in reversed(CLOSERS):
        close()
    try:
        from twat_mp import shutdown as shutdown_ours
    except ImportError:
        return
    shutdown_ours()


def main() -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {NODES} workers per pool"
          f"{', quick run' if QUICK else ''}")
    start = time.perf_counter()
    try:
        runs = start_sides()
        measure(runs)
        memory()
    finally:
        shutdown()
    print(f"\n{threading.active_count()} threads alive at the end; {time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
