"""Zero-copy shared data (``twat_mp.shared``): ``share``, ``shared_array`` and
``shared_tensor`` put data in writable shared segments that workers map by reference,
whose writes the caller sees, and that go when the process that made them drops them,
exits, is interrupted or is killed; a share that does not fit is a clear error."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import wait_gone
from twat_mp import ProcessPool, Runtime, op
from twat_mp._engine import serialization, shm
from twat_mp.errors import SharedMemoryError, TwatMPError
from twat_mp.shared import is_shared, share, shared_array, shared_tensor

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


def shared_files(pid: int | None = None) -> set[str]:
    """Shared segments of ``pid`` (default: this process) under SHM_DIR."""
    prefix = f"twat-mp-{os.getpid() if pid is None else pid}-"
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix) and "-shared-" in n}


def path_of(x: object) -> str:
    """The segment a shared array or tensor lies in."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        address = x.untyped_storage().data_ptr()
    else:
        address = x.__array_interface__["data"][0]  # type: ignore[attr-defined]
    found = shm._shared_at(address, 0)
    assert found is not None
    return found[0].path


def wait_for(condition, within: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(autouse=True)
def _nothing_left():
    before = shared_files()
    yield
    gc.collect()
    assert shared_files() - before == set()


@pytest.fixture(scope="module")
def pool():
    with ProcessPool(nodes=2) as pool:
        yield pool


# -- functions workers run (by name) ---------------------------------------------------------
def fill_row(args: tuple[np.ndarray, int]) -> int:
    array, row = args
    array[row] = row + 1
    return os.getpid()


def add_one(x):
    x += 1
    return None


def describe(x) -> tuple[bool, str, float]:
    """In a worker: whether it arrived shared, the file it is mapped from, its sum."""
    return is_shared(x), mapped_from(x), float(x.sum())


def mapped_from(x) -> str:
    torch = sys.modules.get("torch")
    address = x.data_ptr() if torch is not None and isinstance(x, torch.Tensor) else x.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def echo(x):
    return x


def make_shared(n: int) -> tuple[int, np.ndarray]:
    out = shared_array(n, dtype=np.int64)
    out[:] = np.arange(n)
    return os.getpid(), out


_kept: list[object] = []


def keep(x) -> int:
    _kept.append(x)  # hold it in the worker, then be killed
    return os.getpid()


@op(kind="process")
def scale_in_place(array: np.ndarray, factor: float) -> float:
    array *= factor
    return float(array.sum())


# -- share, shared_array, shared_tensor, is_shared -------------------------------------------------
@pytest.mark.parametrize("dtype", ["bool", "int8", "uint16", "int32", "uint64", "float16", "float32", "float64",
                                   "complex64", "complex128", "datetime64[ns]", "S5", [("a", "i4"), ("b", "f8")]])
def test_share_keeps_type_shape_dtype_and_values_of_numpy_arrays(dtype):
    source = np.zeros((3, 4), dtype=dtype)
    source.view(np.uint8)[...] = np.arange(source.nbytes, dtype=np.uint8).reshape(3, -1)
    out = share(source)
    assert type(out) is np.ndarray and out.shape == (3, 4) and out.dtype == source.dtype
    assert out.tobytes() == source.tobytes() and is_shared(out) and not is_shared(source)
    assert not np.shares_memory(out, source) and out.flags.writeable
    assert share(out) is out  # already shared: as it is


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_share_copies_strided_and_fortran_arrays_once():
    base = np.arange(60.0).reshape(6, 10)
    view = base[::2, 1::3]
    out = share(view)
    assert np.array_equal(out, view) and out.flags.c_contiguous and is_shared(out)
    fortran = share(np.asfortranarray(base))
    assert fortran.flags.f_contiguous and np.array_equal(fortran, base)
    assert is_shared(out[::-1, 1]) and is_shared(out[1:2])  # views of it are shared too
    matrix = share(np.asmatrix(base))
    assert type(matrix) is np.matrix and is_shared(matrix)


def test_shared_array_is_zero_filled_and_refuses_objects():
    a = shared_array((2, 3))
    assert a.dtype == np.float64 and a.shape == (2, 3) and not a.any() and is_shared(a)
    assert shared_array(5, dtype=np.uint8).tolist() == [0] * 5
    assert shared_array(0).shape == (0,) and shared_array((3, 0), order="F").shape == (3, 0)
    with pytest.raises(TypeError, match="Python objects"):
        shared_array(3, dtype=object)
    with pytest.raises(TypeError, match="Python objects"):
        share(np.array([object()]))
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        share([1, 2, 3])
    with pytest.raises(ValueError, match="negative"):
        shared_array((2, -1))


def test_shared_tensors_of_every_dtype():
    torch = pytest.importorskip("torch")
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
              torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
    dtypes += [getattr(torch, name) for name in ("uint16", "uint32", "uint64", "float8_e4m3fn") if hasattr(torch, name)]
    for dtype in dtypes:
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}
        size = torch.empty((), dtype=dtype).element_size()
        source = torch.randint(0, 100, (3, 5 * size), dtype=torch.uint8).view(dtype)
        if dtype.is_floating_point or dtype.is_complex:
            source.view(bits[min(size, 8)]).bitwise_and_(0x3F)  # no NaN payloads: compare as bits anyway
        out = share(source.t())  # a transposed view: copied contiguous
        assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == source.t().shape
        assert out.is_contiguous() and is_shared(out) and not is_shared(source), dtype
        assert bytes(out.contiguous().view(torch.uint8).flatten().tolist()) == \
            bytes(source.t().contiguous().view(torch.uint8).flatten().tolist()), dtype
        assert share(out) is out
        zeros = shared_tensor((2, 3), dtype)
        assert zeros.dtype == dtype and zeros.shape == (2, 3) and is_shared(zeros)
        assert not zeros.view(torch.uint8).any()
    assert shared_tensor(4).dtype == torch.float32 and shared_tensor((0, 2)).shape == (0, 2)
    grad = share(torch.ones(3, requires_grad=True))
    assert not grad.requires_grad and is_shared(grad)
    with pytest.raises(ValueError, match="CPU tensors"):
        share(torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match="dense"):
        share(torch.eye(3).to_sparse())


