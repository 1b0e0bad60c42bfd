"""Side-by-side benchmarks: twat-mp against multiprocessing, concurrent.futures, pathos,
mpire, joblib and aiomultiprocess, in one process run. Prints times and ratios.

    make bench                      # everything
    python benchmarks/run.py tiny   # one or more cases: tiny cpu warm fixed timeout imap arrays async

Each figure is the median of several runs; ratios are twat-mp time / peer time (below 1
means twat-mp is faster). The machine may be shared and noisy: read medians and ratios.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

import psutil

NODES = 2
ROWS: list[tuple[str, str, float, str]] = []


def importable_by_workers(path: str) -> None:
    """Let worker processes import modules of ``path`` (a benchmark's op or service
    classes) by name: twat-mp's forkserver and Dask's spawned workers take this
    process's ``sys.path``, Ray's workers take ``PYTHONPATH``."""
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (directory, os.environ.get("PYTHONPATH")) if p)


def median_time(run: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(case: str, results: dict[str, float], unit: str = "s") -> None:
    ours = results["twat-mp"]
    print(f"\n== {case}")
    for name, value in results.items():
        ratio = "" if name == "twat-mp" else f"   twat-mp/{name} = {ours / value:5.2f}"
        print(f"  {name:<28} {value:10.4f} {unit}{ratio}")
        ROWS.append((case, name, value, unit))


def close_pathos(pool) -> None:  # type: ignore[no-untyped-def]
    pool.close()
    pool.join()
    pool.clear()


def square(x: int) -> int:
    return x * x


def busy(_: int) -> int:
    total = 0
    for i in range(200_000):  # about 10 ms of pure Python
        total += i % 7
    return total


def array_sum(a):  # type: ignore[no-untyped-def]
    return float(a.sum())


# -- cases ----------------------------------------------------------------------------
def case_tiny() -> None:
    import joblib
    import mpire
    import pathos.pools

    from twat_mp import ProcessPool

    items = list(range(20_000))
    results = {}
    with ProcessPool(NODES) as pool:
        results["twat-mp"] = median_time(lambda: pool.map(lambda x: x * x, items))
    with multiprocessing.get_context("fork").Pool(NODES) as mp_pool:
        results["multiprocessing.Pool"] = median_time(lambda: mp_pool.map(square, items))
    with concurrent.futures.ProcessPoolExecutor(NODES) as executor:
        results["concurrent.futures"] = median_time(
            lambda: list(executor.map(square, items, chunksize=len(items) // (4 * NODES))))
    pathos_pool = pathos.pools.ProcessPool(NODES)
    results["pathos"] = median_time(lambda: pathos_pool.map(lambda x: x * x, items))
    close_pathos(pathos_pool)
    with mpire.WorkerPool(NODES) as mpire_pool:
        results["mpire"] = median_time(lambda: mpire_pool.map(square, items))
    with joblib.Parallel(n_jobs=NODES) as parallel:
        results["joblib"] = median_time(lambda: parallel(joblib.delayed(square)(x) for x in items))
    report("tiny: 20,000 x (x*x); twat-mp and pathos with a lambda", results)
    print(f"  twat-mp throughput: {len(items) / results['twat-mp']:,.0f} items/s")


def case_cpu() -> None:
    from twat_mp import ProcessPool

    items = list(range(64))
    serial = median_time(lambda: list(map(busy, items)), repeat=3)
    with ProcessPool(NODES) as pool:
        ours = median_time(lambda: pool.map(busy, items), repeat=3)
    with multiprocessing.get_context("fork").Pool(NODES) as mp_pool:
        stdlib = median_time(lambda: mp_pool.map(busy, items), repeat=3)
    report("cpu: 64 x ~10 ms pure Python", {"twat-mp": ours, "multiprocessing.Pool": stdlib, "serial": serial})
    print(f"  twat-mp speedup over serial: {serial / ours:.2f}x on {NODES} cores")


def case_warm() -> None:
    import mpire
    import pathos.pools

    from twat_mp import pmap

    items = list(range(100))
    decorated = pmap(square)
    start = time.perf_counter()
    decorated(items)
    cold = time.perf_counter() - start
    results = {"twat-mp": median_time(lambda: decorated(items), repeat=20)}
    with multiprocessing.get_context("fork").Pool(NODES) as mp_pool:
        results["multiprocessing.Pool"] = median_time(lambda: mp_pool.map(square, items), repeat=20)
    pathos_pool = pathos.pools.ProcessPool(NODES)
    results["pathos"] = median_time(lambda: pathos_pool.map(square, items), repeat=20)
    close_pathos(pathos_pool)
    with mpire.WorkerPool(NODES) as mpire_pool:
        results["mpire"] = median_time(lambda: mpire_pool.map(square, items), repeat=20)
    report("warm decorator call: @pmap over 100 items, median of 20", {k: v * 1000 for k, v in results.items()},
           unit="ms")
    print(f"  twat-mp cold first call (starts the warm pool): {cold * 1000:.1f} ms")


def case_imap() -> None:
    from twat_mp import ProcessPool

    total = 10_000_000
    process = psutil.Process()
    with ProcessPool(NODES) as pool:
        rss_before = process.memory_info().rss
        peak = rss_before
        start = time.perf_counter()
        results = pool.imap(square, itertools.count())
        next(results)
        first = time.perf_counter() - start
        for index, _ in enumerate(itertools.islice(results, total - 1)):
            if index % 500_000 == 0:
                peak = max(peak, process.memory_info().rss)
        elapsed = time.perf_counter() - start
        results.close()
    growth = (peak - rss_before) / 2**20
    print("\n== imap over itertools.count(), taking 10,000,000 items")
    print(f"  twat-mp: first result {first * 1000:.1f} ms, all in {elapsed:.1f} s "
          f"({total / elapsed:,.0f} items/s), peak RSS growth {growth:.1f} MiB")
    print("  multiprocessing.Pool.imap and pathos drain the whole input first: "
          "on an endless generator they never return (not run).")
    ROWS.append(("imap", "twat-mp first result", first, "s"))
    ROWS.append(("imap", "twat-mp RSS growth", growth, "MiB"))


def case_arrays() -> None:
    import joblib
    import numpy as np
    import pathos.pools

    from twat_mp import ProcessPool

    arrays = [np.random.default_rng(i).random(4_000_000) for i in range(16)]  # 16 x 32 MB
    results = {}
    with ProcessPool(NODES) as pool:
        pool.map(array_sum, arrays[:2])
        results["twat-mp"] = median_time(lambda: pool.map(array_sum, arrays), repeat=5)
    with multiprocessing.get_context("fork").Pool(NODES) as mp_pool:
        results["multiprocessing.Pool"] = median_time(lambda: mp_pool.map(array_sum, arrays), repeat=3)
    pathos_pool = pathos.pools.ProcessPool(NODES)
    results["pathos"] = median_time(lambda: pathos_pool.map(array_sum, arrays), repeat=3)
    close_pathos(pathos_pool)
    # A fresh Parallel per run dumps the arrays to its memmap folder each time, as a
    # one-off call does; a reused one skips arrays it already dumped (shown apart).
    results["joblib (memmap)"] = median_time(
        lambda: joblib.Parallel(n_jobs=NODES)(joblib.delayed(array_sum)(a) for a in arrays), repeat=3)
    with joblib.Parallel(n_jobs=NODES) as parallel:
        results["joblib (memmap, reused)"] = median_time(
            lambda: parallel(joblib.delayed(array_sum)(a) for a in arrays), repeat=3)
    results["serial"] = median_time(lambda: [array_sum(a) for a in arrays], repeat=3)
    report("arrays: 16 x 32 MB numpy, sum in worker", results)
    leftovers = [name for name in os.listdir("/dev/shm") if name.startswith("twat-mp-")]
    print(f"  twat-mp segments left in /dev/shm: {len(leftovers)}")


async def _sleep_item(x: int) -> int:
    await asyncio.sleep(0.05)
    return x


def paired(ours: Callable[[], object], peer: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """Interleave runs of the two sides; return their median times and the median of
    the per-pair ratios peer/ours (above 1: twat-mp is faster). The side that runs first
    alternates: the first runs right after ``gc.collect()``, whose walk over every object
    leaves the caches cold (with many modules imported, that alone cost the first side
    about 0.2 ms of a 0.3 ms map)."""
    pairs = []

    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    for i in range(repeat):
        gc.collect()
        if i % 2:
            theirs = timed(peer)
            pairs.append((timed(ours), theirs))
        else:
            mine = timed(ours)
            pairs.append((mine, timed(peer)))
    return (statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs),
            statistics.median(p[1] / p[0] for p in pairs))


async def _ours_warm(mapped, items: list[int]) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    await mapped(items)
    return time.perf_counter() - start


async def _ours_cold(items: list[int], concurrency: int) -> float:
    from twat_mp import AsyncMultiPool

    start = time.perf_counter()
    async with AsyncMultiPool(processes=NODES, childconcurrency=concurrency) as pool:
        await pool.map(_sleep_item, items)
    return time.perf_counter() - start


async def _peer_run(items: list[int], concurrency: int, warm: bool) -> float:
    import aiomultiprocess

    start = time.perf_counter()
    async with aiomultiprocess.Pool(processes=NODES, childconcurrency=concurrency) as pool:
        if warm:
            await pool.map(_sleep_item, items[:NODES])
            start = time.perf_counter()
        await pool.map(_sleep_item, items)
        return time.perf_counter() - start


def case_async() -> None:
    from twat_mp import apmap

    items = list(range(2000))
    for concurrency in (16, 128):
        ideal = len(items) * 0.05 / (NODES * concurrency)
        mapped = apmap(processes=NODES, childconcurrency=concurrency)(_sleep_item)
        mapped.sync(items[:NODES])  # the warm pool, started once
        rows: dict[str, list[float]] = {"ours warm": [], "peer warm": [], "ours cold": [], "peer cold": []}
        for _ in range(3):  # interleaved
            rows["ours warm"].append(asyncio.run(_ours_warm(mapped, items)))
            rows["peer warm"].append(asyncio.run(_peer_run(items, concurrency, warm=True)))
            rows["ours cold"].append(asyncio.run(_ours_cold(items, concurrency)))
            rows["peer cold"].append(asyncio.run(_peer_run(items, concurrency, warm=False)))
        med = {k: statistics.median(v) for k, v in rows.items()}
        report(f"async: 2,000 x sleep(0.05) on {NODES} processes, childconcurrency={concurrency}", {
            "twat-mp": med["ours warm"], "aiomultiprocess (warm)": med["peer warm"],
            "twat-mp (cold, pool start included)": med["ours cold"],
            "aiomultiprocess (cold)": med["peer cold"], "ideal": ideal})
        target = 1.1 if concurrency == 16 else 1.25
        print(f"  twat-mp / ideal: warm {med['ours warm'] / ideal:.2f} (target <= {target}), "
              f"cold {med['ours cold'] / ideal:.2f}; aiomultiprocess / ideal: warm "
              f"{med['peer warm'] / ideal:.2f}, cold {med['peer cold'] / ideal:.2f}")
    warm_call = apmap(processes=NODES)(_sleep_zero)
    warm_call.sync(range(100))
    times = []
    for _ in range(50):
        start = time.perf_counter()
        warm_call.sync(range(100))
        times.append(time.perf_counter() - start)
    print(f"  warm apmap call of 100 items (sync): median {statistics.median(times) * 1000:.2f} ms "
          "(target <= 2 ms)")
    ROWS.append(("async", "warm apmap 100 items", statistics.median(times), "s"))


async def _sleep_zero(x: int) -> int:
    await asyncio.sleep(0)
    return x


def case_fixed() -> None:
    """The warm call's fixed cost: warm pool against warm pool, small to large maps."""
    from twat_mp import ProcessPool

    print("\n== warm ProcessPool.map vs warm multiprocessing.Pool.map, x*x, interleaved pairs")
    with ProcessPool(NODES) as pool, multiprocessing.get_context("fork").Pool(NODES) as mp_pool:
        for n, repeat, target in ((1_000, 200, 1.2), (10_000, 100, 1.0), (100_000, 30, 1.0), (1_000_000, 7, 1.0)):
            items = list(range(n))
            for _ in range(3):  # both warm for this size
                pool.map(square, items)
                mp_pool.map(square, items)
            ours, peer, ratio = paired(lambda xs=items: pool.map(square, xs),
                                       lambda xs=items: mp_pool.map(square, xs), repeat)
            print(f"  {n:>9,} items: twat-mp {ours * 1000:8.2f} ms, stdlib {peer * 1000:8.2f} ms, "
                  f"stdlib/twat-mp = {ratio:4.2f} (target >= {target})")
            ROWS.append((f"fixed {n}", "stdlib/twat-mp", ratio, "x"))


def case_timeout() -> None:
    """timeout= on many trivial items: items still travel in batches."""
    from twat_mp import ProcessPool

    items = list(range(50_000))
    with ProcessPool(NODES) as pool:
        pool.map(square, items)
        plain, timed, ratio = paired(lambda: pool.map(square, items, timeout=5),
                                     lambda: pool.map(square, items), 9)
    print("\n== 50,000 x (x*x) with timeout=5 vs without")
    print(f"  with timeout {plain * 1000:.1f} ms, without {timed * 1000:.1f} ms, "
          f"cost of timeout= {1 / ratio:.2f}x (target <= 1.5)")
    ROWS.append(("timeout", "cost", 1 / ratio, "x"))


CASES = {"tiny": case_tiny, "cpu": case_cpu, "warm": case_warm, "fixed": case_fixed, "timeout": case_timeout,
         "imap": case_imap, "arrays": case_arrays, "async": case_async}


def main(argv: list[str]) -> None:
    chosen = argv or list(CASES)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {NODES} workers per pool")
    for name in chosen:
        CASES[name]()
    print(f"\n{threading.active_count()} threads alive at the end")


if __name__ == "__main__":
    main(sys.argv[1:])
