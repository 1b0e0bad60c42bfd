"""twat-mp: parallel maps one decorator away.

>>> from twat_mp import pmap
>>> @pmap
... def square(x):
...     return x * x
>>> square(range(5))
[0, 1, 4, 9, 16]

Names are imported when first used (``import twat_mp`` stays cheap; worker processes
started from a forkserver pay for it too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from twat_mp.__version__ import __version__

if TYPE_CHECKING:
    from twat_mp._logging import set_debug_mode
    from twat_mp.aio import AsyncMultiPool, apmap
    from twat_mp.cli import main_banner as main
    from twat_mp.decorators import amap, imap, mmap, pmap, shutdown_warm_pools, warm_pool
    from twat_mp.errors import (
        BrokenPoolError,
        InitializerError,
        NodeExecutionError,
        OpError,
        PoolClosedError,
        ReplicaCrashedError,
        ResourceError,
        RuntimeClosedError,
        SerializationError,
        ServiceFailedError,
        ServiceOverloadedError,
        SharedMemoryError,
        TaskTimeoutError,
        TwatMPError,
        WorkerCrashedError,
        WorkerError,
    )
    from twat_mp.graph import ObjectRef, Op, Runtime, as_completed, get, op, shutdown, wait
    from twat_mp.hardware import Device, current_device, devices
    from twat_mp.mesh import Mesh, MeshNode
    from twat_mp.pipeline import Context, ExecutionMetadata, Node, node
    from twat_mp.pools import AsyncResult, MultiPool, ProcessPool, ThreadPool
    from twat_mp.profiling import Profile, profile
    from twat_mp.services import ServiceEvent, ServiceHandle, deploy, idempotent, replica, runtime, service
    from twat_mp.shared import is_shared, share, shared_array, shared_tensor
    from twat_mp.state import WorkerInfo, worker_info, worker_state

_WHERE = {
    "set_debug_mode": "twat_mp._logging",
    "AsyncMultiPool": "twat_mp.aio",
    "apmap": "twat_mp.aio",
    "amap": "twat_mp.decorators",
    "imap": "twat_mp.decorators",
    "mmap": "twat_mp.decorators",
    "pmap": "twat_mp.decorators",
    "shutdown_warm_pools": "twat_mp.decorators",
    "warm_pool": "twat_mp.decorators",
    "BrokenPoolError": "twat_mp.errors",
    "InitializerError": "twat_mp.errors",
    "NodeExecutionError": "twat_mp.errors",
    "OpError": "twat_mp.errors",
    "RuntimeClosedError": "twat_mp.errors",
    "ReplicaCrashedError": "twat_mp.errors",
    "ResourceError": "twat_mp.errors",
    "ServiceFailedError": "twat_mp.errors",
    "ServiceOverloadedError": "twat_mp.errors",
    "Mesh": "twat_mp.mesh",
    "MeshNode": "twat_mp.mesh",
    "ServiceEvent": "twat_mp.services",
    "ServiceHandle": "twat_mp.services",
    "deploy": "twat_mp.services",
    "idempotent": "twat_mp.services",
    "replica": "twat_mp.services",
    "runtime": "twat_mp.services",
    "service": "twat_mp.services",
    "SharedMemoryError": "twat_mp.errors",
    "PoolClosedError": "twat_mp.errors",
    "SerializationError": "twat_mp.errors",
    "TaskTimeoutError": "twat_mp.errors",
    "TwatMPError": "twat_mp.errors",
    "WorkerCrashedError": "twat_mp.errors",
    "WorkerError": "twat_mp.errors",
    "Device": "twat_mp.hardware",
    "current_device": "twat_mp.hardware",
    "devices": "twat_mp.hardware",
    "ObjectRef": "twat_mp.graph",
    "Op": "twat_mp.graph",
    "Runtime": "twat_mp.graph",
    "as_completed": "twat_mp.graph",
    "get": "twat_mp.graph",
    "op": "twat_mp.graph",
    "shutdown": "twat_mp.graph",
    "wait": "twat_mp.graph",
    "Context": "twat_mp.pipeline",
    "ExecutionMetadata": "twat_mp.pipeline",
    "Node": "twat_mp.pipeline",
    "node": "twat_mp.pipeline",
    "Profile": "twat_mp.profiling",
    "profile": "twat_mp.profiling",
    "is_shared": "twat_mp.shared",
    "share": "twat_mp.shared",
    "shared_array": "twat_mp.shared",
    "shared_tensor": "twat_mp.shared",
    "AsyncResult": "twat_mp.pools",
    "MultiPool": "twat_mp.pools",
    "ProcessPool": "twat_mp.pools",
    "ThreadPool": "twat_mp.pools",
    "WorkerInfo": "twat_mp.state",
    "worker_info": "twat_mp.state",
    "worker_state": "twat_mp.state",
}
_RENAMED = {"main": ("twat_mp.cli", "main_banner")}

__all__ = [
    "AsyncMultiPool",
    "AsyncResult",
    "BrokenPoolError",
    "Context",
    "Device",
    "ExecutionMetadata",
    "InitializerError",
    "Mesh",
    "MeshNode",
    "MultiPool",
    "Node",
    "NodeExecutionError",
    "ObjectRef",
    "Op",
    "OpError",
    "PoolClosedError",
    "ProcessPool",
    "Profile",
    "ReplicaCrashedError",
    "ResourceError",
    "Runtime",
    "RuntimeClosedError",
    "SerializationError",
    "ServiceEvent",
    "ServiceFailedError",
    "ServiceHandle",
    "ServiceOverloadedError",
    "SharedMemoryError",
    "TaskTimeoutError",
    "ThreadPool",
    "TwatMPError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerInfo",
    "__version__",
    "amap",
    "apmap",
    "as_completed",
    "current_device",
    "deploy",
    "devices",
    "get",
    "idempotent",
    "imap",
    "is_shared",
    "main",
    "mmap",
    "node",
    "op",
    "pmap",
    "profile",
    "replica",
    "runtime",
    "service",
    "set_debug_mode",
    "share",
    "shared_array",
    "shared_tensor",
    "shutdown",
    "shutdown_warm_pools",
    "wait",
    "warm_pool",
    "worker_info",
    "worker_state",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _RENAMED:
        module, attribute = _RENAMED[name]
        value = getattr(importlib.import_module(module), attribute)
    else:
        raise AttributeError(f"module 'twat_mp' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
