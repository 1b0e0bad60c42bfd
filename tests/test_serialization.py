"""How objects cross the process boundary: tensors of every dtype through shared memory,
the pipe when shared memory is missing or full, the narrowed dill fallback, the cached
function payload (fresh when a notebook rebinds a global), and ``__main__`` functions
that call the decorators (issue 7, bugs 4 and 8, and 1b)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twat_mp import ProcessPool
from twat_mp._engine import shm
from twat_mp._engine.serialization import dumps, dumps_function, loads
from twat_mp.errors import SerializationError

MIB = 1 << 20


def our_segments(directory: str = "/dev/shm") -> set[str]:
    return {name for name in os.listdir(directory) if name.startswith("twat-mp-")}


def backed_by_segment(obj) -> bool:
    """Whether the memory of an array or tensor lies in a mapped twat-mp segment."""
    address = obj.data_ptr() if hasattr(obj, "data_ptr") else obj.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return len(fields) == 6 and "twat-mp-" in fields[5]
    return False


def echo(obj):
    """Report how the argument arrived, and send back a fresh copy of it."""
    return backed_by_segment(obj), obj.clone() if hasattr(obj, "clone") else obj.copy()


def doubled(array):
    return array * 2


# -- bug 4: tensors of every dtype through shared memory ----------------------------------
# Names, so that the tests without torch still run where it is not installed.
DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64",
          "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "complex32", "uint16", "uint32", "uint64"]
REQUIRED = set(DTYPES[:12])  # the rest depend on the torch version


def dtype_of(name: str):
    torch = pytest.importorskip("torch")
    if not hasattr(torch, name) and name not in REQUIRED:
        pytest.skip(f"this torch has no {name}")
    return getattr(torch, name)


def big_tensor(dtype, nbytes: int = MIB + 4096):
    """Random bits of ``dtype`` (NaNs included for floats: compared bit for bit)."""
    import torch

    if dtype is torch.bool:
        return torch.randint(0, 2, (nbytes,), dtype=torch.uint8).bool()
    size = dtype.itemsize
    return torch.randint(0, 256, (nbytes // size * size,), dtype=torch.uint8).view(dtype)


def same_bits(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and a.view(torch.uint8).equal(b.view(torch.uint8))


@pytest.mark.parametrize("name", DTYPES)
def test_a_tensor_of_any_dtype_pickles_into_shared_memory_without_dill(name):
    tensor = big_tensor(dtype_of(name))
    prefix = shm.new_prefix()
    payload, used_dill = dumps([tensor], "items", prefix)
    assert not used_dill
    assert payload[:1] == shm.MARK and len(payload) < 10_000
    (back,) = loads(payload, unlink=True)
    assert same_bits(back, tensor)
    assert not [n for n in os.listdir(shm.SHM_DIR) if f"{shm.SHM_DIR}/{n}".startswith(prefix)]


@pytest.mark.timeout(120)
def test_tensors_of_every_dtype_cross_a_pool_both_ways_through_shared_memory():
    torch = pytest.importorskip("torch")
    before = our_segments()
    dtypes = [getattr(torch, name) for name in DTYPES if name in REQUIRED or hasattr(torch, name)]
    tensors = [big_tensor(dtype) for dtype in dtypes]
    with ProcessPool(nodes=2) as pool:
        out = pool.map(echo, tensors, chunksize=1)
    for dtype, tensor, (arrived_in_segment, back) in zip(dtypes, tensors, out):
        assert arrived_in_segment, f"{dtype} went to the worker through the pipe"
        assert backed_by_segment(back), f"{dtype} came back through the pipe"
        assert same_bits(back, tensor), dtype
    assert our_segments() == before


@pytest.mark.parametrize("make", [
    lambda torch: torch.arange(MIB, dtype=torch.float32)[::2],  # not contiguous
    lambda torch: torch.arange(MIB, dtype=torch.float32).requires_grad_(),
    lambda torch: torch.zeros(3, 3, dtype=torch.complex64).conj(),
    lambda torch: torch.ones(4, dtype=torch.bfloat16),  # small: in-band, still no dill
], ids=["strided", "requires_grad", "conj", "small-bfloat16"])
def test_other_tensors_keep_torchs_own_reduction(make):
    torch = pytest.importorskip("torch")
    tensor = make(torch)
    payload, used_dill = dumps(tensor, "items", shm.new_prefix())
    assert not used_dill
    back = loads(payload, unlink=True)
    assert torch.equal(back.detach().resolve_conj(), tensor.detach().resolve_conj())
    assert back.requires_grad == tensor.requires_grad


class FailsToReduce:
    def __reduce__(self):
        raise ValueError("broken __reduce__")


class HoldsALambda:
    def __init__(self):
        self.fn = lambda x: x + 1


def test_dill_fallback_is_only_for_what_pickle_refuses():
    payload, used_dill = dumps(HoldsALambda(), "items", shm.new_prefix())
    assert used_dill and loads(payload).fn(1) == 2
    with pytest.raises(SerializationError, match="broken __reduce__") as info:
        dumps([FailsToReduce()], "items", shm.new_prefix())
    assert isinstance(info.value.__cause__, ValueError)


# -- bug 4: no /dev/shm, or a small one ---------------------------------------------------
def mount_tmpfs(path, options: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(options: str):
        path = tmp_path / f"tmpfs{len(mounted)}"
        mount_tmpfs(path, options)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:  # lazily: a result array may still map a (deleted) segment
        subprocess.run(["umount", "-l", str(path)], check=True)


def arrays(count: int, nbytes: int) -> list[np.ndarray]:
    return [np.full(nbytes // 8, i, dtype=np.float64) for i in range(count)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["missing", "read-only"])
def test_without_a_writable_shm_dir_large_arrays_go_through_the_pipe(tmp_path, tmpfs, monkeypatch, where):
    directory = tmp_path / "missing" if where == "missing" else tmpfs("ro,size=4m")
    monkeypatch.setattr(shm, "SHM_DIR", str(directory))
    assert not shm.available() and not shm.AVAILABLE  # read by a dispatcher as it starts
    before = our_segments()
    data = arrays(6, 3 * MIB)
    with ProcessPool(nodes=2) as pool:
        out = pool.map(echo, data)
        assert all(np.array_equal(r, a * 2) for r, a in zip(pool.map(doubled, data), data))
    assert [via_segment for via_segment, _ in out] == [False] * 6
    assert all(np.array_equal(back, a) for (_, back), a in zip(out, data))
    assert our_segments() == before


def test_a_segment_that_does_not_fit_falls_back_to_the_pipe_and_says_so(tmpfs, monkeypatch):
    from loguru import logger as loguru_logger

    from twat_mp import set_debug_mode

    messages: list[str] = []  # a sink of its own: loguru may already have handlers of earlier tests
    sink = loguru_logger.add(messages.append, level="DEBUG", format="{message}")

    directory = tmpfs("size=2m")
    monkeypatch.setattr(shm, "SHM_DIR", str(directory))
    prefix = shm.new_prefix()
    with pytest.raises(OSError):
        shm.write_segment(prefix, memoryview(bytes(3 * MIB)))
    assert not os.listdir(directory)  # nothing half-written is left

    set_debug_mode(True)
    try:
        small, big = np.ones(MIB // 4 * 5 // 8), np.ones(3 * MIB // 8)
        payload, _ = dumps([small], "items", prefix)
        assert payload[:1] == shm.MARK and not any("through the pipe" in m for m in messages)  # 1.25 MB fits
        (back,) = loads(payload, unlink=True)
        assert np.array_equal(back, small)
        payload, used_dill = dumps([big], "items", prefix)
        assert payload[:1] != shm.MARK and not used_dill  # 3 MB does not: in-band
        assert np.array_equal(loads(payload)[0], big)
    finally:
        set_debug_mode(False)
        loguru_logger.remove(sink)
    assert any("items sent through the pipe, not shared memory" in m for m in messages)
    assert not os.listdir(directory)


@pytest.mark.timeout(120)
def test_a_small_shm_never_crashes_a_worker(tmpfs, monkeypatch):
    directory = tmpfs("size=2m")
    monkeypatch.setattr(shm, "SHM_DIR", str(directory))
    data = arrays(12, MIB + MIB // 2)  # one fits, two do not: both ways, some of each
    with ProcessPool(nodes=2) as pool:
        for _ in range(3):
            out = pool.map(echo, data, chunksize=1)
            assert all(np.array_equal(back, a) for (_, back), a in zip(out, data))
            assert all(np.array_equal(r, a * 2) for r, a in zip(pool.map(doubled, data, chunksize=1), data))
    del out
    assert not our_segments(str(directory))


# -- 1b: the function's payload -----------------------------------------------------------
def notebook(source: str) -> dict:
    """Run ``source`` as a notebook cell would: its functions belong to ``__main__``
    (by value), and later assignments to the namespace are later cells."""
    namespace = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(source), f"<cell-{uuid.uuid4().hex}>", "exec"), namespace)
    return namespace


def run_in(payload: bytes, *args):
    return loads(payload)(*args)


def test_an_importable_function_is_a_plain_pickle_by_name():
    payload = dumps_function(doubled)
    assert payload == pickle.dumps(doubled, pickle.HIGHEST_PROTOCOL)
    assert dumps_function(len) == pickle.dumps(len, pickle.HIGHEST_PROTOCOL)


def test_a_main_payload_is_reused_until_something_it_reads_changes():
    cell = notebook("""
        import math
        OFFSET = 3
        def helper(x):
            return x * SCALE
        SCALE = 2
        def f(x, y=1, *, z=0):
            return helper(x) + OFFSET + y + z + math.floor(0.5)
        def make():
            k = 1
            def g(x):
                return x + k
            def set_k(value):
                nonlocal k
                k = value
            return g, set_k
        g, set_k = make()
    """)
    f, g = cell["f"], cell["g"]
    first = dumps_function(f)
    assert dumps_function(f) is first  # nothing changed: the same bytes
    assert run_in(first, 1) == 2 + 3 + 1
    cell["OFFSET"] = 100  # a later cell rebinds a global
    assert run_in(dumps_function(f), 1) == 2 + 100 + 1
    cell["SCALE"] = 10  # a global of a helper
    assert run_in(dumps_function(f), 1) == 10 + 100 + 1
    f.__defaults__ = (5,)
    assert run_in(dumps_function(f), 1) == 10 + 100 + 5
    f.__kwdefaults__["z"] = 7
    assert run_in(dumps_function(f), 1) == 10 + 100 + 5 + 7
    cell["helper"] = lambda x: -x  # the helper itself redefined
    assert run_in(dumps_function(f), 1) == -1 + 100 + 5 + 7
    assert run_in(dumps_function(g), 1) == 2
    cell["set_k"](41)  # a closure cell changed
    assert run_in(dumps_function(g), 1) == 42
    del cell["OFFSET"]  # unbound: the worker sees the NameError too
    with pytest.raises(NameError):
        run_in(dumps_function(f), 1)


def test_a_lambda_made_anew_on_each_call_finds_its_payload():
    cell = notebook("""
        def adder(k):
            return lambda x: x + k
    """)
    first = dumps_function(cell["adder"](1))
    assert dumps_function(cell["adder"](1)) is first  # a new lambda, alike in everything
    other = dumps_function(cell["adder"](1000))
    assert other is not first and run_in(other, 1) == 1001 and run_in(first, 1) == 2


def test_a_function_reading_a_mutable_global_is_pickled_each_time():
    cell = notebook("""
        DATA = [1, 2]
        def total(x):
            return x + sum(DATA)
    """)
    assert run_in(dumps_function(cell["total"]), 0) == 3
    cell["DATA"].append(10)  # changed in place: no rebinding to see
    assert run_in(dumps_function(cell["total"]), 0) == 13


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5)), min_size=1, max_size=8))
def test_every_rebinding_is_seen(values):
    cell = notebook("""
        def read(_):
            return VALUE
    """)
    for value in values:
        cell["VALUE"] = value
        assert run_in(dumps_function(cell["read"]), None) == value


def test_recursive_functions_and_self_holding_closures_pickle():
    cell = notebook("""
        def is_even(n):
            return True if n == 0 else is_odd(n - 1)
        def is_odd(n):
            return False if n == 0 else is_even(n - 1)
        def factory(n):
            def inner(fn=None):
                return inner if fn is None else n
            return inner
    """)
    assert run_in(dumps_function(cell["is_even"]), 10) is True
    inner = loads(dumps_function(cell["factory"](7)))
    assert inner() is inner and inner(len) == 7


def test_classes_by_value_whose_methods_refer_to_the_class():
    cell = notebook("""
        class Base:
            def value(self):
                return 1
        class Child(Base):
            BONUS = 10
            def value(self):
                return super().value() + Child.BONUS
            def clone(self):
                return Child()
        def use(x):
            return Child().clone().value() + x
    """)
    assert run_in(dumps_function(cell["use"]), 5) == 16
    cell["Child"].BONUS = 20  # a class attribute changed in place: pickled anew
    assert run_in(dumps_function(cell["use"]), 5) == 26


@pytest.mark.timeout(60)
def test_workers_see_rebound_globals_through_a_real_pool():
    cell = notebook("""
        OFFSET = 1
        def scale(x):
            return x * FACTOR
        FACTOR = 2
        def shifted(x):
            return scale(x) + OFFSET
    """)
    shifted = cell["shifted"]
    with ProcessPool(nodes=2) as pool:
        assert pool.map(shifted, range(4)) == [1, 3, 5, 7]
        assert pool.map(shifted, range(4)) == [1, 3, 5, 7]  # re-used payload
        cell["OFFSET"] = 100
        assert pool.map(shifted, range(4)) == [100, 102, 104, 106]
        cell["FACTOR"] = -1
        assert pool.map(shifted, range(4)) == [100, 99, 98, 97]
        shifted.__defaults__ = None
        cell["scale"] = lambda x: x * 1000
        assert pool.map(shifted, range(3)) == [100, 1100, 2100]


# -- bug 8: __main__ scripts that call the decorators inside a shipped function -----------
BUG8_SCRIPT = textwrap.dedent("""
    from twat_mp import ProcessPool, pmap

    def square(x):
        return x * x

    def outer(n):
        return sum(pmap(square)(range(n)))

    class Model:
        def __init__(self, k):
            self.k = k

        def scale(self, x):
            return x * self.k

        def run(self, xs):
            return pmap(self.scale)(xs)

    def is_even(n):
        return True if n == 0 else is_odd(n - 1)

    def is_odd(n):
        return False if n == 0 else is_even(n - 1)

    if __name__ == "__main__":  # spawn workers import this script
        model = Model(3)
        with ProcessPool(nodes=2, start_method=START) as pool:
            print(pool.map(outer, [3, 4, 5]))
            print(pool.map(model.scale, range(4)))
            print(pool.map(model.run, [[1, 2], [3]]))
            print(pool.map(is_even, [4, 7]))
        print(pmap(model.scale)(range(3)))
        print(pmap(outer)([2, 3]))
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_main_functions_that_use_the_decorators_can_be_shipped(tmp_path, start_method):
    script = tmp_path / "bug8.py"
    script.write_text(BUG8_SCRIPT.replace("START", repr(start_method)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[5, 14, 30]", "[0, 3, 6, 9]", "[[3, 6], [9]]", "[True, False]",
                                       "[0, 3, 6]", "[1, 5]"]
