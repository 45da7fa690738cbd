"""The teacher task: synthetic data of any size, labelled by a fixed random network.

Generating 200,000 rows takes 17 to 30 s here, so each result is cached in
`cache_dir()` as ``teacher-<key>.npz``, the key a hash of every generator argument. A
cache file is written to a temporary name and renamed into place, so a run interrupted
while writing leaves no half file; a damaged one is generated again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .dataset import Dataset

CACHE_FORMAT = 1  # bump when the generator's output changes for the same arguments

Progress = Callable[[float], None]


def cache_dir() -> Path:
    """$ASYNCDB_CACHE, else $XDG_CACHE_HOME/asyncdb, else ~/.cache/asyncdb."""
    if os.environ.get("ASYNCDB_CACHE"):
        return Path(os.environ["ASYNCDB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "asyncdb"


def teacher(n: int = 200_000, features: int = 784, classes: int = 10, latent: int = 32,
            hidden: int = 64, margin: float = 0.4, noise: float = 0.1, test: int = 10_000,
            validation: int = 5_000, seed: int = 0, cache: bool = True,
            progress: Progress | None = None) -> Dataset:
    """A synthetic task labelled by a fixed random teacher network.

    Inputs lie near a random `latent`-dimensional subspace of R^features (plus
    Gaussian noise), as real data lies near a low-dimensional manifold; the label is the
    argmax of a random tanh network with `hidden` units, and only examples whose top
    teacher logit beats the runner-up by `margin` are kept, so the classes are
    separable and a student can learn them in about one epoch. `n` training rows,
    `validation` and `test` rows more. `progress(fraction)` is called while generating.
    """
    args = {"format": CACHE_FORMAT, "n": n, "features": features, "classes": classes,
            "latent": latent, "hidden": hidden, "margin": margin, "noise": noise,
            "test": test, "validation": validation, "seed": seed}
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir() / f"teacher-{key}.npz"
    arrays = _read_cache(path) if cache else None
    if arrays is None:
        arrays = _generate(n + validation + test, features, classes, latent, hidden, margin,
                           noise, seed, progress)
        if cache:
            _write_cache(path, arrays)
    x, y = arrays
    if progress is not None:
        progress(1.0)
    val_end = n + validation
    return Dataset(f"teacher-{n}", x[:n], y[:n], x[val_end:], y[val_end:], x[n:val_end],
                   y[n:val_end])


def _generate(total: int, features: int, classes: int, latent: int, hidden: int,
              margin: float, noise: float, seed: int,
              progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((latent, features)).astype(np.float32) / np.sqrt(latent)
    w1 = rng.standard_normal((features, hidden)).astype(np.float32) / np.sqrt(features)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32) / np.sqrt(hidden)
    x = np.empty((total, features), np.float32)
    y = np.empty(total, np.int64)
    filled = 0
    while filled < total:
        if progress is not None:
            progress(filled / total)
        z = rng.standard_normal((50_000, latent), dtype=np.float32)
        block = z @ basis
        block += noise * rng.standard_normal(block.shape, dtype=np.float32)
        logits = np.tanh(block @ w1) @ w2
        top2 = np.partition(logits, -2, axis=1)[:, -2:]
        keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > margin)[: total - filled]
        x[filled:filled + len(keep)] = block[keep]
        y[filled:filled + len(keep)] = logits[keep].argmax(axis=1)
        filled += len(keep)
    return x, y


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as raw:
            return raw["x"], raw["y"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        with contextlib.suppress(OSError):
            path.unlink()  # damaged: generate again
        return None


def _write_cache(path: Path, arrays: tuple[np.ndarray, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".teacher-", suffix=".tmp", dir=path.parent)
    except OSError:
        return  # an unwritable cache only costs time
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=arrays[0], y=arrays[1])
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
