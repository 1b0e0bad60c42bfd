"""Reference-counted shared-memory segments: a big result of a single call is held by
the caller while an object on it lives, sent on to other workers by reference (nothing
written again), unlinked when the last object on it is collected, and swept once its
owner is dead."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from twat_mp import ProcessPool, ThreadPool
from twat_mp._engine import serialization, shm

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


def mine() -> set[str]:
    """Segments this process answers for."""
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"twat-mp-{os.getpid()}-")}


def mapped_at(array: np.ndarray) -> tuple[str, int] | None:
    """The file an array's memory is mapped from (" (deleted)" kept), and the array's
    offset in it; None for memory of no file."""
    address = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                if len(fields) < 6 or not fields[5].startswith("/"):
                    return None
                return fields[5].rstrip("\n"), address - start + int(fields[2], 16)
    return None


def make(nbytes: int, seed: float = 1.0) -> np.ndarray:
    return np.arange(nbytes // 8, dtype=np.float64) * seed


def where(array: np.ndarray) -> tuple[tuple[str, int] | None, float, list[float]]:
    """In a worker: where the argument arrived, and what it holds."""
    return mapped_at(array), float(array.sum()), array[:3].tolist()


def scribble(array: np.ndarray) -> float:
    array[:] = -1.0  # a private copy-on-write page: the sender's array is unchanged
    return float(array.sum())


@pytest.fixture(scope="module")
def pool():
    with ProcessPool(nodes=2) as pool:
        yield pool


@pytest.fixture(autouse=True)
def _collect():
    yield
    gc.collect()


needs_pagemap = pytest.mark.skipif(not shm._pagemap_ok(), reason="no /proc/self/pagemap here")


@needs_pagemap
def test_a_result_sent_on_travels_by_reference_and_goes_with_its_last_object(pool):
    before = mine()
    result = pool.submit(make, 4 * MIB, 3.0).result()
    (held,) = mine() - before  # kept, renamed to this process's name
    path, offset = mapped_at(result)
    assert path == f"{shm.SHM_DIR}/{held}" and offset == 0

    written, referenced = shm.bytes_written, shm.bytes_referenced
    seen, total, head = pool.submit(where, result).result()
    assert seen == (path, 0)  # the worker mapped the very segment
    assert total == float(result.sum()) and head == [0.0, 3.0, 6.0]
    assert shm.bytes_written == written  # nothing written to send it
    assert shm.bytes_referenced == referenced + 4 * MIB
    assert mine() - before == {held}  # the task's cleanup left the held segment alone

    view = result[10:]  # still an object on the segment
    del result
    gc.collect()
    assert mine() - before == {held}
    del view
    gc.collect()
    assert mine() == before


@needs_pagemap
def test_a_contiguous_slice_is_sent_by_reference(pool):
    result = pool.submit(make, 4 * MIB).result()
    path, _ = mapped_at(result)
    written = shm.bytes_written
    seen, total, head = pool.submit(where, result[1000:]).result()
    assert seen == (path, 8000) and head == [1000.0, 1001.0, 1002.0]
    assert total == float(result[1000:].sum())
    rows = result.reshape(512, 1024)[100:400]  # contiguous rows of a 2-D view
    seen, total, _ = pool.submit(where, rows).result()
    assert seen == (path, 100 * 1024 * 8) and total == float(rows.sum())
    assert shm.bytes_written == written
    gathered = result[::2]  # not contiguous: copied into the pickle, as ever
    seen, total, _ = pool.submit(where, gathered).result()
    assert seen is None and total == float(gathered.sum())


def make_tensor(nbytes: int):
    import torch

    return torch.arange(nbytes // 4, dtype=torch.float32)


def tensor_where(tensor) -> tuple[tuple[str, int] | None, float]:
    return mapped_at(tensor.numpy()), float(tensor.sum())


@needs_pagemap
def test_a_tensor_result_is_sent_on_by_reference(pool):
    pytest.importorskip("torch")
    result = pool.submit(make_tensor, 4 * MIB).result()
    path, _ = mapped_at(result.numpy())
    written = shm.bytes_written
    assert pool.submit(tensor_where, result).result() == ((path, 0), float(result.sum()))
    assert shm.bytes_written == written


def test_a_worker_writing_to_what_it_was_sent_changes_nothing_here(pool):
    result = pool.submit(make, 4 * MIB).result()
    expected = result.copy()
    assert pool.submit(scribble, result).result() == -float(result.size)
    assert np.array_equal(result, expected)
    _, total, head = pool.submit(where, result).result()  # the segment is unchanged too
    assert total == float(expected.sum()) and head == [0.0, 1.0, 2.0]


def test_a_result_written_to_here_is_sent_as_it_is_now(pool):
    result = pool.submit(make, 4 * MIB).result()
    path, _ = mapped_at(result)
    result[-1] = -5.0  # this process's private copy of one page: the segment is stale there
    written = shm.bytes_written
    seen, total, _ = pool.submit(where, result).result()
    assert seen is not None and seen[0] != path  # a new segment
    assert total == float(result.sum())
    assert shm.bytes_written == written + 4 * MIB
    seen, total, _ = pool.submit(where, result[: MIB // 8]).result()  # unwritten pages: by reference
    assert seen == (path, 0) and total == float(result[: MIB // 8].sum())


def test_values_below_the_threshold_go_through_the_pipe_as_before(pool):
    before = mine()
    written, referenced = shm.bytes_written, shm.bytes_referenced
    result = pool.submit(make, MIB // 2).result()
    assert mapped_at(result) is None and mine() == before
    seen, total, _ = pool.submit(where, result).result()
    assert seen is None and total == float(result.sum())
    assert (shm.bytes_written, shm.bytes_referenced) == (written, referenced)


def test_map_results_still_release_their_segments_at_once(pool):
    before = mine()
    results = pool.map(make, [4 * MIB] * 4)
    assert all(mapped_at(r) is not None and mapped_at(r)[0].endswith(" (deleted)") for r in results)
    assert mine() == before
    assert float(pool.map(np.sum, results)[1]) == float(results[1].sum())


@needs_pagemap
def test_share_holds_a_value_here_so_sends_refer_to_it(pool):
    before = mine()
    original = make(4 * MIB, 2.0)
    shared = serialization.share(original)
    assert shared is not original and np.array_equal(shared, original)
    path, _ = mapped_at(shared)
    assert mine() - before == {os.path.basename(path)}
    written = shm.bytes_written
    assert pool.submit(where, shared).result()[0] == (path, 0)
    assert shm.bytes_written == written
    small = np.ones(10)
    assert serialization.share(small) is small  # nothing big: returned as it is
    del shared
    gc.collect()
    assert mine() == before


def test_thread_pools_pass_the_object_itself():
    array = make(4 * MIB)
    before = mine()
    with ThreadPool(nodes=2) as threads:
        assert threads.submit(lambda a: a, array).result() is array
    assert mine() == before


def test_without_shared_memory_results_come_through_the_pipe(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path / "missing"))
    with ProcessPool(nodes=1) as pipe_pool:
        result = pipe_pool.submit(make, 4 * MIB).result()
        assert mapped_at(result) is None
        seen, total, _ = pipe_pool.submit(where, result).result()
    assert seen is None and total == float(result.sum())


# -- owners that die ------------------------------------------------------------------------
OWNER = textwrap.dedent("""
    import sys
    import numpy as np
    from twat_mp._engine import serialization
    shared = serialization.share(np.ones(1 << 19))
    print("ready", flush=True)
    sys.stdin.read()
