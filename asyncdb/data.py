"""Training data shared between the processes of one host, one copy in memory.

The driver writes each array once into an anonymous memfd; replicas map it read-only
through /proc/<driver pid>/fd/<n>. Nothing is named in /dev/shm or on disk, and the
memory goes when the driver closes the fds and the last replica unmaps it.

Only processes this host spawned may be handed such a spec: whatever a network peer
spawns runs `from_network()`, where a spec naming a path is refused. Data from another
host arrives as data, inside the message (`inline_arrays`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import numpy as np

from .errors import ConfigError

_PROC_FD = re.compile(r"/proc/[0-9]+/fd/[0-9]+")
# False while running on behalf of a network peer: set around the spawn, inherited by
# the actor's task, so the actor never maps a path whoever asks it to later.
_paths_allowed: ContextVar[bool] = ContextVar("asyncdb_paths_allowed", default=True)


@contextlib.contextmanager
def from_network() -> Iterator[None]:
    """Run the block (and every task it starts) on behalf of a network peer: no data
    spec may name a path on this host."""
    token = _paths_allowed.set(False)
    try:
        yield
    finally:
        _paths_allowed.reset(token)


class SharedArrays:
    """Arrays published for processes on this host; `spec` is plain data."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._fds: list[int] = []
        self.spec: dict[str, Any] = {"kind": "shared", "arrays": {}}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            fd = os.memfd_create(f"asyncdb-{name}", os.MFD_CLOEXEC)
            self._fds.append(fd)
            os.ftruncate(fd, max(array.nbytes, 1))
            with open(fd, "wb", closefd=False) as f:
                f.write(array.data)
            self.spec["arrays"][name] = {
                "path": f"/proc/{os.getpid()}/fd/{fd}", "dtype": array.dtype.str,
                "shape": list(array.shape)}

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> SharedArrays:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_arrays(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays a spec describes: inline arrays as they are, shared ones mapped.
    ConfigError for anything else, and for a shared spec on behalf of a network peer."""
    if not isinstance(spec, dict) or not isinstance(spec.get("arrays"), dict):
        raise ConfigError("a data spec is a dict with 'kind' and 'arrays'")
    kind = spec.get("kind")
    if kind == "inline":
        for name, array in spec["arrays"].items():
            if not isinstance(array, np.ndarray):
                raise ConfigError(f"inline data {name!r} is not an array")
        return dict(spec["arrays"])
    if kind != "shared":
        raise ConfigError(f"unknown data spec kind {kind!r}")
    if not _paths_allowed.get():
        raise ConfigError("a network peer cannot name a path on this host; data from "
                          "another host travels inline, inside the message")
    out: dict[str, np.ndarray] = {}
    for name, info in spec["arrays"].items():
        path = str(info["path"])
        if not _PROC_FD.fullmatch(path):
            raise ConfigError(f"shared data {name!r} must be a memfd (/proc/PID/fd/N), "
                              f"not {path[:200]!r}")
        shape = tuple(int(d) for d in info["shape"])
        if int(np.prod(shape)) == 0:
            out[name] = np.empty(shape, np.dtype(info["dtype"]))
        else:
            out[name] = np.memmap(path, np.dtype(info["dtype"]), "r", shape=shape)
    return out


def inline_spec(spec: Any) -> dict[str, Any]:
    """`spec` if it carries its arrays inline; ConfigError otherwise (what a network
    peer's replica must get: data inside the message, never a name on this host)."""
    if not isinstance(spec, dict) or spec.get("kind") != "inline":
        raise ConfigError("a network peer's replica gets its data inline, inside the "
                          "message; it cannot name data on this host")
    return spec


def inline_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A spec that carries the arrays themselves (same process, or streamed)."""
    return {"kind": "inline", "arrays": arrays}
