"""Devices and zero-copy shared data, side by side (``make bench`` runs it after graph.py).

Three workloads, each against the issue's target:

1. Arrays already in shared memory: 16 float64 arrays of 32 MB, ``np.sum`` of each. Serial
   in the parent (``[a.sum() for a in arrays]``) against a warm ``ProcessPool(nodes=2).map``
   over arrays made with ``shared_array`` (filled once, outside the timing); target: at
   most 2x the serial time. For reference, the same map over plain arrays and joblib
   ``Parallel(n_jobs=2)`` with its default memmapping (a fresh ``Parallel`` per call, as a
   one-off call is).
2. A 100 MB tensor read by 8 map items (``float(big[i::8].sum())``, ``i`` in 0..7): the
   tensor passed to every item as a plain tensor, against the same map over ``share(big)``,
   with the one ``share()`` call outside the timing and (a second row) inside it; target:
   the shared side at least 10x faster (the ratio printed is plain / shared).
3. Many small batches on device-pinned CPU workers: 2,000 float32 batches of 64 x 256
   (64 KB each, sent to the workers) through ``torch.nn.Linear(256, 256)``. A serial loop in
   the parent with torch's default threads, against ``ProcessPool(devices="cpu",
   per_device=2)`` whose workers build the same seeded model once (initializer and
   ``worker_state()``); results checked equal to 1e-5; target: at least 1.6x the serial loop.

Rows marked "reference" carry no target; they split a figure into its parts: workers that
keep their shared mappings between calls (no page faults after the first), torch with one
thread, the pool's compute alone, the batches' transfer alone, numpy instead of tensors,
and batches and results in shared memory.

Every pool is started and warmed by one untimed call before the timing. The sides of a
comparison are interleaved round by round; figures are medians of R rounds and ratios
the median of the per-round ratios. The shared-data rows need ``twat_mp.share``,
``shared_array`` and ``shared_tensor``: without them they print SKIP.

    python benchmarks/devices.py           # R = 5 rounds (env DEVICES_BENCH_ROUNDS)
    python benchmarks/devices.py --quick   # or DEVICES_BENCH_QUICK=1: a ~10 s smoke run
                                           # (1 round, smaller workloads, verdicts indicative)
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# twat-mp's forkserver workers import their functions from benchmarks/_devices_ops.py by
# name, on the parent's sys.path (joblib's workers here run only np.sum).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _devices_ops as ops
from run import NODES, median_time

QUICK = "--quick" in sys.argv[1:] or os.environ.get("DEVICES_BENCH_QUICK", "") not in ("", "0")
ROUNDS = 1 if QUICK else int(os.environ.get("DEVICES_BENCH_ROUNDS", "5"))
ARRAYS, ARRAY_LEN = (16, 500_000) if QUICK else (16, 4_000_000)  # 16 x 32 MB (quick: 4 MB)
BIG_LEN = 2_500_000 if QUICK else 25_000_000  # 100 MB of float32 (quick: 10 MB)
PARTS = 8
BATCHES, BATCH_ROWS = (400 if QUICK else 2_000), ops.BATCH_ROWS
# Batches per message: 15 x 64 KB stays under the 1 MiB a task pipe holds (larger messages
# wait on the worker to drain the pipe; 64 KB buffers always travel in the pipe, in-band).
CHUNKSIZE = 15

Run = Callable[[], object]
# A reference row of the shared sides: the workers keep what they received alive between
# calls, so a shared segment stays mapped in them and its pages fault in once, not on
# every call (the gap to the plain shared row is the cost of mapping it afresh). It runs
# on a pool of its own: its held mappings would otherwise serve the plain shared row too.
HELD = "  reference: shared, workers hold the mapping"


def shared_api() -> Any:
    """``twat_mp`` when it exports share/shared_array/shared_tensor, else None."""
    try:
        import twat_mp
        from twat_mp import share, shared_array, shared_tensor  # noqa: F401
    except ImportError:
        return None
    return twat_mp


def skip(what: str) -> None:
    print(f"  SKIP {what}: twat_mp does not export share/shared_array/shared_tensor yet")


def interleaved(sides: dict[str, Run], rounds: int) -> dict[str, list[float]]:
    """Run every side once per round, in order, for ``rounds`` rounds; their times."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, run in sides.items():
            gc.collect()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median of the per-round ratios num / den."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def row(name: str, seconds: float, note: str = "") -> None:
    print(f"  {name:<50} {seconds * 1000:9.1f} ms{note}")


def checked(run: Callable[[], list[Any]], expected: list[float], name: str, rel: float = 1e-9) -> Run:
    def run_and_check() -> None:
        got = run()
        if len(got) != len(expected) or any(abs(g - e) > rel * max(1.0, abs(e)) for g, e in zip(got, expected)):
            raise AssertionError(f"{name}: wrong sums")

    return run_and_check