""")

START = textwrap.dedent("""
    from twat_mp import ProcessPool
    with ProcessPool(nodes=1) as pool:
        assert pool.map(abs, [-1]) == [1]
""")


@pytest.mark.timeout(120)
def test_the_segments_of_a_killed_owner_are_swept_at_the_next_start():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == b"ready\n"
        left = [n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"twat-mp-{owner.pid}-")]
        assert len(left) == 1
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert os.path.exists(f"{shm.SHM_DIR}/{left[0]}")  # nobody unlinked it
    subprocess.run([sys.executable, "-c", START], check=True, timeout=100)
    assert not os.path.exists(f"{shm.SHM_DIR}/{left[0]}")


def test_the_sweep_spares_the_living_other_namespaces_and_other_files(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path))
    namespace = shm._namespace()
    if not namespace:
        pytest.skip("no pid namespace to tell our pids by")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead = int(done.stdout)
    names = {
        "dead": f"twat-mp-{dead}-{namespace}-0123abcd-{dead}-7",
        "dead-held": f"twat-mp-{dead}-{namespace}-89abcdef-3",
        "alive": f"twat-mp-{os.getppid()}-{namespace}-0123abcd-5",
        "mine": f"twat-mp-{os.getpid()}-{namespace}-0123abcd-5",
        "elsewhere": f"twat-mp-{dead}-{namespace + 1}-0123abcd-5",
        "other": f"sem.twat-mp-{dead}-{namespace}-0123abcd",
        "probe": f".twat-mp-probe-{dead}-0123abcd",
    }
    for name in names.values():
        (tmp_path / name).touch()
    assert sorted(shm.sweep_dead()) == sorted(f"{tmp_path}/{names[k]}" for k in ("dead", "dead-held"))
    assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in names.items() if not k.startswith("dead"))


def test_a_forked_child_neither_sends_by_reference_nor_unlinks_what_its_parent_holds():
    shared = serialization.share(make(4 * MIB))
    path, _ = mapped_at(shared)
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        ok = shm.reference(memoryview(shared).cast("B")) is None
        del shared
        gc.collect()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(path)


# -- leaks a review found -------------------------------------------------------------------------
def big_result(i: int) -> np.ndarray:
    return np.full(300_000, float(i))  # 2.4 MB: through shared memory


def test_an_imap_stopped_early_leaves_no_segment():
    import asyncio
    import time

    from twat_mp import AsyncMultiPool

    before = mine()
    with ProcessPool(nodes=2) as two:
        for _ in range(3):
            for _first in two.imap(big_result, range(16), chunksize=1):
                break  # the other results arrive, and are never read
        two.map(abs, [1])

    async def early():
        async with AsyncMultiPool(processes=2) as apool:
            async for _first in apool.imap(_abig, range(16), chunksize=1):
                break

    asyncio.run(early())
    gc.collect()
    deadline = time.monotonic() + 10
    while mine() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mine() - before == set()


async def _abig(i: int) -> np.ndarray:
    return big_result(i)


def _held_by_worker() -> list[str]:
    return list(shm._kept)


def test_a_worker_lets_a_released_shared_array_go():
    from twat_mp import share

    with ProcessPool(nodes=1) as one:
        data = share(np.ones(1 << 18))
        one.apply(float, data[0])
        one.apply(np.sum, data)
        assert one.apply(_held_by_worker)  # kept between tasks while its owner holds it
        del data
        gc.collect()
        one.apply(abs, 1)  # a task: the worker prunes after it
        assert one.apply(_held_by_worker) == []


def _slow(x: object) -> None:
    import time

    time.sleep(5)


def test_cancelled_submits_release_what_they_would_have_sent():
    from twat_mp import share

    before = mine()
    with ProcessPool(nodes=1) as one:
        running = one.submit(_slow, 0)
        for _ in range(10):
            data = share(np.ones(1 << 17))
            future = one.submit(np.sum, data)
            assert future.cancel()
            del data, future
        gc.collect()
        assert not shm._pins or all(path not in mine() for path in shm._pins)
        running.cancel()
        one.terminate()
    gc.collect()
    assert mine() - before == set()


class _DieWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def _result_then_death(_: object) -> tuple[np.ndarray, _DieWhilePickled]:
    return np.ones(1_000_000), _DieWhilePickled()  # its array is written, then it dies


def test_segments_a_dying_worker_wrote_are_swept_when_the_pool_closes():
    before = mine()
    with ProcessPool(nodes=1) as one:
        for _ in range(3):
            with pytest.raises(Exception):  # noqa: B017 - WorkerCrashedError
                one.apply(_result_then_death, 0)
    assert mine() - before == set()
