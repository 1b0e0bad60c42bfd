"""Kept for compatibility with twat-mp 2.x: ``from twat_mp.mp import ...`` keeps working.

New code should import from ``twat_mp`` directly.
"""

from twat_mp._logging import set_debug_mode
from twat_mp.decorators import amap, imap, mmap, pmap
from twat_mp.errors import WorkerError
from twat_mp.pools import MultiPool, ProcessPool, ThreadPool

__all__ = ["MultiPool", "ProcessPool", "ThreadPool", "WorkerError", "amap", "imap", "mmap", "pmap",
           "set_debug_mode"]
