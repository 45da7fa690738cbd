"""Checkpoint files: named sets of arrays with plain-data metadata, written atomically
and checked on load.

A file is `MAGIC`, a BLAKE2b-256 digest of the rest, then an uncompressed npz holding
the arrays and the metadata as JSON. It is written to a temporary file, fsynced, renamed
into place and the directory fsynced, so a crash leaves either the old file or the new
one. `load` takes the newest file of a name whose digest checks out; a truncated or
corrupt one is logged and the one before it is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

log = logging.getLogger("asyncdb.checkpoint")

MAGIC = b"ADBCKPT1"
META = "__meta__"
_DIGEST = 32
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointStore:
    """Checkpoints in one directory, the newest `keep` of each name kept."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise CheckpointError("a checkpoint store keeps at least one file per name")
        self.directory = Path(directory)
        self.keep = keep

    def save(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
        """Write one checkpoint of `name`; return its path."""
        _check_name(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        contents = {k: np.asarray(v) for k, v in arrays.items()}
        contents[META] = np.array(json.dumps(meta))
        np.savez(buffer, allow_pickle=False, **contents)
        payload = buffer.getvalue()
        serial = max((s for s, _ in self._files(name)), default=0) + 1
        path = self.directory / f"{name}.{serial:08d}.ckpt"
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as f:
            f.write(MAGIC + hashlib.blake2b(payload, digest_size=_DIGEST).digest() + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        _fsync_directory(self.directory)
        for _serial, old in self._files(name)[: -self.keep]:
            with contextlib.suppress(OSError):
                old.unlink()
        return path

    def load(self, name: str, accept: Callable[[dict[str, Any]], bool] | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The newest valid checkpoint of `name` (whose metadata `accept` takes, if
        given): its arrays and metadata."""
        _check_name(name)
        files = self._files(name)
        if not files:
            raise CheckpointError(f"no checkpoint of {name} in {self.directory}")
        problems = []
        for _serial, path in reversed(files):
            try:
                arrays, meta = read_checkpoint(path)
            except CheckpointError as exc:
                log.warning("checkpoint %s is unusable (%s); trying the one before", path, exc)
                problems.append(str(exc))
                continue
            if accept is None or accept(meta):
                return arrays, meta
            problems.append(f"{path.name} is not of the round wanted")
        raise CheckpointError(f"every checkpoint of {name} in {self.directory} is unusable: "
                              + "; ".join(problems))

    def names(self) -> list[str]:
        """The names that have at least one checkpoint file."""
        if not self.directory.is_dir():
            return []
        return sorted({p.name.rsplit(".", 2)[0] for p in self.directory.glob("*.ckpt")})

    def _files(self, name: str) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"{name}.*.ckpt"):
            serial = path.name[len(name) + 1: -len(".ckpt")]
            if serial.isdigit():
                found.append((int(serial), path))
        return sorted(found)


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One checkpoint file's arrays and metadata; `CheckpointError` if it is corrupt."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    head = len(MAGIC) + _DIGEST
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a checkpoint file (or is truncated)")
    payload = data[head:]
    if hashlib.blake2b(payload, digest_size=_DIGEST).digest() != data[len(MAGIC):head]:
        raise CheckpointError(f"{path} fails its checksum (truncated or corrupt)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop(META)))
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{path} cannot be decoded: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has malformed metadata")
    return arrays, meta


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise CheckpointError(f"checkpoint names are letters, digits, '_', '.', '-': {name!r}")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
