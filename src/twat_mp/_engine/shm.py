"""Large buffers through shared memory instead of the pipe.

Pickle protocol 5 hands every large contiguous buffer (numpy arrays; torch tensors,
reduced to numpy first) to a callback. Buffers of ``THRESHOLD`` bytes or more are
written once into a segment under ``SHM_DIR`` and only the segment's name travels in
the pickle; the receiver maps the segment copy-on-write (no copy; a write stays
private to the receiver) and unpickles views of it.

Shared memory is an optimisation, never a requirement: when ``SHM_DIR`` is missing or
not writable, or a segment does not fit (containers give /dev/shm 64 MB by default),
the buffer goes through the pipe instead. A segment's space is reserved before it is
written (``posix_fallocate``), so a full tmpfs is an error at creation, never a SIGBUS
in the process that maps it.

Who releases a segment:
- segments of a task belong to the caller, who unlinks them once the chunk is done;
- segments of a result are unlinked by the caller as it unpickles (or discards) them;
- every segment name starts with the dispatcher's prefix, and a stopping dispatcher
  removes whatever is left under it (a worker killed mid-send, Ctrl-C).
"""

from __future__ import annotations

import errno
import glob
import itertools
import mmap
import os
import pickle
from typing import Any, NamedTuple

THRESHOLD = 1 << 20  # 1 MiB
SHM_DIR = "/dev/shm"  # read at call time, so tests can point it elsewhere
MARK = b"S"  # first byte of a payload whose buffers live in segments

_counter = itertools.count()


class Segment(NamedTuple):
    path: str
    size: int


def available() -> bool:
    """Whether segments can be created under ``SHM_DIR`` now: a probe file is created
    and removed (``os.access`` says yes to root on a read-only mount's directory). The
    probe's name is hidden, so counting ``twat-mp-*`` segments never sees it."""
    probe = f"{SHM_DIR}/.twat-mp-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
    except OSError:
        return False
    os.unlink(probe)
    return True


AVAILABLE: bool  # ``shm.AVAILABLE`` is ``available()`` at the moment it is read (see __getattr__)


def __getattr__(name: str) -> Any:
    if name == "AVAILABLE":  # checked when a dispatcher starts, not once at import
        return available()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def new_prefix() -> str:
    return f"{SHM_DIR}/twat-mp-{os.getpid()}-{os.urandom(4).hex()}"


def write_segment(prefix: str, view: memoryview) -> Segment:
    """Copy ``view`` into a new segment. Raise OSError (nothing left behind) when the
    segment cannot be created or its space cannot be reserved."""
    path = f"{prefix}-{os.getpid()}-{next(_counter)}"
    data = view.cast("B")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, data.nbytes)  # ENOSPC now, not SIGBUS in a reader later
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem that cannot reserve
                raise
        written = 0
        while written < data.nbytes:
            written += os.write(fd, data[written:])
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return Segment(path, data.nbytes)


def map_segment(segment: Segment) -> memoryview:
    fd = os.open(segment.path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, segment.size, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return memoryview(mapping)


def unlink(segments: list[Segment]) -> None:
    for segment in segments:
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass


def sweep(prefix: str) -> None:
    """Remove every segment left under ``prefix``."""
    for path in glob.glob(f"{glob.escape(prefix)}-*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def segments_of(payload: bytes | memoryview) -> list[Segment]:
    """The segments a payload refers to (none for an ordinary pickle)."""
    if bytes(payload[:1]) != MARK:
        return []
    segments, _ = pickle.loads(payload[1:])
    return [Segment(*s) for s in segments]


def wrap(segments: list[Segment], data: bytes) -> bytes:
    return MARK + pickle.dumps(([tuple(s) for s in segments], data), pickle.HIGHEST_PROTOCOL)


def unwrap(payload: bytes | memoryview, *, unlink_after: bool) -> tuple[Any, list[memoryview]]:
    segments, data = pickle.loads(payload[1:])
    segments = [Segment(*s) for s in segments]
    try:
        return data, [map_segment(s) for s in segments]
    finally:
        if unlink_after:
            unlink(segments)
