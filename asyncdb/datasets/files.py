"""Reading rows from files: ``.npz`` (keys x, y, optional x_test, y_test) and ``.csv``
(a header row; one column holds the labels, the others the features). Every problem is
a `ConfigError` naming the file, and for CSV the line and column."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError


def read_arrays(path: str | Path, label: str = "label",
                labels: bool = True) -> dict[str, np.ndarray]:
    """The arrays of a data file: x and y (y only when `labels`), and for .npz files
    x_test and y_test when present. With `labels=False` a CSV's label column, if it
    has one, is left out of x."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, labels)
    if suffix == ".csv":
        return _read_csv(path, label, labels)
    raise ConfigError(f"{path}: a data file must end in .npz or .csv")


def read_features(path: str | Path, label: str = "label") -> np.ndarray:
    """The feature rows of a data file (raw, before any preprocessing)."""
    return read_arrays(path, label, labels=False)["x"]


def _read_npz(path: Path, labels: bool) -> dict[str, np.ndarray]:
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as raw:
            found = {key: raw[key] for key in raw.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not a readable .npz file: {exc}") from None
    need = ["x", "y"] if labels else ["x"]
    missing = [key for key in need if key not in found]
    if missing:
        raise ConfigError(f"{path}: missing key {missing[0]!r} (found {sorted(found)}; "
                          "a data file holds x, y and optionally x_test, y_test)")
    if ("x_test" in found) != ("y_test" in found):
        raise ConfigError(f"{path}: has one of x_test and y_test without the other")
    out = {key: found[key] for key in ("x", "y", "x_test", "y_test") if key in found}
    for key, value in out.items():
        if value.dtype.kind not in "biuf":
            raise ConfigError(f"{path}: {key} holds {value.dtype} values, not numbers")
    return out


def _read_csv(path: Path, label: str, labels: bool) -> dict[str, np.ndarray]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{path}: empty file (a CSV data file starts with a header row)")
        header = [name.strip() for name in header]
        if label in header:
            column = header.index(label)
        elif labels:
            raise ConfigError(f"{path}: no label column {label!r} in the header "
                              f"{header[:8]}{'...' if len(header) > 8 else ''} "
                              "(choose it with --label NAME)")
        else:
            column = -1
        rows: list[list[float]] = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ConfigError(f"{path}, line {line}: {len(row)} fields, but the header "
                                  f"has {len(header)}")
            rows.append(_numbers(row, header, path, line))
    if not rows:
        raise ConfigError(f"{path}: no data rows after the header")
    table = np.array(rows, np.float64)
    out: dict[str, Any] = {"x": np.delete(table, column, axis=1) if column >= 0 else table}
    if labels:
        out["y"] = table[:, column]
    return out


def _numbers(row: list[str], header: list[str], path: Path, line: int) -> list[float]:
    try:
        return [float(value) for value in row]
    except ValueError:
        for name, value in zip(header, row, strict=True):
            try:
                float(value)
            except ValueError:
                raise ConfigError(f"{path}, line {line}, column {name!r}: {value!r} is not "
                                  "a number") from None
        raise
