"""Data sets that need no download: shipped with the package, or generated.

- ``digits``: the UCI optical handwritten digits (Alpaydin and Kaynak, 1998; 1797 8x8
  images, 10 classes, CC BY 4.0), as shipped by scikit-learn; pixels scaled to [0, 1].
- ``teacher``: a synthetic task of any size, labelled by a fixed random network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..errors import ConfigError

__all__ = ["Dataset", "load", "names", "teacher"]


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(initial=0), self.y_test.max(initial=0))) + 1

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
                f"features={self.n_features}, classes={self.n_classes})")


def _split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float,
           seed: int) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, np.ascontiguousarray(x[train]), np.ascontiguousarray(y[train]),
                   np.ascontiguousarray(x[test]), np.ascontiguousarray(y[test]))


def digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    with resources.files(__name__).joinpath("digits.npz").open("rb") as f, np.load(f) as raw:
        x = raw["x"].astype(np.float32) / 16.0
        y = raw["y"].astype(np.int64)
    return _split("digits", x, y, test_fraction, seed)


def teacher(n: int = 200_000, features: int = 784, classes: int = 10, latent: int = 32,
            hidden: int = 64, margin: float = 0.4, noise: float = 0.1, test: int = 10_000,
            seed: int = 0) -> Dataset:
    """A synthetic task labelled by a fixed random teacher network.

    Inputs lie near a random `latent`-dimensional subspace of R^features (plus
    Gaussian noise), as real data lies near a low-dimensional manifold; the label is the
    argmax of a random tanh network with `hidden` units, and only examples whose top
    teacher logit beats the runner-up by `margin` are kept, so the classes are
    separable and a student can learn them in about one epoch.
    """
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((latent, features)).astype(np.float32) / np.sqrt(latent)
    w1 = rng.standard_normal((features, hidden)).astype(np.float32) / np.sqrt(features)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32) / np.sqrt(hidden)
    total = n + test
    x = np.empty((total, features), np.float32)
    y = np.empty(total, np.int64)
    filled = 0
    while filled < total:
        z = rng.standard_normal((50_000, latent), dtype=np.float32)
        block = z @ basis
        block += noise * rng.standard_normal(block.shape, dtype=np.float32)
        logits = np.tanh(block @ w1) @ w2
        top2 = np.partition(logits, -2, axis=1)[:, -2:]
        keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > margin)[: total - filled]
        x[filled:filled + len(keep)] = block[keep]
        y[filled:filled + len(keep)] = logits[keep].argmax(axis=1)
        filled += len(keep)
    return Dataset(f"teacher-{n}", x[:n], y[:n], x[n:], y[n:])


_LOADERS: dict[str, Callable[..., Dataset]] = {"digits": digits, "teacher": teacher}


def names() -> list[str]:
    return sorted(_LOADERS)


def load(name: str, **options: int | float) -> Dataset:
    """A data set by name: ``digits`` (shipped) or ``teacher`` (generated)."""
    try:
        loader: Callable[..., Dataset] = _LOADERS[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; known: {names()}") from None
    try:
        return loader(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for data set {name!r}: {exc}") from exc
