"""Every public exception of twat-mp, in one place.

All of them derive from ``TwatMPError``, and most also from the builtin a caller would
expect (``RuntimeError``, ``TimeoutError``, ``TypeError``), so older ``except`` clauses
keep working. Every one pickles with its attributes, because nested maps and other
backends re-raise them in another process. What a user sees on each fault is described
in ``docs/errors.md`` and ``docs/failures.md``.
"""

from __future__ import annotations

import functools
import types
from typing import Any

__all__ = [
    "BrokenPoolError",
    "InitializerError",
    "NodeExecutionError",
    "OpError",
    "PoolClosedError",
    "ReplicaCrashedError",
    "ResourceError",
    "RuntimeClosedError",
    "SerializationError",
    "ServiceFailedError",
    "ServiceOverloadedError",
    "SharedMemoryError",
    "TaskTimeoutError",
    "TwatMPError",
    "WorkerCrashedError",
    "WorkerError",
]

_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement or type()


def _short(items: list[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(item)[:80] for item in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"[{shown}{more}]"


def _builtin_base(cls: type) -> type:
    """The first class in ``cls``'s MRO written in C: the one whose ``__reduce__`` and
    ``__init__`` know its C-level fields (``OSError.errno``, ``StopIteration.value``)."""
    for klass in cls.__mro__:
        if not klass.__flags__ & _HEAP_TYPE:
            return klass
    return BaseException  # unreachable: object is not a heap type


def exception_state(exc: BaseException) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """``(args, state)`` of an exception as its builtin base pickles it, without the
    class: enough to rebuild it as another class of the same shape (see ``rebuild``)."""
    reduce: Any = _builtin_base(type(exc)).__reduce__
    reduced: tuple[Any, ...] = reduce(exc)
    args: tuple[Any, ...] = tuple(reduced[1])
    state = reduced[2] if len(reduced) > 2 and reduced[2] else None
    return args, (dict(state) if state is not None else None)


def pickles_by_constructor(cls: type[BaseException]) -> bool:
    """Whether pickle would re-create ``cls`` by calling ``cls(*args)``: true unless the
    class defines its own ``__reduce__``. Such a call re-runs a custom ``__init__`` with
    the wrong arguments (``MyError(code)`` whose message is ``f"code {code}"`` comes back
    as ``"code code 3"``), so twat-mp rebuilds these from ``exception_state`` instead."""
    own: Any = cls.__reduce__
    own_ex: Any = cls.__reduce_ex__
    return own is _builtin_base(cls).__reduce__ and own_ex is BaseException.__reduce_ex__


def rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any] | None) -> BaseException:
    """An instance of ``cls`` from ``exception_state`` of another exception. The class's
    own ``__init__`` is not called (its signature may differ from ``args``, as pickle
    also assumes); its builtin base's is, so C-level fields are set."""
    exc: BaseException = cls.__new__(cls, *args)
    try:
        base: Any = _builtin_base(cls)
        base.__init__(exc, *args)
    except TypeError:  # args its builtin base refuses: keep what __new__ stored
        exc.args = args
    if state:
        exc.__setstate__(state)
    return exc


