"""Stateful services side by side with Ray actors and ThinkAgain's services (``make bench``
runs it after devices.py).

Workloads, from the issue:

1. pipelined throughput: N calls of a trivial method (``inc``) issued without waiting,
   then all waited for, on one process replica (``h.inc.go(1)``) against a warm Ray actor
   (``actor.inc.remote(1)``, ``ray.get`` of the list; Ray local, 2 CPUs); calls/s.
   Thread and async-process executors as reference rows.
2. sequential round trip: calls one after another (``h.inc(1)`` against
   ``ray.get(actor.inc.remote(1))``); the median per-call latency.
3. the async executor against ThinkAgain 0.3.0's local ``@service`` (``.init()``,
   ``.go()``), both called from a coroutine on an event loop (``await``): pipelined
   (``asyncio.gather`` of N ``.go()`` refs) and sequential (``await h.ainc(1)``).
4. scaling: 200 calls of a ~5 ms pure-Python method, pipelined, on ``replicas=1`` against
   ``replicas=2`` (process executor).

Every side is warmed first (replicas and actors started, one untimed round); then the
sides of a workload run interleaved, one after the other in each of R rounds. Figures are
medians over the rounds; a ratio is the median of the per-round ratios (above 1: twat-mp is
faster). The machine may be shared and noisy: read medians and ratios.

    python benchmarks/services.py            # R = 5 rounds (env SERVICES_BENCH_ROUNDS)
    python benchmarks/services.py --quick    # or SERVICES_BENCH_QUICK=1: 1 round, fewer calls
"""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

# Process replicas and Ray's actor workers import the classes from
# benchmarks/_services_ops.py by name: twat-mp's forkserver takes the parent's sys.path,
# Ray's workers take PYTHONPATH.
from run import importable_by_workers

importable_by_workers(__file__)

import _services_ops as ops  # noqa: E402
from run import NODES  # noqa: E402

QUICK = "--quick" in sys.argv[1:] or os.environ.get("SERVICES_BENCH_QUICK", "") not in ("", "0")
ROUNDS = 1 if QUICK else int(os.environ.get("SERVICES_BENCH_ROUNDS", "5"))
PIPELINED = 1_000 if QUICK else 5_000
SEQUENTIAL = 300 if QUICK else 2_000
BUSY_CALLS = 40 if QUICK else 200

# targets from the issue
PIPELINED_TARGET = 10_000  # calls/s, process executor
PIPELINED_RAY_TARGET = 5.0  # x Ray
LATENCY_TARGET = 0.3e-3  # s per sequential call, process executor
THINKAGAIN_TARGET = 2.0  # x ThinkAgain, async executor
SCALING_TARGET = 1.7  # replicas=2 / replicas=1

Run = Callable[[], float]  # one timed round of a side: returns its figure in seconds
CLOSERS: list[Callable[[], object]] = []


class Skip(Exception):
    """A side left out of this run, with the reason."""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- ways to run a side -------------------------------------------------------------------
def elapsed(run: Callable[[], object]) -> Run:
    """A round's figure: the time the whole round took."""

    def timed() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    return timed


def latency(call: Callable[[], object], calls: int) -> Run:
    """A round's figure: the median time of ``calls`` calls made one after another."""

    def timed() -> float:
        clock = time.perf_counter
        times = []
        for _ in range(calls):
            start = clock()
            call()
            times.append(clock() - start)
        return statistics.median(times)

    return timed


def on_loop(make: Callable[[], Awaitable[float]]) -> Run:
    """Run a coroutine per round on one event loop kept for all the rounds of the side
    (the caller's own loop, as an async application has; none started per round)."""
    loop = asyncio.new_event_loop()
    CLOSERS.append(loop.close)
    return lambda: loop.run_until_complete(make())


def pipelined_async(go: Callable[[], Awaitable[Any]], calls: int) -> Run:
    async def timed() -> float:
        start = time.perf_counter()
        await asyncio.gather(*[go() for _ in range(calls)])
        return time.perf_counter() - start

    return on_loop(timed)


