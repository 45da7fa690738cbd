from __future__ import annotations

import json
import subprocess
import sys

import pytest


def asyncdb_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncdb", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_train_with_defaults_writes_history(tmp_path):
    history = tmp_path / "history.json"
    out = asyncdb_cli("train", "--epochs", "8", "--history", str(history))
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout and "ex/s" in out.stdout
    saved = json.loads(history.read_text())
    assert saved["history"][-1]["test_accuracy"] > 0.9
    assert saved["config"]["replicas"] == 2 and saved["config"]["shards"] == 2
    assert saved["config"]["algorithm"]["n_fetch"] == 1


def test_train_options_reach_the_run(tmp_path):
    history = tmp_path / "h.json"
    out = asyncdb_cli("train", "--inproc", "--replicas", "3", "--shards", "1", "--optimizer",
                      "sgd", "--lr", "0.2", "--n-push", "2", "--batch-size", "16",
                      "--epochs", "2", "--history", str(history), "--hidden", "")
    assert out.returncode == 0, out.stderr
    config = json.loads(history.read_text())["config"]
    assert config["optimizer"] == {"rule": "sgd", "lr": 0.2}
    assert config["model"]["sizes"] == [64, 10]
    assert config["algorithm"]["n_push"] == 2 and config["replicas"] == 3


def test_bad_arguments_fail_clearly():
    out = asyncdb_cli("train", "--data", "imagenet")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = asyncdb_cli("train", "--inproc", "--n-fetch", "0")
    assert out.returncode != 0 and "n_fetch" in out.stderr
