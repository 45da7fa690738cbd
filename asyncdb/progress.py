"""Training progress as `asyncdb train` shows it: a tqdm bar redrawn in place on a
terminal (elapsed, ETA, examples/s, loss, validation accuracy, staleness, lost replicas),
and one plain line per evaluation when the output is not a terminal (logs, pipes, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

# a narrow bar, so the figures after it fit on one line
BAR_FORMAT = ("{percentage:3.0f}%|{bar:16}| {n_fmt}/{total_fmt} "
              "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")


def accuracy_of(entry: dict[str, Any]) -> float | None:
    """The validation accuracy of a history entry, or its test accuracy without one."""
    value = entry.get("val_accuracy")
    if value is None:
        value = entry.get("test_accuracy")
    return None if value is None else float(value)


def figures(entry: dict[str, Any]) -> dict[str, str]:
    """The figures shown beside the bar, formatted."""
    loss, acc = entry.get("loss"), accuracy_of(entry)
    lost = entry.get("lost") or []
    return {
        "loss": "-" if loss is None else f"{loss:.4f}",
        "val acc": "-" if acc is None else f"{acc:.4f}",
        "staleness": f"{float(entry.get('staleness_mean', 0.0)):.2f}",
        "lost": ",".join(str(i) for i in lost) if lost else "0",
    }


def plain_line(entry: dict[str, Any], total: int) -> str:
    """One evaluation as a line of text: elapsed, ETA, progress, the figures."""
    elapsed = float(entry.get("time", 0.0))
    examples = int(entry.get("examples", 0))
    rate = float(entry.get("examples_per_s", 0.0))
    left = max(0, total - examples)
    eta = f"{left / rate:.1f} s" if rate > 0 else "?"
    shown = figures(entry)
    return (f"{elapsed:7.1f} s  ETA {eta:>7}  {min(1.0, examples / total):6.1%}  "
            f"{rate:9.0f} ex/s  loss {shown['loss']}  val acc {shown['val acc']}  "
            f"staleness {shown['staleness']}  lost {shown['lost']}")


class TrainingProgress:
    """Progress of one run over `total` examples. `update` takes each history entry;
    `write` prints a line without breaking the bar; `close` ends the bar's line."""

    def __init__(self, total: int, out: TextIO | None = None) -> None:
        self.total = max(1, int(total))
        self.out = out if out is not None else sys.stdout
        self.tty = self.out.isatty()
        self.bar: tqdm[Any] | None = None

    def update(self, entry: dict[str, Any]) -> None:
        if not self.tty:
            self.out.write(plain_line(entry, self.total) + "\n")
            self.out.flush()
            return
        if self.bar is None:  # made at the first evaluation, its clock set to the run's
            self.bar = tqdm(total=self.total, file=self.out, unit="ex", unit_scale=True,
                            bar_format=BAR_FORMAT, leave=True, smoothing=0.3)
            self.bar.start_t = self.bar.last_print_t = (
                time.time() - float(entry.get("time", 0.0)))
        done = min(self.total, int(entry.get("examples", 0)))
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(figures(entry), refresh=True)

    def write(self, text: str) -> None:
        if self.bar is None:
            print(text, file=self.out, flush=True)
        else:
            self.bar.write(text, file=self.out)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
