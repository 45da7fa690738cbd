"""Data sets: your own arrays or files, or ones that need no download.

- ``from_arrays(x, y, ...)``: your arrays, checked, split and standardized.
- ``read(path)``: a ``.npz`` (keys x, y, optional x_test, y_test) or ``.csv`` file (a
  header row, the label column named by ``label``).
- ``digits``: the UCI optical handwritten digits (Alpaydin and Kaynak, 1998; 1797 8x8
  images, 10 classes, CC BY 4.0), as shipped by scikit-learn; pixels scaled to [0, 1].
- ``teacher``: a synthetic task of any size, labelled by a fixed random network,
  generated once and cached (see `teacher`).

A `Dataset` carries the `Preprocessing` that turned raw rows into its arrays; a trained
model is saved with it, and `predict` applies it to raw input.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .dataset import Dataset, Preprocessing, from_arrays
from .files import read_arrays, read_features
from .teacher import cache_dir, teacher

__all__ = ["Dataset", "Preprocessing", "cache_dir", "digits", "from_arrays", "load", "names",
           "read", "read_features", "teacher"]


def digits(validation: float = 0.1, test: float = 0.2, seed: int = 0) -> Dataset:
    with resources.files(__name__).joinpath("digits.npz").open("rb") as f, np.load(f) as raw:
        x, y = raw["x"], raw["y"]
    return from_arrays(x, y, validation=validation, standardize=False, name="digits",
                       test=test, scale=16.0, seed=seed)


def read(path: str | Path, *, label: str = "label", **options: Any) -> Dataset:
    """A data set from a ``.npz`` or ``.csv`` file (see `from_arrays` for options)."""
    arrays = read_arrays(path, label)
    return from_arrays(arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"),
                       name=Path(path).name, **options)


_LOADERS: dict[str, Callable[..., Dataset]] = {"digits": digits, "teacher": teacher}


def names() -> list[str]:
    return sorted(_LOADERS)


def is_path(name: str) -> bool:
    """A data argument ending in .npz or .csv names a file; anything else a data set."""
    return name.lower().endswith((".npz", ".csv"))


def load(name: str, **options: Any) -> Dataset:
    """A data set by name (``digits``, ``teacher``) or a ``.npz``/``.csv`` path."""
    if is_path(name):
        return read(name, **options)
    try:
        loader: Callable[..., Dataset] = _LOADERS[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; known: {names()}, or a path "
                          "ending in .npz or .csv") from None
    try:
        return loader(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for data set {name!r}: {exc}") from exc