# -- 1. arrays already in shared memory --------------------------------------------------
def case_arrays() -> None:
    import joblib
    import numpy as np

    from twat_mp import ProcessPool

    mb = ARRAY_LEN * 8 / 1e6
    print(f"\n== 1. arrays: {ARRAYS} x {mb:.0f} MB float64, np.sum of each; {NODES} workers, "
          f"median of {ROUNDS} round(s)")
    plain = [np.random.default_rng(i).random(ARRAY_LEN) for i in range(ARRAYS)]
    expected = [float(a.sum()) for a in plain]
    api = shared_api()
    shared = None
    if api is not None:
        shared = [api.shared_array((ARRAY_LEN,), np.float64) for _ in range(ARRAYS)]
        for s, a in zip(shared, plain):
            s[:] = a
    with ProcessPool(NODES) as pool, ProcessPool(NODES) as holding:
        sides: dict[str, Run] = {"serial (parent)": checked(lambda: [a.sum() for a in plain], expected, "serial")}
        if shared is not None:
            sides["twat-mp map, shared_array"] = checked(lambda: pool.map(np.sum, shared), expected, "shared")
            sides[HELD] = checked(lambda: holding.map(ops.held_sum, shared), expected, "held")
        sides["twat-mp map, plain arrays"] = checked(lambda: pool.map(np.sum, plain), expected, "plain")
        sides["joblib Parallel(n_jobs=2), memmap"] = checked(
            lambda: joblib.Parallel(n_jobs=NODES)(joblib.delayed(np.sum)(a) for a in plain), expected, "joblib")
        for run in sides.values():  # warm: pools started, joblib's workers up
            run()
        times = interleaved(sides, ROUNDS)
    for name, values in times.items():
        note = "" if name.startswith("serial") else f"   {ratio(times, name, 'serial (parent)'):5.2f}x serial"
        row(name, statistics.median(values), note)
    if shared is None:
        skip("twat-mp map, shared_array (target <= 2x serial)")
    else:
        r = ratio(times, "twat-mp map, shared_array", "serial (parent)")
        print(f"  shared map / serial = {r:.2f}x   target <= 2x   {verdict(r <= 2.0)}")


# -- 2. a 100 MB tensor read by 8 map items -----------------------------------------------
def case_tensor() -> None:
    import torch

    from twat_mp import ProcessPool

    mb = BIG_LEN * 4 / 1e6
    print(f"\n== 2. tensor: {mb:.0f} MB float32 tensor read by {PARTS} map items (big[i::{PARTS}].sum()); "
          f"{NODES} workers, median of {ROUNDS} round(s)")
    big = torch.randn(BIG_LEN, generator=torch.Generator().manual_seed(0))
    expected = [ops.part_sum(big, i, PARTS) for i in range(PARTS)]
    api = shared_api()
    parts = list(range(PARTS))
    with ProcessPool(NODES) as pool, ProcessPool(NODES) as holding:
        def plain_run() -> list[Any]:
            return pool.map(ops.part_sum, [big] * PARTS, parts)

        sides: dict[str, Run] = {"twat-mp map, plain tensor": checked(plain_run, expected, "plain", 1e-5)}
        if api is not None:
            shared = api.share(big)

            def shared_run() -> list[Any]:
                return pool.map(ops.part_sum, [shared] * PARTS, parts)

            def share_and_run() -> list[Any]:
                fresh = api.share(big)
                return pool.map(ops.part_sum, [fresh] * PARTS, parts)

            sides["twat-mp map, share() done before"] = checked(shared_run, expected, "shared", 1e-5)
            sides["twat-mp share() + map"] = checked(share_and_run, expected, "share+map", 1e-5)
            sides[HELD] = checked(lambda: holding.map(ops.held_part_sum, [shared] * PARTS, parts), expected,
                                  "held", 1e-5)
        serial = checked(lambda: [ops.part_sum(big, i, PARTS) for i in parts], expected, "serial", 1e-5)
        sides["serial (parent, reference)"] = serial
        for run in sides.values():
            run()
        times = interleaved(sides, ROUNDS)
        if api is not None:
            share_alone = median_time(lambda: api.share(big), repeat=ROUNDS)
    for name, values in times.items():
        row(name, statistics.median(values))
    if api is None:
        skip("the share() rows (target: plain / shared >= 10x)")
        return
    row("  of which the share() call alone", share_alone)
    for shared_name in ("twat-mp map, share() done before", "twat-mp share() + map"):
        r = ratio(times, "twat-mp map, plain tensor", shared_name)
        label = f"plain / ({shared_name.removeprefix('twat-mp ')})"
        print(f"  {label:<50} {r:6.2f}x   target >= 10x   {verdict(r >= 10.0)}")


