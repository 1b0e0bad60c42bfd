"""The trivial functions of benchmarks/graph.py, in an importable module.

Process workers (twat-mp's forkserver, Dask's spawned pool, Ray's workers) import this
module by name instead of re-running the benchmark script; graph.py puts benchmarks/ on
their path. Only plain functions here: importing it in a worker costs nothing.
"""

from __future__ import annotations

import asyncio
import threading


def leaf(i: int) -> int:
    return i


def add(a: int, b: int) -> int:
    return a + b


async def aleaf(i: int) -> int:
    return i


async def aadd(a: int, b: int) -> int:
    return a + b


def wait_event(event: threading.Event) -> int:
    """A gate: holds every task that depends on it until ``event`` is set."""
    event.wait()
    return 0


async def wait_async_event(event: asyncio.Event) -> int:
    await event.wait()
    return 0
