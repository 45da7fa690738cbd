"""`Dataset`, `Preprocessing` and `from_arrays`: rows checked, split and standardized."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """Raw rows to model input: ``((x / scale) - mean) / std`` (mean and std per
    feature, None for none)."""

    scale: float = 1.0
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(x, np.float32)
        if self.scale != 1.0:
            out = out / np.float32(self.scale)
        if self.mean is not None and self.std is not None:
            out = (out - self.mean) / self.std
        return np.ascontiguousarray(out, np.float32)

    def to_config(self) -> dict[str, Any]:
        return {"scale": self.scale,
                "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}

    @staticmethod
    def from_config(config: dict[str, Any]) -> Preprocessing:
        def vector(value: Any) -> np.ndarray | None:
            return None if value is None else np.asarray(value, np.float32)

        return Preprocessing(float(config.get("scale", 1.0)), vector(config.get("mean")),
                             vector(config.get("std")))


def _empty(like: np.ndarray) -> np.ndarray:
    return np.empty((0, *like.shape[1:]), like.dtype)


@dataclass
class Dataset:
    """Training, validation and test rows, already preprocessed. Evaluations during
    training use the validation rows (the test rows when there are none); the test
    rows are measured once, at the end."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    y_val: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __post_init__(self) -> None:
        if len(self.x_val) == 0:
            self.x_val, self.y_val = _empty(self.x_train), _empty(self.y_train)

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(initial=0), self.y_test.max(initial=0),
                       self.y_val.max(initial=0))) + 1

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, "
                f"validation={len(self.x_val)}, test={len(self.x_test)}, "
                f"features={self.n_features}, classes={self.n_classes})")


def _features(x: Any, what: str) -> np.ndarray:
    try:
        array = np.asarray(x, np.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be numeric rows of equal length: {exc}") from None
    if array.ndim != 2 or array.shape[1] == 0:
        raise ConfigError(f"{what} must be a 2-D array of rows, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad):
        raise ConfigError(f"{what} holds NaN or infinite values (row {int(bad[0])} and "
                          f"{len(bad) - 1} more)")
    return array


def _labels(y: Any, rows: int, what: str) -> np.ndarray:
    raw = np.asarray(y)
    if raw.ndim != 1 or len(raw) != rows:
        raise ConfigError(f"{what} must hold one label per row: {rows} rows, labels of "
                          f"shape {raw.shape}")
    if raw.dtype.kind not in "iub" and not (raw.dtype.kind == "f" and
                                            np.all(np.mod(raw, 1) == 0)):
        raise ConfigError(f"{what} must be integer class labels 0..k-1, got "
                          f"{raw.dtype} values such as {raw[:3].tolist()}")
    return raw.astype(np.int64)


def _check_classes(*labels: np.ndarray) -> None:
    seen = np.unique(np.concatenate(labels))
    if len(seen) == 0:
        raise ConfigError("no labelled rows")
    if seen[0] < 0 or not np.array_equal(seen, np.arange(len(seen))):
        missing = sorted(set(range(int(seen[-1]) + 1)) - set(seen.tolist()))[:5]
        raise ConfigError(f"labels must be the integers 0..k-1; found {seen[0]}..{seen[-1]}"
                          + (f", never {missing}" if missing and seen[0] >= 0 else ""))


def from_arrays(x: Any, y: Any, x_test: Any = None, y_test: Any = None, *,
                validation: float = 0.1, standardize: bool = True, name: str = "arrays",
                test: float = 0.2, scale: float = 1.0, seed: int = 0) -> Dataset:
    """Your data as a `Dataset`. Rows are checked (numeric, finite, labels 0..k-1).
    Without `x_test`, a `test` fraction of the rows is held out as the test set; a
    `validation` fraction of the training rows is held out for the evaluations during
    training. `standardize` scales each feature to mean 0 and std 1 on the training
    rows (after dividing by `scale`); the same transform is kept with the model."""
    x = _features(x, "x")
    y = _labels(y, len(x), "y")
    if (x_test is None) != (y_test is None):
        raise ConfigError("give both x_test and y_test, or neither")
    if not 0 <= validation < 1 or not 0 <= test < 1:
        raise ConfigError("validation and test are fractions in [0, 1)")
    rng = np.random.default_rng(seed)
    if x_test is None:
        order = rng.permutation(len(x))
        n_test = round(len(x) * test)
        xt, yt, x, y = x[order[:n_test]], y[order[:n_test]], x[order[n_test:]], y[order[n_test:]]
    else:
        xt = _features(x_test, "x_test")
        yt = _labels(y_test, len(xt), "y_test")
        if xt.shape[1] != x.shape[1]:
            raise ConfigError(f"x has {x.shape[1]} features but x_test has {xt.shape[1]}")
    _check_classes(y, yt)
    order = rng.permutation(len(x))
    n_val = round(len(x) * validation)
    val, train = order[:n_val], order[n_val:]
    if len(train) == 0:
        raise ConfigError("no training rows left after the validation and test splits")
    prep = Preprocessing(scale)
    if standardize:
        scaled = x[train] / np.float32(scale)
        std = scaled.std(axis=0)
        prep = Preprocessing(scale, scaled.mean(axis=0), np.where(std > 0, std, 1.0)
                             .astype(np.float32))
    return Dataset(name, prep.apply(x[train]), np.ascontiguousarray(y[train]),
                   prep.apply(xt), np.ascontiguousarray(yt), prep.apply(x[val]),
                   np.ascontiguousarray(y[val]), prep)