# -- 3. small batches on device-pinned CPU workers ----------------------------------------
def case_batches() -> None:
    import torch

    from twat_mp import ProcessPool

    kb = BATCH_ROWS * ops.IN_FEATURES * 4 / 1024
    print(f"\n== 3. batches: {BATCHES:,} batches of {BATCH_ROWS} x {ops.IN_FEATURES} float32 ({kb:.0f} KB) "
          f"through Linear({ops.IN_FEATURES}, {ops.OUT_FEATURES}); median of {ROUNDS} round(s)")
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(BATCH_ROWS, ops.IN_FEATURES, generator=generator) for _ in range(BATCHES)]
    arrays = [b.numpy() for b in batches]
    model = ops.build_model()
    default_threads = torch.get_num_threads()

    def serial() -> list[Any]:
        with torch.no_grad():
            return [model(b) for b in batches]

    def serial_one_thread() -> None:
        torch.set_num_threads(1)
        try:
            serial()
        finally:
            torch.set_num_threads(default_threads)

    expected = serial()
    with ProcessPool(devices="cpu", per_device=2, initializer=ops.load_model) as pool:
        pinned = sorted(set(pool.map(ops.threads, range(4 * pool.nodes), chunksize=1)))

        def pooled() -> list[Any]:
            return pool.map(ops.forward, batches, chunksize=CHUNKSIZE)

        got = pooled()
        worst = max(float((g - e).abs().max()) for g, e in zip(got, expected))
        if len(got) != len(expected) or worst > 1e-5:
            raise AssertionError(f"pinned workers: results differ from the serial loop by {worst:g}")
        main = "ProcessPool(devices='cpu', per_device=2)"
        sides: dict[str, Run] = {
            f"serial loop (parent, {default_threads} torch threads)": serial,
            main: pooled,
            "  reference: serial loop, 1 torch thread": serial_one_thread,
            "  reference: pool, compute only (no batch sent)": lambda: pool.map(
                ops.forward_local, range(BATCHES), chunksize=CHUNKSIZE),
            "  reference: pool, batches sent, none returned": lambda: pool.map(
                ops.drop, batches, chunksize=CHUNKSIZE),
            "  reference: pool, numpy batches in and out": lambda: pool.map(
                ops.forward_numpy, arrays, chunksize=CHUNKSIZE),
        }
        api = shared_api()
        if api is not None:
            inputs = api.share(torch.stack(batches))
            outputs = api.shared_tensor((BATCHES, BATCH_ROWS, ops.OUT_FEATURES), torch.float32)
            sides["  reference: pool, shared_tensor in and out"] = lambda: pool.map(
                ops.forward_into, [inputs] * BATCHES, [outputs] * BATCHES, range(BATCHES), chunksize=CHUNKSIZE)
        for run in sides.values():
            run()
        if api is not None:
            worst_shared = float((outputs - torch.stack(expected)).abs().max())
            if worst_shared > 1e-5:
                raise AssertionError(f"shared batches: results differ from the serial loop by {worst_shared:g}")
        times = interleaved(sides, ROUNDS)
    print(f"  pool: {pool.nodes} workers, (device, torch threads) {pinned}, chunksize {CHUNKSIZE}; "
          f"results equal the serial loop's (max |diff| {worst:.1e})")
    serial_name = next(iter(sides))
    for name, values in times.items():
        note = "" if name == serial_name else f"   {ratio(times, serial_name, name):5.2f}x speed of serial"
        row(name, statistics.median(values), note)
    if api is None:
        skip("  reference: pool, shared_tensor in and out")
    speedup = ratio(times, serial_name, main)
    print(f"  speedup serial / pool = {speedup:.2f}x   target >= 1.6x   {verdict(speedup >= 1.6)}")


CASES = {"arrays": case_arrays, "tensor": case_tensor, "batches": case_batches}


def main(argv: list[str]) -> None:
    chosen = [a for a in argv if not a.startswith("--")] or list(CASES)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {NODES} workers per pool"
          f"{', quick run (smaller workloads)' if QUICK else ''}")
    if shared_api() is None:
        print("  note: twat_mp.share is missing: the shared-data rows print SKIP")
    start = time.perf_counter()
    try:
        for name in chosen:
            CASES[name]()
    finally:
        from twat_mp import shutdown

        shutdown()
    gc.collect()
    leftovers = sorted(name for name in os.listdir("/dev/shm") if name.startswith("twat-mp-"))
    print(f"\ntwat-mp segments left in /dev/shm: {len(leftovers)} {leftovers[:3] if leftovers else ''}; "
          f"{threading.active_count()} threads alive; {time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main(sys.argv[1:])
