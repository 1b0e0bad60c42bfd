"""The ``twat-mp`` command: ``version``, ``demo`` and ``--version``; a bare ``twat-mp`` prints the help.

Imports stay inside the functions: ``twat_mp`` exports ``main_banner`` from here, so importing this
module must cost nothing.
"""

from __future__ import annotations

from typing import Any, Callable

from twat_mp.__version__ import __version__


def main_banner() -> None:
    """Print "twat-mp v<version>", as twat-mp 2.x's ``twat_mp.main()`` did."""
    print(f"twat-mp v{__version__}")


def _busy(x: int) -> int:
    """About 10 ms of pure-Python work."""
    total = 0
    for i in range(150_000):
        total += i % (x + 1)
    return total


async def _io(x: int) -> int:
    import asyncio

    await asyncio.sleep(0.05)
    return x * 2


def _timed(label: str, run: Callable[[], Any], serial: float | None = None) -> float:
    import time

    start = time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - start
    shown = repr(result)
    if len(shown) > 48:
        shown = shown[:45] + "..."
    ratio = f"  ({serial / elapsed:4.1f}x serial)" if serial else ""
    print(f"  {label:<36} {elapsed * 1000:8.1f} ms{ratio}  {shown}")
    return elapsed


def demo() -> None:
    import asyncio

    from twat_mp import AsyncMultiPool, ProcessPool, ThreadPool, amap, apmap, imap, pmap

    items = list(range(32))
    print(f"twat-mp {__version__} demo: {len(items)} items of ~10 ms CPU work each\n")
    sum(map(_busy, items[:4]))  # warm up the CPU before the serial baseline
    serial = _timed("serial map()", lambda: sum(map(_busy, items)))
    busy_p = pmap(_busy)
    _timed("@pmap (cold: starts the warm pool)", lambda: sum(busy_p(items)), serial)
    _timed("@pmap (warm)", lambda: sum(busy_p(items)), serial)
    _timed("@imap (lazy iterator)", lambda: sum(imap(_busy)(items)), serial)
    _timed("@amap (submit, then collect)", lambda: sum(amap(_busy)(items)), serial)
    _timed("@pmap(kind='thread') (GIL-bound)", lambda: sum(pmap(kind="thread")(_busy)(items)), serial)

    def with_process_pool() -> Any:
        with ProcessPool(nodes=2) as pool:
            return pool.map(lambda x: x * x, range(10))

    def with_thread_pool() -> Any:
        with ThreadPool(nodes=4) as pool:
            return pool.map(str.upper, ["a", "b", "c"])

    _timed("ProcessPool(2).map(lambda)", with_process_pool)
    _timed("ThreadPool(4).map(str.upper)", with_thread_pool)

    print("\n20 async calls of asyncio.sleep(0.05):")
    serial_async = 20 * 0.05
    print(f"  {'serial awaits (computed)':<36} {serial_async * 1000:8.1f} ms")
    io_map = apmap(_io)
    _timed("@apmap (cold: starts the workers)", lambda: sum(io_map.sync(range(20))), serial_async)

    async def with_async_pool() -> Any:
        async with AsyncMultiPool(processes=2) as pool:
            return await pool.map(_io, range(20))

    _timed("AsyncMultiPool(2).map", lambda: asyncio.run(with_async_pool()), serial_async)
    _demo_graphs_and_services(items, serial)


def _demo_graphs_and_services(items: list[int], serial: float) -> None:
    from twat_mp import get, op, service, shutdown

    print("\nA task graph: the same work as process ops, summed pairwise by inline ops:")
    busy = op(kind="process")(_busy)
    add = op(kind="inline", name="add")(_add)

    def tree() -> int:
        refs = [busy.go(x) for x in items]
        while len(refs) > 1:
            refs = [add.go(refs[i], refs[i + 1]) if i + 1 < len(refs) else refs[i] for i in range(0, len(refs), 2)]
        return int(refs[0].result())

    _timed("@op graph (cold: starts the pool)", tree, serial)
    _timed("@op graph (warm)", tree, serial)

    print("\nA service: a stateful counter in 2 process replicas:")
    counter = service(replicas=2, executor="process")(_Counter).init(0)
    _timed("1,000 pipelined calls (cold)", lambda: len(get([counter.add.go(1) for _ in range(1000)])))
    _timed("1,000 pipelined calls (warm)", lambda: len(get([counter.add.go(1) for _ in range(1000)])))
    _timed("one call, round trip", lambda: counter.add(1))
    counter.shutdown()
    shutdown()


def _add(a: int, b: int) -> int:
    return a + b


class _Counter:
    def __init__(self, start: int) -> None:
        self.n = start

    def add(self, k: int) -> int:
        self.n += k
        return self.n


def main(argv: list[str] | None = None) -> int:
    """Run the ``twat-mp`` command; with no command, print the help and succeed."""
    import argparse

    parser = argparse.ArgumentParser(prog="twat-mp", description="Parallel maps one decorator away.")
    parser.add_argument("--version", action="version", version=__version__, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("version", help="print the version")
    commands.add_parser("demo", help="a short tour of every decorator and pool, with timings")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
    elif args.command == "demo":
        demo()
    else:
        parser.print_help()
    return 0
