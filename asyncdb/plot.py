"""`asyncdb plot`: accuracy and loss against time and against examples, for one or
several runs, drawn with matplotlib (an optional extra: `pip install asyncdb[plot]`).

A run is a history file (`--history FILE`, or a .json `Run.save` wrote) or a run
directory holding `history.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .progress import accuracy_of

MISSING = "asyncdb plot needs matplotlib: pip install 'asyncdb[plot]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="history .json files or run directories")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"),
                        help="image to write (default curves.png; .png, .svg or .pdf)")
    parser.add_argument("--title", help="a title above the plots")


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """The history entries of a run directory or a history file."""
    path = Path(path)
    file = path / "history.json" if path.is_dir() else path
    try:
        saved = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file (want a history .json or a run "
                          "directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: not a history file: {exc}") from exc
    history = saved.get("history") if isinstance(saved, dict) else None
    if not isinstance(history, list) or not all(
            isinstance(e, dict) and "time" in e and "examples" in e for e in history):
        raise ConfigError(f"{file}: not a history file (no list of entries with time and "
                          "examples)")
    if not history:
        raise ConfigError(f"{file}: the run has no evaluations to plot")
    return history


def label_of(path: Path) -> str:
    path = path.resolve()
    return path.name if path.is_dir() else path.stem


def figure(runs: list[Path], title: str | None = None) -> Any:
    """A matplotlib figure of the runs' curves: accuracy (top) and loss (bottom),
    against seconds (left) and examples (right)."""
    histories = [(label_of(p), load_history(p)) for p in runs]
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(MISSING) from None
    matplotlib.use("Agg")  # files only, no display needed
    from matplotlib import pyplot

    drawn, axes = pyplot.subplots(2, 2, figsize=(9, 6), sharey="row")
    for label, history in histories:
        _draw(axes, label, history)
    for row, name in enumerate(("accuracy", "loss")):
        axes[row][0].set_ylabel(name)
        for col, x in enumerate(("seconds", "examples")):
            axes[row][col].grid(alpha=0.3)
            axes[1][col].set_xlabel(x)
    axes[0][0].set_title("against time")
    axes[0][1].set_title("against examples")
    axes[0][1].legend(fontsize="small", loc="lower right")
    if title:
        drawn.suptitle(title)
    drawn.tight_layout()
    return drawn


def plot(runs: list[Path], output: Path, title: str | None = None) -> Path:
    """Draw the runs' curves into the image `output`; return it."""
    drawn = figure(runs, title)
    from matplotlib import pyplot

    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        drawn.savefig(output, dpi=80)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot write {output}: {exc}") from exc
    finally:
        pyplot.close(drawn)
    return output


def _draw(axes: Any, label: str, history: list[dict[str, Any]]) -> None:
    """Validation accuracy (test accuracy without a split) and loss along the run; the
    final test accuracy as a marker at its end."""
    times: list[Any] = [float(e["time"]) for e in history]
    examples: list[Any] = [int(e["examples"]) for e in history]
    accuracy = [accuracy_of(e) for e in history]
    loss = [e.get("loss") for e in history]
    for col, x in enumerate((times, examples)):
        line = axes[0][col].plot(*_defined(x, accuracy), label=label)[0]
        axes[1][col].plot(*_defined(x, loss), color=line.get_color())
        final = history[-1].get("test_accuracy")
        if final is not None:
            axes[0][col].plot([x[-1]], [final], marker="o", color=line.get_color())


def _defined(x: list[Any], y: list[Any]) -> tuple[list[Any], list[float]]:
    pairs = [(a, float(b)) for a, b in zip(x, y, strict=True) if b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def main(args: argparse.Namespace) -> int:
    print(f"asyncdb plot: {plot(args.runs, args.output, args.title)}")
    return 0
