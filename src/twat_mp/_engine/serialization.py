"""How objects cross a process boundary.

Functions: one importable by reference (module-level, not ``__main__``) travels as a
plain C pickle of its name. Any other function (``__main__``, a notebook cell, a lambda,
a closure) travels by value: its code, closure, defaults and the globals its code reads,
pickled with dill plus our own function reducer (dill's recursive global walk loops
forever on self-referencing closures and mutually recursive functions; annotations are
not sent, as running the function does not need them). A by-value payload is cached by
code object and re-used only while a fingerprint of everything it captured is unchanged
(``_fingerprint``), so a notebook function whose globals were rebound is sent anew.

Items and results ship in batches with the C pickle (protocol 5) and fall back to dill
only for a batch that pickle refuses. Buffers of 1 MiB or more (numpy arrays, CPU
torch tensors of any dtype) go through shared memory (see ``shm``): written to a new
segment, or, when they lie in a segment this process holds (a kept result, ``share``),
sent as a reference to it. A buffer in a *shared* segment (``twat_mp.share``) of any
size is always sent by reference, in a C or a dill pickle, and so is a strided view of
one. A CUDA tensor goes through torch's CUDA IPC where it can (the receiver maps the
same device memory), else through the CPU. The receiving side always uses
``pickle.loads``: dill writes standard pickle opcodes.
"""

from __future__ import annotations

import builtins
import copyreg
import functools
import io
import operator
import pickle
import sys
import threading
import types
from collections import OrderedDict
from typing import Any

from twat_mp._engine import shm
from twat_mp.errors import SerializationError

PROTOCOL = pickle.HIGHEST_PROTOCOL

#: What the C pickle raises for an object it cannot pickle; only these mean "try dill".
_PICKLE_REFUSED = (pickle.PicklingError, TypeError, AttributeError)


# -- torch tensors ------------------------------------------------------------------------
_tensor_types: dict[str, Any] = {}


def _torch_types(torch: Any) -> dict[str, Any]:
    """Dtypes numpy shares with torch, and an integer dtype of each element size for the
    rest (bfloat16, float8, complex32, unsigned 16-64): those travel as bits."""
    if not _tensor_types:
        _tensor_types["numpy"] = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                  torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128}
        _tensor_types["bits"] = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return _tensor_types


def _tensor_from_bits(array: Any, dtype: Any) -> Any:
    import torch

    return torch.from_numpy(array).view(dtype)


def _reduce_tensor(tensor: Any) -> tuple[Any, ...]:
    """A dense CPU tensor as a numpy array, so its storage can go out-of-band (shared
    memory); anything else keeps torch's own reduction. A failure here is ours: it is
    logged and the tensor keeps torch's reduction, never silently handed to dill."""
    if tensor.device.type == "cuda":
        return _reduce_cuda(tensor)
    try:
        reduced = _tensor_as_array(tensor)
    except Exception as exc:
        from twat_mp._logging import logger

        logger.debug("tensor of {} kept torch's own pickling: {!r}", tensor.dtype, exc)
        reduced = None
    return reduced if reduced is not None else tensor.__reduce_ex__(PROTOCOL)


def _tensor_as_array(tensor: Any) -> tuple[Any, ...] | None:
    import torch

    if (tensor.device.type != "cpu" or tensor.requires_grad or tensor.layout is not torch.strided
            or tensor.is_quantized or tensor.is_conj() or tensor.is_neg()):
        return None
    if not tensor.is_contiguous() and not _in_shared(tensor):  # a view of a shared tensor: by reference
        return None
    kinds = _torch_types(torch)
    if tensor.dtype in kinds["numpy"]:
        return (torch.from_numpy, (tensor.numpy(),))
    bits = kinds["bits"].get(tensor.element_size())
    if bits is None:
        return None
    return (_tensor_from_bits, (tensor.view(bits).numpy(), tensor.dtype))


def _in_shared(tensor: Any) -> bool:
    storage = tensor.untyped_storage()
    return shm.is_shared_range(storage.data_ptr(), storage.nbytes())


