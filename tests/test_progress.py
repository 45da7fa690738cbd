from __future__ import annotations

import io

from asyncdb.progress import TrainingProgress, plain_line


def entry(**extra):
    return {"time": 2.0, "examples": 500, "examples_per_s": 250.0, "loss": 0.5,
            "val_accuracy": 0.9, "test_accuracy": 0.1, "staleness_mean": 1.25,
            "lost": [], **extra}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_one_plain_line_per_evaluation():
    out = io.StringIO()
    with TrainingProgress(1000, out) as progress:
        progress.update(entry())
        progress.update(entry(time=3.0, examples=1000, lost=[1]))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].split() == ["2.0", "s", "ETA", "2.0", "s", "50.0%", "250", "ex/s",
                                "loss", "0.5000", "val", "acc", "0.9000", "staleness",
                                "1.25", "lost", "0"]
    assert lines[1].endswith("lost 1") and "ETA   0.0 s" in lines[1]


def test_test_accuracy_stands_in_without_a_validation_split():
    line = plain_line(entry(val_accuracy=None, loss=None), 1000)
    assert "val acc 0.1000" in line and "loss -" in line


def test_a_terminal_gets_a_bar_redrawn_in_place():
    out = Terminal()
    progress = TrainingProgress(1000, out)
    progress.update(entry())
    progress.write("a notice")
    progress.update(entry(examples=1000, lost=[0]))
    progress.close()
    text = out.getvalue()
    assert "\r" in text and "a notice" in text
    last = text.rstrip("\n").split("\r")[-1]
    assert "100%" in last and "1.00k/1.00k" in last and "ex/s" in last
    assert "loss=0.5000" in last and "val acc=0.9000" in last
    assert "staleness=1.25" in last and "lost=0" in last and "<" in last  # elapsed<ETA
