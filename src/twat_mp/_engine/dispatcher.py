"""The manager: one thread that owns every piece of mutable engine state.

::

    submit(chunk) ─▶ pending queues ─┐                        ┌─▶ worker slot 0 (tags)
    cancel(chunk) ─▶ chunk.cancelled │  manager thread        ├─▶ worker slot 1
    close()/terminate() ─▶ flags ────┴─▶ dispatch / wait ─────┴─▶ ...
                                          │   ▲
          chunk.sink(chunk, outcome) ◀────┘   └── results (by chunk id), deaths,
          (on the manager thread: engine         deadlines, restarts due
           sinks only queue the outcome)

Callers only append to a pending queue (under the lock that also guards the
closing flags, so nothing is appended after the manager has failed what was left)
and wake the manager. The manager hands chunks to workers with room for them, waits
for results, worker deaths, deadlines and restarts that are due, re-runs or fails the
chunks of dead and timed-out workers, restarts workers as the pool's
``RestartPolicy`` says, and calls each chunk's ``sink`` exactly once.

Placement: a chunk may be pinned to one worker slot (``Chunk.slot``: a service replica
keeps its state in one worker) or to any worker carrying a tag (``Chunk.tag``: a
device). Transports (processes, threads, async processes) subclass ``Dispatcher`` and
say how a worker starts, how many chunks it may hold, receives and is stopped.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import os
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable

from twat_mp._engine.protocol import MODE_CALL, RemoteError
from twat_mp._engine.serialization import release
from twat_mp._logging import logger
from twat_mp.errors import (
    BrokenPoolError,
    PoolClosedError,
    TaskTimeoutError,
    WorkerCrashedError,
)

#: A chunk is queued behind a busy worker only when that worker's chunks take less than
#: this: then a round trip is a real share of the work. Longer chunks go to whichever
#: worker is free first, which balances the load better.
QUEUE_BEHIND_BELOW_SECONDS = 0.01
#: The longest the manager sleeps in one wait (it simply waits again).
MAX_WAIT_SECONDS = 3600.0
#: The manager samples what a worker with a timed chunk runs at least this often.
STAMP_POLL_SECONDS = 0.01
#: Most chunks pinned to one worker that may wait in its queue behind the running one.
PINNED_QUEUE_DEPTH = 64

Outcome = Any  # ChunkResult, its pickled bytes, or a BaseException for the chunk
Sink = Callable[["Chunk", Outcome], None]


class FnRef:
    """A function as the engine ships it: ``token`` names its payload in workers' caches."""

    __slots__ = ("fn", "mode", "payload", "token")

    def __init__(self, fn: Callable[..., Any], mode: int, payload: bytes | None, token: int) -> None:
        self.fn = fn
        self.mode = mode
        self.payload = payload
        self.token = token


class Chunk:
    """A batch of items of one call, and where its outcome goes.

    ``slot`` pins it to one worker slot, ``tag`` to any worker with that tag; with
    neither, any worker may run it.
    """

    __slots__ = ("attempts", "cancelled", "fn", "id", "items", "payload", "retries", "sent_at", "seq",
                 "sink", "slot", "tag", "timeout", "used_dill")

    _ids = iter(range(1, 1 << 62))

    def __init__(self, fn: FnRef, items: list[Any], sink: Sink, *, seq: int = 0,
                 timeout: float | None = None, retries: int = 0, slot: int | None = None,
                 tag: str | None = None) -> None:
        self.id = next(Chunk._ids)
        self.seq = seq
        self.fn = fn
        self.items = items
        self.sink = sink
        self.timeout = timeout
        self.retries = retries
        self.slot = slot
        self.tag = tag
        self.attempts = 0
        self.cancelled = False
        self.payload: bytes | None = None
        self.used_dill = False
        self.sent_at = 0.0

    def shown_items(self) -> list[Any]:
        """The items as a user sees them: a single call shows its arguments."""
        if self.fn.mode != MODE_CALL:
            return self.items
        return [args if not kwargs else (args, kwargs) for args, kwargs in self.items]


