"""Devices: what this machine can run on (CUDA GPUs, Apple MPS, the CPU), and worker
pools pinned to them.

>>> from twat_mp import devices
>>> cpu = devices("cpu")[0]
>>> cpu.kind, str(cpu), cpu.capacity >= 1
('cpu', 'cpu', True)

torch is the device layer: ``devices()`` asks torch about GPUs when torch is installed
(and imports it only then: ``devices("cpu")`` never does), and finds the CPU alone
otherwise. A pool made with ``devices=`` gives each worker slot one device: a CUDA
worker starts with ``CUDA_VISIBLE_DEVICES`` set to its GPU (before anything can
initialise CUDA in it), every worker gets its share of the cores for torch, OpenMP and
MKL threads, and a replacement worker keeps its slot's device. Inside a worker,
:func:`current_device` gives its ``torch.device``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any, Iterable, Sequence

from twat_mp import _options

__all__ = ["Device", "current_device", "devices"]

KINDS = ("auto", "cuda", "mps", "cpu")
#: Set in a pinned worker's environment: the device it was given ("cuda:3", "mps", "cpu").
DEVICE_ENV = "TWAT_MP_DEVICE"
#: Set in every process worker's environment: the intra-op threads it may use.
THREADS_ENV = "TWAT_MP_TORCH_THREADS"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class Device:
    """One device: ``kind`` ("cuda", "mps" or "cpu"), ``index`` (the GPU's index on this
    machine; 0 for MPS and the CPU), ``name``, ``total_memory`` in bytes (None where
    unknown) and ``capacity``: for the CPU, the cores this process may use; for a CUDA
    GPU, its streaming multiprocessors; 1 for MPS."""

    kind: str
    index: int = 0
    name: str = ""
    total_memory: int | None = None
    capacity: int = 1

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind

    @property
    def torch(self) -> Any:
        """This device as a ``torch.device`` (imports torch)."""
        import torch

        return torch.device(str(self))


def _cpu() -> Device:
    import platform

    return Device("cpu", 0, platform.processor() or platform.machine() or "cpu", _total_memory(),
                  _options.cpu_count())


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _torch() -> Any:
    """torch if it is installed (imported now), else None."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def _cuda_devices(torch: Any) -> list[Device]:
    if torch is None or not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(Device("cuda", index, props.name, int(props.total_memory), int(props.multi_processor_count)))
    return found


def _mps_devices(torch: Any) -> list[Device]:
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is None or not mps.is_available():
        return []
    return [Device("mps", 0, "Apple MPS", None, 1)]


