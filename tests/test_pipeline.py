"""Lazy pipelines: nodes queue on a Context and run when data is needed, in order, with
metadata, named errors, branches, nested nodes, and sync runs from any thread."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twat_mp.errors import NodeExecutionError, TwatMPError
from twat_mp.graph import op
from twat_mp.pipeline import Context, ExecutionMetadata, Node, arun, node, run

pytestmark = pytest.mark.timeout(60)


def adder(name: str, key: str, amount: int, calls: list[str] | None = None) -> Node:
    """A node that adds ``amount`` to ``ctx[key]`` and notes its name in ``calls``."""

    async def add(ctx: Context) -> Context:
        if calls is not None:
            calls.append(name)
        ctx[key] = ctx.get(key, 0) + amount
        return ctx

    return Node(add, name=name)


@node
async def double(ctx: Context) -> Context:
    """Double x."""
    ctx["x"] = ctx["x"] * 2
    return ctx


@node
async def boom(ctx: Context) -> Context:
    raise ValueError("bad x")


# -- laziness -------------------------------------------------------------------------


def test_nothing_runs_until_a_value_is_read():
    calls: list[str] = []
    ctx = Context(x=1)
    ctx = adder("a", "x", 1, calls)(ctx)
    ctx = adder("b", "x", 10, calls)(ctx)
    assert calls == []
    assert ctx.pending == ["a", "b"]
    assert ctx.peek("x") == 1
    assert ctx.peek("missing", "default") == "default"
    assert "pending=['a', 'b']" in repr(ctx)
    assert ctx.metadata.runs == 0
    assert calls == []
    assert ctx["x"] == 12
    assert calls == ["a", "b"]
    assert ctx.pending == []
    assert ctx["x"] == 12  # a second read runs nothing again
    assert calls == ["a", "b"]


def test_calling_a_node_returns_the_same_context_and_a_mapping_becomes_a_new_one():
    ctx = Context(x=1)
    assert double(ctx) is ctx
    source = {"x": 4}
    queued = double(source)
    assert isinstance(queued, Context)
    assert queued["x"] == 8
    assert source == {"x": 4}  # the caller's dict is copied, never changed


@pytest.mark.parametrize("read", [
    lambda c: c["x"],
    lambda c: c.get("x"),
    lambda c: list(c.items()),
    lambda c: list(c.keys()),
    lambda c: list(c.values()),
    lambda c: "x" in c,
    lambda c: list(c),
    lambda c: len(c),
    lambda c: c.to_dict(),
    lambda c: c == {"x": 2},
    lambda c: c.run(),
    lambda c: c.materialize(),
    lambda c: run(c),
    lambda c: asyncio.run(c.arun()),
    lambda c: asyncio.run(c.amaterialize()),
    lambda c: asyncio.run(arun(c)),
])
def test_every_read_runs_the_queue(read):
    ctx = double(Context(x=1))
    read(ctx)
    assert ctx.pending == []
    assert ctx.peek("x") == 2


def test_writes_happen_in_program_order():
    @node
    async def set_x(ctx: Context) -> Context:
        ctx["x"] = "from node"
        return ctx

    ctx = set_x(Context())
    ctx["x"] = "from caller"  # after the queued node: the node runs first
    assert ctx.to_dict() == {"x": "from caller"}
    ctx = set_x(ctx)
    del ctx["x"]
    assert "x" not in ctx


def test_dict_interface():
    data = {"a": 1}
    ctx = Context(data, b=2)
    assert ctx.set("c", 3) is ctx
    assert ctx.set("d", 4).set("e", 5)["e"] == 5
    assert sorted(ctx) == ["a", "b", "c", "d", "e"]
    assert len(ctx) == 5
    assert ctx.get("zz") is None and ctx.get("zz", 7) == 7
    assert dict(ctx.items()) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    assert list(ctx.keys()) == ["a", "b", "c", "d", "e"]
    assert list(ctx.values()) == [1, 2, 3, 4, 5]
    copy = ctx.to_dict()
    copy["a"] = 100
    assert ctx["a"] == 1 and data == {"a": 1}
    assert ctx.pop("e") == 5 and "e" not in ctx
    ctx.update(f=6)
    assert ctx == {"a": 1, "b": 2, "c": 3, "d": 4, "f": 6}
    assert Context(None).to_dict() == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-1000, 1000), st.booleans()), max_size=12), st.integers(-50, 50))
def test_a_lazy_pipeline_equals_applying_its_nodes_one_by_one(steps, start):
    calls: list[str] = []
    names = [f"n{i}" for i in range(len(steps))]
    ctx = Context(v=start)
    expected, ran = start, 0
    for index, (amount, read_here) in enumerate(steps):
        ctx = adder(names[index], "v", amount, calls)(ctx)
        expected += amount
        if read_here:  # a read in the middle runs what is queued so far, and no more
            assert ctx["v"] == expected
            ran = index + 1
        assert calls == names[:ran]
        assert ctx.pending == names[ran:index + 1]
    assert ctx["v"] == expected
    assert calls == names
    assert ctx.metadata.nodes == names
    assert sum(ctx.metadata.node_counts.values()) == len(steps)


# -- metadata -------------------------------------------------------------------------


def test_metadata_counts_latencies_and_times():
    @node
    async def nap(ctx: Context) -> Context:
        await asyncio.sleep(0.02)
        return ctx

    before = time.time()
    ctx = double(nap(double(nap(Context(x=1)))))
    meta = ctx.metadata
    assert isinstance(meta, ExecutionMetadata)
    assert meta.duration is None and meta.started_at is None
    assert ctx["x"] == 4
    assert meta.runs == 1
    assert meta.nodes == ["nap", "double", "nap", "double"]
    assert meta.node_counts == {"nap": 2, "double": 2}
    assert meta.node_latencies["nap"] >= 0.04
    assert 0 <= meta.node_latencies["double"] < meta.node_latencies["nap"]
    assert meta.started_at is not None and meta.finished_at is not None
    assert before <= meta.started_at <= meta.finished_at <= time.time()
    assert meta.duration is not None and meta.duration >= 0.04
    first_start = meta.started_at

    ctx = nap(ctx)
    assert ctx["x"] == 4
    assert meta.runs == 2 and meta.node_counts["nap"] == 3
    assert meta.started_at == first_start  # the whole life of the context

    as_dict = meta.to_dict()
    assert as_dict["node_counts"] == {"nap": 3, "double": 2}
    assert as_dict["nodes"] == ["nap", "double", "nap", "double", "nap"]
    as_dict["nodes"].append("x")
    assert len(meta.nodes) == 5  # a copy
    assert "runs=2" in repr(meta) and "nap: 3x" in repr(meta)
    assert "not run" in repr(ExecutionMetadata())


# -- errors ---------------------------------------------------------------------------


def test_a_failing_node_is_named_with_the_nodes_finished_before_it():
    calls: list[str] = []
    ctx = adder("first", "x", 1, calls)(Context(x=0))
    ctx = adder("second", "x", 10, calls)(ctx)
    ctx = boom(ctx)
    ctx = adder("never", "x", 100, calls)(ctx)
    with pytest.raises(NodeExecutionError) as info:
        ctx.run()
    exc = info.value
    assert isinstance(exc, TwatMPError)
    assert exc.node == "boom"
    assert exc.completed == ["first", "second"]
    assert isinstance(exc.__cause__, ValueError) and exc.exception is exc.__cause__
    assert "'boom'" in str(exc) and "first, second" in str(exc) and "bad x" in str(exc)
    assert calls == ["first", "second"]
    assert ctx.pending == []  # the failed node and those after it are dropped
    assert ctx.peek("x") == 11  # as the finished nodes left it
    assert ctx["x"] == 11
    assert ctx.metadata.nodes == ["first", "second"]
    assert ctx.metadata.finished_at is not None


def test_a_failing_node_raises_from_await_and_from_a_read():
    with pytest.raises(NodeExecutionError) as info:
        asyncio.run(boom(Context(x=1)).arun())
    assert info.value.completed == []

    ctx = boom(double(Context(x=1)))
    with pytest.raises(NodeExecutionError) as info:
        ctx.get("x")
    assert info.value.completed == ["double"]
    assert ctx.get("x") == 2


@pytest.mark.parametrize("kind", [KeyboardInterrupt, asyncio.CancelledError])
def test_interrupts_and_cancellation_pass_through_unwrapped(kind):
    @node
    async def stop(ctx: Context) -> Context:
        raise kind()

    ctx = double(stop(Context(x=1)))
    with pytest.raises(kind):
        asyncio.run(ctx.arun())
    assert ctx.pending == []


def test_a_node_that_returns_no_context_is_a_type_error_naming_it():
    @node(name="forgetful")
    async def no_return(ctx: Context) -> Context:
        ctx["x"] = 1
        return None  # type: ignore[return-value]

    ctx = double(no_return(Context()))
    with pytest.raises(TypeError, match="'forgetful' returned NoneType"):
        ctx.run()
    assert ctx.pending == []


def test_sync_run_inside_a_node_is_an_error_not_a_deadlock():
    @node
    async def reads_synchronously(ctx: Context) -> Context:
        ctx = double(ctx)
        ctx["y"] = ctx["x"]  # a blocking read with a queued node, on the running loop
        return ctx

    with pytest.raises(NodeExecutionError) as info:
        reads_synchronously(Context(x=1)).run()
    assert info.value.node == "reads_synchronously"
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "await ctx" in str(info.value.__cause__)


# -- nodes inside nodes, branches, fan-out --------------------------------------------


def test_await_ctx_inside_a_node_runs_its_nodes_there():
    order: list[str] = []

    @node
    async def outer(ctx: Context) -> Context:
        order.append("outer start")
        ctx = await adder("inner", "x", 1, order)(ctx)
        order.append(f"outer sees {ctx.peek('x')}")
        return ctx

    ctx = adder("after", "x", 100, order)(outer(Context(x=0)))
    assert ctx["x"] == 101
    assert order == ["outer start", "inner", "outer sees 1", "after"]
    assert ctx.metadata.nodes == ["inner", "outer", "after"]


def test_nodes_queued_in_a_node_and_not_awaited_run_right_after_it():
    order: list[str] = []

    @node
    async def outer(ctx: Context) -> Context:
        order.append("outer")
        return adder("inner", "x", 1, order)(ctx)  # forgot `await`

    ctx = adder("after", "x", 10, order)(outer(Context(x=0)))
    assert ctx["x"] == 11
    assert order == ["outer", "inner", "after"]


def test_a_node_may_return_another_context():
    @node
    async def replace(ctx: Context) -> Context:
        return double(Context(x=ctx["x"] + 1, new=True))

    ctx = replace(Context(x=1, old=True))
    assert ctx.to_dict() == {"x": 4, "new": True}
    assert ctx.metadata.nodes == ["replace", "double"]


@pytest.mark.parametrize(("start", "expected"), [(5, 10), (-5, -4)])
def test_plain_python_branches_between_nodes(start, expected):
    calls: list[str] = []
    ctx = adder("noop", "x", 0, calls)(Context(x=start))
    if ctx["x"] > 0:  # the read runs "noop" first
        ctx = double(ctx)
        branch = "positive"
    else:
        ctx = adder("plus_one", "x", 1, calls)(ctx)
        branch = "other"
    assert ctx.pending == (["double"] if start > 0 else ["plus_one"])
    assert ctx["x"] == expected
    assert calls == (["noop"] if branch == "positive" else ["noop", "plus_one"])


def test_a_node_can_fan_out():
    @node
    async def fan_out(ctx: Context) -> Context:
        async def square(value: int) -> int:
            await asyncio.sleep(0.01)
            return value * value

        ctx["squares"] = await asyncio.gather(*(square(v) for v in ctx["values"]))
        return ctx

    assert fan_out(Context(values=[1, 2, 3]))["squares"] == [1, 4, 9]


# -- sync and async callers -----------------------------------------------------------


def test_await_ctx_in_async_code():
    async def main() -> Context:
        ctx = double(double(Context(x=1)))
        result = await ctx
        assert result is ctx
        return await arun(double(result))

    ctx = asyncio.run(main())
    assert ctx.peek("x") == 8


def test_sync_run_from_a_thread_whose_loop_is_running():
    async def main() -> int:  # a notebook cell: a loop runs in this thread
        ctx = double(Context(x=3))
        ctx.run()
        assert ctx.peek("x") == 6
        value: int = double(ctx)["x"]
        return value

    assert asyncio.run(main()) == 12


def test_sync_runs_from_several_threads():
    results: dict[int, int] = {}

    def work(index: int) -> None:
        results[index] = double(double(Context(x=index)))["x"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: 4 * i for i in range(8)}


def test_nothing_queued_runs_nothing():
    ctx = Context(x=1)
    assert ctx.run() is ctx
    assert asyncio.run(ctx.arun()) is ctx
    assert ctx.metadata.runs == 0


# -- decoration -----------------------------------------------------------------------


def test_node_keeps_the_function_identity():
    assert isinstance(double, Node)
    assert double.name == "double" and double.__name__ == "double"  # type: ignore[attr-defined]
    assert double.__doc__ == "Double x."
    assert double.__wrapped__ is double.function  # type: ignore[attr-defined]
    assert repr(double) == "Node('double')"

    @node()
    async def plain(ctx: Context) -> Context:
        return ctx

    @node(name="renamed")
    async def original(ctx: Context) -> Context:
        return ctx

    @node
    async def with_option(ctx: Context, *, scale: int = 2) -> Context:
        return ctx

    assert plain.name == "plain"
    assert original.name == "renamed" and original.__name__ == "original"  # type: ignore[attr-defined]
    assert original(Context()).pending == ["renamed"]
    assert with_option.name == "with_option"


def _sync(ctx):
    return ctx


async def _no_params():
    return None


async def _two(ctx, other):
    return ctx


async def _star(*args):
    return args[0]


async def _defaulted(ctx=None):
    return ctx


async def _required_keyword(ctx, *, option):
    return ctx


async def _async_generator(ctx):
    yield ctx


@pytest.mark.parametrize(("function", "words"), [
    (_sync, "not an async def"),
    (lambda ctx: ctx, "not an async def"),
    (42, "not an async def"),
    (_async_generator, "not an async def"),
    (_no_params, "exactly one positional parameter"),
    (_two, "exactly one positional parameter"),
    (_star, "exactly one positional parameter"),
    (_defaulted, "exactly one positional parameter"),
    (_required_keyword, "exactly one positional parameter"),
])
def test_bad_decorations_are_type_errors(function, words):
    with pytest.raises(TypeError, match=words):
        node(function)
    with pytest.raises(TypeError, match=words):
        node(name="x")(function)


# -- with a runtime loop thread (the contract of twat_mp.graph.run_sync) ---------------


@pytest.fixture
def loop_thread_runtime(monkeypatch):
    """A stand-in ``twat_mp.graph`` whose ``run_sync`` runs coroutines on its own loop
    thread and refuses to be called from that thread, as the real one promises."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-runtime-loop", daemon=True)
    thread.start()

    def run_sync(coroutine):
        if threading.current_thread() is thread:
            raise RuntimeError("run_sync called from the runtime's loop thread")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    fake = types.ModuleType("twat_mp.graph")
    fake.run_sync = run_sync  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "twat_mp.graph", fake)
    yield thread
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_sync_runs_go_to_the_runtime_loop_thread(loop_thread_runtime):
    seen: list[threading.Thread] = []

    @node
    async def where(ctx: Context) -> Context:
        seen.append(threading.current_thread())
        return ctx

    assert where(Context()).to_dict() == {}
    assert seen == [loop_thread_runtime]

    async def cell() -> dict[str, int]:  # a notebook cell: the caller's own loop is running
        return double(where(Context(x=2))).to_dict()

    assert asyncio.run(cell()) == {"x": 4}
    assert seen == [loop_thread_runtime, loop_thread_runtime]

    with pytest.raises(NodeExecutionError) as info:
        boom(where(Context())).run()
    assert info.value.completed == ["where"]


