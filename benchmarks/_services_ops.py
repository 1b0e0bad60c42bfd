"""The service and actor classes of benchmarks/services.py, in an importable module.

Process replicas (twat-mp's forkserver workers) and Ray's actor workers import this module
by name instead of re-running the benchmark script; services.py puts benchmarks/ on their
path. The plain classes hold the state and the methods; each side gets its own subclass,
because twat-mp's and ThinkAgain's ``@service`` both decorate the class they are given,
and a Ray actor with any ``async def`` method would become an async actor. The twat-mp
classes are ``None`` when this twat-mp has no ``service`` yet.
"""

from __future__ import annotations

BUSY_LOOPS = 200_000  # about 5 ms of pure Python on the benchmark machine (2 CPUs)


class Counter:
    """The trivial stateful method: ``inc`` adds to a counter and returns it."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def inc(self, k: int = 1) -> int:
        self.n += k
        return self.n


class AsyncCounter(Counter):
    """``Counter`` with the same method as a coroutine, for the async callers."""

    async def ainc(self, k: int = 1) -> int:
        self.n += k
        return self.n


class Busy:
    """A CPU-bound method: ``BUSY_LOOPS`` iterations of pure Python (about 5 ms)."""

    def __init__(self) -> None:
        self.calls = 0

    def work(self, loops: int = BUSY_LOOPS) -> int:
        self.calls += 1
        return busy(loops)


def busy(loops: int = BUSY_LOOPS) -> int:
    """The pure-Python work of ``Busy.work``, as a plain function (the pool control rows)."""
    total = 0
    for i in range(loops):
        total += i % 7
    return total


def ray_counter() -> type:
    """The Ray actor class over ``Counter`` (sync methods only: a plain threaded actor)."""
    import ray

    return ray.remote(Counter)  # type: ignore[no-any-return]


def thinkagain_counter() -> type:
    """ThinkAgain 0.3.0's local ``@service`` over ``AsyncCounter``, made on first use
    (a fresh subclass: the decorator sets ``init`` on the class it is given)."""
    import thinkagain

    class ThinkAgainCounter(AsyncCounter):
        pass

    return thinkagain.service(ThinkAgainCounter)  # type: ignore[no-any-return]


try:
    from twat_mp import service
except ImportError:  # twat-mp before its services layer
    ProcessCounter = ThreadCounter = AsyncExecCounter = AsyncProcessCounter = None
    Busy1 = Busy2 = None
else:

    @service(replicas=1, executor="process", max_concurrency=8)
    class ProcessCounter(AsyncCounter):
        pass

    @service(replicas=1, executor="thread", max_concurrency=8)
    class ThreadCounter(AsyncCounter):
        pass

    @service(replicas=1, executor="async", max_concurrency=8)
    class AsyncExecCounter(AsyncCounter):
        pass

    @service(replicas=1, executor="async-process", max_concurrency=8)
    class AsyncProcessCounter(AsyncCounter):
        pass

    @service(replicas=1, executor="process")
    class Busy1(Busy):
        pass

    @service(replicas=2, executor="process")
    class Busy2(Busy):
        pass