def _reduce_cuda(tensor: Any) -> tuple[Any, ...]:
    """A CUDA tensor by torch's CUDA IPC (the receiver maps the same device memory; this
    process keeps it alive while the receiver uses it), or, where IPC is unavailable or
    refuses the tensor, through the CPU, back on the device in a receiver with CUDA."""
    try:
        from torch.multiprocessing.reductions import reduce_tensor

        reduced: tuple[Any, ...] = reduce_tensor(tensor)  # type: ignore[no-untyped-call]
        return reduced
    except Exception as exc:
        from twat_mp._logging import logger

        logger.debug("CUDA tensor on {} sent through the CPU (no CUDA IPC: {!r})", tensor.device, exc)
    return (_tensor_to_device, (tensor.detach().cpu(), str(tensor.device), tensor.requires_grad))


def _tensor_to_device(tensor: Any, device: str, requires_grad: bool) -> Any:
    import torch

    if torch.cuda.is_available():
        tensor = tensor.to(device)
    else:
        from twat_mp._logging import logger

        logger.debug("a tensor of {} stays on the CPU: no CUDA in this process", device)
    return tensor.requires_grad_() if requires_grad else tensor


def _reduce_ndarray(array: Any) -> Any:
    """A strided view of a shared segment by reference (the segment's bytes it spans and
    its strides), so a worker writes where the caller reads; any other array as numpy
    pickles it (contiguous buffers out-of-band)."""
    if shm._shared and not (array.flags.c_contiguous or array.flags.f_contiguous) and array.size:
        low, nbytes = array_bounds(array)
        span = shm.shared_view(low, nbytes)
        if span is not None:
            start = array.__array_interface__["data"][0]
            return (_strided, (pickle.PickleBuffer(span), array.dtype, array.shape, array.strides, start - low))
    return array.__reduce_ex__(PROTOCOL)


def array_bounds(array: Any) -> tuple[int, int]:
    """The lowest address of a numpy array's elements and the bytes its elements span
    (0 for an empty array), whatever its strides."""
    if not array.size:
        return array.__array_interface__["data"][0], 0
    low = high = array.__array_interface__["data"][0]
    for n, stride in zip(array.shape, array.strides):
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return low, high - low + array.itemsize