class Worker:
    """The manager's record of one worker."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.chunks: dict[int, Chunk] = {}  # sent and not yet answered, in sending order
        self.started = 0.0  # when the oldest chunk in ``chunks`` started (in-order workers)
        self.last_duration = float("inf")  # how long its previous chunk took
        self.tokens: dict[int, None] = {}  # functions the worker holds, oldest first
        self.timed_out = False
        self.retiring = False  # asked to stop (max tasks reached): gets no more chunks
        self.init_failed = False  # its initializer raised: it ran nothing
        self.pid: int | None = None
        self.seen: tuple[int, int, float] | None = None  # running item, when first seen

    def running_item(self) -> tuple[int, int] | None:
        """What the worker published of the item it runs now (a chunk with a timeout):
        the chunk's id and the item's index; None where the transport does not."""
        return None


class SlotStats:
    """What one worker slot did (the manager's count): items run, chunks lost to a
    crash or a timeout, crashes and restarts, busy seconds, and the latencies of its
    last chunks (from sent to answered)."""

    __slots__ = ("busy", "chunks", "crashes", "failures", "items", "latencies", "restarts")

    def __init__(self) -> None:
        self.items = self.chunks = self.failures = self.crashes = self.restarts = 0
        self.busy = 0.0
        self.latencies: collections.deque[float] = collections.deque(maxlen=256)

    def record(self, items: int, seconds: float) -> None:
        self.items += items
        self.chunks += 1
        self.busy += seconds
        self.latencies.append(seconds)

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        return {"calls": self.items, "chunks": self.chunks, "failures": self.failures, "crashes": self.crashes,
                "restarts": self.restarts, "busy_s": self.busy, "p50_s": quantile(0.5), "p95_s": quantile(0.95)}


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """How one worker slot is started: extra environment variables for its process,
    and tags that chunks can target (a device name, for one). A replacement worker
    starts from the same spec."""

    env: tuple[tuple[str, str], ...] = ()
    tags: frozenset[str] = frozenset()
    #: ``(fn, args)``: run in the worker after the pool's initializer, each time the slot
    #: starts (a service replica's constructor). Process slots pickle it with dill.
    init: tuple[Callable[..., Any], tuple[Any, ...]] | None = None


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """What the manager does when a worker dies, or its initializer fails.

    The default (a pool's) replaces a dead worker at once, with no limit, and treats a
    failed initializer as fatal to the pool. ``max_restarts`` within ``window``
    seconds bounds the restarts of one slot (beyond it the pool is broken);
    ``backoff`` delays the n-th consecutive restart of a slot by
    ``backoff * 2 ** (n - 1)`` seconds, at most ``max_backoff``.
    """

    max_restarts: int | None = None
    window: float = 60.0
    backoff: float = 0.0
    max_backoff: float = 30.0
    restart_on_init_failure: bool = False
    #: "always" (the default), "abnormal" (only after a crash: a signal or a non-zero exit
    #: code) or "never". A slot that is not restarted stays empty: work pinned to it fails
    #: with WorkerCrashedError, and the pool breaks once no slot is left.
    restart: str = "always"

    def __post_init__(self) -> None:
        if self.restart not in ("always", "abnormal", "never"):
            raise ValueError(f"restart must be 'always', 'abnormal' or 'never', got {self.restart!r}")

    def delay(self, recent: list[float], now: float) -> float | None:
        """Seconds to wait before restarting a slot whose restarts happened at
        ``recent`` (oldest first), or None to give up."""
        within = [t for t in recent if now - t <= self.window]
        if self.max_restarts is not None and len(within) >= self.max_restarts:
            return None
        if not self.backoff or not within:
            return 0.0
        return float(min(self.max_backoff, self.backoff * 2 ** (len(within) - 1)))


@dataclasses.dataclass(frozen=True)
class WorkerEvent:
    """What happened to a worker slot, for ``Dispatcher(on_event=...)``: ``kind`` is
    "started", "crashed" (``exitcode``: negative for a signal), "restarting" (``delay``
    seconds from now), "failed" (the restart policy gave up, or the slot is not
    restarted: ``reason``) or "stopped" (the whole pool, ``slot`` -1)."""

    kind: str
    slot: int
    pid: int | None = None
    exitcode: int | None = None
    delay: float = 0.0
    reason: str = ""


class Dispatcher(ABC):
    kind = "?"
    ships_bytes = False  # True where chunks and functions cross a process boundary
    concurrency = 0  # calls one worker runs at once (async workers); 0: one at a time
    shm_prefix: str | None = None  # where large buffers of this engine's payloads go
    in_order = True  # a worker answers its chunks in the order it got them
    stamps_items = False  # workers publish each item's start: timed chunks may queue

    def __init__(self, nodes: int, *, slots: Iterable[SlotSpec] | None = None,
                 policy: RestartPolicy | None = None,
                 on_event: Callable[[WorkerEvent], None] | None = None) -> None:
        self.nodes = nodes
        self.slots = list(slots) if slots is not None else [SlotSpec()] * nodes
        if len(self.slots) != nodes:
            raise ValueError(f"got {len(self.slots)} slot specs for {nodes} workers")
        self.policy = policy or RestartPolicy()
        self.on_event = on_event  # called on the manager thread: it must only queue
        self.stats: list[SlotStats] = [SlotStats() for _ in range(nodes)]
        self._gone: set[int] = set()  # slots not restarted (policy "never"/"abnormal")
        self._init_failures: dict[int, BaseException] = {}  # slot -> its last initializer error
        self._pending: collections.deque[Chunk] = collections.deque()  # any worker
        self._pinned: dict[int, collections.deque[Chunk]] = collections.defaultdict(collections.deque)
        self._tagged: dict[str, collections.deque[Chunk]] = collections.defaultdict(collections.deque)
        self._workers: dict[int, Worker] = {}
        self._restarts: dict[int, list[float]] = collections.defaultdict(list)  # slot -> times
        self._restart_due: dict[int, float] = {}  # slot -> when to start its replacement
        self._closing = False  # no new work; finish what is queued, then stop
        self._terminating = False  # stop now
        self._finished = False  # the manager has failed what was left: submit refuses
        self._broken: BaseException | None = None
        self._lock = threading.Lock()  # guards the flags above and the pending queues' appends
        # Guards the workers and their chunks: the manager holds it except while it blocks
        # in ``_wait``; a caller that finds it free hands out its chunks itself.
        self._state = threading.Lock()
        self.item_seconds: dict[int, float] = {}  # function -> seconds per item, last seen
        for slot in range(nodes):
            self._workers[slot] = self._start_worker(slot)  # in the caller: errors surface here
            self._emit(WorkerEvent("started", slot, self._workers[slot].pid))
        self._thread = threading.Thread(target=self._run, name=f"twat-mp-{self.kind}-manager", daemon=True)
        self._thread.start()
        _track(self)
        logger.debug("{} dispatcher started with {} workers", self.kind, nodes)

    # -- the caller's side -------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not (self._closing or self._terminating) and self._broken is None

    @property
    def running(self) -> bool:
        """Whether the manager thread still runs (an open pool, or one still stopping)."""
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """Why the dispatcher stopped working (initializer failure, start failure)."""
        return self._broken

    def remember_cost(self, key: int, seconds_per_item: float) -> None:
        """Note how long a function's items take (read when sizing its next chunks)."""
        if len(self.item_seconds) >= 256 and key not in self.item_seconds:
            self.item_seconds.clear()
        self.item_seconds[key] = seconds_per_item

    def update_slot(self, slot: int, spec: SlotSpec) -> None:
        """Start slot ``slot``'s next worker (a replacement) from ``spec``."""
        with self._lock:
            self.slots[slot] = spec

    def live_slots(self) -> list[int]:
        """The slots that have a worker, or will get one (not given up)."""
        return [slot for slot in range(self.nodes) if slot not in self._gone]

    def queue_depth(self, slot: int) -> int:
        """Chunks pinned to ``slot`` not yet sent to its worker."""
        return len(self._pinned.get(slot, ()))

    def _emit(self, event: WorkerEvent) -> None:
        if event.kind in ("crashed", "restarting"):
            self.stats[event.slot].restarts += event.kind == "restarting"
            self.stats[event.slot].crashes += event.kind == "crashed"
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                exc_type, exc, tb = sys.exc_info()
                threading.excepthook(threading.ExceptHookArgs((exc_type, exc, tb, threading.current_thread())))

    def tags(self) -> set[str]:
        return {tag for spec in self.slots for tag in spec.tags}

    def submit(self, chunk: Chunk) -> None:
        self.submit_all((chunk,))

    def submit_all(self, chunks: Iterable[Chunk]) -> None:
        """Queue ``chunks`` together: one lock, one wake, so the manager hands them out
        in one round (to idle workers first) instead of waking once per chunk."""
        chunks = tuple(chunks)
        for chunk in chunks:
            if chunk.slot is not None and not 0 <= chunk.slot < self.nodes:
                raise ValueError(f"no worker slot {chunk.slot} in a pool of {self.nodes}")
            if chunk.slot is not None and chunk.slot in self._gone:
                raise WorkerCrashedError(chunk.shown_items(), chunk.slot, None, None)
            if chunk.tag is not None and chunk.tag not in self.tags():
                raise ValueError(f"no worker has the tag {chunk.tag!r}; tags: {sorted(self.tags())}")
        with self._lock:  # as concurrent.futures: a submit never slips past a terminate
            if self._broken is not None:
                raise self._broken
            if self._closing or self._terminating or self._finished:
                raise PoolClosedError("the pool is closed; create a new one to submit more work")
            for chunk in chunks:
                self._queue_for(chunk).append(chunk)
        if self._state.acquire(blocking=False):  # the manager is blocked waiting
            try:
                if not self._terminating:
                    self._dispatch()
                # A chunk with a timeout changes when the manager must look next; a
                # chunk no worker took waits for a result, a death or a restart, which
                # wake the manager anyway, but it costs little to make sure.
                nothing_left = not self._has_pending() and all(c.timeout is None for c in chunks)
            finally:
                self._state.release()
            if nothing_left:
                return
        self._wake()

    def _queue_for(self, chunk: Chunk) -> collections.deque[Chunk]:
        if chunk.slot is not None:
            return self._pinned[chunk.slot]
        if chunk.tag is not None:
            return self._tagged[chunk.tag]
        return self._pending

    @staticmethod
    def cancel(chunk: Chunk) -> None:
        chunk.cancelled = True

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._wake()

    def terminate(self) -> None:
        with self._lock:
            self._closing = self._terminating = True
        self._wake()

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- transport hooks ---------------------------------------------------------------
    @abstractmethod
    def _start_worker(self, slot: int) -> Worker: ...

    @abstractmethod
    def _send(self, worker: Worker, chunk: Chunk) -> None: ...

    @abstractmethod
    def _wait(self, timeout: float | None) -> list[tuple[str, Worker, Any]]:
        """Block until something happens; return events ("result", worker,
        (chunk_id, outcome)), ("dead", worker, exitcode), ("init_failed", worker,
        RemoteError) or ("retire", worker, None)."""

    @abstractmethod
    def _wake(self) -> None: ...

    @abstractmethod
    def _kill(self, worker: Worker) -> None:
        """Stop a stuck worker now; a "dead" event for it must follow."""

    @abstractmethod
    def _stop_all(self, graceful: bool) -> None:
        """Stop every worker and release every resource of the transport."""

    def _retire(self, worker: Worker) -> None:
        """Ask a worker to exit once it has answered its chunks (a "dead" event follows)."""
        self._kill(worker)

    def _has_room(self, worker: Worker, chunk: Chunk) -> bool:
        """May ``worker`` take ``chunk`` now? An idle worker always may. A busy one may
        queue a chunk behind the one it runs when that saves a round trip: pinned work
        (a replica's calls), or short chunks of work without a timeout, where the
        transport says it is safe (``_can_queue``)."""
        held = worker.chunks
        if not held:
            return True
        if not self.stamps_items and (chunk.timeout is not None
                                      or any(c.timeout is not None for c in held.values())):
            return False
        if chunk.slot is not None:
            return len(held) < PINNED_QUEUE_DEPTH and self._can_queue(worker, chunk)
        return (len(held) == 1 and worker.last_duration < QUEUE_BEHIND_BELOW_SECONDS
                and self._can_queue(worker, chunk))

    def _can_queue(self, worker: Worker, chunk: Chunk) -> bool:
        """May ``chunk`` wait in ``worker``'s queue behind what it runs? (The transport's
        say; the dispatcher already decided that queueing is worth it.)"""
        return True

    def _started_chunks(self, worker: Worker) -> list[Chunk]:
        """The chunks a worker had started when it died (the rest never ran)."""
        return [next(iter(worker.chunks.values()))] if worker.chunks else []

    def _deadline(self, worker: Worker) -> float | None:
        """When ``worker`` must be stopped unless it answers (None: no limit).

        A worker running a chunk with a timeout publishes the index of each item as it
        starts it (one integer write: cheap enough for tiny items). The manager notes
        when it first sees each (chunk, index) and samples often enough
        (``_sample_interval``) that a deadline is never early and at most a tenth of
        the timeout (or 10 ms) late. An item's clock starts when it starts, not while
        the worker boots or unpickles."""
        if not worker.chunks or worker.timed_out:
            return None
        head = next(iter(worker.chunks.values()))
        if head.timeout is None:
            return None
        running = worker.running_item()
        if running is None:  # a transport that does not publish: from when it was sent
            return worker.started + head.timeout * len(head.items)
        if worker.seen is None or worker.seen[:2] != running:
            worker.seen = (*running, time.monotonic())
        if running[0] != head.id:
            return None  # it has not begun this chunk yet (the last result is on its way)
        return worker.seen[2] + head.timeout

    def _sample_interval(self, worker: Worker) -> float | None:
        """How soon to look again at what a worker runs (see ``_deadline``)."""
        if not worker.chunks or worker.timed_out:
            return None
        head = next(iter(worker.chunks.values()))
        if head.timeout is None or worker.running_item() is None:
            return None
        return max(STAMP_POLL_SECONDS, head.timeout / 10)

    # -- the manager thread ------------------------------------------------------------
    def _run(self) -> None:
        with self._state:
            self._manage()

    def _blocking(self) -> _Unlocked:
        """``with self._blocking():`` around a transport's blocking wait: callers may
        hand out chunks meanwhile (``submit_all``)."""
        return _Unlocked(self._state)

    def _manage(self) -> None:
        try:
            while not self._terminating:
                self._start_due()
                self._dispatch()  # first: it drops cancelled chunks from the queues
                if self._closing and not self._has_pending() and not self._busy():
                    break
                for event, worker, value in self._wait(self._next_wakeup()):
                    self._handle(event, worker, value)
                self._check_deadlines()
        except BaseException as exc:  # a bug here must fail the calls, never hang them
            logger.exception("twat-mp manager thread failed")
            self._broken = BrokenPoolError(f"the {self.kind} pool's manager thread failed: {exc!r}")
            self._broken.__cause__ = exc
        finally:
            with self._lock:
                self._closing = self._finished = True
            outstanding = self._take_outstanding()  # before the transport forgets its workers
            try:
                self._stop_all(graceful=not self._terminating and self._broken is None)
            finally:
                if not _exiting:  # at exit only daemon threads still wait: leave them be
                    error = self._broken or PoolClosedError("the pool was terminated before this work finished")
                    for chunk in outstanding:
                        if chunk.cancelled:
                            release(chunk.payload)
                        else:
                            self._deliver(chunk, error)
            self._emit(WorkerEvent("stopped", -1))
            logger.debug("{} dispatcher stopped", self.kind)

    def _has_pending(self) -> bool:
        return bool(self._pending) or any(self._pinned.values()) or any(self._tagged.values())

    def _busy(self) -> bool:
        return any(w.chunks for w in self._workers.values())

    def _dispatch(self) -> None:
        """Hand out chunks, one per worker per round, until no worker takes more."""
        progressed = True
        while progressed and self._has_pending():
            progressed = False
            # idle workers first: a chunk queued behind a busy worker while another
            # worker idles would wait for nothing
            for worker in sorted(self._workers.values(), key=lambda w: len(w.chunks)):
                if worker.timed_out or worker.retiring:
                    continue
                chunk = self._next_for(worker)
                if chunk is None or not self._has_room(worker, chunk):
                    continue
                self._queue_for(chunk).popleft()
                if not worker.chunks:
                    worker.started = time.monotonic()
                chunk.sent_at = time.monotonic()
                worker.chunks[chunk.id] = chunk
                try:
                    self._send(worker, chunk)
                except BaseException:  # e.g. Ctrl-C in a caller sending: a frame cut off
                    self._kill(worker)  # its pipe cannot be trusted; its death is handled
                    raise
                progressed = True

    def _next_for(self, worker: Worker) -> Chunk | None:
        """The next chunk ``worker`` should run: pinned to its slot first, then tagged
        with one of its tags, then any. Cancelled chunks are dropped on the way."""
        queues = [self._pinned.get(worker.slot)]
        queues += [self._tagged.get(tag) for tag in self.slots[worker.slot].tags]
        queues.append(self._pending)
        for queue in queues:
            while queue:
                if queue[0].cancelled:
                    release(queue.popleft().payload)  # never sent: its shared memory goes now
                    continue
                return queue[0]
        return None

    def _next_wakeup(self) -> float | None:
        times = [d for d in map(self._deadline, self._workers.values()) if d is not None]
        samples = [i for i in map(self._sample_interval, self._workers.values()) if i is not None]
        if samples:
            times.append(time.monotonic() + min(samples))
        times += self._restart_due.values()
        if not times:
            return None
        # capped: select() refuses waits beyond a few weeks, and a huge timeout= is fine
        return min(MAX_WAIT_SECONDS, max(0.0, min(times) - time.monotonic()))

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers.values()):
            deadline = self._deadline(worker)
            if deadline is not None and deadline <= now:
                worker.timed_out = True
                logger.debug("worker {} ran past its deadline; stopping it", worker.slot)
                self._kill(worker)

    def _handle(self, event: str, worker: Worker, value: Any) -> None:
        if self._workers.get(worker.slot) is not worker:
            return  # a late event from a worker already replaced
        if event == "result":
            chunk_id, outcome = value
            chunk = worker.chunks.pop(chunk_id, None)
            now = time.monotonic()
            if chunk is not None:
                self.stats[worker.slot].record(len(chunk.items), now - chunk.sent_at)
            if self.in_order:
                worker.last_duration, worker.started = now - worker.started, now
            if chunk is not None and not chunk.cancelled:
                self._deliver(chunk, outcome)
            else:
                if chunk is not None:
                    release(chunk.payload)  # cancelled: nobody will release its task's memory
                if isinstance(outcome, (bytes, memoryview)):
                    release(outcome)  # nobody will unpickle it: free its shared memory
        elif event == "dead":
            self._on_death(worker, value)
        elif event == "retire":
            worker.retiring = True
            self._retire(worker)
        elif event == "init_failed":
            self._on_init_failure(worker, value)

    def _on_init_failure(self, worker: Worker, error: RemoteError) -> None:
        failure = error.to_initializer_error(worker.slot, worker.pid)
        if self.policy.restart_on_init_failure:
            worker.init_failed = True  # it ran none of its chunks: they wait for its replacement
            self._init_failures[worker.slot] = failure
            self._kill(worker)  # its death is handled (and restarted) as any other
            return
        self._broken = BrokenPoolError(f"the worker initializer failed, so the pool cannot start workers: "
                                       f"{error.type_name.removeprefix('builtins.')}: {error.message}")
        self._broken.__cause__ = failure
        self._terminating = True

    def _on_death(self, worker: Worker, exitcode: int | None) -> None:
        del self._workers[worker.slot]
        started = [] if worker.init_failed else self._started_chunks(worker)
        for waiting in reversed([c for c in worker.chunks.values() if c not in started]):
            self._queue_for(waiting).appendleft(waiting)  # never started: no retry used
        worker.chunks.clear()
        logger.debug("worker {} (pid {}) ended with {}", worker.slot, worker.pid, exitcode)
        self.stats[worker.slot].failures += len(started)
        broken_before = self._broken  # what a restart decision breaks below is not why these died
        if not (self._closing or self._terminating):
            if not worker.retiring or worker.timed_out:
                self._emit(WorkerEvent("crashed", worker.slot, worker.pid, exitcode))
            self._schedule_restart(worker, exitcode)
        for chunk in started:
            if chunk.cancelled:
                release(chunk.payload)
                continue
            error: BaseException
            if broken_before is not None:  # e.g. its initializer failed: say that, not "died"
                error = broken_before
            elif worker.timed_out:
                items = chunk.shown_items()
                running = worker.running_item() if self.in_order else None
                if running is not None and running[0] == chunk.id and 0 <= running[1] < len(items):
                    items = [items[running[1]]]
                error = TaskTimeoutError(items, chunk.timeout or 0.0, worker.slot)
            else:
                error = WorkerCrashedError(chunk.shown_items(), worker.slot, worker.pid, exitcode)
            if chunk.attempts < chunk.retries and not self._terminating and self._broken is None:
                chunk.attempts += 1
                logger.debug("re-running chunk {} (attempt {})", chunk.id, chunk.attempts + 1)
                self._queue_for(chunk).appendleft(chunk)
            else:
                self._deliver(chunk, error)

    def _schedule_restart(self, worker: Worker, exitcode: int | None) -> None:
        now = time.monotonic()
        recent = self._restarts[worker.slot]
        planned = worker.retiring and not worker.timed_out  # max tasks reached: no failure
        abnormal = worker.timed_out or worker.init_failed or exitcode is None or exitcode != 0
        if not planned and (self.policy.restart == "never"
                            or (self.policy.restart == "abnormal" and not abnormal)):
            self._give_up(worker.slot, f"restart={self.policy.restart!r}: slot {worker.slot} is not restarted "
                                       f"(exit {exitcode})")
            return
        if planned:
            delay: float | None = 0.0
        else:
            delay = self.policy.delay(recent, now)
            recent.append(now)
            del recent[:-64]
        init_failure = self._init_failures.pop(worker.slot, None) if worker.init_failed else None
        if delay is None:
            reason = (f"worker slot {worker.slot} died {len(recent)} times within {self.policy.window:g}s "
                      f"(last exit {exitcode}); the restart policy allows {self.policy.max_restarts}")
            if init_failure is not None:
                reason += f"; its initializer failed: {init_failure}"
            self._broken = BrokenPoolError(reason)  # before the event: observers read dispatcher.error
            self._broken.__cause__ = init_failure
            self._terminating = True
            self._emit(WorkerEvent("failed", worker.slot, worker.pid, exitcode, reason=reason))
            return
        if not planned:
            self._emit(WorkerEvent("restarting", worker.slot, worker.pid, exitcode, delay=delay))
        self._restart_due[worker.slot] = now + delay

    def _give_up(self, slot: int, reason: str) -> None:
        """Leave ``slot`` empty: fail what is pinned to it (with its initializer's error if
        that is why); break the pool once no slot is left."""
        self._gone.add(slot)
        init_failure = self._init_failures.pop(slot, None)
        if init_failure is not None:
            reason += f"; its initializer failed: {init_failure}"
        if len(self._gone) == self.nodes:  # before the event: observers read dispatcher.error
            self._broken = BrokenPoolError(f"every worker slot is gone ({reason})")
            self._broken.__cause__ = init_failure
            self._terminating = True
        self._emit(WorkerEvent("failed", slot, reason=reason))
        with self._lock:
            pinned = list(self._pinned.pop(slot, ()))
        for chunk in pinned:
            if not chunk.cancelled:
                error: BaseException = WorkerCrashedError(chunk.shown_items(), slot, None, None)
                if self._broken is not None:
                    error = self._broken
                self._deliver(chunk, error)

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot, due in list(self._restart_due.items()):
            if due > now or self._closing:
                continue
            del self._restart_due[slot]
            try:
                self._workers[slot] = self._start_worker(slot)
                self._emit(WorkerEvent("started", slot, self._workers[slot].pid))
            except Exception as exc:
                self._broken = BrokenPoolError(f"cannot start a replacement worker for slot {slot}: {exc!r}")
                self._broken.__cause__ = exc
                self._terminating = True
                return

    def _take_outstanding(self) -> list[Chunk]:
        """Every chunk not yet answered, taken from the workers and the queues."""
        chunks = [chunk for w in self._workers.values() for chunk in w.chunks.values()]
        for worker in self._workers.values():
            worker.chunks.clear()
        with self._lock:
            for queue in [self._pending, *self._pinned.values(), *self._tagged.values()]:
                chunks += list(queue)
                queue.clear()
        return chunks

    @staticmethod
    def _deliver(chunk: Chunk, outcome: Outcome) -> None:
        """Hand an outcome to its sink. Sinks are the engine's own and only queue the
        outcome for another thread; one that raises is a bug, reported through
        ``threading.excepthook`` (never dropped), and the manager goes on."""
        try:
            chunk.sink(chunk, outcome)
        except Exception:
            exc_type, exc, tb = sys.exc_info()
            threading.excepthook(threading.ExceptHookArgs((exc_type, exc, tb, threading.current_thread())))


class _Unlocked:
    """Release a held lock for the duration of a ``with`` block."""

    __slots__ = ("lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.release()

    def __exit__(self, *exc: object) -> None:
        self.lock.acquire()


# -- interpreter exit ------------------------------------------------------------------
_live: weakref.WeakSet[Dispatcher] = weakref.WeakSet()
_exiting = False
_registered = False
_track_lock = threading.Lock()
EXIT_JOIN_SECONDS = 2.0


def _track(dispatcher: Dispatcher) -> None:
    """Remember a live dispatcher, so that interpreter exit terminates it."""
    global _registered
    with _track_lock:
        _live.add(dispatcher)
        if not _registered:
            # Registered after multiprocess's own exit handler (imported by now), so it
            # runs first: our workers are reaped before multiprocess joins its children.
            import multiprocess.util  # noqa: F401

            atexit.register(_terminate_all_at_exit)
            _registered = True


def live_dispatchers() -> list[Dispatcher]:
    """Every dispatcher of this process not yet collected."""
    return list(_live)


def _terminate_all_at_exit() -> None:
    """At interpreter exit, pools are terminated, not drained: exit is quick and quiet."""
    global _exiting
    _exiting = True
    dispatchers = list(_live)
    for dispatcher in dispatchers:
        dispatcher.terminate()
    deadline = time.monotonic() + EXIT_JOIN_SECONDS
    for dispatcher in dispatchers:
        dispatcher.join(max(0.0, deadline - time.monotonic()))


def _forget_after_fork() -> None:
    global _track_lock
    _live.clear()
    _track_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
