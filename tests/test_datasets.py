from __future__ import annotations

import os

import numpy as np
import pytest

import asyncdb
from asyncdb.datasets import from_arrays, read


def blobs(n=300, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, features)) * 3 + 10 + y[:, None]
    return x, y


def test_from_arrays_splits_and_standardizes():
    x, y = blobs()
    data = from_arrays(x, y, validation=0.1, test=0.2, name="blobs")
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (216, 24, 60)
    assert data.n_features == 5 and data.n_classes == 3 and data.name == "blobs"
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=0), 1, atol=1e-4)
    # the same transform, kept with the data, maps raw rows to the training rows
    train_rows = {tuple(np.round(r, 4)) for r in data.x_train}
    again = data.preprocessing.apply(x)
    assert sum(tuple(np.round(r, 4)) in train_rows for r in again) == 216


def test_from_arrays_keeps_a_given_test_set_and_can_skip_standardizing():
    x, y = blobs()
    data = from_arrays(x[:200], y[:200], x[200:], y[200:], validation=0.0, standardize=False)
    assert len(data.x_test) == 100 and len(data.x_val) == 0 and len(data.x_train) == 200
    np.testing.assert_array_equal(data.x_test, x[200:].astype(np.float32))
    assert data.preprocessing.mean is None


@pytest.mark.parametrize(("x", "y", "message"), [
    ([[1, 2], [3]], [0, 1], "numeric rows of equal length"),
    ([["a", "b"], ["c", "d"]], [0, 1], "numeric"),
    ([[1, np.nan], [3, 4]], [0, 1], "NaN"),
    ([[1, 2], [3, 4]], [1, 2], "0..k-1"),
    ([[1, 2], [3, 4]], [0, -1], "0..k-1"),
    ([[1, 2], [3, 4]], [0, 0.5], "integer class labels"),
    ([[1, 2], [3, 4]], ["cat", "dog"], "integer class labels"),
    ([[1, 2], [3, 4]], [0, 1, 1], "one label per row"),
])
def test_from_arrays_refuses_bad_data(x, y, message):
    with pytest.raises(asyncdb.ConfigError, match=message):
        from_arrays(x, y)


def test_npz_files(tmp_path):
    x, y = blobs()
    path = tmp_path / "d.npz"
    np.savez(path, x=x[:250], y=y[:250], x_test=x[250:], y_test=y[250:])
    data = asyncdb.datasets.load(str(path))
    assert len(data.x_test) == 50 and data.name == "d.npz"
    np.savez(tmp_path / "nolabels.npz", x=x)
    with pytest.raises(asyncdb.ConfigError, match="missing key 'y'"):
        read(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "half.npz", x=x, y=y, x_test=x)
    with pytest.raises(asyncdb.ConfigError, match="without the other"):
        read(tmp_path / "half.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(asyncdb.ConfigError, match="not a readable"):
        read(tmp_path / "junk.npz")
    with pytest.raises(asyncdb.ConfigError, match="no such data file"):
        read(tmp_path / "absent.npz")


def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]))
    return path


def test_csv_files(tmp_path):
    x, y = blobs(n=60)
    rows = [[*row, label] for row, label in zip(x.round(3), y, strict=True)]
    path = write_csv(tmp_path / "d.csv", ["a", "b", "c", "d", "e", "cls"], rows)
    data = read(path, label="cls", validation=0.0, test=0.0, standardize=False)
    np.testing.assert_allclose(np.sort(data.x_train[:, 0]), np.sort(x[:, 0]), atol=1e-3)
    assert data.n_classes == 3
    with pytest.raises(asyncdb.ConfigError, match="no label column 'label'"):
        read(path)


@pytest.mark.parametrize(("rows", "message"), [
    ([[1, 2, 0], [1, 2]], "line 3: 2 fields, but the header has 3"),
    ([[1, 2, 0], [1, "x", 1]], "line 3, column 'b': 'x' is not a number"),
    ([[1, 2, 0], [1, "nan", 1]], "NaN"),
    ([[1, 2, 1], [1, 2, 2]], "0..k-1"),
])
def test_csv_problems_name_the_line(tmp_path, rows, message):
    path = write_csv(tmp_path / "bad.csv", ["a", "b", "label"], rows)
    with pytest.raises(asyncdb.ConfigError, match=message):
        read(path)


def test_teacher_data_is_cached_by_every_argument(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCDB_CACHE", str(tmp_path))
    seen = []
    first = asyncdb.datasets.teacher(n=3000, features=16, test=200, validation=100,
                                     progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0
    files = list(tmp_path.glob("teacher-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob(".teacher-*"))
    again = asyncdb.datasets.teacher(n=3000, features=16, test=200, validation=100)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    np.testing.assert_array_equal(again.y_val, first.y_val)
    with np.load(files[0]) as raw:  # mark the cached rows: a cache hit returns them
        marked = {"x": raw["x"] + 1, "y": raw["y"]}
    np.savez(files[0], **marked)
    hit = asyncdb.datasets.teacher(n=3000, features=16, test=200, validation=100)
    np.testing.assert_array_equal(hit.x_train, first.x_train + 1)
    other = asyncdb.datasets.teacher(n=3000, features=16, test=200, validation=100, noise=0.2)
    assert len(list(tmp_path.glob("teacher-*.npz"))) == 2
    assert not np.array_equal(other.x_train, first.x_train)


def test_a_damaged_cache_file_is_generated_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCDB_CACHE", str(tmp_path))
    first = asyncdb.datasets.teacher(n=2000, features=8, test=100, validation=100)
    (path,) = tmp_path.glob("teacher-*.npz")
    path.write_bytes(path.read_bytes()[:1000])
    again = asyncdb.datasets.teacher(n=2000, features=8, test=100, validation=100)
    np.testing.assert_array_equal(again.x_test, first.x_test)
    assert os.path.getsize(path) > 1000


def test_digits_keep_their_scaling_with_them():
    data = asyncdb.datasets.load("digits")
    assert data.preprocessing.scale == 16.0 and data.x_train.max() <= 1.0
    assert len(data.x_val) > 0 and len(data.x_test) == 359
