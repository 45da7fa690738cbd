from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import asyncdb


def asyncdb_cli(*args: str, cwd: Path | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncdb", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, cwd=cwd)


def no_traceback(out: subprocess.CompletedProcess[str]) -> None:
    for text in (out.stdout, out.stderr):
        assert "Traceback" not in text and "never retrieved" not in text, text


@pytest.mark.slow
def test_train_with_defaults_saves_a_run_directory(tmp_path):
    history = tmp_path / "history.json"
    out = asyncdb_cli("train", "--epochs", "8", "--history", str(history), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout and "ex/s" in out.stdout
    assert "no rate limits" in out.stdout
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("run saved in ")]
    directory = tmp_path / line.removeprefix("run saved in ").rstrip("/")
    assert directory.parent == tmp_path / "runs"
    saved = json.loads((directory / "history.json").read_text())
    assert saved["history"][-1]["test_accuracy"] > 0.9
    assert saved["config"]["replicas"] == 2 and saved["config"]["shards"] == 2
    assert saved["config"]["algorithm"]["n_fetch"] == 1
    assert json.loads(history.read_text())["history"] == saved["history"]
    no_traceback(out)


def test_train_options_reach_the_run(tmp_path):
    history = tmp_path / "h.json"
    out = asyncdb_cli("train", "--inproc", "--replicas", "3", "--shards", "1", "--optimizer",
                      "sgd", "--lr", "0.2", "--n-push", "2", "--batch-size", "16",
                      "--epochs", "2", "--history", str(history), "--hidden", "",
                      "--save", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    config = json.loads(history.read_text())["config"]
    assert config["optimizer"] == {"rule": "sgd", "lr": 0.2}
    assert config["model"]["sizes"] == [64, 10]
    assert config["algorithm"]["n_push"] == 2 and config["replicas"] == 3
    command = json.loads((tmp_path / "run" / "options.json").read_text())["command"]
    assert command["n_push"] == 2 and command["hidden"] == [] and command["inproc"] is True
    assert command["eval_every"] == 0.5 and command["data"] == "digits"


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
    out = asyncdb_cli("train", "--algorithm", "sandblaster", "--partitions", "2", "--iterations",
                      "3", "--portion-size", "128", "--hidden", "32", "--history", str(history))
    assert out.returncode == 0, out.stderr
    assert "replicas of 2 partitions" in out.stdout and "iteration    3" in out.stdout
    saved = json.loads(history.read_text())
    assert saved["history"][-1]["loss"] < saved["history"][0]["loss"]
    out = asyncdb_cli("train", "--inproc", "--algorithm", "sandblaster", "--portion-size", "0")
    assert out.returncode == 1 and "portion_size" in out.stderr


@pytest.mark.parametrize("algorithm", [
    ["--algorithm", "sandblaster", "--portion-size", "128", "--iterations"],
    ["--epochs"]], ids=["sandblaster", "downpour"])
def test_train_checkpoints_and_resumes(tmp_path, algorithm):
    """--checkpoint-dir writes checkpoints and --resume goes on from them: a Sandblaster
    run for more iterations than it had (only those are done), a Downpour run as it
    was (the units it owes)."""
    ckpt = tmp_path / "ckpt"
    common = ["train", "--inproc", "--hidden", "", "--checkpoint-every", "0.000001"]
    out = asyncdb_cli(*common, *algorithm, "4", "--checkpoint-dir", str(ckpt),
                      "--history", str(tmp_path / "first.json"))
    assert out.returncode == 0, out.stderr
    assert list(ckpt.glob("run.*.ckpt")) and list(ckpt.glob("shard-1.*.ckpt"))
    more = "6" if algorithm[0] == "--algorithm" else "4"
    out = asyncdb_cli(*common, *algorithm, more, "--resume", str(ckpt),
                      "--history", str(tmp_path / "resumed.json"))
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "resumed.json").read_text())
    [resumed] = [e for e in saved["events"] if e["event"] == "resumed"]
    if algorithm[0] == "--algorithm":  # iterations 5 and 6 only, after the first 4
        assert resumed["iteration"] == 4
        assert [e["iteration"] for e in saved["history"]] == list(range(7))
        assert "iteration    4" not in out.stdout and "iteration    5" in out.stdout
    else:
        assert resumed["units_left"] >= 1
    assert saved["history"][-1]["test_accuracy"] > 0.9
    out = asyncdb_cli(*common, *algorithm, more, "--resume", str(tmp_path / "nothing"))
    assert out.returncode == 1 and "no checkpoint" in out.stderr
    no_traceback(out)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [["--algorithm", "sandblaster", "--iterations", "400"],
                                       ["--epochs", "200"]], ids=["sandblaster", "downpour"])
