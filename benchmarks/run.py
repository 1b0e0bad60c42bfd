"""Side-by-side benchmarks: twat-mp against multiprocessing, concurrent.futures, pathos,
mpire, joblib and aiomultiprocess, in one process run. Prints times and ratios.

    make bench                      # everything
    python benchmarks/run.py tiny   # one or more cases: tiny cpu warm imap arrays async

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


async def _time_ours(items: list[int], concurrency: int) -> float:
    from twat_mp import apmap

    mapped = apmap(processes=NODES, childconcurrency=concurrency)(_sleep_item)
    await mapped(items[:NODES])  # start the warm pool
    start = time.perf_counter()
    await mapped(items)
    return time.perf_counter() - start


async def _time_peer(items: list[int], concurrency: int) -> float:
    import aiomultiprocess

    async with aiomultiprocess.Pool(processes=NODES, childconcurrency=concurrency) as pool:
        await pool.map(_sleep_item, items[:NODES])
        start = time.perf_counter()
        await pool.map(_sleep_item, items)
        return time.perf_counter() - start


def case_async() -> None:
    items = list(range(2000))
    for concurrency in (16, 128):
        ideal = len(items) * 0.05 / (NODES * concurrency)
        results = {
            "twat-mp": statistics.median(asyncio.run(_time_ours(items, concurrency)) for _ in range(3)),
            "aiomultiprocess": statistics.median(asyncio.run(_time_peer(items, concurrency)) for _ in range(3)),
            "ideal": ideal,
        }
        report(f"async: apmap 2,000 x sleep(0.05), childconcurrency={concurrency}", results)
        print(f"  twat-mp / ideal = {results['twat-mp'] / ideal:.2f}")


CASES = {"tiny": case_tiny, "cpu": case_cpu, "warm": case_warm, "imap": case_imap, "arrays": case_arrays,
         "async": case_async}


def main(argv: list[str]) -> None:
    chosen = argv or list(CASES)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {NODES} workers per pool")
    for name in chosen:
        CASES[name]()
    print(f"\n{threading.active_count()} threads alive at the end")


if __name__ == "__main__":
    main(sys.argv[1:])
