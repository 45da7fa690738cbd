from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asyncdb import plot
from asyncdb.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"


def history(path, rate: float, n: int = 6):
    entries = [{"time": 0.5 * (i + 1), "examples": int(rate * 0.5 * (i + 1)),
                "loss": 2.0 / (i + 1), "val_accuracy": 0.5 + 0.08 * i} for i in range(n)]
    entries[-1]["test_accuracy"] = 0.9
    path.write_text(json.dumps({"config": {}, "history": entries}))
    return path


def test_plot_draws_several_runs_from_the_command_line(tmp_path):
    pytest.importorskip("matplotlib")
    history(tmp_path / "a.json", 1000)
    run_dir = tmp_path / "run-b"
    run_dir.mkdir()
    history(run_dir / "history.json", 3000)
    out = subprocess.run([sys.executable, "-m", "asyncdb", "plot", str(tmp_path / "a.json"),
                          str(run_dir), "-o", str(tmp_path / "img" / "curves.png")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    image = (tmp_path / "img" / "curves.png").read_bytes()
    assert image.startswith(PNG) and len(image) > 10_000


def test_plot_draws_the_curves_it_is_given(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import pyplot

    drawn = plot.figure([history(tmp_path / "a.json", 1000)])
    axes = drawn.axes
    (time_line, time_final), (ex_line, _ex_final) = axes[0].lines, axes[1].lines
    assert list(time_line.get_xdata()) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert list(ex_line.get_xdata()) == [500, 1000, 1500, 2000, 2500, 3000]
    assert list(time_line.get_ydata()) == pytest.approx([0.5 + 0.08 * i for i in range(6)])
    assert list(time_final.get_ydata()) == [0.9]  # the final test accuracy
    assert list(axes[2].lines[0].get_ydata()) == pytest.approx([2.0 / (i + 1) for i in range(6)])
    pyplot.close(drawn)


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"), ("{", "not a history file"), ('{"history": 3}', "not a history"),
    ('{"history": []}', "no evaluations")])
def test_bad_runs_fail_clearly(tmp_path, content, message):
    path = tmp_path / "h.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        plot.plot([path], tmp_path / "c.png")


def test_without_matplotlib_one_line_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ConfigError) as error:
        plot.plot([history(tmp_path / "a.json", 1000)], tmp_path / "c.png")
    assert str(error.value) == "asyncdb plot needs matplotlib: pip install 'asyncdb[plot]'"
    assert not (tmp_path / "c.png").exists()