def test_the_module_imports_without_numpy_or_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # not installed
        import twat_mp, twat_mp.shared
        assert "numpy" not in sys.modules, "numpy imported"
        import numpy as np
        a = twat_mp.shared.share(np.ones(3))
        assert twat_mp.shared.is_shared(a) and a.sum() == 3
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


# -- workers write, the caller sees; nothing is copied -----------------------------------------------
def test_map_and_submit_write_into_a_shared_array(pool):
    array = shared_array((8, 3))
    written = shm.bytes_written
    pids = pool.map(fill_row, [(array, row) for row in range(8)], chunksize=1)
    assert array.tolist() == [[row + 1.0] * 3 for row in range(8)]
    assert os.getpid() not in pids
    assert pool.submit(add_one, array).result() is None
    assert array[:, 0].tolist() == [row + 2.0 for row in range(8)]
    pool.map(add_one, [array[:, 1], array[::-1, 2]])  # strided views: by reference too
    assert array[0].tolist() == [2.0, 3.0, 3.0]
    assert shm.bytes_written == written  # nothing was written to a new segment


def test_torch_tensors_written_by_workers(pool):
    torch = pytest.importorskip("torch")
    tensor = shared_tensor((4, 4), torch.bfloat16)
    pool.map(add_one, [tensor[row] for row in range(4)] + [tensor[:, 0]])
    assert tensor[:, 0].tolist() == [2.0] * 4 and tensor[:, 1:].eq(1).all()
    pool.submit(add_one, tensor).result()
    assert tensor.eq(torch.tensor([3.0] + [2.0] * 3, dtype=torch.bfloat16)).all()
    flags = share(torch.zeros(3, dtype=torch.bool))
    pool.submit(torch.Tensor.fill_, flags, True).result()
    assert flags.all()


def test_a_process_op_writes_into_a_shared_array():
    array = share(np.ones(1000))
    with Runtime():
        assert scale_in_place.go(array, 3.0).result(timeout=30) == 3000.0
    assert array.sum() == 3000.0