def devices(kind: str = "auto") -> list[Device]:
    """The devices of ``kind`` on this machine.

    ``"auto"``: the CUDA GPUs if there are any, else MPS if available, else the CPU;
    ``"cuda"`` / ``"mps"``: those found (none without torch); ``"cpu"``: the CPU, one
    device whose ``capacity`` is the cores this process may use (torch is not imported).
    Asking for CUDA devices initialises CUDA in the caller; pools then start workers
    with forkserver or spawn, never fork.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    if kind == "cpu":
        return [_cpu()]
    torch = _torch()
    if kind == "cuda":
        return _cuda_devices(torch)
    if kind == "mps":
        return _mps_devices(torch) if torch is not None else []
    return (torch is not None and (_cuda_devices(torch) or _mps_devices(torch))) or [_cpu()]


def current_device() -> Any:
    """The ``torch.device`` of the current worker: its GPU in a worker pinned to one
    (``cuda:0`` as the worker sees it: ``CUDA_VISIBLE_DEVICES`` holds only that GPU),
    ``mps`` or ``cpu``; outside a device-pinned worker, the CPU."""
    try:
        import torch
    except ImportError:
        raise ImportError("current_device() returns a torch.device and needs torch: "
                          "pip install 'twat-mp[torch]'") from None
    given = os.environ.get(DEVICE_ENV, "cpu")
    if given.startswith("cuda"):
        return torch.device("cuda", 0)
    return torch.device(given)


# -- pools pinned to devices -------------------------------------------------------------------
def parse(devices_option: Any) -> tuple[Device, ...] | None:
    """Resolve a pool's ``devices=`` option: None (not pinned), "auto", "cuda", "mps",
    "cpu", a device name such as "cuda:1", a :class:`Device`, or a list of those."""
    if devices_option is None:
        return None
    given: Iterable[Any]
    if isinstance(devices_option, (str, Device)):
        given = [devices_option]
    elif isinstance(devices_option, (list, tuple)):
        given = devices_option
    else:
        raise ValueError(f"devices must be 'auto', 'cuda', 'mps', 'cpu', a device name such as 'cuda:0', a "
                         f"Device or a list of those; got {devices_option!r}")
    found: list[Device] = []
    for item in given:
        if isinstance(item, Device):
            found.append(item)
        elif item in KINDS:
            listed = devices(item)
            if not listed:
                raise ValueError(f"devices={item!r}: no {item} device on this machine "
                                 f"(devices('{item}') is empty); use devices='auto' or 'cpu'")
            found.extend(listed)
        elif isinstance(item, str) and item.startswith("cuda:") and item[5:].isdigit():
            index = int(item[5:])
            cuda = {d.index: d for d in devices("cuda")}
            if index not in cuda:
                raise ValueError(f"devices: there is no {item} on this machine (CUDA devices: "
                                 f"{sorted(cuda) or 'none'})")
            found.append(cuda[index])
        else:
            raise ValueError(f"devices: {item!r} is not a device: use 'auto', 'cuda', 'mps', 'cpu', 'cuda:N' "
                             "or a Device")
    if not found:
        raise ValueError("devices is an empty list: give at least one device")
    if len(set(found)) != len(found):
        raise ValueError(f"devices lists a device twice: {[str(d) for d in found]}; use per_device= for more "
                         "workers on one device")
    return tuple(found)


def workers_per_device(pinned: Sequence[Device], per_device: int | None) -> list[Device]:
    """One entry per worker slot: ``per_device`` workers on each device (default: one
    per GPU, and as many as its cores on the CPU)."""
    slots: list[Device] = []
    for device in pinned:
        count = per_device if per_device is not None else (device.capacity if device.kind == "cpu" else 1)
        slots.extend([device] * count)
    return slots


def thread_share(workers: int, torch_threads: int | None) -> int:
    """The intra-op threads of each of ``workers`` process workers: its share of the
    cores (at least one), or ``torch_threads``."""
    if torch_threads is not None:
        return torch_threads
    return max(1, _options.cpu_count() // max(1, workers))


def slot_env(device: Device | None, threads: int, also: Sequence[Device] = ()) -> tuple[tuple[str, str], ...]:
    """The environment of one worker slot: its device (and for CUDA, the only GPUs it
    sees: ``device`` and the GPUs in ``also``, as ``cuda:0``, ``cuda:1``...) and its
    thread share for torch, OpenMP, MKL and OpenBLAS."""
    env = [(THREADS_ENV, str(threads)), *((name, str(threads)) for name in _THREAD_VARIABLES)]
    if device is not None:
        env.append((DEVICE_ENV, str(device)))
        if device.kind == "cuda":
            visible = [device, *(d for d in also if d.kind == "cuda" and d != device)]
            env.append(("CUDA_VISIBLE_DEVICES", ",".join(_physical(d.index) for d in visible)))
    return tuple(env)


def _physical(index: int) -> str:
    """The entry of ``CUDA_VISIBLE_DEVICES`` for torch's GPU ``index`` in this process:
    where this process already sees only some GPUs (a SLURM job, a container), torch's
    index counts within them, so it maps through that list (numbers, UUIDs or MIG
    names alike)."""
    inherited = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return inherited[index] if index < len(inherited) else str(index)


def check_fork_safe(start_method: str, pinned: Sequence[Device] | None) -> None:
    """Refuse to fork workers for CUDA devices once CUDA is initialised here: a forked
    child cannot use it (torch raises "Cannot re-initialize CUDA in forked subprocess")."""
    if start_method != "fork" or not pinned or not any(d.kind == "cuda" for d in pinned):
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise ValueError("start_method='fork' cannot start CUDA workers: CUDA is already initialised in this "
                         "process, and a forked child cannot use it. Use start_method='forkserver' (the "
                         "default on Linux) or 'spawn'")