def latency_async(call: Callable[[], Awaitable[Any]], calls: int) -> Run:
    async def timed() -> float:
        clock = time.perf_counter
        times = []
        for _ in range(calls):
            start = clock()
            await call()
            times.append(clock() - start)
        return statistics.median(times)

    return on_loop(timed)


# -- sides -------------------------------------------------------------------------------
def ours(cls: Any, *args: Any) -> Any:
    """A deployed handle of one of the twat-mp service classes in _services_ops."""
    if cls is None:
        raise Skip("twat_mp.service is missing (no services layer in this twat-mp)")
    handle = cls.init(*args)
    handle.deploy()
    CLOSERS.append(handle.shutdown)
    return handle


def wait_all(refs: list[Any]) -> list[Any]:
    return [ref.result() for ref in refs]


def ours_pipelined(cls: Any) -> Run:
    handle = ours(cls, 0)
    return elapsed(lambda: wait_all([handle.inc.go(1) for _ in range(PIPELINED)]))


def ours_sequential(cls: Any) -> Run:
    handle = ours(cls, 0)
    return latency(lambda: handle.inc(1), SEQUENTIAL)


def ours_async_pipelined() -> Run:
    handle = ours(ops.AsyncExecCounter, 0)
    return pipelined_async(lambda: handle.ainc.go(1), PIPELINED)


def ours_async_sequential() -> Run:
    handle = ours(ops.AsyncExecCounter, 0)
    return latency_async(lambda: handle.ainc(1), SEQUENTIAL)


def ours_busy(cls: Any) -> Run:
    handle = ours(cls)
    return elapsed(lambda: wait_all([handle.work.go() for _ in range(BUSY_CALLS)]))


RAY: dict[str, Any] = {}


