"""Zero-copy shared data: arrays and tensors that every worker maps, reads and writes.

``share(x)`` copies a numpy array or a CPU torch tensor once into a shared-memory
segment and returns an array (a tensor) of the same type, shape and dtype backed by it.
Passing it to a map, ``submit`` or a process op sends a reference (a path, an offset
and a length), never its bytes; a worker maps the same memory, so what it writes there
the caller sees. ``shared_array`` and ``shared_tensor`` allocate zero-filled data in
shared memory from the start, so data built for workers is never copied at all.

    >>> import numpy as np
    >>> from twat_mp.shared import is_shared, share, shared_array
    >>> a = share(np.arange(6.0).reshape(2, 3))
    >>> is_shared(a), a.shape, a.dtype
    (True, (2, 3), dtype('float64'))
    >>> b = shared_array(4, dtype=np.int32)
    >>> b[:] = 7
    >>> b
    array([7, 7, 7, 7], dtype=int32)

Lifetime: the segment belongs to the process that made it and is removed when the
last object on it there is garbage collected, or when that process exits (also after
Ctrl-C); if it is killed, the next twat-mp process that starts removes it. Workers
never remove it, and what they mapped stays valid until they drop it. So keep a shared
array alive in the process that made it while workers still receive it. Segments made
by ``map`` arguments automatically (1 MiB buffers and more) stay private
copy-on-write copies, as before: only what you share is written to by everyone.

A ``share`` that does not fit in ``/dev/shm`` (containers get 64 MB by default) raises
``SharedMemoryError`` naming the size and the free space; where there is no usable
``/dev/shm`` it raises too. Writes from several processes to the same elements are not
synchronised: give each worker its own rows, or use a lock of your own.

numpy and torch are imported only when given (or asked for): this module imports
without either.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, SupportsIndex, TypeVar, cast

from twat_mp._engine import shm
from twat_mp._engine.serialization import array_bounds

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["is_shared", "share", "shared_array", "shared_tensor"]

T = TypeVar("T")


def share(x: T) -> T:
    """``x`` in writable shared memory: a numpy array (any dtype but ``object``) or a
    CPU torch tensor (any dtype), copied once, of the same type, shape and dtype
    (contiguous: C order, or Fortran order for a Fortran-ordered array; a tensor comes
    back detached). Sending the result to workers sends a reference, and their writes to
    it are seen here. An already shared ``x`` is returned as it is.

        >>> import numpy as np
        >>> from twat_mp.shared import is_shared, share
        >>> x = np.linspace(0.0, 1.0, 5)[::2]       # a strided view: copied once
        >>> s = share(x)
        >>> s, is_shared(s), share(s) is s
        (array([0. , 0.5, 1. ]), True, True)

    Raises ``SharedMemoryError`` when it does not fit in ``/dev/shm`` (the message
    names the size and the free space) or there is no usable ``/dev/shm``; TypeError
    for other types; ValueError for a tensor on another device (a CUDA tensor reaches
    workers on its device through CUDA IPC without ``share``).
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return cast("T", _share_tensor(x))
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, numpy.ndarray):
        return cast("T", _share_array(x))
    raise TypeError(f"share() takes a numpy array or a torch tensor, not {type(x).__qualname__}")


def shared_array(shape: SupportsIndex | Iterable[SupportsIndex], dtype: Any = "float64", *,
                 order: Literal["C", "F"] = "C") -> np.ndarray[Any, Any]:
    """A zero-filled numpy array in writable shared memory (see ``share``): fill it in
    place and pass it to workers, nothing is ever copied.

        >>> from twat_mp.shared import shared_array
        >>> shared_array((2, 2))
        array([[0., 0.],
               [0., 0.]])
    """
    import numpy

    dims = _shape(shape)
    dtype = numpy.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(f"an array of {dtype} holds Python objects, which cannot live in shared memory")
    buffer = shm.create_shared(math.prod(dims) * dtype.itemsize)
    return numpy.ndarray(dims, dtype, buffer=buffer, order=order)


def shared_tensor(shape: SupportsIndex | Iterable[SupportsIndex], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A zero-filled CPU torch tensor (``float32`` unless ``dtype`` says otherwise) in
    writable shared memory (see ``share``).

        >>> import torch                                    # doctest: +SKIP
        >>> from twat_mp.shared import shared_tensor        # doctest: +SKIP
        >>> shared_tensor((2, 3), dtype=torch.bfloat16).sum()  # doctest: +SKIP
        tensor(0., dtype=torch.bfloat16)
    """
    import torch

    dims = _shape(shape)
    dtype = torch.float32 if dtype is None else dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(dims)
    buffer = shm.create_shared(max(count, 1) * itemsize)  # torch.frombuffer refuses an empty buffer
    return torch.frombuffer(buffer, dtype=dtype, count=max(count, 1))[:count].view(dims)


def is_shared(x: Any) -> bool:
    """Whether ``x`` (a numpy array or a torch tensor) lies in writable shared memory:
    made by ``share``, ``shared_array`` or ``shared_tensor`` here, or received from the
    process that made it.

        >>> import numpy as np
        >>> from twat_mp.shared import is_shared, share
        >>> is_shared(np.zeros(3)), is_shared(share(np.zeros(3))[1:])
        (False, True)
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu" or x.layout is not torch.strided:
            return False
        storage = x.untyped_storage()
        return shm.is_shared_range(storage.data_ptr(), storage.nbytes())
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, numpy.ndarray):
        return shm.is_shared_range(*array_bounds(x))
    return False


def _shape(shape: SupportsIndex | Iterable[SupportsIndex]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, SupportsIndex) else tuple(shape)
    out = tuple(int(n.__index__()) for n in dims)
    if any(n < 0 for n in out):
        raise ValueError(f"negative dimensions are not allowed: {out}")
    return out


def _share_array(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import numpy

    if type(array) is not numpy.ndarray and isinstance(array, numpy.ma.MaskedArray):
        raise TypeError("share() takes the data of an array, and a MaskedArray's mask would be lost: "
                        "share its .data and .mask (two arrays) instead")
    if is_shared(array):
        return array
    fortran = array.flags.f_contiguous and not array.flags.c_contiguous
    out = shared_array(array.shape, array.dtype, order="F" if fortran else "C")
    out[...] = array  # the one copy
    return out if type(array) is type(out) else out.view(type(array))


def _share_tensor(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    if tensor.device.type != "cpu":
        raise ValueError(f"share() places CPU tensors in shared memory, not a tensor on {tensor.device}; a CUDA "
                         "tensor reaches workers on its device through CUDA IPC as it is")
    if tensor.layout is not torch.strided or tensor.is_quantized:
        raise TypeError(f"share() takes dense tensors, not a {tensor.layout} or quantized one")
    if is_shared(tensor):
        return tensor
    out = shared_tensor(tensor.shape, tensor.dtype)
    out.copy_(tensor.detach().resolve_conj().resolve_neg())  # the one copy
    return out