def _restore(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    """Unpickle a twat-mp error without calling its ``__init__`` (whose signature is not
    its ``args``); pickle then restores the attributes with ``__setstate__``."""
    exc: BaseException = cls.__new__(cls, *args)
    exc.args = args
    return exc


class TwatMPError(Exception):
    """The base class of every error twat-mp raises itself (``except TwatMPError``)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (type(self), self.args), dict(self.__dict__)


class WorkerError(TwatMPError):
    """Where and how a user's function failed in a worker.

    A user's exception arrives in the caller as an instance of **both** its own class and
    ``WorkerError`` (a class made once per user class that derives from both), so both
    ``except ValueError`` and ``except WorkerError`` catch it::

        try:
            square(items)
        except WorkerError as exc:          # or: except ValueError
            exc.input_item, exc.worker_id, exc.worker_pid, exc.traceback_str
            exc.original_exception          # the ValueError itself, as re-created

    Its ``__cause__`` is a plain ``WorkerError`` with the same attributes whose text
    includes the remote traceback (as in twat-mp 3.0). When no such class can be made
    (the exception cannot be re-created in the caller, or its class refuses to be
    subclassed), a plain ``WorkerError`` is raised; ``exc_type_name`` then names the
    original type.
    """

    def __init__(
        self,
        message: str,
        original_exception: BaseException | None = None,
        worker_id: int | None = None,
        input_item: Any = None,
        traceback_str: str | None = "",
        *,
        exc_type_name: str = "",
        worker_pid: int | None = None,
    ) -> None:
        # The positional order is twat-mp 2.x's, so 2.x code that built one still works.
        super().__init__(message)
        self.original_exception = original_exception
        self.exc_type_name = exc_type_name or (
            type(original_exception).__name__ if original_exception is not None else ""
        )
        self.worker_id = worker_id
        self.worker_pid = worker_pid
        self.input_item = input_item
        self.traceback_str = traceback_str or ""

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback_str:
            text += "\n\nRemote traceback:\n" + self.traceback_str.rstrip()
        return text

    @classmethod
    def wrap(
        cls,
        original: BaseException | None,
        *,
        message: str,
        exc_type_name: str,
        input_item: Any = None,
        worker_id: int | None = None,
        worker_pid: int | None = None,
        traceback_str: str = "",
        decorator: bool = False,
    ) -> WorkerError:
        """The error to raise in the caller for ``original``, raised by the user's function
        on ``input_item``: an instance of ``type(original)`` and of ``WorkerError`` where
        possible, else a plain ``WorkerError``.

        ``message`` is ``str()`` of the original as the worker saw it. Its text is that
        message when the map was called through a decorator (the function behaves as if
        it had run locally), and names the type, the message and the item when called
        through a pool method (the words of twat-mp 2.x's ``WorkerError``).
        """
        where = failure_text(exc_type_name, message, input_item, worker_id, worker_pid)
        info = WorkerError(where, original, worker_id, input_item, traceback_str, exc_type_name=exc_type_name,
                           worker_pid=worker_pid)
        user = original
        if isinstance(original, WorkerError) and original.original_exception is not None:
            # A nested map's error left the worker: wrap the user's own exception again,
            # with this call's item and worker, and keep the inner error in the chain.
            user = original.original_exception
            info.__cause__ = original
            info.original_exception = user
        if not isinstance(user, Exception) or isinstance(user, WorkerError):
            return info
        kind: Any = type(user)  # a class is hashable; typeshed's Exception.__hash__ hides that
        dual = _dual_class(kind)
        if dual is None:
            return info
        try:
            args, state = exception_state(user)
            exc = rebuild(dual, args, state)
        except Exception:  # a custom __new__ or state the class refuses: no dual instance
            return info
        assert isinstance(exc, _RemoteUserError)
        if "__notes__" in exc.__dict__:  # its own list: a note added here must not change the original
            exc.__dict__["__notes__"] = list(exc.__dict__["__notes__"])
        exc.original_exception = user
        exc.exc_type_name = exc_type_name
        exc.input_item = input_item
        exc.worker_id = worker_id
        exc.worker_pid = worker_pid
        exc.traceback_str = traceback_str
        exc._twat_mp_message = message
        exc._twat_mp_decorator = decorator
        exc.__cause__ = info
        if decorator and hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"twat-mp: raised in {_worker_text(worker_id, worker_pid)} on input item {input_item!r:.200}")
        return exc


def _worker_text(worker_id: int | None, worker_pid: int | None) -> str:
    return f"worker {worker_id} (pid {worker_pid})" if worker_id is not None else "the worker"


def failure_text(exc_type_name: str, message: str, input_item: Any, worker_id: int | None,
                 worker_pid: int | None) -> str:
    """The text of a pool method's error, in twat-mp 2.x's words."""
    where = f" in worker {worker_id} (pid {worker_pid})" if worker_id is not None else ""
    return f"Worker process error{where} while processing {input_item!r:.200}: {exc_type_name}: {message}"


class _RemoteUserError(WorkerError):
    """The ``WorkerError`` half of a class made by ``_dual_class``. Such a class is built
    with the user class's ``__init__``, so code that re-raises with ``type(exc)(...)``
    gets an instance of it; the class-level defaults below then stand in for the
    attributes that only ``WorkerError.wrap`` sets."""

    _twat_mp_user_type: type[BaseException] = Exception
    original_exception: BaseException | None = None
    exc_type_name = ""
    worker_id: int | None = None
    worker_pid: int | None = None
    input_item: Any = None
    traceback_str = ""
    _twat_mp_message = ""
    _twat_mp_decorator = False

    def __str__(self) -> str:
        if "_twat_mp_message" not in self.__dict__:  # made by user code, not by wrap()
            return super(WorkerError, self).__str__()
        if self._twat_mp_decorator:
            return self._twat_mp_message
        return failure_text(self.exc_type_name, self._twat_mp_message, self.input_item, self.worker_id,
                            self.worker_pid)

    def __reduce__(self) -> tuple[Any, ...]:
        state = {key: value for key, value in self.__dict__.items() if key != "original_exception"}
        original = self.original_exception
        if original is None:  # made by user code: it travels as the user's own class
            return _restore, (self._twat_mp_user_type, self.args), state
        if pickles_by_constructor(type(original)):
            return _restore_remote_user_error, (type(original), exception_state(original), state), state
        return _restore_remote_user_error, (original, None, state), state


def _restore_remote_user_error(original: Any, original_state: tuple[tuple[Any, ...], dict[str, Any] | None] | None,
                               state: dict[str, Any]) -> WorkerError:
    """Unpickle an error made by ``WorkerError.wrap``: make it again in this process
    (its class exists only where it was made), then pickle restores its attributes.
    ``original`` is the user's exception, or its class when ``original_state`` holds
    what rebuilds it."""
    if original_state is not None:
        original = rebuild(original, *original_state)
    return WorkerError.wrap(
        original,
        message=str(state.get("_twat_mp_message", "")),
        exc_type_name=str(state.get("exc_type_name", "")),
        input_item=state.get("input_item"),
        worker_id=state.get("worker_id"),
        worker_pid=state.get("worker_pid"),
        traceback_str=str(state.get("traceback_str", "")),
        decorator=bool(state.get("_twat_mp_decorator", False)),
    )


@functools.lru_cache(maxsize=256)
def _dual_class(user_type: type[Exception]) -> type[_RemoteUserError] | None:
    """A class deriving from ``WorkerError`` and ``user_type``, made once per type (the
    cache is bounded: a type met again after eviction just gets a new class). It carries
    the user type's name, so tracebacks print it as the user wrote it. None when
    ``user_type`` refuses (not an acceptable base, ``__init_subclass__`` raises)."""
    def body(namespace: dict[str, Any]) -> None:
        namespace["__module__"] = user_type.__module__
        namespace["__qualname__"] = user_type.__qualname__
        namespace["__doc__"] = f"{user_type.__qualname__} raised in a twat-mp worker (also a WorkerError)."
        namespace["__init__"] = user_type.__init__
        namespace["_twat_mp_user_type"] = user_type

    try:
        made = types.new_class(user_type.__name__, (_RemoteUserError, user_type), exec_body=body)
    except Exception:  # TypeError for a layout or MRO conflict; anything from __init_subclass__
        return None
    assert issubclass(made, _RemoteUserError)
    return made


def _how_it_ended(exitcode: int | None) -> str:
    """"signal SIGKILL" for a negative exit code, else "exit code N"."""
    if exitcode is not None and exitcode < 0:
        import signal

        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerCrashedError(TwatMPError, RuntimeError):
    """A worker process died (killed, ``os._exit``, segfault, out of memory) while it held
    the items in ``items``. The pool has already replaced the worker."""

    def __init__(self, items: list[Any], worker_id: int, pid: int | None, exitcode: int | None) -> None:
        self.items = items
        self.worker_id = worker_id
        self.pid = pid
        self.exitcode = exitcode
        super().__init__(
            f"worker {worker_id} (pid {pid}) died with {_how_it_ended(exitcode)} while running items {_short(items)}; "
            "the pool replaced it. Pass retries=N to re-run the items of a dead worker."
        )


class TaskTimeoutError(TwatMPError, TimeoutError):
    """An item ran longer than the ``timeout`` it was given; its worker was stopped and
    replaced."""

    def __init__(self, items: list[Any], timeout: float, worker_id: int | None = None) -> None:
        self.items = items
        self.timeout = timeout
        self.worker_id = worker_id
        super().__init__(
            f"items {_short(items)} ran past timeout={timeout:g}s on worker {worker_id}; "
            "the worker was stopped and replaced. Raise timeout= or pass retries=N."
        )


class SerializationError(TwatMPError, TypeError):
    """A function, an argument or a result could not be pickled (neither by pickle nor
    by dill)."""


class PoolClosedError(TwatMPError, RuntimeError):
    """A pool was used while it was not open: before ``with``, after it closed, or after
    it was terminated."""


class BrokenPoolError(TwatMPError, RuntimeError):
    """The pool can no longer run work (its manager failed, or it cannot start workers);
    ``reason`` says why and ``__cause__`` holds what broke it. Open a new pool (a
    decorator's warm pool is replaced on the next call)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the pool can no longer run work: {reason}")


class InitializerError(TwatMPError, RuntimeError):
    """A worker's ``initializer`` raised. Names the worker (``worker_id``, ``worker_pid``);
    its ``__cause__`` (and ``exception``) is the initializer's exception re-created in the
    caller when it can be, and ``traceback_str`` the traceback from the worker."""

    def __init__(self, worker_id: int | None, worker_pid: int | None, error: BaseException | str,
                 traceback_str: str = "") -> None:
        self.worker_id = worker_id
        self.worker_pid = worker_pid
        self.exception = error if isinstance(error, BaseException) else None
        self.traceback_str = traceback_str
        detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        super().__init__(f"the initializer of {_worker_text(worker_id, worker_pid)} failed: {detail}")
        self.__cause__ = self.exception

    def __str__(self) -> str:
        text = super().__str__()
        if self.traceback_str and self.traceback_str not in text:
            text += "\n\nRemote traceback:\n" + self.traceback_str.rstrip()
        return text

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        super().__setstate__(state)
        self.__cause__ = self.__dict__.get("exception")


class OpError(TwatMPError):
    """A task of a graph could not run because an op it depends on failed.

    ``op`` names the op that raised, ``inputs`` shows its arguments (abbreviated) and
    ``chain`` lists the ops from the one that failed to the one whose result was asked
    for. ``__cause__`` (and ``exception``) is the original exception. A ref of the op
    that raised gives that exception itself; only its dependents give an ``OpError``.
    """

    def __init__(self, op: str, inputs: str, chain: list[str], exception: BaseException | None) -> None:
        self.op = op
        self.inputs = inputs
        self.chain = list(chain)
        self.exception = exception
        what = f"{type(exception).__name__}: {exception}" if exception is not None else "failed"
        super().__init__(f"op {op!r} failed on {inputs} ({what}); so did what depends on it: "
                         f"{' -> '.join(self.chain)}")
        self.__cause__ = exception

    def __reduce__(self) -> Any:
        return (OpError, (self.op, self.inputs, self.chain, self.exception))


class NodeExecutionError(TwatMPError):
    """A node of a pipeline raised. ``node`` names it, ``completed`` lists the nodes
    that finished before it (in order), and ``__cause__`` (and ``exception``) is the
    node's own exception."""

    def __init__(self, node: str, completed: list[str], exception: BaseException | None) -> None:
        self.node = node
        self.completed = list(completed)
        self.exception = exception
        what = f"{type(exception).__name__}: {exception}" if exception is not None else "failed"
        done = ", ".join(self.completed) if self.completed else "none"
        super().__init__(f"node {node!r} failed ({what}); nodes that finished before it: {done}")
        self.__cause__ = exception

    def __reduce__(self) -> Any:
        return (NodeExecutionError, (self.node, self.completed, self.exception))


class RuntimeClosedError(TwatMPError, RuntimeError):
    """A graph was used after its runtime shut down (``twat_mp.shutdown()``, or a
    ``with Runtime()`` block that ended)."""


class SharedMemoryError(TwatMPError, MemoryError):
    """Data could not be placed in shared memory (``twat_mp.share``, ``shared_array``,
    ``shared_tensor``): the segment does not fit in ``/dev/shm`` (containers get 64 MB
    by default), or there is no usable ``/dev/shm``. ``size`` is the number of bytes
    asked for and ``free`` the bytes free there (None when unknown)."""

    def __init__(self, message: str, size: int | None = None, free: int | None = None) -> None:
        super().__init__(message)
        self.size = size
        self.free = free


class ResourceError(TwatMPError, RuntimeError):
    """A service asks for more than the mesh has: ``need`` of ``resource`` ("gpus" or
    "cpus") against ``capacity``."""

    def __init__(self, message: str, need: int = 0, capacity: int = 0, resource: str = "") -> None:
        super().__init__(message)
        self.need, self.capacity, self.resource = need, capacity, resource

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.need, self.capacity, self.resource))


class ServiceOverloadedError(TwatMPError, RuntimeError):
    """A service's queue is full and the call was made with ``block=False``."""


class ServiceFailedError(TwatMPError, RuntimeError):
    """A service can no longer take calls: its replicas crashed more often than its
    restart strategy allows (``max_restarts`` within ``within_s``), or it was shut down.
    ``__cause__`` says what broke it."""


class ReplicaCrashedError(TwatMPError, RuntimeError):
    """The replica running a call crashed (its process died) and the call is not
    idempotent, so it was not re-run. Names the ``replica``, its ``pid`` and how it
    ended (``exitcode``: negative for a signal)."""

    def __init__(self, service: str, replica: int, pid: int | None, exitcode: int | None, call: str = "") -> None:
        self.service, self.replica, self.pid, self.exitcode, self.call = service, replica, pid, exitcode, call
        how = _how_it_ended(exitcode)
        super().__init__(f"replica {replica} of service {service!r} (pid {pid}) died with {how} while running "
                         f"{call or 'a call'}; the call was not re-run (mark the method or service idempotent=True "
                         "to re-run it on a live replica)")

    def __reduce__(self) -> Any:
        return (type(self), (self.service, self.replica, self.pid, self.exitcode, self.call))