def _strided(buffer: Any, dtype: Any, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
    import numpy

    return numpy.ndarray(shape, dtype, buffer=buffer, offset=offset, strides=strides)


_tables: dict[tuple[bool, bool], dict[Any, Any]] = {}


def _dispatch_table() -> dict[Any, Any]:
    """copyreg's table, plus torch tensors as numpy arrays once torch is imported (so
    their storage can go out-of-band), plus numpy arrays while shared segments exist
    (so views of them go by reference)."""
    torch = sys.modules.get("torch")
    numpy = sys.modules.get("numpy") if shm._shared else None
    key = (torch is not None, numpy is not None)
    table = _tables.get(key)
    if table is None:
        table = dict(copyreg.dispatch_table)
        if torch is not None:
            table[torch.Tensor] = _reduce_tensor
        if numpy is not None:
            table[numpy.ndarray] = _reduce_ndarray
        _tables[key] = table
    return table


# -- items and results --------------------------------------------------------------------
def dumps(obj: Any, what: str = "object", shm_prefix: str | None = None, *,
          by_reference: bool = True) -> tuple[bytes, bool]:
    """Pickle ``obj``; return ``(payload, used_dill)``. With ``shm_prefix``, large buffers
    go to shared-memory segments named under it, or through the pipe when a segment
    cannot be made; a buffer that lies in a segment this process holds (unwritten since)
    is sent by reference to it instead, unless ``by_reference`` is false. A payload with
    segments must be passed to ``release`` once the receiver is done with it. Raise
    SerializationError naming ``what`` and the reason when neither pickle nor dill can
    do it."""
    segments: list[shm.Segment] = []
    refused: list[OSError] = []
    here = shm.releases_here(shm_prefix)  # a task sent from here, not a worker's result

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        if shm._shared and by_reference:
            shared = shm.shared_reference(view, pin=here, own=here)
            if shared is not None:  # a shared segment, written to on purpose: any size, by reference
                segments.append(shared)
                return False
        if view.nbytes < shm.THRESHOLD:
            return True
        # a reference pins its segment until the payload is released: only for payloads
        # that will be (a task's, a result's), never for one pickled for other ends (an
        # exception captured in a thread worker)
        held = shm.reference(view) if by_reference and shm_prefix is not None else None
        if held is not None:  # already in shared memory: nothing to write
            segments.append(held)
            return False
        if refused or shm_prefix is None:
            return True
        try:
            segments.append(shm.write_segment(shm_prefix, view))
        except OSError as exc:  # no space, no directory, read-only: this payload uses the pipe
            refused.append(exc)
            return True
        return False

    try:
        if shm_prefix is None and not shm._shared:
            return pickle.dumps(obj, PROTOCOL), False
        stream = io.BytesIO()
        pickler = pickle.Pickler(stream, PROTOCOL, buffer_callback=out_of_band)
        pickler.dispatch_table = _dispatch_table()
        pickler.dump(obj)
        data = stream.getvalue()
    except _PICKLE_REFUSED:
        shm.release(segments)
        return dumps_dill(obj, what, own=here), True
    except Exception as exc:  # a __reduce__ or __getstate__ failed: dill would only call it again
        shm.release(segments)
        raise SerializationError(f"cannot pickle {what} {_describe(obj)}: {exc!r}") from exc
    except BaseException:
        shm.release(segments)
        raise
    if refused:
        from twat_mp._logging import logger

        logger.debug("{} sent through the pipe, not shared memory ({}): {}", what, shm_prefix, refused[0])
    if segments:
        return shm.wrap(segments, data), False
    return data, False


def dumps_dill(obj: Any, what: str = "object", *, own: bool = True) -> bytes:
    """Pickle ``obj`` with dill, functions by value where they cannot be imported. Buffers
    of shared segments go by reference (those of this process only with ``own``)."""
    try:
        return _dumps_by_value(obj, own=own)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {what} {_describe(obj)}: {exc}") from exc


def loads(payload: bytes | memoryview, *, unlink: bool = False, keep: bool = False) -> Any:
    """Unpickle a payload. For the segments the payload owns (a result), ``unlink``
    removes them once mapped (the mappings stay valid); ``keep`` makes this process
    hold them instead: they stay linked while an object unpickled from them lives, so
    sending it on (``dumps``) refers to them rather than writing them anew."""
    if bytes(payload[:1]) == shm.MARK:
        data, buffers = shm.unwrap(payload, unlink_after=unlink, keep=keep)
        return pickle.loads(data, buffers=buffers)
    return pickle.loads(payload)


def release(payload: bytes | memoryview | None) -> None:
    """Release the shared memory of a payload once the receiver is done with it (or it
    will not be unpickled): unlink the segments it owns, unpin those it refers to."""
    if payload is not None:
        shm.release(shm.segments_of(payload))


def share(obj: Any) -> Any:
    """An equal copy of ``obj`` whose buffers of ``shm.THRESHOLD`` bytes or more live in
    shared-memory segments this process holds, so that sending it to workers later
    (a task's items, any ``dumps`` with a prefix) refers to them instead of copying:
    the hook for placing a value once and using it in many tasks. The segments are
    unlinked when the last object on them is collected (or this process exits; if it
    is killed, the next engine start sweeps them). ``obj`` itself is returned when it
    has no such buffer, or when shared memory is unavailable or full."""
    payload, _ = dumps(obj, "value", f"{shm.SHM_DIR}/{shm.own_name()}", by_reference=False)
    if bytes(payload[:1]) != shm.MARK:
        return obj
    return loads(payload, keep=True)


def find_unpicklable(items: list[Any], what: str = "item") -> str:
    """Name the first value of a batch that cannot be pickled, for an error message:
    ``what`` is the noun for it ("item" for inputs, "result" for results)."""
    for index, item in enumerate(items):
        try:
            _dumps_by_value(item)
        except Exception as exc:
            return f"the {what} {_describe(item)} (number {index} of its chunk): {exc}"
    return "the batch"


def _describe(obj: Any) -> str:
    text = repr(obj)
    if len(text) > 100:
        text = text[:97] + "..."
    return f"{text} (type {type(obj).__qualname__})"


# -- functions ----------------------------------------------------------------------------
def dumps_function(fn: Any) -> bytes:
    """Pickle the callable a map runs. Called on every map, so it is cheap: an importable
    function is a C pickle of its name, and another function's payload is re-used while
    its fingerprint (code, closure, defaults, the globals its code reads) is unchanged."""
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)) and _importable(fn):
        return pickle.dumps(fn, PROTOCOL)
    if type(fn) is not types.FunctionType:  # bound methods, partials, callable objects
        return dumps_dill(fn, "function")
    stamp = _fingerprint(fn)
    if stamp is None:  # it reads a mutable value (a list, an array): pickle it anew each call
        return dumps_dill(fn, "function")
    code = fn.__code__  # the key: a lambda made anew on each call finds its payload too
    with _cache_lock:
        entry = _cache.get(id(code))
        if entry is not None and entry[0] is code and _same(entry[1], stamp):
            _cache.move_to_end(id(code))
            return entry[2]
    payload = dumps_dill(fn, "function")
    with _cache_lock:
        _cache[id(code)] = (code, stamp, payload)
        _cache.move_to_end(id(code))
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return payload


