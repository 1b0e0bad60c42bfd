"""twat-mp: parallel maps one decorator away.

>>> from twat_mp import pmap
>>> @pmap
... def square(x):
...     return x * x
>>> square(range(5))
[0, 1, 4, 9, 16]
"""

from twat_mp.__version__ import __version__
from twat_mp._logging import set_debug_mode
from twat_mp.aio import AsyncMultiPool, apmap
from twat_mp.decorators import amap, imap, mmap, pmap, shutdown_warm_pools, warm_pool
from twat_mp.errors import (
    BrokenPoolError,
    InitializerError,
    PoolClosedError,
    SerializationError,
    TaskTimeoutError,
    TwatMPError,
    WorkerCrashedError,
    WorkerError,
)
from twat_mp.pools import AsyncResult, MultiPool, ProcessPool, ThreadPool
from twat_mp.state import WorkerInfo, worker_info, worker_state

__all__ = [
    "AsyncMultiPool",
    "AsyncResult",
    "BrokenPoolError",
    "InitializerError",
    "MultiPool",
    "PoolClosedError",
    "ProcessPool",
    "SerializationError",
    "TaskTimeoutError",
    "ThreadPool",
    "TwatMPError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerInfo",
    "__version__",
    "amap",
    "apmap",
    "imap",
    "mmap",
    "pmap",
    "set_debug_mode",
    "shutdown_warm_pools",
    "warm_pool",
    "worker_info",
    "worker_state",
]
