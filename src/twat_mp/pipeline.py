"""Lazy pipelines: ``@node`` steps queued on a dict-like ``Context`` and run on demand.

A node is an ``async def step(ctx) -> ctx``. Calling it on a context does not run it:
it is queued, and the queue runs, in order, the first time data is needed::

    ctx = Context(x=1)        # plain data, nothing queued
    ctx = double(ctx)         # queued: ctx.pending == ['double']
    ctx = add_one(ctx)        # queued: ctx.pending == ['double', 'add_one']
    ctx["x"]                  # a read: the queue runs now, then the value is read
            │
            ▼
    arun ─► for each queued node, in order ─► await node(ctx) ─► ctx (its data updated)
            │ timing → ctx.metadata            │ raised → NodeExecutionError(node, completed)

Who owns what: a ``Context`` owns its data (a plain ``dict``), its queue of pending
nodes and its ``ExecutionMetadata``. A ``Node`` owns nothing but the user's function.
Blocking runs (``run``, or a data access while nodes are queued) hand the queue to
``twat_mp.graph.run_sync``, which runs it on the default runtime's event-loop thread, so
they work from a plain script and from a notebook cell alike; inside a node, whose loop
would wait on itself, they are refused and ``await ctx`` is the way to run the queue.

>>> @node
... async def double(ctx: Context) -> Context:
...     ctx["x"] = ctx["x"] * 2
...     return ctx
>>> @node
... async def add_one(ctx: Context) -> Context:
...     ctx["x"] = ctx["x"] + 1
...     return ctx
>>> ctx = add_one(double(Context(x=5)))
>>> ctx.pending
['double', 'add_one']
>>> ctx.peek("x")
5
>>> ctx["x"]
11
>>> ctx.metadata.node_counts
{'double': 1, 'add_one': 1}
"""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import contextvars
import functools
import importlib
import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, ItemsView, Iterator, KeysView, ValuesView
from typing import Any, TypeVar, overload

from twat_mp.errors import NodeExecutionError

__all__ = ["Context", "ExecutionMetadata", "Node", "arun", "node", "run"]

T = TypeVar("T")
NodeFunction = Callable[["Context"], Awaitable["Context"]]

# True while a node's function runs (in that task and the tasks it starts): a synchronous
# run there would block the very loop the node runs on, so it is refused with advice.
_IN_NODE: contextvars.ContextVar[bool] = contextvars.ContextVar("twat_mp_pipeline_in_node", default=False)