_CACHE_SIZE = 64
# id(code) → (code, fingerprint, payload), least recently used first
_cache: OrderedDict[int, tuple[types.CodeType, list[Any], bytes]] = OrderedDict()
_cache_lock = threading.Lock()


def _importable(obj: Any) -> bool:
    """Whether ``obj`` pickles by reference: its module (not ``__main__``) is imported
    and looking up its qualified name there gives ``obj`` itself."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module_name, str) or module_name == "__main__" or not isinstance(qualname, str):
        return False
    target = sys.modules.get(module_name)
    if target is None or "<locals>" in qualname:
        return False
    try:
        for part in qualname.split("."):
            target = getattr(target, part)
    except Exception:  # AttributeError, or a module __getattr__ that fails: not by reference
        return False
    return target is obj


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Names a code object (and the code nested in it) may read as globals."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(dict.fromkeys(_global_names(const)))
    return tuple(names)


# Markers in fingerprints and payloads (classes: they pickle by reference and stay unique).
class _Missing:
    """An unbound global or an empty closure cell."""


class _ByReference:
    """A function that pickles by its name."""


class _End:
    """The end of a dictionary's items in a fingerprint."""


#: Values that cannot change in place: identity says everything (exact types only).
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis),
                    type(NotImplemented), types.CodeType})


def _fingerprint(fn: types.FunctionType) -> list[Any] | None:
    """Everything ``fn``'s by-value payload captures, as a list of objects compared by
    identity (held, so no id is reused); None when it captures a mutable value that
    could change without a rebinding (then no payload is re-used). ``fn``'s own identity
    is left out: two functions alike in all of this have the same payload."""
    out: list[Any] = []
    return out[1:] if _stamp_function(fn, out, set()) else None


def _same(old: list[Any], new: list[Any]) -> bool:
    return len(old) == len(new) and all(map(operator.is_, old, new))


def _stamp(value: Any, out: list[Any], seen: set[int]) -> bool:
    kind = type(value)
    if kind in _ATOMS or kind is types.ModuleType:  # modules pickle by name
        out.append(value)
        return kind is not types.ModuleType or value.__name__ != "__main__"
    if kind is tuple or kind is frozenset:
        out.append(value)
        return all(_stamp(item, out, seen) for item in value)
    if kind is types.FunctionType:
        return _stamp_function(value, out, seen)
    if isinstance(value, (types.BuiltinFunctionType, type)) and _importable(value):
        out.append(value)
        return True
    return False  # mutable or unknown: cannot vouch for it by identity


def _stamp_items(mapping: dict[str, Any] | None, out: list[Any], seen: set[int]) -> bool:
    for key, value in (mapping or {}).items():
        out.append(key)
        if not _stamp(value, out, seen):
            return False
    out.append(_End)
    return True


def _stamp_function(fn: types.FunctionType, out: list[Any], seen: set[int]) -> bool:
    out.append(fn)
    if id(fn) in seen:
        return True
    seen.add(id(fn))
    if _importable(fn):
        out.append(_ByReference)
        return True
    code = fn.__code__
    out += [code, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__]
    if not (_stamp(fn.__defaults__, out, seen) and _stamp_items(fn.__kwdefaults__, out, seen)
            and _stamp_items(fn.__dict__, out, seen)):
        return False
    for cell in fn.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            contents = _Missing
        if not _stamp(contents, out, seen):
            return False
    globals_ = fn.__globals__
    return all(_stamp(globals_.get(name, _Missing), out, seen) for name in _global_names(code))