def test_a_run_that_cannot_recover_fails_in_one_line_and_keeps_its_history(tmp_path,
                                                                            algorithm):
    """Every node process killed, the shards' first, and no restarts allowed: a shard
    cannot come back, and that (not the replicas killed after it) is the error."""
    from asyncdb.process import process_state

    proc = subprocess.Popen([sys.executable, "-m", "asyncdb", "train", *algorithm,
                             "--max-restarts", "0", "--save", str(tmp_path / "run"),
                             "--eval-every", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for line in proc.stdout:  # a few iterations, or a few evaluations (bar refreshes)
            if line.startswith("iteration    3") or "ex/s" in line:
                break
        # spawned in node order: node.0 and node.1 hold the two shards
        children = [int(pid) for pid in
                    Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        shards, replicas = children[:2], children[2:]
        for group in (shards, replicas):
            for pid in group:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            while any(process_state(pid) not in ("Z", "") for pid in group):
                time.sleep(0.001)  # until the kernel has taken them down
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert "RecoveryFailed" in err and "Traceback" not in err
    assert f"the history so far is in {tmp_path / 'run' / 'history.json'}" in err
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert saved["failed"] and saved["history"] and "RecoveryFailed" in saved["error"]


@pytest.mark.slow
def test_train_killed_with_its_driver_resumes_from_the_command_line(tmp_path):
    """kill -9 of `asyncdb train --checkpoint-dir D` mid-run, then `--resume D`: the
    run goes on with the units it still owed and trains as well."""
    from processes import kill_9_when

    ckpt = tmp_path / "ckpt"
    args = ["train", "--epochs", "100", "--eval-every", "0.1", "--checkpoint-every", "0.2"]
    kill_9_when(["-m", "asyncdb", *args, "--checkpoint-dir", str(ckpt)],
                lambda line: "%" in line and float(line.split("%")[0].split()[-1]) > 40
                and bool(list(ckpt.glob("run.*.ckpt"))))
    out = asyncdb_cli(*args, "--resume", str(ckpt), "--save", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    [resumed] = [e for e in saved["events"] if e["event"] == "resumed"]
    assert resumed["units_done"] > 0 and resumed["units_left"] > 0
    assert saved["units"]["done"] == saved["units"]["planned"]
    assert saved["history"][-1]["test_accuracy"] > 0.9
    no_traceback(out)


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
                      "--save", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/$", out.stdout, re.M), out.stdout
    assert re.search(r"ETA .* ex/s .* val acc .* staleness .* lost 0$", out.stdout, re.M)


def raw_digits():
    raw = np.load(Path(asyncdb.datasets.__file__).parent / "digits.npz")
    return raw["x"].astype(np.float64), raw["y"]


def test_own_data_in_trained_model_out(tmp_path):
    x, y = raw_digits()
    np.savez(tmp_path / "d.npz", x=x[:1400], y=y[:1400], x_test=x[1400:], y_test=y[1400:])
    run_dir = tmp_path / "model"
    out = asyncdb_cli("train", "--inproc", "--data", str(tmp_path / "d.npz"), "--epochs", "10",
                      "--save", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "train=1260, validation=140, test=397" in out.stdout
    out = asyncdb_cli("evaluate", "--model", str(run_dir), "--data", str(tmp_path / "d.npz"))
    assert out.returncode == 0, out.stderr
    accuracy = float(out.stdout.split("accuracy ")[1])
    assert accuracy > 0.9  # raw rows in: the saved standardization is applied
    header = ",".join([*(f"p{i}" for i in range(64)), "digit"])
    lines = [",".join(map(str, [*row.astype(int), label])) for row, label in zip(x, y,
                                                                                 strict=True)]
    (tmp_path / "d.csv").write_text("\n".join([header, *lines[:300]]) + "\n")
    predictions = tmp_path / "out.csv"
    out = asyncdb_cli("predict", "--model", str(run_dir), "--data", str(tmp_path / "d.csv"),
                      "--label", "digit", "-o", str(predictions))
    assert out.returncode == 0, out.stderr
    predicted = predictions.read_text().split()
    assert predicted[0] == "label" and len(predicted) == 301
    assert np.mean(np.array(predicted[1:], int) == y[:300]) > 0.9
    out = asyncdb_cli("predict", "--model", str(run_dir), "--data", str(tmp_path / "d.npz"))
    assert out.returncode == 0 and len(out.stdout.split()) == 1400
    out = asyncdb_cli("train", "--inproc", "--data", str(tmp_path / "d.csv"), "--epochs", "1",
                      "--label", "digit", "--save", str(tmp_path / "csv-run"))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--hidden", "abc"], "argument --hidden: layer sizes are comma-separated"),
    (["train", "--hidden", "-5"], "argument --hidden: a layer needs at least 1 unit"),
    (["train", "--epochs", "0"], "argument --epochs: must be above 0"),
    (["train", "--epochs", "-3"], "argument --epochs: must be above 0"),
    (["train", "--lr", "0"], "argument --lr: must be above 0"),
    (["train", "--lr", "-0.1"], "argument --lr: must be above 0"),
    (["train", "--lr", "nan"], "argument --lr: must be above 0"),
    (["train", "--eval-every", "0"], "argument --eval-every: must be above 0"),
    (["train", "--n-fetch", "0"], "argument --n-fetch: must be above 0"),
    (["train", "--replicas", "x"], "argument --replicas: not a number"),
    (["train", "--data", "imagenet"], "unknown data set 'imagenet'"),
    (["train", "--data", "missing.npz"], "no such data file: missing.npz"),
    (["train", "--peers", "host:7070", "--secret-file", "s"], "must start with ws://"),
    (["serve", "--listen", "127.0.0.1:99999", "--secret-file", "{secret}"],
     "port 99999 is out of range"),
    (["serve", "--listen", "127.0.0.1:0", "--secret-file", "{secret}", "--import",
      "no_such_module_here"], "--import no_such_module_here: No module named"),
    (["predict", "--model", "nowhere", "--data", "x.npz"], "nowhere is not a saved run"),
])
def test_input_errors_are_one_line(tmp_path, args, message):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    out = asyncdb_cli(*(a.format(secret=secret) for a in args), cwd=tmp_path)
    assert out.returncode in (1, 2)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert lines[0].startswith(f"asyncdb {args[0]}: ")
    no_traceback(out)


def test_serve_on_a_port_in_use_is_one_line(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = asyncdb_cli("serve", "--listen", f"127.0.0.1:{port}", "--secret-file",
                          str(secret))
    assert out.returncode == 1
    assert out.stderr.strip() == (f"asyncdb serve: ConfigError: cannot listen on 127.0.0.1:"
                                  f"{port}: error while attempting to bind on address "
                                  f"('127.0.0.1', {port}): address already in use")


def test_bad_data_is_one_line(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,0\n1,2\n")
    out = asyncdb_cli("train", "--data", str(tmp_path / "bad.csv"))
    assert out.returncode == 1
    assert out.stderr.strip().endswith("line 3: 2 fields, but the header has 3")
    no_traceback(out)


def test_rate_limits_are_shown_and_too_low_ones_warned_about(tmp_path):
    out = asyncdb_cli("train", "--inproc", "--epochs", "2", "--push-bytes-rate", "20000",
                      "--fetch-rate", "50", "--save", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert "rate limits per replica: fetch <= 50/s, push <= 20000 B/s" in out.stdout
    assert ("warning: the push limits allow at most 0.52 updates/s per replica (pushes of "
            "38,440 bytes)") in out.stderr
    assert "updates/s" in out.stderr.split("the rate limits let through")[1]


def start_training(tmp_path, *args):
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncdb", "train", "--epochs", "100000", "--eval-every", "0.2",
         *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:  # wait for the first evaluation: training is under way
        lines.append(line)
        if "ex/s" in line:
            return process, lines
    raise AssertionError("".join(lines))


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGINT, 130, "Ctrl-C"),
                                                   (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_stops_training_and_saves_the_history(tmp_path, sig, code, name):
    process, lines = start_training(tmp_path)
    sent = time.monotonic()
    process.send_signal(sig)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == code, rest
    assert time.monotonic() - sent < 30  # the target is 2 s; bounds are generous for load
    text = "".join(lines) + rest
    stopping = text.index(f"{name}: stopping the run")
    stopped = text.index("stopped early after")
    saved = text.index("run saved in ")
    assert stopping < stopped < saved
    no_traceback(subprocess.CompletedProcess([], code, text, ""))
    directory = tmp_path / text[saved:].split()[3].rstrip("/")
    history = json.loads((directory / "history.json").read_text())
    assert history["stopped"] is True and history["history"][-1]["test_accuracy"] > 0
    examples = history["history"][-1]["examples"]
    assert examples < 100000 * 1294 / 100  # nowhere near the end of the run


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    # with these limits a replica hears of the stop only at its next exchange, 5 s away
    process, _ = start_training(tmp_path, "--push-rate", "0.2", "--fetch-rate", "0.2")
    process.send_signal(signal.SIGINT)
    assert process.stdout is not None
    for line in process.stdout:
        if "stopping the run" in line:
            break
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "stopped at once" in rest and "run saved" not in rest and "Traceback" not in rest


def test_a_bad_dashboard_address_fails_clearly():
    out = asyncdb_cli("train", "--inproc", "--dashboard", "127.0.0.1:http")
    assert out.returncode == 1 and "ConfigError" in out.stderr and "HOST:PORT" in out.stderr


def test_the_dashboard_is_refused_for_sandblaster_not_ignored():
    out = asyncdb_cli("train", "--inproc", "--algorithm", "sandblaster", "--dashboard")
    assert out.returncode == 1 and "--dashboard shows Downpour runs" in out.stderr
