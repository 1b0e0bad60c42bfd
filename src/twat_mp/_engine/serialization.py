"""How objects cross a process boundary.

Functions ship once per worker with dill (``recurse=True``, so a function defined in a
notebook cell or ``__main__`` carries the globals it uses). Items and results ship in
batches with the C pickle (protocol 5) and fall back to dill only for a batch that
pickle refuses. Buffers of 1 MiB or more (numpy arrays, torch tensors) go through
shared memory (see ``shm``). The receiving side always uses ``pickle.loads``: dill
writes standard pickle opcodes.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import sys
from typing import Any

import dill

from twat_mp._engine import shm
from twat_mp.errors import SerializationError

PROTOCOL = pickle.HIGHEST_PROTOCOL


def _reduce_tensor(tensor: Any) -> tuple[Any, ...]:
    import torch

    if tensor.device.type != "cpu" or tensor.requires_grad or tensor.is_sparse or not tensor.is_contiguous():
        return tensor.__reduce_ex__(PROTOCOL)  # type: ignore[no-any-return]
    return (torch.from_numpy, (tensor.numpy(),))


_tables: dict[bool, dict[Any, Any]] = {}


def _dispatch_table() -> dict[Any, Any]:
    """copyreg's table, plus torch tensors as numpy arrays once torch is imported (so
    their storage can go out-of-band)."""
    torch = sys.modules.get("torch")
    table = _tables.get(torch is not None)
    if table is None:
        table = dict(copyreg.dispatch_table)
        if torch is not None:
            table[torch.Tensor] = _reduce_tensor
        _tables[torch is not None] = table
    return table


def dumps(obj: Any, what: str = "object", shm_prefix: str | None = None) -> tuple[bytes, bool]:
    """Pickle ``obj``; return ``(payload, used_dill)``. With ``shm_prefix``, large buffers
    go to shared-memory segments named under it. Raise SerializationError naming
    ``what`` and the reason when neither pickle nor dill can do it."""
    segments: list[shm.Segment] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        if view.nbytes < shm.THRESHOLD:
            return True
        assert shm_prefix is not None
        segments.append(shm.write_segment(shm_prefix, view))
        return False

    try:
        if shm_prefix is None or not shm.AVAILABLE:
            return pickle.dumps(obj, PROTOCOL), False
        stream = io.BytesIO()
        pickler = pickle.Pickler(stream, PROTOCOL, buffer_callback=out_of_band)
        pickler.dispatch_table = _dispatch_table()
        pickler.dump(obj)
        data = stream.getvalue()
    except Exception:  # pickle raises PicklingError, TypeError, AttributeError, ...
        shm.unlink(segments)
        return dumps_dill(obj, what), True
    if segments:
        return shm.wrap(segments, data), False
    return data, False


def dumps_dill(obj: Any, what: str = "object") -> bytes:
    try:
        payload: bytes = dill.dumps(obj, PROTOCOL, recurse=True)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {what} {_describe(obj)}: {exc}") from exc
    return payload


def dumps_function(fn: Any) -> bytes:
    """Pickle a callable by value where needed (lambdas, closures, ``__main__``)."""
    return dumps_dill(fn, "function")


def loads(payload: bytes | memoryview, *, unlink: bool = False) -> Any:
    """Unpickle a payload; ``unlink`` removes its shared-memory segments once mapped
    (the mappings stay valid)."""
    if bytes(payload[:1]) == shm.MARK:
        data, buffers = shm.unwrap(payload, unlink_after=unlink)
        return pickle.loads(data, buffers=buffers)
    return pickle.loads(payload)


def release(payload: bytes | memoryview | None) -> None:
    """Unlink the shared-memory segments of a payload that will not be unpickled."""
    if payload is not None:
        shm.unlink(shm.segments_of(payload))


def find_unpicklable(items: list[Any]) -> str:
    """Name the first item of a batch that cannot be pickled, for an error message."""
    for item in items:
        try:
            dill.dumps(item, PROTOCOL, recurse=True)
        except Exception as exc:
            return f"the item {_describe(item)}: {exc}"
    return "the batch"


def _describe(obj: Any) -> str:
    text = repr(obj)
    if len(text) > 100:
        text = text[:97] + "..."
    return f"{text} (type {type(obj).__qualname__})"
