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

Names: ``twat-mp-<pid>-<pid namespace>-<8 hex digits>-...``, where the pid is the
process that answers for the segment (the one that unlinks it): the caller that made
the dispatcher (for its tasks and its workers' results in flight) or the process that
holds a kept segment. A segment is written once and never changes afterwards: every
mapping of it is private.

Held segments: a process can keep a segment instead of unlinking it (``loads(...,
keep=True)``, ``serialization.share``): it is renamed to the process's own name
(``own_name``), mapped, and registered; the objects unpickled from it hold the
mapping, and when the last of them is collected a ``weakref.finalize`` on the mapping
unlinks the segment. While a held segment is alive, a buffer that lies inside it and
that this process has not written to (``/proc/self/pagemap`` tells: a page written
through a private mapping is no longer the file's page) is sent by reference: path,
offset and length travel, nothing is written (``reference``). The receiver maps it
copy-on-write as any segment and never unlinks it; the payload pins the mapping (so the
segment) until the sender releases the payload. Where pagemap cannot tell (not Linux, a
sandbox), such a buffer is written to a new segment, as any other.

Shared segments (``create_shared``, behind ``twat_mp.share``): made by their owner and
mapped ``MAP_SHARED`` read-write by the owner and by every process it is sent to, so a
write anywhere is seen everywhere (the opposite of the segments above, which are never
written after creation). A buffer in one is always sent by reference (path, offset,
length and the ``shared`` flag; no pagemap check: writes go there on purpose). The
owner pins it in a payload it releases itself (a task); in a payload released by
another process (a worker's result) the owner sends a copy instead, as it could not
unpin it. Another process that mapped it sends it on by reference, unpinned, while the
file exists. The owner unlinks it when the last object on its mapping is collected or
at exit (``weakref.finalize``); receivers never unlink it, and their mappings outlive
the unlink. A receiver keeps one mapping per segment while an object on it lives and
maps later references to it from there.

Who releases a segment:
- segments of a task belong to the caller, who unlinks them once the chunk is done;
  a task's references to held segments are only unpinned then (``release``);
- segments of a result are unlinked by the caller as it unpickles (or discards) them,
  or kept (``keep=True``): then the last object on them unlinks them;
- a dispatcher's segments are named under its prefix, and a stopping dispatcher
  removes whatever is left under it (a worker killed mid-send, Ctrl-C);
- segments whose process died without unlinking them (SIGKILL) are removed by the
  next process of this namespace that starts a dispatcher (``sweep_dead``).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import glob
import itertools
import mmap
import os
import pickle
import re
import sys
import weakref
from typing import Any, NamedTuple

THRESHOLD = 1 << 20  # 1 MiB
SHM_DIR = "/dev/shm"  # read at call time, so tests can point it elsewhere
MARK = b"S"  # first byte of a payload whose buffers live in segments

_counter = itertools.count()

#: Bytes this process wrote into segments and sent by reference (for tests and debugging).
bytes_written = 0
bytes_referenced = 0


class Segment(NamedTuple):
    """A buffer in a segment: ``size`` bytes at ``offset``. ``pin`` is empty when the
    payload owns the segment (its releaser unlinks it), and names the sender's pin when
    the payload only refers to a segment the sender holds (never unlinked through it).
    A ``shared`` segment is never unlinked through a payload, pinned or not."""

    path: str
    size: int
    offset: int = 0
    pin: str = ""
    shared: bool = False  # a shared segment (``create_shared``): mapped MAP_SHARED, never unlinked through it


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


# -- names and owners ----------------------------------------------------------------------
_NAME = re.compile(r"twat-mp-(\d+)-(\d+)-[0-9a-f]{8}(?:-|$)")


def _namespace() -> int:
    """This process's pid namespace (0 when unknown): a pid means a process only in it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_own: dict[int, str] = {}  # pid → this process's own name (a forked child makes its own)


def own_name() -> str:
    """The name under which this process holds segments (the first call per process
    sweeps the segments of dead processes)."""
    pid = os.getpid()
    name = _own.get(pid)
    if name is None:
        sweep_dead()
        name = _own[pid] = f"twat-mp-{pid}-{_namespace()}-{os.urandom(4).hex()}"
    return name


def new_prefix() -> str:
    """A dispatcher's prefix, owned by this process."""
    own_name()  # the engine starts here: sweep what dead processes left behind
    return f"{SHM_DIR}/twat-mp-{os.getpid()}-{_namespace()}-{os.urandom(4).hex()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process, alive
        return True
    return True


def sweep_dead() -> list[str]:
    """Unlink the segments under ``SHM_DIR`` whose process is dead; return their paths.
    Only names of our pattern and of this pid namespace are considered (a pid of another
    namespace means nothing here; with the namespace unknown nothing is swept), and a
    pid that exists keeps its segments (even if reused: they go once it is gone)."""
    namespace = _namespace()
    if not namespace:
        return []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    verdicts: dict[int, bool] = {os.getpid(): True}
    swept = []
    for name in names:
        match = _NAME.match(name)
        if match is None or int(match[2]) != namespace:
            continue
        pid = int(match[1])
        if pid not in verdicts:
            verdicts[pid] = _alive(pid)
        if not verdicts[pid]:
            path = f"{SHM_DIR}/{name}"
            try:
                os.unlink(path)
            except OSError:
                continue
            swept.append(path)
    return swept


# -- writing, mapping, releasing ------------------------------------------------------------
def write_segment(prefix: str, view: memoryview) -> Segment:
    """Copy ``view`` into a new segment. Raise OSError (nothing left behind) when the
    segment cannot be created or its space cannot be reserved."""
    global bytes_written
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
    bytes_written += data.nbytes
    return Segment(path, data.nbytes)


def _map(path: str, length: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def map_segment(segment: Segment) -> memoryview:
    """The segment's buffer, mapped copy-on-write."""
    view = memoryview(_map(segment.path, segment.offset + segment.size))
    return view[segment.offset:] if segment.offset else view


def release(segments: list[Segment]) -> None:
    """Release a payload's segments: unlink those it owns, unpin those it refers to."""
    for segment in segments:
        if segment.pin:
            _pins.pop(segment.pin, None)
            continue
        if segment.shared:
            continue
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
    return MARK + pickle.dumps(([tuple(s) if s.shared else tuple(s)[:4] for s in segments], data),
                               pickle.HIGHEST_PROTOCOL)


def unwrap(payload: bytes | memoryview, *, unlink_after: bool = False,
           keep: bool = False) -> tuple[Any, list[memoryview]]:
    """The pickle and its buffers, mapped. ``unlink_after`` unlinks the segments the
    payload owns once mapped; ``keep`` holds them instead (``hold``). Segments the
    payload only refers to are mapped, never unlinked or held."""
    segments, data = pickle.loads(payload[1:])
    segments = [Segment(*s) for s in segments]
    buffers: list[memoryview] = []
    try:
        for segment in segments:
            if segment.shared:
                buffers.append(map_shared(segment))
            else:
                buffers.append(hold(segment) if keep and not segment.pin else map_segment(segment))
        return data, buffers
    finally:
        if unlink_after or (keep and len(buffers) < len(segments)):  # a failed hold: drop the rest
            release([s for s in segments if not s.pin and not s.shared])


# -- held segments ----------------------------------------------------------------------------
class _Held(NamedTuple):
    path: str
    start: int  # address of the mapping in this process
    size: int
    owner: int  # pid: a forked child neither sends nor unlinks its parent's segments
    mapping: weakref.ref[mmap.mmap]


_held: dict[str, _Held] = {}  # path → held segment, while its mapping lives
_pins: dict[str, mmap.mmap] = {}  # pin → mapping, while a payload that refers to it is out
_pin_counter = itertools.count(1)


def _address(buffer: Any) -> int | None:
    """The address of a writable contiguous buffer (None for a read-only one)."""
    try:
        anchor = ctypes.c_char.from_buffer(buffer)
    except (TypeError, ValueError, BufferError):
        return None
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def hold(segment: Segment) -> memoryview:
    """Take ownership of a segment this process was sent: rename it to this process's
    own name, map it copy-on-write and register it for ``reference``; it is unlinked
    when the mapping is collected (the last object unpickled from it is gone)."""
    path = f"{os.path.dirname(segment.path)}/{own_name()}-{next(_counter)}"
    os.rename(segment.path, path)
    try:
        mapping = _map(path, segment.size)
        start = _address(mapping)
    except BaseException:
        os.unlink(path)
        raise
    assert start is not None  # a private, writable mapping
    pid = os.getpid()
    _held[path] = _Held(path, start, segment.size, pid, weakref.ref(mapping))
    weakref.finalize(mapping, _drop, path, pid)
    return memoryview(mapping)


def _drop(path: str, owner: int) -> None:
    """The last object on a held segment is gone (or the interpreter exits)."""
    _held.pop(path, None)
    if os.getpid() == owner:
        try:
            os.unlink(path)
        except OSError:
            pass


def reference(view: memoryview) -> Segment | None:
    """A reference to the held segment ``view`` lies in, pinned until ``release``; None
    when it lies in none, or when this process wrote to any page of it since the
    segment was mapped (then only a copy says what the buffer holds now)."""
    global bytes_referenced
    if not _held:
        return None
    address = _address(view)
    if address is None:
        return None
    end = address + view.nbytes
    pid = os.getpid()
    for held in list(_held.values()):
        if held.owner != pid or not held.start <= address < end <= held.start + held.size:
            continue
        mapping = held.mapping()
        if mapping is None:  # being collected: its finalizer is about to unlink it
            continue
        if not _untouched(address, view.nbytes):
            return None
        pin = f"{pid}-{next(_pin_counter)}"
        _pins[pin] = mapping
        bytes_referenced += view.nbytes
        return Segment(held.path, view.nbytes, address - held.start, pin)
    return None


# -- which pages a private mapping has written ---------------------------------------------------
# /proc/self/pagemap has 8 bytes per page; the top byte's bits: 0x80 present, 0x40 swapped,
# 0x20 a page of a file (or shared). A page written through a private file mapping is an
# anonymous copy: present and not a file page, or swapped out.
_WRITTEN = bytes(int(bool(b & 0x40) or b & 0xA0 == 0x80) for b in range(256))
_pagemap_works: dict[int, bool] = {}  # pid → whether the self-test passed


def _written(address: int, nbytes: int) -> bool | None:
    """Whether a page of the range is a private copy; None when pagemap cannot say."""
    first, last = address // mmap.PAGESIZE, (address + nbytes - 1) // mmap.PAGESIZE
    want = (last - first + 1) * 8
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            entries = os.pread(fd, want, first * 8)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(entries) != want:
        return None
    return 1 in entries[7::8].translate(_WRITTEN)


def _pagemap_ok() -> bool:
    """Whether pagemap tells written pages from file pages here (checked once per
    process on a private mapping of a two-page memfd: one page read, one written)."""
    pid = os.getpid()
    if pid not in _pagemap_works:
        works = False
        try:
            fd = os.memfd_create("twat-mp-pagemap-check")
            try:
                os.pwrite(fd, bytes(2 * mmap.PAGESIZE), 0)
                mapping = mmap.mmap(fd, 2 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            start = _address(mapping)
            if start is not None:
                mapping[mmap.PAGESIZE] = mapping[0] + 1  # read the first page, write the second
                works = (_written(start, mmap.PAGESIZE) is False
                         and _written(start + mmap.PAGESIZE, mmap.PAGESIZE) is True)
            del mapping
        except (OSError, AttributeError, ValueError, BufferError):  # no memfd, no pagemap
            works = False
        _pagemap_works[pid] = works
    return _pagemap_works[pid]


def _untouched(address: int, nbytes: int) -> bool:
    """Whether this process never wrote to the range (a private mapping of a segment):
    then it holds exactly what the segment holds."""
    return _pagemap_ok() and _written(address, nbytes) is False


# -- shared segments ---------------------------------------------------------------------------
class _Shared(NamedTuple):
    path: str
    start: int  # address of the mapping in this process
    size: int
    owner: int  # pid that unlinks it; 0 where it was mapped from a reference
    mapping: weakref.ref[mmap.mmap]


_shared: dict[str, _Shared] = {}  # path → shared segment mapped here, while its mapping lives


def free_space() -> int | None:
    """Bytes free under ``SHM_DIR`` for an unprivileged writer (None: no such directory)."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _size(nbytes: int) -> str:
    amount = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{nbytes} bytes" if unit == "bytes" else f"{amount:.1f} {unit} ({nbytes} bytes)"
        amount /= 1024
    raise AssertionError  # unreachable


def _too_big(nbytes: int, free: int | None) -> Exception:
    from twat_mp.errors import SharedMemoryError

    space = f"has {_size(free)} free" if free is not None else "cannot say how much is free"
    return SharedMemoryError(
        f"cannot place {_size(nbytes)} in shared memory: {SHM_DIR} {space}. Free some (a shared "
        "array is released when its last object is gone), or give the machine more: Docker "
        "containers get 64 MB by default (docker run --shm-size=8g, or shm_size: 8g in "
        "docker compose); Kubernetes: an emptyDir volume with medium: Memory at /dev/shm",
        nbytes, free)


def create_shared(nbytes: int) -> memoryview:
    """A new shared segment of ``nbytes`` zero bytes owned by this process, mapped
    ``MAP_SHARED`` read-write. Its space is reserved first, so a segment too big for
    ``SHM_DIR`` raises ``SharedMemoryError`` naming the size and the free space, never a
    SIGBUS later; so does a missing or read-only ``SHM_DIR``. The segment is unlinked
    when the returned view's mapping is collected (or at exit)."""
    from twat_mp.errors import SharedMemoryError

    free = free_space()
    if free is not None and nbytes > free:
        raise _too_big(nbytes, free)
    length = max(nbytes, 1)  # mmap refuses an empty mapping
    path = f"{SHM_DIR}/{own_name()}-shared-{next(_counter)}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as exc:
        raise SharedMemoryError(f"cannot place {_size(nbytes)} in shared memory: cannot create a segment in "
                                f"{SHM_DIR} ({exc.strerror or exc}); twat-mp needs a writable {SHM_DIR} to "
                                "share data", nbytes, free) from exc
    try:
        try:
            os.posix_fallocate(fd, 0, length)  # ENOSPC now, not SIGBUS on a write later
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, length)  # a filesystem that cannot reserve (free space checked above)
        mapping = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        os.unlink(path)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EFBIG):
            raise _too_big(nbytes, free_space()) from exc
        raise SharedMemoryError(f"cannot place {_size(nbytes)} in shared memory at {path}: {exc}",
                                nbytes, free) from exc
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    _register(path, mapping, os.getpid())
    return memoryview(mapping)[:nbytes]


def _register(path: str, mapping: mmap.mmap, owner: int) -> None:
    start = _address(mapping)
    assert start is not None  # a writable mapping
    _shared[path] = _Shared(path, start, len(mapping), owner, weakref.ref(mapping))
    weakref.finalize(mapping, _drop_shared, path, owner)


def _drop_shared(path: str, owner: int) -> None:
    """The last object on a shared mapping is gone here (or the interpreter exits)."""
    entry = _shared.get(path)
    if entry is not None and entry.mapping() is None:
        del _shared[path]
    if owner == os.getpid():
        try:
            os.unlink(path)
        except OSError:
            pass


#: A receiver keeps the mappings of the shared segments it was sent most recently, up to
#: this many bytes, even once no object on them lives: the next task on the same shared
#: array then finds its pages already mapped (mapping a segment anew faults in every page
#: again, about 3x the cost of reading it). A kept mapping whose segment its owner has
#: released is dropped at the next mapping.
KEEP_MAPPED_BYTES = 1 << 30
_kept: collections.OrderedDict[str, mmap.mmap] = collections.OrderedDict()


def kept_any() -> bool:
    return bool(_kept)


def prune_kept() -> None:
    """Let go of kept mappings whose segment its owner has released (a worker calls it
    after each task and, while it holds any, every second when idle): the memory of a
    released shared array is freed once no process maps it."""
    for stale in [p for p in _kept if not os.path.exists(p)]:
        del _kept[stale]


def _keep(path: str, mapping: mmap.mmap) -> None:
    prune_kept()
    _kept[path] = mapping
    _kept.move_to_end(path)
    total = sum(len(m) for m in _kept.values())
    while total > KEEP_MAPPED_BYTES and len(_kept) > 1:
        total -= len(_kept.popitem(last=False)[1])


def map_shared(segment: Segment) -> memoryview:
    """A shared segment's buffer, mapped ``MAP_SHARED`` read-write: from this process's
    mapping of it where one lives (the owner's own, or an earlier reference's), else by
    opening its path. A receiver keeps its most recent mappings (``KEEP_MAPPED_BYTES``)."""
    entry = _shared.get(segment.path)
    mapping = entry.mapping() if entry is not None else None
    if mapping is None or len(mapping) < segment.offset + segment.size:
        try:
            fd = os.open(segment.path, os.O_RDWR)
        except FileNotFoundError as exc:
            from twat_mp.errors import SharedMemoryError

            raise SharedMemoryError(
                f"the shared segment {segment.path} was released by the process that made it before this "
                "process could map it: keep a shared array alive in the process that made it while other "
                "processes still receive it", segment.size) from exc
        try:
            length = max(os.fstat(fd).st_size, segment.offset + segment.size)
            mapping = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        _register(segment.path, mapping, 0)
    if _shared[segment.path].owner == 0:  # a receiver's mapping (the owner keeps its own alive)
        _keep(segment.path, mapping)
    return memoryview(mapping)[segment.offset:segment.offset + segment.size]


def _shared_at(address: int, nbytes: int) -> tuple[_Shared, mmap.mmap] | None:
    """The live shared segment mapped here that holds ``nbytes`` bytes at ``address``."""
    for entry in list(_shared.values()):
        if entry.start <= address and address + nbytes <= entry.start + entry.size:
            mapping = entry.mapping()
            if mapping is not None:
                return entry, mapping
    return None


def is_shared_range(address: int, nbytes: int) -> bool:
    """Whether ``nbytes`` bytes at ``address`` lie in a shared segment mapped here."""
    return bool(_shared) and _shared_at(address, nbytes) is not None


def shared_view(address: int, nbytes: int) -> memoryview | None:
    """``nbytes`` bytes at ``address`` as a view of the shared mapping they lie in."""
    found = _shared_at(address, nbytes) if _shared else None
    if found is None:
        return None
    entry, mapping = found
    return memoryview(mapping)[address - entry.start:address - entry.start + nbytes]


def releases_here(prefix: str | None) -> bool:
    """Whether payloads made with ``prefix`` are released by this process (tasks it
    sends), not by another one (a worker's results, released by the caller)."""
    match = _NAME.match(os.path.basename(prefix)) if prefix else None
    return match is not None and int(match[1]) == os.getpid()


def shared_reference(view: memoryview, *, pin: bool, own: bool = True) -> Segment | None:
    """A reference to the shared segment ``view`` lies in; None when it lies in none, or
    when it must be copied: this process owns it and ``own`` is false (the payload is
    released by another process, a worker's result: the segment could go before the
    receiver maps it), or another process owns it and has unlinked it already. A
    reference to a segment of this process is pinned with ``pin`` (the payload is
    released here), else the sender holds the object while the payload is out."""
    global bytes_referenced
    address = _address(view)
    if address is None and view.nbytes and "numpy" in sys.modules:  # read-only: numpy tells its address
        address = sys.modules["numpy"].frombuffer(view, dtype="uint8").__array_interface__["data"][0]
    if address is None:
        return None
    found = _shared_at(address, view.nbytes)
    if found is None:
        return None
    entry, mapping = found
    tag = ""
    if entry.owner == os.getpid():
        if not own:
            return None
        if pin:
            tag = f"{entry.owner}-{next(_pin_counter)}"
            _pins[tag] = mapping
    elif not os.path.exists(entry.path):
        return None
    bytes_referenced += view.nbytes
    return Segment(entry.path, view.nbytes, address - entry.start, tag, True)