# By value: a function is rebuilt from its code with a fresh globals dictionary holding
# only the globals its code reads. Its globals, defaults and cell contents travel as
# state, set after the function exists, so recursion through them (a function that
# calls itself, a closure holding itself, f calling g calling f) meets the memo. A value
# that dill is still building (a class by value, whose methods refer to it through
# ``__class__`` or a global) is set by dill's post-processing of that value instead.
def _save_function(pickler: Any, fn: types.FunctionType) -> None:
    if _importable(fn):
        pickler.save_global(fn)
        return
    building: dict[int, list[Any]] = getattr(pickler, "_postproc", None) or {}
    deferred: list[tuple[int, Any, tuple[Any, ...]]] = []
    globals_ = fn.__globals__
    captured = {}
    for name in _global_names(fn.__code__):
        if name in globals_:
            value = globals_[name]
            if id(value) in building:
                deferred.append((id(value), _set_global, (fn, name, value)))
            else:
                captured[name] = value
    contents: list[Any] = []
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            value = _Missing
        if id(value) in building:
            deferred.append((id(value), _set_cell, (cell, value)))
            value = _Missing
        contents.append(value)
    state = (captured, fn.__defaults__, fn.__kwdefaults__, fn.__dict__ or None, fn.__qualname__, fn.__doc__,
             contents)
    pickler.save_reduce(_new_function, (fn.__code__, fn.__name__, fn.__module__, fn.__closure__),
                        state=state, state_setter=_fill_function, obj=fn)
    for key, setter, args in deferred:
        building[key].append((setter, args))


def _set_global(fn: types.FunctionType, name: str, value: Any) -> None:
    fn.__globals__[name] = value


def _set_cell(cell: types.CellType, value: Any) -> None:
    cell.cell_contents = value


def _save_cell(pickler: Any, cell: types.CellType) -> None:
    """An empty cell; its contents come with the state of the function that uses it."""
    pickler.save_reduce(_new_cell, (), obj=cell)


def _new_cell() -> types.CellType:
    return types.CellType()


def _new_function(code: types.CodeType, name: str, module: str | None,
                  closure: tuple[types.CellType, ...] | None) -> types.FunctionType:
    return types.FunctionType(code, {"__name__": module, "__builtins__": builtins}, name, None, closure)


def _fill_function(fn: types.FunctionType, state: tuple[Any, ...]) -> None:
    captured, defaults, kwdefaults, attributes, qualname, doc, contents = state
    fn.__globals__.update(captured)
    fn.__defaults__ = defaults
    fn.__kwdefaults__ = kwdefaults
    fn.__qualname__ = qualname
    fn.__doc__ = doc
    if attributes:
        fn.__dict__.update(attributes)
    for cell, value in zip(fn.__closure__ or (), contents):
        if value is not _Missing:
            cell.cell_contents = value


@functools.cache
def _pickler_class() -> Any:
    """dill's pickler with our function and cell reducers (dill imported on first use:
    it takes tens of milliseconds to import)."""
    import dill

    class Dispatch(dict[Any, Any]):
        """Our reducers first, then dill's table (which also handles metaclasses)."""

        def get(self, key: Any, default: Any = None) -> Any:
            found = dict.get(self, key)
            if found is None and shm._shared and key is getattr(sys.modules.get("numpy"), "ndarray", None):
                found = _save_ndarray  # dill pickles arrays in-band: not those of shared segments
            return found if found is not None else dill.Pickler.dispatch.get(key, default)

    class Pickler(dill.Pickler):  # type: ignore[misc]
        dispatch = Dispatch({types.FunctionType: _save_function, types.CellType: _save_cell})

    return Pickler


def _save_ndarray(pickler: Any, array: Any) -> None:
    pickler.save_reduce(*_reduce_ndarray(array), obj=array)


def _dumps_by_value(obj: Any, *, own: bool = True) -> bytes:
    """dill's pickle of ``obj``; buffers of shared segments (``twat_mp.share``) in it are
    sent by reference, unpinned (the sender holds what it sends while it is out; those
    of this process only with ``own``), so a value that needs dill still reaches a
    worker's writes."""
    stream = io.BytesIO()
    if not shm._shared:
        _pickler_class()(stream, PROTOCOL, recurse=True).dump(obj)
        return stream.getvalue()
    segments: list[shm.Segment] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            shared = shm.shared_reference(buffer.raw(), pin=False, own=own)
        except BufferError:
            return True
        if shared is None:
            return True
        segments.append(shared)
        return False

    pickler = _pickler_class()(stream, PROTOCOL, recurse=True, buffer_callback=out_of_band)
    pickler.dispatch_table = _dispatch_table()
    pickler.dump(obj)
    return shm.wrap(segments, stream.getvalue()) if segments else stream.getvalue()
