from __future__ import annotations

import json
import re
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


def test_train_sandblaster(tmp_path):
    history = tmp_path / "sb.json"
    out = asyncdb_cli("train", "--inproc", "--algorithm", "sandblaster", "--lbfgs-memory", "5",
                      "--portion-size", "128", "--iterations", "6", "--hidden", "",
                      "--history", str(history))
    assert out.returncode == 0, out.stderr
    assert "Sandblaster L-BFGS" in out.stdout and "iteration    6" in out.stdout
    saved = json.loads(history.read_text())
    assert saved["config"]["algorithm"]["name"] == "sandblaster"
    assert saved["config"]["algorithm"]["memory"] == 5
    assert saved["config"]["algorithm"]["portion_size"] == 128
    assert [e["iteration"] for e in saved["history"]] == list(range(7))
    assert saved["history"][-1]["test_accuracy"] > 0.9
    out = asyncdb_cli("train", "--inproc", "--algorithm", "sandblaster", "--portion-size", "0")
    assert out.returncode == 1 and "portion_size" in out.stderr


@pytest.mark.slow
def test_train_with_partitions(tmp_path):
    history = tmp_path / "h.json"
    out = asyncdb_cli("train", "--partitions", "2", "--epochs", "6", "--history", str(history))
    assert out.returncode == 0, out.stderr
    assert "2 replicas of 2 partitions" in out.stdout
    saved = json.loads(history.read_text())
    assert saved["config"]["partitions"] == 2 and saved["config"]["mode"] == "local"
    assert saved["history"][-1]["test_accuracy"] > 0.9
    assert all(r["exchange_bytes"] > 0 for r in saved["replicas"].values())


def test_partitions_without_enough_shards_fail_clearly():
    out = asyncdb_cli("train", "--inproc", "--partitions", "3", "--shards", "2")
    assert out.returncode != 0 and "at least one shard per partition" in out.stderr


def test_train_prints_the_dashboard_url(tmp_path):
    out = asyncdb_cli("train", "--inproc", "--epochs", "1", "--dashboard",
                      "--history", str(tmp_path / "h.json"))
    assert out.returncode == 0, out.stderr
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/$", out.stdout, re.M), out.stdout
    assert re.search(r"ETA .* ex/s .* val acc .* staleness .* lost 0$", out.stdout, re.M)


def test_a_bad_dashboard_address_fails_clearly():
    out = asyncdb_cli("train", "--inproc", "--dashboard", "127.0.0.1:http")
    assert out.returncode == 1 and "ConfigError" in out.stderr and "HOST:PORT" in out.stderr


def test_the_dashboard_is_refused_for_sandblaster_not_ignored():
    out = asyncdb_cli("train", "--inproc", "--algorithm", "sandblaster", "--dashboard")
    assert out.returncode == 1 and "--dashboard shows Downpour runs" in out.stderr