def test_a_sync_run_inside_a_node_is_refused_before_reaching_the_runtime(loop_thread_runtime):
    @node
    async def blocking(ctx: Context) -> Context:
        return double(ctx).run()

    with pytest.raises(NodeExecutionError) as info:
        blocking(Context(x=1)).run()
    assert "await ctx" in str(info.value.__cause__)


def test_a_refused_coroutine_is_closed_not_left_unawaited(monkeypatch, recwarn):
    def run_sync(coroutine):
        raise RuntimeError("refused")

    fake = types.ModuleType("twat_mp.graph")
    fake.run_sync = run_sync  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "twat_mp.graph", fake)
    ctx = double(Context(x=1))
    with pytest.raises(RuntimeError, match="refused"):
        ctx.run()
    assert ctx.pending == ["double"]  # never started: still queued
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


@op(kind="process")
def _score(word):
    return sum(map(ord, word))


@op(kind="thread")
def _length(word):
    return len(word)


def test_nodes_fan_out_to_graph_ops_and_fail_with_their_errors():
    @node
    async def fan_out(ctx):
        refs = [_score.go(w) for w in ctx["words"]]
        ctx["scores"] = [await r for r in refs]
        ctx["lengths"] = [await r for r in [_length.go(w) for w in ctx["words"]]]
        return ctx

    @node
    async def fails(ctx):
        await _score.go(42)  # sum(map(ord, 42)) raises TypeError in the worker
        return ctx

    ctx = fan_out(Context(words=["a", "bc"]))
    assert ctx["scores"] == [97, 197] and ctx["lengths"] == [1, 2]
    with pytest.raises(NodeExecutionError) as caught:
        fails(fan_out(Context(words=["x"]))).run()
    assert caught.value.node == "fails" and caught.value.completed == ["fan_out"]
    assert isinstance(caught.value.__cause__, TypeError)


def test_queueing_on_a_context_that_runs_elsewhere_is_an_error_not_a_lost_node():
    started, release = threading.Event(), threading.Event()

    @node
    async def hold(ctx):
        started.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        ctx["held"] = True
        return ctx

    @node
    async def more(ctx):
        ctx["more"] = True
        return ctx

    ctx = hold(Context())
    runner = threading.Thread(target=ctx.run)
    runner.start()
    assert started.wait(10)
    with pytest.raises(RuntimeError, match="running its nodes"):
        more(ctx)
    release.set()
    runner.join(10)
    assert ctx.to_dict() == {"held": True}
    assert more(ctx)["more"] is True  # once the run returned, queueing works again
