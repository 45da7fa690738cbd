"""Training data shared between the processes of one host, one copy in memory.

The driver writes each array once into an anonymous memfd; replicas map it read-only
through /proc/<driver pid>/fd/<n>. Nothing is named in /dev/shm or on disk, and the
memory goes when the driver closes the fds and the last replica unmaps it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np


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
    """The arrays a spec describes: inline arrays as they are, shared ones mapped."""
    if spec.get("kind") == "inline":
        return dict(spec["arrays"])
    out: dict[str, np.ndarray] = {}
    for name, info in spec["arrays"].items():
        shape = tuple(info["shape"])
        if int(np.prod(shape)) == 0:
            out[name] = np.empty(shape, np.dtype(info["dtype"]))
        else:
            out[name] = np.memmap(info["path"], np.dtype(info["dtype"]), "r", shape=shape)
    return out


def inline_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A spec that carries the arrays themselves (same process, or streamed)."""
    return {"kind": "inline", "arrays": arrays}
