"""Devices and device-pinned pools, with the real torch CPU build; GPU tests are marked
``gpu`` and skipped where no CUDA device is present."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from twat_mp import AsyncMultiPool, ProcessPool, ThreadPool, apmap, pmap
from twat_mp._options import cpu_count
from twat_mp.hardware import Device, current_device, devices

pytestmark = pytest.mark.timeout(90)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


gpu = pytest.mark.skipif(not _has_cuda(), reason="no CUDA device here")


def worker_view(_=None):
    """What a worker sees of its device and threads."""
    import torch

    return {"device": str(current_device()), "env_device": os.environ.get("TWAT_MP_DEVICE"),
            "omp": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}


async def async_worker_view(_=None):
    return worker_view()


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60)


# -- devices() ---------------------------------------------------------------------------------
def test_the_cpu_is_one_device_with_its_usable_cores():
    [cpu] = devices("cpu")
    assert (cpu.kind, cpu.index, str(cpu), cpu.capacity) == ("cpu", 0, "cpu", cpu_count())
    assert cpu.total_memory is None or cpu.total_memory > 0
    assert str(cpu.torch) == "cpu"


def test_auto_finds_the_gpus_or_else_the_cpu():
    found = devices()
    if _has_cuda():
        assert found and all(d.kind == "cuda" for d in found)
    else:
        assert [d.kind for d in found] in (["cpu"], ["mps"])
    assert devices("cuda") == ([] if not _has_cuda() else devices("cuda"))


def test_asking_for_the_cpu_does_not_import_torch():
    out = run_script("""
        import sys
        import twat_mp
        assert twat_mp.devices("cpu")[0].kind == "cpu"
        print("torch" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_without_torch_devices_are_the_cpu_and_no_import_error():
    out = run_script("""
        import sys
        sys.modules["torch"] = None   # torch is not installed, as far as imports go
        from twat_mp import ProcessPool, devices
        from twat_mp.hardware import current_device
        print([d.kind for d in devices()], devices("cuda"), devices("mps"))
        with ProcessPool(devices="auto", per_device=1) as pool:
            print(pool.map(abs, [-1, -2]))
        try:
            current_device()
        except ImportError as exc:
            print("ImportError", "torch" in str(exc))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["['cpu'] [] []", "[1, 2]", "ImportError True"]


def test_bad_device_options_are_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        devices("gpu")
    with pytest.raises(ValueError, match="not a device"):
        ProcessPool(devices="gpu")
    with pytest.raises(ValueError, match="devices must be"):
        ProcessPool(devices=3)
    with pytest.raises(ValueError, match="per_device= needs devices="):
        ProcessPool(per_device=2)
    with pytest.raises(ValueError, match="nodes=3 but devices"):
        ProcessPool(nodes=3, devices="cpu", per_device=2)
    with pytest.raises(ValueError, match="per_device"):
        ProcessPool(devices="cpu", per_device=0)
    with pytest.raises(ValueError, match="torch_threads"):
        ProcessPool(torch_threads=-1)
    with pytest.raises(ValueError, match="process pools, not threads"):
        ThreadPool(devices="cpu")
    with pytest.raises(ValueError, match="twice"):
        ProcessPool(devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="empty"):
        ProcessPool(devices=[])
    if not _has_cuda():
        with pytest.raises(ValueError, match="no cuda device"):
            ProcessPool(devices="cuda")
        with pytest.raises(ValueError, match="no cuda:0"):
            ProcessPool(devices="cuda:0")
    with pytest.raises(TypeError, match="unknown option"):
        pmap(devise="cpu")


# -- pinned pools --------------------------------------------------------------------------------
def test_cpu_workers_are_pinned_and_split_the_cores():
    with ProcessPool(devices="cpu", per_device=2) as pool:
        assert pool.nodes == 2 and pool.devices == tuple(devices("cpu"))
        seen = pool.map(worker_view, range(4))
    share = max(1, cpu_count() // 2)
    for view in seen:
        assert view["device"] == "cpu" and view["env_device"] == "cpu"
        assert view["omp"] == str(share) and view["torch_threads"] == share
    with ProcessPool(devices="auto") as pool:  # no GPU here: one worker per core
        assert pool.nodes == (len(devices()) if _has_cuda() else cpu_count())


def test_torch_threads_overrides_the_share_and_plain_pools_split_the_cores_too():
    with ProcessPool(nodes=1, torch_threads=3) as pool:
        assert pool.apply(worker_view)["torch_threads"] == 3
    with ProcessPool(nodes=1) as pool:  # not pinned: still its share of the cores
        view = pool.apply(worker_view)
        assert view["torch_threads"] == cpu_count() and view["env_device"] is None
    with ProcessPool(nodes=1, start_method="fork") as pool:  # forked: one thread, always
        assert pool.apply(worker_view)["torch_threads"] == 1


def test_a_replacement_worker_keeps_its_device():
    with ProcessPool(devices="cpu", per_device=1, retries=1) as pool:
        first = pool.apply(worker_view)
        os.kill(first["pid"], signal.SIGKILL)
        again = pool.apply(worker_view)
    assert again["pid"] != first["pid"] and again["env_device"] == "cpu" and again["device"] == "cpu"


def test_decorators_and_async_pools_take_devices():
    @pmap(devices="cpu", per_device=2, torch_threads=1)
    def view(x):
        return worker_view(x)["device"], worker_view(x)["torch_threads"]

    assert view(range(3)) == [("cpu", 1)] * 3
    assert view.nodes == 2

    @apmap(devices="cpu", per_device=1)
    async def aview(x):
        return (await async_worker_view(x))["env_device"]

    assert aview.sync(range(2)) == ["cpu", "cpu"]


def test_async_pool_pinned_to_the_cpu():
    import asyncio

    async def main():
        async with AsyncMultiPool(devices="cpu", per_device=2) as pool:
            assert pool.processes == 2
            return await pool.map(async_worker_view, range(2))

    assert [v["env_device"] for v in asyncio.run(main())] == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="per_device"):
        AsyncMultiPool(per_device=2)


def test_outside_a_pinned_worker_the_current_device_is_the_cpu():
    assert str(current_device()) == "cpu"


def test_a_device_object_pins_too():
    cpu = Device("cpu", 0, "the CPU", None, 1)
    with ProcessPool(devices=[cpu]) as pool:
        assert pool.nodes == 1 and pool.apply(worker_view)["env_device"] == "cpu"


# -- GPUs ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
def test_cuda_workers_see_only_their_gpu():
    cuda = devices("cuda")
    with ProcessPool(devices="cuda", per_device=1) as pool:
        views = pool.map(worker_view, range(len(cuda) * 2))
    assert {v["visible"] for v in views} == {str(d.index) for d in cuda}
    assert all(v["device"] == "cuda:0" for v in views)


@pytest.mark.gpu
@gpu
def test_fork_is_refused_once_cuda_is_initialised():
    import torch

    torch.zeros(1, device="cuda")
    with pytest.raises(ValueError, match="forkserver"), ProcessPool(devices="cuda", start_method="fork") as pool:
        pool.map(abs, [1])


def blas_threads(_=None):
    from threadpoolctl import threadpool_info

    return sorted({lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"})


def test_numpys_blas_gets_the_workers_share_too():
    pytest.importorskip("numpy")
    import numpy  # noqa: F401  (loaded here, so the forkserver preloads it in the workers)

    with ProcessPool(nodes=2) as pool:
        shares = pool.map(blas_threads, range(4))
    assert all(found in ([], [max(1, cpu_count() // 2)]) for found in shares)


def test_pinned_gpus_map_through_the_gpus_this_process_already_sees(monkeypatch):
    from twat_mp.hardware import slot_env

    gpus = [Device("cuda", i, f"gpu {i}", 1 << 34, 100) for i in range(2)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # e.g. a SLURM job given GPUs 2 and 3
    assert dict(slot_env(gpus[1], 1))["CUDA_VISIBLE_DEVICES"] == "3"
    assert dict(slot_env(gpus[0], 1, gpus[1:]))["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa,GPU-bbb")
    assert dict(slot_env(gpus[1], 1))["CUDA_VISIBLE_DEVICES"] == "GPU-bbb"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert dict(slot_env(gpus[1], 1))["CUDA_VISIBLE_DEVICES"] == "1"
