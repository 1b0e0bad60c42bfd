"""How objects cross a process boundary.

Functions ship once per worker with dill (``recurse=True``, so a function defined in a
notebook cell or ``__main__`` carries the globals it uses). Items and results ship in
batches with the C pickle and fall back to dill only for a batch that pickle refuses.
The receiving side always uses ``pickle.loads``: dill writes standard pickle opcodes.
"""

from __future__ import annotations

import pickle
from typing import Any

import dill

from twat_mp.errors import SerializationError

PROTOCOL = pickle.HIGHEST_PROTOCOL


def dumps(obj: Any, what: str = "object") -> tuple[bytes, bool]:
    """Pickle ``obj``; return ``(payload, used_dill)``. Raise SerializationError naming
    ``what`` and the reason when neither pickle nor dill can do it."""
    try:
        return pickle.dumps(obj, PROTOCOL), False
    except Exception:  # pickle raises PicklingError, TypeError, AttributeError, ...
        return dumps_dill(obj, what), True


def dumps_dill(obj: Any, what: str = "object") -> bytes:
    try:
        payload: bytes = dill.dumps(obj, PROTOCOL, recurse=True)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {what} {_describe(obj)}: {exc}") from exc
    return payload


def dumps_function(fn: Any) -> bytes:
    """Pickle a callable by value where needed (lambdas, closures, ``__main__``)."""
    return dumps_dill(fn, "function")


def loads(payload: bytes | memoryview) -> Any:
    return pickle.loads(payload)


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
