"""Saved runs: one directory holds everything a training run leaves behind.

    history.json   the history, counters and every option (what `Run.to_json` gives)
    params.npz     the trained parameters, one array per tensor
    model.json     the model's config, its preprocessing, features, classes, label column
    options.json   every option of the run, and the asyncdb version that made it

`Run` is what `Cluster.train` returns; `Run.save(directory)` writes the directory and
`asyncdb.load(directory)` gives back a `SavedModel`: the model, its parameters and its
preprocessing, ready to predict on raw rows. Fault tolerance adds `checkpoints/`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asyncdb.models import Model

from .datasets import Preprocessing
from .errors import ConfigError, RunError

Params = dict[str, np.ndarray]


@dataclass
class Run:
    """What `Cluster.train` returns. `history` holds one entry per evaluation: time,
    examples, examples_per_s, loss, val_accuracy (on the validation rows, or the test
    rows when the data has none), staleness_mean, staleness_max, updates, replicas;
    the last entry, `final`, adds test_accuracy, measured once on every test row.
    `stopped` says the run was stopped early (`Cluster.stop_training`); `events` lists
    every failure, restart, recovery and reassignment with its time; `units` counts the
    run's units of work (planned, done, reassigned); `checkpoints` says how many shard
    checkpoints were taken and the seconds they took (None without checkpointing)."""

    history: list[dict[str, Any]]
    params: dict[str, np.ndarray]
    replicas: dict[int, dict[str, Any]]
    shards: list[dict[str, Any]]
    lost: list[int]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    stopped: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)
    units: dict[str, int] = field(default_factory=dict)
    checkpoints: dict[str, Any] | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "history": self.history, "seconds": self.seconds,
                "stopped": self.stopped, "lost_replicas": self.lost, "events": self.events,
                "units": self.units, "checkpoints": self.checkpoints,
                "replicas": {str(k): v for k, v in self.replicas.items()},
                "shards": [{k: v for k, v in s.items() if k != "progress"}
                           for s in self.shards]}

    def save(self, path: str | Path) -> Path:
        """Write the run directory `path` (history, parameters, model with its
        preprocessing, options, version; `asyncdb.load` reads it back). A path ending
        in .json gets the history file alone."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            return save_run(self, path)
        return self.save_history(path)

    def save_history(self, path: str | Path) -> Path:
        """Write the history file alone (JSON: `to_json` and the asyncdb version)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, {**self.to_json(), "asyncdb_version": _version()})
        return path


def _version() -> str:
    from . import __version__

    return __version__


def save_partial(directory: str | Path | None, error: RunError) -> Path:
    """Write the history of a run that failed (`error.history`, the error) to
    `directory`/history.json (default: a new runs/train-<time>-<pid>/); its path."""
    path = Path(directory if directory is not None else unique_dir("runs")) / "history.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"history": error.history, "failed": True,
                       "error": f"{type(error).__name__}: {error}",
                       "asyncdb_version": _version()})
    return path


def unique_dir(parent: str | Path = "runs", prefix: str = "train") -> Path:
    """A new, empty directory `parent/<prefix>-<time>-<n>`: made exclusively, so two
    runs started in the same second never share one."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(10_000):
        path = parent / (f"{prefix}-{stamp}-{os.getpid()}" + (f"-{n}" if n else ""))
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"cannot make a new run directory in {parent}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_plain))
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """JSON for what options hold besides plain data (paths, numpy scalars)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save_run(run: Run, directory: str | Path) -> Path:
    """Write `run` into `directory` (made if needed); return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    version = _version()
    run.save_history(directory / "history.json")
    tmp = directory / ".params.tmp.npz"
    savez: Any = np.savez  # numpy's stub types **arrays as its keyword options
    savez(tmp, **run.params)
    os.replace(tmp, directory / "params.npz")
    config = run.config
    _write_json(directory / "model.json", {
        "asyncdb_version": version, "model": config.get("model"),
        "preprocessing": run.preprocessing.to_config(),
        "features": config.get("features"), "classes": config.get("classes"),
        "label": config.get("command", {}).get("label", "label")})
    _write_json(directory / "options.json", {"asyncdb_version": version, **config})
    return directory


@dataclass
class SavedModel:
    """A trained model read back from a run directory. `predict` and `evaluate` take
    raw rows: the saved preprocessing is applied first."""

    model: Model
    params: Params
    preprocessing: Preprocessing
    features: int
    classes: int
    label: str = "label"
    options: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    version: str = ""

    def __iter__(self) -> Iterator[Any]:
        """`model, params = asyncdb.load(directory)` unpacks the two."""
        return iter((self.model, self.params))

    def _input(self, x: Any) -> np.ndarray:
        rows = np.asarray(x, np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.features:
            raise ConfigError(f"the model takes rows of {self.features} features, got "
                              f"shape {rows.shape}")
        if not np.isfinite(rows).all():
            raise ConfigError("the rows hold NaN or infinite values")
        return self.preprocessing.apply(rows)

    def predict(self, x: Any) -> np.ndarray:
        """The predicted class of each raw row."""
        return self.model.predict(self.params, self._input(x))

    def evaluate(self, x: Any, y: Any, batch: int = 4096) -> dict[str, float]:
        """Mean loss and accuracy on raw rows `x` with labels `y`."""
        rows = self._input(x)
        labels = np.asarray(y)
        if labels.shape != (len(rows),):
            raise ConfigError(f"{len(rows)} rows but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.classes
                            or np.any(np.mod(labels, 1) != 0)):
            raise ConfigError(f"labels must be integers 0..{self.classes - 1}")
        labels = labels.astype(np.int64)
        total = 0.0
        for start in range(0, len(rows), batch):
            chunk = slice(start, start + batch)
            loss, _ = self.model.loss_and_grad(self.params, rows[chunk], labels[chunk])
            total += loss * len(rows[chunk])
        n = max(1, len(rows))
        return {"loss": total / n, "accuracy": self.model.accuracy(self.params, rows, labels),
                "rows": len(rows)}


def load(directory: str | Path) -> SavedModel:
    """The trained model in a run directory written by `Run.save` or `asyncdb train`."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "model.json").read_text())
        with (directory / "params.npz").open("rb") as f, np.load(f, allow_pickle=False) as raw:
            params = {key: raw[key] for key in raw.files}
    except FileNotFoundError as exc:
        raise ConfigError(f"{directory} is not a saved run: {exc.filename} is missing") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{directory}: cannot read the saved run: {exc}") from None
    try:
        model = Model.from_config(meta["model"])
        options = json.loads((directory / "options.json").read_text())
        history = json.loads((directory / "history.json").read_text()).get("history", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{directory}: damaged saved run: {exc}") from None
    expected = {name: tuple(shape) for name, shape in model.param_shapes().items()}
    if {name: value.shape for name, value in params.items()} != expected:
        raise ConfigError(f"{directory}: params.npz does not fit {model}")
    return SavedModel(model, params, Preprocessing.from_config(meta["preprocessing"]),
                      int(meta["features"]), int(meta["classes"]),
                      str(meta.get("label", "label")), options, history,
                      str(meta.get("asyncdb_version", "")))