def ray_actor() -> Any:
    """A warm Ray actor (Ray local, NODES CPUs), one per side."""
    import ray

    if not RAY:
        ray.init(num_cpus=NODES, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        CLOSERS.append(ray.shutdown)
        RAY["class"] = ops.ray_counter()
    actor = RAY["class"].remote(0)
    ray.get(actor.inc.remote(1))  # started
    return actor


def ray_pipelined() -> Run:
    import ray

    actor = ray_actor()
    return elapsed(lambda: ray.get([actor.inc.remote(1) for _ in range(PIPELINED)]))


def ray_sequential() -> Run:
    import ray

    actor = ray_actor()
    return latency(lambda: ray.get(actor.inc.remote(1)), SEQUENTIAL)


def thinkagain_handle() -> Any:
    return ops.thinkagain_counter().init(0)  # type: ignore[attr-defined]


def thinkagain_pipelined() -> Run:
    handle = thinkagain_handle()
    return pipelined_async(lambda: handle.ainc.go(1), PIPELINED)


def thinkagain_sequential() -> Run:
    handle = thinkagain_handle()
    return latency_async(lambda: handle.ainc(1), SEQUENTIAL)


# -- measuring -----------------------------------------------------------------------------
def start(sides: dict[str, Callable[[], Run]]) -> dict[str, Run]:
    """Make every side that can be made, and warm it with one untimed round."""
    runs = {}
    for name, make in sides.items():
        try:
            run = make()
        except ImportError as exc:  # a peer not installed
            print(f"  SKIP {name}: {type(exc).__name__}: {exc}")
            continue
        except Skip as exc:
            print(f"  SKIP {name}: {exc}")
            continue
        begin = time.perf_counter()
        run()
        print(f"  warmed {name} in {time.perf_counter() - begin:.2f} s")
        runs[name] = run
    return runs


def interleave(runs: dict[str, Run]) -> dict[str, list[float]]:
    """R rounds; in each, every side once, in order. Each side's figure per round."""
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            gc.collect()
            figures[name].append(run())
    return figures


def ratio(figures: dict[str, list[float]], mine: str, peer: str) -> float | None:
    """Median of the per-round ratios peer/ours of the seconds (above 1: ours is faster)."""
    if mine not in figures or peer not in figures:
        return None
    return statistics.median(p / o for o, p in zip(figures[mine], figures[peer], strict=True))


def table(sides: dict[str, Callable[[], Run]], figures: dict[str, list[float]], show: Callable[[float], str]) -> None:
    for name in sides:
        if name in figures:
            print(f"  {name:<36} {show(statistics.median(figures[name]))}")
        else:
            print(f"  {name:<36} {'SKIP':>14}")


def target_row(label: str, value: float | None, target: str, ok: Callable[[float], bool], unit: str = "x") -> None:
    if value is None:
        print(f"  {label:<44} {'—':>9}    target {target}  SKIP (a side is skipped)")
    else:
        shown = f"{value:8.2f}{unit}" if unit == "x" else f"{value:>9,.0f}"
        print(f"  {label:<44} {shown}    target {target}  {verdict(ok(value))}")


def rate(calls: int) -> Callable[[float], str]:
    return lambda seconds: f"{calls / seconds:>10,.0f} calls/s   {seconds * 1000:8.1f} ms"


def per_call(seconds: float) -> str:
    return f"{seconds * 1000:>10.4f} ms per call"


# -- workloads -----------------------------------------------------------------------------
def workload_pipelined() -> None:
    print(f"\n== 1. pipelined throughput: {PIPELINED:,} x inc(1) issued without waiting, then all "
          f"waited for; one replica / one actor; median of {ROUNDS} round(s)")
    sides: dict[str, Callable[[], Run]] = {
        "twat-mp process executor": lambda: ours_pipelined(ops.ProcessCounter),
        "Ray actor": ray_pipelined,
        "twat-mp thread executor (reference)": lambda: ours_pipelined(ops.ThreadCounter),
        "twat-mp async-process (reference)": lambda: ours_pipelined(ops.AsyncProcessCounter),
    }
    figures = interleave(start(sides))
    table(sides, figures, rate(PIPELINED))
    mine = "twat-mp process executor"
    calls = PIPELINED / statistics.median(figures[mine]) if mine in figures else None
    target_row("process executor, absolute", calls, f">= {PIPELINED_TARGET:,} calls/s",
               lambda v: v >= PIPELINED_TARGET, unit="calls/s")
    target_row("process executor / Ray actor (calls/s)", ratio(figures, mine, "Ray actor"),
               f">= {PIPELINED_RAY_TARGET}x", lambda v: v >= PIPELINED_RAY_TARGET)


def workload_sequential() -> None:
    print(f"\n== 2. sequential round trip: {SEQUENTIAL:,} x inc(1), each waited for before the next; "
          f"median per-call latency, median of {ROUNDS} round(s)")
    sides: dict[str, Callable[[], Run]] = {
        "twat-mp process executor": lambda: ours_sequential(ops.ProcessCounter),
        "Ray actor": ray_sequential,
        "twat-mp thread executor (reference)": lambda: ours_sequential(ops.ThreadCounter),
    }
    figures = interleave(start(sides))
    table(sides, figures, per_call)
    mine = "twat-mp process executor"
    if mine in figures:
        ms = statistics.median(figures[mine]) * 1000
        print(f"  {'process executor, absolute':<44} {ms:8.4f} ms    target <= {LATENCY_TARGET * 1000} ms  "
              f"{verdict(ms <= LATENCY_TARGET * 1000)}")
    else:
        print(f"  {'process executor, absolute':<44} {'—':>9}    target <= {LATENCY_TARGET * 1000} ms  SKIP")
    lat = ratio(figures, mine, "Ray actor")
    if lat is not None:
        print(f"  {'Ray actor / process executor (latency)':<44} {lat:8.2f}x    (no target)")


def workload_async() -> None:
    print(f"\n== 3. async executor against ThinkAgain 0.3.0's local @service, awaited from a coroutine: "
          f"{PIPELINED:,} x ainc(1) gathered, and {SEQUENTIAL:,} awaited one after another; "
          f"median of {ROUNDS} round(s)")
    piped: dict[str, Callable[[], Run]] = {
        "twat-mp async executor, pipelined": ours_async_pipelined,
        "ThinkAgain 0.3.0, pipelined": thinkagain_pipelined,
    }
    seq: dict[str, Callable[[], Run]] = {
        "twat-mp async executor, sequential": ours_async_sequential,
        "ThinkAgain 0.3.0, sequential": thinkagain_sequential,
    }
    piped_figures = interleave(start(piped))
    seq_figures = interleave(start(seq))
    table(piped, piped_figures, rate(PIPELINED))
    table(seq, seq_figures, per_call)
    target_row("async executor / ThinkAgain, pipelined", ratio(piped_figures, *piped),
               f">= {THINKAGAIN_TARGET}x", lambda v: v >= THINKAGAIN_TARGET)
    target_row("async executor / ThinkAgain, sequential", ratio(seq_figures, *seq),
               f">= {THINKAGAIN_TARGET}x", lambda v: v >= THINKAGAIN_TARGET)


def pool_busy(processes: int) -> Run:
    """The control: the same work in a plain multiprocessing pool of ``processes``
    (forkserver; one call per task, as a service sends them), to tell a loaded machine
    from a service that does not scale."""
    import multiprocessing

    pool = multiprocessing.get_context("forkserver").Pool(processes)
    CLOSERS.append(pool.terminate)
    return elapsed(lambda: pool.map(ops.busy, [ops.BUSY_LOOPS] * BUSY_CALLS, chunksize=1))


def workload_scaling() -> None:
    one_call = latency(ops.busy, 5)()
    load = os.getloadavg()[0]
    print(f"\n== 4. scaling: {BUSY_CALLS} x a pure-Python method (~{one_call * 1000:.1f} ms in this process) "
          f"pipelined, process executor, replicas=1 against replicas=2; {os.cpu_count()} CPUs, "
          f"load average {load:.2f} before; median of {ROUNDS} round(s)")
    if load > 0.5:
        print(f"  note: the machine is loaded (load average {load:.2f}): the speedups may read low; "
              "the multiprocessing.Pool rows are the control")
    sides: dict[str, Callable[[], Run]] = {
        "twat-mp replicas=2": lambda: ours_busy(ops.Busy2),
        "twat-mp replicas=1": lambda: ours_busy(ops.Busy1),
        "multiprocessing.Pool(2) (control)": lambda: pool_busy(2),
        "multiprocessing.Pool(1) (control)": lambda: pool_busy(1),
    }
    figures = interleave(start(sides))
    table(sides, figures, rate(BUSY_CALLS))
    speedup = ratio(figures, "twat-mp replicas=2", "twat-mp replicas=1")
    target_row("replicas=2 / replicas=1", speedup, f">= {SCALING_TARGET}x", lambda v: v >= SCALING_TARGET)
    control = ratio(figures, "multiprocessing.Pool(2) (control)", "multiprocessing.Pool(1) (control)")
    if control is not None:
        print(f"  {'control: Pool(2) / Pool(1)':<44} {control:8.2f}x    (what this machine allows now)")


def shutdown() -> None:
    for close in reversed(CLOSERS):
        try:
            close()
        except Exception as exc:  # report it and go on closing the rest
            print(f"  note: closing {close!r} raised {type(exc).__name__}: {exc}")
    try:
        from twat_mp import shutdown as shutdown_ours
    except ImportError:
        return
    shutdown_ours()


def main() -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, Ray with {NODES} CPUs"
          f"{', quick run' if QUICK else ''}")
    if ops.ProcessCounter is None:
        print("  NOTE: twat_mp.service is missing (no services layer in this twat-mp): twat-mp rows are SKIP")
    begin = time.perf_counter()
    try:
        workload_pipelined()
        workload_sequential()
        workload_async()
        workload_scaling()
    finally:
        shutdown()
    print(f"\n{threading.active_count()} threads alive at the end; {time.perf_counter() - begin:.1f} s in all")


if __name__ == "__main__":
    main()
