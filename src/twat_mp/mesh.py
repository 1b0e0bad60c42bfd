"""The compute topology services are placed on: a ``Mesh`` of devices, grouped in
``MeshNode``\\ s (this machine, for now; a Ray cluster's nodes later).

>>> from twat_mp import Mesh, devices
>>> with Mesh(devices("cpu")) as mesh:
...     mesh.gpus, mesh.cpus >= 1
([], True)

Without a ``with Mesh(...)`` block, the mesh is ``Mesh(devices())``: the GPUs if any,
else the CPU.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
from typing import Any, Iterable

from twat_mp.errors import ResourceError
from twat_mp.hardware import Device, devices

__all__ = ["Mesh", "MeshNode", "current_mesh"]


@dataclasses.dataclass(frozen=True)
class MeshNode:
    """A machine of the mesh and the devices it offers (``name`` "local": this one)."""

    devices: tuple[Device, ...]
    name: str = "local"

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        for device in self.devices:
            if not isinstance(device, Device):
                raise TypeError(f"a MeshNode holds Device objects (twat_mp.devices()), got {device!r}")


_current: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("twat_mp_mesh", default=None)


class Mesh:
    """The devices services may use: ``Mesh([Device | MeshNode, ...])``, a context
    manager that makes it current. ``gpus`` lists its GPUs (CUDA and MPS devices),
    ``cpus`` counts its CPU cores (the capacities of its CPU devices)."""

    def __init__(self, items: Iterable[Device | MeshNode] | None = None) -> None:
        given = list(devices() if items is None else items)
        loose = [item for item in given if isinstance(item, Device)]
        nodes = [item for item in given if isinstance(item, MeshNode)]
        odd = [item for item in given if not isinstance(item, (Device, MeshNode))]
        if odd:
            raise TypeError(f"a Mesh is made of Device and MeshNode objects, got {odd[0]!r}")
        if loose:
            nodes.insert(0, MeshNode(tuple(loose)))
        if not nodes or not any(node.devices for node in nodes):
            raise ValueError("a Mesh needs at least one device (twat_mp.devices() lists them)")
        self.nodes: list[MeshNode] = nodes
        self._tokens = threading.local()  # each thread's own stack: one Mesh may be entered in several

    @property
    def devices(self) -> list[Device]:
        return [device for node in self.nodes for device in node.devices]

    @property
    def gpus(self) -> list[Device]:
        return [device for device in self.devices if device.kind in ("cuda", "mps")]

    @property
    def cpus(self) -> int:
        return sum(device.capacity for device in self.devices if device.kind == "cpu")

    def place(self, name: str, replicas: int, gpus: int, cpus: int | None) -> list[tuple[Device, ...]]:
        """The devices of each of ``replicas`` replicas that each need ``gpus`` GPUs and
        ``cpus`` cores: ``gpus`` GPUs of its own (exclusive), else the CPU (empty where
        the mesh has no CPU device). Raises ``ResourceError`` naming the need and the
        capacity when the mesh is too small."""
        if gpus:
            need, have = replicas * gpus, len(self.gpus)
            if need > have:
                raise ResourceError(f"service {name!r} needs {replicas} replica(s) x {gpus} GPU(s) = {need} GPU(s); "
                                    f"the mesh has {have}", need, have, "gpus")
            return [tuple(self.gpus[i * gpus:(i + 1) * gpus]) for i in range(replicas)]
        if cpus:
            need, have = replicas * cpus, self.cpus
            if need > have:
                raise ResourceError(f"service {name!r} needs {replicas} replica(s) x {cpus} CPU core(s) = {need}; "
                                    f"the mesh has {have}", need, have, "cpus")
        cpu = next((device for device in self.devices if device.kind == "cpu"), None)
        return [(cpu,) if cpu is not None else ()] * replicas

    def __enter__(self) -> Mesh:
        stack = self._tokens.__dict__.setdefault("stack", [])
        stack.append(_current.set(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        _current.reset(self._tokens.stack.pop())

    def __repr__(self) -> str:
        return f"<Mesh {[str(d) for d in self.devices]}>"


def current_mesh(gpus: bool = True) -> Mesh:
    """The mesh of the innermost ``with Mesh(...)`` block, else ``Mesh(devices())``
    (with ``gpus=False``, for placing work that needs no GPU: the CPU alone, without
    asking torch for GPUs, which imports it)."""
    mesh = _current.get()
    if mesh is not None:
        return mesh
    return Mesh() if gpus else Mesh(devices("cpu"))