def test_a_big_tensor_read_by_eight_items_is_never_copied(pool):
    torch = pytest.importorskip("torch")
    tensor = shared_tensor(25 * MIB // 4 * 4)  # 100 MiB of float32
    tensor[:1000] = 1.0
    path = path_of(tensor)
    written, referenced = shm.bytes_written, shm.bytes_referenced
    seen = pool.map(describe, [tensor] * 8, chunksize=1)
    assert shm.bytes_written == written
    assert shm.bytes_referenced - referenced == 8 * tensor.numel() * 4
    assert seen == [(True, path, 1000.0)] * 8  # each worker mapped the same file, shared
    assert torch.equal(tensor[:1000], torch.ones(1000))


def test_a_worker_returns_a_shared_array_it_was_given_by_reference(pool):
    array = share(np.arange(10))
    back = pool.submit(echo, array).result()
    assert is_shared(back) and np.shares_memory(back, array)
    del back


def test_a_shared_array_made_in_a_worker_comes_back_as_a_copy(pool):
    pid, back = pool.submit(make_shared, 1000).result()
    assert back.tolist() == list(range(1000)) and not is_shared(back)
    # the worker's segment goes with its last object there (a worker drops a task's values
    # when it runs the next one)
    assert wait_for(lambda: not (pool.map(echo, range(4), chunksize=1) and shared_files(pid)))


def test_items_that_need_dill_still_share(pool):
    array = shared_array(4)
    pool.map(lambda pair: pair[1].__setitem__(slice(None), pair[0]()), [(lambda: 5.0, array)])
    assert array.tolist() == [5.0] * 4


def test_a_thread_pool_shares_without_pickling():
    from twat_mp import ThreadPool

    array = shared_array(4)
    with ThreadPool(nodes=2) as threads:
        threads.map(add_one, [array[i:i + 1] for i in range(4)])
    assert array.tolist() == [1.0] * 4


# -- release ----------------------------------------------------------------------------------
def test_dropping_the_last_object_removes_the_segment():
    array = share(np.ones(MIB))
    view = array[10:20]
    path = path_of(array)
    assert os.path.exists(path)
    del array
    gc.collect()
    assert os.path.exists(path)  # the view still holds it
    del view
    gc.collect()
    assert not os.path.exists(path) and path not in shm._shared


def test_the_segment_goes_after_a_worker_holding_it_was_killed(pool):
    array = shared_array(1000)
    path = path_of(array)
    pid = pool.submit(keep, array).result()
    os.kill(pid, signal.SIGKILL)
    assert not wait_gone({pid})
    assert os.path.exists(path)
    # the pool goes on (retries: the manager may not have seen the death yet), the segment still works
    assert pool.map(add_one, [array], retries=2) == [None]
    assert array.sum() == 1000.0
    del array
    gc.collect()
    assert not os.path.exists(path)


def test_a_killed_owner_is_swept_by_the_next_process():
    code = textwrap.dedent("""
        import os, signal, sys
        import numpy as np
        from twat_mp.shared import share
        a = share(np.ones(1000))
        print([n for n in os.listdir("/dev/shm") if n.startswith(f"twat-mp-{os.getpid()}-")][0], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    path = f"{shm.SHM_DIR}/{done.stdout.strip()}"
    assert os.path.exists(path)  # left by the killed owner
    sweep = "from twat_mp._engine import shm; shm.own_name()"  # what every twat-mp process does first
    subprocess.run([sys.executable, "-c", sweep], check=True, timeout=60)
    assert not os.path.exists(path)


def test_nothing_is_left_after_ctrl_c_in_a_map():
    code = textwrap.dedent("""
        import gc, os, sys, threading, time
        import numpy as np
        from twat_mp import ProcessPool
        from twat_mp.shared import shared_array

        def wait_busy(args):
            flags, index = args
            flags[index] = 1
            while True:  # until the caller's Ctrl-C ends the pool
                time.sleep(0.01)

        flags = shared_array(2, dtype=np.int64)
        path = [n for n in os.listdir("/dev/shm") if n.startswith(f"twat-mp-{os.getpid()}-")][0]

        def announce():
            while flags.sum() < 2:  # both workers are in the map, writing to the array
                time.sleep(0.01)
            print("ready", path, flush=True)

        threading.Thread(target=announce, daemon=True).start()
        try:
            with ProcessPool(nodes=2) as pool:
                pool.map(wait_busy, [(flags, 0), (flags, 1)], chunksize=1)
        except KeyboardInterrupt:
            print("interrupted", os.path.exists(f"/dev/shm/{path}"), flush=True)
        del flags
        gc.collect()
        print("dropped", os.path.exists(f"/dev/shm/{path}"), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], proc.stderr.read() if proc.poll() is not None else ready
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert out.split("\n")[:2] == ["interrupted True", "dropped False"], err
    assert not os.path.exists(f"{shm.SHM_DIR}/{ready[1]}")


def test_exit_removes_segments_still_held():
    code = "import numpy as np; from twat_mp.shared import share; a = share(np.ones(10)); import os; " \
           "print([n for n in os.listdir('/dev/shm') if n.startswith(f'twat-mp-{os.getpid()}-')][0])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() and not os.path.exists(f"{shm.SHM_DIR}/{done.stdout.strip()}")


# -- too big, or nowhere to go -------------------------------------------------------------------
def test_a_share_that_does_not_fit_names_the_size_and_the_free_space(monkeypatch):
    real = os.statvfs(shm.SHM_DIR)

    class Small:
        f_bavail, f_frsize, f_blocks = 10 * MIB // real.f_frsize, real.f_frsize, real.f_blocks

    monkeypatch.setattr(shm.os, "statvfs", lambda path: Small)
    before = set(os.listdir(shm.SHM_DIR))
    with pytest.raises(SharedMemoryError) as caught:
        share(np.ones(20 * MIB // 8))
    message = str(caught.value)
    assert "20.0 MiB" in message and "10.0 MiB (10485760 bytes) free" in message and "--shm-size" in message
    assert caught.value.size == 20 * MIB and caught.value.free == 10 * MIB
    assert isinstance(caught.value, MemoryError) and isinstance(caught.value, TwatMPError)
    with pytest.raises(SharedMemoryError, match="20.0 MiB"):
        shared_array(20 * MIB, dtype=np.uint8)
    assert set(os.listdir(shm.SHM_DIR)) <= before


def test_a_real_oversize_segment_is_an_error_not_a_sigbus(monkeypatch):
    real = os.statvfs(shm.SHM_DIR)
    if not real.f_blocks:
        pytest.skip("an unbounded shared-memory filesystem")
    total = real.f_blocks * real.f_frsize
    with pytest.raises(SharedMemoryError, match="free"):  # over the free space: refused before creating
        shared_array(total + MIB, dtype=np.uint8)

    class Roomy:  # claims room, so the reservation itself must refuse
        f_bavail, f_frsize, f_blocks = 2 * real.f_blocks, real.f_frsize, real.f_blocks

    monkeypatch.setattr(shm.os, "statvfs", lambda path: Roomy)
    before = set(os.listdir(shm.SHM_DIR))
    with pytest.raises(SharedMemoryError, match="cannot place"):
        shared_array(total + MIB, dtype=np.uint8)
    assert set(os.listdir(shm.SHM_DIR)) <= before


def test_no_shared_memory_directory_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path / "missing"))
    with pytest.raises(SharedMemoryError, match="missing"):
        share(np.ones(3))


# -- CUDA --------------------------------------------------------------------------------------
def test_a_cuda_tensor_without_ipc_travels_through_the_cpu(monkeypatch):
    torch = pytest.importorskip("torch")
    import torch.multiprocessing.reductions as reductions

    def refuse(tensor):
        raise RuntimeError("no CUDA IPC here")

    class FakeCuda:  # what _reduce_cuda reads of a CUDA tensor
        device = "cuda:0"
        requires_grad = False

        def detach(self):
            return self

        def cpu(self):
            return torch.arange(4.0)

    monkeypatch.setattr(reductions, "reduce_tensor", refuse)
    payload, _ = serialization.dumps(serialization._reduce_cuda(FakeCuda()), "items", shm.new_prefix())
    rebuild, args = serialization.loads(payload)
    rebuilt = rebuild(*args)
    assert rebuilt.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert rebuilt.cpu().tolist() == [0.0, 1.0, 2.0, 3.0]
    serialization.release(payload)


def cuda_add_one(tensor) -> str:
    import torch

    tensor += 1
    torch.cuda.synchronize()
    return str(tensor.device)


@pytest.mark.gpu
def test_a_cuda_tensor_reaches_a_worker_through_cuda_ipc():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    tensor = torch.zeros(1 << 20, device="cuda")
    payload, _ = serialization.dumps([tensor], "items", shm.new_prefix())
    assert len(payload) < 10_000 and not shm.segments_of(payload)  # a handle, not the data
    serialization.release(payload)
    with ProcessPool(nodes=1) as pool:
        assert pool.submit(cuda_add_one, tensor).result() == "cuda:0"
    torch.cuda.synchronize()
    assert tensor.eq(1).all()


def buffer_address(x: np.ndarray) -> tuple[int, int]:
    return os.getpid(), x.__array_interface__["data"][0]


def test_a_worker_keeps_its_mapping_of_a_shared_array_between_tasks():
    data = shared_array((1 << 18,))  # 2 MiB
    with ProcessPool(nodes=1) as one:
        first = one.apply(buffer_address, data)
        second = one.apply(buffer_address, data)  # no object on the mapping lived in between
    assert first == second  # same worker, same mapping: its pages were not faulted in again


def test_a_kept_mapping_lets_go_once_the_owner_releases_the_segment():
    with ProcessPool(nodes=1) as one:
        data = share(np.ones(1 << 18))
        one.apply(buffer_address, data)
        path = path_of(data)
        del data
        gc.collect()
        assert not os.path.exists(path)
        other = shared_array((8,))
        one.apply(buffer_address, other)  # the next mapping drops the stale one
        assert one.apply(_kept_paths) == [path_of(other)]


def _kept_paths() -> list[str]:
    return list(shm._kept)


def test_a_masked_array_is_refused_rather_than_losing_its_mask():
    masked = np.ma.array([1.0, 2.0, 3.0], mask=[0, 1, 0])
    with pytest.raises(TypeError, match="mask"):
        share(masked)