class ExecutionMetadata:
    """What ran on a context, and how long it took, over the context's whole life.

    ``started_at`` is when its first run began and ``finished_at`` when its latest run
    ended (``time.time()`` seconds; ``None`` before); ``runs`` counts the runs.
    ``nodes`` lists the nodes that finished, in the order they finished;
    ``node_counts`` and ``node_latencies`` (seconds, measured with
    ``time.perf_counter``) are totals per node name. A node that raised is not counted.
    """

    def __init__(self) -> None:
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.runs = 0
        self.nodes: list[str] = []
        self.node_counts: dict[str, int] = {}
        self.node_latencies: dict[str, float] = {}

    @property
    def duration(self) -> float | None:
        """Seconds from the start of the first run to the end of the latest one, or
        ``None`` while no run has ended."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def record(self, name: str, seconds: float) -> None:
        """Count one finished execution of the node ``name`` that took ``seconds``."""
        self.nodes.append(name)
        self.node_counts[name] = self.node_counts.get(name, 0) + 1
        self.node_latencies[name] = self.node_latencies.get(name, 0.0) + seconds

    def to_dict(self) -> dict[str, Any]:
        """A plain, independent copy: for logs, JSON, or comparing two runs."""
        return {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration": self.duration,
            "runs": self.runs,
            "nodes": list(self.nodes),
            "node_counts": dict(self.node_counts),
            "node_latencies": dict(self.node_latencies),
        }

    def __repr__(self) -> str:
        duration = "not run" if self.duration is None else f"{self.duration:.6f}s"
        per_node = ", ".join(f"{name}: {self.node_counts[name]}x {seconds:.6f}s"
                             for name, seconds in self.node_latencies.items())
        return f"ExecutionMetadata(runs={self.runs}, duration={duration}, nodes={{{per_node}}})"


class Context(collections.abc.MutableMapping[str, Any]):
    """The state a pipeline passes from node to node: a ``dict`` with a queue of nodes.

    ``Context(data, **kwargs)`` copies ``data`` (a mapping, or ``None``) and ``kwargs``
    into a new dict; the caller's dict is never changed. Calling a node on the context
    queues that node (``pending`` names the queue). Every access to the data (``ctx[k]``,
    ``ctx[k] = v``, ``get``, ``set``, ``items``, ``keys``, ``values``, ``in``, iteration,
    ``len``, ``to_dict``, ``==``) first runs the queue, so data is always seen and
    changed in program order. ``peek``, ``pending``, ``metadata`` and ``repr`` never run
    anything. Run the queue explicitly with ``run``/``materialize`` (blocking) or
    ``await ctx`` / ``await ctx.arun()`` / ``await ctx.amaterialize()``.

    A context is not thread-safe: use it from one thread (or one task) at a time.
    """

    __slots__ = ("_data", "_depth", "_metadata", "_pending")

    def __init__(self, data: collections.abc.Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._data: dict[str, Any] = dict(data) if data is not None else {}
        self._data.update(kwargs)
        self._pending: list[Node] = []
        self._metadata = ExecutionMetadata()
        self._depth = 0  # runs in progress on this context (a node may `await ctx` inside one)

    # -- what never runs anything -------------------------------------------------------

    @property
    def pending(self) -> list[str]:
        """The names of the queued nodes, in the order they will run (nothing runs)."""
        return [queued.name for queued in self._pending]

    @property
    def metadata(self) -> ExecutionMetadata:
        """The live ``ExecutionMetadata`` of this context (nothing runs)."""
        return self._metadata

    def peek(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` as it is now, without running queued nodes."""
        return self._data.get(key, default)

    def __repr__(self) -> str:
        queued = f", pending={self.pending}" if self._pending else ""
        return f"Context({self._data!r}{queued})"

    # -- running the queue --------------------------------------------------------------

    def run(self) -> Context:
        """Run the queued nodes, blocking until they finish, and return this context.

        Works from plain code and from a thread whose event loop is running (a notebook
        cell): the nodes run on the default runtime's loop thread. Inside a node, use
        ``await ctx`` instead: a blocking run there is a ``RuntimeError``.
        """
        if self._pending:
            if _IN_NODE.get() and _loop_running():
                raise RuntimeError(
                    f"a pipeline cannot run synchronously inside a node (queued: {', '.join(self.pending)}): "
                    "`await ctx` (or `await ctx.arun()`) to run them there")
            _run_blocking(self.arun())
        return self

    materialize = run

    async def arun(self) -> Context:
        """Run the queued nodes on the running event loop and return this context.

        Nodes run one after another, in queue order. If one raises, a
        ``NodeExecutionError`` naming it and the nodes that finished before it is raised
        (the node's exception is its ``__cause__``); the data stays as the finished
        nodes left it, and the failed node and those queued after it are dropped from the
        queue. ``KeyboardInterrupt`` and ``asyncio.CancelledError`` pass through as they
        are (the queue is dropped too).
        """
        if not self._pending:
            return self
        self._check_not_running_elsewhere()
        outermost = self._depth == 0
        if outermost:
            if self._metadata.started_at is None:
                self._metadata.started_at = time.time()
            self._metadata.runs += 1
        self._depth += 1
        try:
            await self._drain(self._metadata)
        finally:
            self._depth -= 1
            if outermost:
                self._metadata.finished_at = time.time()
        return self

    amaterialize = arun

    def __await__(self) -> Generator[Any, None, Context]:
        return self.arun().__await__()

    def _check_not_running_elsewhere(self) -> None:
        """A context is not thread-safe: queueing on it (or running it) while it runs its
        nodes, from outside those nodes (another thread or task), would lose nodes."""
        if self._depth and not _IN_NODE.get():
            raise RuntimeError("this Context is running its nodes right now (in another thread or task): "
                               "queue on it once that run returns, or give each thread its own Context")

    async def _drain(self, metadata: ExecutionMetadata) -> None:
        """Run the queue, recording into ``metadata`` (the pipeline's, which differs from
        this context's own when a node returned this context in place of its own)."""
        completed: list[str] = []
        while self._pending:
            current = self._pending.pop(0)
            # The node gets an empty queue of its own: what it queues on ctx (and awaits, or
            # forgets to) runs inside it, not after the rest of the pipeline.
            rest, self._pending = self._pending, []
            try:
                begun = time.perf_counter()
                token = _IN_NODE.set(True)
                try:
                    result = await current.function(self)
                finally:
                    _IN_NODE.reset(token)
                seconds = time.perf_counter() - begun
            except Exception as exc:
                self._pending = []
                raise NodeExecutionError(current.name, completed, exc) from exc
            except BaseException:
                self._pending = []
                raise
            if not isinstance(result, Context):
                self._pending = []
                raise TypeError(f"node {current.name!r} returned {type(result).__name__}, not a Context: "
                                "a node must return the context (usually the ctx it was given)")
            metadata.record(current.name, seconds)
            completed.append(current.name)
            try:
                await self._adopt(current.name, result, metadata)
            except BaseException:
                self._pending = []
                raise
            self._pending = rest

    async def _adopt(self, name: str, result: Context, metadata: ExecutionMetadata) -> None:
        """Finish what the node ``name`` left: nodes it queued without awaiting them run
        now, and a different context it returned becomes this context's data."""
        if self._pending:  # queued on ctx inside the node and not awaited: run them now
            await self._drain(metadata)
        if result is not self:
            await result._drain(metadata)
            self._data.clear()
            self._data.update(result._data)

    # -- the dict interface (each access runs the queue first) --------------------------

    def __getitem__(self, key: str) -> Any:
        return self.run()._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.run()._data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.run()._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.run()._data)

    def __len__(self) -> int:
        return len(self.run()._data)

    def __contains__(self, key: object) -> bool:
        return key in self.run()._data

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` after the queued nodes ran, or ``default``."""
        return self.run()._data.get(key, default)

    def set(self, key: str, value: Any) -> Context:
        """``ctx[key] = value`` (after the queued nodes ran); returns the context, to chain."""
        self[key] = value
        return self

    def keys(self) -> KeysView[str]:
        """The keys, after the queued nodes ran (a live view, like ``dict.keys``)."""
        return self.run()._data.keys()

    def values(self) -> ValuesView[Any]:
        """The values, after the queued nodes ran (a live view, like ``dict.values``)."""
        return self.run()._data.values()

    def items(self) -> ItemsView[str, Any]:
        """The ``(key, value)`` pairs, after the queued nodes ran (a live view)."""
        return self.run()._data.items()

    def to_dict(self) -> dict[str, Any]:
        """Run the queued nodes and return a plain (shallow) copy of the data."""
        return dict(self.run()._data)


class Node:
    """A pipeline step: an ``async def step(ctx) -> ctx`` that is queued when called.

    ``node(ctx)`` appends the node to ``ctx``'s queue and returns **the same** context
    object (nothing runs; a mapping that is not a ``Context`` is first copied into a new
    one). The function runs later, when the queue runs, and must return a ``Context``:
    usually the one it was given, changed in place. If it returns another context, that
    context's queued nodes run and its data replaces the pipeline's. Nodes the function
    queues on ``ctx`` run inside it: ``await ctx`` runs them at that point, and any left
    queued when it returns run right after it (before the rest of the pipeline).
    A function that returns something else is a ``TypeError`` naming the node.

    ``name`` defaults to the function's ``__name__``; metadata and errors use it.
    """

    def __init__(self, function: NodeFunction, *, name: str | None = None) -> None:
        _check_node_function(function)
        functools.update_wrapper(self, function)
        self.function = function
        self.name = name if name is not None else getattr(function, "__name__", repr(function))

    def __call__(self, ctx: collections.abc.Mapping[str, Any]) -> Context:
        context = ctx if isinstance(ctx, Context) else Context(ctx)
        context._check_not_running_elsewhere()
        context._pending.append(self)
        return context

    def __repr__(self) -> str:
        return f"Node({self.name!r})"


def _check_node_function(function: Any) -> None:
    """Refuse, at decoration time, what cannot be a node: anything but an ``async def``
    taking exactly one positional parameter (keyword-only ones need defaults)."""
    label = getattr(function, "__qualname__", repr(function))
    if not callable(function) or not inspect.iscoroutinefunction(function):
        raise TypeError(f"@node decorates an `async def step(ctx) -> ctx` function, got {label!r} "
                        "(not an async def)")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"@node cannot read the signature of {label!r}") from exc
    params = list(signature.parameters.values())
    positional = [p for p in params
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    others = [p for p in params if p not in positional and not (
        p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty)]
    if len(positional) != 1 or positional[0].default is not inspect.Parameter.empty or others:
        raise TypeError(f"@node function {label!r} must take exactly one positional parameter, the "
                        f"context: `async def {getattr(function, '__name__', 'step')}(ctx)`, got {signature}")


@overload
def node(function: NodeFunction, /) -> Node: ...


@overload
def node(*, name: str | None = None) -> Callable[[NodeFunction], Node]: ...


def node(function: NodeFunction | None = None, /, *, name: str | None = None) -> Node | Callable[[NodeFunction], Node]:
    """Make an ``async def step(ctx) -> ctx`` a pipeline ``Node``: ``@node``,
    ``@node()`` or ``@node(name="step")``. A function that is not an ``async def`` with
    exactly one positional parameter is a ``TypeError`` here, at decoration time."""
    if function is None:
        return functools.partial(Node, name=name)
    return Node(function, name=name)


def run(ctx: Context) -> Context:
    """``ctx.run()``: run the queued nodes, blocking, and return the context."""
    return ctx.run()


async def arun(ctx: Context) -> Context:
    """``await ctx.arun()``: run the queued nodes on the running loop; returns the context."""
    return await ctx.arun()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end and block this thread for its result: on the default
    runtime's loop thread (``twat_mp.graph.run_sync``), or, where this twat-mp has no
    graph module, with ``asyncio.run`` on a fresh thread (so a loop running in this
    thread is never re-entered)."""
    try:
        graph = importlib.import_module("twat_mp.graph")
    except ModuleNotFoundError as exc:
        if exc.name != "twat_mp.graph":
            raise
        graph = None
    run_sync: Callable[[Coroutine[Any, Any, T]], T] | None = getattr(graph, "run_sync", None)
    try:
        if run_sync is not None:
            return run_sync(coroutine)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="twat-mp-pipeline") as thread:
            return thread.submit(asyncio.run, coroutine).result()
    finally:
        if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
            coroutine.close()  # refused before it started: no "never awaited" warning
